#!/usr/bin/env bash
# ci/torture.sh — the fault matrix (issue 10): its disk-level and cluster rows, many seeded runs each.
#
# Usage: sudo ci/torture.sh --runs N [--rows a,b,...] [--results FILE] [--no-doc]
#
#   --runs N        runs of each row (the acceptance wants 20)
#   --rows LIST     comma-separated rows (default: all of them; `--rows list` prints them)
#   --results FILE  where the runs append their JSON lines (default: a new file under
#                   target/torture/; an existing file is added to, e.g. to resume)
#   --no-doc        print the table only; do not rewrite docs/RELIABILITY.md
#
# Each run is one test of tests/tests/torture.rs (a guest writes numbered, flushed records
# at random blocks of a mirrored disk, one fault hits at a moment drawn from the run's seed,
# the test plays the coordinator and repairs), of tests/tests/torture_cluster.rs (the rows
# that need the coordinator: ftvmd-kill, witness-lost, host-kill, on two hosts with ftvmd
# and a witness, the same workload and checks) or of tests/tests/torture_fio.rs (every row
# again as <row>-fio, the guest running fio --verify=crc32c instead of the records, the
# host checking every acknowledged chunk with fio --verify_only), run on its own with a fresh seed, which it
# prints; FTVM_TORTURE_SEED=S replays one run (with --runs 1 and one row). A run that fails
# is recorded and the next one goes on; its log is kept under target/torture/. At the end
# the table (runs, acknowledged writes lost, split brains, guest-visible errors, median and
# max time back to Protected) is printed and written to docs/RELIABILITY.md with the exact
# command. Exit status: 0 when every run held every promise, 1 otherwise, 2 on bad usage.
# Needs root (network namespaces, FUSE, QEMU); runs one guest at a time.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() {
	echo "torture: error: $*" >&2
	exit 2
}

COMMAND_LINE="ci/torture.sh $*"
RUNS=
ROWS=
RESULTS=
DOC=docs/RELIABILITY.md
while (($#)); do
	case $1 in
	--runs)
		RUNS=${2-}
		shift 2 || die "--runs needs a number"
		;;
	--rows)
		ROWS=${2-}
		shift 2 || die "--rows needs a list"
		;;
	--results)
		RESULTS=${2-}
		shift 2 || die "--results needs a file"
		;;
	--no-doc)
		DOC=
		shift
		;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		usage >&2
		die "unknown argument '$1'"
		;;
	esac
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || [[ $ROWS == list ]] || die "--runs N is required (N >= 1)"
((EUID == 0)) || die "must run as root (network namespaces, FUSE and QEMU); try: sudo $0"
command -v jq >/dev/null || die "jq is missing (ci/install-deps.sh installs it)"

echo "== build" >&2
cargo build --locked -p vhost-blk-mirror -p fault-fs -p coordinator --bins >&2
test_binary() {
	cargo test --locked -p ftvm-tests --test "$1" --no-run --message-format=json 2>/dev/null |
		jq -r --arg name "$1" 'select(.reason == "compiler-artifact" and .target.name == $name and .executable != null) | .executable' |
		tail -n 1
}
BIN=$(test_binary torture)
[[ -x $BIN ]] || die "cannot find the torture test binary"
CLUSTER_BIN=$(test_binary torture_cluster)
[[ -x $CLUSTER_BIN ]] || die "cannot find the torture_cluster test binary"
FIO_BIN=$(test_binary torture_fio)
[[ -x $FIO_BIN ]] || die "cannot find the torture_fio test binary"
[[ -f target/guest/initramfs.gz ]] || bash ci/build-guest.sh >&2

# The rows are the tests of the three binaries (row kill-syncing = test kill_syncing).
declare -A BINARY=()
ALL=()
for binary in "$BIN" "$CLUSTER_BIN" "$FIO_BIN"; do
	while read -r row; do
		BINARY[$row]=$binary
		ALL+=("$row")
	done < <("$binary" --list --format terse 2>/dev/null | sed -n 's/: test$//p' | grep -vx report | tr _ -)
done
if [[ $ROWS == list ]]; then
	printf '%s\n' "${ALL[@]}"
	exit 0
fi
if [[ -z $ROWS ]]; then
	SELECTED=("${ALL[@]}")
else
	IFS=, read -r -a SELECTED <<<"$ROWS"
	for row in "${SELECTED[@]}"; do
		printf '%s\n' "${ALL[@]}" | grep -qx -- "$row" || die "unknown row '$row' (rows: ${ALL[*]})"
	done
fi
if [[ -n ${FTVM_TORTURE_SEED-} ]] && { ((RUNS > 1)) || ((${#SELECTED[@]} > 1)); }; then
	die "FTVM_TORTURE_SEED replays one run: use it with --runs 1 and one row"
fi

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOGS=target/torture/$STAMP
mkdir -p "$LOGS"
RESULTS=${RESULTS:-$LOGS/results.jsonl}
touch "$RESULTS"
RESULTS=$(realpath "$RESULTS")
echo "== ${#SELECTED[@]} row(s) x $RUNS run(s); results in $RESULTS, logs in $LOGS" >&2

started=$SECONDS
failed=0
for ((run = 1; run <= RUNS; run++)); do
	for row in "${SELECTED[@]}"; do
		seed=${FTVM_TORTURE_SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}
		log=$LOGS/$row-$run.log
		before=$(wc -l <"$RESULTS")
		t0=$SECONDS
		status=0
		FTVM_TORTURE_SEED=$seed FTVM_TORTURE_RESULTS=$RESULTS timeout 900 \
			"${BINARY[$row]}" --exact "${row//-/_}" --test-threads 1 --nocapture >"$log" 2>&1 || status=$?
		if (($(wc -l <"$RESULTS") == before)); then
			# The test process died without recording its run (timeout, crash).
			jq -nc --arg row "$row" --argjson seed "$seed" --arg error "the test process exited with $status and recorded nothing" \
				'{row: $row, seed: $seed, ok: false, lost_blocks: 0, split_brain_samples: 0, guest_errors: 0, back_to_protected_ms: null, error: $error}' >>"$RESULTS"
		fi
		verdict=ok
		if ((status != 0)); then
			verdict="FAILED (log: $log)"
			failed=$((failed + 1))
		fi
		printf 'run %d/%d %-22s seed %-20s %3d s  %s\n' "$run" "$RUNS" "$row" "$seed" $((SECONDS - t0)) "$verdict"
	done
done
total=$((SECONDS - started))
echo "== $((RUNS * ${#SELECTED[@]})) run(s) in ${total} s, $failed failed" >&2

export FTVM_TORTURE_RESULTS=$RESULTS
export FTVM_TORTURE_COMMAND="sudo $COMMAND_LINE"
export FTVM_TORTURE_WHEN="$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg) at the end"
export FTVM_TORTURE_TOTAL="$((RUNS * ${#SELECTED[@]})) runs in ${total} s"
if [[ -n $DOC ]]; then
	export FTVM_TORTURE_REPORT=$ROOT/$DOC
fi
"$BIN" --exact report --ignored --nocapture --test-threads 1 2>/dev/null | grep -v -e '^running ' -e '^test ' -e '^test result' -e '^$' -e '^ok$' || true
((failed == 0))
