# ci/lib/common.sh — helpers shared by the ci/ benchmark scripts; sourced, never run.
# shellcheck shell=bash
#
# The sourcing script sets TOOL (its name in messages) and declares `declare -A PIDS=()`
# (the processes it started, by name) before it calls stop or alive.

# usage: the script's header comment (from line 2 to `set -euo`), without the '#'.
usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() {
	echo "$TOOL: error: $*" >&2
	exit 1
}
log() { echo "$TOOL: $*" >&2; }
calc() { awk "BEGIN { printf \"%.6f\", ($1) }"; } # calc 'EXPRESSION': awk's arithmetic
check() { awk "BEGIN { exit !($1) }"; }             # check 'CONDITION': its truth as status
now() { date +%s.%N; }

# alive NAME: the process we started as NAME still runs.
alive() { [[ -n ${PIDS[$1]:-} ]] && kill -0 "${PIDS[$1]}" 2>/dev/null; }

# stop NAME [SIGNAL]: stops a process we started, by PID (SIGTERM, then SIGKILL after 5 s),
# and reaps it if it is our child.
stop() {
	local name=$1 signal=${2:-TERM} pid i
	pid=${PIDS[$name]:-}
	[[ -n $pid ]] || return 0
	unset "PIDS[$name]"
	# stderr off while the child dies: bash would print "Killed" when it reaps it.
	{
		kill "-$signal" "$pid" || true
		for ((i = 0; i < 100; i++)); do
			kill -0 "$pid" || break
			sleep 0.05
		done
		if kill -0 "$pid"; then
			log "$name (pid $pid) did not stop on SIG$signal; killing it (SIGKILL)"
			kill -KILL "$pid" || true
			for ((i = 0; i < 40; i++)); do
				kill -0 "$pid" || break
				sleep 0.05
			done
		fi
		wait "$pid" || true
	} 2>/dev/null
}
