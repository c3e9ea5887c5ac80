#!/usr/bin/env bash
# Usage: ci/verify-units.sh [--help] [FTVM_BINARY]
#
# Checks the systemd units in packaging/systemd/ without booting systemd (PID 1 need not be
# systemd): `systemd-analyze verify` and `systemd-analyze security --offline=yes` in a
# throwaway root that holds the host's own systemd units, the three units, the witness's
# credentials drop-in as `ftvm keygen` (FTVM_BINARY, default target/debug/ftvm) makes it,
# and stand-ins for /usr/bin/ftvmd, /usr/bin/ftvm-witness and /usr/bin/ftvm-web (verify
# wants ExecStart executable). Fails on any message from verify and when a unit's exposure
# level rises above its bound (ftvmd 3.5, it must run QEMU as root; ftvm-witness and
# ftvm-web 1.5). Needs
# systemd-analyze (Debian: systemd). Leaves nothing behind.
set -euo pipefail


ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOL=verify-units
# shellcheck source=ci/lib/common.sh
source "$ROOT/ci/lib/common.sh"
[[ ${1:-} == -h || ${1:-} == --help ]] && usage && exit 0
FTVM=${1:-$ROOT/target/debug/ftvm}
command -v systemd-analyze >/dev/null || {
	echo "verify-units: systemd-analyze missing (apt-get install systemd)" >&2
	exit 1
}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

mkdir -p "$scratch/usr/lib/systemd" "$scratch/usr/bin" "$scratch/etc/ftvm" \
	"$scratch/etc/systemd/system/ftvm-witness.service.d"
cp -a /lib/systemd/system "$scratch/usr/lib/systemd/"
cp "$ROOT"/packaging/systemd/*.service "$scratch/etc/systemd/system/"
for binary in ftvmd ftvm-witness ftvm-web; do
	printf '#!/bin/sh\n' >"$scratch/usr/bin/$binary"
	chmod 755 "$scratch/usr/bin/$binary"
done
touch "$scratch/etc/ftvm/ftvmd.toml" "$scratch/etc/ftvm/ftvm-web.toml" "$scratch/etc/ftvm/api.psk"
"$FTVM" keygen --out "$scratch/keys" --host hostA --host hostB >/dev/null
cp "$scratch/keys/ftvm-witness-keys.conf" "$scratch/etc/systemd/system/ftvm-witness.service.d/keys.conf"

status=0
messages=$(cd "$scratch" && systemd-analyze --root="$scratch" verify --man=no \
	ftvmd.service ftvm-witness.service ftvm-web.service 2>&1) || status=$?
if [[ -n $messages || $status -ne 0 ]]; then
	echo "verify-units: systemd-analyze verify (exit $status):" >&2
	echo "$messages" >&2
	exit 1
fi
echo "verify-units: systemd-analyze verify: no messages"

for unit_bound in ftvmd.service:3.5 ftvm-witness.service:1.5 ftvm-web.service:1.5; do
	unit=${unit_bound%%:*}
	bound=${unit_bound##*:}
	level=$(systemd-analyze security --offline=yes --root="$scratch" "$unit" 2>&1 |
		sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
	[[ -n $level ]] || {
		echo "verify-units: no exposure level for $unit" >&2
		exit 1
	}
	echo "verify-units: $unit exposure $level (bound $bound)"
	if awk -v level="$level" -v bound="$bound" 'BEGIN { exit !(level > bound) }'; then
		echo "verify-units: $unit exposure $level is above $bound" >&2
		exit 1
	fi
done
