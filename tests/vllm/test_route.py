"""`polarkvd route` in front of two real vLLM OpenAI servers (CPU, SmolLM2, one core each, both with
polarkvd's connector on one daemon), following each one's own prefix cache through its KV events and
the daemon's tiers through `where`: a user's follow-up turns go to the engine holding the user's
history, a stream arrives token by token, the prefill/decode split answers as one engine does, and a
killed engine's users are served by the other. The servers start once for the module (the kill is
the last test)."""

from __future__ import annotations

import asyncio
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, clean_env
from tests.vllm.conftest import DAEMON_SETS

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

_TOPIC = (
    "Write about subject {u}: the history of harbour {u} on coast {c}, its ships, its {n} lighthouses, "
    "the trade in salt and wool through gate {g}, and what the archive in hall {h} says of year {y}. "
)


KV_TRANSFER = (
    '{"kv_connector":"PolarKVConnector","kv_connector_module_path":"polarkvd.connectors.vllm",'
    '"kv_role":"kv_both","kv_load_failure_policy":"recompute"}'
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 420.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"{url}: exited ({proc.returncode}):\n{log.read_text(errors='replace')[-4000:]}"
            )
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise AssertionError(f"{url} not up in {timeout}s:\n{log.read_text(errors='replace')[-4000:]}")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # vLLM's EngineCore and Worker too
    except ProcessLookupError:
        pass
    proc.wait()


