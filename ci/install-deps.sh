#!/usr/bin/env bash
# Usage: ci/install-deps.sh [--help] [EXTRA_PACKAGE...]
#
# Installs the Debian packages the ftvm test rig needs, but only those that are
# not installed yet. Runs `apt-get update` only when something must be
# installed. Quiet when everything is already present. Needs root.
#
# Packages: qemu-system-x86 (qemu-system-x86_64; qemu-storage-daemon comes with
# qemu-system-common), busybox-static, fio, iproute2, nftables, procps,
# e2fsprogs (mkfs.ext4, debugfs, dumpe2fs, e2fsck: the application-consistent
# snapshot test), xfsprogs (mkfs.xfs, for the snapshot test), util-linux, kmod, iputils-ping, mount (losetup), socat (demo; the port
# held in the ftvm check test), gcc and
# libc6-dev (static guest tools, tests/guest/), systemd (systemd-analyze, for
# ci/verify-units.sh), systemd-container (systemd-nspawn: ci/test-deb.sh boots the
# installed package under systemd), curl, snmp and snmptrapd (the alert agents and the trap
# receiver of tests/tests/ftvmd_alerts.rs), chromium and chromium-driver (the headless browser
# of the web console's test, tests/tests/web_console.rs), libvirt-daemon,
# libvirt-daemon-driver-qemu and libvirt-clients (libvirtd and virsh, for the libvirt test;
# each test host runs its own libvirtd, so no libvirt-daemon-system), plus any
# EXTRA_PACKAGE given on the command line. Also makes the system user libvirt-qemu, which
# libvirtd needs even when qemu.conf runs QEMU as root.
set -euo pipefail

case "${1:-}" in
-h | --help)
	sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
	exit 0
	;;
esac

PACKAGES=(
	qemu-system-x86
	qemu-system-common
	busybox-static
	fio
	iproute2
	nftables
	procps
	e2fsprogs
	xfsprogs
	util-linux
	kmod
	iputils-ping
	mount
	socat
	gcc
	libc6-dev
	systemd
	curl
	snmp
	snmptrapd
	systemd-container
	chromium
	chromium-driver
	libvirt-daemon
	libvirt-daemon-driver-qemu
	libvirt-clients
	"$@"
)

die() {
	echo "install-deps: error: $*" >&2
	exit 1
}

installed() {
	local status
	status=$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) || return 1
	[[ $status == installed ]]
}

# libvirtd resolves its built-in QEMU user before it reads qemu.conf.
if ! id libvirt-qemu >/dev/null 2>&1; then
	((EUID == 0)) || die "user libvirt-qemu is missing and not root; run as root"
	useradd --system --no-create-home --shell /usr/sbin/nologin libvirt-qemu ||
		die "cannot create the user libvirt-qemu"
fi

missing=()
for p in "${PACKAGES[@]}"; do
	installed "$p" || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
	exit 0
fi

if ((EUID != 0)); then
	die "missing packages (${missing[*]}) and not root; run as root or install them with apt-get"
fi

echo "install-deps: installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || die "apt-get update failed"
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
	die "apt-get install ${missing[*]} failed"

for p in "${missing[@]}"; do
	installed "$p" || die "package $p still not installed after apt-get install"
done
echo "install-deps: done"
