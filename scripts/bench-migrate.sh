#!/usr/bin/env bash
# Migration downtime and throughput of `mig-server migrate` (issue 4), next to the floor
# measured in the same run.
#
#   sudo scripts/bench-migrate.sh [SIZES_MIB...]      (default: 16 256 1024; env REPS, default 1)
#
# Setup (as scripts/demo.sh, on this machine only): two containerd "nodes", each with a
# mig-server agent in its own network namespace (10.231.8.1 runs the controller too,
# 10.231.8.2; a veth pair between them). The workload is scripts/bench/memhog.c (N MiB of
# incompressible memory), built static as /bmhog (a name of its own, so the client below finds
# only this run's process) into an image of its own, with its tick period cut
# from 100 ms to 10 ms (on a copy of the source) so the tick itself does not blur a 10 ms
# measurement. Each row is the median of REPS runs; every run uses a fresh container.
#
# Columns:
#   client ms   downtime seen by a client polling every 10 ms: the workload's /tick read through
#               the root of the running task (/proc/<origin pid>/root/tick, and that of any
#               bmhog process created after the poller started: the one the destination node
#               restored; older ones, e.g. a floor run's zombie, are ignored). Downtime = last
#               time the origin's tick was seen to change -> first time the destination's tick
#               differs from the last
#               value seen on the origin. Resolution: poll 10 ms + tick 10 ms, so it
#               overstates by up to ~20 ms. It is measured from outside the agents and
#               containerd, so it includes everything they do.
#   froze at / ran at   when the client saw the last origin tick / the first destination tick,
#               in ms from the migration's creation (createdUnixMs): where the gap sits in it.
#   record ms   the migration record's own `downtimeMs` (GET /migrations/{id}: start of the
#               checkpointing phase -> done), then its phase durations: ckpt (the origin agent
#               marks the workload and stops it; the shim checkpoints on stop), xfer (the
#               zstd stream from store to store, sha256 checked, after the checkpoint: the
#               stream starts with the checkpoint and sends CRIU's page images while they are
#               written, so this is only its tail), restore (the destination starts the task
#               it created ahead, which restores at start). From 64 MiB of pages the shim
#               restores lazily (shim/src/lazy.rs): the workload runs again before its memory
#               is all back, and the start, so the restore phase and the record's downtime,
#               ends once every page is in place; the client column sees the resume itself.
#   live %      share of the checkpoint's bytes sent while the origin was still checkpointing
#               (the record's bytesSentWhileCheckpointing / checkpointBytes).
#   floor       by hand on the same binary and memory size, no containerd, no agents: `runc
#               checkpoint` to disk + `cp -r` of the images dir + `runc restore` from the
#               copy, and their sum, with runc's and CRIU's defaults. The shim differs in one
#               setting: CRIU locks the network with nftables where it can (CriuNetworkLock
#               auto), not with the iptables programs, which takes ~40 ms off the restore and
#               some off the dump at 16 MiB; MIG_CRIU_NETWORK_LOCK=iptables in this script's
#               environment (it reaches the shims) makes the migration like for like.
#               The floor writes its images to disk, as the issue defines it; the migration
#               writes its checkpoint into each node's store in memory where there is room
#               (README, "Checkpoints in memory"): MIG_MEMORY_DIR=off in this script's
#               environment (it reaches the shims and the agents) writes it to disk too.
#   CPU s       CPU time (user + system) from the migrate command's start to its end (the
#               restore's lazy page copy included): agent1 and agent2 the mig-server processes of
#               node01 (origin, and the controller) and node02 (destination); all the whole
#               machine's (CRIU, shims, containerd, agents, the client; out of nproc x the
#               migration's duration). What a change saves shows here first: on 2 shared cores
#               the downtime of a large migration is bound by CPU, not by the network or memory.
#   MiB/s       xfer: checkpoint bytes (uncompressed) / (ckpt + xfer), the stream's whole
#               life, as it overlaps the dump: a lower bound of its throughput; zstd: `zstd -1 -T1`
#               over the floor checkpoint's pages-*.img (the same kind of bytes), from page
#               cache into `cat >/dev/null`. mig-server compresses with zstd level 1
#               (--zstd-level, default 1) on one thread, one frame per MiB, and stores a MiB
#               whose sample does not compress (server/src/zframes.rs; memhog's pages never
#               do), so it can outrun `zstd -1 -T1`, which is the like-for-like reference.
#               The stream alone, without containerd or a network:
#               `cargo run --release -p mig-server --example stream-throughput`.
# Every timed step (the floor's dump, the migration) starts after a `sync`: a step must not pay
# for the previous one's disk writes. Without it the floor's 2-3 GiB of images and copies at
# 1 GiB were still dirty when the migration began, and the kernel throttled the migration's
# writes while it wrote them back (this VM's disk does ~100-200 MB/s): 1 GiB transfers took
# 6-8 s instead of 1-3 s.
# Goals (issue 4): 16 MiB downtime <= 0.25 s, 1 GiB <= 1.5 s, never worse than the floor.
# Raw per-run values go to the log named at the end (kept with KEEP=1).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/nodes.sh
source "$ROOT/scripts/lib/nodes.sh"
SIZES=("${@:-16 256 1024}")
read -r -a SIZES <<<"${SIZES[*]}"
REPS=${REPS:-1}
[ "$(id -u)" -eq 0 ] || { echo "bench-migrate.sh: run as root (it starts containerd)" >&2; exit 1; }
for bin in containerd ctr runc criu containerd-shim-mig-v2 mig-server gcc zstd curl python3; do
    command -v "$bin" >/dev/null || { echo "bench-migrate.sh: $bin not found: run scripts/setup.sh first" >&2; exit 1; }
