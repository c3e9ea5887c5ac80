#!/usr/bin/env bash
# Usage: ci/build-guest.sh [--check] [--force] [--help]
#
# Builds the ftvm test guest into $ROOT/target/guest/:
#   vmlinuz        Debian cloud kernel (from linux-image-cloud-amd64, never
#                  installed: fetched with `apt-get download`, unpacked with
#                  `dpkg-deb -x`)
#   initramfs.gz   busybox-static + virtio modules + /init (gzipped newc cpio)
#   fio.cpio.gz    /usr/bin/fio with its shared libraries; append it to
#                  initramfs.gz (plain concatenation) when a test needs fio
#   qga.cpio.gz    qemu-ga (Debian's qemu-guest-agent, fetched with
#                  `apt-get download`, never installed on the host) with its
#                  shared libraries; append it when a test needs the guest agent
#   stamp          the inputs the outputs were built from
#
# Outputs are rebuilt only when the stamp differs (hash of this script, kernel
# and qemu-guest-agent packages and versions, busybox and fio versions) or with
# --force. Builds go into a temp dir and are moved into place under a lock.
#
# Guest /init: mounts proc, sys, devtmpfs, /tmp; loads the virtio modules;
# brings lo up; when qemu-ga is in the initramfs (qga.cpio.gz) and the VM has a
# virtio-serial port named org.qemu.guest_agent.0, starts qemu-ga on it in the
# background (it does not delay the boot); prints `FTVM-BOOTED`. Then, if /test.sh exists (append a third
# cpio archive holding it), runs `sh /test.sh` with output to the console and
# prints `FTVM-EXIT <rc>`; else with `ftvm.shell=1` on the kernel command line
# starts a shell on the console. Finally powers off (run QEMU with -no-reboot).
#
# --check  after building, boot the guest under QEMU (TCG) with a test.sh that
#          runs fio, and verify FTVM-BOOTED, fio output and FTVM-EXIT 0.
#
# Environment: FTVM_KERNEL_PKG overrides the kernel package name.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

CHECK=0
FORCE=0
for arg in "$@"; do
	case "$arg" in
	--check) CHECK=1 ;;
	--force) FORCE=1 ;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		usage >&2
		echo "build-guest: error: unknown argument: $arg" >&2
		exit 2
		;;
	esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/target/guest
DEBDIR=$OUT/deb
SCRIPT=$ROOT/ci/build-guest.sh

# Modules, in load order.
MODULES=(failover net_failover virtio_ring virtio virtio_pci_modern_dev
	virtio_pci_legacy_dev virtio_pci virtio_blk virtio_net virtio_console)

log() { echo "build-guest: $*" >&2; }
die() {
	echo "build-guest: error: $*" >&2
	exit 1
}

need() {
	local c
	for c in "$@"; do
		command -v "$c" >/dev/null 2>&1 ||
			die "command '$c' not found; run ci/install-deps.sh first"
	done
}
need apt-get apt-cache dpkg-deb dpkg-query gzip sha256sum flock ldd
BUSYBOX=/bin/busybox
[[ -x $BUSYBOX ]] || die "$BUSYBOX not found; install busybox-static (ci/install-deps.sh)"
# (grep reads all input: with pipefail, `grep -q` can fail the pipe via SIGPIPE)
$BUSYBOX --list | grep -x cttyhack >/dev/null || die "$BUSYBOX has no cttyhack applet; is busybox-static installed?"
[[ -x /usr/bin/fio ]] || die "/usr/bin/fio not found; install fio (ci/install-deps.sh)"

pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo unknown; }

# --- kernel package ---------------------------------------------------------

kernel_pkg_name() {
	if [[ -n ${FTVM_KERNEL_PKG:-} ]]; then
		echo "$FTVM_KERNEL_PKG"
		return
	fi
	local name
	name=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
		awk '/Depends: linux-image-[0-9]/ && !n++ { print $2 }') || true
	if [[ -z $name ]]; then
		# No package lists yet (fresh machine): update once and retry.
		if ((EUID == 0)); then
			log "apt-cache knows no linux-image-cloud-amd64; running apt-get update"
			apt-get update -qq >&2 || true
			name=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
				awk '/Depends: linux-image-[0-9]/ && !n++ { print $2 }') || true
		fi
	fi
	if [[ -z $name ]]; then
		# Offline fallback: a package downloaded earlier.
		local deb
		deb=$(find "$DEBDIR" -maxdepth 1 -name 'linux-image-*-cloud-amd64_*.deb' 2>/dev/null | sort | tail -n1)
		[[ -n $deb ]] && name=$(dpkg-deb -f "$deb" Package)
	fi
	[[ -n $name ]] || die "cannot resolve the kernel package from 'apt-cache depends linux-image-cloud-amd64' (apt lists missing? run apt-get update as root)"
	echo "$name"
}

