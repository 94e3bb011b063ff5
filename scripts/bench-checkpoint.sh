#!/usr/bin/env bash
# Checkpoint and restore times of the shim's engines (checkpoint on stop into the node's
# store, restore on create from it) next to the floor measured in the same run, by hand on the
# same program and memory size: for CRIU plain `runc checkpoint` / `runc restore`; for DMTCP
# (a `dmtcp` row per size, when DMTCP is installed: dmtcp_launch on PATH, or MIG_DMTCP_DIR
# set to its install dir) DMTCP run on the host, with the options the restore-hook uses, and
# for the restore the container it restores into (`runc run -d`; see below).
#
#   sudo scripts/bench-checkpoint.sh [SIZES_MIB...]      (default: 16 256 1024)
#
# Each row is the median of REPS runs (env REPS, default 3). The mig times are what a client
# sees through containerd: `ctr task kill` returning after the checkpoint; `ctr task start -d`
# of the container created again (`ctr container create`, not timed: the kubelet, and the
# migration server, create a container before they start it) until the restored task runs.
# So they include what containerd and ctr cost by themselves (a task: the shim started, its
# create and start calls); the "plain start" column measures that, a plain `ctr task start -d`
# of a new container of the same image, for comparison. The last two columns tell how much
# of it is containerd's own, with any runtime: a container of the same image started through
# containerd's own runc shim (`ctr task start -d`, runtime io.containerd.runc.v2, no checkpoint
# engine) next to the same container made by hand (`runc run -d`, as the floors make theirs),
# both until the command returns. Their difference is what the shim's figures pay and the
# floor's do not, whichever shim containerd runs. From 64 MiB of pages the shim restores CRIU
# checkpoints lazily (shim/src/lazy.rs, CriuLazyPages auto): the program runs again before its
# memory is all back, but `ctr task start` returns only once every page is in place, so the
# CRIU restore time here includes the whole fill, as the floor's eager `runc restore` does.
#
# Every timed step starts after a `sync`, for the floor and the shim alike: the shim makes a
# checkpoint for a stop durable right after the stop (in the background, see
# shim/src/writeback.rs), and a step should not pay for the previous one's disk writes.
#
# The dmtcp rows. DMTCP cannot wrap a static program, so they run memhog dynamically linked
# (scripts/bench/memhog-tickpath.c), in an image of its own with the libraries it needs, under
# the annotation mig.dev/engine=dmtcp (the container created again for the restore has it too:
# a checkpoint is restored by the engine that made it). The floor runs the same binary on the
# host with the restore-hook's DMTCP options (restore-hook/src/dmtcp.rs): a coordinator of its
# own (--ckptdir) on a listening socket made as the hook makes it (restore-hook/src/
# supervisor.rs, start_coordinator: on 127.0.0.1, with TCP_NODELAY, inherited as fd 821; without
# TCP_NODELAY DMTCP 4.2.0 waits 40 ms for a delayed ACK on most replies of its coordinator),
# `dmtcp_launch --join-coordinator --ckptdir --no-gzip --ckpt-signal SIGRTMAX-2`,
# `dmtcp_restart --join-coordinator --ckptdir IMAGES`.
#   - Checkpoint: `dmtcp_command -kc` (checkpoint, then end the program) until the checkpoint
#     is complete and the program gone. That command does not wait for the checkpoint in DMTCP
#     4.2.0, so the floor waits as the hook does for `ctr task kill` (restore-hook/src/
#     control.rs, checkpoint_stop): until the coordinator's restart script lists every image,
#     the program has exited and the coordinator counts no peer.
#   - Restore: by hand, a restore into a container is two steps: runc makes the container,
#     then `dmtcp_restart` restores the program in it. The floor is their sum, each measured
#     in the same run: `runc run -d` of a container of the DMTCP image (a bundle of the same
#     root, memhog touching 1 MiB) until runc returns, as CRIU's floor times `runc restore -d`
#     (which makes the container too), plus `dmtcp_restart` on the host. The table shows both
#     parts (the host restart alone is the "dmtcp_restart" column).
#     The restore is timed until the program runs again, i.e. its tick file changes, for the
#     floor (`dmtcp_restart` in the background) and the shim alike: `ctr task start -d` returns once
#     the restore-hook (the container's init) runs, before its `dmtcp_restart` has restored the
#     program. For the same reason the dmtcp row's plain start is timed until the new
#     container's tick file appears. These times include up to one tick (100 ms) of memhog's
#     sleep unless the restart cuts it short: a bias common to the floor and the shim.
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
    # Measuring subshells still running (the script was cut short): end them first, so that
    # none carries on against what is cleaned up below.
    for p in $(pgrep -P $$); do [ "$p" = "${CTR_PID:-}" ] || kill "$p" 2>/dev/null; done
    [ -n "${CTR_PID:-}" ] && { $CTR t ls -q 2>/dev/null | xargs -r -n1 $CTR t kill -s KILL; sleep 0.5; }
    for c in $($CTR c ls -q 2>/dev/null); do $CTR t rm -f "$c" >/dev/null 2>&1; $CTR c rm "$c" >/dev/null 2>&1; done
    [ -n "${CTR_PID:-}" ] && kill "$CTR_PID" && wait "$CTR_PID" 2>/dev/null
    runc --root "$W/runc" list -q 2>/dev/null | xargs -r -n1 runc --root "$W/runc" delete -f
    # DMTCP floor runs cut short: their computations, then their coordinators and programs.
    for d in "$W"/dmtcp-floor-*; do
        [ -f "$d/port" ] && "$DMTCP_DIR/bin/dmtcp_command" --coord-host 127.0.0.1 \
            --coord-port "$(cat "$d/port")" -k >/dev/null 2>&1
        [ -f "$d/pids" ] && xargs -r kill -KILL <"$d/pids" 2>/dev/null
    done
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

