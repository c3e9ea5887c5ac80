#!/usr/bin/env bash
# ci/bench-net.sh — NIC benchmark: vhost-net-ft against QEMU's TAP backend and OVS-DPDK,
# the same guest and the same path to the client, all in one run.
#
# Usage: sudo ci/bench-net.sh [--seconds S] [--repeat N] [--backends LIST]
#
#   --seconds S   measuring time of each workload (default 5; plus 1 s warm-up)
#   --repeat N    measure each workload N times on the same boot and report the median
#                 of the runs (default 3; all runs are printed too)
#   --backends LIST  comma-separated, from vhost-net-ft, vhost-net-ft-peer, tap, tap+vhost,
#                 ovs-dpdk (default: all). E.g. `--backends vhost-net-ft,vhost-net-ft-peer`
#                 measures the redundant path against the local one in about a minute.
#
# Steps: installs missing Debian packages (ci/install-deps.sh; OVS-DPDK's
# openvswitch-switch-dpdk and librte-mempool-ring23 too), builds the test guest
# (ci/build-guest.sh) and vhost-net-ft (release), brings up test hosts bench-net-*
# (ci/hosts.sh). Then, for each backend, boots the same guest in bench-net-hostA (QEMU TCG,
# 1 vCPU, 256 MiB, virtio-net-pci with vectors=0, guest IP 10.77.0.10/24, MAC
# 52:54:00:77:00:10) with its NIC a port of hostA's vmbr0, whose uplink reaches the LAN and
# the client namespace (10.77.0.4):
#   vhost-net-ft    vhost-net-ft --bridge vmbr0; QEMU -netdev vhost-user
#   vhost-net-ft-peer  the same with the redundant uplink, hostA's uplink down: the traffic
#                   goes over the A-links to a standby vhost-net-ft in hostB and its uplink
#   tap             QEMU -netdev tap (vhost=off) on a TAP enslaved to vmbr0
#   tap+vhost       the same with vhost=on (kernel vhost-net), skipped without /dev/vhost-net
#   ovs-dpdk        ovs-vswitchd-dpdk (DESIGN.md's recipe, private run/db dirs, --no-huge) with
#                   a dpdkvhostuserclient port; its bridge's internal port (a TAP) is a port
#                   of vmbr0. Skipped with the reason when OVS-DPDK does not work here.
# and measures from the client:
#   1. TCP throughput guest -> client: the guest serves `dd if=/dev/zero bs=64k` on port 7001;
#      the client reads for S s after a 1 s warm-up, bytes / seconds;
#      with it, the CPU time (utime + stime from /proc/PID/stat) QEMU and the backend's
#      daemons (vhost-net-ft and its standby, or ovs-vswitchd) used during the transfer, per
#      GB received: on this shared machine the CPU cost per byte varies much less than the
#      throughput does;
#   2. TCP request/response latency: the guest serves `nc -ll -p 7000 -e cat`; the client does
#      64-byte round trips on one connection (TCP_NODELAY) for S s after 50 warm-up rounds.
# Client: a short python3 program when python3 exists, else socat and bash (also with
# BENCH_NET_CLIENT=socat in the environment).
# Prints a table and the ratios vhost-net-ft / tap and vhost-net-ft / ovs-dpdk, each so that
# > 1.0 means vhost-net-ft is better (throughput ft/other, latency other/ft).
# A benchmark, not a test: exit status 0 whatever the numbers, non-zero only when something
# broke. Everything it starts is stopped by PID, the namespaces and TAPs are removed and its
# temp dir under target/tmp deleted, also on failure or Ctrl-C. Needs root.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TOOL=bench-net
# shellcheck source=ci/lib/common.sh
source "$ROOT/ci/lib/common.sh"

SECS=5
REPEAT=3
ALL_BACKENDS=(vhost-net-ft vhost-net-ft-peer tap tap+vhost ovs-dpdk)
BACKENDS=,$(
	IFS=,
	echo "${ALL_BACKENDS[*]}"
),
PREFIX=bench-net-
HOST_A=${PREFIX}hostA
HOST_B=${PREFIX}hostB
CLIENT=${PREFIX}client
GUEST_IP=10.77.0.10
GUEST_MAC=52:54:00:77:00:10
CLIENT_IP=10.77.0.4
RR_PORT=7000
TPUT_PORT=7001
TAP=${PREFIX}tap0 # 14 bytes: fits IFNAMSIZ
OVS_BR=ovsbr0