# Prints the path of the cached .deb for package $1, downloading it if needed.
cached_deb() {
	local pkg=$1 deb
	mkdir -p "$DEBDIR"
	deb=$(find "$DEBDIR" -maxdepth 1 -name "${pkg}_*.deb" | sort | tail -n1)
	if [[ -z $deb ]]; then
		log "downloading $pkg"
		local tmp
		tmp=$(mktemp -d "$DEBDIR/.dl.XXXXXX")
		# Run as root without the _apt sandbox (it cannot write into target/).
		(cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2) ||
			{
				rm -rf "$tmp"
				die "apt-get download $pkg failed"
			}
		mv "$tmp"/*.deb "$DEBDIR"/
		rm -rf "$tmp"
		deb=$(find "$DEBDIR" -maxdepth 1 -name "${pkg}_*.deb" | sort | tail -n1)
		[[ -n $deb ]] || die "apt-get download $pkg produced no .deb in $DEBDIR"
	fi
	echo "$deb"
}

# --- build steps ------------------------------------------------------------

write_init() {
	cat >"$1" <<'EOF'
#!/bin/sh
# ftvm guest init (generated by ci/build-guest.sh)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1

KVER=$(uname -r)
for m in @MODULES@; do
	ko=/lib/modules/$KVER/$m.ko
	if [ ! -f "$ko" ]; then
		echo "ftvm-init: module $m missing" >&2
		continue
	fi
	out=$(insmod "$ko" 2>&1) || case "$out" in
	*exists* | *"already loaded"*) ;;
	*) echo "ftvm-init: insmod $m: $out" >&2 ;;
	esac
done
ip link set lo up
# The guest agent, when qemu-ga is here (qga.cpio.gz) and the VM has its
# channel: in the background, so that waiting for the port (virtio-serial adds
# ports after the driver loads) never delays the boot.
if [ -x /usr/sbin/qemu-ga ] && [ -d /sys/bus/virtio/drivers/virtio_console ]; then
	(
		for _ in $(seq 50); do
			for port in /sys/class/virtio-ports/*; do
				[ "$(cat "$port/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] || continue
				mkdir -p /run /var/run
				echo "ftvm-init: qemu-ga on /dev/${port##*/}"
				exec qemu-ga -m virtio-serial -p "/dev/${port##*/}" -t /run
			done
			sleep 0.1
		done
	) </dev/null >/dev/console 2>&1 &
fi
# Leading newline: firmware leaves terminal escape codes on the serial line
# without a newline, and FTVM-BOOTED must be alone on its line.
printf '\nFTVM-BOOTED\n'

if [ -f /test.sh ]; then
	cd /tmp || true
	sh /test.sh </dev/null >/dev/console 2>&1
	rc=$?
	cd / || true
	printf '\nFTVM-EXIT %d\n' "$rc"
else
	case " $(cat /proc/cmdline) " in
	*" ftvm.shell=1 "*) setsid cttyhack sh ;;
	esac
fi
sync
poweroff -f
EOF
	sed -i "s/@MODULES@/${MODULES[*]}/" "$1"
	chmod 0755 "$1"
}

pack_cpio() { # DIR OUT.gz
	(cd "$1" && find . | LC_ALL=C sort | $BUSYBOX cpio -o -H newc 2>/dev/null | gzip -9 -n) >"$2"
	[[ -s $2 ]] || die "packing $1 produced an empty archive"
}

# Copies file $1 (following symlinks) into tree $2 at the same path.
copy_into() {
	local src=$1 root=$2
	mkdir -p "$root$(dirname "$src")"
	cp -L --preserve=mode "$src" "$root$src"
}

