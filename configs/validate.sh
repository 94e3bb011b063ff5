#!/usr/bin/env bash
# Validates configs/ offline:
#   1. every Kubernetes manifest against the bundled OpenAPI schemas of kubernetes-validate (PyPI),
#      strict (an unknown field is an error, and so is a kind or apiVersion without a schema),
#      for the oldest and the newest Kubernetes we support,
#   2. the kustomization, rendered with kustomize (or `kubectl kustomize`) when one is installed,
#      and its output validated the same way,
#   3. the containerd fragment: TOML syntax, the keys the shim accepts, and `containerd config
#      dump` of a config importing it when containerd 2.x is installed,
#   4. that the files agree with each other (handler name, node label, state dir, token path),
#   5. install-node.sh, run against a scratch host root (config.toml edits, idempotence).
#
# Usage: configs/validate.sh               everything above
#        configs/validate.sh FILE...       step 1 only, for these manifests
#        configs/validate.sh --install     only install the validator (for scripts/setup.sh)
#
# The validator is installed on first use into a virtualenv outside the repository
# ($MIG_VALIDATE_VENV, default /opt/kubernetes-mig/venv-validate, else ~/.cache/kubernetes-mig/).
# Exit status: 0 valid, 1 invalid (the validator's messages on stderr), 77 the validator could
# not be installed (no python3 with venv, or no access to PyPI).
set -euo pipefail

CONFIGS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$CONFIGS")
VALIDATOR=kubernetes-validate==1.37.0
# The oldest Kubernetes we support and the newest the validator knows.
K8S_VERSIONS=${MIG_K8S_VERSIONS:-1.29.0 1.37.0}
SKIP=77

say() { printf '[validate] %s\n' "$*"; }
fail() { printf '[validate] FAILED: %s\n' "$*" >&2; exit 1; }

# --- the validator ------------------------------------------------------------------------------
pick_venv() {
    if [ -n "${MIG_VALIDATE_VENV:-}" ]; then
        echo "$MIG_VALIDATE_VENV"
    elif mkdir -p /opt/kubernetes-mig 2>/dev/null && [ -w /opt/kubernetes-mig ]; then
        echo /opt/kubernetes-mig/venv-validate
    else
        echo "${XDG_CACHE_HOME:-$HOME/.cache}/kubernetes-mig/venv-validate"
    fi
}

# Installs $VALIDATOR into $VENV unless it is there; the stamp file marks a finished install, and
# a lock keeps parallel runs (cargo test runs tests in parallel) from installing twice at once.
ensure_validator() {
    VENV=$(pick_venv)
    local stamp=$VENV/.installed
    [ "$(cat "$stamp" 2>/dev/null)" = "$VALIDATOR" ] && return 0
    # Debian's python3 first: a venv keeps pointing at the interpreter that made it.
    local python="" candidate
    for candidate in /usr/bin/python3 "$(command -v python3 || true)"; do
        if [ -x "$candidate" ] &&
            "$candidate" -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 11)' 2>/dev/null; then
            python=$candidate
            break
        fi
    done
    [ -n "$python" ] || { echo "no python3 >= 3.11 with venv and ensurepip (apt-get install python3-venv)"; return 1; }
    mkdir -p "$(dirname "$VENV")"
    exec 9>"$VENV.lock"
    flock 9
    if [ "$(cat "$stamp" 2>/dev/null)" != "$VALIDATOR" ]; then
        say "installing $VALIDATOR into $VENV" >&2
        rm -rf "$VENV"
        local log
        log=$(mktemp)
        if ! { "$python" -m venv "$VENV" && "$VENV/bin/pip" install --quiet --disable-pip-version-check "$VALIDATOR"; } >"$log" 2>&1; then
            echo "pip could not install $VALIDATOR into $VENV: $(tail -n 3 "$log" | tr '\n' ' ')"
            rm -f "$log"
            flock -u 9
            return 1
        fi
        rm -f "$log"
        echo "$VALIDATOR" >"$stamp"
    fi
    flock -u 9
}

