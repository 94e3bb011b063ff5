# shellcheck shell=bash
# Shared by demo.sh and the benchmarks: a locally built OCI image (no registry is reachable
# here), private containerd "nodes", and a veth pair between two network namespaces.

# oci_image ROOTFS IMAGE_NAME CONFIG OUT_TAR: writes a one-layer OCI image archive of the
# directory ROOTFS, named IMAGE_NAME, whose image config is CONFIG (JSON, e.g. {"Cmd":["sh"]}).
oci_image() {
    local rootfs=$1 name=$2 config=$3 out=$4 w L LS C CS M MS
    w=$(mktemp -d)
    mkdir -p "$w/oci/blobs/sha256"
    blob() { local d; d=$(sha256sum "$1" | cut -d' ' -f1); cp "$1" "$w/oci/blobs/sha256/$d"; echo "$d $(stat -c%s "$1")"; }
    tar -C "$rootfs" -cf "$w/layer.tar" .
    read -r L LS < <(blob "$w/layer.tar")
    printf '{"architecture":"amd64","os":"linux","config":%s,"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$config" "$L" >"$w/cfg.json"
    read -r C CS < <(blob "$w/cfg.json")
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' "$C" "$CS" "$L" "$LS" >"$w/man.json"
    read -r M MS < <(blob "$w/man.json")
    echo '{"imageLayoutVersion":"1.0.0"}' >"$w/oci/oci-layout"
    printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s"}}]}' "$M" "$MS" "$name" >"$w/oci/index.json"
    tar -C "$w/oci" -cf "$out" .
    rm -rf "$w"
}

# memory_dir STATE_DIR: the node's checkpoint store in memory, the default of
# mig_checkpoint::room::memory_dir (a directory per state dir: the first 16 hex digits of the
# sha256 of its path); remove it when the node is gone, as it lies outside the node's dir.
memory_dir() { echo "/dev/shm/kubernetes-mig/$(printf %s "$1" | sha256sum | cut -c1-16)"; }

# start_node DIR: a containerd with its root, state, socket (DIR/containerd.sock) and log under
# DIR, and the shim's state dir at DIR/mig; waits until it answers. Its pid is in NODE_PID.
# The caller's environment (PATH: which shim) reaches containerd and its shims.
start_node() {
    local d=$1
    mkdir -p "$d"
    cat >"$d/config.toml" <<TOML
version = 3
root = "$d/root"
state = "$d/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.nri.v1.nri"]
[grpc]
  address = "$d/containerd.sock"
TOML
    MIG_STATE_DIR=$d/mig containerd --config "$d/config.toml" >"$d/containerd.log" 2>&1 &
    NODE_PID=$!
    for _ in $(seq 100); do ctr -a "$d/containerd.sock" version >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "containerd in $d did not start; its log: $d/containerd.log" >&2
    return 1
}

# veth_pair NET1 NET2 IF1 IF2 PREFIX: (re)creates network namespaces NET1 and NET2 joined by a
# veth pair, with PREFIX.1/24 in NET1 and PREFIX.2/24 in NET2.
veth_pair() {
    local n1=$1 n2=$2 i1=$3 i2=$4 prefix=$5
    ip netns del "$n1" 2>/dev/null || true
    ip netns del "$n2" 2>/dev/null || true
    ip netns add "$n1"
    ip netns add "$n2"
    ip link add "$i1" type veth peer name "$i2"
    ip link set "$i1" netns "$n1"
    ip link set "$i2" netns "$n2"
    ip -n "$n1" addr add "$prefix.1/24" dev "$i1"
    ip -n "$n2" addr add "$prefix.2/24" dev "$i2"
    for n in "$n1:$i1" "$n2:$i2"; do
        ip -n "${n%%:*}" link set "${n#*:}" up
        ip -n "${n%%:*}" link set lo up
    done
}

# warm_memory MIB: has the kernel fill, then free, 3 x MIB MiB of memory (a tmpfs file). In a VM
# the first use of guest memory the host has not backed yet costs several times more than
# later uses, so the first of two measured steps would pay for both: warming before each size
# (and alternating which step runs first) keeps the comparison fair.
warm_memory() {
    local f
    f=$(mktemp /dev/shm/mig-warm-XXXXXX)
    head -c "$(($1 * 3))M" /dev/zero >"$f" 2>/dev/null || true
    rm -f "$f"
}

# start_agents W NS NET1 NET2 PREFIX: a mig-server on each of the nodes W/node01 and W/node02
# (node01 runs the controller too), in network namespaces NET1 and NET2 at PREFIX.1 and
# PREFIX.2 (see veth_pair), with the token in W/token and logs in W/agent-node0N.log, serving
# containerd namespace NS. Returns non-zero when both have not registered within 20 s.
start_agents() {
    local w=$1 ns=$2 n1=$3 n2=$4 prefix=$5
    local server="http://$prefix.1:7070"
    ip netns exec "$n1" mig-server serve --role all --listen "$prefix.1:7070" --node-name node01 \
        --containerd-address "$w/node01/containerd.sock" --namespace "$ns" --state-dir "$w/node01/mig" \
        --token-file "$w/token" >"$w/agent-node01.log" 2>&1 &
    ip netns exec "$n2" mig-server serve --role node --listen "$prefix.2:7070" --node-name node02 \
        --controller "$server" --containerd-address "$w/node02/containerd.sock" --namespace "$ns" \
        --state-dir "$w/node02/mig" --token-file "$w/token" >"$w/agent-node02.log" 2>&1 &
    for _ in $(seq 100); do
        [ "$(ip netns exec "$n1" mig-server nodes --server "$server" 2>/dev/null | grep -c node0)" -ge 2 ] && return 0
        sleep 0.2
    done
    return 1
}

# floor_bundle DIR BINARY SIZE: a runc bundle in DIR (made afresh) whose root holds BINARY alone,
# run as `/<its name> SIZE`, with stdio that is not a terminal and a writable root: the
# benchmarks' floor, run by hand with runc.
floor_bundle() {
    local b=$1 bin=$2 size=$3
    rm -rf "$b" && mkdir -p "$b/rootfs" && cp "$bin" "$b/rootfs/"
    (cd "$b" && runc spec)
    python3 - "$b/config.json" "/$(basename "$bin")" "$size" <<'PY'
import json, sys
p, prog, size = sys.argv[1], sys.argv[2], sys.argv[3]
s = json.load(open(p))
s["process"]["terminal"] = False
s["process"]["args"] = [prog, size]
s["root"]["readonly"] = False
json.dump(s, open(p, "w"))
PY
}
