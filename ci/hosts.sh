#!/usr/bin/env bash
# Usage: ci/hosts.sh up|down|status [PREFIX]      (needs root; PREFIX defaults to "ftvm-")
#
# Test hosts as network namespaces:
#   ${PREFIX}hostA    lan0 10.77.0.1/24  alink1 10.77.1.1/24  alink2 10.77.2.1/24
#   ${PREFIX}hostB    lan0 10.77.0.2/24  alink1 10.77.1.2/24  alink2 10.77.2.2/24
#   ${PREFIX}witness  lan0 10.77.0.3/24
#   ${PREFIX}client   lan0 10.77.0.4/24
#   ${PREFIX}lan      bridge br0 (the LAN); the lan0 veths end here as
#                     hostA, hostB, witness, client (ports of br0)
# alink1 and alink2 are two separate direct veth pairs between hostA and hostB.
# hostA and hostB also have a bridge vmbr0 for their VMs' NICs (TAP devices);
# its port uplink is a veth whose other end is port hostA-up / hostB-up of br0:
# the host's uplink to the LAN for its VMs.
# Every veth is created directly inside its namespaces; nothing lives in the
# root namespace. `lo` is up everywhere.
#
#   up      create the set; a no-op if it is already complete, otherwise any
#           half-built set with this prefix is removed first
#   down    remove the set's namespaces (and with them their links); never
#           fails when already gone; warns about processes still inside
#   status  show the set; exit 0 when complete, 3 when absent or partial
#
# Cut a link: ip -n ${PREFIX}hostA link set alink1 down (or the lan0 / the
# bridge port in ${PREFIX}lan); cut a VM uplink: ... link set uplink down.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

die() {
	echo "hosts: error: $*" >&2
	exit 1
}

case "${1:-}" in
-h | --help | help)
	usage
	exit 0
	;;
up | down | status) CMD=$1 ;;
"")
	usage >&2
	exit 2
	;;
*)
	usage >&2
	die "unknown command '$1' (expected up, down or status)"
	;;
