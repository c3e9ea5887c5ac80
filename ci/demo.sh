#!/usr/bin/env bash
# ci/demo.sh — the ftvm local demo: a Level 2 mirrored disk across two hosts.
#
# Usage: sudo ci/demo.sh
#
# Installs what is missing, builds the guest image and the daemons, then on this one machine:
#   1. brings up test hosts (network namespaces demo-hostA, demo-hostB, …) joined by two
#      A-links;
#   2. starts vhost-blk-mirror as secondary in hostB and as primary in hostA, and shows the
#      initial full sync;
#   3. boots a QEMU guest (TCG) in hostA: it makes an ext2 file system, writes a file and
#      its checksum, then runs fio with crc32c verification — meanwhile the demo cuts one
#      A-link (writes carry on over the other), then kills the secondary (writes are held),
#      and tells the primary to continue degraded (the guest never sees an error);
#   4. restarts the secondary: a delta resync copies only what changed; both images end
#      byte-identical;
#   5. fails over by hand (the coordinator will do it by itself): stops the primary,
#      promotes the secondary, boots the guest in hostB and checks the file there;
#   6. removes everything it made.
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
bash ci/install-deps.sh jq
bash ci/build-guest.sh
cargo build --release --locked -p vhost-blk-mirror
BIN="$ROOT/target/release/vhost-blk-mirror"
GUEST="$ROOT/target/guest"

