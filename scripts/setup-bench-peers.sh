#!/usr/bin/env bash
# The side-by-side peers of the benchmarks (docs/BENCHMARKS.md):
# `polarkvd bench cluster` ("bench cluster"):
#   - redis-server (Debian package; installed with apt-get when running as root and it is missing),
#   - redis + hiredis (the Python client) into the project venv (.venv, or $VENV),
#   - Mooncake Store (PyPI mooncake-transfer-engine-non-cuda) into a venv of its own,
#     ~/.cache/polarkvd/bench/mooncake-venv (or $POLARKV_MOONCAKE_VENV), so its pins never touch .venv.
# `polarkvd bench chat` ("bench chat"), the real peers of the vLLM connector:
#   - lmcache 0.5.6 (LMCacheMPConnector + LMCache's multiprocess server) and
#     mooncake-transfer-engine-non-cuda 0.3.13.post1 (MooncakeStoreConnector, mooncake_master,
#     mooncake_client), into ~/.cache/polarkvd/bench/vllm-peers (or $POLARKV_BENCH_PEERS); see 4.
# Safe to run again: what is there is left alone. Prints what it did. The bench reports any peer
# that is still missing as "not available" with the reason; nothing here is needed for the tests
# (the peer tests skip with the reason).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
MOONCAKE_VENV="${POLARKV_MOONCAKE_VENV:-$HOME/.cache/polarkvd/bench/mooncake-venv}"
MOONCAKE_PKG="mooncake-transfer-engine-non-cuda"
PEERS="${POLARKV_BENCH_PEERS:-$HOME/.cache/polarkvd/bench/vllm-peers}"
LMCACHE_VERSION="0.5.6"
MOONCAKE_VERSION="0.3.13.post1"
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
# 4. bench chat's real peers, importable inside the vLLM worker process.
#    vLLM ships the connector classes (LMCacheMPConnector, MooncakeStoreConnector) and they import the
#    peer's package in the engine's own process, so the peers must import with .venv's vLLM and torch.
#    They are not installed into .venv: lmcache's declared requirements (cupy-cuda13x, cuda-python,
#    numba, numpy<=2.2.6, transformers>=5.4, setuptools<81, ...) cannot all hold beside vLLM's CPU
#    build, so a normal install would change .venv's packages and a --no-deps one would leave it
#    inconsistent (pip check) and put lmcache on every project process's path (numba in a vLLM
#    process breaks its start, FACTS). Instead both wheels go --no-deps into a folder of their own,
#    with only the few dependencies .venv lacks that their code paths here import (aiofile, aiofiles,
#    caio, sortedcontainers, redis, nvtx); the bench puts that folder first on PYTHONPATH for the peer's
#    vLLM worker and its servers only. Nothing in it shadows .venv (it holds nothing .venv has), and
#    removing the folder removes them. Mooncake's own dependencies (aiohttp, requests, msgpack) are
#    vLLM's too.
peer_py() { PYTHONPATH="$PEERS" "$VENV/bin/python" "$@"; }
# pip install --no-deps into the folder; its output only when it fails.
peer_install() {
    local out
    if ! out="$("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
        --target "$PEERS" "$@" 2>&1)"; then
        echo "$out" | grep -v "is ignored" >&2
        return 1
    fi
}
peer_version() { peer_py -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null || true; }
mkdir -p "$PEERS"
for spec in "lmcache==$LMCACHE_VERSION" "$MOONCAKE_PKG==$MOONCAKE_VERSION"; do
    name="${spec%%==*}" want="${spec##*==}"
    have="$(peer_version "$name")"
    if [ "$have" = "$want" ]; then
        say "$name $have present in $PEERS"
    else
        say "installing $name $want into $PEERS (--no-deps${have:+, replacing $have})"
        peer_install "$spec"
        say "installed $name $(peer_version "$name")"
    fi
done
for dep in aiofile:aiofile aiofiles:aiofiles caio:caio sortedcontainers:sortedcontainers redis:redis nvtx:nvtx; do
    pkg="${dep%%:*}" mod="${dep##*:}"
    if "$VENV/bin/python" -c "import $mod" 2>/dev/null; then
        say "$pkg: from $VENV"
    elif [ -n "$(peer_version "$pkg")" ]; then
        say "$pkg $(peer_version "$pkg") present in $PEERS"
    else
        say "installing $pkg into $PEERS (--no-deps)"
        peer_install "$pkg"
        say "installed $pkg $(peer_version "$pkg")"
    fi
done
for bin in mooncake_master mooncake_client; do
    if [ -f "$PEERS/mooncake/$bin" ]; then chmod +x "$PEERS/mooncake/$bin"; fi
done
# What the bench needs, checked the way it uses it (in .venv's Python with the folder on the path).
if err="$(peer_py -c "import lmcache.v1.multiprocess.server, lmcache.integration.vllm.vllm_multi_process_adapter" 2>&1)"; then
    say "lmcache imports (server and vLLM adapter)"
else
    say "lmcache does not import (bench chat will report it as not available): $(echo "$err" | tail -n1)"
fi
if err="$(peer_py -c "from mooncake.store import MooncakeDistributedStore" 2>&1)"; then
    say "mooncake.store imports; mooncake_master and mooncake_client in $PEERS/mooncake"
else
    say "mooncake.store does not import (bench chat will report it as not available): $(echo "$err" | tail -n1)"
fi
say "done"
