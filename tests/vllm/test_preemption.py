"""Preempted requests: vLLM frees their blocks and later resumes them; the connector loads their stored
pages into the new blocks (its block bookkeeping follows the resumed block list) and answers match.

This engine also runs with two vLLM blocks per polarkvd page (page_blocks=2, 256-token pages)."""

from __future__ import annotations

import pytest

from tests.vllm.conftest import DAEMON_SETS, Prompts, Reference

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]


def test_preempted_requests_resume_from_their_stored_pages(
    daemon_factory, vllm_factory, reference: Reference, prompts: Prompts
) -> None:
    daemon = daemon_factory(DAEMON_SETS, name="d")
    # 12 blocks of 128 tokens: four 360-token prompts fill them (3 blocks each); each needs a 4th block
    # at token 384 while decoding, so vLLM must preempt. vLLM's own prefix cache is off: whatever a
    # resumed request does not recompute comes from polarkvd.
    engine = vllm_factory(
        {"socket": str(daemon.engine_socket), "page_blocks": 2},
        max_num_batched_tokens=512,
        enable_prefix_caching=False,
        num_gpu_blocks_override=12,
        max_model_len=1024,
    ).ready()
    batch = [prompts.document(360, seed=20 + i) for i in range(4)]
    got = engine.generate([{"ids": p} for p in batch], 40)
    scheduler, worker = engine.stats("scheduler"), engine.stats("worker")
    assert scheduler["resumed_requests"] >= 1
    # each resumed request reloads at least its first page (256 tokens = 2 blocks)
    assert worker["load_blocks"] >= 2 * scheduler["resumed_requests"]
    assert worker.get("load_failed_blocks", 0) == 0
    for prompt, out in zip(batch, got):
        assert out["ids"] == reference.ids(prompt, 40)
