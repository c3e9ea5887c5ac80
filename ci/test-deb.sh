#!/usr/bin/env bash
# Usage: ci/test-deb.sh [--help]
#
# Builds the Debian package (ci/build-deb.sh --profile dev) and installs it with
# `apt-get install ./ftvm_*.deb` into a clean Debian 12 root (minbase, made by mmdebstrap),
# then, inside that root: `ftvmd --check --config /etc/ftvm/ftvmd.toml`, `ftvm-web --check
# --config /etc/ftvm/ftvm-web.toml`, `ftvm --help`,
# `ftvm keygen`, the libvirt hook (it passes a domain ftvm does not protect), each daemon's
# --help from /usr/lib/ftvm, the units, man pages,
# completions and the alert agents (and FTVM-MIB) in place, `ftvmd --check` of an [[alert]]
# per agent; then boots that root under systemd (systemd-nspawn --boot: systemd as the
# container's PID 1, no systemd needed on the host) and checks ftvmd.service: it starts
# (Type=notify: active only after READY=1, hardening and all), `ftvm status` answers
# through it, a SIGKILLed ftvmd is restarted (Restart=on-failure), a stopped one (SIGSTOP)
# is killed by the watchdog and restarted (WatchdogSec); then `apt-get purge ftvm` and
# checks that nothing of it is left. Needs root, mmdebstrap and systemd-nspawn (Debian:
# systemd-container; both installed if missing) and Debian's mirror.
#
# Cached under target/deb-test/: the clean root as base.tar (about 170 MB, made once: about
# 30 s here) and the downloaded .debs (qemu and friends). A cached run took 92 s here (load 10 on 2 cores), the boot under systemd included.
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

