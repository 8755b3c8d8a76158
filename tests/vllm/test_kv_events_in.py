"""Events in, with a real vLLM: an engine started with `--kv-events-config` (a ZeroMQ publisher) is
followed by the daemon from its hello on, so `polarkvd where` says how much of a prompt that engine's
own GPU (here: CPU) prefix cache holds, and follows it when vLLM's cache is reset."""

from __future__ import annotations

import socket
import time

import pytest

from tests.vllm.conftest import BLOCK, DAEMON_SETS, Prompts

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_prefix(daemon, model: str, tokens: list[int]) -> int:
    """Tokens of `tokens` the attached engine's own prefix cache holds, as the daemon's `where` says."""
    with daemon.control() as c:
        engines = c.where({"model": model, "salt": "", "tokens": tokens})["engines"]
    return max(engines.values(), default=0)


def wait_for(what, want, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    got = what()
    while not want(got):
        assert time.monotonic() < deadline, f"timed out; last answer {got}"
        time.sleep(0.1)
        got = what()
    return got


def test_where_follows_a_real_engines_own_prefix_cache(
    daemon_factory, vllm_factory, prompts: Prompts
) -> None:
    daemon = daemon_factory(DAEMON_SETS, name="d")
    events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{free_port()}",
        "replay_endpoint": f"tcp://*:{free_port()}",
    }
    engine = vllm_factory(
        {"socket": str(daemon.engine_socket)}, enable_prefix_caching=True, kv_events_config=events
    ).ready()
    doc = prompts.document(600, seed=31)
    engine.generate([{"ids": doc}], 4)
    sessions = daemon.stats()["sessions"]
    model = next(s["model"] for s in sessions if s["engine_id"].endswith("-scheduler"))
    # vLLM holds every full block of the prompt in its own cache: the daemon saw them stored
    full = len(doc) // BLOCK * BLOCK
    held = wait_for(lambda: engine_prefix(daemon, model, doc), lambda n: n >= full - BLOCK)
    assert full - BLOCK <= held <= full
    other = prompts.document(300, seed=32)
    assert engine_prefix(daemon, model, other) == 0  # never computed by this engine
    # vLLM forgets its cache (AllBlocksCleared, published with its next step): the daemon's view of
    # that engine follows, and holds the new prompt instead
    engine.reset_prefix_cache()
    engine.generate([{"ids": other}], 4)
    wait_for(lambda: engine_prefix(daemon, model, doc), lambda n: n == 0)
    assert (
        wait_for(lambda: engine_prefix(daemon, model, other), lambda n: n > 0) == len(other) // BLOCK * BLOCK
    )
