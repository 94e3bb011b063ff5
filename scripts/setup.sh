#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for kubernetes-mig and builds the project.
#
# Idempotent: run it as often as you like. It installs exactly what the project needs:
#   - containerd 2.x from Debian sid (bookworm's 1.6 lacks the task API v3 our shim serves),
#   - runc and iptables from bookworm (CRIU locks the network with iptables-restore),
#   - CRIU 4.2 from Debian sid, unpacked into a private prefix with its own libc so the system's
#     libc stays bookworm's (older CRIUs cannot dump TCP sockets on this kernel),
#   - busybox-static (test images are built from it), zstd, iproute2,
# then builds the workspace in release mode and installs the shim and the restore-hook.
set -euo pipefail

PREFIX=${MIG_PREFIX:-/opt/kubernetes-mig}
BIN_DIR=${MIG_BIN_DIR:-/usr/local/bin}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export DEBIAN_FRONTEND=noninteractive

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (it installs packages and the shim into $BIN_DIR)" >&2
    exit 1
fi

# --- Debian sid as a low-priority source: only what we ask for by name comes from it. ---------
if [ ! -f /etc/apt/sources.list.d/kubernetes-mig-sid.sources ]; then
    say "adding Debian sid as a pinned (priority 100) apt source"
    cat >/etc/apt/sources.list.d/kubernetes-mig-sid.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    cat >/etc/apt/preferences.d/kubernetes-mig-sid <<'PIN'
Package: *
Pin: release a=unstable
Pin-Priority: 100
PIN
fi
if ! apt-cache policy containerd 2>/dev/null | grep -q '/debian sid/'; then
    say "apt-get update"
    apt-get update -qq
fi

need=()
for pkg in runc iptables busybox-static zstd iproute2 libc6-dev gcc curl python3-venv; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    say "installing from bookworm: ${need[*]}"
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v containerd >/dev/null || ! containerd --version | grep -qE ' v?2\.'; then
    say "installing containerd 2.x from sid"
    apt-get install -y -qq --no-install-recommends -t sid containerd >/dev/null
fi
# The packaged service would start a system containerd; the project's tests and demo run their
# own instances, so leave the system one as the administrator configured it.

# mosquitto, the original design's example: an end-to-end test migrates a real broker. Its
# package would start a broker on this machine; a policy-rc.d of our own (only if there is none)
# keeps it from starting any service while it installs.
if ! command -v mosquitto >/dev/null || ! command -v mosquitto_sub >/dev/null; then
    say "installing mosquitto and its clients from bookworm (no service started)"
    policy=/usr/sbin/policy-rc.d
    ours=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && ours=1
    fi
    apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients >/dev/null
    if [ -n "$ours" ]; then rm -f "$policy"; fi
fi

# --- CRIU 4.2 in a private prefix ----------------------------------------------------------------
CRIU_DIR=$PREFIX/criu
CRIU_PKGS="criu libcompel1 libbsd0 libc6 libc-gconv-modules-extra gcc-16-base libgcc-s1 libffi8 libgmp10
 libgnutls30t64 libhogweed6t64 libidn2-0 libjansson4 libmd0 libmnl0 libnet9 libnettle8t64 libnftables1
 libnftnl11 libnl-3-200 libp11-kit0 libprotobuf-c1 libtasn1-6 libunistring5 libuuid1 libxtables12"
if [ ! -x "$CRIU_DIR/usr/sbin/criu" ]; then
    say "unpacking CRIU 4.2 and its libraries from sid into $CRIU_DIR"
    tmp=$(mktemp -d)
    chmod 755 "$tmp" # apt downloads as the _apt user
    (cd "$tmp" && for p in $CRIU_PKGS; do apt-get download -qq "$p/sid" >/dev/null; done)
    mkdir -p "$CRIU_DIR.new"
    for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$CRIU_DIR.new"; done
    rm -rf "$tmp" "$CRIU_DIR"
    mv "$CRIU_DIR.new" "$CRIU_DIR"
