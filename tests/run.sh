#!/usr/bin/env bash
# Herald's one test command: lint, build, Rust tests (the io_uring pass beside the epoll
# one), Autobahn conformance (kosoku), browser, proxy, fuzz smoke, the Python client
# tests, the HTTP API against its OpenAPI document (schemathesis) and the Debian package,
# then conformance, pytest and schemathesis on io_uring. Needs
# Rust (rustup or cargo with rustfmt and clippy) and python3; on Debian as root it installs
# every other tool first (one apt-get update), elsewhere it names what is missing and
# stops. The Python tools go into .venv at the repository root. Each section's time is
# printed in a table at the end.
#
#   bash tests/run.sh            # everything
#   SKIP_COMPRESSION=1 bash tests/run.sh   # conformance without groups 12/13
#   SKIP_URING=1 bash tests/run.sh         # no second pass on the io_uring backend
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
START=$(date +%s)
BG=$ROOT/target/run-sh
mkdir -p "$BG"

banner() {
    printf '\n========== %s (t+%ss) ==========\n' "$1" "$(( $(date +%s) - START ))"
}

# One row per section for the closing table: name, seconds, verdict.
TABLE=()
record() {
    TABLE+=("$(printf '%-34s %5s s  %s' "$1" "$2" "$3")")
}
print_table() {
    banner "section times"
    printf '%s\n' "${TABLE[@]}"
    printf '%-34s %5s s\n' "total (wall clock)" "$(( $(date +%s) - START ))"
}

# step NAME LIMIT_SECONDS CMD...: a step the rest depends on; its failure (or overrun)
# ends the run at once. CMD may be a function of this script (run without the limit).
step() {
    local name=$1 limit=$2 t0 rc=0
    shift 2
    banner "$name"
    echo "+ $*"
    t0=$(date +%s)
    if declare -F "$1" >/dev/null; then
        "$@" || rc=$?
    else
        timeout --kill-after=30 "$limit" "$@" || rc=$?
    fi
    if [ "$rc" != 0 ]; then
        record "$name" "$(( $(date +%s) - t0 ))" "FAILED (exit $rc)"
        print_table
        echo "!! $name failed (exit $rc)"
        exit 1
    fi
    record "$name" "$(( $(date +%s) - t0 ))" ok
}

# check NAME LIMIT_SECONDS CMD...: a test section; a failure is remembered, the later
# sections still run, and the script fails at the end.
FAILED_SECTIONS=()
check() {
    local name=$1 limit=$2 t0 rc=0
    shift 2
    banner "$name"
    echo "+ $*"
    t0=$(date +%s)
    timeout --kill-after=30 "$limit" "$@" || rc=$?
    if [ "$rc" != 0 ]; then
        [ "$rc" = 124 ] && echo "!! $name timed out after $limit s"
        echo "!! $name failed (exit $rc)"
        FAILED_SECTIONS+=("$name")
        record "$name" "$(( $(date +%s) - t0 ))" "FAILED (exit $rc)"
    else
        record "$name" "$(( $(date +%s) - t0 ))" ok
    fi
}

# background NAME LIMIT_SECONDS CMD...: a check that runs beside the following sections
# (output in target/run-sh/<NAME>.log); `join NAME` waits for it and records it.
declare -A BG_PID=()
bg_file() {
    echo "$BG/${1//[^A-Za-z0-9]/_}"
}
background() {
    local name=$1 limit=$2 file
    shift 2
    file=$(bg_file "$name")
    banner "$name (in the background, output in $file.log)"
    echo "+ $*"
    (
        t0=$(date +%s)
        rc=0
        timeout --kill-after=30 "$limit" "$@" >"$file.log" 2>&1 || rc=$?
        echo "$rc $(( $(date +%s) - t0 ))" >"$file.rc"
    ) &
    BG_PID[$name]=$!
}
# A run that stops early (a failed step, Ctrl-C) takes its background sections with it:
# each runs under `timeout`, which passes the signal on to everything it started.
stop_background() {
    local pid
    for pid in "${BG_PID[@]}"; do
        pkill -TERM -P "$pid" 2>/dev/null || true
    done
}
trap stop_background EXIT
join() {
    local name=$1 rc secs file
    file=$(bg_file "$name")
    banner "$name (joined)"
    wait "${BG_PID[$name]}" || true
    read -r rc secs <"$file.rc"
    tail -n 40 "$file.log"
    if [ "$rc" != 0 ]; then
        [ "$rc" = 124 ] && echo "!! $name timed out"
        echo "!! $name failed (exit $rc); whole log: $file.log"
        FAILED_SECTIONS+=("$name")
        record "$name (background)" "$secs" "FAILED (exit $rc)"
    else
        record "$name (background)" "$secs" ok
    fi
}

# The fan-out test holds ~1,000 client sockets in one process.
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 4096 ]; then
    ulimit -n 4096 2>/dev/null || echo "warning: open-file limit is $(ulimit -n); the 1,000-subscriber test needs ~1,100"
fi

