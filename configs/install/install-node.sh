#!/bin/sh
# Installs kubernetes-mig on the node this runs on. It is the mig-node DaemonSet's initContainer
# (configs/install/daemonset.yaml), run from the node image, whose /opt/kubernetes-mig holds:
#   bin/containerd-shim-mig-v2  bin/mig-restore-hook  bin/mig-server  criu/ (CRIU's private prefix)
# and it writes to the host through hostPath mounts under $HOST_ROOT:
#   1. the shim and a `criu` wrapper into /usr/local/bin (containerd and runc find them on PATH),
#      the restore-hook and CRIU's prefix into /opt/kubernetes-mig,
#   2. the containerd fragment to /etc/containerd/conf.d/kubernetes-mig.toml, SystemdCgroup set
#      from the kubelet's cgroupDriver, and its path into config.toml's `imports`,
#   3. restarts containerd in the host's mount namespace, only when its configuration changed
#      (running containers survive: their shims are not containerd's children),
#   4. labels the node kubernetes-mig.dev/enabled=true, which the RuntimeClass schedules on.
# Idempotent: a second run changes nothing and restarts nothing.
#
# Environment (defaults are the DaemonSet's):
#   HOST_ROOT         where the host's directories are mounted (/host)
#   MIG_SOURCE        the image's installation tree (/opt/kubernetes-mig)
#   MIG_FRAGMENT      the containerd fragment (/etc/kubernetes-mig/mig-runtime.toml, from the ConfigMap)
#   MIG_RESTART_CMD   how to restart containerd (nsenter -t 1 -m -- systemctl restart containerd)
#   KUBELET_CONFIG    the kubelet's config file, read for cgroupDriver
#                     ($HOST_ROOT/var/lib/kubelet/config.yaml; the DaemonSet reads it via /proc/1/root)
#   NODE_NAME         the node to label; unset: no label (configs/validate.sh runs it that way)
set -eu

HOST_ROOT=${HOST_ROOT:-/host}
MIG_SOURCE=${MIG_SOURCE:-/opt/kubernetes-mig}
MIG_FRAGMENT=${MIG_FRAGMENT:-/etc/kubernetes-mig/mig-runtime.toml}
MIG_RESTART_CMD=${MIG_RESTART_CMD:-nsenter -t 1 -m -- systemctl restart containerd}
KUBELET_CONFIG=${KUBELET_CONFIG:-$HOST_ROOT/var/lib/kubelet/config.yaml}
LABEL=kubernetes-mig.dev/enabled
# The path as containerd sees it on the host, not as this container does.
DROPIN=/etc/containerd/conf.d/kubernetes-mig.toml

say() { echo "install-node: $*"; }
die() { echo "install-node: $*" >&2; exit 1; }

# install_file SRC DEST MODE: atomic replace; prints DEST when its content changed.
install_file() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then return 0; fi
    mkdir -p "$(dirname "$2")"
    cp "$1" "$2.mig-new"
    chmod "$3" "$2.mig-new"
    mv -f "$2.mig-new" "$2"
    echo "$2"
}

# --- 1. binaries --------------------------------------------------------------------------------
for f in containerd-shim-mig-v2 mig-restore-hook; do
    [ -x "$MIG_SOURCE/bin/$f" ] || die "$MIG_SOURCE/bin/$f is missing: is this the node image?"
done
install_file "$MIG_SOURCE/bin/containerd-shim-mig-v2" "$HOST_ROOT/usr/local/bin/containerd-shim-mig-v2" 755 >/dev/null
install_file "$MIG_SOURCE/bin/mig-restore-hook" "$HOST_ROOT/opt/kubernetes-mig/bin/mig-restore-hook" 755 >/dev/null
if [ -d "$MIG_SOURCE/criu" ]; then
    # CRIU 4.2 with its own loader and libraries, so it runs whatever the host's libc is
    # (scripts/setup.sh installs it the same way). Replaced whole, never merged.
    stamp=$(cat "$MIG_SOURCE/criu/.version" 2>/dev/null || echo unknown)
    if [ "$(cat "$HOST_ROOT/opt/kubernetes-mig/criu/.version" 2>/dev/null)" != "$stamp" ] || [ "$stamp" = unknown ]; then
        rm -rf "$HOST_ROOT/opt/kubernetes-mig/criu.new"
        cp -a "$MIG_SOURCE/criu" "$HOST_ROOT/opt/kubernetes-mig/criu.new"
        rm -rf "$HOST_ROOT/opt/kubernetes-mig/criu"
        mv "$HOST_ROOT/opt/kubernetes-mig/criu.new" "$HOST_ROOT/opt/kubernetes-mig/criu"
    fi
    wrapper=$(mktemp)
    cat >"$wrapper" <<'WRAP'
