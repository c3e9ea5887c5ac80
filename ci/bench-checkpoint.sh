#!/usr/bin/env bash
# ci/bench-checkpoint.sh — Level 3 benchmark (issue 11): checkpoints of a 256 MiB TCG guest
# in three workloads, the delta codec's speed against memcpy, the guest's slowdown against
# the same guest without an engine, and the failover time, all in one run.
#
# Usage: sudo ci/bench-checkpoint.sh [--interval-ms N]
#
#   --interval-ms N   the engine's checkpoint interval (default 50)
#
# Steps: installs missing Debian packages, builds the guest image (ci/build-guest.sh) and the
# release binaries (`cargo build --release --workspace` and the delta_bench example), then
#   1. delta_bench (checkpoint/examples/delta_bench.rs): the page encoder's GB/s on one core
#      for seven kinds of pages, with a plain copy of the same pages measured in the same
#      run as the anchor;
#   2. the ignored test tests/tests/bench_level3.rs on the Level 3 rig (hostA/hostB
#      namespaces, NIC daemons, both engines, the guest's RAM in /dev/shm with the tracking
#      library preloaded): a busy loop in the guest before the primary engine starts
#      (Level 2), then the engine's status over 10 s of each workload (idle, the guest
#      rewriting pages at 50 MB/s and at 200 MB/s: tests/guest/memwrite.c), the busy loop
#      at Level 3, the loss of hostA and the restore on hostB (kill → the guest's first
#      console line on hostB), and the busy loop again in the restored guest, which runs
#      without an engine (Level 2);
# and prints markdown tables with the goals next to the figures. A benchmark, not a test:
# exit status 0 whether goals are met or not, non-zero only when something broke. The rig
# stops what it started by PID and removes its namespaces and /dev/shm files. Needs root.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TOOL=bench-checkpoint
# shellcheck source=ci/lib/common.sh
source "$ROOT/ci/lib/common.sh"

INTERVAL_MS=50
ENCODE_GOAL_GBS=3

while (($#)); do
	case "$1" in
	--interval-ms)
		if (($# < 2)) || ! [[ $2 =~ ^[1-9][0-9]*$ ]]; then die "--interval-ms needs a positive integer"; fi
		INTERVAL_MS=$2
		shift 2
		;;
	-h | --help)
		usage
		exit 0
		;;
	*) die "unknown argument $1 (try --help)" ;;
	esac
done
((EUID == 0)) || die "must run as root (network namespaces); try: sudo $0"

mkdir -p /run/lock
exec 8>/run/lock/ftvm-bench-checkpoint.lock
flock -n 8 || die "another ci/bench-checkpoint.sh is running"

RUN=$(mktemp -d /tmp/ftvm-bench-checkpoint.XXXXXX)
trap 'rm -rf "$RUN"' EXIT

bash ci/install-deps.sh
bash ci/build-guest.sh
cargo build --release --locked --workspace
cargo build --release --locked -p checkpoint --example delta_bench

MACHINE="$(nproc) cores, $(free -g | awk '/^Mem:/ { print $2 }') GiB, kernel $(uname -r)"
TREE=$(git rev-parse --short HEAD 2>/dev/null || echo "not a git checkout")
if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then TREE="$TREE + uncommitted changes"; fi
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "$MACHINE; load average $LOAD_START before the run"

# --- 1. the delta codec ---------------------------------------------------------------------

log "delta_bench (one core, 8192 pages per kind, median of 9 rounds)"
target/release/examples/delta_bench >"$RUN/delta.txt"

# --- 2. the Level 3 rig ---------------------------------------------------------------------

TEST_COMMAND="cargo test --release --locked -p ftvm-tests --test bench_level3 -- --ignored --nocapture --test-threads 1"
log "Level 3 rig, interval ${INTERVAL_MS} ms: $TEST_COMMAND"
FTVM_BENCH_INTERVAL_MS=$INTERVAL_MS $TEST_COMMAND >"$RUN/rig.txt" 2>"$RUN/rig.err" || {
	tail -n 60 "$RUN/rig.err" >&2
	die "the Level 3 benchmark test failed"
}
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report ---------------------------------------------------------------------------------

echo
echo "### Level 3 checkpoints, $(date -u +%Y-%m-%d) ($MACHINE)"
echo
echo "Command: \`sudo ci/bench-checkpoint.sh --interval-ms $INTERVAL_MS\` (the rig:" \
	"\`$TEST_COMMAND\`). Tree: $TREE. Load average $LOAD_START before, $LOAD_END after."
echo
sed -n 's/^\(test .* \.\.\. \)\{0,1\}BENCH \{0,1\}//p' "$RUN/rig.txt"
echo
echo "Delta codec, one core (\`target/release/examples/delta_bench\`; copy = memcpy of the" \
	"same pages, same run):"
echo
echo "| pages | copy GB/s | encode GB/s | encode/copy | sender path GB/s | path/copy | encode ≥ ${ENCODE_GOAL_GBS} GB/s |"
echo "|---|---:|---:|---:|---:|---:|---|"
# Rows: a name of several words, then copy, enc, enc/copy, path, path/copy, dec, dec/copy, wire%.
awk -v goal="$ENCODE_GOAL_GBS" 'NR > 2 && NF >= 9 {
	n = NF
	name = $1; for (i = 2; i <= n - 8; i++) name = name " " $i
	printf "| %s | %s | %s | %s | %s | %s | %s |\n", name, $(n-7), $(n-6), $(n-5), $(n-4), $(n-3),
		($(n-6) >= goal ? "met" : "MISSED")
}' "$RUN/delta.txt"
echo
log "done"
