"""The engine's load in `where`, with a real vLLM: the connector's scheduler side counts running and
waiting requests and the prompt tokens still to prefill, reports them (with the engine's URL), and
the daemon's answer goes back to zero when the engine runs out of work."""

from __future__ import annotations

import time

import pytest

from tests.vllm.conftest import DAEMON_SETS, Prompts

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]

URL = "http://127.0.0.1:8000"


def test_where_shows_a_real_engines_load_and_its_return_to_zero(
    daemon_factory, vllm_factory, prompts: Prompts
) -> None:
    daemon = daemon_factory(DAEMON_SETS, name="d")
    engine = vllm_factory({"socket": str(daemon.engine_socket), "engine_url": URL}, max_num_seqs=2).ready()
    docs = [prompts.document(400, seed=41 + i) for i in range(4)]
    sessions = daemon.stats()["sessions"]
    engine_id, model = next(
        (s["engine_id"], s["model"]) for s in sessions if s["engine_id"].endswith("-scheduler")
    )

    def load() -> dict:
        with daemon.control() as c:
            return c.where({"model": model, "salt": "", "tokens": docs[0]})["engine_load"].get(engine_id, {})

    # known with its URL from its start, before any request (routers find engines this way)
    at_start = load()
    assert at_start == {**at_start, "running": 0, "waiting": 0, "url": URL}
    # four requests, two run at a time: paused after the first step, two run and two wait
    engine.generate([{"ids": d} for d in docs], 4, pause_after=1)
    engine.expect("paused")
    busy = load()
    assert busy["running"] == 2 and busy["waiting"] == 2, busy
    # the waiting two have all their prompt still to compute (and the running ones may have some)
    assert 2 * 400 <= busy["queued_prefill_tokens"] <= 4 * 400, busy
    assert busy["url"] == URL and not busy["stale"]
    engine.resume()
    deadline = time.monotonic() + 30
    while (idle := load())["running"] or idle["waiting"] or idle["queued_prefill_tokens"]:
        assert time.monotonic() < deadline, f"the load did not go back to zero: {idle}"
        time.sleep(0.1)
    assert engine.stats("scheduler")["load_reports"] >= 2
