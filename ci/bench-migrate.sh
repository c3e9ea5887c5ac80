#!/usr/bin/env bash
# ci/bench-migrate.sh — `ftvm migrate` benchmark (issue 13): the guest's downtime, the time
# and the bytes of moving a running 256 MiB TCG guest between two hosts, idle and
# rewriting memory, against plain QEMU live migration of the same guest in the same run.
#
# Usage: sudo ci/bench-migrate.sh [--moves N] [--nic-link] [--log FILE]
#
#   --moves N    migrations per workload and part (default 10)
#   --nic-link   our NIC gets its link to the peer's NIC daemon (a redundant uplink,
#                `uplink` and `link_port`): the switchover relays the frames that reach the
#                source while the guest runs nowhere; without it they are lost, as with
#                plain QEMU (the TCP loop then waits for its retransmission timeout)
#   --log FILE   where the rig's stderr goes: every move's figures, the source engine's
#                last status and ftvmd's log lines of each move (`TIMELINE`, millisecond
#                timestamps) (default target/bench-migrate.log)
#
# Steps: installs missing Debian packages, builds the guest image (ci/build-guest.sh), the
# release binaries (`cargo build --release --workspace`) and the test, then runs the ignored
# test tests/tests/bench_migrate.rs (release build, so the rig runs the release daemons):
#   1. anchor: plain QEMU live migration (QEMU's defaults) of the guest between the hostA
#      and hostB namespaces, QEMU's own virtio-blk on one raw image both open, a plain TAP
#      NIC on each host's VM bridge, the destination QEMU started with `-incoming tcp:` on
#      its A-link address, the source quit after `completed`: N migrations back and forth
#      idle, then N with the guest rewriting memory at 50 MB/s (tests/guest/memwrite.c);
#   2. ours: the Cluster rig (witness, ftvmd on hostA and hostB, the VM protected at Level 2)
#      and N `ftvm migrate` moves back and forth per workload, each waited for until the
#      VM is Protected on the destination again;
# measuring per move the longest gap of a TCP echo loop from the client host, the gap
# between the guest's last console line on the source and its first on the destination
# (a line every 10 ms), the time and the bytes sent (and QEMU's own `downtime`), and
# prints markdown tables with the goals (downtime p99 ≤ 300 ms, ≤ 1.2× plain QEMU's) next
# to the figures. A benchmark, not a test: exit status 0 whether goals are met or not,
# non-zero only when something broke. The rig stops what it started by PID and removes its
# namespaces, TAPs and files. Needs root.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TOOL=bench-migrate
# shellcheck source=ci/lib/common.sh
source "$ROOT/ci/lib/common.sh"

MOVES=10
NIC_LINK=0
LOG_FILE=$ROOT/target/bench-migrate.log

while (($#)); do
	case "$1" in
	--moves)
		if (($# < 2)) || ! [[ $2 =~ ^[1-9][0-9]*$ ]]; then die "--moves needs a positive integer"; fi
		MOVES=$2
		shift 2
		;;
	--nic-link)
		NIC_LINK=1
		shift
		;;
	--log)
		(($# >= 2)) && [[ -n $2 ]] || die "--log needs a file name"
		LOG_FILE=$2
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
exec 8>/run/lock/ftvm-bench-migrate.lock
flock -n 8 || die "another ci/bench-migrate.sh is running"

RUN=$(mktemp -d /tmp/ftvm-bench-migrate.XXXXXX)
trap 'rm -rf "$RUN"' EXIT

bash ci/install-deps.sh
bash ci/build-guest.sh
cargo build --release --locked --workspace
cargo test --release --locked -p ftvm-tests --test bench_migrate --no-run

MACHINE="$(nproc) cores, $(free -g | awk '/^Mem:/ { print $2 }') GiB, kernel $(uname -r), $(qemu-system-x86_64 --version | head -n1)"
TREE=$(git rev-parse --short HEAD 2>/dev/null || echo "not a git checkout")
if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then TREE="$TREE + uncommitted changes"; fi
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "$MACHINE; load average $LOAD_START before the run"

TEST_COMMAND="cargo test --release --locked -p ftvm-tests --test bench_migrate -- --ignored --nocapture --test-threads 1"
log "$MOVES migrations per workload and part: $TEST_COMMAND (stderr to $LOG_FILE)"
mkdir -p "$(dirname "$LOG_FILE")"
STARTED=$(now)
FTVM_BENCH_MOVES=$MOVES FTVM_BENCH_NIC_LINK=$NIC_LINK $TEST_COMMAND >"$RUN/rig.txt" 2>"$LOG_FILE" || {
	tail -n 80 "$LOG_FILE" >&2
	sed -n 's/^\(test .* \.\.\. \)\{0,1\}BENCH \{0,1\}//p' "$RUN/rig.txt" >&2
	die "the migration benchmark test failed (its stderr: $LOG_FILE)"
}
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
MINUTES=$(calc "($(now) - $STARTED) / 60")

# --- report ---------------------------------------------------------------------------------

echo
echo "### Live migration, $(date -u +%Y-%m-%d) ($MACHINE)"
echo
OPTIONS="--moves $MOVES"
if ((NIC_LINK)); then OPTIONS="$OPTIONS --nic-link"; fi
echo "Command: \`sudo ci/bench-migrate.sh $OPTIONS\` (the rig:" \
	"\`$TEST_COMMAND\`, $(printf '%.0f' "$MINUTES") min). Tree: $TREE. Load average" \
	"$LOAD_START before, $LOAD_END after."
echo
sed -n 's/^\(test .* \.\.\. \)\{0,1\}BENCH \{0,1\}//p' "$RUN/rig.txt"
echo
log "done; every move's ftvmd log lines (TIMELINE) are in $LOG_FILE"