# DMTCP's install dir (MIG_DMTCP_DIR, else the one of the dmtcp_launch on PATH), if any. It is
# exported as MIG_DMTCP_DIR so that the shims of the node started below find it too.
DMTCP_DIR=${MIG_DMTCP_DIR:-}
if [ -z "$DMTCP_DIR" ] && command -v dmtcp_launch >/dev/null; then
    DMTCP_DIR=$(dirname "$(dirname "$(readlink -f "$(command -v dmtcp_launch)")")")
fi
if [ -n "$DMTCP_DIR" ]; then
    [ -x "$DMTCP_DIR/bin/dmtcp_launch" ] || { echo "bench-checkpoint.sh: no bin/dmtcp_launch in $DMTCP_DIR" >&2; exit 1; }
    export MIG_DMTCP_DIR=$DMTCP_DIR
    # The DMTCP image: memhog dynamically linked, with the libraries ldd lists at their paths.
    mkdir -p "$W/rootfs-dyn"
    gcc -O2 -o "$W/rootfs-dyn/memhog" "$ROOT/scripts/bench/memhog-tickpath.c"
    for lib in $(ldd "$W/rootfs-dyn/memhog" | grep -o '/[^ ]*'); do
        mkdir -p "$W/rootfs-dyn$(dirname "$lib")"
        cp -L "$lib" "$W/rootfs-dyn$lib"
    done
    oci_image "$W/rootfs-dyn" docker.io/library/memhog-dyn:bench '{"Cmd":["/memhog"]}' "$W/memhog-dyn.tar"
fi

# A private containerd whose shims are the ones just built, with its own state dir.
PATH="$ROOT/target/release:$PATH" start_node "$W"
CTR_PID=$NODE_PID
CTR="ctr -a $W/containerd.sock -n bench"
$CTR images import "$W/memhog.tar" >/dev/null
[ -z "$DMTCP_DIR" ] || $CTR images import "$W/memhog-dyn.tar" >/dev/null

