"""The documented command line: vLLM's OpenAI server, with its scheduler in the EngineCore process and
the model in a Worker process (vLLM's default), stores pages and hits them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import clean_env
from tests.vllm.conftest import DAEMON_SETS, Prompts, Reference

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]

#: Exactly as docs/VLLM.md tells users to write it.
KV_TRANSFER_CONFIG = (
    '{"kv_connector":"PolarKVConnector","kv_connector_module_path":"polarkvd.connectors.vllm",'
    '"kv_role":"kv_both","kv_load_failure_policy":"recompute"}'
)
SHORT = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiServer:
    def __init__(self, model: str, engine_socket: Path, tmp: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = model
        # A short private TMPDIR: vLLM puts ZeroMQ ipc sockets there (paths of at most 107 bytes).
        self.tmpdir = tempfile.mkdtemp(prefix="pkv-")
        self.log_path = tmp / "server.log"
        env = clean_env(
            POLARKV_SOCKET=str(engine_socket),  # how the connector finds the daemon by default
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_CPU_OMP_THREADS_BIND="0-1",
            TMPDIR=self.tmpdir,
        )
        args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--enforce-eager",
            "--kv-transfer-config", KV_TRANSFER_CONFIG,
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-model-len", "4096",
            "--max-num-batched-tokens", "256", "--enable-prompt-tokens-details", "--seed", "0",
            "--no-enable-prefix-caching",
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vLLM server exited ({self.proc.returncode}):\n{self.log()[-5000:]}")
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=2).read()
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise AssertionError(f"vLLM server not up in {timeout}s:\n{self.log()[-5000:]}")

    def complete(self, prompt: list[int], max_tokens: int, **extra: Any) -> dict[str, Any]:
        body = {
            "model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, **extra,
        }  # fmt: skip
        req = urllib.request.Request(
            self.url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # EngineCore and Worker too
        except ProcessLookupError:
            pass
        self.proc.wait()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


@pytest.fixture
def api_server(model_dir: str, tmp_path: Path):
    servers: list[ApiServer] = []

    def start(engine_socket: Path) -> ApiServer:
        s = ApiServer(model_dir, engine_socket, tmp_path)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def test_openai_server_stores_and_hits_across_its_processes(
    daemon_factory, api_server, reference: Reference, prompts: Prompts
) -> None:
    daemon = daemon_factory(DAEMON_SETS, name="d")
    server = api_server(daemon.engine_socket)
    long = prompts.document(700, seed=7)
    want = reference.ids(long, SHORT)
    server.wait_ready()

    cold = server.complete(long, SHORT)
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert cold["choices"][0]["token_ids"] == want
    assert daemon.stats()["counters"]["stored_pages"] == 5  # by the Worker process

    # vLLM's own prefix cache is off: this hit can only come from polarkvd, planned by the scheduler in
    # EngineCore (keys, block ids) and carried out by the Worker.
    hit = server.complete(long, SHORT)
    assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] == 640
    assert hit["choices"][0]["token_ids"] == want
    assert daemon.stats()["counters"]["loaded_pages"] == 5

    salted = server.complete(long, SHORT, cache_salt="tenant-b")
    assert salted["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert salted["choices"][0]["token_ids"] == want
    assert "Traceback" not in server.log()