build_kernel_and_initramfs() { # TMP DEB
	local tmp=$1 deb=$2 x=$1/kpkg rd=$1/initramfs kver ko src
	log "unpacking $(basename "$deb")"
	mkdir -p "$x"
	dpkg-deb -x "$deb" "$x"
	kver=$(find "$x/lib/modules" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort | tail -n1)
	[[ -n $kver ]] || die "no lib/modules/<version> in $deb"
	[[ -f $x/boot/vmlinuz-$kver ]] || die "no boot/vmlinuz-$kver in $deb"
	cp "$x/boot/vmlinuz-$kver" "$tmp/vmlinuz"
	echo "$kver" >"$tmp/kernel-release"

	log "assembling initramfs for $kver"
	mkdir -p "$rd"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,root,etc,lib/modules/"$kver"}
	chmod 1777 "$rd/tmp"
	cp "$BUSYBOX" "$rd/bin/busybox"
	local applet
	while read -r applet; do
		[[ $applet == bin/busybox ]] && continue
		mkdir -p "$rd/$(dirname "$applet")"
		ln -sf /bin/busybox "$rd/$applet"
	done < <($BUSYBOX --list-full)
	if ((EUID == 0)); then
		mknod -m 600 "$rd/dev/console" c 5 1
		mknod -m 666 "$rd/dev/null" c 1 3
	fi
	for m in "${MODULES[@]}"; do
		src=$(find "$x/lib/modules/$kver" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | sort | tail -n1)
		[[ -n $src ]] || die "module $m not found in $deb"
		ko=$rd/lib/modules/$kver/$m.ko
		case "$src" in
		*.ko) cp "$src" "$ko" ;;
		*.ko.xz)
			need xz
			xz -dc "$src" >"$ko"
			;;
		*.ko.zst)
			need zstd
			zstd -qdc "$src" >"$ko"
			;;
		*.ko.gz) gzip -dc "$src" >"$ko" ;;
		esac
	done
	write_init "$rd/init"
	pack_cpio "$rd" "$tmp/initramfs.gz"
	rm -rf "$x" "$rd"
}

# Copies every library ldd resolves for binary $1 into tree $2, at the path ldd
# names (the dynamic loader included, at /lib64/ld-linux-x86-64.so.2).
copy_libraries() { # BINARY ROOT
	local binary=$1 root=$2 libs lib
	libs=$(ldd "$binary") || die "ldd $binary failed"
	if grep -q 'not found' <<<"$libs"; then
		die "$binary has unresolved libraries: $(grep 'not found' <<<"$libs" | tr -s ' \t' ' ')"
	fi
	while read -r lib; do
		[[ -n $lib ]] && copy_into "$lib" "$root"
	done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$libs" | sort -u)
	[[ -f $root/lib64/ld-linux-x86-64.so.2 ]] || die "dynamic loader not found in ldd output of $binary"
}

build_fio_cpio() { # TMP
	local tmp=$1 fr=$1/fio-root
	log "assembling fio archive"
	mkdir -p "$fr"
	copy_into /usr/bin/fio "$fr"
	# fio's ioengines (psync, libaio, ...) are built in; libaio.so.1 is a plain
	# NEEDED library.
	copy_libraries /usr/bin/fio "$fr"
	pack_cpio "$fr" "$tmp/fio.cpio.gz"
	rm -rf "$fr"
}

# qemu-ga from the package, with the host's copies of its libraries (glib,
# libudev, libnuma, liburing: the host has them, QEMU needs the same ones; ldd
# says which are missing otherwise).
build_qga_cpio() { # TMP DEB
	local tmp=$1 deb=$2 x=$1/qga-pkg qr=$1/qga-root
	log "assembling qemu-ga archive from $(basename "$deb")"
	mkdir -p "$x" "$qr/usr/sbin"
	dpkg-deb -x "$deb" "$x"
	[[ -x $x/usr/sbin/qemu-ga ]] || die "no usr/sbin/qemu-ga in $deb"
	cp --preserve=mode "$x/usr/sbin/qemu-ga" "$qr/usr/sbin/qemu-ga"
	copy_libraries "$x/usr/sbin/qemu-ga" "$qr"
	pack_cpio "$qr" "$tmp/qga.cpio.gz"
	rm -rf "$x" "$qr"
}

# --- main -------------------------------------------------------------------

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9 || die "cannot lock $OUT/.lock"

KPKG=$(kernel_pkg_name)
DEB=$(cached_deb "$KPKG")
QGA_PKG=qemu-guest-agent
QGA_DEB=$(cached_deb "$QGA_PKG")
KVERSION=$(dpkg-deb -f "$DEB" Version)
STAMP_WANT="script $(sha256sum "$SCRIPT" | cut -d' ' -f1)
kernel $KPKG $KVERSION
qga $(dpkg-deb -f "$QGA_DEB" Version)
busybox $(pkg_version busybox-static)
fio $(pkg_version fio)"

