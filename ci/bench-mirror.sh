#!/usr/bin/env bash
# ci/bench-mirror.sh — Level 2 mirroring benchmark (issue 12): local-only vs mirrored over the
# A-links, encryption on and off, against QEMU's own synchronous mirror, with the link, the
# resync rates and the cipher measured in the same run.
#
# Usage: sudo ci/bench-mirror.sh [--seconds S] [--image-mib N] [--delta-mib N]
#
#   --seconds S      run time of each workload (default 5)
#   --image-mib N    size of the disk images in MiB (default 1024)
#   --delta-mib N    data written while degraded, resynced as a delta (default 256)
#
# Steps: installs missing Debian packages (iperf3, jq, socat, qemu-system-common for
# qemu-storage-daemon, ...), builds the release binaries and the cipher example, (re)creates
# test hosts bench-hostA/bench-hostB (ci/hosts.sh), and two raw images under target/bench/
# filled with random data (cached between runs). Then it measures:
#   1. the link: iperf3 TCP throughput hostA -> hostB over alink1 (3 s) and ping RTT;
#   2. local-only: a standalone vhost-blk-mirror in hostA;
#   3. full sync: a fresh secondary in hostB, time from primary start to UpToDate;
#   4. mirrored: the same primary (peers 10.77.1.2 and 10.77.2.2), secondary UpToDate;
#   5. delta resync: secondary killed, primary told continue-degraded, --delta-mib written,
#      secondary restarted, time to UpToDate;
#   6. mirrored with encryption off: both daemons restarted with --link-encryption off;
#   7. QEMU local: qemu-storage-daemon in hostA exporting image A as vhost-user-blk;
#   8. QEMU's mirror: the same daemon, a blockdev-mirror job (sync=full,
#      copy-mode=write-blocking) to an NBD export of qemu-storage-daemon in hostB over
#      alink1; its initial copy timed to the job's BLOCK_JOB_READY event, then the workloads;
#   9. the cipher alone: GB/s per core (replication-link's example `cipher`).
# Workloads (ftvm-blk-bench in hostA, EVENT_IDX on): 4k randwrite QD1, 4k randwrite QD32,
# 1 MiB sequential write QD4, each with the daemons' CPU time per GB written (user + system
# of all their threads, /proc/PID/stat: on a shared machine steadier than throughput).
# Prints markdown tables and PASS/MISS against issue 12's goals.
# A benchmark, not a test: exit status 0 whether goals are met or not, non-zero only when
# something broke. Everything it starts is stopped by PID, the hosts are removed and
# temporary files deleted, also on failure or Ctrl-C. Needs root.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TOOL=bench-mirror
# shellcheck source=ci/lib/common.sh
source "$ROOT/ci/lib/common.sh"

SECONDS_PER_RUN=5
IMAGE_MIB=1024
DELTA_MIB=256
PREFIX=bench-
HOST_A=${PREFIX}hostA
HOST_B=${PREFIX}hostB
PORT=7400
NBD_PORT=7401
LINK_SECONDS=3
CIPHER_SECONDS=1


is_number() { [[ $1 =~ ^[0-9]+([.][0-9]+)?$ ]]; }
is_integer() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