while (($#)); do
	case "$1" in
	--seconds)
		[[ $# -ge 2 && ${2:-} =~ ^[0-9]+([.][0-9]+)?$ ]] && check "$2 > 0" || die "--seconds needs a positive number"
		SECS=$2
		shift 2
		;;
	--repeat)
		[[ $# -ge 2 && ${2:-} =~ ^[1-9][0-9]?$ ]] || die "--repeat needs a whole number from 1 to 99"
		REPEAT=$2
		shift 2
		;;
	--backends)
		[[ $# -ge 2 && -n ${2:-} ]] || die "--backends needs a list, e.g. vhost-net-ft,vhost-net-ft-peer"
		for name in ${2//,/ }; do
			[[ " ${ALL_BACKENDS[*]} " == *" $name "* ]] ||
				die "--backends: unknown backend $name (one of: ${ALL_BACKENDS[*]})"
		done
		BACKENDS=,$2,
		shift 2
		;;
	-h | --help)
		usage
		exit 0
		;;
	*) die "unknown argument $1 (try --help)" ;;
	esac
done
wanted() { [[ $BACKENDS == *",$1,"* ]]; }
((EUID == 0)) || die "must run as root (network namespaces, TAPs); try: sudo $0"

mkdir -p /run/lock
exec 8>/run/lock/ftvm-bench-net.lock
flock -n 8 || die "another ci/bench-net.sh is running"

GUEST=$ROOT/target/guest
BIN=$ROOT/target/release
TMP=""
HOSTS_UP=0
DPDK_RUNDIR_CREATED=""
declare -A PIDS=()

# --- cleanup --------------------------------------------------------------------------------

cleanup() {
	local rc=$? name
	trap - EXIT INT TERM
	# QEMU first (it holds the backends' sockets), then the backends, then the OVS database.
	for name in qemu vhost-net-ft vhost-net-ft-standby ovs-vswitchd ovsdb-server; do stop "$name"; done
	for name in "${!PIDS[@]}"; do stop "$name"; done
	if ((HOSTS_UP)); then
		ip -n "$HOST_A" link del "$TAP" 2>/dev/null || true
		bash ci/hosts.sh down "$PREFIX" >/dev/null || true
	fi
	if [[ -n $DPDK_RUNDIR_CREATED ]]; then rm -rf "$DPDK_RUNDIR_CREATED"; fi
	rmdir /var/run/dpdk 2>/dev/null || true
	if ((rc != 0)) && [[ -n $TMP && -d $TMP ]]; then
		for name in "$TMP"/*.log "$TMP"/*.console; do
			[[ -s $name ]] || continue
			echo "---- last lines of $(basename "$name")" >&2
			tail -n 15 "$name" >&2
		done
	fi
	[[ -z $TMP ]] || rm -rf "$TMP"
	if ((rc != 0)); then log "failed (exit status $rc)"; fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers --------------------------------------------------------------------------------

# poll TIMEOUT_S PROCESS_NAME COMMAND...: run COMMAND every 50 ms until it succeeds (0), the
# process exits (2) or the time is up (1).
poll() {
	local timeout=$1 name=$2 deadline
	shift 2
	deadline=$(calc "$(now) + $timeout")
	until "$@"; do
		if [[ -n $name ]] && ! alive "$name"; then return 2; fi
		if check "$(now) > $deadline"; then return 1; fi
		sleep 0.05
	done
}

has_line() { grep -a -q "$2" "$1" 2>/dev/null; } # FILE REGEX

# --- setup ----------------------------------------------------------------------------------

bash ci/install-deps.sh
OVS_SKIP=""
if wanted ovs-dpdk && ! bash ci/install-deps.sh openvswitch-switch-dpdk librte-mempool-ring23 >&2; then
	OVS_SKIP="could not install openvswitch-switch-dpdk librte-mempool-ring23"
fi
bash ci/build-guest.sh >&2
cargo build --release --locked -p vhost-net-ft >&2

PY=""
if [[ -x /usr/bin/python3 ]]; then PY=/usr/bin/python3; elif command -v python3 >/dev/null; then PY=$(command -v python3); fi
if [[ ${BENCH_NET_CLIENT:-} == socat ]]; then PY=""; fi
CLIENT_KIND=python3
[[ -n $PY ]] || CLIENT_KIND="socat + bash"

mkdir -p "$ROOT/target/tmp"
TMP=$(mktemp -d "$ROOT/target/tmp/bench-net.XXXXXX")

# The guest: NIC up, wait until the client answers a ping (the path works and the bridges have
# learnt the MAC), then serve the throughput source and the echo.
cat >"$TMP/test.sh" <<EOF
ip link set eth0 up
ip addr add $GUEST_IP/24 dev eth0
i=0
until ping -c 1 -W 1 $CLIENT_IP >/dev/null 2>&1; do
	i=\$((i + 1))
	if [ \$i -ge 60 ]; then echo NET-FAIL; exit 1; fi
done
printf '#!/bin/sh\nexec dd if=/dev/zero bs=65536 2>/dev/null\n' >/tmp/src.sh
chmod +x /tmp/src.sh
nc -ll -p $TPUT_PORT -e /tmp/src.sh &
echo NET-UP
nc -ll -p $RR_PORT -e cat
EOF
INITRD=$TMP/guest.initrd
cat "$GUEST/initramfs.gz" >"$INITRD"
# The kernel finds an uncompressed archive only at a 4-byte aligned offset.
truncate -s $((($(stat -c %s "$INITRD") + 3) / 4 * 4)) "$INITRD"
(cd "$TMP" && echo test.sh | busybox cpio -o -H newc 2>/dev/null) >>"$INITRD"

cat >"$TMP/client.py" <<'EOF'
import socket, statistics, sys, time
mode, host, port, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + 30
while True:
    try:
        s = socket.create_connection((host, port), timeout=10)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
if mode == "tput":
    buf = bytearray(1 << 20)
    t0 = time.monotonic()
    start = None
    n = 0
    total = 0
    while True:
        k = s.recv_into(buf)
        if k == 0:
            raise SystemExit("the guest closed the connection")
        total += k
        t = time.monotonic()
        if start is None:
            if t - t0 >= 1.0:
                start = t
            continue
        n += k
        if t - start >= secs:
            break
    s.close()
    print("%d %.6f %d" % (n, t - start, total))
else:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * 64
    samples = []
    warm = 50
    end = None
    while True:
        t = time.perf_counter()
        s.sendall(msg)
        got = 0
        while got < len(msg):
            chunk = s.recv(len(msg) - got)
            if not chunk:
                raise SystemExit("the guest closed the connection")
            got += len(chunk)
        t2 = time.perf_counter()
        if warm > 0:
            warm -= 1
            if warm == 0:
                end = t2 + secs
            continue
        samples.append(t2 - t)
        if t2 >= end:
            break
    s.close()
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    print("%d %.1f %.1f" % (len(samples), statistics.median(samples) * 1e6, p99 * 1e6))
EOF

# Client side, python3 or socat: prints "BYTES SECONDS TOTAL_BYTES" (tput; the total includes
# the warm-up) or "ROUNDS MEDIAN_US P99_US" (rr).
client() { # tput|rr
	if [[ -n $PY ]]; then
		local port=$RR_PORT
		[[ $1 == tput ]] && port=$TPUT_PORT
		ip netns exec "$CLIENT" "$PY" "$TMP/client.py" "$1" "$GUEST_IP" "$port" "$SECS"
	elif [[ $1 == tput ]]; then
		# Whole stream including connection setup, for S + 1 s.
		local t0 t1 bytes
		t0=$(now)
		bytes=$(ip netns exec "$CLIENT" timeout "$(calc "$SECS + 1")" \
			socat -u "TCP:$GUEST_IP:$TPUT_PORT,connect-timeout=10" - | wc -c) || true
		t1=$(now)
		echo "$bytes $(calc "$t1 - $t0") $bytes"
	else
		local msg t rounds=0 end warm=50 start
		msg=$(printf 'x%.0s' {1..63})
		coproc RR { exec ip netns exec "$CLIENT" socat - "TCP:$GUEST_IP:$RR_PORT,connect-timeout=10,nodelay"; }
		PIDS[rr-client]=$RR_PID
		: >"$TMP/rr.samples"
		while :; do
			start=$EPOCHREALTIME
			printf '%s\n' "$msg" >&"${RR[1]}"
			IFS= read -r -t 10 _ <&"${RR[0]}" || die "echo from the guest timed out"
			t=$(calc "(${EPOCHREALTIME} - $start) * 1e6")
			if ((warm > 0)); then
				warm=$((warm - 1))
				((warm == 0)) && end=$(calc "${EPOCHREALTIME} + $SECS")
				continue
			fi
			echo "$t" >>"$TMP/rr.samples"
			rounds=$((rounds + 1))
			check "${EPOCHREALTIME} >= $end" && break
		done
		stop rr-client
		sort -g "$TMP/rr.samples" | awk -v n="$rounds" '
			{ v[NR] = $1 }
			END { m = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
			      i = int(n * 0.99) + 1; if (i > n) i = n
			      printf "%d %.1f %.1f\n", n, m, v[i] }'
	fi
}

log "$(nproc) cores, kernel $(uname -r), $(qemu-system-x86_64 --version | head -n 1)"
log "client: $CLIENT_KIND${PY:+ ($PY)}"
bash ci/hosts.sh up "$PREFIX" >/dev/null
HOSTS_UP=1

# --- one guest, one backend -----------------------------------------------------------------

declare -A TPUT=() RR_MED=() RR_P99=() RR_N=() SKIPPED=() RUNS=() CPU_QEMU=() CPU_DAEMONS=()
CLK_TCK=$(getconf CLK_TCK)
# cpu_seconds NAME...: utime + stime of the processes we started under these names, summed.
cpu_seconds() {
	local name ticks=0 stat fields
	for name in "$@"; do
		alive "$name" || continue
		stat=$(cat "/proc/${PIDS[$name]}/stat" 2>/dev/null) || continue
		# Fields after the command (which may contain spaces): state is field 3, utime 14.
		read -r -a fields <<<"${stat##*) }"
		ticks=$((ticks + fields[11] + fields[12]))
	done
	calc "$ticks / $CLK_TCK"
}
# The backend's own processes besides QEMU, by backend.
daemons_of() {
	case $1 in
	vhost-net-ft) echo vhost-net-ft ;;
	vhost-net-ft-peer) echo vhost-net-ft vhost-net-ft-standby ;;
	ovs-dpdk) echo ovs-vswitchd ;;
	esac
}
median_of() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ORDER=()
SKIP_REASON=""

# boot_and_measure NAME NETDEV-ARGS...: boots the guest with the given -chardev/-netdev args
# (the netdev's id must be hn0), measures, stops QEMU. Returns 1 with SKIP_REASON set when the
# guest does not come up.
boot_and_measure() {
	local name=$1 console=$TMP/$1.console rc out bytes seconds
	shift
	: >"$console"
	ip netns exec "$HOST_A" qemu-system-x86_64 -accel tcg -smp 1 -m 256M -nographic -nodefaults \
		-no-reboot -serial stdio \
		-object memory-backend-memfd,id=mem,size=256M,share=on -machine memory-backend=mem \
		-kernel "$GUEST/vmlinuz" -initrd "$INITRD" -append "console=ttyS0 panic=-1 quiet no_timer_check" \
		"$@" -device "virtio-net-pci,netdev=hn0,mac=$GUEST_MAC,romfile=,vectors=0" \
		</dev/null >"$console" 2>&1 &
	PIDS[qemu]=$!
	rc=0
	poll 120 qemu has_line "$console" '^NET-\(UP\|FAIL\)' || rc=$?
	if ((rc != 0)) || has_line "$console" '^NET-FAIL'; then
		case $rc in
		2) SKIP_REASON="QEMU exited: $(grep -a -v '^\s*$' "$console" | tail -n 1)" ;;
		1) SKIP_REASON="the guest did not come up within 120 s" ;;
		*) SKIP_REASON="the guest could not reach the client ($CLIENT_IP)" ;;
		esac
		stop qemu
		return 1
	fi
	# Each workload REPEAT times on the same boot; the median of the runs is reported.
	local run tputs=() medians=() p99s=() rounds median p99 total=0 all_bytes
	local qemu_cpus=() daemon_cpus=() q0 d0 daemons
	read -r -a daemons <<<"$(daemons_of "$name")"
	for ((run = 1; run <= REPEAT; run++)); do
		log "$name: guest up, measuring throughput (${SECS} s, run $run of $REPEAT)"
		q0=$(cpu_seconds qemu)
		d0=$(cpu_seconds "${daemons[@]}")
		out=$(client tput) || {
			SKIP_REASON="throughput client failed"
			stop qemu
			return 1
		}
		read -r bytes seconds all_bytes <<<"$out"
		# CPU seconds per GB over the whole transfer, warm-up included.
		qemu_cpus+=("$(calc "($(cpu_seconds qemu) - $q0) / ($all_bytes + 1) * 1e9")")
		daemon_cpus+=("$(calc "($(cpu_seconds "${daemons[@]}") - $d0) / ($all_bytes + 1) * 1e9")")
		tputs+=("$(calc "$bytes * 8 / $seconds / 1e6")")
		log "$name: $bytes bytes in $seconds s (CPU per GB: QEMU ${qemu_cpus[-1]} s, daemons ${daemon_cpus[-1]} s); measuring request/response (${SECS} s)"
		out=$(client rr) || {
			SKIP_REASON="request/response client failed"
			stop qemu
			return 1
		}
		read -r rounds median p99 <<<"$out"
		medians+=("$median")
		p99s+=("$p99")
		total=$((total + rounds))
	done
	TPUT[$name]=$(median_of "${tputs[@]}")
	CPU_QEMU[$name]=$(median_of "${qemu_cpus[@]}")
	CPU_DAEMONS[$name]=$(median_of "${daemon_cpus[@]}")
	RR_N[$name]=$total
	RR_MED[$name]=$(median_of "${medians[@]}")
	RR_P99[$name]=$(median_of "${p99s[@]}")
	RUNS[$name]="tput ${tputs[*]}; median ${medians[*]}; p99 ${p99s[*]}; CPU s/GB QEMU ${qemu_cpus[*]}, daemons ${daemon_cpus[*]}"
	stop qemu
	ORDER+=("$name")
}

skip() { # NAME REASON
	SKIPPED[$1]=$2
	ORDER+=("$1")
	log "$1: skipped: $2"
}

# a. vhost-net-ft
run_ft() {
	local sock=$TMP/ft.sock
	ip netns exec "$HOST_A" "$BIN/vhost-net-ft" --socket "$sock" --bridge vmbr0 --mac "$GUEST_MAC" \
		--control "$TMP/ft.ctl" >>"$TMP/vhost-net-ft.log" 2>&1 &
	PIDS[vhost-net-ft]=$!
	poll 10 vhost-net-ft test -S "$sock" || die "vhost-net-ft did not create its socket"
	boot_and_measure vhost-net-ft -chardev "socket,id=n0,path=$sock" \
		-netdev vhost-user,id=hn0,chardev=n0 || die "vhost-net-ft: $SKIP_REASON"
	stop vhost-net-ft
}

# a'. vhost-net-ft on the redundant path: hostA's uplink is down, so the guest's traffic goes
# over the A-links to the NIC's standby daemon in hostB and out of hostB's uplink.
run_ft_peer() {
	local sock=$TMP/ft-peer.sock name=vhost-net-ft-peer
	head -c 32 /dev/urandom | base64 >"$TMP/pair.psk"
	ip netns exec "$HOST_A" "$BIN/vhost-net-ft" --socket "$sock" --bridge vmbr0 --mac "$GUEST_MAC" \
		--control "$TMP/ft-peer.ctl" --uplink uplink --host-id hostA --psk-file "$TMP/pair.psk" \
		--listen 10.77.1.1:7450 --listen 10.77.2.1:7450 --peer 10.77.1.2:7450 --peer 10.77.2.2:7450 \
		>>"$TMP/vhost-net-ft-peer.log" 2>&1 &
	PIDS[vhost-net-ft]=$!
	ip netns exec "$HOST_B" "$BIN/vhost-net-ft" --socket "$TMP/ft-standby.sock" --bridge vmbr0 \
		--mac "$GUEST_MAC" --control "$TMP/ft-standby.ctl" --uplink uplink --host-id hostB \
		--psk-file "$TMP/pair.psk" --listen 10.77.1.2:7450 --listen 10.77.2.2:7450 \
		--peer 10.77.1.1:7450 --peer 10.77.2.1:7450 >>"$TMP/vhost-net-ft-standby.log" 2>&1 &
	PIDS[vhost-net-ft-standby]=$!
	poll 10 vhost-net-ft test -S "$sock" || die "vhost-net-ft did not create its socket"
	poll 10 vhost-net-ft-standby test -S "$TMP/ft-standby.sock" || die "the standby vhost-net-ft did not create its socket"
	ip -n "$HOST_A" link set uplink down
	local ok=0
	boot_and_measure "$name" -chardev "socket,id=n0,path=$sock" \
		-netdev vhost-user,id=hn0,chardev=n0 || ok=1
	ip -n "$HOST_A" link set uplink up
	local status
	status=$(ft_status "$TMP/ft-peer.ctl")
	# (The path is local again by now: QEMU has stopped.) Every frame must have taken the
	# peer path; frames lost on the way (a full link window drops one, like a full TAP
	# queue) are shown too.
	if ((ok == 0)) && [[ $(grep -o -E '"tx_packets":[0-9]+' <<<"$status") != \
		$(grep -o -E '"peer_tx_packets":[0-9]+' <<<"$status" | sed 's/peer_//') ]]; then
		log "$name: warning: not every frame of the guest took the peer path"
	fi
	log "$name: hostA $(grep -o -E '"(tx_packets|peer_tx_packets|peer_tx_messages|peer_tx_dropped|peer_rx_packets|peer_rx_dropped)":[0-9]+' <<<"$status" | tr '\n' ' ')"
	log "$name: hostB $(ft_status "$TMP/ft-standby.ctl" | grep -o -E '"(relay_to_lan_packets|relay_to_peer_packets|peer_tx_dropped|peer_rx_dropped|tap_write_errors)":[0-9]+' | tr '\n' ' ')"
	stop vhost-net-ft
	stop vhost-net-ft-standby
	((ok == 0)) || die "$name: $SKIP_REASON"
}
ft_status() { # CONTROL-SOCKET: the daemon's status line
	echo status | socat -t 2 - "UNIX-CONNECT:$1" 2>/dev/null || true
}

# b. QEMU's TAP backend, vhost=off|on
run_tap() { # NAME VHOST
	ip -n "$HOST_A" link del "$TAP" 2>/dev/null || true
	ip -n "$HOST_A" tuntap add dev "$TAP" mode tap
	ip -n "$HOST_A" link set "$TAP" master vmbr0 up
	local ok=0
	boot_and_measure "$1" -netdev "tap,id=hn0,ifname=$TAP,script=no,downscript=no,vhost=$2" || ok=1
	ip -n "$HOST_A" link del "$TAP"
	return $ok
}

# c. OVS with DPDK (DESIGN.md "NIC reference"); returns 1 with SKIP_REASON set.
OVS_DIR=""
ovs_vsctl() { ovs-vsctl --db="unix:$OVS_DIR/db.sock" --timeout=60 "$@"; }
ovs_fail() { # REASON: tail of the vswitchd log into the reason
	SKIP_REASON="$1"
	local last
	last=$(grep -a -E 'ERR|EMER|WARN' "$OVS_DIR/ovs-vswitchd.log" 2>/dev/null | tail -n 1 | cut -c1-200) || true
	[[ -z $last ]] || SKIP_REASON+=" (vswitchd: $last)"
	return 1
}
dpdk_ready() { [[ $(ovs_vsctl get Open_vSwitch . dpdk_initialized 2>/dev/null) == true ]]; }
run_ovs() {
	local sock pid
	OVS_DIR=$TMP/ovs
	mkdir -p "$OVS_DIR"
	sock=$OVS_DIR/vhu0.sock
	export OVS_RUNDIR=$OVS_DIR OVS_DBDIR=$OVS_DIR OVS_LOGDIR=$OVS_DIR
	if [[ ! -e /var/run/dpdk ]]; then DPDK_RUNDIR_CREATED=/var/run/dpdk/rte; fi
	ovsdb-tool create "$OVS_DIR/conf.db" /usr/share/openvswitch/vswitch.ovsschema ||
		ovs_fail "ovsdb-tool create failed" || return 1
	ovsdb-server "$OVS_DIR/conf.db" --remote="punix:$OVS_DIR/db.sock" \
		--pidfile="$OVS_DIR/ovsdb-server.pid" --log-file="$OVS_DIR/ovsdb-server.log" \
		--detach --no-chdir >>"$TMP/ovsdb-server.log" 2>&1 || ovs_fail "ovsdb-server did not start" || return 1
	PIDS[ovsdb-server]=$(cat "$OVS_DIR/ovsdb-server.pid")
	ovs_vsctl --no-wait init || ovs_fail "ovs-vsctl init failed" || return 1
	ovs_vsctl --no-wait set Open_vSwitch . other_config:dpdk-init=true \
		other_config:per-port-memory=true other_config:pmd-cpu-mask=0x2 \
		other_config:userspace-tso-enable=true \
		other_config:dpdk-extra="--no-huge --legacy-mem -m 1024 --no-pci" ||
		ovs_fail "ovs-vsctl set other_config failed" || return 1
	ip netns exec "$HOST_A" /usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk \
		"unix:$OVS_DIR/db.sock" --pidfile="$OVS_DIR/ovs-vswitchd.pid" \
		--log-file="$OVS_DIR/ovs-vswitchd.log" --detach --no-chdir >>"$TMP/ovs-vswitchd.log" 2>&1 ||
		ovs_fail "ovs-vswitchd-dpdk did not start" || return 1
	pid=$(cat "$OVS_DIR/ovs-vswitchd.pid" 2>/dev/null) || ovs_fail "ovs-vswitchd-dpdk wrote no pidfile" || return 1
	PIDS[ovs-vswitchd]=$pid
	poll 60 ovs-vswitchd dpdk_ready || ovs_fail "DPDK did not initialise" || return 1
	ovs_vsctl add-br "$OVS_BR" -- set bridge "$OVS_BR" datapath_type=netdev ||
		ovs_fail "add-br $OVS_BR failed" || return 1
	ovs_vsctl add-port "$OVS_BR" vhu0 -- set Interface vhu0 type=dpdkvhostuserclient \
		options:vhost-server-path="$sock" || ovs_fail "add-port vhu0 failed" || return 1
	# The bridge's internal port is a TAP in hostA: make it a port of vmbr0.
	poll 20 ovs-vswitchd ip -n "$HOST_A" link show "$OVS_BR" >/dev/null 2>&1 ||
		ovs_fail "no $OVS_BR device in $HOST_A" || return 1
	ip -n "$HOST_A" link set "$OVS_BR" master vmbr0 up
	boot_and_measure ovs-dpdk -chardev "socket,id=n0,path=$sock,server=on,wait=off" \
		-netdev vhost-user,id=hn0,chardev=n0 || ovs_fail "$SKIP_REASON" || return 1
}
stop_ovs() {
	stop qemu
	if alive ovs-vswitchd; then
		ovs_vsctl --if-exists del-br "$OVS_BR" >/dev/null 2>&1 || true
	fi
	stop ovs-vswitchd
	stop ovsdb-server
	ip -n "$HOST_A" link del "$OVS_BR" 2>/dev/null || true
	ip -n "$HOST_A" link del ovs-netdev 2>/dev/null || true
	if [[ -n $DPDK_RUNDIR_CREATED ]]; then rm -rf "$DPDK_RUNDIR_CREATED"; fi
	rmdir /var/run/dpdk 2>/dev/null || true
	unset OVS_RUNDIR OVS_DBDIR OVS_LOGDIR
}

if wanted vhost-net-ft; then run_ft; fi
if wanted vhost-net-ft-peer; then run_ft_peer; fi
if wanted tap; then run_tap tap off || die "tap: $SKIP_REASON"; fi
if wanted tap+vhost; then
	if [[ ! -c /dev/vhost-net ]]; then modprobe vhost_net >/dev/null 2>&1 || true; fi
	if [[ ! -c /dev/vhost-net ]]; then
		skip tap+vhost "no /dev/vhost-net (kernel vhost-net not available on this host)"
	elif ! run_tap tap+vhost on; then
		skip tap+vhost "$SKIP_REASON"
	fi
fi
if wanted ovs-dpdk; then
	if [[ -n $OVS_SKIP ]]; then
		skip ovs-dpdk "$OVS_SKIP"
	elif ! run_ovs; then
		skip ovs-dpdk "$SKIP_REASON"
	fi
	stop_ovs
fi

# --- report ---------------------------------------------------------------------------------

echo
echo "bench-net: $(nproc) cores, QEMU TCG 1 vCPU 256 MiB, virtio-net-pci vectors=0; guest $GUEST_IP -> client $CLIENT_IP via vmbr0/br0; ${SECS} s per workload, median of ${REPEAT} run(s); client ${CLIENT_KIND}"
printf '| %-17s | %20s | %16s | %13s | %11s | %14s | %17s |\n' backend "TCP guest->client" \
	"RR median (us)" "RR p99 (us)" "round trips" "QEMU CPU s/GB" "daemons CPU s/GB"
printf '|%s|%s|%s|%s|%s|%s|%s|\n' "-------------------" "----------------------" "------------------" \
	"---------------" "-------------" "----------------" "-------------------"
for name in "${ORDER[@]}"; do
	if [[ -n ${SKIPPED[$name]:-} ]]; then
		printf '| %-17s | skipped: %s\n' "$name" "${SKIPPED[$name]}"
	else
		daemon_cpu=-
		[[ -z $(daemons_of "$name") ]] || daemon_cpu=$(printf '%.2f' "${CPU_DAEMONS[$name]}")
		printf '| %-17s | %13.1f Mbit/s | %16.1f | %13.1f | %11d | %14.2f | %17s |\n' "$name" \
			"${TPUT[$name]}" "${RR_MED[$name]}" "${RR_P99[$name]}" "${RR_N[$name]}" \
			"${CPU_QEMU[$name]}" "$daemon_cpu"
	fi
done
echo
for name in "${ORDER[@]}"; do
	[[ -z ${RUNS[$name]:-} ]] || printf 'runs of %s: %s\n' "$name" "${RUNS[$name]}"
done
echo
ratio() { # OTHER LABEL
	wanted "$1" || return 0
	if [[ -z ${TPUT[vhost-net-ft]:-} ]]; then
		echo "vhost-net-ft / $2: vhost-net-ft not measured"
		return
	fi
	if [[ -z ${TPUT[$1]:-} ]]; then
		echo "vhost-net-ft / $2: skipped: ${SKIPPED[$1]:-not measured}"
		return
	fi
	printf 'vhost-net-ft / %s: throughput %.2fx, latency %.2fx (median), %.2fx (p99)   (> 1.0: vhost-net-ft better)\n' \
		"$2" "$(calc "${TPUT[vhost-net-ft]} / ${TPUT[$1]}")" \
		"$(calc "${RR_MED[$1]} / ${RR_MED[vhost-net-ft]}")" \
		"$(calc "${RR_P99[$1]} / ${RR_P99[vhost-net-ft]}")"
}
if [[ -n ${TPUT[vhost-net-ft-peer]:-} && -n ${TPUT[vhost-net-ft]:-} ]]; then
	printf 'redundant path (hostA uplink down, via hostB): throughput %.2fx of the local path, latency +%.1f us (median), +%.1f us (p99); daemons CPU per GB %.2fx of the local path (goal: throughput >= 0.8x)\n' \
		"$(calc "${TPUT[vhost-net-ft-peer]} / ${TPUT[vhost-net-ft]}")" \
		"$(calc "${RR_MED[vhost-net-ft-peer]} - ${RR_MED[vhost-net-ft]}")" \
		"$(calc "${RR_P99[vhost-net-ft-peer]} - ${RR_P99[vhost-net-ft]}")" \
		"$(calc "${CPU_DAEMONS[vhost-net-ft-peer]} / (${CPU_DAEMONS[vhost-net-ft]} + 1e-9)")"
fi
ratio tap "tap (vhost=off)"
ratio tap+vhost "tap (vhost=on)"
ratio ovs-dpdk "OVS-DPDK"
