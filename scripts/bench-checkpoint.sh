#!/usr/bin/env bash
# Checkpoint and restore times of the shim's CRIU engine (checkpoint on stop into the node's
# store, restore on create from it) next to the floor measured in the same run: plain
# `runc checkpoint` / `runc restore` by hand on the same program and memory size.
#
#   sudo scripts/bench-checkpoint.sh [SIZES_MIB...]      (default: 16 256 1024)
#
# Each row is the median of REPS runs (env REPS, default 3). The mig times are what a client
# sees through containerd: `ctr task kill` returning after the checkpoint; `ctr task start -d`
# of the container created again (`ctr container create`, not timed: the kubelet, and the
# migration server, create a container before they start it) until the restored task runs.
# So they include what containerd and ctr cost by themselves (a task: the shim started, its
# create and start calls); the last column measures that, a plain `ctr task start -d` of a new
# container of the same image, for comparison.
#
# Every timed step starts after a `sync`, for the floor and the shim alike: the shim makes a
# checkpoint for a stop durable right after the stop (in the background, see
# shim/src/writeback.rs), and a step should not pay for the previous one's disk writes.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/nodes.sh
source "$ROOT/scripts/lib/nodes.sh"
SIZES=("${@:-16 256 1024}")
read -r -a SIZES <<<"${SIZES[*]}"
REPS=${REPS:-3}
[ "$(id -u)" -eq 0 ] || { echo "bench-checkpoint.sh: run as root" >&2; exit 1; }
command -v criu >/dev/null || { echo "bench-checkpoint.sh: criu not on PATH (run scripts/setup.sh)" >&2; exit 1; }

cargo build --release --locked -p mig-shim --quiet --manifest-path "$ROOT/Cargo.toml"
W=$(mktemp -d /tmp/mig-bench-XXXXXX)
cleanup() {
    set +e
    [ -n "${CTR_PID:-}" ] && { $CTR t ls -q 2>/dev/null | xargs -r -n1 $CTR t kill -s KILL; sleep 0.5; }
    for c in $($CTR c ls -q 2>/dev/null); do $CTR t rm -f "$c" >/dev/null 2>&1; $CTR c rm "$c" >/dev/null 2>&1; done
    [ -n "${CTR_PID:-}" ] && kill "$CTR_PID" && wait "$CTR_PID" 2>/dev/null
    runc --root "$W/runc" list -q 2>/dev/null | xargs -r -n1 runc --root "$W/runc" delete -f
    grep -o " ${W}[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l
    [ -n "${KEEP:-}" ] || rm -rf "$W"
}
trap cleanup EXIT
now() { date +%s%N; }
ms() { echo $(( ($2 - $1) / 1000000 )); }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# The image: memhog alone, as an OCI layout (no registry here).
mkdir -p "$W/rootfs"
gcc -O2 -static -o "$W/rootfs/memhog" "$ROOT/scripts/bench/memhog.c"
oci_image "$W/rootfs" docker.io/library/memhog:bench '{"Cmd":["/memhog"]}' "$W/memhog.tar"

# A private containerd whose shims are the ones just built, with its own state dir.
PATH="$ROOT/target/release:$PATH" start_node "$W"
CTR_PID=$NODE_PID
CTR="ctr -a $W/containerd.sock -n bench"
$CTR images import "$W/memhog.tar" >/dev/null

floor_run() { # size -> "dump_ms restore_ms"
    local size=$1 b="$W/bundle-$1" id="floor-$1"
    rm -rf "$b" "$W/img-$1" && mkdir -p "$b/rootfs" && cp "$W/rootfs/memhog" "$b/rootfs/"
    (cd "$b" && runc spec)
    python3 - "$b/config.json" "$size" <<'PY'
import json, sys
p, size = sys.argv[1], sys.argv[2]
s = json.load(open(p))
s["process"]["terminal"] = False
s["process"]["args"] = ["/memhog", size]
s["root"]["readonly"] = False
json.dump(s, open(p, "w"))
PY
    # stdout/stderr are pipes, as under a shim: CRIU cannot dump a host file the container
    # cannot see.
    runc --root "$W/runc" run -d --bundle "$b" "$id" </dev/null > >(cat >/dev/null) 2>&1
    for _ in $(seq 600); do [ -s "$b/rootfs/tick" ] && break; sleep 0.05; done
    sleep 0.3 # as for the shim's run
    local t0 t1 t2
    sync
    t0=$(now)
    runc --root "$W/runc" checkpoint --image-path "$W/img-$1" --work-path "$W/work-$1" --tcp-established --file-locks "$id"
    t1=$(now)
    sync
    t1=$(now)
    runc --root "$W/runc" restore -d --image-path "$W/img-$1" --work-path "$W/work-$1" --tcp-established --file-locks --bundle "$b" "$id" </dev/null > >(cat >/dev/null) 2>&1
    t2=$(now)
    runc --root "$W/runc" delete -f "$id"
    rm -rf "$W/img-$1" "$W/work-$1"
    echo "$(ms "$t0" "$t1") $(ms "$t1" "$t2")"
}

