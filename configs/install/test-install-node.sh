#!/usr/bin/env bash
# Runs install-node.sh against scratch host roots, the way the mig-node initContainer runs it on a
# node, and checks what it leaves: binaries, the containerd drop-in (SystemdCgroup from the
# kubelet's cgroupDriver), config.toml's imports for each shape config.toml comes in, and that a
# second run restarts nothing. Called by configs/validate.sh with a scratch directory.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFIGS=$(dirname "$HERE")
W=${1:?usage: test-install-node.sh SCRATCH_DIR}
DROPIN=/etc/containerd/conf.d/kubernetes-mig.toml
mkdir -p "$W"

fail() { printf '[validate] install-node.sh: %s\n' "$*" >&2; exit 1; }

sh -n "$HERE/install-node.sh" || fail "syntax error"
if command -v shellcheck >/dev/null; then
    shellcheck -s sh "$HERE/install-node.sh" || fail "shellcheck"
fi

# What the node image holds.
src=$W/image
mkdir -p "$src/bin" "$src/criu/usr/sbin"
for b in containerd-shim-mig-v2 mig-restore-hook; do printf '#!/bin/sh\necho %s\n' "$b" >"$src/bin/$b"; done
chmod 755 "$src/bin/"*
echo 'fake criu' >"$src/criu/usr/sbin/criu"
echo '4.2-test' >"$src/criu/.version"
# shellcheck disable=SC2016 # expanded by the generated script, not here
printf '#!/bin/sh\necho restart >>"$(dirname "$0")/restarts"\n' >"$W/restart"
chmod 755 "$W/restart"

# run NAME [cgroupDriver]: runs the installer on host root $W/NAME; prints its output on failure.
run() {
    local host=$W/$1 kubelet=$W/$1.kubelet.yaml
    if [ -n "${2:-}" ]; then printf 'kind: KubeletConfiguration\ncgroupDriver: %s\n' "$2" >"$kubelet"; fi
    env -u NODE_NAME HOST_ROOT="$host" MIG_SOURCE="$src" MIG_FRAGMENT="$CONFIGS/containerd/mig-runtime.toml" \
        MIG_RESTART_CMD="$W/restart" KUBELET_CONFIG="$kubelet" sh "$HERE/install-node.sh" >"$W/$1.out" 2>&1
}
restarts() { wc -l <"$W/restarts" 2>/dev/null || echo 0; }
# imports_of FILE: config.toml's imports as one line, parsed by TOML rules.
imports_of() { "${PYTHON:-python3}" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb")).get("imports"))' "$1"; }
expect_imports() {
    local got
    got=$(imports_of "$W/$1/etc/containerd/config.toml") || fail "$1: config.toml is no longer valid TOML"
    [ "$got" = "$2" ] || fail "$1: imports are $got, expected $2"
}

# A node without config.toml (containerd's defaults) and a kubelet on cgroupfs.
run fresh cgroupfs || { cat "$W/fresh.out" >&2; fail "fresh node: the installer failed"; }
h=$W/fresh
for f in usr/local/bin/containerd-shim-mig-v2 opt/kubernetes-mig/bin/mig-restore-hook usr/local/bin/criu; do
    [ -x "$h/$f" ] || fail "fresh node: /$f not installed"
done
[ "$(cat "$h/opt/kubernetes-mig/criu/.version")" = 4.2-test ] || fail "fresh node: CRIU prefix not installed"
grep -q 'L=/opt/kubernetes-mig/criu' "$h/usr/local/bin/criu" || fail "fresh node: criu wrapper does not point at the prefix"
grep -Eq '^ *SystemdCgroup = false$' "$h$DROPIN" || fail "fresh node: cgroupDriver cgroupfs did not give SystemdCgroup = false"
expect_imports fresh "['$DROPIN']"
[ "$(restarts)" -eq 1 ] || fail "fresh node: expected one containerd restart, got $(restarts)"

# Idempotence: nothing changed, so no restart.
run fresh cgroupfs || { cat "$W/fresh.out" >&2; fail "second run failed"; }
grep -q 'configuration unchanged' "$W/fresh.out" || { cat "$W/fresh.out" >&2; fail "second run changed the configuration"; }
[ "$(restarts)" -eq 1 ] || fail "second run restarted containerd"

# Existing config.toml shapes.
mkdir -p "$W/tables/etc/containerd" "$W/oneline/etc/containerd" "$W/empty/etc/containerd" "$W/multiline/etc/containerd"
cat >"$W/tables/etc/containerd/config.toml" <<'EOF'
# imports = ["a commented-out line is not an imports key"]
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
EOF
printf 'version = 3\nimports = ["/etc/containerd/other.toml"] # ours\n[grpc]\n  address = "/run/containerd/containerd.sock"\n' \
    >"$W/oneline/etc/containerd/config.toml"
printf 'version = 3\nimports = [ ]\n' >"$W/empty/etc/containerd/config.toml"
printf 'version = 3\nimports = [\n  "/etc/containerd/other.toml",\n]\n' >"$W/multiline/etc/containerd/config.toml"

run tables systemd || { cat "$W/tables.out" >&2; fail "config.toml without imports: the installer failed"; }
expect_imports tables "['$DROPIN']"
grep -Eq '^ *SystemdCgroup = true$' "$W/tables$DROPIN" || fail "cgroupDriver systemd did not give SystemdCgroup = true"
grep -q 'runtimes.runc' "$W/tables/etc/containerd/config.toml" || fail "the existing tables were lost"
run oneline || { cat "$W/oneline.out" >&2; fail "one-line imports: the installer failed"; }
expect_imports oneline "['/etc/containerd/other.toml', '$DROPIN']"
run empty || { cat "$W/empty.out" >&2; fail "imports = [ ]: the installer failed"; }
expect_imports empty "['$DROPIN']"
if run multiline; then fail "a multi-line imports was edited blindly instead of refused"; fi
grep -q 'multi-line' "$W/multiline.out" || fail "multi-line imports: no explanation: $(cat "$W/multiline.out")"
for name in tables oneline empty; do
    before=$(restarts)
    run "$name" systemd >/dev/null || true
    [ "$(restarts)" -eq "$before" ] || fail "$name: a second run restarted containerd"
done

# containerd itself loads what the installer wrote (paths redirected into the scratch root).
if command -v containerd >/dev/null && containerd --version | grep -qE ' v?2\.'; then
    for name in fresh tables oneline; do
        sed "s|\"$DROPIN\"|\"$W/$name$DROPIN\"|; s|\"/etc/containerd/other.toml\", ||" \
            "$W/$name/etc/containerd/config.toml" >"$W/$name.config.toml"
        containerd --config "$W/$name.config.toml" config dump >"$W/$name.dump" 2>&1 ||
            { cat "$W/$name.dump" >&2; fail "$name: containerd rejects the installed configuration"; }
        grep -A1 'runtimes.mig\]' "$W/$name.dump" | grep -q "io.containerd.mig.v2" ||
            fail "$name: containerd's merged configuration has no runtimes.mig"
    done
fi
echo "[validate] install-node.sh: fresh node, 3 config.toml shapes, multi-line refusal, idempotent (no second restart)"