floor_run() { # size -> "dump_ms restore_ms"
    local size=$1 b="$W/bundle-$1" id="floor-$1"
    rm -rf "$W/img-$1"
    floor_bundle "$b" "$W/rootfs/memhog" "$size"
    # stdout/stderr are pipes, as under a shim: CRIU cannot dump a host file the container
    # cannot see.
    runc --root "$W/runc" run -d --bundle "$b" "$id" </dev/null > >(cat >/dev/null) 2>&1
    for _ in $(seq 600); do [ -s "$b/rootfs/tick" ] && break; sleep 0.05; done
    sleep 0.3 # as for the shim's run
    local t0 t1 t2 t3
    sync
    t0=$(now)
    runc --root "$W/runc" checkpoint --image-path "$W/img-$1" --work-path "$W/work-$1" --tcp-established --file-locks "$id"
    t1=$(now)
    sync
    t2=$(now)
    runc --root "$W/runc" restore -d --image-path "$W/img-$1" --work-path "$W/work-$1" --tcp-established --file-locks --bundle "$b" "$id" </dev/null > >(cat >/dev/null) 2>&1
    t3=$(now)
    runc --root "$W/runc" delete -f "$id"
    rm -rf "$W/img-$1" "$W/work-$1"
    echo "$(ms "$t0" "$t1") $(ms "$t2" "$t3")"
}

# upper ID: the upper dir of container ID's snapshot (its key is the container's id).
upper() { $CTR snapshots mounts /mnt "$1" | grep -o 'upperdir=[^,]*' | cut -d= -f2; }

# wait_tick FILE [OLD]: waits (up to 30 s) until FILE holds a tick other than OLD, the file's
# content at the checkpoint: then a later one, else the program started afresh instead of
# being restored. memhog rewrites it every 100 ms (truncate, then one write): an empty read is
# no tick.
wait_tick() {
    local t
    for _ in $(seq 6000); do
        t=$(cat "$1" 2>/dev/null) || true
        if [ -n "$t" ] && [ "$t" != "${2:-}" ]; then
            if [ -n "${2:-}" ] && [ "${t%% *}" -le "${2%% *}" ]; then
                echo "bench-checkpoint.sh: $1 went from tick ${2%% *} to ${t%% *}: not restored" >&2
                return 1
            fi
            return 0
        fi
        sleep 0.005
    done
    echo "bench-checkpoint.sh: no new tick in $1 within 30 s" >&2
    return 1
}

mig_run() { # size engine -> "checkpoint_ms restore_ms plain_start_ms"
    local size=$1 engine=$2 id="mig-$2-$1" plain="plain-$2-$1" image=docker.io/library/memhog:bench
    local t0 t1 t2 up old
    local -a engine_annotation=()
    if [ "$engine" = dmtcp ]; then
        image=docker.io/library/memhog-dyn:bench
        engine_annotation=(--annotation mig.dev/engine=dmtcp)
    fi
    $CTR run -d --runtime io.containerd.mig.v2 --annotation mig.dev/checkpoint-on-stop=true \
        "${engine_annotation[@]}" "$image" "$id" /memhog "$size" >"$W/out-$id" 2>&1
    # memhog writes /tick once its memory is touched: wait for it in the container's upper dir.
    up=$(upper "$id")
    wait_tick "$up/tick"
    sleep 0.3
    sync
    t0=$(now)
    $CTR t kill -s SIGTERM "$id"
    t1=$(now)
    old=$(cat "$up/tick")
    $CTR t rm "$id" >/dev/null 2>&1 || true
    $CTR c rm "$id"
    $CTR c create --runtime io.containerd.mig.v2 "${engine_annotation[@]}" "$image" "$id" /memhog "$size" >/dev/null 2>&1
    up=$(upper "$id")
    sync
    local tr
    tr=$(now)
    $CTR t start -d "$id" >/dev/null 2>&1
    # DMTCP: the restore-hook's dmtcp_restart restores the program after `start` returned.
    [ "$engine" = criu ] || wait_tick "$up/tick" "$old"
    t2=$(now)
    $CTR t kill -s KILL "$id" >/dev/null 2>&1; sleep 0.3
    $CTR t rm -f "$id" >/dev/null 2>&1; $CTR c rm "$id" >/dev/null 2>&1
    # The same `ctr task start -d` without a checkpoint: what containerd and ctr cost by
    # themselves.
    local t3 t4
    $CTR c create --runtime io.containerd.mig.v2 "${engine_annotation[@]}" "$image" "$plain" /memhog 1 >/dev/null 2>&1
    up=$(upper "$plain")
    sync
    t3=$(now)
    $CTR t start -d "$plain" >/dev/null 2>&1
    [ "$engine" = criu ] || wait_tick "$up/tick"
    t4=$(now)
    $CTR t kill -s KILL "$plain" >/dev/null 2>&1; sleep 0.3
    $CTR t rm -f "$plain" >/dev/null 2>&1; $CTR c rm "$plain" >/dev/null 2>&1
    echo "$(ms "$t0" "$t1") $(ms "$tr" "$t2") $(ms "$t3" "$t4")"
}