mig_run() { # size -> "checkpoint_ms restore_ms"
    local size=$1 id="mig-$1" t0 t1 t2
    $CTR run -d --runtime io.containerd.mig.v2 --annotation mig.dev/checkpoint-on-stop=true \
        docker.io/library/memhog:bench "$id" /memhog "$size" >"$W/out-$id" 2>&1
    # memhog writes /tick once its memory is touched: wait for it in the container's upper dir.
    for _ in $(seq 600); do
        compgen -G "$W/root/io.containerd.snapshotter.v1.overlayfs/snapshots/*/fs/tick" >/dev/null && break
        sleep 0.05
    done
    sleep 0.3
    sync
    t0=$(now)
    $CTR t kill -s SIGTERM "$id"
    t1=$(now)
    $CTR t rm "$id" >/dev/null 2>&1 || true
    $CTR c rm "$id"
    $CTR c create --runtime io.containerd.mig.v2 docker.io/library/memhog:bench "$id" /memhog "$size" >/dev/null 2>&1
    sync
    local tr
    tr=$(now)
    $CTR t start -d "$id" >/dev/null 2>&1
    t2=$(now)
    $CTR t kill -s KILL "$id" >/dev/null 2>&1; sleep 0.3
    $CTR t rm -f "$id" >/dev/null 2>&1; $CTR c rm "$id" >/dev/null 2>&1
    # The same `ctr task start -d` without a checkpoint: what containerd and ctr cost by
    # themselves.
    local t3 t4
    $CTR c create --runtime io.containerd.mig.v2 docker.io/library/memhog:bench "plain-$1" /memhog 1 >/dev/null 2>&1
    sync
    t3=$(now)
    $CTR t start -d "plain-$1" >/dev/null 2>&1
    t4=$(now)
    $CTR t kill -s KILL "plain-$1" >/dev/null 2>&1; sleep 0.3
    $CTR t rm -f "plain-$1" >/dev/null 2>&1; $CTR c rm "plain-$1" >/dev/null 2>&1
    echo "$(ms "$t0" "$t1") $(ms "$tr" "$t2") $(ms "$t3" "$t4")"
}

printf '\n%-8s %-6s %14s %10s %7s %14s %12s %7s %12s\n' "memory" "engine" "floor dump ms" "ckpt ms" "ratio" "floor rest ms" "restore ms" "ratio" "plain start ms"
for size in "${SIZES[@]}"; do
    fd=() fr=() md=() mr=() cr=()
    for _ in $(seq "$REPS"); do
        read -r a b < <(floor_run "$size"); fd+=("$a"); fr+=("$b")
        read -r a b c < <(mig_run "$size"); md+=("$a"); mr+=("$b"); cr+=("$c")
    done
    FD=$(median "${fd[@]}"); FR=$(median "${fr[@]}"); MD=$(median "${md[@]}"); MR=$(median "${mr[@]}")
    CR=$(median "${cr[@]}")
    printf '%-8s %-6s %14s %10s %7s %14s %12s %7s %12s\n' "${size}MiB" criu "$FD" "$MD" \
        "$(awk -v a="$MD" -v b="$FD" 'BEGIN{printf "%.2f", a/(b?b:1)}')" "$FR" "$MR" \
        "$(awk -v a="$MR" -v b="$FR" 'BEGIN{printf "%.2f", a/(b?b:1)}')" "$CR"
done
if command -v dmtcp_launch >/dev/null || [ -n "${MIG_DMTCP_DIR:-}" ]; then
    echo "(dmtcp: not in this table yet; see the notes)"
else
    echo "dmtcp: not installed here (no registry carries it); its row is skipped"
fi
