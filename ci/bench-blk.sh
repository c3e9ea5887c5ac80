#!/usr/bin/env bash
# ci/bench-blk.sh — benchmark vhost-blk-mirror against qemu-storage-daemon, same image, same run.
#
# Usage: sudo ci/bench-blk.sh [--seconds S] [--image-mib N]
#
# Builds release binaries, creates a raw image under target/bench/ filled with data (so that
# neither daemon reads holes), and runs `ftvm-blk-bench compare`: 4k random read and write at
# queue depth 1 and 32, then 64 KiB and 1 MiB sequential read and write at queue depth 4,
# against each daemon in turn, with EVENT_IDX negotiated as QEMU guests do. The load generator
# is a vhost-user-blk frontend itself (no guest), so the backend is the bottleneck. Prints a
# markdown table with IOPS, MB/s, p50/p99 latency and the ratio ours/qsd.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SECONDS_PER_RUN=10
IMAGE_MIB=1024
while (($#)); do
    case "$1" in
    --seconds) SECONDS_PER_RUN=$2; shift 2 ;;
    --image-mib) IMAGE_MIB=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-blk: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done

bash ci/install-deps.sh
cargo build --release --locked -p vhost-blk-mirror -p vhost-user-blk-load

WORK="$ROOT/target/bench"
mkdir -p "$WORK"
IMAGE="$WORK/blk-bench.img"
if [ ! -f "$IMAGE" ] || [ "$(stat -c %s "$IMAGE")" -ne $((IMAGE_MIB << 20)) ]; then
    echo "bench-blk: filling a ${IMAGE_MIB} MiB image with data"
    head -c $((IMAGE_MIB << 20)) /dev/urandom >"$IMAGE.tmp"
    mv "$IMAGE.tmp" "$IMAGE"
fi

echo "bench-blk: $(nproc) cores, kernel $(uname -r), $(qemu-storage-daemon --version | head -n 1)"
exec "$ROOT/target/release/ftvm-blk-bench" compare --image "$IMAGE" --event-idx \
    --seconds "$SECONDS_PER_RUN" \
    --ours-cmd "$ROOT/target/release/vhost-blk-mirror --socket {socket} --image {image}"
