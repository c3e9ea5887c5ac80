#!/usr/bin/env bash
# ci/bench-mirror.sh — Level 2 mirroring benchmark: local-only vs mirrored over an A-link,
# with the link itself and the resync rates measured in the same run.
#
# Usage: sudo ci/bench-mirror.sh [--seconds S] [--image-mib N] [--delta-mib N]
#
#   --seconds S      run time of each workload (default 5)
#   --image-mib N    size of the disk images in MiB (default 1024)
#   --delta-mib N    data written while degraded, resynced as a delta (default 256)
#
# Steps: installs missing Debian packages (iperf3, jq, socat, ...), builds the release
# binaries, (re)creates test hosts bench-hostA/bench-hostB (ci/hosts.sh), and two raw images
# under target/bench/ filled with random data (cached between runs). Then it measures:
#   1. the link: iperf3 TCP throughput hostA -> hostB over alink1 (3 s) and ping RTT;
#   2. local-only: a standalone vhost-blk-mirror in hostA;
#   3. full sync: a fresh secondary in hostB, time from primary start to UpToDate;
#   4. mirrored: the same primary (peers 10.77.1.2 and 10.77.2.2), secondary UpToDate;
#   5. delta resync: secondary killed, primary told continue-degraded, --delta-mib written,
#      secondary restarted, time to UpToDate.
# Workloads (ftvm-blk-bench in hostA, EVENT_IDX on): 4k randwrite QD1, 4k randwrite QD32,
# 1 MiB sequential write QD4. Prints markdown tables and PASS/MISS against the goals taken from
# DRBD's published figures. A benchmark, not a test: exit status 0 whether goals are met or
# not, non-zero only when something broke. Everything it starts is stopped by PID, the hosts
# are removed and temporary files deleted, also on failure or Ctrl-C. Needs root.
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
LINK_SECONDS=3


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

run_workloads() { # PREFIX SOCKET
	local w args
	for w in "${WORKLOADS[@]}"; do
		log "$1: ${WORKLOAD_NAME[$w]} for ${SECONDS_PER_RUN} s"
		read -r -a args <<<"${WORKLOAD_ARGS[$w]}"
		bench "$1-$w" "$2" "${args[@]}" --seconds "$SECONDS_PER_RUN"
	done
}

# --- setup ----------------------------------------------------------------------------------

bash ci/install-deps.sh iperf3 jq socat iputils-ping
for tool in iperf3 jq socat ping ip flock awk; do
	command -v "$tool" >/dev/null || die "$tool not found after ci/install-deps.sh"
done
cargo build --release --locked -p vhost-blk-mirror -p vhost-user-blk-load

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
log "link: $(fmt 1 "$(calc "$LINK_MBS * 8 / 1000")") Gbit/s, RTT ${RTT_US} µs"

# --- 2. local only --------------------------------------------------------------------------

LOCAL_SOCK=$SOCKDIR/local.sock
start local "$HOST_A" "$BIN/vhost-blk-mirror" --socket "$LOCAL_SOCK" --image "$IMAGE_A" \
	--control "$SOCKDIR/local.ctl"
wait_until "the standalone daemon" 10 local answers "$SOCKDIR/local.ctl"
run_workloads local "$LOCAL_SOCK"
stop local

# --- 3. full sync ---------------------------------------------------------------------------

PRIMARY_SOCK=$SOCKDIR/primary.sock
PRIMARY_CTL=$SOCKDIR/primary.ctl
SECONDARY_CTL=$SOCKDIR/secondary.ctl
start_secondary() {
	start secondary "$HOST_B" "$BIN/vhost-blk-mirror" --role secondary \
		--listen "10.77.1.2:$PORT" --listen "10.77.2.2:$PORT" --psk-file "$RUN/psk" \
		--image "$IMAGE_B" --meta "$RUN/b.ftvm-meta" --serial bench-disk \
		--socket "$SOCKDIR/secondary.sock" --control "$SECONDARY_CTL"
	wait_until "the secondary" 10 secondary answers "$SECONDARY_CTL"
}
up_to_date() { state_is "$PRIMARY_CTL" .replication.disk_state UpToDate; }

# New metadata on both sides (like deleting IMAGE.ftvm-meta): the secondary is Inconsistent.
rm -f "$RUN/a.ftvm-meta" "$RUN/b.ftvm-meta"
start_secondary
log "full sync of ${IMAGE_MIB} MiB to a fresh secondary"
LOG_FROM=1
T0=$(now)
start primary "$HOST_A" "$BIN/vhost-blk-mirror" --role primary \
	--peer "10.77.1.2:$PORT" --peer "10.77.2.2:$PORT" --psk-file "$RUN/psk" \
	--image "$IMAGE_A" --meta "$RUN/a.ftvm-meta" --serial bench-disk \
	--socket "$PRIMARY_SOCK" --control "$PRIMARY_CTL"