# dmtcp_checkpoint_done DIR APP_PID PORT: the checkpoint in DIR is complete and its program
# gone, as the restore-hook decides it after `dmtcp_command -kc`: the coordinator's restart
# script lists as many images as it counts processes, the program has exited (a zombie of this
# shell counts as exited) and the coordinator counts no peer.
dmtcp_checkpoint_done() {
    local dir=$1 pid=$2 port=$3 script n files state
    script=$(compgen -G "$dir/dmtcp_restart_script_*.sh" | head -n1) || return 1
    n=$(sed -n 's/^# Number of processes in the computation = //p' "$script")
    files=$(sed -n 's/^given_ckpt_files="\(.*\)"$/\1/p' "$script" | wc -w)
    [ -n "$n" ] && [ "$n" -gt 0 ] && [ "$n" -eq "$files" ] || return 1
    if [ -e "/proc/$pid/stat" ]; then
        read -r _ _ state _ <"/proc/$pid/stat" || true
        [ "${state:-Z}" = Z ] || return 1
    fi
    "$DMTCP_DIR/bin/dmtcp_command" --coord-host 127.0.0.1 --coord-port "$port" -s 2>/dev/null |
        grep -q '^ *NUM_PEERS=0$'
}

# coordinator DIR: a DMTCP coordinator made ready to start as the restore-hook starts one
# (restore-hook/src/supervisor.rs, start_coordinator): its listening socket on 127.0.0.1, with
# TCP_NODELAY, inherited as fd 821. The socket is made and its port written to DIR/port (pid
# in COORD_PID) at once; the coordinator itself is exec'd when a line is written to the fifo
# DIR/go, so that a timed step pays for the coordinator's start as the hook's does, and not
# for Python's.
coordinator() {
    local d=$1
    rm -f "$d/port" "$d/port.tmp" "$d/go" && mkfifo "$d/go"
    python3 -c '
import os, socket, sys
s = socket.socket()
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.bind(("127.0.0.1", 0))
s.listen(128)
os.dup2(s.fileno(), 821)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(s.getsockname()[1]))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
with open(sys.argv[2]) as go:
    go.readline()
os.execv(sys.argv[3], sys.argv[3:])' "$d/port" "$d/go" "$DMTCP_DIR/bin/dmtcp_coordinator" \
        --port-file "$d/port.coordinator" --ckptdir "$d/ckpt" -q </dev/null >>"$d/coordinator.log" 2>&1 &
    COORD_PID=$!
    echo "$COORD_PID" >>"$d/pids"
    for _ in $(seq 200); do [ -s "$d/port" ] && return 0; sleep 0.05; done
    echo "bench-checkpoint.sh: no DMTCP coordinator port in $d/port" >&2
    return 1
}

