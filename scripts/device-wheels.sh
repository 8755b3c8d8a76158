#!/usr/bin/env bash
# Wheels of the daemon's dependencies for a GPU machine that cannot reach a package index.
#
#   ./scripts/device-wheels.sh [DIR]          # default: .device/wheels (git-ignored)
#
# Run it here (where the package index is reachable) before sending the checkout to such a machine,
# and send DIR with it; scripts/gpu-check.sh installs from DIR, without network, whatever its Python
# lacks (into .device/site, put on PYTHONPATH), so the daemon-backed GPU tests run instead of skipping.
# A lent GPU machine typically has CUDA torch, numpy, msgpack, xxhash, psutil, pytest, uvloop and
# prometheus-client, but not pyzmq or zstandard (docs/HARDWARE.md). Target: CPython
# $DEVICE_PYTHON_VERSION (default 3.12) on x86-64 Linux (manylinux), binary wheels only. ~8 MB.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR="${1:-.device/wheels}"
PYVER="${DEVICE_PYTHON_VERSION:-3.12}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$DIR"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
    --python-version "$PYVER" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$DIR" "pyzmq>=25" "zstandard>=0.22" "pytest-timeout>=2.3"
echo "wheels for CPython $PYVER in $DIR:"
ls -1 "$DIR"