if ((FORCE == 0)) && [[ -f $OUT/stamp && -s $OUT/vmlinuz && -s $OUT/initramfs.gz && -s $OUT/fio.cpio.gz && -s $OUT/qga.cpio.gz ]] &&
	[[ $(cat "$OUT/stamp") == "$STAMP_WANT" ]]; then
	log "up to date ($KPKG $KVERSION)"
else
	TMP=$(mktemp -d "$OUT/.build.XXXXXX")
	trap 'rm -rf "$TMP"' EXIT
	build_kernel_and_initramfs "$TMP" "$DEB"
	build_fio_cpio "$TMP"
	build_qga_cpio "$TMP" "$QGA_DEB"
	rm -f "$OUT/stamp"
	for f in vmlinuz kernel-release initramfs.gz fio.cpio.gz qga.cpio.gz; do
		mv -f "$TMP/$f" "$OUT/$f"
	done
	printf '%s\n' "$STAMP_WANT" >"$OUT/stamp"
	rm -rf "$TMP"
	trap - EXIT
	log "built $OUT: initramfs.gz $(du -h "$OUT/initramfs.gz" | cut -f1), fio.cpio.gz $(du -h "$OUT/fio.cpio.gz" | cut -f1), qga.cpio.gz $(du -h "$OUT/qga.cpio.gz" | cut -f1)"
fi

# Old packages are not needed once a newer one is in use.
find "$DEBDIR" -maxdepth 1 -name 'linux-image-*.deb' ! -name "$(basename "$DEB")" -delete
find "$DEBDIR" -maxdepth 1 -name "${QGA_PKG}_*.deb" ! -name "$(basename "$QGA_DEB")" -delete

flock -u 9

((CHECK == 1)) || exit 0

# --- boot check -------------------------------------------------------------

need qemu-system-x86_64 timeout
CK=$(mktemp -d "$OUT/.check.XXXXXX")
trap 'rm -rf "$CK"' EXIT
mkdir -p "$CK/t"
cat >"$CK/t/test.sh" <<'EOF'
echo "uptime at test start: $(cat /proc/uptime)"
fio --version
ls /dev
fio --name=ftvm-check --filename=/tmp/fio.dat --size=4M --bs=4k --rw=randwrite \
	--ioengine=psync --numjobs=1 --minimal >/dev/null || exit 11
fio --name=ftvm-check --filename=/tmp/fio.dat --size=4M --bs=4k --rw=randread \
	--ioengine=libaio --iodepth=8 --direct=0 --minimal >/dev/null || exit 12
echo "fio engines ok"
EOF
pack_cpio "$CK/t" "$CK/test.cpio.gz"
cat "$OUT/initramfs.gz" "$OUT/fio.cpio.gz" "$CK/test.cpio.gz" >"$CK/initrd.gz"

log "booting guest (TCG) for --check"
start=$EPOCHREALTIME
set +e
timeout 120 qemu-system-x86_64 -accel tcg -m 512M -nographic -nodefaults -no-reboot \
	-serial stdio -object memory-backend-memfd,id=mem,size=512M,share=on \
	-machine memory-backend=mem -kernel "$OUT/vmlinuz" -initrd "$CK/initrd.gz" \
	-append "console=ttyS0 panic=-1 quiet no_timer_check" </dev/null >"$CK/console.log" 2>&1
qrc=$?
set -e
end=$EPOCHREALTIME
tr -d '\r' <"$CK/console.log" >"$CK/console.txt"
secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')
fail() {
	cat "$CK/console.txt" >&2
	die "--check: $*"
}
((qrc == 0)) || fail "qemu exited with $qrc (124 = timed out)"
grep -qx 'FTVM-BOOTED' "$CK/console.txt" || fail "no FTVM-BOOTED line"
grep -q '^fio-' "$CK/console.txt" || fail "no fio --version output"
grep -qx 'fio engines ok' "$CK/console.txt" || fail "fio psync/libaio runs failed"
grep -qx 'FTVM-EXIT 0' "$CK/console.txt" || fail "no 'FTVM-EXIT 0' line"
boot=$(awk '/^uptime at test start:/ { print $5 }' "$CK/console.txt")
log "check passed: guest userspace at ${boot}s uptime, whole QEMU run ${secs}s"