done

W=$(mktemp -d /tmp/mig-bench-migrate-XXXXXX)
NS=bench
NET1=mig-bm-1 NET2=mig-bm-2
SERVER=http://10.231.8.1:7070
POLLER=
cleanup() {
    set +e
    [ -n "$POLLER" ] && kill "$POLLER" 2>/dev/null
    for n in 1 2; do
        [ -S "$W/node0$n/containerd.sock" ] || continue
        c="ctr -a $W/node0$n/containerd.sock -n $NS"
        for t in $($c t ls -q 2>/dev/null); do $c t kill -s KILL "$t" 2>/dev/null; done
        sleep 0.5
        for t in $($c c ls -q 2>/dev/null); do $c t rm -f "$t" >/dev/null 2>&1; $c c rm "$t" >/dev/null 2>&1; done
    done
    runc --root "$W/runc" list -q 2>/dev/null | xargs -r -n1 runc --root "$W/runc" delete -f
    for p in $(jobs -p); do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    ip netns del "$NET1" 2>/dev/null; ip netns del "$NET2" 2>/dev/null
    grep -o " ${W}[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l
    if [ -n "${KEEP:-}" ]; then echo "kept $W"; else rm -rf "$W"; fi
    for n in 1 2; do rm -rf "$(memory_dir "$W/node0$n/mig")"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM
now() { date +%s%N; }
ms() { echo $(( ($2 - $1) / 1000000 )); }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
log() { echo "$*" >>"$W/runs.log"; }

# The image: memhog alone (10 ms tick), as an OCI layout (no registry here).
mkdir -p "$W/rootfs"
sed 's/{0, 100000000}/{0, 10000000}/' "$ROOT/scripts/bench/memhog.c" >"$W/memhog.c"
grep -q '{0, 10000000}' "$W/memhog.c" || { echo "bench-migrate.sh: could not set memhog's tick to 10 ms" >&2; exit 1; }
gcc -O2 -static -o "$W/rootfs/bmhog" "$W/memhog.c"
oci_image "$W/rootfs" docker.io/library/memhog:bench-migrate '{"Cmd":["/bmhog"]}' "$W/memhog.tar"

# Two containerd nodes, two agents in their own network namespaces.
umask 077; head -c 32 /dev/urandom | base64 >"$W/token"; umask 022
export MIG_TOKEN_FILE=$W/token
for n in 1 2; do
    start_node "$W/node0$n"
    ctr -a "$W/node0$n/containerd.sock" -n $NS images import "$W/memhog.tar" >/dev/null
done
veth_pair "$NET1" "$NET2" mig-bm-a mig-bm-b 10.231.8
start_agents "$W" "$NS" "$NET1" "$NET2" 10.231.8 ||
    { echo "bench-migrate.sh: the node agents did not register" >&2; exit 1; }
AGENT1=$(pgrep -f -x "mig-server serve --role all .*--state-dir $W/node01/mig .*")
AGENT2=$(pgrep -f -x "mig-server serve --role node .*--state-dir $W/node02/mig .*")
[ -n "$AGENT1" ] && [ -n "$AGENT2" ] || { echo "bench-migrate.sh: cannot find the agents' processes" >&2; exit 1; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }     # user + system, all threads
busy_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; } # the machine's
A="ctr -a $W/node01/containerd.sock -n $NS"
B="ctr -a $W/node02/containerd.sock -n $NS"

