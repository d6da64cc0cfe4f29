#!/usr/bin/env bash
# The Debian package, end to end on this machine (root on Debian): built with cargo-deb
# from the release binaries, installed with dpkg (the user, the conffiles, `herald doctor`
# in postinst), started as the unit starts it, /healthz checked, then removed and purged,
# and nothing of it left (binaries, unit, user, group, /etc/herald).
#
# Where systemd runs as PID 1 the service is started with systemctl. Elsewhere (a
# container) the installed binary is started the way the unit would: its User= and
# Group=, Environment= and EnvironmentFile=, ExecStartPre= and ExecStart= read from the
# installed unit file, LimitNOFILE= through prlimit; the script says which it did.
# The test's listen address goes into /etc/default/herald (the unit's EnvironmentFile=,
# HERALD_LISTEN wins over the config file), on a free port: the package's own config
# serves the embedded default, 127.0.0.1:8080, which another test may hold.
#
#   bash tests/package/run.sh    (expects target/release/herald and herald-bench; cargo-deb)
#   PACKAGE_PROFILE=dev bash tests/package/run.sh    (debug binaries, for a quick check)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PROFILE=${PACKAGE_PROFILE:-release}
WORK=$(mktemp -d)
ENV_FILE=/etc/default/herald
PID=
INSTALLED=
cleanup() {
    [ -z "$PID" ] || kill "$PID" 2>/dev/null || true
    if [ -n "$INSTALLED" ]; then
        systemctl stop herald 2>/dev/null || true
        dpkg --purge herald >/dev/null 2>&1 || true
    fi
    rm -f "$ENV_FILE"
    rm -rf "$WORK"
}

