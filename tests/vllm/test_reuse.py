"""Two separate vLLM processes, one daemon: the second engine gets the first one's KV as hits.

The first engine computes a long prompt (chunked: 700 tokens, 256 per step), the first turn of a chat
(its answer decoded past a page boundary) and a salted prompt, then exits. A second engine, started as
a separate process, must load those prefixes from the daemon (`num_cached_tokens`, with vLLM's own
prefix cache empty) and produce exactly the greedy token ids of vLLM without polarkvd.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.vllm.conftest import BLOCK, DAEMON_SETS, Prompts, Reference, loaded

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

ENGINE = {"max_num_batched_tokens": 256}  # prompts longer than this are prefilled in chunks
LONG_TOKENS = 700
ANSWER_TOKENS = 80  # the first turn's answer: long enough to complete a page while decoding
SHORT = 8


@pytest.fixture(scope="module")
def shared(
    module_daemon_factory, vllm_module_factory, prompts: Prompts, reference: Reference
) -> dict[str, Any]:
    """The daemon, what the first engine did, and the second engine (started meanwhile).

    Takes `reference` so that engine starts booting first, alongside these two.
    """
    daemon = module_daemon_factory(DAEMON_SETS, name="shared")
    connector = {"socket": str(daemon.engine_socket)}
    first = vllm_module_factory(connector, **ENGINE)
    second = vllm_module_factory(connector, **ENGINE)  # starts up while the first one works
    long = prompts.document(LONG_TOKENS, seed=1)
    turn1 = prompts.chat(prompts.document(420, seed=2) + prompts.encode("\nWhat is a page key?"))
    first.ready()
    runs = {
        "long": first.generate([{"ids": long}], SHORT)[0],
        "turn1": first.generate([{"ids": turn1}], ANSWER_TOKENS)[0],
        "alice": first.generate([{"ids": long, "salt": "alice"}], SHORT)[0],
    }
    runs["first_stats"] = first.stats()
    first.close()  # the second engine must get everything from the daemon
    return {"daemon": daemon, "second": second.ready(), "long": long, "turn1": turn1, "first": runs}


def test_first_engine_computes_cold_and_stores_every_full_page(
    shared: dict[str, Any], reference: Reference
) -> None:
    first = shared["first"]
    assert first["long"]["cached"] == 0
    assert first["long"]["ids"] == reference.ids(shared["long"], SHORT)
    assert first["turn1"]["ids"] == reference.ids(shared["turn1"], ANSWER_TOKENS)
    stats = shared["daemon"].stats()
    # long: 5 pages; turn 1: every full page of prompt + answer (the last token's KV is never computed);
    # alice: the long prompt's 5 pages again, in another namespace.
    turn1_pages = (len(shared["turn1"]) + ANSWER_TOKENS - 1) // BLOCK
    assert stats["counters"]["stored_pages"] == 5 + turn1_pages + 5
    assert first["first_stats"].get("load_failed_blocks", 0) == 0


def test_second_engine_hits_a_chunked_prefill_prompt(shared: dict[str, Any], reference: Reference) -> None:
    long = shared["long"]
    second = shared["second"]
    got, blocks = loaded(second, lambda: second.generate([{"ids": long}], SHORT)[0])
    assert got["cached"] == (LONG_TOKENS - 1) // BLOCK * BLOCK == 640
    assert blocks == {"load_blocks": 5, "load_failed_blocks": 0}  # really copied in, not just promised
    assert got["ids"] == reference.ids(long, SHORT)


def test_second_engine_hits_a_conversations_whole_history(
    shared: dict[str, Any], reference: Reference, prompts: Prompts
) -> None:
    turn1 = shared["turn1"]
    answer = reference.ids(turn1, ANSWER_TOKENS)
    turn2 = prompts.chat(prompts.encode("And what does a hit on page five imply?"), history=turn1 + answer)
    second = shared["second"]
    got, blocks = loaded(second, lambda: second.generate([{"ids": turn2}], SHORT)[0])
    history_pages = (len(turn1) + ANSWER_TOKENS - 1) // BLOCK  # every full page the first engine computed
    assert history_pages * BLOCK > len(turn1)  # one of them was completed while decoding the answer
    assert got["cached"] == history_pages * BLOCK
    assert blocks == {"load_blocks": history_pages, "load_failed_blocks": 0}
    assert got["ids"] == reference.ids(turn2, SHORT)


def test_cache_salt_isolates_tenants(shared: dict[str, Any], reference: Reference) -> None:
    long = shared["long"]
    second = shared["second"]
    bob = second.generate([{"ids": long, "salt": "bob"}], SHORT)[0]
    alice, blocks = loaded(second, lambda: second.generate([{"ids": long, "salt": "alice"}], SHORT)[0])
    assert bob["cached"] == 0  # alice's pages (and the unsalted ones) are not bob's
    assert alice["cached"] == 640  # same salt as the first engine's run: hits
    assert blocks == {"load_blocks": 5, "load_failed_blocks": 0}
    assert bob["ids"] == alice["ids"] == reference.ids(long, SHORT)
