#!/usr/bin/env bash
# The side-by-side peers of `polarkvd bench cluster` (docs/BENCHMARKS.md, "bench cluster"):
#   - redis-server (Debian package; installed with apt-get when running as root and it is missing),
#   - redis + hiredis (the Python client) into the project venv (.venv, or $VENV),
#   - Mooncake Store (PyPI mooncake-transfer-engine-non-cuda) into a venv of its own,
#     ~/.cache/polarkvd/bench/mooncake-venv (or $POLARKV_MOONCAKE_VENV), so its pins never touch .venv.
# Safe to run again: what is there is left alone. Prints what it did. The bench reports any peer
# that is still missing as "not available" with the reason; nothing here is needed for the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
MOONCAKE_VENV="${POLARKV_MOONCAKE_VENV:-$HOME/.cache/polarkvd/bench/mooncake-venv}"
MOONCAKE_PKG="mooncake-transfer-engine-non-cuda"
PY="${PYTHON:-python3}"

say() { echo "[setup-bench-peers] $*"; }

# 1. redis-server
if command -v redis-server >/dev/null 2>&1; then
    say "redis-server present: $(redis-server --version | head -n1)"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing redis-server with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
    # The package may start a system instance; the bench runs its own on a free port.
    say "installed: $(redis-server --version | head -n1)"
else
    say "redis-server missing and not root (or no apt-get): install it yourself; the bench skips Redis"
fi

# 2. redis-py + hiredis in the project venv
if [ ! -x "$VENV/bin/python" ]; then
    say "no $VENV/bin/python: run ./scripts/bootstrap.sh first"
    exit 1
fi
if "$VENV/bin/python" -c "import redis, hiredis" 2>/dev/null; then
    say "redis + hiredis present in $VENV: $("$VENV/bin/python" -c 'import redis, hiredis; print("redis", redis.__version__, "hiredis", hiredis.__version__)')"
else
    say "installing redis + hiredis into $VENV"
    "$VENV/bin/python" -m pip install --quiet "redis>=5" "hiredis>=2"
    say "installed: $("$VENV/bin/python" -c 'import redis, hiredis; print("redis", redis.__version__, "hiredis", hiredis.__version__)')"
fi

# 3. Mooncake Store in its own venv. Its native module links libibverbs.so.1 even for TCP (Debian
#    package libibverbs1; no RDMA device is needed).
mooncake_import() { "$MOONCAKE_VENV/bin/python" -c "from mooncake.store import MooncakeDistributedStore" 2>&1; }
mooncake_version() { "$MOONCAKE_VENV/bin/python" -m pip show "$MOONCAKE_PKG" 2>/dev/null | sed -n 's/^Version: //p'; }
if [ ! -x "$MOONCAKE_VENV/bin/python" ]; then
    say "creating $MOONCAKE_VENV"
    mkdir -p "$(dirname "$MOONCAKE_VENV")"
    "$PY" -m venv "$MOONCAKE_VENV"
fi
if [ -n "$(mooncake_version)" ]; then
    say "$MOONCAKE_PKG $(mooncake_version) present in $MOONCAKE_VENV"
else
    say "installing $MOONCAKE_PKG into $MOONCAKE_VENV (about 20 s)"
    "$MOONCAKE_VENV/bin/python" -m pip install --quiet --upgrade pip
    "$MOONCAKE_VENV/bin/python" -m pip install --quiet "$MOONCAKE_PKG"
    say "installed $MOONCAKE_PKG $(mooncake_version)"
fi
if ! err="$(mooncake_import)"; then
    if echo "$err" | grep -q "libibverbs" && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "Mooncake needs libibverbs.so.1: installing libibverbs1 with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libibverbs1 >/dev/null
    fi
fi
if err="$(mooncake_import)"; then
    say "Mooncake imports"
else
    say "Mooncake does not import (the bench will report it as not available): $(echo "$err" | tail -n1)"
fi
if [ -x "$MOONCAKE_VENV/bin/mooncake_master" ]; then
    say "mooncake_master found"
else
    say "mooncake_master not found in $MOONCAKE_VENV/bin; the bench will report Mooncake as not available"
fi
say "done"
