#!/usr/bin/env bash
# Usage: ci/build-deb.sh [--help] [--profile release|dev] [--out DIR]
#
# Builds the Debian package ftvm_VERSION_ARCH.deb with dpkg-deb (no cargo-deb needed) into
# DIR (default target/debian) and prints its path on the last line:
#   /usr/bin                   ftvm, ftvmd, ftvm-witness, ftvm-web
#   /usr/lib/ftvm              vhost-blk-mirror, vhost-net-ft, ftvm-checkpoint,
#                              libftvm_ram_track.so (ftvmd's bin_dir)
#   /usr/lib/ftvm/alerts       the alert agents ftvm-alert-webhook (curl), ftvm-alert-snmp
#                              (snmptrap, package snmp) and ftvm-alert-mail (sendmail)
#   /usr/share/snmp/mibs       FTVM-MIB.txt, the SNMP agent's traps
#   /lib/systemd/system        ftvmd.service, ftvm-witness.service, ftvm-web.service (not
#                              enabled)
#   /etc/ftvm/ftvmd.toml       the example of coordinator/README.md (conffile)
#   /etc/ftvm/ftvm-web.toml    the web console's example, packaging/debian (conffile)
#   /etc/default/ftvm-witness  the witness's listen addresses (conffile)
#   /etc/libvirt/hooks/qemu.d/50-ftvm  the libvirt hook (packaging/libvirt-hook; conffile)
#   /usr/share/man/man8, bash/zsh/fish completions (made by ftvm-gen-docs), docs
# Binaries are stripped of debug information. --profile dev packages the debug build (what
# ci/test-deb.sh uses, to reuse the test suite's build); the default is release.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOL=build-deb
# shellcheck source=ci/lib/common.sh
source "$ROOT/ci/lib/common.sh"
cd "$ROOT"
profile=release
out=target/debian
while (($#)); do
	case "$1" in
	-h | --help) usage && exit 0 ;;
	--profile) profile=$2 && shift 2 ;;
	--out) out=$2 && shift 2 ;;
	*) echo "build-deb: unknown argument $1 (see --help)" >&2 && exit 2 ;;
	esac
done
case "$profile" in
release) build_dir=target/release ;;
dev) build_dir=target/debug ;;
*) echo "build-deb: --profile is release or dev" >&2 && exit 2 ;;
esac

if [[ $profile == dev ]]; then
	# The test suite's own build (same features, so nothing is compiled again).
	cargo build --locked --workspace --all-targets
else
	cargo build --locked --release -p coordinator -p vhost-blk-mirror -p vhost-net-ft \
		-p checkpoint -p ftvm-ram-track -p ftvm-web --bins --lib
fi

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d "${TMPDIR:-/tmp}/ftvm-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT

install -d "$stage/DEBIAN" "$stage/usr/bin" "$stage/usr/lib/ftvm" "$stage/lib/systemd/system" \
	"$stage/etc/ftvm" "$stage/etc/default" "$stage/usr/share/doc/ftvm"
for binary in ftvm ftvmd ftvm-witness ftvm-web; do
	install -m 0755 "$build_dir/$binary" "$stage/usr/bin/"
done
for binary in vhost-blk-mirror vhost-net-ft ftvm-checkpoint; do
	install -m 0755 "$build_dir/$binary" "$stage/usr/lib/ftvm/"
