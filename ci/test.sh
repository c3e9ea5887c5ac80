#!/usr/bin/env bash
# ci/test.sh — install what the tests need and run the whole ftvm test suite.
#
# Usage: sudo ci/test.sh [extra arguments for the test runner]
#
# Idempotent: Debian packages are installed only when missing, the guest kernel and initramfs
# are built once and cached under target/guest/. Needs root (network namespaces, QEMU).
# Runs: formatting and lint checks, then unit, in-process vhost-user and QEMU guest tests
# (cargo-nextest when installed, cargo test otherwise).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [ "$(id -u)" -ne 0 ]; then
    echo "ci/test.sh: must run as root (network namespaces and QEMU guests); try: sudo $0" >&2
    exit 1
fi

step() { printf '\n== %s ==\n' "$*"; }

step "dependencies"
bash ci/install-deps.sh
step "guest kernel and initramfs"
bash ci/build-guest.sh

step "format and lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build"
cargo build --workspace --all-targets --locked

step "systemd units (systemd-analyze verify and security)"
bash ci/verify-units.sh target/debug/ftvm

step "fuzz seed replay (virtio-blk request parser)"
# The fuzz target builds on stable Rust; replaying its seeds checks the parser against the
# target's model. Long runs need nightly: see vhost-blk-mirror/fuzz/README.md.
cargo build --locked --manifest-path vhost-blk-mirror/fuzz/Cargo.toml
target_dir=$(cargo metadata --format-version 1 --no-deps --manifest-path vhost-blk-mirror/fuzz/Cargo.toml |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
"$target_dir/debug/request_parser" -runs=0 vhost-blk-mirror/fuzz/seeds/request_parser

step "fuzz seed replay (virtio-net frame parser)"
cargo build --locked --manifest-path vhost-net-ft/fuzz/Cargo.toml
target_dir=$(cargo metadata --format-version 1 --no-deps --manifest-path vhost-net-ft/fuzz/Cargo.toml |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
"$target_dir/debug/frame_parser" -runs=0 vhost-net-ft/fuzz/seeds/frame_parser

step "fuzz seed replay (checkpoint stream decoders and page codec)"
cargo build --locked --manifest-path checkpoint/fuzz/Cargo.toml
target_dir=$(cargo metadata --format-version 1 --no-deps --manifest-path checkpoint/fuzz/Cargo.toml |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
"$target_dir/debug/checkpoint_stream" -runs=0 checkpoint/fuzz/seeds/checkpoint_stream

step "fuzz seed replay (replication link frame decoders)"
cargo build --locked --manifest-path replication-link/fuzz/Cargo.toml
target_dir=$(cargo metadata --format-version 1 --no-deps --manifest-path replication-link/fuzz/Cargo.toml |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
"$target_dir/debug/frame_decoder" -runs=0 replication-link/fuzz/seeds/frame_decoder

step "Debian package (built, installed into a clean root, run, purged)"
bash ci/test-deb.sh

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast "$@"
else
    cargo test --workspace --locked --no-fail-fast "$@"
fi