fail() {
    echo "package test: $*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || fail "needs root (dpkg -i, a system user)"
command -v dpkg >/dev/null || fail "needs dpkg (Debian)"
command -v cargo-deb >/dev/null || fail "needs cargo-deb: cargo install cargo-deb --locked"
# Never touch a real installation, or an environment file someone wrote.
if dpkg -s herald >/dev/null 2>&1; then
    fail "a herald package is already installed here; this test installs and purges its own"
fi
[ ! -e "$ENV_FILE" ] || fail "$ENV_FILE exists; this test writes its own"
trap cleanup EXIT

echo "+ cargo deb ($PROFILE binaries)"
cargo deb -p herald --no-build --profile "$PROFILE" --no-strip --fast -o "$WORK/" 2>&1 | grep -v '^warning: \(dev profile\|license\)\|^ *To enable debug' || true
DEB=$(ls "$WORK"/herald_*.deb)
contents=$(dpkg-deb -c "$DEB")
for path in ./usr/bin/herald ./usr/bin/herald-bench ./usr/lib/systemd/system/herald.service \
    ./etc/herald/herald.toml ./etc/security/limits.d/herald.conf ./usr/lib/sysctl.d/99-herald.conf \
    ./usr/share/herald/grafana-dashboard.json ./usr/share/herald/openapi.json; do
    grep -q " $path\$" <<<"$contents" || fail "the package lacks $path"
done

echo "+ dpkg -i $(basename "$DEB")"
INSTALLED=1
dpkg -i "$DEB" | tee "$WORK/install.log"
grep -q "herald doctor" "$WORK/install.log" || fail "postinst did not run herald doctor"
dpkg-query -W -f='${Status}\n' herald | grep -qx "install ok installed" || fail "not installed"
dpkg-query -W -f='${Conffiles}\n' herald | grep -q "/etc/herald/herald.toml" ||
    fail "/etc/herald/herald.toml is not a conffile"
id herald >/dev/null || fail "postinst created no user herald"
[ "$(stat -c '%U:%G %a' /etc/herald/herald.toml)" = "root:herald 640" ] ||
    fail "/etc/herald/herald.toml is $(stat -c '%U:%G %a' /etc/herald/herald.toml), want root:herald 640"
# The shipped config serves the embedded default.
herald serve --help >/dev/null
grep -q '^listen' /etc/herald/herald.toml && fail "the shipped config sets listen"
UNIT=/usr/lib/systemd/system/herald.service
[ -f "$UNIT" ] || fail "no unit at $UNIT"
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify "$UNIT"
fi

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
echo "HERALD_LISTEN=127.0.0.1:$PORT" >"$ENV_FILE"

unit_value() {
    sed -n "s/^$1=//p" "$UNIT"
}
if [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm)" = systemd ]; then
    echo "+ systemd runs as PID 1: systemctl start herald"
    systemctl daemon-reload
    systemctl start herald
    PIDFILE_PID() { systemctl show -p MainPID --value herald; }
else
    echo "+ systemd is not PID 1 here ($(cat /proc/1/comm)): starting the installed binary as the unit would"
    user=$(unit_value User)
    group=$(unit_value Group)
    env_args=()
    while read -r assignment; do
        [ -n "$assignment" ] && env_args+=("$assignment")
    done < <(unit_value Environment)
    env_file=$(unit_value EnvironmentFile)
    env_file=${env_file#-}
    if [ -f "$env_file" ]; then
        while read -r assignment; do
            [ -n "$assignment" ] && [ "${assignment#\#}" = "$assignment" ] && env_args+=("$assignment")
        done <"$env_file"
    fi
    pre_line=$(unit_value ExecStartPre)
    # A leading "-": its failure is ignored, as systemd does.
    read -r -a pre <<<"${pre_line#-}"
    read -r -a start <<<"$(unit_value ExecStart)"
    nofile=$(unit_value LimitNOFILE)
    limit=(prlimit "--nofile=$nofile:$nofile")
    if ! prlimit "--nofile=$nofile:$nofile" true 2>/dev/null; then
        echo "  LimitNOFILE=$nofile is above this machine's fs.nr_open ($(cat /proc/sys/fs/nr_open)): started with $(ulimit -n) (what herald doctor reports)"
        limit=()
    fi
    as_unit=(setpriv "--reuid=$user" "--regid=$group" --init-groups env -i "${env_args[@]}")
    echo "  as $user:$group with ${env_args[*]}"
    echo "  ExecStartPre: ${pre[*]}"
    "${as_unit[@]}" "${pre[@]}" >"$WORK/pre.out" 2>&1 || true
    grep -q "connections" "$WORK/pre.out" || { cat "$WORK/pre.out" >&2; fail "ExecStartPre did not run herald doctor"; }
    echo "  ExecStart: ${start[*]}"
    "${limit[@]}" "${as_unit[@]}" "${start[@]}" >"$WORK/herald.out" 2>"$WORK/herald.err" &
    PID=$!
    PIDFILE_PID() { echo "$PID"; }
fi

health=
for _ in $(seq 100); do
    health=$(curl -fsS "http://127.0.0.1:$PORT/healthz" 2>/dev/null) && break
    sleep 0.1
done
[ -n "$health" ] || {
    cat "$WORK/herald.err" 2>/dev/null >&2 || journalctl -u herald --no-pager | tail -20 >&2
    fail "no /healthz on 127.0.0.1:$PORT"
}
[ "$health" = '{"status":"ok"}' ] || fail "/healthz said $health"
main=$(PIDFILE_PID)
[ "$(ps -o user= -p "$main")" = herald ] || fail "the server runs as $(ps -o user= -p "$main"), not herald"
echo "/healthz on 127.0.0.1:$PORT: $health (pid $main, user herald, config /etc/herald/herald.toml)"

if [ -n "$PID" ]; then
    kill -TERM "$PID"
    wait "$PID" || fail "herald exited with $? on SIGTERM"
    PID=
else
    systemctl stop herald
fi
rm -f "$ENV_FILE"

echo "+ dpkg --remove herald (the conffiles stay until purge)"
dpkg --remove herald
[ -f /etc/herald/herald.toml ] || fail "remove took the conffile"
[ ! -e /usr/bin/herald ] || fail "remove left /usr/bin/herald"
echo "+ dpkg --purge herald"
dpkg --purge herald
INSTALLED=
left=()
for path in /usr/bin/herald /usr/bin/herald-bench "$UNIT" /etc/herald \
    /etc/security/limits.d/herald.conf /usr/lib/sysctl.d/99-herald.conf /usr/share/herald \
    /usr/share/doc/herald; do
    [ ! -e "$path" ] || left+=("$path")
done
getent passwd herald >/dev/null && left+=("user herald")
getent group herald >/dev/null && left+=("group herald")
dpkg -s herald >/dev/null 2>&1 && left+=("the package's dpkg record")
[ "${#left[@]}" = 0 ] || fail "purge left: ${left[*]}"
echo "package test: installed, served /healthz, removed and purged with nothing left"
