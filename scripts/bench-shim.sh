#!/usr/bin/env bash
# The shim benchmark of the issue: containerd's runc shim and ours side by side on one private
# containerd. Prints median/p90 latency of `ctr run --rm ... /bin/true` and the memory (RSS, PSS)
# of the shim serving one sleeping container, with the ratio mig/runc.
#
#   scripts/bench-shim.sh [RUNS] [--check]     (root; RUNS defaults to 30)
# --check exits 1 when a goal (mig no slower; at most a third of runc's memory) is not met.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
runs=30
args=()
for a in "$@"; do
    case "$a" in
        --check) args+=(--check) ;;
        ''|*[!0-9]*) echo "usage: $0 [RUNS] [--check]" >&2; exit 2 ;;
        *) runs=$a ;;
    esac
done
if [ "$(id -u)" -ne 0 ]; then
    echo "bench-shim.sh: run as root (it starts containerd)" >&2
    exit 1
fi
cargo build --release --locked -p mig-shim -p mig-e2e --bin containerd-shim-mig-v2 --bin bench-shim
MIG_SHIM_DIR="$ROOT/target/release" exec "$ROOT/target/release/bench-shim" --runs "$runs" "${args[@]}"