fi
# runc only needs a `criu` on PATH: this wrapper runs sid's binary with sid's loader and libraries,
# passed on the loader's command line so that nothing CRIU starts (iptables-restore) inherits them.
#
# CRIU caches what it probes of the kernel in /run/criu.kdat, but saves that cache only where
# /run is a tmpfs (so a reboot clears it). Where /run is not (this kind of machine), every dump
# and restore probes the kernel again: ~40 ms each, i.e. ~80 ms of every migration's downtime.
# There the wrapper makes the cache itself, with CRIU, in a private tmpfs mounted over /run in a
# mount namespace of its own, installs it and tags it with the boot id: after a reboot (a new
# kernel perhaps) the tag differs and the cache is made again. CRIU itself still checks the
# cache's magic and size when it loads it.
KDAT_BLOCK=
if [ "$(stat -f -c %T /run)" != tmpfs ]; then
    say "/run is not a tmpfs: the criu wrapper keeps CRIU's kernel probe cache per boot"
    KDAT_BLOCK=$(cat <<'KDAT'
read -r boot </proc/sys/kernel/random/boot_id
tag=
[ -s /run/criu.kdat ] && read -r tag </run/criu.kdat.boot 2>/dev/null
if [ "$tag" != "$boot" ]; then
    t=$(mktemp -d) && unshare -m sh -c '
        mount -t tmpfs -o mode=0700,size=1m criu-kdat /run &&
        "$1/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \
            --library-path "$1/usr/lib/x86_64-linux-gnu:$1/lib/x86_64-linux-gnu" \
            "$1/usr/sbin/criu" check >/dev/null 2>&1; cp /run/criu.kdat "$2/kdat"' sh "$L" "$t" 2>/dev/null &&
        mv -f "$t/kdat" /run/criu.kdat.new && mv -f /run/criu.kdat.new /run/criu.kdat &&
        echo "$boot" >/run/criu.kdat.boot.new && mv -f /run/criu.kdat.boot.new /run/criu.kdat.boot
    rm -rf "$t"
fi
KDAT
)
fi
cat >"$BIN_DIR/criu.new" <<WRAP
#!/bin/sh
L=$CRIU_DIR
$KDAT_BLOCK
exec "\$L/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "\$L/usr/lib/x86_64-linux-gnu:\$L/lib/x86_64-linux-gnu" "\$L/usr/sbin/criu" "\$@"
WRAP
chmod 755 "$BIN_DIR/criu.new"
mv "$BIN_DIR/criu.new" "$BIN_DIR/criu"
criu_version=$("$BIN_DIR/criu" --version | head -n1)
if ! criu check >/dev/null 2>&1; then
    echo "setup.sh: 'criu check' fails on this kernel; checkpoint tests will fail:" >&2
    criu check >&2 || true
fi

# CRIU's lazy page server (post-copy migrations, shim/src/postcopy.rs) sets its pipes to 4 MiB;
# above fs.pipe-max-size (1 MiB by default) that needs CAP_SYS_RESOURCE, which some container
# hosts (this kind of VM sandbox among them) withhold from root. Without it every page request
# fails, so raise the limit where the capability is missing (the shim checks it too).
caps=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
if [ $(( 0x$caps >> 24 & 1 )) -eq 0 ] && [ "$(cat /proc/sys/fs/pipe-max-size)" -lt 4194304 ]; then
    say "no CAP_SYS_RESOURCE: raising fs.pipe-max-size to 4 MiB for CRIU's lazy page server"
    echo 4194304 >/proc/sys/fs/pipe-max-size ||
        echo "setup.sh: could not raise fs.pipe-max-size; post-copy migrations will be refused" >&2
fi

# --- build and install --------------------------------------------------------------------------
say "building the workspace (release)"
(cd "$ROOT" && cargo build --release --locked --workspace --quiet)
say "building the static restore-hook"
(cd "$ROOT" && cargo build-hook --quiet)
install -d "$PREFIX/bin"
install -m 755 "$ROOT/target/release/containerd-shim-mig-v2" "$BIN_DIR/containerd-shim-mig-v2"
install -m 755 "$ROOT/target/x86_64-unknown-linux-gnu/release/mig-restore-hook" "$PREFIX/bin/mig-restore-hook"
if [ -x "$ROOT/target/release/mig-server" ]; then
    install -m 755 "$ROOT/target/release/mig-server" "$BIN_DIR/mig-server"
fi
install -d -m 700 /var/lib/kubernetes-mig

# The offline Kubernetes schema validator the configs/ tests use (a venv outside the repo).
say "installing the manifest validator"
bash "$ROOT/configs/validate.sh" --install >/dev/null

# Where the tests look (tests/src/dmtcp.rs): MIG_DMTCP_DIR, dmtcp_launch on PATH, /opt/dmtcp.
if [ -n "${MIG_DMTCP_DIR:-}" ] || command -v dmtcp_launch >/dev/null || [ -x /opt/dmtcp/bin/dmtcp_launch ]; then
    dmtcp_note="DMTCP found: the dmtcp engine's tests will run"
else
    dmtcp_note="DMTCP not installed (no registry carries it): the dmtcp engine's tests will skip"
fi

say "ready:"
say "  $(containerd --version)"
say "  $(runc --version | head -n1)"
say "  $criu_version (wrapper $BIN_DIR/criu -> $CRIU_DIR)"
say "  $("$BIN_DIR/containerd-shim-mig-v2" -v | head -n1) at $BIN_DIR/containerd-shim-mig-v2"
say "  restore-hook (static) at $PREFIX/bin/mig-restore-hook"
say "  $dmtcp_note"