while (($#)); do
	case "$1" in
	--seconds)
		if (($# < 2)) || ! is_number "$2" || ! check "$2 > 0"; then die "--seconds needs a positive number"; fi
		SECONDS_PER_RUN=$2
		shift 2
		;;
	--image-mib)
		if (($# < 2)) || ! is_integer "$2"; then die "--image-mib needs a positive integer"; fi
		IMAGE_MIB=$2
		shift 2
		;;
	--delta-mib)
		if (($# < 2)) || ! is_integer "$2"; then die "--delta-mib needs a positive integer"; fi
		DELTA_MIB=$2
		shift 2
		;;
	-h | --help)
		usage
		exit 0
		;;
	*) die "unknown argument $1 (try --help)" ;;
	esac
done
((DELTA_MIB <= IMAGE_MIB)) || die "--delta-mib ($DELTA_MIB) exceeds --image-mib ($IMAGE_MIB)"
((EUID == 0)) || die "must run as root (network namespaces); try: sudo $0"

# One run at a time: the host prefix and the images are shared.
mkdir -p /run/lock
exec 8>/run/lock/ftvm-bench-mirror.lock
flock -n 8 || die "another ci/bench-mirror.sh is running"

WORK=$ROOT/target/bench
BIN=$ROOT/target/release
IMAGE_A=$WORK/mirror-a.img
IMAGE_B=$WORK/mirror-b.img
IMAGE_BYTES=$((IMAGE_MIB << 20))
RUN=""      # metadata, logs, PSK, results (beside the images: same file system)
SOCKDIR=""  # unix sockets (short paths)
HOSTS_UP=0
declare -A PIDS=()

# --- cleanup --------------------------------------------------------------------------------

cleanup() {
	local rc=$? name file
	trap - EXIT INT TERM
	exec 7>&-
	for name in "${!PIDS[@]}"; do stop "$name"; done
	if ((rc != 0)) && [[ -n $RUN && -d $RUN ]]; then
		for file in "$RUN"/*.log; do
			[[ -s $file ]] || continue
			echo "---- last lines of $(basename "$file")" >&2
			tail -n 15 "$file" >&2
		done
	fi
	if ((HOSTS_UP)); then
		bash ci/hosts.sh down "$PREFIX" >/dev/null || true
	fi
	[[ -z $RUN ]] || rm -rf "$RUN"
	[[ -z $SOCKDIR ]] || rm -rf "$SOCKDIR"
	if ((rc != 0)); then log "failed (exit status $rc)"; fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers --------------------------------------------------------------------------------

start() { # NAME NAMESPACE PROGRAM ARGS...: start in the background, log to $RUN/NAME.log
	local name=$1 ns=$2
	shift 2
	ip netns exec "$ns" "$@" >>"$RUN/$name.log" 2>&1 &
	PIDS[$name]=$!
}

ctl() { # SOCKET COMMAND: one line to a control socket, prints the reply
	echo "$2" | socat -t 5 - "UNIX-CONNECT:$1"
}

field() { # SOCKET JQ-FILTER: a field of the daemon's status ("" when it does not answer)
	ctl "$1" status 2>/dev/null | jq -r "$2" 2>/dev/null || true
}



wait_until() { # DESCRIPTION TIMEOUT_S PROCESS_NAME COMMAND...: poll COMMAND every 50 ms
	local what=$1 timeout=$2 name=$3 deadline
	shift 3
	deadline=$(calc "$(now) + $timeout")
	until "$@"; do
		[[ -z $name ]] || alive "$name" || die "$name exited while waiting for $what"
		if check "$(now) > $deadline"; then
			die "timed out after ${timeout} s waiting for $what"
		fi
		sleep 0.05
	done
}

mb() { calc "$1 / 1e6"; }
rate() { # BYTES SECONDS: MB/s, or "-"
	if [[ -n $2 ]] && check "$2 > 0"; then calc "$1 / $2 / 1e6"; else echo "-"; fi
}
fmt() { # DECIMALS NUMBER (or "-")
	if [[ $2 == - ]]; then echo -; else LC_ALL=C printf '%.*f' "$1" "$2"; fi
}
frac() { if [[ $1 == - ]]; then echo -; else calc "$1 / $LINK_MBS"; fi; }
verdict() { if check "$1"; then echo PASS; else echo MISS; fi; } # CONDITION

answers() { ctl "$1" status >/dev/null 2>&1; }
state_is() { [[ $(field "$1" "$2") == "$3" ]]; } # SOCKET JQ-FILTER VALUE

bench() { # RESULT-NAME SOCKET ftvm-blk-bench run options...: JSON to $RUN/RESULT-NAME.json
	local name=$1 socket=$2 errors
	shift 2
	ip netns exec "$HOST_A" "$BIN/ftvm-blk-bench" run --socket "$socket" --event-idx --json \
		"$@" >"$RUN/$name.json" 2>>"$RUN/bench.log" || die "ftvm-blk-bench $* failed (see above)"
	errors=$(jq -r .errors "$RUN/$name.json")
	[[ $errors == 0 ]] || log "warning: $name: $errors request(s) failed"
}

get() { jq -r "$2" "$RUN/$1.json"; } # RESULT-NAME JQ-FILTER

# Resync time as the primary logs it: from its last "resync started" line after line FROM of
# its log to the following "resync finished" line (millisecond timestamps). Empty if absent.
logged_resync_seconds() { # FROM-LINE
	local started finished
	started=$(tail -n "+$1" "$RUN/primary.log" | grep 'resync started' | tail -n 1 | cut -c2-25) || true
	finished=$(tail -n "+$1" "$RUN/primary.log" | grep 'resync finished' | tail -n 1 | cut -c2-25) || true
	[[ -n $started && -n $finished ]] || return 0
	calc "$(date -d "$finished" +%s.%N) - $(date -d "$started" +%s.%N)"
}

WORKLOADS=(qd1 qd32 seq)
declare -A WORKLOAD_NAME=([qd1]="4k randwrite QD1" [qd32]="4k randwrite QD32" [seq]="1M seq write QD4")
declare -A WORKLOAD_ARGS=(
	[qd1]="--rw randwrite --bs 4k --iodepth 1"
	[qd32]="--rw randwrite --bs 4k --iodepth 32"
	[seq]="--rw write --bs 1m --iodepth 4"
)

# CPU time (user + system, all threads) of a process we started, in seconds, from
# /proc/PID/stat (fields 14 and 15, in clock ticks); 0 when it is not running.
cpu_seconds() { # PROCESS_NAME
	local pid=${PIDS[$1]:-} stat
	[[ -n $pid ]] && stat=$(cat "/proc/$pid/stat" 2>/dev/null) || {
		echo 0
		return
	}
	# The command name (field 2) may hold spaces: split after its closing parenthesis.
	awk -v ticks="$(getconf CLK_TCK)" '{ print ($12 + $13) / ticks }' <<<"${stat##*) }"
}

# Runs the workloads against SOCKET; records each one's CPU seconds of the daemons named
# (the primary and the secondary, or the standalone one) in $RUN/PREFIX-W.cpu.
run_workloads() { # PREFIX SOCKET PROCESS_NAME...
	local w args prefix=$1 socket=$2 name after
	local -A before=()
	shift 2
	for w in "${WORKLOADS[@]}"; do
		log "$prefix: ${WORKLOAD_NAME[$w]} for ${SECONDS_PER_RUN} s"
		read -r -a args <<<"${WORKLOAD_ARGS[$w]}"
		for name in "$@"; do before[$name]=$(cpu_seconds "$name"); done
		bench "$prefix-$w" "$socket" "${args[@]}" --seconds "$SECONDS_PER_RUN"
		: >"$RUN/$prefix-$w.cpu"
		for name in "$@"; do
			after=$(cpu_seconds "$name")
			echo "$name $(calc "$after - ${before[$name]}")" >>"$RUN/$prefix-$w.cpu"
		done
	done
}

# CPU seconds per GB (10^9 bytes) written of daemon NAME in workload PREFIX-W.
cpu_per_gb() { # PREFIX-W NAME
	local seconds bytes
	seconds=$(awk -v name="$2" '$1 == name { print $2 }' "$RUN/$1.cpu")
	bytes=$(calc "$(get "$1" .requests) * $(get "$1" .block_size_bytes)")
	if [[ -n $seconds ]] && check "$bytes > 0"; then calc "$seconds / ($bytes / 1e9)"; else echo -; fi
}

# --- setup ----------------------------------------------------------------------------------

bash ci/install-deps.sh iperf3 jq socat iputils-ping qemu-system-common
for tool in iperf3 jq socat ping ip flock awk; do
	command -v "$tool" >/dev/null || die "$tool not found after ci/install-deps.sh"
done
QSD=$(command -v qemu-storage-daemon) ||
	die "qemu-storage-daemon not found (Debian package qemu-system-common; ci/install-deps.sh installs it)"
cargo build --release --locked -p vhost-blk-mirror -p vhost-user-blk-load
cargo build --release --locked -p replication-link --example cipher

mkdir -p "$WORK"
RUN=$(mktemp -d "$WORK/mirror-run.XXXXXX")
SOCKDIR=$(mktemp -d /tmp/ftvm-bench-mirror.XXXXXX)

for image in "$IMAGE_A" "$IMAGE_B"; do
	if [[ ! -f $image ]] || (($(stat -c %s "$image") != IMAGE_BYTES)); then
		log "filling a ${IMAGE_MIB} MiB image with random data: $image"
		head -c "$IMAGE_BYTES" /dev/urandom >"$image.tmp"
		mv "$image.tmp" "$image"
	fi
done
# The pre-shared key of the host pair; only root may read it.
(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$RUN/psk")
chmod 600 "$RUN/psk"

# A fresh set: leftovers of an interrupted run (a namespace with old sockets) never leak in.
bash ci/hosts.sh down "$PREFIX" >/dev/null
HOSTS_UP=1
bash ci/hosts.sh up "$PREFIX" >/dev/null

MACHINE="$(nproc) cores, $(free -g | awk '/^Mem:/ { print $2 }') GiB, kernel $(uname -r)"
log "$MACHINE; images ${IMAGE_MIB} MiB, ${SECONDS_PER_RUN} s per workload"
tree_version() { # the commit measured, and whether tracked files differ from it
	local commit
	commit=$(git rev-parse --short HEAD 2>/dev/null) || {
		echo "not a git checkout"
		return
	}
	if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
		echo "$commit + uncommitted changes"
	else
		echo "$commit"
	fi
}
# Other work on the machine (a test suite, a build) skews every figure: measure how busy the
# CPUs are for a second before starting, and say so in the output.
cpu_busy_percent() { # over one second, all CPUs, from /proc/stat
	local a b
	a=$(head -n 1 /proc/stat)
	sleep 1
	b=$(head -n 1 /proc/stat)
	awk -v a="$a" -v b="$b" 'BEGIN {
		n = split(a, x, " "); split(b, y, " ")
		for (i = 2; i <= 9 && i <= n; i++) total += y[i] - x[i] # guest time is in user already
		idle = (y[5] - x[5]) + (y[6] - x[6])
		printf "%.0f", (total > 0 ? 100 * (total - idle) / total : 0)
	}'
}
BUSY_START=$(cpu_busy_percent)
if ((BUSY_START > 10)); then
	log "warning: CPUs ${BUSY_START}% busy before the run: other work on this machine skews the figures"
fi

# --- 1. the link ----------------------------------------------------------------------------

log "link: iperf3 hostA -> hostB over alink1 (${LINK_SECONDS} s), ping RTT"
start iperf3 "$HOST_B" iperf3 --server --one-off --bind 10.77.1.2 --port 5201
listening() { ip netns exec "$HOST_B" ss -ltnH 'sport = :5201' | grep -q .; }
wait_until "iperf3 server" 10 iperf3 listening
ip netns exec "$HOST_A" iperf3 --client 10.77.1.2 --port 5201 --time "$LINK_SECONDS" --json \
	>"$RUN/iperf3.json" 2>>"$RUN/iperf3.log" || die "iperf3 client failed"
stop iperf3
LINK_MBS=$(jq -r '.end.sum_received.bits_per_second / 8 / 1e6' "$RUN/iperf3.json")
ip netns exec "$HOST_A" ping -n -q -c 20 -i 0.05 10.77.1.2 >"$RUN/ping.txt" || die "ping failed"
# "rtt min/avg/max/mdev = 0.031/0.045/0.093/0.013 ms"
RTT_US=$(awk -F'[/ ]+' '/^rtt|^round-trip/ { printf "%.0f", $8 * 1000 }' "$RUN/ping.txt")
[[ -n $LINK_MBS && -n $RTT_US ]] || die "could not read the link measurements"
# The CPU the kernel's TCP alone spends per GB on this link (iperf3 client + server, user +
# system): on a machine whose hosts share the cores, a ceiling for anything sent over it.
LINK_CPU_S_PER_GB=$(jq -r --argjson seconds "$LINK_SECONDS" '
	(.end.cpu_utilization_percent.host_total + .end.cpu_utilization_percent.remote_total) / 100
	* $seconds / (.end.sum_received.bytes / 1e9)' "$RUN/iperf3.json" 2>/dev/null) || LINK_CPU_S_PER_GB=-
is_number "$LINK_CPU_S_PER_GB" || LINK_CPU_S_PER_GB=-
log "link: $(fmt 1 "$(calc "$LINK_MBS * 8 / 1000")") Gbit/s, RTT ${RTT_US} µs"

# --- 2. local only --------------------------------------------------------------------------

LOCAL_SOCK=$SOCKDIR/local.sock
start local "$HOST_A" "$BIN/vhost-blk-mirror" --socket "$LOCAL_SOCK" --image "$IMAGE_A" \
	--control "$SOCKDIR/local.ctl"
wait_until "the standalone daemon" 10 local answers "$SOCKDIR/local.ctl"
run_workloads local "$LOCAL_SOCK" local
stop local

# --- 3. full sync ---------------------------------------------------------------------------

PRIMARY_SOCK=$SOCKDIR/primary.sock
PRIMARY_CTL=$SOCKDIR/primary.ctl
SECONDARY_CTL=$SOCKDIR/secondary.ctl
start_secondary() { # [EXTRA-ARGS...]
	start secondary "$HOST_B" "$BIN/vhost-blk-mirror" --role secondary \
		--listen "10.77.1.2:$PORT" --listen "10.77.2.2:$PORT" --psk-file "$RUN/psk" \
		--image "$IMAGE_B" --meta "$RUN/b.ftvm-meta" --serial bench-disk \
		--socket "$SOCKDIR/secondary.sock" --control "$SECONDARY_CTL" "$@"
	wait_until "the secondary" 10 secondary answers "$SECONDARY_CTL"
}
start_primary() { # [EXTRA-ARGS...]
	start primary "$HOST_A" "$BIN/vhost-blk-mirror" --role primary \
		--peer "10.77.1.2:$PORT" --peer "10.77.2.2:$PORT" --psk-file "$RUN/psk" \
		--image "$IMAGE_A" --meta "$RUN/a.ftvm-meta" --serial bench-disk \
		--socket "$PRIMARY_SOCK" --control "$PRIMARY_CTL" "$@"
}
up_to_date() { state_is "$PRIMARY_CTL" .replication.disk_state UpToDate; }

# New metadata on both sides (like deleting IMAGE.ftvm-meta): the secondary is Inconsistent.
rm -f "$RUN/a.ftvm-meta" "$RUN/b.ftvm-meta"
start_secondary
log "full sync of ${IMAGE_MIB} MiB to a fresh secondary"
LOG_FROM=1
T0=$(now)
start_primary
wait_until "the full sync" 600 primary up_to_date
FULL_WALL_S=$(calc "$(now) - $T0")
FULL_BYTES=$(field "$PRIMARY_CTL" .replication.resync.bytes_done)
FULL_LOG_S=$(logged_resync_seconds "$LOG_FROM")
[[ $(field "$SECONDARY_CTL" .replication.disk_state) == UpToDate ]] ||
	die "primary says UpToDate but the secondary does not"

# --- 4. mirrored ----------------------------------------------------------------------------

run_workloads mirrored "$PRIMARY_SOCK" primary secondary

# --- 5. delta resync ------------------------------------------------------------------------

log "delta: secondary killed, continue-degraded, ${DELTA_MIB} MiB written, secondary back"
stop secondary KILL
wait_until "the primary to hold (peer lost)" 15 primary state_is "$PRIMARY_CTL" .replication.mode Holding
ctl "$PRIMARY_CTL" continue-degraded >"$RUN/continue.txt"
wait_until "degraded mode" 10 primary state_is "$PRIMARY_CTL" .replication.mode Degraded
# Sequential 1 MiB writes over the first DELTA_MIB MiB, long enough to cover it. A failure
# here is reported in the tables (the other phases are still worth printing), then exit 1.
DELTA_ERROR=""
if ip netns exec "$HOST_A" "$BIN/ftvm-blk-bench" run --socket "$PRIMARY_SOCK" --event-idx --json \
	--rw write --bs 1m --iodepth 4 --size-limit "$((DELTA_MIB << 20))" --timeout-ms 5000 \
	--seconds "$(calc "$SECONDS_PER_RUN < 2 ? 2 : $SECONDS_PER_RUN")" \
	>"$RUN/degraded.json" 2>>"$RUN/bench.log"; then
	DELTA_OOS=$(field "$PRIMARY_CTL" .replication.out_of_sync_bytes)
	LOG_FROM=$(($(wc -l <"$RUN/primary.log") + 1))
	T0=$(now)
	start_secondary
	wait_until "the delta resync" 600 primary up_to_date
	DELTA_WALL_S=$(calc "$(now) - $T0")
	DELTA_BYTES=$(field "$PRIMARY_CTL" .replication.resync.bytes_done)
	DELTA_LOG_S=$(logged_resync_seconds "$LOG_FROM")
else
	DELTA_ERROR="writes in degraded mode never completed: $(tail -n 1 "$RUN/bench.log")"
	log "error: $DELTA_ERROR"
fi
stop primary
stop secondary

# --- 6. mirrored, encryption off -----------------------------------------------------------

log "mirrored with encryption off: both daemons restarted with --link-encryption off"
OFF_FROM=$(($(wc -l <"$RUN/primary.log") + 1))
start_secondary --link-encryption off
start_primary --link-encryption off
wait_until "UpToDate with encryption off" 600 primary up_to_date
tail -n "+$OFF_FROM" "$RUN/primary.log" | grep -q 'LINK ENCRYPTION IS OFF' ||
	die "the primary did not log that encryption is off"
run_workloads mirrored-off "$PRIMARY_SOCK"
stop primary
stop secondary

# --- 7. QEMU local --------------------------------------------------------------------------

QSD_SOCK=$SOCKDIR/qsd.sock
QSD_QMP=$SOCKDIR/qsd-a.qmp
log "QEMU: $("$QSD" --version | head -n 1)"
start qsd-a "$HOST_A" "$QSD" \
	--blockdev "driver=file,node-name=file0,filename=$IMAGE_A" \
	--blockdev driver=raw,node-name=disk0,file=file0 \
	--export "type=vhost-user-blk,id=vhost0,addr.type=unix,addr.path=$QSD_SOCK,node-name=disk0,writable=on,num-queues=1" \
	--chardev "socket,id=qmp0,path=$QSD_QMP,server=on,wait=off" --monitor chardev=qmp0
socket_exists() { [[ -S $1 ]]; }
wait_until "qemu-storage-daemon in hostA" 10 qsd-a socket_exists "$QSD_SOCK"
wait_until "qemu-storage-daemon's QMP socket" 10 qsd-a socket_exists "$QSD_QMP"
run_workloads qemu-local "$QSD_SOCK"

# --- 8. QEMU's synchronous mirror -----------------------------------------------------------

# One QMP connection held open for the phase: commands in through fd 7 (a FIFO), replies and
# events (with QEMU's timestamps) appended to qmp.out.
mkfifo "$RUN/qmp.in"
exec 7<>"$RUN/qmp.in"
socat - "UNIX-CONNECT:$QSD_QMP" <"$RUN/qmp.in" >>"$RUN/qmp.out" 2>>"$RUN/qmp.log" &
PIDS[qmp]=$!
qmp_reply() { # ID: the reply to the command with that id is in qmp.out
	[[ -s $RUN/qmp.out ]] && jq -e --arg id "$1" 'select(.id? == $id)' "$RUN/qmp.out" >/dev/null 2>&1
}
qmp() { # ID COMMAND ARGUMENTS-JSON: sends a command, waits for its reply, fails on an error
	local reply
	printf '{"execute": "%s", "arguments": %s, "id": "%s"}\n' "$2" "$3" "$1" >&7
	wait_until "QMP $2" 30 qsd-a qmp_reply "$1"
	reply=$(jq -c --arg id "$1" 'select(.id? == $id)' "$RUN/qmp.out")
	if jq -e 'has("error")' <<<"$reply" >/dev/null; then die "QMP $2 failed: $reply"; fi
}
log "QEMU mirror: qemu-storage-daemon in hostB exports image B over NBD on 10.77.1.2:$NBD_PORT"
start qsd-b "$HOST_B" "$QSD" \
	--blockdev "driver=file,node-name=file0,filename=$IMAGE_B" \
	--blockdev driver=raw,node-name=disk0,file=file0 \
	--nbd-server "addr.type=inet,addr.host=10.77.1.2,addr.port=$NBD_PORT" \
	--export type=nbd,id=nbd0,node-name=disk0,name=disk0,writable=on
nbd_listening() { ip netns exec "$HOST_B" ss -ltnH "sport = :$NBD_PORT" | grep -q .; }
wait_until "the NBD export in hostB" 10 qsd-b nbd_listening
qmp caps qmp_capabilities '{}'
qmp add blockdev-add "{\"driver\": \"nbd\", \"node-name\": \"remote0\", \"export\": \"disk0\",
	\"server\": {\"type\": \"inet\", \"host\": \"10.77.1.2\", \"port\": \"$NBD_PORT\"}}"
log "QEMU mirror: blockdev-mirror sync=full copy-mode=write-blocking, initial copy of ${IMAGE_MIB} MiB"
QEMU_T0=$(now)
qmp mirror blockdev-mirror '{"job-id": "mirror0", "device": "disk0", "target": "remote0",
	"sync": "full", "copy-mode": "write-blocking"}'
job_ready() { jq -e 'select(.event? == "BLOCK_JOB_READY")' "$RUN/qmp.out" >/dev/null 2>&1; }
job_failed() { jq -e 'select(.event? == "BLOCK_JOB_COMPLETED" or .event? == "BLOCK_JOB_CANCELLED")' "$RUN/qmp.out" >/dev/null 2>&1; }
ready_or_failed() { job_ready || job_failed; }
wait_until "QEMU's mirror job to be ready" 600 qsd-a ready_or_failed
job_ready || die "QEMU's mirror job ended before it was ready: $(jq -c 'select(.event?)' "$RUN/qmp.out" | tail -n 3)"
QEMU_FULL_S=$(jq -r 'select(.event? == "BLOCK_JOB_READY") | .timestamp.seconds + .timestamp.microseconds / 1e6' \
	"$RUN/qmp.out" | head -n 1)
QEMU_FULL_S=$(calc "$QEMU_FULL_S - $QEMU_T0")
QEMU_FULL_BYTES=$(jq -r 'select(.event? == "BLOCK_JOB_READY") | .data.len' "$RUN/qmp.out" | head -n 1)
run_workloads qemu-mirror "$QSD_SOCK"
# Still mirroring after the workloads (not failed, not cancelled).
job_failed && die "QEMU's mirror job ended during the workloads: $(jq -c 'select(.event?)' "$RUN/qmp.out" | tail -n 3)"
exec 7>&-
stop qmp
stop qsd-a
stop qsd-b

# --- 9. the cipher alone --------------------------------------------------------------------

log "the cipher alone: ${CIPHER_SECONDS} s per figure"
"$ROOT/target/release/examples/cipher" "$CIPHER_SECONDS" >"$RUN/cipher.md" || die "the cipher example failed"
BUSY_END=$(cpu_busy_percent)
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report ---------------------------------------------------------------------------------

ratio() { calc "$(get "$1" "$3") / $(get "$2" "$3")"; } # RESULT-A RESULT-B JQ-FILTER: A / B
perf() { # RESULT-NAME: "IOPS | MB/s | p50/p99 µs" cells
	printf '%.0f | %.1f | %.0f/%.0f' "$(get "$1" .iops)" "$(get "$1" .bandwidth_mb_s)" \
		"$(get "$1" .latency.p50_us)" "$(get "$1" .latency.p99_us)"
}

echo
echo "### Level 2 mirroring benchmark, $(date -u +%Y-%m-%d) ($MACHINE)"
echo
echo "Command: \`sudo ci/bench-mirror.sh --seconds $SECONDS_PER_RUN --image-mib $IMAGE_MIB" \
	"--delta-mib $DELTA_MIB\`; images ${IMAGE_MIB} MiB of random data (page cache), one queue," \
	"EVENT_IDX; mirrored = primary in hostA, secondary in hostB over alink1 + alink2;" \
	"QEMU's mirror over alink1 (NBD). CPUs ${BUSY_START}% busy before the run, ${BUSY_END}%" \
	"after; load average at the end $LOAD. Tree: $(tree_version)."
echo
echo "| link (alink1, hostA → hostB) | value |"
echo "|---|---:|"
echo "| TCP throughput (iperf3, 1 stream, ${LINK_SECONDS} s) | $(fmt 0 "$LINK_MBS") MB/s ($(fmt 1 "$(calc "$LINK_MBS * 8 / 1000")") Gbit/s) |"
echo "| RTT (ping -c 20 -i 0.05, avg) | ${RTT_US} µs |"
echo "| CPU per GB of TCP alone (iperf3 client + server, user + system) | $(fmt 2 "$LINK_CPU_S_PER_GB") s |"
echo
echo "ftvm (\`vhost-blk-mirror\`), encryption on (the default):"
echo
echo "| workload | local IOPS | local MB/s | local p50/p99 µs | mirrored IOPS | mirrored MB/s | mirrored p50/p99 µs | mirrored/local |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for w in "${WORKLOADS[@]}"; do
	printf '| %s | %s | %s | %.2f |\n' "${WORKLOAD_NAME[$w]}" "$(perf "local-$w")" \
		"$(perf "mirrored-$w")" "$(ratio "mirrored-$w" "local-$w" .iops)"
done
echo
echo "ftvm mirrored, encryption on vs off (\`--link-encryption off\` on both daemons: data in" \
	"clear, frames still authenticated by an AES-256-GCM tag over the body):"
echo
echo "| workload | on IOPS | on MB/s | on p50/p99 µs | off IOPS | off MB/s | off p50/p99 µs | off/on |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for w in "${WORKLOADS[@]}"; do
	printf '| %s | %s | %s | %.2f |\n' "${WORKLOAD_NAME[$w]}" "$(perf "mirrored-$w")" \
		"$(perf "mirrored-off-$w")" "$(ratio "mirrored-off-$w" "mirrored-$w" .iops)"
done
echo
echo "The anchor: QEMU's own synchronous mirror, the same load generator: qemu-storage-daemon" \
	"in hostA (vhost-user-blk export) with a blockdev-mirror job, copy-mode=write-blocking, to" \
	"an NBD export of qemu-storage-daemon in hostB; the job ready (initial copy done) before" \
	"measuring:"
echo
echo "| workload | QEMU local IOPS | QEMU local MB/s | QEMU local p50/p99 µs | QEMU mirror IOPS | QEMU mirror MB/s | QEMU mirror p50/p99 µs | QEMU mirror/local | ftvm/QEMU mirrored |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for w in "${WORKLOADS[@]}"; do
	printf '| %s | %s | %s | %.2f | %.2f |\n' "${WORKLOAD_NAME[$w]}" "$(perf "qemu-local-$w")" \
		"$(perf "qemu-mirror-$w")" "$(ratio "qemu-mirror-$w" "qemu-local-$w" .iops)" \
		"$(ratio "mirrored-$w" "qemu-mirror-$w" .iops)"
done
echo
echo "| workload | local daemon CPU s/GB | primary CPU s/GB | secondary CPU s/GB | mirrored total / local |"
echo "|---|---:|---:|---:|---:|"
for w in "${WORKLOADS[@]}"; do
	LOCAL_CPU=$(cpu_per_gb "local-$w" local)
	PRIMARY_CPU=$(cpu_per_gb "mirrored-$w" primary)
	SECONDARY_CPU=$(cpu_per_gb "mirrored-$w" secondary)
	CPU_RATIO=-
	if [[ $LOCAL_CPU != - && $PRIMARY_CPU != - && $SECONDARY_CPU != - ]] && check "$LOCAL_CPU > 0"; then
		CPU_RATIO=$(calc "($PRIMARY_CPU + $SECONDARY_CPU) / $LOCAL_CPU")
	fi
	echo "| ${WORKLOAD_NAME[$w]} | $(fmt 2 "$LOCAL_CPU") | $(fmt 2 "$PRIMARY_CPU") | $(fmt 2 "$SECONDARY_CPU") | $(fmt 2 "$CPU_RATIO") |"
done
FULL_RATE=$(rate "$FULL_BYTES" "$FULL_WALL_S")
FULL_LOG_RATE=$(rate "$FULL_BYTES" "$FULL_LOG_S")
QEMU_FULL_RATE=$(rate "$QEMU_FULL_BYTES" "$QEMU_FULL_S")
DELTA_RATE=-
DELTA_LOG_RATE=-
if [[ -z $DELTA_ERROR ]]; then
	DELTA_RATE=$(rate "$DELTA_BYTES" "$DELTA_WALL_S")
	DELTA_LOG_RATE=$(rate "$DELTA_BYTES" "$DELTA_LOG_S")
fi
echo
echo "| resync | MB | wall s (start → UpToDate) | MB/s wall | resync s (daemon log) | MB/s resync | resync / link |"
echo "|---|---:|---:|---:|---:|---:|---:|"
printf '| full (fresh secondary, primary started) | %.0f | %.2f | %s | %s | %s | %s |\n' \
	"$(mb "$FULL_BYTES")" "$FULL_WALL_S" "$(fmt 0 "$FULL_RATE")" "$(fmt 2 "${FULL_LOG_S:--}")" \
	"$(fmt 0 "$FULL_LOG_RATE")" "$(fmt 2 "$(frac "$FULL_LOG_RATE")")"
if [[ -z $DELTA_ERROR ]]; then
	printf '| delta (%.0f MB out of sync, secondary restarted) | %.0f | %.2f | %s | %s | %s | %s |\n' \
		"$(mb "$DELTA_OOS")" "$(mb "$DELTA_BYTES")" "$DELTA_WALL_S" "$(fmt 0 "$DELTA_RATE")" \
		"$(fmt 2 "${DELTA_LOG_S:--}")" "$(fmt 0 "$DELTA_LOG_RATE")" \
		"$(fmt 2 "$(frac "$DELTA_LOG_RATE")")"
else
	echo "| delta | failed: $DELTA_ERROR | | | | | |"
fi
printf '| QEMU mirror, initial copy (blockdev-mirror → BLOCK_JOB_READY) | %.0f | %.2f | %s | | | %s |\n' \
	"$(mb "$QEMU_FULL_BYTES")" "$QEMU_FULL_S" "$(fmt 0 "$QEMU_FULL_RATE")" \
	"$(fmt 2 "$(frac "$QEMU_FULL_RATE")")"
echo
echo "The cipher alone, one core (\`cargo run --release -p replication-link --example cipher" \
	"$CIPHER_SECONDS\`), in the same run:"
echo
cat "$RUN/cipher.md"

# Issue 12's goals on this rig, encryption on.
QD1_LIMIT=$(calc "$(get local-qd1 .latency.p50_us) + $RTT_US + 50")
QD1_P50=$(get mirrored-qd1 .latency.p50_us)
echo
echo "| goal (issue 12, encryption on) | target | measured | result |"
echo "|---|---:|---:|---|"
printf '| 4k randwrite QD1 p50 ≤ local p50 + RTT + 50 µs | ≤ %.0f µs | %.0f µs | %s |\n' \
	"$QD1_LIMIT" "$QD1_P50" "$(verdict "$QD1_P50 <= $QD1_LIMIT")"
for w in qd32 seq; do
	measured=$(ratio "mirrored-$w" "local-$w" .bandwidth_mb_s)
	printf '| %s mirrored/local ≥ 0.6 | ≥ 0.60 | %.2f | %s |\n' "${WORKLOAD_NAME[$w]}" \
		"$measured" "$(verdict "$measured >= 0.6")"
done
for kind in full delta; do
	if [[ $kind == full ]]; then measured=$FULL_LOG_RATE; else measured=$DELTA_LOG_RATE; fi
	if [[ $measured == - ]]; then
		if [[ $kind == full ]]; then measured=$FULL_RATE; else measured=$DELTA_RATE; fi
	fi
	target=$(calc "0.6 * $LINK_MBS")
	if [[ $measured == - ]]; then
		printf '| %s resync ≥ 0.6 of the link (iperf3) | ≥ %.0f MB/s | - | not measured |\n' "$kind" "$target"
	else
		printf '| %s resync ≥ 0.6 of the link (iperf3) | ≥ %.0f MB/s | %.0f MB/s | %s |\n' "$kind" \
			"$target" "$measured" "$(verdict "$measured >= $target")"
	fi
done
for w in "${WORKLOADS[@]}"; do
	ours=$(get "mirrored-$w" .iops)
	theirs=$(get "qemu-mirror-$w" .iops)
	printf '| %s: ahead of QEMU'"'"'s mirror (IOPS) | > %.0f | %.0f | %s |\n' "${WORKLOAD_NAME[$w]}" \
		"$theirs" "$ours" "$(verdict "$ours > $theirs")"
done
echo "| NIC path through the peer ≥ 0.8 of local | ≥ 0.80 | measured by ci/bench-net.sh, not here | - |"
echo
if [[ -n $DELTA_ERROR ]]; then
	log "the delta phase broke: $DELTA_ERROR"
	exit 1
fi
log "done"