class Engine:
    """One `python -m vllm.entrypoints.openai.api_server`, bound to one core, publishing KV events."""

    def __init__(self, model: str, core: int, logs: Path, engine_socket: Path) -> None:
        self.port, self.ev, self.replay = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmpdir = tempfile.mkdtemp(prefix="pkv-")  # short: vLLM's ipc socket paths
        self.log = logs / f"vllm-{core}.log"
        events = {
            "enable_kv_cache_events": True, "publisher": "zmq",
            "endpoint": f"tcp://*:{self.ev}", "replay_endpoint": f"tcp://*:{self.replay}",
        }  # fmt: skip
        env = clean_env(
            VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND=str(core), OMP_NUM_THREADS="1",
            VLLM_ENABLE_V1_MULTIPROCESSING="0", TMPDIR=self.tmpdir, TOKENIZERS_PARALLELISM="false",
            POLARKV_SOCKET=str(engine_socket),
        )  # fmt: skip
        args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--enforce-eager",
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-model-len", "2048",
            "--max-num-batched-tokens", "512", "--enable-prompt-tokens-details", "--seed", "0",
            "--enable-prefix-caching", "--kv-events-config", json.dumps(events), "--served-model-name", "smollm2",
            "--kv-transfer-config", KV_TRANSFER,
        ]  # fmt: skip
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(
                args, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def spec(self) -> list[str]:
        return [
            "--engine",
            self.url,
            f"events=tcp://127.0.0.1:{self.ev}",
            f"replay=tcp://127.0.0.1:{self.replay}",
        ]

    def close(self) -> None:
        stop(self.proc)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def start_router(args: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m polarkvd route ARGS` on a free port, up (its /health answers 200)."""
    port = free_port()
    env = clean_env(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "polarkvd", "route", "--port", str(port), "--poll-interval", "0.5", *args],
            stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc, log, timeout=120)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def chat(url: str, messages: list[dict[str, str]], max_tokens: int = 8) -> tuple[str, dict[str, Any]]:
    """(the engine that served it, the response)"""
    body = {"model": "smollm2", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    req = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return r.headers.get("X-PolarKV-Engine", ""), json.loads(r.read())


class Rig:
    def __init__(
        self,
        engines: list[Engine],
        router: subprocess.Popen[bytes],
        url: str,
        model: str,
        logs: Path,
        daemon: Any,
    ) -> None:
        self.engines, self.router, self.url, self.model, self.logs, self.daemon = (
            engines, router, url, model, logs, daemon,
        )  # fmt: skip

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 8) -> tuple[str, dict[str, Any]]:
        return chat(self.url, messages, max_tokens)


@pytest.fixture(scope="module")
def rig(
    model_dir: str, tmp_path_factory: pytest.TempPathFactory, module_daemon_factory: Any
) -> Iterator[Rig]:
    logs = tmp_path_factory.mktemp("route")
    daemon = module_daemon_factory(DAEMON_SETS, name="route")
    engines = [Engine(model_dir, core, logs, daemon.engine_socket) for core in (0, 1)]
    router = None
    try:
        for e in engines:
            wait_http(e.url + "/v1/models", e.proc, e.log)
        args = [
            "--model",
            model_dir,
            "--daemon",
            str(daemon.control_socket),
            *engines[0].spec(),
            *engines[1].spec(),
        ]
        router, url = start_router(args, logs / "router.log")
        yield Rig(engines, router, url, model_dir, logs, daemon)
    finally:
        if router is not None:
            stop(router)
        for e in engines:
            e.close()


def first_turn(u: int) -> list[dict[str, str]]:
    text = "".join(
        _TOPIC.format(u=u, c=u * 7 + i, n=i + 2, g=u * 3 + i, h=i * 11 + u, y=1700 + 13 * u + i)
        for i in range(5)
    )
    return [{"role": "user", "content": text}]


def test_a_stream_arrives_token_by_token(rig: Rig) -> None:
    async def go() -> tuple[list[str], int]:
        import aiohttp

        body = {"model": "smollm2", "messages": first_turn(99), "max_tokens": 24, "temperature": 0,
                "ignore_eos": True, "stream": True}  # fmt: skip
        pieces: list[str] = []
        reads = 0
        async with (
            aiohttp.ClientSession() as http,
            http.post(rig.url + "/v1/chat/completions", json=body) as r,
        ):
            assert r.status == 200
            buf = b""
            async for chunk in r.content.iter_any():
                reads += 1
                buf += chunk
                *events, buf = buf.split(b"\n\n")
                for ev in events:
                    data = ev.removeprefix(b"data: ")
                    if data != b"[DONE]":
                        pieces += [c["delta"].get("content") or "" for c in json.loads(data)["choices"]]
        return pieces, reads

    pieces, reads = asyncio.run(go())
    assert sum(1 for p in pieces if p) >= 20  # one event per token
    # the router passed them on as they came: a buffered answer would arrive in one or two reads
    assert reads >= 12, f"{len(pieces)} events in only {reads} reads"


def test_each_users_follow_up_turns_go_to_the_engine_holding_its_history(rig: Rig) -> None:
    users = {u: first_turn(u) for u in range(4)}
    home: dict[int, str] = {}
    for turn in range(3):
        for u, msgs in users.items():
            engine, out = rig.chat(msgs)
            cached = out["usage"]["prompt_tokens_details"]["cached_tokens"]
            if turn == 0:
                home[u] = engine
            else:
                assert engine == home[u], (
                    f"user {u}, turn {turn + 1}: sent to {engine}, its history is on {home[u]}"
                )
                assert cached >= 256, f"user {u}, turn {turn + 1}: only {cached} prompt tokens cached"
            msgs += [
                {"role": "assistant", "content": out["choices"][0]["message"]["content"]},
                {"role": "user", "content": f"Tell me more about part {turn + 1} of subject {u}."},
            ]
    assert set(home.values()) == {e.url for e in rig.engines}, "the users' first turns all went to one engine"


def test_the_prefill_decode_split_answers_as_one_engine_does(rig: Rig) -> None:
    pre, dec = rig.engines
    split, url = start_router(
        ["--model", rig.model, "--prefill", *pre.spec()[1:], "--decode", *dec.spec()[1:]], rig.logs / "pd.log"
    )
    try:
        msgs = first_turn(50)  # a prompt neither engine has seen
        engine, out = chat(url, msgs, max_tokens=16)
    finally:
        stop(split)
    assert engine == dec.url
    # the decode engine never computed this prompt: what it did not compute it loaded from polarkvd
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] >= 256
    _, whole = chat(pre.url, msgs, max_tokens=16)  # the same request answered by one engine
    assert out["choices"][0]["message"]["content"] == whole["choices"][0]["message"]["content"]


def test_with_an_engine_killed_its_users_are_served_by_the_other(rig: Rig) -> None:
    victim, survivor = rig.engines
    stop(victim.proc, signal.SIGKILL)
    for u in range(4):
        engine, out = rig.chat(first_turn(u) + [{"role": "assistant", "content": "Yes."},
                                               {"role": "user", "content": "And then?"}])  # fmt: skip
        assert engine == survivor.url and out["choices"][0]["message"]["content"]
    with urllib.request.urlopen(rig.url + "/health", timeout=5) as r:
        assert json.loads(r.read())["engines"] == {victim.url: False, survivor.url: True}
    assert rig.router.poll() is None
