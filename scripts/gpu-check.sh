#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, as one command for a GPU machine (docs/HARDWARE.md):
#
#   ./scripts/gpu-check.sh [bench options, e.g. --pool 4GiB --page 16MiB]
#
# 1. the host: nvidia-smi, the Python used;
# 2. the L1 probe: the `vram: ...` line the daemon would log;
# 3. the GPU tests (tests/tiers/test_vram_gpu.py: real cuMemAlloc, copies checked byte for byte,
#    cuMemHostRegister of a shared-memory mapping, the IPC handle opened from a second process);
#    then, where the venv has the daemon's dependencies, a real daemon with [vram] enabled, and,
#    where it also has CUDA torch, L1 end to end (tests/test_vram_e2e_gpu.py: two engine processes
#    storing and loading GPU to GPU byte-exact, demotion under pressure, a SIGKILLed engine), and
#    the vLLM connector's CUDA copies without vLLM (tests/connectors/test_kv_copy_gpu.py: the arena
#    page-locked and copied by DMA, L1 pages device to device, a layer-pipelined load's events, the
#    staging fallback; a daemon without a disk tier, so pyzmq and zstandard are not needed);
# 4. the bandwidth table (python -m polarkvd.bench.vram): D2D inside the pool, D2H/H2D with a pinned
#    arena-like mapping, the same through pageable memory, and a host memcpy.
#
# Needs no network: .venv/bin/python when it exists, else python3 (or $PYTHON) with this checkout on
# PYTHONPATH; the daemon's dependencies that Python lacks are installed from .device/wheels when
# it is there (./scripts/device-wheels.sh, run where a package index is reachable). The GPU part of
# steps 2-4 needs only the standard library (pytest when present, else the test file's own
# runner). Talks to the driver's libcuda directly: no CUDA toolkit or CUDA
# torch is needed. Takes about a minute; each step has a time limit. Exit status: 0 when every step
# passed (skips count as passed only in step 3's daemon test), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# A machine with no package index: the daemon's dependencies its Python lacks come from wheels sent
# with the checkout (./scripts/device-wheels.sh made them), installed once into .device/site.
if ! "$PY" -c 'import zmq, zstandard' 2>/dev/null && ls .device/wheels/*.whl >/dev/null 2>&1; then
    echo "installing the daemon's missing dependencies from .device/wheels (no network) into .device/site"
    "$PY" -m pip install --quiet --no-index --no-deps --target .device/site .device/wheels/*.whl \
        || echo "(could not install them: the daemon-backed steps will skip)"
fi
if [ -d .device/site ]; then
    export PYTHONPATH="$PYTHONPATH:$PWD/.device/site"
fi
status=0
step() { printf '\n== %s\n' "$*"; }

step "host"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,uuid,pci.bus_id,driver_version,memory.total,memory.used --format=csv
else
    echo "nvidia-smi: not on PATH"
fi
"$PY" -c 'import platform, sys; print("python", platform.python_version(), sys.executable)'
echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>}"

step "probe (python -m polarkvd.bench.vram --probe)"
timeout 60 "$PY" -m polarkvd.bench.vram --probe || status=1

step "GPU tests (tests/tiers/test_vram_gpu.py)"
if "$PY" -c 'import pytest' 2>/dev/null; then
    # --noconftest: tests/conftest.py needs the daemon's dependencies; the GPU tests do not.
    timeout 240 "$PY" -m pytest -m gpu --noconftest -p no:cacheprovider -v -rs \
        -o addopts="" tests/tiers/test_vram_gpu.py || status=1
else
    echo "(pytest is not importable here: running the file's own runner)"
    timeout 240 "$PY" tests/tiers/test_vram_gpu.py || status=1
fi

step "a daemon with [vram] enabled (tests/tiers/test_vram.py -k daemon)"
if "$PY" -c 'import pytest, numpy, msgpack, zmq, xxhash, psutil, zstandard' 2>/dev/null; then
    timeout 120 "$PY" -m pytest -p no:cacheprovider -v -rs -o addopts="" \
        tests/tiers/test_vram.py -k daemon || status=1
else
    echo "skipped: this Python lacks the daemon's dependencies (build .venv with ./scripts/bootstrap.sh)"
fi

step "L1 end to end (tests/test_vram_e2e_gpu.py: engines with CUDA torch, store_cuda/load_into_cuda)"
if "$PY" -c 'import pytest, numpy, msgpack, zmq, xxhash, psutil, zstandard, torch' 2>/dev/null; then
    timeout 300 "$PY" -m pytest -m gpu -p no:cacheprovider -v -rs -o addopts="" \
        tests/test_vram_e2e_gpu.py || status=1
else
    echo "skipped: this Python lacks the daemon's dependencies or torch (CUDA torch is the engine side)"
fi

step "the vLLM connector's CUDA copies (tests/connectors/test_kv_copy_gpu.py: CudaMover, no vLLM needed)"
if "$PY" -c 'import pytest, numpy, msgpack, xxhash, torch, polarkvd.daemon' 2>/dev/null; then
    timeout 180 "$PY" -m pytest -m gpu -p no:cacheprovider -v -rs -o addopts="" \
        tests/connectors/test_kv_copy_gpu.py || status=1
else
    echo "skipped: this Python lacks torch or the daemon's core dependencies (numpy, msgpack, xxhash)"
fi

step "bandwidth (python -m polarkvd.bench.vram $*)"
timeout 180 "$PY" -m polarkvd.bench.vram "$@" || status=1

step "result"
if [ "$status" = 0 ]; then echo "gpu-check: all steps passed"; else echo "gpu-check: FAILED (see above)"; fi
exit "$status"