# --- Everything the sections use, installed before the first of them -------------------
prerequisites() {
    local missing=() pyver
    command -v redis-server >/dev/null || missing+=(redis-server) # tests/it/cluster.rs
    command -v redis-cli >/dev/null || missing+=(redis-tools)     # tests/it/redis_cluster.rs
    command -v openssl >/dev/null || missing+=(openssl)            # auth.rs keys, TLS CAs
    command -v curl >/dev/null || missing+=(curl)                  # tests/python/test_http.py
    command -v nginx >/dev/null || missing+=(nginx)                # tests/proxy
    command -v systemd-analyze >/dev/null || missing+=(systemd)    # tests/proxy
    [ -x "${CHROMIUM:-/usr/bin/chromium}" ] || missing+=(chromium) # tests/browser
    command -v node >/dev/null || missing+=(nodejs)
    command -v npm >/dev/null || missing+=(npm)
    if [ ! -x "$VENV/bin/python" ] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        pyver=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        missing+=(python3-venv "python${pyver}-venv")
    fi
    if [ "${#missing[@]}" != 0 ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "+ apt-get install ${missing[*]}"
            apt-get update -q || return 1
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" || return 1
        else
            echo "missing: ${missing[*]}" >&2
            echo "install these Debian packages (apt-get install ${missing[*]}), or run as root on Debian" >&2
            return 1
        fi
    fi
    if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null; then
            rustup component add rustfmt clippy || return 1
        else
            echo "cargo fmt and cargo clippy are missing: install the rustfmt and clippy components" >&2
            return 1
        fi
    fi
    # The fuzz smoke run; built once, skipped when present.
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked || return 1
    # The Debian package (tests/package/run.sh); the same, niced.
    command -v cargo-deb >/dev/null || nice -n 19 cargo install cargo-deb --locked || return 1
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV" || return 1
    fi
    local reqs=$ROOT/tests/requirements.txt stamp=$VENV/.requirements.installed
    if ! cmp -s "$reqs" "$stamp"; then
        "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$reqs" || return 1
        cp "$reqs" "$stamp"
    fi
    "$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null | grep -iE '^(kosoku|websockets|pytest|schemathesis) '
    redis-server --version
}
# Inside `prerequisites`, run as `prerequisites || rc=$?`, errexit is off: every command
# that must succeed ends in `|| return 1`.
step "prerequisites (Debian packages, cargo-fuzz, .venv)" 1800 prerequisites

# --- The dependency cache (what .ci/run asks for) ---------------------------------------
# A run builds the workspace four ways (clippy's check, release, the tests, the fuzz
# targets with ASan), and on a clean clone each compiles every dependency again: on a
# 2-core machine that is most of the run. With HERALD_BUILD_CACHE=DIR the three build
# directories (target/release, target/debug, target/fuzz) are links into DIR, kept from
# one run to the next, so third-party crates compile once per version; Herald's own
# crates are removed from DIR first and built from this clone's source every time. One
# run holds DIR at a time (a second one builds without it); past HERALD_BUILD_CACHE_GB
# (30) it starts empty. A clone that already has those directories keeps them.
build_cache() {
    local cache=$HERALD_BUILD_CACHE dir
    mkdir -p "$cache" || return 1
    exec 9>"$cache/.lock"
    if ! flock -n 9; then
        echo "build cache $cache: another run holds it; building without it"
        return 0
    fi
    for dir in release debug fuzz; do
        if [ -e "target/$dir" ] && [ ! -L "target/$dir" ]; then
            echo "build cache: target/$dir is this clone's own; building without the cache"
            return 0
        fi
    done
    if [ "$(du -s --block-size=1G "$cache" | cut -f1)" -gt "${HERALD_BUILD_CACHE_GB:-30}" ]; then
        echo "build cache $cache: over ${HERALD_BUILD_CACHE_GB:-30} GB, starting it again"
        find "$cache" -mindepth 1 -maxdepth 1 ! -name .lock -exec rm -rf {} + || return 1
    fi
    for dir in release debug fuzz; do
        mkdir -p "$cache/$dir" || return 1
        ln -sfn "$cache/$dir" "target/$dir" || return 1
    done
    cargo clean -p herald -p herald-bench || return 1
    cargo clean -p herald -p herald-bench --release || return 1
    cargo clean --manifest-path tests/fuzz/Cargo.toml --target-dir target/fuzz \
        --target "$(rustc -vV | sed -n 's/^host: //p')" -p herald -p herald-fuzz || return 1
    du -sh "$cache"
}
if [ -n "${HERALD_BUILD_CACHE:-}" ]; then
    step "build cache ($HERALD_BUILD_CACHE)" 300 build_cache
    # Every build of a run starts from nothing of Herald's: incremental state is only
    # written, never read.
    export CARGO_INCREMENTAL=0
fi
# The cluster tests fail rather than skip when redis-server is missing. Each starts its
# own redis-server on a free port: the package's service is not needed. The Redis Cluster
# tests (tests/it/redis_cluster.rs) start six each and create the cluster with redis-cli
# --cluster create (package redis-tools, which redis-server depends on).

# The instrumented fuzz build has a target dir of its own (no lock shared with the builds
# below). Started first and niced, it takes what the builds leave idle (the release
# build's single-unit LTO, the tests' waits) without slowing them; the runs that follow
# it only read the committed seeds.
background "fuzz smoke (seeds + 10 s per target)" 1800 nice -n 10 bash tests/fuzz/smoke.sh
step "cargo fmt --check" 120 cargo fmt --all --check
step "cargo clippy -D warnings" 1500 cargo clippy --workspace --all-targets -- -D warnings
# Both binaries: the Debian package (tests/package/run.sh) ships herald-bench too.
step "cargo build --release" 1500 cargo build --release --workspace --bins
export HERALD_BIN=$ROOT/target/release/herald
CONFORMANCE=("$VENV/bin/python" tests/conformance/run.py --bin "$HERALD_BIN")

# Autobahn groups 12-13 (permessage-deflate): ~6 minutes of cases that each send 1,000
# messages one at a time and wait for every echo, about one core's worth of work. They run
# beside the Rust tests instead of after them. Not niced: on a machine kept busy by other
# work a niced run got a tenth of a core and ran past its time limit.
if [ "${SKIP_COMPRESSION:-}" != 1 ]; then
    background "conformance compression (12-13)" 1500 "${CONFORMANCE[@]}" --suite compression
fi

# One build of every test binary; both passes below only run them.
step "cargo test build (debug)" 1500 cargo test --workspace --no-run

# The io_uring backend must pass the same integration suite: every server the tests start
# inherits HERALD_IO, and the harnesses check that each one runs io_uring. Left out as
# proven once already: the unit tests (`--lib`, no backend in them), tests/it/backends.rs
# (runs every backend itself), the herald-bench tests (a client tool) and Autobahn 12-13
# (the shards' deflate, the same code on both backends). The TLS tests run twice, the
# second time on the single-shot path (receives into a buffer of the socket's own, where
# the kernel has no buffer ring). It runs beside the epoll pass: the tests wait for events,
# not for time, so a busy machine only makes them slower. `--workspace` as above, so cargo
# finds the binaries already built (`-p herald` resolves other features and rebuilds).
# SKIP_URING=1 skips the pass where the kernel or a seccomp filter forbids io_uring
# (`herald serve --io uring` says so when it is unavailable).
if [ "${SKIP_URING:-}" != 1 ]; then
    HERALD_IO=uring background "cargo test (io_uring)" 900 bash -c \
        'cargo test --workspace --test it --no-fail-fast -- --skip backends:: &&
         HERALD_URING_SINGLE_SHOT=1 cargo test --workspace --test it tls::'
fi

check "cargo test (epoll)" 900 cargo test --workspace --no-fail-fast
check "conformance core (1-10)" 900 "${CONFORMANCE[@]}" --suite core --outdir "$ROOT/target/conformance-core"
# kosoku -> relay -> herald --tls-cert; the relay and tests/python/test_tls.py make their
# CA with openssl.
check "conformance core over TLS" 900 "${CONFORMANCE[@]}" --suite core --tls
check "browser (Chromium + playwright-core)" 900 bash tests/browser/run.sh
check "proxy (tuning/nginx.conf, systemd unit)" 600 bash tests/proxy/run.sh
PYTHONDONTWRITEBYTECODE=1 check "pytest (epoll)" 300 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/python
check "OpenAPI (schemathesis)" 300 bash tests/openapi/run.sh
# Installs and purges a package: only as root with dpkg (it says why it stops otherwise).
if [ "$(id -u)" = 0 ] && command -v dpkg >/dev/null; then
    check "Debian package (cargo-deb, dpkg)" 600 bash tests/package/run.sh
else
    record "Debian package (cargo-deb, dpkg)" 0 "skipped (needs root and dpkg)"
fi

if [ "${SKIP_URING:-}" = 1 ]; then
    record "io_uring pass" 0 "skipped (SKIP_URING=1)"
else
    join "cargo test (io_uring)"
    check "conformance core (io_uring)" 900 "${CONFORMANCE[@]}" --suite core \
        --server-arg=--io --server-arg=uring --outdir "$ROOT/target/conformance-uring"
    check "conformance core over TLS (io_uring)" 900 "${CONFORMANCE[@]}" --suite core --tls \
        --server-arg=--io --server-arg=uring --outdir "$ROOT/target/conformance-uring-tls"
    HERALD_IO=uring PYTHONDONTWRITEBYTECODE=1 check "pytest (io_uring)" 300 "$VENV/bin/python" -m pytest -q \
        -p no:cacheprovider tests/python
    HERALD_IO=uring check "OpenAPI (schemathesis, io_uring)" 300 bash tests/openapi/run.sh
fi

join "fuzz smoke (seeds + 10 s per target)"
if [ "${SKIP_COMPRESSION:-}" = 1 ]; then
    record "conformance compression (12-13)" 0 "skipped (SKIP_COMPRESSION=1)"
else
    join "conformance compression (12-13)"
fi

print_table
if [ "${#FAILED_SECTIONS[@]}" != 0 ]; then
    banner "FAILED sections: ${FAILED_SECTIONS[*]}"
    exit 1
fi
banner "done: every section passed"
