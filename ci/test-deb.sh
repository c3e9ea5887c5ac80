#!/usr/bin/env bash
# Usage: ci/test-deb.sh [--help]
#
# Builds the Debian package (ci/build-deb.sh --profile dev) and installs it with
# `apt-get install ./ftvm_*.deb` into a clean Debian 12 root (minbase, made by mmdebstrap),
# then, inside that root: `ftvmd --check --config /etc/ftvm/ftvmd.toml`, `ftvm --help`,
# `ftvm keygen`, each daemon's --help from /usr/lib/ftvm, the units, man pages,
# completions and the alert agents (and FTVM-MIB) in place, `ftvmd --check` of an [[alert]]
# per agent; then `apt-get purge ftvm` and checks that nothing of it is left.
# Needs root, mmdebstrap (installed if missing) and Debian's mirror.
#
# Cached under target/deb-test/: the clean root as base.tar (about 170 MB, made once: about
# 30 s here) and the downloaded .debs (qemu and friends). A cached run takes about 25 s.
# The root itself is new each run and removed afterwards.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOL=test-deb
# shellcheck source=ci/lib/common.sh
source "$ROOT/ci/lib/common.sh"
[[ ${1:-} == -h || ${1:-} == --help ]] && usage && exit 0
cd "$ROOT"
MIRROR=${FTVM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=$ROOT/target/deb-test
mkdir -p "$cache/archives/partial"

deb=$(bash ci/build-deb.sh --profile dev --out "$cache/package" | tail -1)
if [[ ! -f $cache/base.tar ]]; then
	# mmdebstrap makes the same minbase root as debootstrap, with apt's parallel downloads:
	# 32 s here against debootstrap's 6 minutes.
	command -v mmdebstrap >/dev/null || bash ci/install-deps.sh mmdebstrap
	echo "test-deb: making the clean root once (mmdebstrap --variant=minbase bookworm)"
	mmdebstrap --variant=minbase --quiet bookworm "$cache/base.new.tar" "$MIRROR" \
		>"$cache/bootstrap.log" 2>&1 || {
		tail -20 "$cache/bootstrap.log" >&2
		die "mmdebstrap failed (log: $cache/bootstrap.log)"
	}
	mv "$cache/base.new.tar" "$cache/base.tar"
fi

root=$(mktemp -d "$cache/root.XXXXXX")
cleanup() {
	for mount in var/cache/apt/archives dev proc; do
		umount "$root/$mount" 2>/dev/null || true
	done
	rm -rf --one-file-system "$root"
}
trap cleanup EXIT
tar -C "$root" -xf "$cache/base.tar"
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
mount --bind "$cache/archives" "$root/var/cache/apt/archives"
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp "$deb" "$root/tmp/"
in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

in_root apt-get update -qq
in_root apt-get install -y -qq --no-install-recommends "/tmp/$(basename "$deb")" >"$cache/install.log" 2>&1 || {
	tail -30 "$cache/install.log" >&2
	die "apt-get install ./$(basename "$deb")"
}
echo "test-deb: installed $(basename "$deb") into a clean root (mmdebstrap minbase)"

check=$(in_root ftvmd --check --config /etc/ftvm/ftvmd.toml) || die "ftvmd --check: $check"
[[ $check == *"valid (1 VM(s), peer hostB)"* ]] || die "ftvmd --check said: $check"
echo "test-deb: ftvmd --check: $check"
in_root ftvm --help | grep -q "keygen" || die "ftvm --help does not name keygen"
in_root ftvm keygen --out /root/keys --host hostA --host hostB | grep -q "/etc/ftvm/pair.psk" ||
	die "ftvm keygen"
[[ $(stat -c %a "$root/root/keys/pair.psk") == 600 ]] || die "the pair key is not mode 0600"
in_root ftvm-witness --help | grep -q -- "--psk-dir" || die "ftvm-witness --help"
for daemon in vhost-blk-mirror vhost-net-ft ftvm-checkpoint; do
	in_root "/usr/lib/ftvm/$daemon" --help >/dev/null || die "/usr/lib/ftvm/$daemon --help"
done
in_root qemu-system-x86_64 --version >/dev/null || die "qemu-system-x86 was not pulled in"
for file in /usr/lib/ftvm/libftvm_ram_track.so /lib/systemd/system/ftvmd.service \
	/lib/systemd/system/ftvm-witness.service /etc/default/ftvm-witness \
	/usr/share/man/man8/ftvm.8.gz /usr/share/man/man8/ftvmd.8.gz \
	/usr/share/man/man8/ftvm-witness.8.gz /usr/share/man/man8/ftvm-keygen.8.gz \
	/usr/share/bash-completion/completions/ftvm /usr/share/zsh/vendor-completions/_ftvmd \
	/usr/share/fish/vendor_completions.d/ftvm-witness.fish /usr/lib/ftvm/alerts/ftvm-alert-webhook \
	/usr/lib/ftvm/alerts/ftvm-alert-snmp /usr/lib/ftvm/alerts/ftvm-alert-mail \
	/usr/share/snmp/mibs/FTVM-MIB.txt; do
	[[ -e $root$file ]] || die "$file is not installed"
done
[[ $(stat -c %a "$root/etc/ftvm/ftvmd.toml") == 600 ]] || die "/etc/ftvm/ftvmd.toml is not mode 0600"
# The shipped alert agents run in the clean root: the webhook agent with curl (pulled in by
# Depends) refuses a recipient that is no URL, and ftvmd --check takes an [[alert]] of each.
agent_says=$(in_root env FTVM_ALERT_RECIPIENT=nowhere /usr/lib/ftvm/alerts/ftvm-alert-webhook 2>&1) &&
	die "the webhook agent accepted a recipient that is no URL"
[[ $agent_says == *"must be an http:// or https:// URL"* ]] || die "ftvm-alert-webhook said: $agent_says"
for agent in webhook snmp mail; do
	printf '\n[[alert]]\npath = "/usr/lib/ftvm/alerts/ftvm-alert-%s"\nrecipient = "x"\n' "$agent" \
		>>"$root/etc/ftvm/ftvmd.toml"
done
check=$(in_root ftvmd --check --config /etc/ftvm/ftvmd.toml) || die "ftvmd --check with alerts: $check"
[[ $check == *"3 alert agent(s)"* ]] || die "ftvmd --check with alerts said: $check"
echo "test-deb: ftvm --help, keygen, the daemons' --help, units, man pages, completions, alert agents: ok"

in_root apt-get purge -y -qq ftvm >>"$cache/install.log" 2>&1 || die "apt-get purge ftvm"
left=$(in_root sh -c 'ls -d /usr/bin/ftvm* /usr/lib/ftvm /lib/systemd/system/ftvm* /etc/ftvm/ftvmd.toml /etc/default/ftvm-witness /usr/share/man/man8/ftvm* /usr/share/snmp/mibs/FTVM-MIB.txt 2>/dev/null' || true)
[[ -z $left ]] || die "left after apt-get purge: $left"
echo "test-deb: apt-get purge ftvm removes every file of the package"