floor_run() { # size -> "dump_ms cp_ms restore_ms zstd_mibps"
    local size=$1 b="$W/bundle-$1" id="floor-$1" t0 t1 t2 t3 t4 t5 bytes
    rm -rf "$W/img" "$W/img-copy" "$W/work"
    floor_bundle "$b" "$W/rootfs/bmhog" "$size"
    # stdout/stderr are pipes, as under a shim.
    runc --root "$W/runc" run -d --bundle "$b" "$id" </dev/null > >(cat >/dev/null) 2>&1
    for _ in $(seq 600); do [ -s "$b/rootfs/tick" ] && break; sleep 0.05; done
    sleep 0.3
    sync
    t0=$(now)
    runc --root "$W/runc" checkpoint --image-path "$W/img" --work-path "$W/work" --tcp-established --file-locks "$id"
    t1=$(now)
    cp -r "$W/img" "$W/img-copy"
    t2=$(now)
    runc --root "$W/runc" restore -d --image-path "$W/img-copy" --work-path "$W/work" --tcp-established --file-locks --bundle "$b" "$id" </dev/null > >(cat >/dev/null) 2>&1
    t3=$(now)
    runc --root "$W/runc" delete -f "$id"
    # The compression baseline on the memory pages of this checkpoint.
    cat "$W"/img/pages-*.img >"$W/pages.bin"
    bytes=$(stat -c%s "$W/pages.bin")
    cat "$W/pages.bin" >/dev/null
    t4=$(now)
    zstd -q -1 -T1 <"$W/pages.bin" | cat >/dev/null
    t5=$(now)
    rm -rf "$W/img" "$W/img-copy" "$W/work" "$W/pages.bin" "$b"
    echo "$(ms "$t0" "$t1") $(ms "$t1" "$t2") $(ms "$t2" "$t3") $(awk -v b="$bytes" -v n=$((t5 - t4)) 'BEGIN{printf "%.0f", b/1048576/(n/1e9)}')" >"$W/res"
}

# The client: polls every 10 ms; prints "last_origin_advance first_dest_advance" (unix seconds).
cat >"$W/poll.py" <<'PY'
import os, sys, time
opid, out = sys.argv[1], sys.argv[2]
def tick(pid):
    try:
        with open(f"/proc/{pid}/root/tick") as f:
            return f.read()
    except OSError:
        return None
