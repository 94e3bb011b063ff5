#!/usr/bin/env bash
# The main job: a real migration, shown. Run after scripts/setup.sh, as root.
#
# Two "nodes" on this machine: two containerd instances, each with its own state dir, and a
# mig-server agent for each in its own network namespace (10.231.9.1 and 10.231.9.2 on a veth
# pair; nothing outside this machine is ever contacted). node01's agent also runs the controller.
# A counter runs on node01 under the mig runtime; `mig-server migrate` moves it to node02, where
# it goes on counting from where it stopped, with the file it wrote to its root filesystem.
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "demo.sh: run as root (it starts containerd)" >&2; exit 1; }
for bin in containerd ctr runc criu containerd-shim-mig-v2 mig-server busybox; do
    command -v "$bin" >/dev/null || { echo "demo.sh: $bin not found: run scripts/setup.sh first" >&2; exit 1; }
done

# shellcheck source=lib/nodes.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/nodes.sh"
W=$(mktemp -d /tmp/mig-demo-XXXXXX)
NS=demo
NET1=mig-demo-1 NET2=mig-demo-2
say() { printf '\n\033[1;34m==> %s\033[0m\n' "$*"; }
cleanup() {
    set +e
    for n in 1 2; do
        c="ctr -a $W/node0$n/containerd.sock -n $NS"
        for t in $($c t ls -q 2>/dev/null); do $c t kill -s KILL "$t"; done
        sleep 0.5
        for t in $($c c ls -q 2>/dev/null); do $c t rm -f "$t" >/dev/null 2>&1; $c c rm "$t" >/dev/null 2>&1; done
    done
    kill $(jobs -p) 2>/dev/null; wait 2>/dev/null
    ip netns del "$NET1" 2>/dev/null; ip netns del "$NET2" 2>/dev/null
    grep -o " ${W}[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l
    [ -n "${KEEP:-}" ] && echo "kept $W" || rm -rf "$W"
    for n in 1 2; do rm -rf "$(memory_dir "$W/node0$n/mig")"; done
}
trap cleanup EXIT

# A secret for this run only: the agents and the CLI authenticate with it.
umask 077
head -c 32 /dev/urandom | base64 >"$W/token"
umask 022
export MIG_TOKEN_FILE=$W/token

say "building a busybox image (no registry here)"
mkdir -p "$W/img/rootfs/bin"
cp "$(command -v busybox)" "$W/img/rootfs/bin/busybox"
for c in sh echo sleep cat; do ln -s busybox "$W/img/rootfs/bin/$c"; done
oci_image "$W/img/rootfs" docker.io/library/mig-demo:1 '{"Env":["PATH=/bin"],"Cmd":["sh"]}' "$W/image.tar"

say "starting two containerd nodes"
for n in 1 2; do
    start_node "$W/node0$n"
    ctr -a "$W/node0$n/containerd.sock" -n $NS images import "$W/image.tar" >/dev/null
    echo "node0$n: $(ctr -a "$W/node0$n/containerd.sock" version | awk '/Version/{print "containerd "$2; exit}')"
done

say "giving each node's agent its own address (network namespaces $NET1, $NET2)"
veth_pair "$NET1" "$NET2" mig-demo-a mig-demo-b 10.231.9
SERVER=http://10.231.9.1:7070
start_agents "$W" "$NS" "$NET1" "$NET2" 10.231.9 ||
    { echo "demo.sh: the node agents did not register; their logs: $W/agent-node0*.log" >&2; exit 1; }
ip netns exec "$NET1" mig-server nodes --server $SERVER

A="ctr -a $W/node01/containerd.sock -n $NS"
B="ctr -a $W/node02/containerd.sock -n $NS"
say "running a counter on node01 (runtime io.containerd.mig.v2, deployment \"counter\")"
$A run -d --runtime io.containerd.mig.v2 --label mig.dev/workload=counter docker.io/library/mig-demo:1 counter \
    sh -c 'i=0; while :; do i=$((i+1)); echo $i > /count; echo "tick $i" >> /var-log.txt; sleep 0.1; done'
sleep 2
echo "node01: count = $($A t exec --exec-id peek counter cat /count)"

say "POST /migrate {\"deployment\":\"counter\",\"originNode\":\"node01\",\"destNode\":\"node02\"}"
ip netns exec "$NET1" mig-server migrate --deployment counter --from node01 --to node02 --server $SERVER

say "after the migration"
echo "node01 tasks:"; $A t ls
echo "node02 tasks:"; $B t ls
first=$($B t exec --exec-id peek1 counter cat /count)
sleep 1
second=$($B t exec --exec-id peek2 counter cat /count)
lines=$($B t exec --exec-id peek3 counter sh -c 'wc -l < /var-log.txt')
echo "node02: count = $first, one second later $second; /var-log.txt (written on node01 and on) has $lines lines"
if [ "$second" -le "$first" ] || [ "$first" -lt 20 ]; then
    echo "demo.sh: the counter did not resume from its state on node02" >&2
    exit 1
fi
say "migration record"
ip netns exec "$NET1" mig-server status --server $SERVER
say "done: the counter kept its memory and its files across nodes"