#!/bin/sh
L=/opt/kubernetes-mig/criu
exec "$L/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$L/usr/lib/x86_64-linux-gnu:$L/lib/x86_64-linux-gnu" "$L/usr/sbin/criu" "$@"
WRAP
    install_file "$wrapper" "$HOST_ROOT/usr/local/bin/criu" 755 >/dev/null
    rm -f "$wrapper"
else
    say "no CRIU in the image: keeping the host's criu ($HOST_ROOT/usr/local/bin, /usr/sbin)"
fi

# --- 2. containerd configuration ----------------------------------------------------------------
[ -f "$MIG_FRAGMENT" ] || die "containerd fragment $MIG_FRAGMENT is missing (ConfigMap mig-node-install)"
fragment=$(mktemp)
cp "$MIG_FRAGMENT" "$fragment"
kubelet_config=$KUBELET_CONFIG
if [ -f "$kubelet_config" ]; then
    # runc must use the kubelet's cgroup driver, or it rejects the kubelet's cgroup paths.
    driver=$(sed -n 's/^cgroupDriver:[[:space:]]*"\{0,1\}\([a-z]*\)"\{0,1\}.*/\1/p' "$kubelet_config")
    case "${driver:-systemd}" in
    systemd) systemd=true ;;
    cgroupfs) systemd=false ;;
    *) die "unknown cgroupDriver '$driver' in $kubelet_config" ;;
    esac
    sed -i "s/^\([[:space:]]*SystemdCgroup[[:space:]]*=[[:space:]]*\).*/\1$systemd/" "$fragment"
fi
changed=$(install_file "$fragment" "$HOST_ROOT$DROPIN" 644)
rm -f "$fragment"

config=$HOST_ROOT/etc/containerd/config.toml
if [ ! -f "$config" ]; then
    # No config.toml means containerd's defaults; this one keeps them and adds the import.
    mkdir -p "$(dirname "$config")"
    printf 'version = 3\nimports = ["%s"]\n' "$DROPIN" >"$config"
    changed="$changed $config"
elif grep -Eq "^[[:space:]]*imports[[:space:]]*=.*[\"']${DROPIN}[\"']" "$config"; then
    : # already imported
elif grep -Eq '^[[:space:]]*imports[[:space:]]*=[[:space:]]*\[[^]]*\][[:space:]]*(#.*)?$' "$config"; then
    # A one-line `imports = [...]`: append our path to the array.
    sed -i -E "s|^([[:space:]]*imports[[:space:]]*=[[:space:]]*\[)[[:space:]]*\]|\1\"$DROPIN\"]|; t; s|^([[:space:]]*imports[[:space:]]*=[[:space:]]*\[[^]]*[^[:space:]])[[:space:]]*\]|\1, \"$DROPIN\"]|" "$config"
    changed="$changed $config"
elif grep -Eq '^[[:space:]]*imports[[:space:]]*=' "$config"; then
    die "$config has a multi-line 'imports'; add \"$DROPIN\" to it by hand and rerun"
else
    # Top-level keys must precede the first [table]: put the new key on the first line.
    sed -i "1i imports = [\"$DROPIN\"]" "$config"
    changed="$changed $config"
fi

# --- 3. restart containerd when its configuration changed --------------------------------------
if [ -n "$(echo "$changed" | tr -d ' ')" ]; then
    say "containerd configuration changed ($changed ); restarting containerd"
    # shellcheck disable=SC2086 # the command is a word list on purpose
    $MIG_RESTART_CMD || die "restarting containerd failed: $MIG_RESTART_CMD"
    # The agent and the kubelet need the new socket before the node is announced.
    socket=$HOST_ROOT/run/containerd/containerd.sock
    if [ -d "$HOST_ROOT/run/containerd" ]; then
        i=0
        until [ -S "$socket" ]; do
            i=$((i + 1))
            [ "$i" -le 60 ] || die "containerd did not come back: no $socket after 60 s"
            sleep 1
        done
    fi
else
    say "containerd configuration unchanged"
fi

# --- 4. label the node --------------------------------------------------------------------------
if [ -n "${NODE_NAME:-}" ]; then
    kubectl label node "$NODE_NAME" "$LABEL=true" --overwrite >/dev/null ||
        die "could not label node $NODE_NAME $LABEL=true (RBAC: ClusterRole mig-node)"
    say "node $NODE_NAME labelled $LABEL=true"
fi
say "done"
