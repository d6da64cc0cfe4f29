#!/usr/bin/env bash
# Browser tests: the demo page (GET /) and herald.js in Debian's Chromium, driven by
# playwright-core, plus herald.js in Node against a scripted server and the real one.
# Installs what is missing (as root on Debian: the chromium, nodejs and npm packages; npm
# packages into tests/browser/node_modules), and fails, saying what to install, where it
# cannot. Builds nothing: expects target/release/herald (or
# $HERALD_BIN). The screenshot lands in target/browser/demo.png.
#
#   bash tests/browser/run.sh
set -euo pipefail

cd "$(dirname "$0")"
ROOT=$(cd ../.. && pwd)
export HERALD_BIN=${HERALD_BIN:-$ROOT/target/release/herald}
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
export CHROMIUM

if [ ! -x "$HERALD_BIN" ]; then
    echo "no herald binary at $HERALD_BIN: run 'cargo build --release' first" >&2
    exit 1
fi

missing=()
[ -x "$CHROMIUM" ] || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ "${#missing[@]}" != 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "+ apt-get install ${missing[*]}"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    else
        echo "missing: ${missing[*]} (CHROMIUM=$CHROMIUM; Node 18+): install these Debian packages" >&2
        exit 1
    fi
fi
"$CHROMIUM" --version 2>/dev/null | head -n 1 || true
# playwright-core never downloads a browser; say so anyway.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
if ! cmp -s package-lock.json node_modules/.herald-installed-lock; then
    echo "+ npm ci"
    npm ci --no-audit --no-fund --loglevel=error
    cp package-lock.json node_modules/.herald-installed-lock
fi

mkdir -p "$ROOT/target/browser"
echo "+ node --test client.test.js demo.test.js state.test.js"
exec node --test --test-concurrency=1 \
    --test-reporter=spec --test-reporter-destination=stdout \
    --test-reporter=./summary-reporter.mjs --test-reporter-destination=stdout \
    client.test.js demo.test.js state.test.js