wait_until "the full sync" 600 primary up_to_date
FULL_WALL_S=$(calc "$(now) - $T0")
FULL_BYTES=$(field "$PRIMARY_CTL" .replication.resync.bytes_done)
FULL_LOG_S=$(logged_resync_seconds "$LOG_FROM")
[[ $(field "$SECONDARY_CTL" .replication.disk_state) == UpToDate ]] ||
	die "primary says UpToDate but the secondary does not"

# --- 4. mirrored ----------------------------------------------------------------------------

run_workloads mirrored "$PRIMARY_SOCK"

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

# --- report ---------------------------------------------------------------------------------

echo
echo "### Level 2 mirroring benchmark, $(date -u +%Y-%m-%d) ($MACHINE)"
echo
echo "Command: \`sudo ci/bench-mirror.sh --seconds $SECONDS_PER_RUN --image-mib $IMAGE_MIB" \
	"--delta-mib $DELTA_MIB\`; images ${IMAGE_MIB} MiB of random data (page cache), one queue," \
	"EVENT_IDX; mirrored = primary in hostA, secondary in hostB over alink1 + alink2." \
	"CPUs ${BUSY_START}% busy before the run. Tree: $(tree_version)."
echo
echo "| link (alink1, hostA → hostB) | value |"
echo "|---|---:|"
echo "| TCP throughput (iperf3, 1 stream, ${LINK_SECONDS} s) | $(fmt 0 "$LINK_MBS") MB/s ($(fmt 1 "$(calc "$LINK_MBS * 8 / 1000")") Gbit/s) |"
echo "| RTT (ping -c 20 -i 0.05, avg) | ${RTT_US} µs |"
echo
echo "| workload | local IOPS | local MB/s | local p50/p99 µs | mirrored IOPS | mirrored MB/s | mirrored p50/p99 µs | ratio mirrored/local |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for w in "${WORKLOADS[@]}"; do
	printf '| %s | %.0f | %.1f | %.0f/%.0f | %.0f | %.1f | %.0f/%.0f | %.2f |\n' \
		"${WORKLOAD_NAME[$w]}" \
		"$(get "local-$w" .iops)" "$(get "local-$w" .bandwidth_mb_s)" \
		"$(get "local-$w" .latency.p50_us)" "$(get "local-$w" .latency.p99_us)" \
		"$(get "mirrored-$w" .iops)" "$(get "mirrored-$w" .bandwidth_mb_s)" \
		"$(get "mirrored-$w" .latency.p50_us)" "$(get "mirrored-$w" .latency.p99_us)" \
		"$(calc "$(get "mirrored-$w" .iops) / $(get "local-$w" .iops)")"
done
FULL_RATE=$(rate "$FULL_BYTES" "$FULL_WALL_S")
FULL_LOG_RATE=$(rate "$FULL_BYTES" "$FULL_LOG_S")
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

# Goals (DRBD's published figures): QD1 latency, streaming throughput, resync rate.
QD1_LIMIT=$(calc "$(get local-qd1 .latency.p50_us) + $RTT_US + 50")
QD1_P50=$(get mirrored-qd1 .latency.p50_us)
echo
echo "| goal | target | measured | result |"
echo "|---|---:|---:|---|"
printf '| 4k randwrite QD1 p50 ≤ local p50 + RTT + 50 µs | ≤ %.0f µs | %.0f µs | %s |\n' \
	"$QD1_LIMIT" "$QD1_P50" "$(verdict "$QD1_P50 <= $QD1_LIMIT")"
for w in qd32 seq; do
	local_mbs=$(get "local-$w" .bandwidth_mb_s)
	target=$(calc "0.97 * ($local_mbs < $LINK_MBS ? $local_mbs : $LINK_MBS)")
	measured=$(get "mirrored-$w" .bandwidth_mb_s)
	printf '| %s MB/s ≥ 97%% of min(local, link) | ≥ %.1f | %.1f | %s |\n' "${WORKLOAD_NAME[$w]}" \
		"$target" "$measured" "$(verdict "$measured >= $target")"
done
for kind in full delta; do
	if [[ $kind == full ]]; then measured=$FULL_LOG_RATE; else measured=$DELTA_LOG_RATE; fi
	if [[ $measured == - ]]; then
		if [[ $kind == full ]]; then measured=$FULL_RATE; else measured=$DELTA_RATE; fi
	fi
	target=$(calc "0.8 * $LINK_MBS")
	if [[ $measured == - ]]; then
		printf '| %s resync ≥ 80%% of link | ≥ %.0f MB/s | - | not measured |\n' "$kind" "$target"
	else
		printf '| %s resync ≥ 80%% of link | ≥ %.0f MB/s | %.0f MB/s | %s |\n' "$kind" "$target" \
			"$measured" "$(verdict "$measured >= $target")"
	fi
done
echo
if [[ -n $DELTA_ERROR ]]; then
	log "the delta phase broke: $DELTA_ERROR"
	exit 1
fi
log "done"
