#!/usr/bin/env bash
# SGLang's Python package for the HiCache storage backend's tests and `polarkvd bench sglang`, on a
# machine without a GPU, beside .venv's CPU torch (after scripts/setup-vllm.sh):
#
#   ./scripts/setup-sglang.sh            (./scripts/bootstrap.sh --with-sglang runs it)
#
# SGLang 0.5.23 has no CPU build: its requirements pin CUDA-only packages (sglang-kernel, flashinfer,
# torch 2.14.1, ...), so a normal install cannot happen here and would replace .venv's torch. Its
# HiCache classes (host pools, HiCacheController, the storage backends) do run on CPU, so:
#   1. sglang==$SGLANG_VERSION goes --no-deps into a folder of its own,
#      ~/.cache/polarkvd/sglang (or $POLARKV_SGLANG), never into .venv;
#   2. with the few pure-Python modules its HiCache imports need that .venv (vLLM's CPU build:
#      torch, transformers, msgspec, ...) lacks: orjson, IPython, traitlets;
#   3. and torchvision, which SGLang's model configs import: the wheel matching .venv's torch
#      (0.N+15 for torch 2.N), without its compiled parts (they link CUDA torch and cannot load
#      here) and with its fake-op registrations made conditional on those parts, exactly as its
#      other registrations already are. Image ops then fail when called; nothing here calls them.
# The tests (tests/sglang) and the bench put the folder first on PYTHONPATH for their SGLang
# processes only; .venv and every other process are unchanged, and removing the folder removes it
# all. It holds nothing .venv has. Safe to run again: what is there is left alone.
#
# On a GPU host SGLang is installed the normal way instead (pip install "sglang==0.5.23" in the
# environment that serves the model, then pip install polarkvd there): docs/SGLANG.md.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
DEST="${POLARKV_SGLANG:-$HOME/.cache/polarkvd/sglang}"
SGLANG_VERSION="0.5.23"

say() { echo "[setup-sglang] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
    say "no $VENV/bin/python: run ./scripts/bootstrap.sh --with-vllm first"
    exit 1
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    say "no torch in $VENV: run ./scripts/setup-vllm.sh (PYTHON=$VENV/bin/python) first"
    exit 1
fi
start=$(date +%s)
sgl_py() { PYTHONPATH="$DEST${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" "$@"; }
# What the backend, its tests and the bench import, checked the way they import it.
check_imports() {
    sgl_py - <<'EOF' 2>&1
import warnings
warnings.filterwarnings("ignore")
import sglang
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheFile  # noqa: F401
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: F401
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: F401
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost  # noqa: F401
from sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller import HybridCacheController  # noqa: F401
print("sglang", sglang.__version__)
EOF
}
installed_version() { sgl_py -c "import importlib.metadata as m; print(m.version('sglang'))" 2>/dev/null || true; }
# pip install --no-deps into the folder; its output only when it fails.
folder_install() {
    local out
    if ! out="$("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
        --target "$DEST" "$@" 2>&1)"; then
        echo "$out" | grep -v "is ignored" >&2
        return 1
    fi
}

if [ "$(installed_version)" = "$SGLANG_VERSION" ] && out="$(check_imports)"; then
    say "present in $DEST: $(echo "$out" | tail -n1)"
    exit 0
fi

mkdir -p "$DEST"
if [ "$(installed_version)" != "$SGLANG_VERSION" ]; then
    say "installing sglang $SGLANG_VERSION into $DEST (--no-deps, ~40 MB)"
    folder_install "sglang==$SGLANG_VERSION"
fi
for dep in orjson:orjson ipython:IPython traitlets:traitlets; do
    pkg="${dep%%:*}" mod="${dep##*:}"
    if "$VENV/bin/python" -c "import $mod" 2>/dev/null || [ -d "$DEST/$mod" ]; then
        continue
    fi
    say "installing $pkg into $DEST (--no-deps)"
    folder_install "$pkg"
done

if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null && ! sgl_py -c "import torchvision" 2>/dev/null; then
    tv="$("$VENV/bin/python" -c 'import torch; v = torch.__version__.split("+")[0].split("."); print(f"0.{int(v[1]) + 15}.{v[2]}")')"
    say "installing torchvision $tv into $DEST without its compiled parts (see the top of this script)"
    folder_install "torchvision==$tv"
    rm -rf "$DEST"/torchvision/*.so "$DEST"/torchvision.libs
    sed -i -E 's/^@torch\.library\.register_fake\("torchvision::([A-Za-z0-9_]+)"\)$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))/' \
        "$DEST/torchvision/_meta_registrations.py"
fi

say "checking imports (SGLang's import takes 10-20 s)..."
if ! out="$(check_imports)"; then
    say "error: SGLang's HiCache classes do not import with $DEST on the path:"
    echo "$out" | tail -n 5 >&2
    exit 1
fi
say "$(echo "$out" | tail -n1) imports; $(du -sh "$DEST" | cut -f1) in $DEST; done in $(( $(date +%s) - start )) s"
