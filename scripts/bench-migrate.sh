#!/usr/bin/env bash
# Rough benchmark of mig-server migrations (ROUGH: see "Limits" below).
#
# For apps holding 16 MiB, 256 MiB and 1 GiB it prints:
#   - downtime seen by a client polling the workload every 10 ms (the app's /count file read
#     through `ctr tasks exec` on whichever node runs it), and the migration record's downtime;
#   - the floor measured in the same run: `ctr tasks checkpoint`-free, by hand
#     (runc checkpoint to disk + cp + runc restore are what the shim does, so the floor here is
#     the migration's own checkpoint + restore phase durations without the transfer);
#   - transfer throughput (checkpoint bytes / transferring phase) next to `zstd -1 | cat` of
#     the same bytes.
# Limits: runs on one machine (two private containerd via the mig-e2e harness is not scripted
# here): it needs two running node agents + controller (see server/README.md) and the app
# container `bench-<size>` already running on NODE_A with the mig runtime, e.g.
#   ctr -a $A_SOCK -n $NS run -d --null-io --runtime io.containerd.mig.v2 \
#     --label mig.dev/workload=bench-16 IMAGE bench-16 sh -c 'head -c 16M /dev/urandom > /dev/shm/x; i=0; while :; do i=$((i+1)); echo $i > /count; sleep 0.01; done'
# (/dev/shm inside the container counts as memory held by the app).
set -euo pipefail

SERVER=${MIG_SERVER:-http://127.0.0.1:7070}
NODE_A=${NODE_A:-node01}
NODE_B=${NODE_B:-node02}
A_SOCK=${A_SOCK:?containerd socket of node A}
B_SOCK=${B_SOCK:?containerd socket of node B}
NS=${NS:-default}
BIN=${MIG_SERVER_BIN:-$(dirname "$0")/../target/release/mig-server}
: "${MIG_TOKEN:?set MIG_TOKEN (or MIG_TOKEN_FILE)}"

poll_downtime() { # $1=container id; prints the longest gap (ms) between successful reads
  local id=$1 last=$(date +%s%N) gap=0 now
  while [ -e "$STOP" ]; do
    if ctr -a "$A_SOCK" -n "$NS" tasks exec --exec-id p$RANDOM "$id" cat /count >/dev/null 2>&1 ||
       ctr -a "$B_SOCK" -n "$NS" tasks exec --exec-id p$RANDOM "$id" cat /count >/dev/null 2>&1; then
      now=$(date +%s%N); (( (now-last)/1000000 > gap )) && gap=$(( (now-last)/1000000 )); last=$now
    fi
    sleep 0.01
  done
  echo "$gap"
}

printf '%-8s %12s %12s %12s %14s %14s\n' SIZE CLIENT_MS RECORD_MS FLOOR_MS XFER_MB/S ZSTD_MB/S
for size in 16 256 1024; do
  id=bench-$size
  STOP=$(mktemp); export STOP
  poll_downtime "$id" > "$STOP.out" &
  poller=$!
  out=$("$BIN" migrate --deployment "$id" --from "$NODE_A" --to "$NODE_B" --server "$SERVER" 2>/dev/null || true)
  rm -f "$STOP"; wait "$poller" || true
  mid=$(echo "$out" | awk '/accepted/{print $2; exit}')
  rec=$(curl -s "$SERVER/migrations/$mid")
  field() { echo "$rec" | python3 -c "import json,sys; m=json.load(sys.stdin); print($1)"; }
  down=$(field "m.get('downtimeMs')")
  floor=$(field "sum(t['duration_ms'] or 0 for t in m['timings'] if t['phase'] in ('checkpointing','restoring'))")
  xfer=$(field "round(m['checkpointBytes']/1e6/max(1e-3,[t['duration_ms'] for t in m['timings'] if t['phase']=='transferring'][0]/1e3),1)")
  # zstd baseline on the same amount of incompressible bytes (the app's memory is random).
  t0=$(date +%s%N); head -c "${size}M" /dev/urandom > /tmp/bench-$$.bin; t1=$(date +%s%N)
  t1=$(date +%s%N); zstd -1 -c /tmp/bench-$$.bin | cat > /dev/null; t2=$(date +%s%N)
  zs=$(python3 -c "print(round($size*1.048576/max(1e-3,($t2-$t1)/1e9),1))")
  rm -f /tmp/bench-$$.bin
  printf '%-8s %12s %12s %12s %14s %14s\n' "${size}MiB" "$(cat "$STOP.out")" "$down" "$floor" "$xfer" "$zs"
  rm -f "$STOP.out"
  # Move it back for the next run.
  "$BIN" migrate --deployment "$id" --from "$NODE_B" --to "$NODE_A" --server "$SERVER" >/dev/null 2>&1 || true
done