PREFIX=demo-
HOST_A=${PREFIX}hostA
HOST_B=${PREFIX}hostB
mkdir -p "$ROOT/target/tmp"
WORK=$(mktemp -d "$ROOT/target/tmp/demo-XXXXXX")
declare -A PIDS=()
QEMU_PID=
cleanup() {
    set +e
    [ -n "$QEMU_PID" ] && kill -KILL "$QEMU_PID" 2>/dev/null && wait "$QEMU_PID" 2>/dev/null
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    done
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

# status A|B — the daemon's status JSON.
status() { echo status | socat -t 5 - "UNIX-CONNECT:$WORK/$1.ctl"; }
command_to() { echo "$2" | socat -t 5 - "UNIX-CONNECT:$WORK/$1.ctl"; }
# field A|B JQ — one field of the status.
field() { status "$1" | jq -r "$2"; }
# is A|B JQ VALUE — whether a status field has a value.
is() { [ "$(field "$1" "$2")" = "$3" ]; }
show() {
    status "$1" | jq -r '.replication | "    \(.role) on host \($h): disk \(.disk_state), generation \(.generation)"
        + (if .role == "primary" then ", peer reachable \(.peer_reachable), \(.out_of_sync_bytes) bytes out of sync, resync \(.resync.bytes_done)/\(.resync.bytes_total) bytes at \(.resync.rate_bytes_per_second / 1048576 | floor) MiB/s" else "" end)' --arg h "$1"
}

printf 'demo pair key %s\n' "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$WORK/pair.psk"
chmod 600 "$WORK/pair.psk"
LINKS_A=(10.77.1.1:7400 10.77.2.1:7400)
LINKS_B=(10.77.1.2:7400 10.77.2.2:7400)

# start_disk A|B — vhost-blk-mirror as primary in hostA or secondary in hostB.
start_disk() {
    local side=$1 namespace role flag
    local extra=()
    if [ "$side" = A ]; then
        namespace=$HOST_A role=primary flag=--peer
    else
        # Once promoted, hostB reaches the old primary on hostA's A-link addresses.
        namespace=$HOST_B role=secondary flag=--listen extra=(--peer "${LINKS_A[0]}" --peer "${LINKS_A[1]}")
    fi
    ip netns exec "$namespace" "$BIN" --role "$role" "$flag" "${LINKS_B[0]}" "$flag" "${LINKS_B[1]}" "${extra[@]}" \
        --psk-file "$WORK/pair.psk" --host-id "host$side" --image "$WORK/$side.img" \
        --serial demo-disk0 --socket "$WORK/$side.sock" --control "$WORK/$side.ctl" \
        2>>"$WORK/$side.log" &
    PIDS[$side]=$!
    wait_for 10 "vhost-blk-mirror $side to start" status "$side"
}

kill_disk() {
    kill -"$2" "${PIDS[$1]}" 2>/dev/null || true
    wait "${PIDS[$1]}" 2>/dev/null || true
    unset "PIDS[$1]"
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
    local initrd=$1 console=$2 side=$3 namespace
    if [ "$side" = A ]; then namespace=$HOST_A; else namespace=$HOST_B; fi
    ip netns exec "$namespace" qemu-system-x86_64 -accel tcg -m 512M -smp 1 -nographic \
        -nodefaults -no-reboot -serial stdio \
        -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem \
        -kernel "$GUEST/vmlinuz" -initrd "$initrd" -append "console=ttyS0 panic=-1 quiet" \
        -chardev "socket,id=disk0,path=$WORK/$side.sock,reconnect=1" \
        -device vhost-user-blk-pci,chardev=disk0 </dev/null >"$console" 2>&1 &
    QEMU_PID=$!
}

show_console() { grep -a -E '^(guest|fio|  )|FTVM-EXIT|err' "$1" | sed 's/^/    | /'; }

say "bringing up test hosts (network namespaces ${PREFIX}*, two A-links between hostA and hostB)"
bash ci/hosts.sh up "$PREFIX"
ip netns list | grep "^$PREFIX" | sed 's/^/    /'

say "mirrored disk: secondary in hostB, primary in hostA, 256 MiB; the initial full sync"
truncate -s 256M "$WORK/A.img" "$WORK/B.img"
start_disk B
start_disk A
wait_for 60 "the initial sync" is A .replication.disk_state UpToDate
show A
show B

WRITER='set -e
echo "guest: /dev/vda is $(( $(cat /sys/block/vda/size) / 2048 )) MiB, serial $(cat /sys/block/vda/serial)"
mke2fs -q /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt
dd if=/dev/urandom of=/mnt/data bs=1M count=16 2>/dev/null
md5sum /mnt/data > /mnt/data.md5 && md5=$(cut -d" " -f1 /mnt/data.md5) && sync && umount /mnt
echo "guest: wrote a 16 MiB file on ext2, md5 $md5"
echo "guest: fio 4k random writes, queue depth 8, crc32c verify"
fio --name=demo --filename=/dev/vda --offset=128M --size=64M --rw=randwrite --bs=4k \
    --iodepth=8 --ioengine=libaio --direct=1 --verify=crc32c --verify_fatal=1 \
    --output-format=terse --terse-version=3 > /tmp/fio.out
awk -F";" "{printf \"fio: write %d IOPS, verify read %d IOPS, errors %d\\n\", \$49, \$8, \$5}" /tmp/fio.out
echo "guest: fio verify passed"'
say "guest in hostA: file system, file, fio with verification — while the demo breaks things"
boot_guest "$(make_initrd writer "$WRITER" with-fio)" "$WORK/writer.console" A
wait_for 120 "fio to start in the guest" grep -q "guest: fio" "$WORK/writer.console"
writes_now() { field A .write_requests; }
more_writes() { [ "$(writes_now)" -gt $((before + $1)) ]; }
before=$(writes_now)
wait_for 120 "fio to get going" more_writes 1000
echo "    cutting A-link 1 (ip link set alink1 down in hostA): writes carry on over A-link 2"
ip -n "$HOST_A" link set alink1 down
before=$(writes_now)
wait_for 120 "writes over the other link" more_writes 1000
echo "    killing the secondary (SIGKILL): the primary holds completions; the guest just waits"
kill_disk B KILL
wait_for 30 "the primary to hold" is A .replication.mode Holding
show A
echo "    continue-degraded (the coordinator's call; here by hand): $(command_to A continue-degraded | jq -r '.result // .error')"
wait_for 120 "guest 1 to finish" grep -q "FTVM-EXIT" "$WORK/writer.console"
wait "$QEMU_PID" || true
QEMU_PID=
show_console "$WORK/writer.console"
grep -q "FTVM-EXIT 0" "$WORK/writer.console" || { echo "demo: the guest failed" >&2; exit 1; }
show A

say "the secondary comes back: a delta resync copies only what changed"
ip -n "$HOST_A" link set alink1 up
start_disk B
wait_for 60 "the delta resync" is A .replication.disk_state UpToDate
show A
cmp "$WORK/A.img" "$WORK/B.img" && echo "    hostA's and hostB's images are byte-identical"

READER='set -e
mkdir -p /mnt && mount -o ro /dev/vda /mnt
cd /mnt && md5sum -c data.md5 >/dev/null && echo "guest: /mnt/data matches its md5, read from hostB'"'"'s copy"'
say "failover to hostB (by hand until the coordinator does it): stop hostA's daemon, promote hostB"
kill_disk A TERM
echo "    promote: $(command_to B promote | jq -r '.result // .error')"
show B
boot_guest "$(make_initrd reader "$READER")" "$WORK/reader.console" B
wait_for 120 "the guest in hostB to finish" grep -q "FTVM-EXIT" "$WORK/reader.console"
wait "$QEMU_PID" || true
QEMU_PID=
show_console "$WORK/reader.console"
grep -q "FTVM-EXIT 0" "$WORK/reader.console" || { echo "demo: the guest in hostB failed" >&2; exit 1; }

say "demo finished: cleaning up namespaces, processes and files"