done
install -m 0644 "$build_dir/libftvm_ram_track.so" "$stage/usr/lib/ftvm/"
strip --strip-unneeded "$stage"/usr/bin/* "$stage"/usr/lib/ftvm/*
# The alert agents are scripts (installed after strip); docs/OPERATIONS.md, "Alerts".
install -d "$stage/usr/lib/ftvm/alerts" "$stage/usr/share/snmp/mibs"
install -m 0755 packaging/alerts/ftvm-alert-webhook packaging/alerts/ftvm-alert-snmp \
	packaging/alerts/ftvm-alert-mail "$stage/usr/lib/ftvm/alerts/"
install -m 0644 packaging/alerts/FTVM-MIB.txt "$stage/usr/share/snmp/mibs/"

install -m 0644 packaging/systemd/ftvmd.service packaging/systemd/ftvm-witness.service \
	packaging/systemd/ftvm-web.service "$stage/lib/systemd/system/"
# The example configuration is the one coordinator/README.md explains, key by key.
sed -n '/^```toml$/,/^```$/p' coordinator/README.md | sed -n '/^\[host\]$/,/^```$/p' |
	sed '$d' >"$stage/etc/ftvm/ftvmd.toml.body"
{
	echo '# /etc/ftvm/ftvmd.toml: an example for hostA of a pair (hostB swaps names and addresses).'
	echo '# Edit it, make the keys with `ftvm keygen`, check it with'
	echo '# `ftvmd --check --config /etc/ftvm/ftvmd.toml`, then `systemctl enable --now ftvmd`.'
	echo '# Every key: /usr/share/doc/ftvm/README.coordinator.md, "Configuration".'
	cat "$stage/etc/ftvm/ftvmd.toml.body"
} >"$stage/etc/ftvm/ftvmd.toml"
rm "$stage/etc/ftvm/ftvmd.toml.body"
chmod 0600 "$stage/etc/ftvm/ftvmd.toml"
install -m 0600 packaging/debian/ftvm-web.toml "$stage/etc/ftvm/ftvm-web.toml"
chmod 0700 "$stage/etc/ftvm"
install -m 0644 packaging/debian/ftvm-witness.default "$stage/etc/default/ftvm-witness"
install -d "$stage/etc/libvirt/hooks/qemu.d"
install -m 0755 packaging/libvirt-hook "$stage/etc/libvirt/hooks/qemu.d/50-ftvm"

"$build_dir/ftvm-gen-docs" "$stage/usr/share" >/dev/null
gzip -9n "$stage"/usr/share/man/man8/*.8
install -m 0644 README.md "$stage/usr/share/doc/ftvm/README.md"
install -m 0644 coordinator/README.md "$stage/usr/share/doc/ftvm/README.coordinator.md"
install -m 0644 docs/OPERATIONS.md "$stage/usr/share/doc/ftvm/OPERATIONS.md"
cat >"$stage/usr/share/doc/ftvm/copyright" <<'COPYRIGHT'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: ftvm

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
COPYRIGHT

printf '/etc/ftvm/ftvmd.toml\n/etc/ftvm/ftvm-web.toml\n/etc/default/ftvm-witness\n/etc/libvirt/hooks/qemu.d/50-ftvm\n' \
	>"$stage/DEBIAN/conffiles"
cat >"$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
# The units are installed, not enabled: a host needs its keys and configuration first.
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload || true
fi
POSTINST
cp "$stage/DEBIAN/postinst" "$stage/DEBIAN/postrm"
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/postrm"
installed_kib=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<CONTROL
Package: ftvm
Version: $version
Architecture: $arch
Maintainer: ftvm developers <ftvm@localhost>
Section: admin
Priority: optional
Installed-Size: $installed_kib
Depends: libc6 (>= 2.36), libgcc-s1, qemu-system-x86, curl
Recommends: bridge-utils | iproute2
Suggests: snmp, default-mta | mail-transport-agent, libvirt-daemon-system, libvirt-clients
Description: fault tolerance for QEMU/KVM virtual machines
 ftvm keeps a VM's disks and network (and, at Level 3, its memory) on two hosts,
 so that the VM survives the loss of a disk, an uplink or a whole host without
 changes in the guest: ftvmd on each host, ftvm-witness on a third, ftvm and
 the web console ftvm-web for the operator, and the vhost-user daemons they run
 beside stock QEMU.
CONTROL

mkdir -p "$out"
deb="$out/ftvm_${version}_${arch}.deb"
# xz for a release (9 MB, 36 s here), fast gzip for the test's debug build (18 MB, 1 s).
compression=(-Zxz -z6)
[[ $profile == dev ]] && compression=(-Zgzip -z1)
dpkg-deb --root-owner-group "${compression[@]}" --build "$stage" "$deb" >/dev/null
echo "$deb"