def started(pid):
    """Start time of a process, in clock ticks since boot."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])
born = started("self")
seen, found = {opid}, []
def restored():
    """bmhog processes created after this poller: the restored one among them. Processes of
    earlier runs (the floor's, a zombie its init has not reaped yet) are older. A process older
    than the poller is looked at once: the client must not take the CPU the migration runs on
    (reading every process's comm each 10 ms took ~15% of a core). Younger ones are looked at
    until they are bmhog: CRIU's restore names its process only at the end."""
    for p in os.listdir("/proc"):
        if p.isdigit() and p not in seen:
            try:
                if started(p) < born:
                    seen.add(p)
                    continue
                with open(f"/proc/{p}/comm") as f:
                    if f.read().strip() == "bmhog":
                        seen.add(p)
                        found.append(p)
            except (OSError, ValueError, IndexError):
                pass
    return found
# The origin's tick is followed for as long as it can be read (CRIU's dump may hide its root
# for a moment without ending it). The destination is the process created after this poller
# whose tick is readable and differs from the last one the origin wrote.
last = tick(opid); last_adv = time.time(); deadline = time.time() + 600
while time.time() < deadline:
    t = time.time()
    v = tick(opid)
    if v is not None and v != last:
        last, last_adv = v, t
    for p in restored():
        v = tick(p)
        if v is not None and v != last:
            open(out, "w").write(f"{last_adv:.3f} {t:.3f}\n")
            sys.exit(0)
    time.sleep(max(0.0, 0.010 - (time.time() - t)))
sys.exit(1)
PY

mig_run() { # size rep -> "client_ms record_ms ckpt_ms xfer_ms restore_ms xfer_mibps stop_at run_at live_pct"
    local size=$1 id="hog-$1-$2" pid out mid rec
    $A run -d --runtime io.containerd.mig.v2 --label mig.dev/workload="$id" \
        docker.io/library/memhog:bench-migrate "$id" /bmhog "$size" >"$W/out-$id" 2>&1
    pid=$($A t ls | awk -v id="$id" '$1==id{print $2}')
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = bmhog ] || pid=$(pgrep -n -x bmhog)
    for _ in $(seq 600); do [ -s "/proc/$pid/root/tick" ] && break; sleep 0.05; done
    sleep 0.5
    sync
    python3 "$W/poll.py" "$pid" "$W/client-$id" &
    POLLER=$!
    sleep 0.2
    local cpu0 cpu1
    cpu0="$(cpu_ticks "$AGENT1") $(cpu_ticks "$AGENT2") $(busy_ticks)"
    out=$(ip netns exec "$NET1" mig-server migrate ${POST_COPY:+--post-copy} --deployment "$id" --from node01 --to node02 --server $SERVER 2>&1) ||
        { echo "bench-migrate.sh: migration of $id failed:" >&2; echo "$out" >&2; exit 1; }
    cpu1="$(cpu_ticks "$AGENT1") $(cpu_ticks "$AGENT2") $(busy_ticks)"
    wait "$POLLER" || { echo "bench-migrate.sh: the client never saw $id tick on node02" >&2; exit 1; }
    POLLER=
    mid=$(echo "$out" | awk '/accepted/{print $2; exit}')
    rec=$(ip netns exec "$NET1" curl -sf "$SERVER/migrations/$mid")
    log "size=$size rep=$2 client=$(cat "$W/client-$id") cpu_ticks=$cpu0/$cpu1 record=$rec"
    python3 - "$W/client-$id" "$rec" "$cpu0" "$cpu1" "$(getconf CLK_TCK)" >"$W/res" <<'PY'
import json, sys
a, b = map(float, open(sys.argv[1]).read().split())
m = json.loads(sys.argv[2])
hz = int(sys.argv[5])
cpu = [(int(y) - int(x)) / hz for x, y in zip(sys.argv[3].split(), sys.argv[4].split())]
assert m["phase"] == "done", m["phase"]
d = {t["phase"]: t["duration_ms"] or 0 for t in m["timings"]}
x = d.get("transferring", 0)
streaming = d.get("checkpointing", 0) + x
live = m.get("bytesSentWhileCheckpointing", 0)
print(round((b - a) * 1000), m["downtimeMs"], d.get("checkpointing", 0), x, d.get("restoring", 0),
      round(m["checkpointBytes"] / 1048576 / max(streaming, 1) * 1000),
      round(a * 1000 - m["createdUnixMs"]), round(b * 1000 - m["createdUnixMs"]),
      round(100 * live / max(m["checkpointBytes"], 1)),
      "/".join("memory" if m.get("checkpointInMemory", {}).get(n) else "disk"
               for n in ("origin", "destination")),
      *(f"{c:.1f}" for c in cpu))
PY
    $B t kill -s KILL "$id" >/dev/null 2>&1 || true; sleep 0.3
    for c in "$A" "$B"; do $c t rm -f "$id" >/dev/null 2>&1 || true; $c c rm "$id" >/dev/null 2>&1 || true; done
    rm -rf "$W"/node0*/mig/checkpoints/* 2>/dev/null || true
    for n in 1 2; do rm -rf "$(memory_dir "$W/node0$n/mig")"/* 2>/dev/null || true; done
}

HDR='%-7s | %9s %6s %6s | %9s %7s %7s %7s %6s | %7s %5s %7s %7s | %6s %6s | %6s %6s %6s | %s\n'
ROWS=() STORES=()
for size in "${SIZES[@]}"; do
    cl=() co=() cd=() cm=() sa=() ra=() rd=() ck=() xf=() rs=() xt=() lv=() fd=() fc=() fr=() fz=() fs=() st=()
    warm_memory "$size"
    for rep in $(seq "$REPS"); do
        # Odd runs measure the floor first, even ones the migration (see warm_memory).
        for step in $( ((rep % 2)) && echo floor mig || echo mig floor); do
            if [ "$step" = floor ]; then
                floor_run "$size"; read -r a b c d <"$W/res"
                fd+=("$a"); fc+=("$b"); fr+=("$c"); fz+=("$d"); fs+=($((a + b + c)))
                log "size=$size rep=$rep floor dump=$a cp=$b restore=$c zstd_mibps=$d"
            else
                mig_run "$size" "$rep"; read -r a b c d e f g h i j k l m <"$W/res"
                cl+=("$a"); rd+=("$b"); ck+=("$c"); xf+=("$d"); rs+=("$e"); xt+=("$f"); sa+=("$g"); ra+=("$h"); lv+=("$i"); st+=("$j")
                co+=("$k"); cd+=("$l"); cm+=("$m")
            fi
        done
    done
    CL=$(median "${cl[@]}") FS=$(median "${fs[@]}")
    goals=()
    [ "$size" = 16 ] && goals+=("<=250ms: $([ "$CL" -le 250 ] && echo met || echo NOT met)")
    [ "$size" = 1024 ] && goals+=("<=1500ms: $([ "$CL" -le 1500 ] && echo met || echo NOT met)")
    goals+=("<=floor: $([ "$CL" -le "$FS" ] && echo met || echo NOT met)")
    ROWS+=("$(printf "$HDR" "${size}MiB" "$CL" "$(median "${sa[@]}")" "$(median "${ra[@]}")" "$(median "${rd[@]}")" "$(median "${ck[@]}")" \
        "$(median "${xf[@]}")" "$(median "${rs[@]}")" "$(median "${lv[@]}")" "$(median "${fd[@]}")" "$(median "${fc[@]}")" \
        "$(median "${fr[@]}")" "$FS" "$(median "${xt[@]}")" "$(median "${fz[@]}")" \
        "$(median "${co[@]}")" "$(median "${cd[@]}")" "$(median "${cm[@]}")" "${goals[*]}")")
    STORES+=("${size}MiB $(printf '%s\n' "${st[@]}" | sort | uniq -c | awk '{printf "%s x%s ", $2, $1}')")
done
echo
echo "bench-migrate: $(nproc) cores, REPS=$REPS, times in ms (median), MiB/s of uncompressed bytes"
printf "$HDR" "" "client" "froze" "ran" "record" "" "" "" "" "floor" "" "" "" "MiB/s" "" "CPU s" "" "" ""
printf "$HDR" "memory" "downtime" "at" "at" "downtime" "ckpt" "xfer" "restore" "live %" "dump" "cp" "restore" "sum" "xfer" "zstd" "agent1" "agent2" "all" "goals"
printf '%s\n' "${ROWS[@]}"
echo "checkpoints written (origin/destination; README \"Checkpoints in memory\"): $(IFS=';'; echo "${STORES[*]}")"
echo "raw runs: $W/runs.log$([ -n "${KEEP:-}" ] || echo ' (removed at exit; KEEP=1 keeps it)')"
[ -n "${KEEP:-}" ] || cat "$W/runs.log" >&2