esac
(($# <= 2)) || die "too many arguments"
P=${2-ftvm-}
[[ $P =~ ^[A-Za-z0-9._-]*$ ]] || die "prefix '$P' may only contain letters, digits, '.', '_' and '-'"
((${#P} <= 32)) || die "prefix '$P' is too long"

((EUID == 0)) || die "must run as root (network namespaces need CAP_SYS_ADMIN/CAP_NET_ADMIN)"
command -v ip >/dev/null 2>&1 || die "'ip' not found; install iproute2 (ci/install-deps.sh)"

HOSTS=(hostA hostB witness client)
declare -A LAN_ADDR=([hostA]=10.77.0.1 [hostB]=10.77.0.2 [witness]=10.77.0.3 [client]=10.77.0.4)
LAN=${P}lan
NAMESPACES=("${P}hostA" "${P}hostB" "${P}witness" "${P}client" "$LAN")

ns_exists() { [[ -e /run/netns/$1 ]]; }

has_addr() { # NS DEV ADDR: DEV in NS has ADDR/24
	if ! ip -n "$1" -4 -o addr show dev "$2" 2>/dev/null | grep " $3/24 " >/dev/null; then
		echo "  $1: $2 lacks $3/24"
		return 1
	fi
}

# Prints the problems found, indented; returns 0 when the set is complete.
check() {
	local ok=0 h ns
	for ns in "${NAMESPACES[@]}"; do
		if ! ns_exists "$ns"; then
			echo "  missing namespace $ns"
			ok=1
		fi
	done
	((ok == 0)) || return 1
	for h in "${HOSTS[@]}"; do
		has_addr "$P$h" lan0 "${LAN_ADDR[$h]}" || ok=1
		ip -n "$LAN" -o link show dev "$h" 2>/dev/null | grep 'master br0' >/dev/null ||
			{
				echo "  $LAN: $h not a port of br0"
				ok=1
			}
	done
	for h in hostA hostB; do
		ip -n "$P$h" -o link show dev uplink 2>/dev/null | grep 'master vmbr0' >/dev/null ||
			{
				echo "  $P$h: uplink not a port of vmbr0"
				ok=1
			}
		ip -n "$LAN" -o link show dev "$h-up" 2>/dev/null | grep 'master br0' >/dev/null ||
			{
				echo "  $LAN: $h-up not a port of br0"
				ok=1
			}
	done
	has_addr "${P}hostA" alink1 10.77.1.1 || ok=1
	has_addr "${P}hostB" alink1 10.77.1.2 || ok=1
	has_addr "${P}hostA" alink2 10.77.2.1 || ok=1
	has_addr "${P}hostB" alink2 10.77.2.2 || ok=1
	return $ok
}

down() {
	local ns pids
	for ns in "${NAMESPACES[@]}"; do
		ns_exists "$ns" || continue
		pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ') || true
		if [[ -n $pids ]]; then
			echo "hosts: warning: processes still in $ns: $pids(its links live on until they exit)" >&2
		fi
		if ! ip netns delete "$ns" 2>/dev/null && ns_exists "$ns"; then
			echo "hosts: warning: could not delete $ns" >&2
		fi
	done
	return 0
}

veth() { # NS1 DEV1 ADDR1 NS2 DEV2 ADDR2 (ADDR may be empty)
	ip link add "$2" netns "$1" type veth peer name "$5" netns "$4"
	[[ -z $3 ]] || ip -n "$1" addr add "$3/24" dev "$2"
	[[ -z $6 ]] || ip -n "$4" addr add "$6/24" dev "$5"
	ip -n "$1" link set "$2" up
	ip -n "$4" link set "$5" up
}

up() {
	local ns h
	for ns in "${NAMESPACES[@]}"; do
		ip netns add "$ns"
		ip -n "$ns" link set lo up
	done
	ip -n "$LAN" link add br0 type bridge stp_state 0 forward_delay 0
	ip -n "$LAN" link set br0 up
	for h in "${HOSTS[@]}"; do
		veth "$P$h" lan0 "${LAN_ADDR[$h]}" "$LAN" "$h" ""
		ip -n "$LAN" link set "$h" master br0
	done
	for h in hostA hostB; do
		ip -n "$P$h" link add vmbr0 type bridge stp_state 0 forward_delay 0
		ip -n "$P$h" link set vmbr0 up
		veth "$P$h" uplink "" "$LAN" "$h-up" ""
		ip -n "$P$h" link set uplink master vmbr0
		ip -n "$LAN" link set "$h-up" master br0
	done
	veth "${P}hostA" alink1 10.77.1.1 "${P}hostB" alink1 10.77.1.2
	veth "${P}hostA" alink2 10.77.2.1 "${P}hostB" alink2 10.77.2.2
}

status() {
	local ns
	for ns in "${NAMESPACES[@]}"; do
		if ns_exists "$ns"; then
			echo "== $ns"
			ip -n "$ns" -br addr show | sed 's/^/   /'
		else
			echo "== $ns (absent)"
		fi
	done
}

# Serialise concurrent runs on the same prefix.
if command -v flock >/dev/null 2>&1; then
	mkdir -p /run/lock
	exec 9>"/run/lock/ftvm-hosts-${P:-noprefix}.lock"
	flock 9
fi

case "$CMD" in
up)
	if problems=$(check); then
		echo "hosts: ${P}* already up"
		exit 0
	fi
	any=0
	for ns in "${NAMESPACES[@]}"; do ns_exists "$ns" && any=1; done
	if ((any)); then
		echo "hosts: ${P}* is incomplete, rebuilding:" >&2
		echo "$problems" >&2
		down
	fi
	if ! up; then
		echo "hosts: error: setting up ${P}* failed; cleaning up" >&2
		down
		exit 1
	fi
	problems=$(check) || die "set ${P}* incomplete after up: $problems"
	echo "hosts: ${P}* up"
	;;
down)
	down
	;;
status)
	status
	if problems=$(check); then
		echo "hosts: ${P}* complete"
	else
		echo "hosts: ${P}* incomplete or down:"
		echo "$problems"
		exit 3
	fi
	;;
esac
