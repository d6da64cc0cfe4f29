#!/usr/bin/env bash
# The HTTP API against its OpenAPI document (src/http/openapi.json, served at
# GET /api/openapi.json): schemathesis generates and mutates requests for every operation
# and checks every response (status, headers, content type, body schema), no 5xx and no
# request left unanswered, on a herald started with --api-key, a JWT secret and presence,
# then on one without them (publishing and the server API refused, clients anonymous).
# Credentials come from the document's security schemes (schemathesis.toml); requests
# without them and with wrong ones are part of the run (the `ignored_auth` check).
#
#   bash tests/openapi/run.sh      (expects target/release/herald and the .venv of tests/run.sh)
set -euo pipefail
# The server runs on the backend HERALD_IO names, else on epoll (the product's default,
# `auto`, is io_uring where it works; tests/run.sh runs this again with HERALD_IO=uring).
export HERALD_IO=${HERALD_IO:-epoll}
case $HERALD_IO in epoll | uring) ;; *) echo "HERALD_IO: name epoll or uring, not $HERALD_IO" >&2; exit 2 ;; esac
cd "$(dirname "$0")/../.."
ROOT=$PWD
HERALD=${HERALD_BIN:-$ROOT/target/release/herald}
PY=$ROOT/.venv/bin/python
WORK=$(mktemp -d)
PID=
cleanup() {
    [ -z "$PID" ] || kill "$PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

export HERALD_TEST_API_KEY=openapi-test-key
SECRET=openapi-test-secret-of-at-least-32-bytes
# An HS256 token for every channel, valid for an hour.
HERALD_TEST_TOKEN=$("$PY" - "$SECRET" <<'PY'
import base64, hashlib, hmac, json, sys, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b64(json.dumps({"sub": "schemathesis", "channels": ["*"], "publish": ["*"],
                       "exp": int(time.time()) + 3600}).encode())
sig = hmac.new(sys.argv[1].encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
print(f"{head}.{body}.{b64(sig)}")
PY
)
export HERALD_TEST_TOKEN

# start NAME ARGS...: a herald on a free port (ADDR, PID) running the backend asked for.
start() {
    local name=$1
    shift
    "$HERALD" serve --listen 127.0.0.1:0 --threads 2 "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    PID=$!
    ADDR=
    for _ in $(seq 100); do
        ADDR=$(sed -n 's/^listening on //p' "$WORK/$name.out")
        [ -n "$ADDR" ] && break
        sleep 0.1
    done
    [ -n "$ADDR" ] || { cat "$WORK/$name.err" >&2; exit 1; }
    # The backend asked for is the one that runs.
    local want="io backend $HERALD_IO"
    for _ in $(seq 50); do
        grep -qx "io backend .*" "$WORK/$name.out" && break
        sleep 0.1
    done
    grep -qx "$want" "$WORK/$name.out" || {
        echo "herald should print '$want'; it printed:" >&2
        cat "$WORK/$name.out" "$WORK/$name.err" >&2
        exit 1
    }
}

# check NAME ARGS...: schemathesis against the server started as NAME; then it must
# still be running, and is stopped.
status=0
check() {
    local name=$1
    shift
    echo "=== schemathesis: $name"
    PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$ROOT/tests/openapi" SCHEMATHESIS_HOOKS=hooks \
        "$ROOT/.venv/bin/schemathesis" --config-file "$ROOT/tests/openapi/schemathesis.toml" run \
        "http://$ADDR/api/openapi.json" --url "http://$ADDR" --checks all --workers 1 \
        --seed "${SCHEMATHESIS_SEED:-1}" --no-color "$@" || status=$?
    kill -0 "$PID" 2>/dev/null || {
        echo "herald exited during the run" >&2
        cat "$WORK/$name.err" >&2
        exit 1
    }
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=
}

# With the API key, a JWT secret (tokens required on /ws, /sse, /poll) and presence.
start keyed --api-key "$HERALD_TEST_API_KEY" --jwt-secret "$SECRET" --presence

# The document the server serves is the file in the repository, byte for byte.
"$PY" - "$ADDR" "$ROOT/src/http/openapi.json" <<'PY'
import sys, urllib.request
served = urllib.request.urlopen(f"http://{sys.argv[1]}/api/openapi.json", timeout=10).read()
assert served == open(sys.argv[2], "rb").read(), "served document differs from src/http/openapi.json"
PY
check keyed "$@"

# Without them: publishing and the server API refused (403 whatever is sent: they are
# off, not locked, so the checks that a missing credential gets 401 do not apply), clients
# anonymous. Fewer examples: the operations' answers are mostly the refusal.
start open
check open --max-examples 5 --exclude-checks missing_required_header "$@"
exit "$status"
