"""A conversation across two real vLLM processes on one daemon, with turns that end at odd places.

An empty system prompt, unicode in the user's text, a first turn one token past a block, a turn one
token short of the next block, the daemon restarted (its pages kept on disk) between two turns, and
a long single turn: every answer must be the greedy token ids of vLLM without polarkvd, and each
later turn must hit what the other engine stored, the first request of each engine after the restart
included (vLLM's own prefix cache is off).
"""

from __future__ import annotations

import pytest

from tests.vllm import conftest as vllm_fixtures
from tests.vllm.conftest import BLOCK, DAEMON_SETS, Prompts, Reference, VllmProc

# the fixtures of tests/vllm, for this file's engines
model_dir = vllm_fixtures.model_dir
vllm_session_tmp = vllm_fixtures.vllm_session_tmp
vllm_factory = vllm_fixtures.vllm_factory
prompts = vllm_fixtures.prompts
reference = vllm_fixtures.reference

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

ENGINE = {"max_num_batched_tokens": 256, "enable_prefix_caching": False}
ANSWER = 24


def _sized(p: Prompts, head: list[int], text: str, total: int, tail: list[int], seed: int) -> list[int]:
    """head + the user's text, padded with document tokens to make the whole prompt `total` long."""
    user = p.encode(text)
    pad = total - len(head) - len(user) - len(tail)
    assert pad >= 0, (total, len(head), len(user), len(tail))
    return head + user + p.document(pad, seed=seed)[:pad] + tail


def test_a_conversation_across_engines_and_a_daemon_restart_answers_as_vllm_alone(
    daemon_factory,
    vllm_factory,
    prompts: Prompts,
    reference: Reference,
) -> None:
    daemon = daemon_factory(DAEMON_SETS, name="d")
    connector = {"socket": str(daemon.engine_socket), "retry_seconds": 0.5}
    first: VllmProc = vllm_factory(connector, **ENGINE)
    second: VllmProc = vllm_factory(connector, **ENGINE)
    first.ready()
    second.ready()

    open_user = prompts.encode("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")  # empty system prompt
    close_user = prompts.encode("<|im_end|>\n<|im_start|>assistant\n")
    history: list[int] = []
    turns = [
        # (engine, prompt length, user text): ends 1 past a block, 1 short of one, 1 past (twice)
        (first, BLOCK + 1, "Ünïcödé: 日本語のテキスト, emoji 🚀🧪, and Ω≈ç√∫. Summarise: "),
        (second, 3 * BLOCK - 1, "Next question — «quoted», ‘curly’, tabs\tand\nnewlines: "),
        (first, 5 * BLOCK + 1, "Again, in one line: "),
        (second, 7 * BLOCK + 1, "And once more: "),
    ]
    hits = []
    for i, (engine, total, text) in enumerate(turns):
        head = history + prompts.encode("<|im_end|>\n<|im_start|>user\n") if history else open_user
        prompt = _sized(prompts, head, text, total, close_user, seed=40 + i)
        assert len(prompt) == total
        got = engine.generate([{"ids": prompt}], ANSWER)[0]
        assert got["ids"] == reference.ids(prompt, ANSWER), f"turn {i + 1} answered otherwise"
        assert got["cached"] <= len(prompt)
        hits.append(got["cached"])
        history = prompt + got["ids"]
        if i == 1:  # the daemon restarts between turns 2 and 3; its pages go to disk and come back
            daemon.stop()
            daemon.start()
    # Each turn after the first hits the full pages of the turn before, stored by the other engine;
    # turns 3 and 4 are each engine's first request after the restart: no request is served cold.
    assert hits[1] >= BLOCK, f"turn 2 missed turn 1's page: {hits}"
    assert hits[2] >= 2 * BLOCK, f"the first request after the restart was served cold: {hits}"
    assert hits[3] >= 5 * BLOCK, f"the other engine's first request after the restart was served cold: {hits}"

    # One long turn on the second engine, then the same prompt on the first: a hit of every full block.
    long = _sized(prompts, open_user, "Read this: ", 3000 + 1, close_user, seed=49)
    got = second.generate([{"ids": long}], 8)[0]
    assert got["ids"] == reference.ids(long, 8)
    again = first.generate([{"ids": long}], 8)[0]
    assert again["ids"] == reference.ids(long, 8)
    assert again["cached"] >= (len(long) // BLOCK - 1) * BLOCK, again["cached"]
