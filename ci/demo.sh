#!/usr/bin/env bash
# ci/demo.sh — the ftvm local demo.
#
# Usage: sudo ci/demo.sh
#
# Installs what is missing, builds the guest image and the daemons, then on this one machine:
#   1. brings up test hosts (network namespaces demo-hostA, demo-hostB, demo-witness, …);
#   2. starts vhost-blk-mirror in hostA serving a fresh 256 MiB disk image;
#   3. boots a QEMU guest (TCG) in hostA on that disk: it makes an ext2 file system, writes
#      a file and its checksum, then runs fio with crc32c verification — and while fio runs,
#      the demo kills the daemon with SIGKILL and starts it again (QEMU reconnects, the
#      guest sees no error);
#   4. boots a second guest that mounts the disk and checks the file against its checksum;
#   5. shows the daemon's status and removes everything it made.
# Everything runs under TCG; the same daemons work with KVM.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ "$(id -u)" -ne 0 ]; then
    echo "ci/demo.sh: must run as root (network namespaces and QEMU); try: sudo $0" >&2
    exit 1
fi

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "installing dependencies and building (cached after the first run)"
bash ci/install-deps.sh
bash ci/build-guest.sh
cargo build --release --locked -p vhost-blk-mirror
BIN="$ROOT/target/release/vhost-blk-mirror"
GUEST="$ROOT/target/guest"