dmtcp_floor_run() { # size -> "checkpoint_ms restore_ms(container+restart) restart_ms"
    local size=$1 d="$W/dmtcp-floor-$1" bin="$DMTCP_DIR/bin" port coord app t0 t1 t2 old
    rm -rf "$d" && mkdir -p "$d/ckpt" "$d/tmp"
    # The restore-hook's environment and options (restore-hook/src/dmtcp.rs).
    export DMTCP_TMPDIR="$d/tmp" MEMHOG_TICK="$d/tick"
    local -a join=(--join-coordinator --coord-host 127.0.0.1 --coord-port)
    coordinator "$d" && coord=$COORD_PID && port=$(cat "$d/port") && echo go >"$d/go"
    "$bin/dmtcp_launch" "${join[@]}" "$port" --ckptdir "$d/ckpt" --no-gzip \
        --ckpt-signal $(($(kill -l SIGRTMAX) - 2)) "$W/rootfs-dyn/memhog" "$size" \
        </dev/null >"$d/app.log" 2>&1 &
    app=$!
    echo "$app" >>"$d/pids"
    wait_tick "$d/tick"
    sleep 0.3 # as for the shim's run
    sync
    t0=$(now)
    # DMTCP 4.2.0's `-kc` exits 2 with "Computation was checkpointed and killed" when all is
    # well (restore-hook/src/control.rs), before the checkpoint is done.
    "$bin/dmtcp_command" --coord-host 127.0.0.1 --coord-port "$port" -kc >"$d/kc.out" 2>&1 ||
        grep -q "checkpointed and killed" "$d/kc.out" || { cat "$d/kc.out" >&2; return 1; }
    local pause=0.005 deadline=$(($(date +%s) + 300))
    until dmtcp_checkpoint_done "$d/ckpt" "$app" "$port"; do
        [ "$(date +%s)" -lt "$deadline" ] || { echo "bench-checkpoint.sh: DMTCP checkpoint in $d not done within 300 s" >&2; return 1; }
        sleep "$pause"
        pause=$(awk -v p="$pause" 'BEGIN{print (p * 2 < 0.05 ? p * 2 : 0.05)}')
    done
    t1=$(now)
    wait "$app" 2>/dev/null || true
    old=$(cat "$d/tick")
    # A restore runs in a new container, with a coordinator of its own: this one goes, and
    # the restore starts a new one as the hook does, the coordinator and dmtcp_restart at once.
    kill -KILL "$coord" 2>/dev/null || true
    wait "$coord" 2>/dev/null || true
    coordinator "$d" && coord=$COORD_PID && port=$(cat "$d/port")
    sync
    local tr
    tr=$(now)
    echo go >"$d/go"
    "$bin/dmtcp_restart" "${join[@]}" "$port" --ckptdir "$d/ckpt" "$d"/ckpt/ckpt_*.dmtcp \
        </dev/null >"$d/restart.log" 2>&1 &
    app=$!
    echo "$app" >>"$d/pids"
    wait_tick "$d/tick" "$old"
    t2=$(now)
    "$bin/dmtcp_command" --coord-host 127.0.0.1 --coord-port "$port" -k >/dev/null 2>&1 || true
    kill -KILL "$app" "$coord" 2>/dev/null || true
    wait "$app" "$coord" 2>/dev/null || true
    rm -rf "$d"
    # The container a restore needs: `runc run -d` of the same root, as CRIU's floor makes
    # its container in `runc restore -d`.
    local run
    run=$(runc_run_ms "$W/rootfs-dyn" "floor-dyn-$size")
    echo "$(ms "$t0" "$t1") $(( $(ms "$tr" "$t2") + run )) $(ms "$tr" "$t2")"
}

# runc_run_ms ROOT ID -> ms: `runc run -d` of a container ID whose root is a copy of ROOT
# (memhog touching 1 MiB), until runc returns; the container is removed afterwards.
runc_run_ms() {
    local root=$1 id=$2 b="$W/bundle-$2" t0 t1
    floor_bundle "$b" "$root/memhog" 1
    cp -a "$root/." "$b/rootfs/"
    sync
    t0=$(now)
    runc --root "$W/runc" run -d --bundle "$b" "$id" </dev/null > >(cat >/dev/null) 2>&1
    t1=$(now)
    runc --root "$W/runc" delete -f "$id"
    rm -rf "$b"
    ms "$t0" "$t1"
}

