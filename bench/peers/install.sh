#!/usr/bin/env bash
# Installs the process managers roster-bench measures Roster beside, from the package
# registries, into folders under target/ (never system-wide, but for the load generator):
#
#   target/bench-peers/venv/   supervisord and circus (PyPI), in a Python venv
#   target/bench-peers/npm/    pm2 (npm)
#   wrk                        the HTTP load generator, Debian's package (apt-get)
#
# Idempotent: what is there already is kept, so a second run takes a second or two.
# A peer that cannot be installed is written to target/bench-peers/<peer>.failed with the
# reason; roster-bench then reports it as "not measured: <reason>". The script itself exits
# 0 unless it cannot even create its folder, so one missing peer never stops the others.
set -uo pipefail
cd "$(dirname "$0")/../.."

dir="${ROSTER_BENCH_PEERS:-target/bench-peers}"
mkdir -p "$dir" || exit 1
dir="$(cd "$dir" && pwd)"

# Versions pinned so that a run measures the same peers as the table in docs/BENCHMARKS.md.
SUPERVISOR_VERSION=4.2.5
CIRCUS_VERSION=0.19.0
PM2_VERSION=5.4.3

fail() { # peer, reason
    echo "install.sh: $1 not installed: $2" >&2
    printf '%s\n' "$2" >"$dir/$1.failed"
}

# Python peers: one venv for both.
py="$(command -v python3 || true)"
if [ -z "$py" ]; then
    fail supervisord "python3 is not on PATH"
    fail circus "python3 is not on PATH"
else
    if [ ! -x "$dir/venv/bin/python" ]; then
        "$py" -m venv "$dir/venv" >"$dir/venv.log" 2>&1 || true
    fi
    if [ ! -x "$dir/venv/bin/python" ]; then
        fail supervisord "python3 -m venv failed (see $dir/venv.log)"
        fail circus "python3 -m venv failed (see $dir/venv.log)"
    else
        if [ -x "$dir/venv/bin/supervisord" ] && "$dir/venv/bin/supervisord" --version >/dev/null 2>&1; then
            rm -f "$dir/supervisord.failed"
        elif "$dir/venv/bin/pip" install -q --disable-pip-version-check \
            "supervisor==$SUPERVISOR_VERSION" >"$dir/supervisord.log" 2>&1; then
            rm -f "$dir/supervisord.failed"
        else
            fail supervisord "pip install supervisor==$SUPERVISOR_VERSION failed (see $dir/supervisord.log)"
        fi
        if [ -x "$dir/venv/bin/circusd" ] && "$dir/venv/bin/python" -c 'import circus' >/dev/null 2>&1; then
            rm -f "$dir/circus.failed"
        elif "$dir/venv/bin/pip" install -q --disable-pip-version-check \
            "circus==$CIRCUS_VERSION" >"$dir/circus.log" 2>&1; then
            rm -f "$dir/circus.failed"
        else
            fail circus "pip install circus==$CIRCUS_VERSION failed (see $dir/circus.log)"
        fi
    fi
fi

# pm2, from npm, into a prefix of its own.
if [ -x "$dir/npm/node_modules/.bin/pm2" ]; then
    rm -f "$dir/pm2.failed"
elif ! command -v npm >/dev/null 2>&1; then
    fail pm2 "npm is not on PATH"
elif mkdir -p "$dir/npm" && npm install --prefix "$dir/npm" --no-audit --no-fund --loglevel=error \
    "pm2@$PM2_VERSION" >"$dir/pm2.log" 2>&1; then
    rm -f "$dir/pm2.failed"
else
    fail pm2 "npm install pm2@$PM2_VERSION failed (see $dir/pm2.log)"
fi

# wrk: Debian's package. Without it the get scenario uses the bench's own load loop.
if command -v wrk >/dev/null 2>&1; then
    rm -f "$dir/wrk.failed"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    if (apt-get install -y -qq wrk || { apt-get update -qq && apt-get install -y -qq wrk; }) \
        >"$dir/wrk.log" 2>&1; then
        rm -f "$dir/wrk.failed"
    else
        fail wrk "apt-get install wrk failed (see $dir/wrk.log)"
    fi
else
    fail wrk "wrk is not on PATH and apt-get needs root"
fi

ls "$dir"/*.failed >/dev/null 2>&1 && echo "install.sh: some peers are missing; see above" >&2
exit 0
