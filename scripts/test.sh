#!/usr/bin/env bash
# The project's test command (run as root on a machine prepared by scripts/setup.sh):
#   1. build the workspace in release mode,
#   2. cargo fmt --check,
#   3. cargo clippy on every target with warnings as errors,
#   4. every test, the end-to-end ones included, against the shim just built. The e2e tests
#      fail instead of skipping when something they need is missing (MIG_E2E_REQUIRED=1).
# Every step runs even when an earlier one fails (tests are skipped only if the build fails);
# a summary follows, and the exit status is non-zero if any step failed.
#
# Environment: MIG_E2E_RUNTIME (default io.containerd.mig.v2) selects the runtime the shim tests
# drive; MIG_TEST_THREADS caps parallel tests inside one test binary.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
LOG_DIR=${MIG_TEST_LOG_DIR:-$ROOT/target/test-logs}
mkdir -p "$LOG_DIR"

if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: run as root: the end-to-end tests start containerd and runc" >&2
    exit 1
fi

declare -a names=() results=() times=()
say() { printf '\033[1m[test]\033[0m %s\n' "$*"; }

# step NAME COMMAND...: runs it, output to the terminal and to $LOG_DIR/NAME.log.
step() {
    local name=$1
    shift
    say "$name: $*"
    local start=$SECONDS rc=0
    # With pipefail the pipeline fails with the command's status (tee itself does not fail).
    "$@" 2>&1 | tee "$LOG_DIR/$name.log" || rc=$?
    names+=("$name")
    times+=("$((SECONDS - start))s")
    if [ "$rc" -eq 0 ]; then results+=("ok"); else results+=("FAILED (exit $rc)"); fi
    return 0
}

step build cargo build --release --locked --workspace --all-targets
build_ok=${results[-1]}
step fmt cargo fmt --all -- --check
step clippy cargo clippy --release --locked --workspace --all-targets -- -D warnings
if [ "$build_ok" = ok ]; then
    threads=()
    [ -n "${MIG_TEST_THREADS:-}" ] && threads=(-- --test-threads "$MIG_TEST_THREADS")
    : >"$LOG_DIR/skips.txt"
    step tests env MIG_E2E_REQUIRED=1 MIG_SHIM_DIR="$ROOT/target/release" MIG_SKIP_LOG="$LOG_DIR/skips.txt" \
        cargo test --release --locked --workspace --no-fail-fast "${threads[@]}"
else
    names+=(tests) results+=("not run: the build failed") times+=(-)
fi

echo
say "summary (logs in $LOG_DIR)"
failed=0
for i in "${!names[@]}"; do
    printf '  %-8s %-28s %s\n' "${names[$i]}" "${results[$i]}" "${times[$i]}"
    [ "${results[$i]}" = ok ] || failed=1
done
if [ -f "$LOG_DIR/tests.log" ]; then
    awk '/^test result:/ { p += $4; f += $6; i += $8 }
         END { printf "  tests:   %d passed, %d failed, %d ignored\n", p, f, i }' "$LOG_DIR/tests.log"
    if grep -q '^test .* FAILED$' "$LOG_DIR/tests.log"; then
        echo "  failed tests:"
        grep '^test .* FAILED$' "$LOG_DIR/tests.log" | sed 's/^test /    /; s/ \.\.\. FAILED$//' | sort -u
    fi
    if [ -s "$LOG_DIR/skips.txt" ]; then
        echo "  skipped (the test ran no check; reasons):"
        sort -u "$LOG_DIR/skips.txt" | sed 's/^/    /'
    fi
fi
exit "$failed"
