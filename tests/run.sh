#!/usr/bin/env bash
# Herald's one test command: lint, build, Rust tests, Autobahn conformance (kosoku) and
# the Python client tests. Needs only Rust (cargo, rustfmt, clippy) and python3; the
# Python tools go into .venv at the repository root.
#
#   bash tests/run.sh            # everything
#   SKIP_COMPRESSION=1 bash tests/run.sh   # conformance without groups 12/13
#   SKIP_URING=1 bash tests/run.sh         # no second pass on the io_uring backend
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
START=$(date +%s)

banner() {
    printf '\n========== %s (t+%ss) ==========\n' "$1" "$(( $(date +%s) - START ))"
}

# run LIMIT_SECONDS CMD...: fails the script at once if CMD fails or overruns.
run() {
    local limit=$1
    shift
    echo "+ $*"
    timeout --kill-after=30 "$limit" "$@"
}

# check NAME LIMIT_SECONDS CMD...: like run, but a failing test section is remembered
# and the later sections still run; the script fails at the end.
FAILED_SECTIONS=()
check() {
    local name=$1
    shift
    local rc=0
    run "$@" || rc=$?
    if [ "$rc" != 0 ]; then
        [ "$rc" = 124 ] && echo "!! $name timed out after $1 s"
        echo "!! $name failed (exit $rc)"
        FAILED_SECTIONS+=("$name")
    fi
}

# The fan-out test holds ~1,000 client sockets in one process.
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 4096 ]; then
    ulimit -n 4096 2>/dev/null || echo "warning: open-file limit is $(ulimit -n); the 1,000-subscriber test needs ~1,100"
fi

banner "python venv (.venv)"
if [ ! -x "$VENV/bin/python" ]; then
    if ! python3 -m venv "$VENV"; then
        # Debian ships ensurepip separately (python3-venv).
        rm -rf "$VENV"
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            pyver=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
            apt-get update -q
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv "python${pyver}-venv" ||
                DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
            python3 -m venv "$VENV"
        else
            echo "python3 -m venv failed; install python3-venv" >&2
            exit 1
        fi
    fi
fi
REQS=$ROOT/tests/requirements.txt
STAMP=$VENV/.requirements.installed
if ! cmp -s "$REQS" "$STAMP"; then
    run 600 "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQS"
    cp "$REQS" "$STAMP"
fi
"$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null | grep -iE '^(kosoku|websockets|pytest) '

banner "redis-server (Debian package) for tests/cluster.rs"
if ! command -v redis-server >/dev/null && [ ! -x /usr/bin/redis-server ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server
    else
        echo "redis-server missing and cannot be installed here; install the Debian package redis-server" >&2
        exit 1
    fi
fi
# The package's own service is not needed: each cluster test starts its own redis-server
# on a free port. With this set, a missing redis-server fails those tests instead of
# skipping them.
export HERALD_REQUIRE_REDIS=1
redis-server --version

banner "cargo fmt --check"
run 120 cargo fmt --all --check

banner "cargo clippy --workspace --all-targets -- -D warnings"
run 1500 cargo clippy --workspace --all-targets -- -D warnings

banner "cargo build --release"
run 1500 cargo build --release

banner "cargo test"
check "cargo test" 900 cargo test --workspace --no-fail-fast

banner "Autobahn conformance (kosoku on /echo)"
suite=all
if [ "${SKIP_COMPRESSION:-}" = 1 ]; then suite=core; fi
check conformance 2400 "$VENV/bin/python" tests/conformance/run.py --bin "$ROOT/target/release/herald" --suite "$suite"

banner "Autobahn conformance over TLS (core suite; kosoku -> relay -> herald --tls-cert)"
# The TLS runs (this one and tests/python/test_tls.py) make their CA with openssl.
if ! command -v openssl >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssl
fi
check conformance-tls 900 "$VENV/bin/python" tests/conformance/run.py --bin "$ROOT/target/release/herald" --suite core --tls

banner "browser tests (Chromium + playwright-core)"
check browser 900 bash tests/browser/run.sh

banner "proxy: tuning/nginx.conf in front of herald (nginx from Debian)"
check proxy 600 bash tests/proxy/run.sh

banner "fuzz smoke (cargo-fuzz, every target from its seeds)"
check fuzz 2400 bash tests/fuzz/smoke.sh

banner "pytest tests/python (websockets client)"
export HERALD_BIN=$ROOT/target/release/herald
PYTHONDONTWRITEBYTECODE=1 check pytest 300 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/python

# The io_uring backend must pass the same suite: every server the tests start inherits
# HERALD_IO. SKIP_URING=1 skips it where the kernel or a seccomp filter forbids io_uring
# (`herald serve --io uring` says so when it is unavailable). TLS is served by epoll only
# (`--io uring --tls-cert` refuses to start), so the TLS tests are left out of this pass.
banner "io_uring backend: cargo test, conformance and pytest again with HERALD_IO=uring"
if [ "${SKIP_URING:-}" = 1 ]; then
    echo "skipped (SKIP_URING=1)"
else
    uring_tests=()
    for f in tests/*.rs; do
        name=$(basename "$f" .rs)
        [ "$name" = tls ] || uring_tests+=(--test "$name")
    done
    HERALD_IO=uring check "cargo test (io_uring)" 900 cargo test -p herald --lib "${uring_tests[@]}" --no-fail-fast
    HERALD_IO=uring check "herald-bench tests (io_uring)" 300 cargo test -p herald-bench --no-fail-fast -- --skip wss
    # Groups 1-10 (framing, fragmentation, close: what a backend can break). Groups 12-13
    # test the shards' deflate, which is the same code on both backends, and take ~7 min.
    check "conformance (io_uring)" 2400 "$VENV/bin/python" tests/conformance/run.py --bin "$ROOT/target/release/herald" \
        --suite core --server-arg=--io --server-arg=uring --outdir "$ROOT/target/conformance-uring"
    HERALD_IO=uring PYTHONDONTWRITEBYTECODE=1 check "pytest (io_uring)" 300 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
        -k "not tls" tests/python
fi

if [ "${#FAILED_SECTIONS[@]}" != 0 ]; then
    banner "FAILED sections: ${FAILED_SECTIONS[*]}"
    exit 1
fi
banner "done: every section passed"