if ! why=$(ensure_validator); then
    echo "SKIP configs: $why" >&2
    exit "$SKIP"
fi
VENV=$(pick_venv)
KV=$VENV/bin/kubernetes-validate
PY=$VENV/bin/python3
[ "${1:-}" = --install ] && { say "validator ready: $KV"; exit 0; }

# validate_manifests FILE...: strict schema validation for each supported Kubernetes version.
# kubernetes-validate only warns (exit 0) about a kind it has no schema for, which is how a
# misspelt kind or apiVersion shows: any WARN fails here too.
validate_manifests() {
    local v out rc
    for v in $K8S_VERSIONS; do
        rc=0
        out=$("$KV" --strict --quiet -k "$v" "$@" 2>&1) || rc=$?
        if [ "$rc" -ne 0 ] || grep -Eq '^(WARN|ERROR)' <<<"$out"; then
            printf '%s\n' "$out" >&2
            fail "Kubernetes $v schema validation of: $*"
        fi
    done
}

if [ $# -gt 0 ]; then
    validate_manifests "$@"
    say "ok: $* (Kubernetes $K8S_VERSIONS, strict)"
    exit 0
fi

# --- 1. manifests -------------------------------------------------------------------------------
mapfile -t manifests < <(cd "$CONFIGS" && find . -name '*.yaml' ! -name kustomization.yaml | sed 's|^\./||' | sort)
[ ${#manifests[@]} -gt 0 ] || fail "no manifests under $CONFIGS"
(cd "$CONFIGS" && validate_manifests "${manifests[@]}")
say "manifests valid for Kubernetes $K8S_VERSIONS (strict): ${manifests[*]}"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# --- 2. kustomization ---------------------------------------------------------------------------
if command -v kustomize >/dev/null; then
    kustomize_cmd=(kustomize build)
elif command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then
    kustomize_cmd=(kubectl kustomize)
else
    kustomize_cmd=()
fi
if [ ${#kustomize_cmd[@]} -gt 0 ]; then
    "${kustomize_cmd[@]}" "$CONFIGS" >"$scratch/rendered.yaml" 2>"$scratch/kustomize.err" ||
        { cat "$scratch/kustomize.err" >&2; fail "${kustomize_cmd[*]} $CONFIGS"; }
    validate_manifests "$scratch/rendered.yaml"
    say "kustomization renders (${kustomize_cmd[*]}) and its output is valid"
else
    say "note: neither kustomize nor kubectl is installed: kustomization.yaml checked by hand only"
fi

# --- 3. and 4. containerd fragment and cross-file consistency -----------------------------------
"$PY" "$CONFIGS/check-consistency.py" "$ROOT" || fail "consistency checks (above)"

if command -v containerd >/dev/null && containerd --version | grep -qE ' v?2\.'; then
    printf 'version = 3\nimports = ["%s"]\n' "$CONFIGS/containerd/mig-runtime.toml" >"$scratch/config.toml"
    containerd --config "$scratch/config.toml" config dump >"$scratch/dump.toml" 2>"$scratch/dump.err" ||
        { cat "$scratch/dump.err" >&2; fail "containerd rejects a config importing containerd/mig-runtime.toml"; }
    grep -A1 "runtimes.mig\]" "$scratch/dump.toml" | grep -q "runtime_type = 'io.containerd.mig.v2'" ||
        fail "containerd config dump has no runtimes.mig with runtime_type io.containerd.mig.v2"
    say "containerd $(containerd --version | awk '{print $3}') loads the fragment: runtimes.mig -> io.containerd.mig.v2"
else
    say "note: containerd 2.x is not installed: fragment checked with tomllib only"
fi

# --- 5. install-node.sh on a scratch host -------------------------------------------------------
PYTHON=$PY bash "$CONFIGS/install/test-install-node.sh" "$scratch/install" || fail "install-node.sh (above)"

say "all configs valid"