# baseline_run ENGINE -> "runc_run_ms runc_v2_start_ms": a container of ENGINE's image (memhog
# touching 1 MiB, no checkpoint engine) made by hand with `runc run -d`, and started through
# containerd's own runc shim with `ctr task start -d`, each until its command returns.
baseline_run() {
    local engine=$1 root=$W/rootfs image=docker.io/library/memhog:bench id="base-$1" run t2 t3
    if [ "$engine" = dmtcp ]; then root=$W/rootfs-dyn image=docker.io/library/memhog-dyn:bench; fi
    run=$(runc_run_ms "$root" "$id")
    $CTR c create --runtime io.containerd.runc.v2 "$image" "$id" /memhog 1 >/dev/null 2>&1
    sync
    t2=$(now)
    $CTR t start -d "$id" >/dev/null 2>&1
    t3=$(now)
    $CTR t kill -s KILL "$id" >/dev/null 2>&1; sleep 0.3
    $CTR t rm -f "$id" >/dev/null 2>&1; $CTR c rm "$id" >/dev/null 2>&1
    echo "$run $(ms "$t2" "$t3")"
}

row() { # size engine floor_dump ckpt floor_restore restore plain_start dmtcp_restart runc_run runc_v2
    printf '%-8s %-6s %14s %10s %7s %14s %12s %7s %12s %14s %12s %16s\n' "${1}MiB" "$2" "$3" "$4" \
        "$(awk -v a="$4" -v b="$3" 'BEGIN{printf "%.2f", a/(b?b:1)}')" "$5" "$6" \
        "$(awk -v a="$6" -v b="$5" 'BEGIN{printf "%.2f", a/(b?b:1)}')" "$7" "$8" "$9" "${10}"
}

printf '\n%-8s %-6s %14s %10s %7s %14s %12s %7s %12s %14s %12s %16s\n' "memory" "engine" "floor dump ms" "ckpt ms" "ratio" "floor rest ms" "restore ms" "ratio" "plain start ms" "dmtcp_restart" "runc run ms" "runc.v2 start ms"
ENGINES=(criu)
[ -z "$DMTCP_DIR" ] || ENGINES+=(dmtcp)
for size in "${SIZES[@]}"; do
    for engine in "${ENGINES[@]}"; do
        fd=() fr=() md=() mr=() cr=() hr=() br=() bs=()
        warm_memory "$size"
        for rep in $(seq "$REPS"); do
            # Odd runs measure the floor first, even ones the shim (see warm_memory in
            # lib/nodes.sh).
            for step in $( ((rep % 2)) && echo floor mig || echo mig floor); do
                if [ "$step" = floor ] && [ "$engine" = criu ]; then
                    read -r a b < <(floor_run "$size"); fd+=("$a"); fr+=("$b")
                elif [ "$step" = floor ]; then
                    read -r a b c < <(dmtcp_floor_run "$size"); fd+=("$a"); fr+=("$b"); hr+=("$c")
                else
                    read -r a b c < <(mig_run "$size" "$engine"); md+=("$a"); mr+=("$b"); cr+=("$c")
                    read -r a b < <(baseline_run "$engine"); br+=("$a"); bs+=("$b")
                fi
            done
        done
        row "$size" "$engine" "$(median "${fd[@]}")" "$(median "${md[@]}")" "$(median "${fr[@]}")" \
            "$(median "${mr[@]}")" "$(median "${cr[@]}")" "$( ((${#hr[@]})) && median "${hr[@]}" || echo -)" \
            "$(median "${br[@]}")" "$(median "${bs[@]}")"
    done
done
[ -n "$DMTCP_DIR" ] || echo "dmtcp: not installed here (no registry carries it); its row is skipped"