# systemctl, journalctl and kill inside the booted root (in all its namespaces).
inside() { nsenter -t "$leader" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
main_pid() { inside systemctl show ftvmd --property MainPID --value; }
# The root's systemd (the child of systemd-nspawn named systemd).
container_init() { ps --ppid "$nspawn" -o pid=,comm= | awk '$2 == "systemd" { print $1 }'; }
booted() {
	local state
	state=$(inside systemctl is-system-running 2>/dev/null) || true
	[[ $state == running || $state == degraded ]]
}
# restarted_from PID: ftvmd runs again, as another process.
restarted_from() {
	local now
	now=$(main_pid)
	[[ $now != 0 && $now != "$1" && $(inside systemctl is-active ftvmd) == active ]]
}
watchdog_logged() { inside journalctl --unit ftvmd --no-pager | grep -q "Watchdog timeout"; }
has_init() { [[ -n $(container_init) ]]; }
nspawn_gone() { ! kill -0 "$nspawn" 2>/dev/null; }

# wait_for SECONDS WHAT COMMAND...: polls COMMAND every 0.2 s until it succeeds.
wait_for() {
	local seconds=$1 what=$2 deadline
	shift 2
	deadline=$((SECONDS + seconds))
	until "$@" >/dev/null 2>&1; do
		((SECONDS < deadline)) || {
			inside journalctl --unit ftvmd --no-pager 2>&1 | tail -20 >&2 || true
			die "$what: not within $seconds s"
		}
		sleep 0.2
	done
}

# ftvmd.service under systemd as PID 1: starts, restarted when killed, watchdog. ftvmd
# runs alone (no peer, no witness: it waits for them) on loopback addresses.
boot_under_systemd() {
	command -v systemd-nspawn >/dev/null || bash ci/install-deps.sh systemd-container
	in_root ftvm keygen --out /etc/ftvm/keys --host hostA --host hostB >/dev/null
	cp "$root/etc/ftvm/keys/pair.psk" "$root/etc/ftvm/pair.psk"
	cp "$root/etc/ftvm/keys/witness-keys/hostA.psk" "$root/etc/ftvm/witness.psk"
	rm -rf "$root/etc/ftvm/keys"
	cat >"$root/etc/ftvm/ftvmd.toml" <<-'TOML'
		[host]
		name = "hostA"
		state_dir = "/var/lib/ftvm"
		control_socket = "/run/ftvm/ftvmd.sock"
		[peer]
		name = "hostB"
		addresses = ["127.0.0.1:7501"]
		listen = ["127.0.0.1:7500"]
		psk_file = "/etc/ftvm/pair.psk"
		[witness]
		addresses = ["127.0.0.1:7600"]
		psk_file = "/etc/ftvm/witness.psk"
	TOML
	for mount in var/cache/apt/archives dev proc; do
		umount "$root/$mount"
	done
	# --register=no --keep-unit: no machined, no scope unit (the host runs no systemd).
	systemd-nspawn --quiet --boot --register=no --keep-unit --directory="$root" \
		--machine="ftvm-test-deb-$$" </dev/null >"$cache/boot.log" 2>&1 &
	nspawn=$!
	leader=
	wait_for 30 "systemd-nspawn starting the root's systemd" has_init
	leader=$(container_init)
	wait_for 60 "the root's systemd booting" booted
	inside systemctl start ftvmd || die "systemctl start ftvmd"
	[[ $(inside systemctl show ftvmd --property ActiveState --value) == active ]] ||
		die "ftvmd.service is not active after systemctl start"
	inside ftvm status | grep -q "host hostA (peer hostB)" || die "ftvm status under systemd"
	echo "test-deb: under systemd (nspawn --boot): ftvmd.service active (READY=1), ftvm status answers"

	local first second
	first=$(main_pid)
	inside sh -c "kill -KILL $first"
	wait_for 30 "ftvmd restarted after SIGKILL" restarted_from "$first"
	second=$(main_pid)
	echo "test-deb: SIGKILL of ftvmd (pid $first): restarted by systemd as pid $second (Restart=on-failure)"
	inside sh -c "kill -STOP $second"
	wait_for 40 "ftvmd killed by the watchdog and restarted" restarted_from "$second"
	wait_for 20 "systemd's watchdog timeout in ftvmd's journal" watchdog_logged
	echo "test-deb: SIGSTOP of ftvmd (pid $second): watchdog timeout, restarted as pid $(main_pid) (WatchdogSec)"
	[[ $(inside systemctl show ftvmd --property NRestarts --value) == 2 ]] ||
		die "NRestarts is not 2"

	# SIGRTMIN+4 is systemd's own "power off" (no D-Bus, no logind needed).
	kill -s RTMIN+4 "$leader"
	wait_for 60 "the root's systemd powering off" nspawn_gone
	wait "$nspawn" || true
	nspawn=
	mount -t proc proc "$root/proc"
	mount --bind /dev "$root/dev"
	mount --bind "$cache/archives" "$root/var/cache/apt/archives"
}

root=$(mktemp -d "$cache/root.XXXXXX")
nspawn=
cleanup() {
	if [[ -n $nspawn ]] && kill -0 "$nspawn" 2>/dev/null; then
		kill -KILL "$nspawn" 2>/dev/null || true
		wait "$nspawn" 2>/dev/null || true
	fi
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
# systemd and systemd-sysv: for the boot under systemd-nspawn below (minbase has no init).
in_root apt-get install -y -qq --no-install-recommends "/tmp/$(basename "$deb")" systemd \
	systemd-sysv >"$cache/install.log" 2>&1 || {
	tail -30 "$cache/install.log" >&2
	die "apt-get install ./$(basename "$deb")"
}
echo "test-deb: installed $(basename "$deb") into a clean root (mmdebstrap minbase)"

check=$(in_root ftvmd --check --config /etc/ftvm/ftvmd.toml) || die "ftvmd --check: $check"
[[ $check == *"valid (1 VM(s), peer hostB)"* ]] || die "ftvmd --check said: $check"
echo "test-deb: ftvmd --check: $check"
check=$(in_root ftvm-web --check --config /etc/ftvm/ftvm-web.toml) || die "ftvm-web --check: $check"
echo "test-deb: ftvm-web --check: $check"
in_root ftvm-web --help | grep -q "hash-password" || die "ftvm-web --help does not name hash-password"
in_root ftvm --help | grep -q "keygen" || die "ftvm --help does not name keygen"
in_root ftvm keygen --out /root/keys --host hostA --host hostB | grep -q "/etc/ftvm/pair.psk" ||
	die "ftvm keygen"
[[ $(stat -c %a "$root/root/keys/pair.psk") == 600 ]] || die "the pair key is not mode 0600"
[[ $(stat -c %a "$root/root/keys/api.psk") == 600 ]] || die "the API key is not mode 0600"
in_root ftvm-witness --help | grep -q -- "--psk-dir" || die "ftvm-witness --help"
for daemon in vhost-blk-mirror vhost-net-ft ftvm-checkpoint; do
	in_root "/usr/lib/ftvm/$daemon" --help >/dev/null || die "/usr/lib/ftvm/$daemon --help"
done
in_root qemu-system-x86_64 --version >/dev/null || die "qemu-system-x86 was not pulled in"
for file in /usr/lib/ftvm/libftvm_ram_track.so /lib/systemd/system/ftvmd.service \
	/lib/systemd/system/ftvm-witness.service /etc/default/ftvm-witness \
	/lib/systemd/system/ftvm-web.service \
	/usr/share/man/man8/ftvm.8.gz /usr/share/man/man8/ftvmd.8.gz \
	/usr/share/man/man8/ftvm-witness.8.gz /usr/share/man/man8/ftvm-keygen.8.gz \
	/usr/share/man/man8/ftvm-check.8.gz /usr/share/man/man8/ftvm-collect-logs.8.gz \
	/usr/share/bash-completion/completions/ftvm /usr/share/zsh/vendor-completions/_ftvmd \
	/usr/share/fish/vendor_completions.d/ftvm-witness.fish /usr/lib/ftvm/alerts/ftvm-alert-webhook \
	/usr/lib/ftvm/alerts/ftvm-alert-snmp /usr/lib/ftvm/alerts/ftvm-alert-mail \
	/usr/share/snmp/mibs/FTVM-MIB.txt /etc/libvirt/hooks/qemu.d/50-ftvm; do
	[[ -e $root$file ]] || die "$file is not installed"
done
[[ -x $root/etc/libvirt/hooks/qemu.d/50-ftvm ]] || die "the libvirt hook is not executable"
# A domain ftvm does not protect passes the hook untouched.
echo "<domain><name>other</name></domain>" | in_root /etc/libvirt/hooks/qemu.d/50-ftvm other prepare begin - ||
	die "the libvirt hook refuses a domain ftvm does not protect"
[[ $(stat -c %a "$root/etc/ftvm/ftvmd.toml") == 600 ]] || die "/etc/ftvm/ftvmd.toml is not mode 0600"
[[ $(stat -c %a "$root/etc/ftvm/ftvm-web.toml") == 600 ]] || die "/etc/ftvm/ftvm-web.toml is not mode 0600"
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

boot_under_systemd

rm -f "$root"/etc/ftvm/*.psk
in_root apt-get purge -y -qq ftvm >>"$cache/install.log" 2>&1 || die "apt-get purge ftvm"
left=$(in_root sh -c 'ls -d /usr/bin/ftvm* /usr/lib/ftvm /lib/systemd/system/ftvm* /etc/ftvm/ftvmd.toml /etc/ftvm/ftvm-web.toml /etc/default/ftvm-witness /etc/libvirt/hooks/qemu.d/50-ftvm /usr/share/man/man8/ftvm* /usr/share/snmp/mibs/FTVM-MIB.txt 2>/dev/null' || true)
[[ -z $left ]] || die "left after apt-get purge: $left"
echo "test-deb: apt-get purge ftvm removes every file of the package"
