#!/usr/bin/env bash
# ci/demo.sh — the ftvm local demo: a protected VM survives the loss of its host.
#
# Usage: sudo ci/demo.sh
#
# Installs what is missing, builds the guest image and ftvm, then on this one machine:
#   1. brings up three hosts as network namespaces: hostA and hostB joined by two A-links,
#      and a witness on the LAN;
#   2. starts ftvm-witness, and ftvmd on hostA and hostB with a VM protected at Level 2
#      (a 256 MiB disk mirrored synchronously to hostB); shows `ftvm status` while the
#      initial sync runs;
#   3. the guest (QEMU, TCG) starts on hostA, makes an ext2 file system with a 16 MiB file
#      and its checksum, then appends numbered records to a log, each synced, printing
#      "ACK n" after each; it also serves TCP echo at 10.77.0.10:7000 on its NIC
#      (vhost-net-ft on hostA's VM bridge, with a redundant uplink through hostB);
#   4. a LAN client keeps one TCP connection to the guest busy; hostA's uplink is cut: the
#      guest's traffic goes through hostB and the connection carries on; the uplink comes
#      back and so does the traffic;
#   5. kills hostA: its links go down and every process in it is killed;
#   6. hostB's ftvmd detects the loss, the witness grants it the VM, it promotes its copy
#      and restarts the guest, which checks the file and finds every acknowledged record;
#      the client reaches it at the same IP and MAC;
#   7. hostA comes back: it becomes hostB's secondary by itself, with a delta resync;
#   8. removes everything it made.
# Everything runs under TCG; the same daemons work with KVM (accel = "kvm").
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ "$(id -u)" -ne 0 ]; then
    echo "ci/demo.sh: must run as root (network namespaces and QEMU); try: sudo $0" >&2
    exit 1
fi
STARTED=$SECONDS

say() { printf '\n\033[1m== [%3ds] %s\033[0m\n' "$((SECONDS - STARTED))" "$*"; }

say "installing dependencies and building (cached after the first run)"
bash ci/install-deps.sh jq
bash ci/build-guest.sh
cargo build --release --locked -p vhost-blk-mirror -p vhost-net-ft -p coordinator -p checkpoint -p ftvm-ram-track
BIN="$ROOT/target/release"
GUEST="$ROOT/target/guest"