PREFIX=demo-
HOST_A=${PREFIX}hostA
mkdir -p "$ROOT/target/tmp"
WORK=$(mktemp -d "$ROOT/target/tmp/demo-XXXXXX")
DAEMON_PID=
QEMU_PID=
cleanup() {
    set +e
    [ -n "$QEMU_PID" ] && kill -KILL "$QEMU_PID" 2>/dev/null && wait "$QEMU_PID" 2>/dev/null
    [ -n "$DAEMON_PID" ] && kill -TERM "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null
    bash "$ROOT/ci/hosts.sh" down "$PREFIX" >/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for SECONDS DESCRIPTION COMMAND... — poll until COMMAND succeeds.
wait_for() {
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "demo: timed out waiting for $what" >&2
            exit 1
        fi
        sleep 0.1
    done
}

status() { echo status | socat -t 5 - "UNIX-CONNECT:$WORK/disk.ctl"; }

start_daemon() {
    ip netns exec "$HOST_A" "$BIN" --socket "$WORK/disk.sock" --image "$WORK/disk.img" \
        --serial demo-disk0 --control "$WORK/disk.ctl" 2>>"$WORK/daemon.log" &
    DAEMON_PID=$!
    wait_for 10 "vhost-blk-mirror to start" status
}

# make_initrd NAME SCRIPT [with-fio] — the base initramfs (+ fio) + an archive with /test.sh.
make_initrd() {
    local name=$1 script=$2 out="$WORK/$1.initrd" dir="$WORK/$1.files"
    mkdir -p "$dir"
    printf '%s\n' "$script" >"$dir/test.sh"
    chmod +x "$dir/test.sh"
    cat "$GUEST/initramfs.gz" >"$out"
    [ "${3:-}" = with-fio ] && cat "$GUEST/fio.cpio.gz" >>"$out"
    # The kernel finds an uncompressed archive only at a 4-byte aligned offset.
    truncate -s $((($(stat -c %s "$out") + 3) / 4 * 4)) "$out"
    (cd "$dir" && echo test.sh | busybox cpio -o -H newc 2>/dev/null) >>"$out"
    echo "$out"
}

boot_guest() {
    local initrd=$1 console=$2
    ip netns exec "$HOST_A" qemu-system-x86_64 -accel tcg -m 512M -smp 1 -nographic \
        -nodefaults -no-reboot -serial stdio \
        -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem \
        -kernel "$GUEST/vmlinuz" -initrd "$initrd" -append "console=ttyS0 panic=-1 quiet" \
        -chardev "socket,id=disk0,path=$WORK/disk.sock,reconnect=1" \
        -device vhost-user-blk-pci,chardev=disk0 </dev/null >"$console" 2>&1 &
    QEMU_PID=$!
}

show_console() { grep -a -E '^(guest|fio|  )|FTVM-EXIT|err' "$1" | sed 's/^/    | /'; }

say "bringing up test hosts (network namespaces ${PREFIX}*)"
bash ci/hosts.sh up "$PREFIX"
ip netns list | grep "^$PREFIX" | sed 's/^/    /'

say "starting vhost-blk-mirror in $HOST_A on a 256 MiB image"
truncate -s 256M "$WORK/disk.img"
start_daemon
status | sed 's/^/    /'

WRITER='set -e
echo "guest: /dev/vda is $(( $(cat /sys/block/vda/size) / 2048 )) MiB, serial $(cat /sys/block/vda/serial)"
mke2fs -q /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt
dd if=/dev/urandom of=/mnt/data bs=1M count=16 2>/dev/null
md5sum /mnt/data > /mnt/data.md5 && md5=$(cut -d" " -f1 /mnt/data.md5) && sync && umount /mnt
echo "guest: wrote a 16 MiB file on ext2, md5 $md5"
echo "guest: fio 4k random writes, queue depth 8, crc32c verify (the daemon is restarted meanwhile)"
fio --name=demo --filename=/dev/vda --offset=128M --size=64M --rw=randwrite --bs=4k \
    --iodepth=8 --ioengine=libaio --direct=1 --verify=crc32c --verify_fatal=1 \
    --time_based=0 --output-format=terse --terse-version=3 > /tmp/fio.out
awk -F";" "{printf \"fio: write %d IOPS, verify read %d IOPS, errors %d\\n\", \$49, \$8, \$5}" /tmp/fio.out
echo "guest: fio verify passed"'
say "guest 1: file system, file, fio with verification (daemon killed and restarted mid-run)"
boot_guest "$(make_initrd writer "$WRITER" with-fio)" "$WORK/writer.console"
wait_for 120 "fio to start in the guest" grep -q "guest: fio" "$WORK/writer.console"
writes_now() { status | grep -o '"write_requests":[0-9]*' | cut -d: -f2; }
before=$(writes_now)
fio_going() { [ "$(writes_now)" -gt $((before + 2000)) ]; }
wait_for 120 "fio to get going" fio_going
echo "    killing vhost-blk-mirror (pid $DAEMON_PID) with SIGKILL in the middle of fio"
kill -KILL "$DAEMON_PID"
wait "$DAEMON_PID" 2>/dev/null || true
start_daemon
echo "    restarted it (pid $DAEMON_PID); QEMU reconnects by itself"
wait_for 300 "guest 1 to finish" grep -q "FTVM-EXIT" "$WORK/writer.console"
wait "$QEMU_PID" || true
QEMU_PID=
show_console "$WORK/writer.console"
grep -q "FTVM-EXIT 0" "$WORK/writer.console" || { echo "demo: guest 1 failed" >&2; exit 1; }

READER='set -e
mkdir -p /mnt && mount -o ro /dev/vda /mnt
cd /mnt && md5sum -c data.md5 >/dev/null && echo "guest: /mnt/data matches its md5 after the daemon restart and a new boot"'
say "guest 2: a fresh boot reads the file back"
boot_guest "$(make_initrd reader "$READER")" "$WORK/reader.console"
wait_for 120 "guest 2 to finish" grep -q "FTVM-EXIT" "$WORK/reader.console"
wait "$QEMU_PID" || true
QEMU_PID=
show_console "$WORK/reader.console"
grep -q "FTVM-EXIT 0" "$WORK/reader.console" || { echo "demo: guest 2 failed" >&2; exit 1; }

say "vhost-blk-mirror status (the restarted daemon)"
status | sed 's/^/    /'
say "demo finished: cleaning up namespaces, processes and files"