PREFIX=demo-
mkdir -p "$ROOT/target/tmp"
WORK=$(mktemp -d "$ROOT/target/tmp/demo-XXXXXX")
# Guest RAM lives in tmpfs; the two demo hosts share this machine's, so each has its own.
RAM_DIR=/dev/shm/ftvm-demo-$$
declare -A PIDS=()
cleanup() {
    set +e
    # ftvmd stops the VM and disk daemons it started; then anything left in our namespaces.
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    done
    for host in hostA hostB witness client; do
        for pid in $(ip netns pids "$PREFIX$host" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    done
    bash "$ROOT/ci/hosts.sh" down "$PREFIX" >/dev/null
    rm -rf "$WORK" "$RAM_DIR"
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

# kill_host HOST — a host is lost: its A-links and LAN port go down, every process in it is
# killed; KILLED is set to the moment the links went down.
kill_host() {
    say "killing $1: A-links and LAN port down, every process in $PREFIX$1 killed"
    for device in alink1 alink2 lan0; do ip -n "$PREFIX$1" link set "$device" down; done
    KILLED=$(date +%s.%N)
    # (stderr off around the kill and the reaping: bash would report ftvmd's "Killed")
    {
        for pid in $(ip netns pids "$PREFIX$1"); do kill -KILL "$pid" || true; done
        wait "${PIDS[$1]}" || true
    } 2>/dev/null
    unset "PIDS[$1]"
}

ftvm() { local host=$1; shift; "$BIN/ftvm" --socket "$WORK/$host/ftvmd.sock" "$@"; }
vm_field() { ftvm "$1" status --json | jq -r ".vms[0].$2"; }
vm_is() { [ "$(vm_field "$1" "$2")" = "$3" ]; }
indent() { sed 's/^/    /'; }

# --- hosts, keys, configuration -------------------------------------------------------
say "bringing up hostA, hostB and the witness as network namespaces (${PREFIX}*)"
bash ci/hosts.sh up "$PREFIX" >/dev/null
ip netns list | grep "^$PREFIX" | grep -v client | indent

# The pair's key, and each host's own key for the witness.
mkdir -p "$WORK/witness-keys"
for key in pair witness-keys/hostA witness-keys/hostB; do
    printf 'demo %s key %s\n' "$key" "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$WORK/$key.psk"
    chmod 600 "$WORK/$key.psk"
done

GUEST_IP=10.77.0.10
GUEST_MAC=52:54:00:77:00:10
GUEST_SCRIPT='ip link set eth0 up && ip addr add '$GUEST_IP'/24 dev eth0
nc -ll -p 7000 -e cat &
if ! mount -o ro /dev/vda /mnt 2>/dev/null; then
  echo "guest: first boot: making an ext2 file system"
  mke2fs -q /dev/vda && mount /dev/vda /mnt
  dd if=/dev/urandom of=/mnt/data bs=1M count=16 2>/dev/null
  md5sum /mnt/data > /mnt/data.md5 && sync
  echo "guest: wrote a 16 MiB file, md5 $(cut -d" " -f1 /mnt/data.md5)"
  i=1
  while [ $i -le 100000 ]; do
    echo "record $i" >> /mnt/log && sync && echo "ACK $i"
    i=$((i + 1))
  done
fi
cd /mnt
md5sum -c data.md5 >/dev/null && echo "guest: restarted; /mnt/data matches its md5"
echo "guest: last record in the log: $(tail -n 1 log)"
n=0
while :; do n=$((n + 1)); read up idle < /proc/uptime; echo "guest: tick $n, up $up s"; sleep 1; done'
mkdir -p "$WORK/initrd.files" /mnt
printf '#!/bin/sh\nmkdir -p /mnt\n%s\n' "$GUEST_SCRIPT" >"$WORK/initrd.files/test.sh"
chmod +x "$WORK/initrd.files/test.sh"
cat "$GUEST/initramfs.gz" >"$WORK/initrd"
truncate -s $((($(stat -c %s "$WORK/initrd") + 3) / 4 * 4)) "$WORK/initrd"
(cd "$WORK/initrd.files" && echo test.sh | busybox cpio -o -H newc 2>/dev/null) >>"$WORK/initrd"

declare -A OWN1=([hostA]=10.77.1.1 [hostB]=10.77.1.2) OWN2=([hostA]=10.77.2.1 [hostB]=10.77.2.2)
declare -A PEER=([hostA]=hostB [hostB]=hostA)
for host in hostA hostB; do
    peer=${PEER[$host]}
    mkdir -p "$WORK/$host"
    truncate -s 256M "$WORK/$host.img"
    cat >"$WORK/$host.toml" <<TOML
[host]
name = "$host"
state_dir = "$WORK/$host"
control_socket = "$WORK/$host/ftvmd.sock"
bin_dir = "$BIN"
ram_dir = "$RAM_DIR/$host"

[peer]
name = "$peer"
addresses = ["${OWN1[$peer]}:7500", "${OWN2[$peer]}:7500"]
listen = ["${OWN1[$host]}:7500", "${OWN2[$host]}:7500"]
psk_file = "$WORK/pair.psk"

[witness]
addresses = ["10.77.0.3:7600"]
psk_file = "$WORK/witness-keys/$host.psk"

[[vm]]
name = "vm1"
level = 2
primary = "hostA"
memory_mib = 256
accel = "tcg"
checkpoint_port = 7460
qemu_args = ["-kernel", "$GUEST/vmlinuz", "-initrd", "$WORK/initrd", "-append", "console=ttyS0 panic=-1 quiet no_timer_check"]
[[vm.disk]]
image = "$WORK/$host.img"
replication_port = 7400
resync_rate_limit = "96M"
[[vm.nic]]
mac = "$GUEST_MAC"
bridge = "vmbr0"
uplink = "uplink"
link_port = 7450
TOML
done
echo "    hostA's configuration, $WORK/hostA.toml (hostB's mirrors it):"
sed -n '/^\[\[vm\]\]/,$p' "$WORK/hostA.toml" | sed 's|"-kernel".*|…kernel, initrd, command line…]|' | indent

start_ftvmd() {
    ip netns exec "$PREFIX$1" "$BIN/ftvmd" --config "$WORK/$1.toml" 2>>"$WORK/$1.log" &
    PIDS[$1]=$!
    wait_for 10 "ftvmd on $1" test -S "$WORK/$1/ftvmd.sock"
}

# --- protection -----------------------------------------------------------------------
say "starting ftvm-witness, and ftvmd on hostA and hostB"
ip netns exec "${PREFIX}witness" "$BIN/ftvm-witness" --listen 10.77.0.3:7600 \
    --state-dir "$WORK/witness" --psk-dir "$WORK/witness-keys" 2>>"$WORK/witness.log" &
PIDS[witness]=$!
start_ftvmd hostB
start_ftvmd hostA
echo "    \$ ftvm protect vm1 --level 2 --peer hostB"
ftvm hostA protect vm1 --level 2 --peer hostB | indent

say "initial sync of hostB's copy (rate-limited to 96 MiB/s so that it can be watched)"
wait_for 20 "the sync to start" vm_is hostA state Syncing
while vm_is hostA state Syncing; do
    ftvm hostA status | grep -a '^vm1 ' | indent
    sleep 0.7
done
ftvm hostA status | indent

# --- workload and host loss -----------------------------------------------------------
say "the guest runs on hostA: a file system, a file, then synced records"
CONSOLE_A="$WORK/hostA/vm1/console.log"
CONSOLE_B="$WORK/hostB/vm1/console.log"
last_ack() { grep -a -o '^ACK [0-9]*' "$1" | tail -n 1 | cut -d' ' -f2; }
acks_at_least() { [ "$(last_ack "$CONSOLE_A")" -ge "$1" ] 2>/dev/null; }
wait_for 120 "the guest's first records" acks_at_least 500
grep -a '^guest:' "$CONSOLE_A" | indent
echo "    … ACK $(last_ack "$CONSOLE_A") so far"

# --- the uplink ------------------------------------------------------------------------
# The client: one TCP connection, a line every 20 ms, each echo logged as "N TIME".
CLIENT_LOG="$WORK/client.log"
CLIENT_LOOP='exec 3<>/dev/tcp/'$GUEST_IP'/7000 || exit 1
i=0
while :; do
    i=$((i + 1))
    echo "round $i" >&3
    IFS= read -r -t 20 reply <&3 || { echo "no echo for round $i"; exit 1; }
    [ "$reply" = "round $i" ] || { echo "round $i: the echo differs"; exit 1; }
    echo "$i $(date +%s.%N)"
    sleep 0.02
done'
echo_once() { ip netns exec "${PREFIX}client" bash -c 'exec 3<>/dev/tcp/'$GUEST_IP'/7000 && echo hello >&3 && IFS= read -r -t 3 r <&3 && [ "$r" = hello ]'; }
rounds() { grep -c '^[0-9]' "$CLIENT_LOG" 2>/dev/null || true; }
rounds_at_least() { [ "$(rounds)" -ge "$1" ]; }
longest_gap_since() { # EPOCH-SECONDS: the longest pause between two echoes since then, in ms
    awk -v since="$1" '/^[0-9]/ { if ($2 > since && prev) { gap = $2 - prev; if (gap > max) max = gap } prev = $2 }
        END { printf "%d", max * 1000 }' "$CLIENT_LOG"
}
path_is() { [ "$(vm_field hostA 'nics[0].path')" = "$1" ]; } # local | peer

say "a LAN client (10.77.0.4) talks TCP to the guest at $GUEST_IP through vhost-net-ft"
wait_for 60 "the guest's echo server" echo_once
ip netns exec "${PREFIX}client" bash -c "$CLIENT_LOOP" >"$CLIENT_LOG" 2>&1 &
PIDS[client]=$!
wait_for 20 "the client's first echoes" rounds_at_least 20
ftvm hostA status | grep -a 'nic ' | indent

say "cutting hostA's uplink (the VM bridge's port to the LAN)"
CUT=$(date +%s.%N)
ip -n "${PREFIX}hostA" link set uplink down
wait_for 10 "hostA's NIC to take the path through hostB" path_is peer
BEFORE=$(rounds)
wait_for 30 "echoes through hostB" rounds_at_least $((BEFORE + 50))
ftvm hostA status | grep -a 'nic ' | indent
ftvm hostB status | grep -a 'nic ' | indent
echo "    the same TCP connection goes on through hostB: $(rounds) echoes so far, longest pause $(longest_gap_since "$CUT") ms"

say "hostA's uplink is back"
BACK=$(date +%s.%N)
ip -n "${PREFIX}hostA" link set uplink up
wait_for 10 "hostA's NIC to take its own uplink again" path_is local
BEFORE=$(rounds)
wait_for 30 "echoes on hostA's uplink" rounds_at_least $((BEFORE + 50))
ftvm hostA status | grep -a 'nic ' | indent
echo "    traffic is local again: $(rounds) echoes, longest pause $(longest_gap_since "$BACK") ms"
kill -TERM "${PIDS[client]}" 2>/dev/null || true
{ wait "${PIDS[client]}"; } 2>/dev/null || true
unset "PIDS[client]"

kill_host hostA
ACKED=$(last_ack "$CONSOLE_A")
echo "    the guest had acknowledged record $ACKED"
vm_running_on_b() { [ "$(vm_field hostB vm_pid)" != null ] && vm_is hostB role Primary; }
wait_for 30 "hostB to take over" vm_running_on_b
echo "    hostB started the VM $(echo "$(date +%s.%N) - $KILLED" | bc | cut -c1-4) s after the kill (peer timeout 1 s, then the witness's grant)"
ftvm hostB status | indent
echo "    the witness's record ($WORK/witness/hostA+hostB/vm1.grant.json):"
jq -c . "$WORK/witness/hostA+hostB/vm1.grant.json" | indent
echo "    \$ ftvm events   (on hostB)"
ftvm hostB events | tail -n 6 | cut -c 25- | indent

say "the guest on hostB checks its data"
wait_for 120 "the guest on hostB" grep -q "last record in the log" "$CONSOLE_B"
grep -a '^guest:' "$CONSOLE_B" | indent
FOUND=$(grep -a -o 'last record in the log: record [0-9]*' "$CONSOLE_B" | grep -o '[0-9]*$')
if [ "$FOUND" -lt "$ACKED" ]; then
    echo "demo: record $ACKED was acknowledged but hostB's copy ends at $FOUND" >&2
    exit 1
fi
echo "    every acknowledged record is there (acknowledged $ACKED, found $FOUND)"
wait_for 60 "the client to reach the guest on hostB" echo_once
echo "    the client reaches the guest on hostB at $GUEST_IP $(echo "$(date +%s.%N) - $KILLED" | bc | cut -c1-4) s after the kill;"
echo "    its ARP entry was never flushed: $(ip -n "${PREFIX}client" neigh show "$GUEST_IP")"

# --- re-protection --------------------------------------------------------------------
say "hostA comes back: it becomes hostB's secondary by itself (delta resync)"
for device in alink1 alink2 lan0; do ip -n "${PREFIX}hostA" link set "$device" up; done
start_ftvmd hostA
a_is_secondary() { vm_is hostA role Secondary; }
wait_for 30 "hostA to rejoin" a_is_secondary
wait_for 60 "protection to return" vm_is hostB state Protected
ftvm hostB status | indent
resynced=$(ftvm hostB status --json | jq '.vms[0].disks[0].replication.resync.bytes_total')
echo "    delta resync: $((resynced / 1048576)) MiB of the 256 MiB disk"

# --- live migration ---------------------------------------------------------------------
say "moving the running VM to hostA and back without a reboot (ftvm migrate)"
echo "    \$ ftvm migrate vm1   (on hostB: a final checkpoint, then hostA restores it)"
echo "    the guest's clock on hostB: $(grep -a -o 'tick [0-9]*, up [0-9.]* s' "$CONSOLE_B" | tail -n 1)"
TICKS_BEFORE=$(grep -a -c 'tick ' "$CONSOLE_A" || true)
ftvm hostB migrate vm1 | indent
ticked_on_a() { [ "$(grep -a -c 'tick ' "$CONSOLE_A")" -gt "$TICKS_BEFORE" ]; }
wait_for 30 "the guest's clock on hostA" ticked_on_a
echo "    the guest's clock on hostA: $(grep -a -o 'tick [0-9]*, up [0-9.]* s' "$CONSOLE_A" | tail -n 1)"
wait_for 60 "protection with hostB as secondary" vm_is hostA state Protected
echo "    \$ ftvm migrate vm1   (on hostA, back to hostB)"
TICKS_BEFORE=$(grep -a -c 'tick ' "$CONSOLE_B" || true)
ftvm hostA migrate vm1 | indent
ticked_on_b() { [ "$(grep -a -c 'tick ' "$CONSOLE_B")" -gt "$TICKS_BEFORE" ]; }
wait_for 30 "the guest's clock on hostB" ticked_on_b
wait_for 60 "protection with hostA as secondary" vm_is hostB state Protected
echo "    the same guest on hostB again, never rebooted: $(grep -a -o 'tick [0-9]*, up [0-9.]* s' "$CONSOLE_B" | tail -n 1)"

# --- Level 3 ----------------------------------------------------------------------------
say "Level 3 on the running VM: memory checkpoints from hostB to hostA, output held until safe"
echo "    \$ ftvm protect vm1 --level 3 --peer hostA   (on hostB, its primary now)"
ftvm hostB protect vm1 --level 3 --peer hostA | indent
committed() { ftvm hostB status --json | jq -r '.vms[0].checkpoint.stats.committed_epoch // 0'; }
committed_at_least() { [ "$(committed)" -ge "$1" ]; }
wait_for 120 "the first checkpoints" committed_at_least 20
ftvm hostB status | indent
: >"$CLIENT_LOG" # emptied here: the background client opens it a moment later
ip netns exec "${PREFIX}client" bash -c "$CLIENT_LOOP" >>"$CLIENT_LOG" 2>&1 &
PIDS[client]=$!
wait_for 30 "the client's echoes through output commit" rounds_at_least 50
last_tick() { grep -a -o 'tick [0-9]*, up [0-9.]* s' "$1" | tail -n 1; }
echo "    a new TCP connection from the client: $(rounds) echoes; the guest's clock: $(last_tick "$CONSOLE_B")"

kill_host hostB
echo "    hostB's guest was at: $(last_tick "$CONSOLE_B")"
TICKS_BEFORE=$(grep -a -c 'tick ' "$CONSOLE_A" || true)
vm_running_on_a() { [ "$(vm_field hostA vm_pid)" != null ] && vm_is hostA role Primary; }
wait_for 30 "hostA to restore the VM" vm_running_on_a
new_tick_on_a() { [ "$(grep -a -c 'tick ' "$CONSOLE_A")" -gt "$TICKS_BEFORE" ]; }
wait_for 30 "the guest's clock on hostA" new_tick_on_a
echo "    hostA restored the VM from its last checkpoint $(echo "$(date +%s.%N) - $KILLED" | bc | cut -c1-4) s after the kill"
echo "    the same guest goes on, no reboot: $(last_tick "$CONSOLE_A")"
BEFORE=$(rounds)
wait_for 60 "the same TCP connection to go on" rounds_at_least $((BEFORE + 50))
echo "    the client's TCP connection survived the loss of the host: $(rounds) echoes, longest pause $(longest_gap_since "$KILLED") ms"
echo "    \$ ftvm events   (on hostA)"
ftvm hostA events | grep -a -e 'witness granted' -e 'frozen' -e 'restored' | cut -c 25- | indent

say "demo finished in $((SECONDS - STARTED)) s: cleaning up namespaces, processes and files"
