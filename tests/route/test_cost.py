"""The router's arithmetic: what a cached prefix saves, what queued work costs, and the policies."""

from __future__ import annotations

import pytest

from polarkvd.route.cost import (
    EngineView,
    Policy,
    Reason,
    Weights,
    choose,
    cost,
    evicted,
    prefill_cost,
    shares,
)
from polarkvd.route.engines import Engine, EngineSpec
from polarkvd.route.prefixes import RouteKeys, SentPrefixes

W = Weights()


def test_a_prompt_cached_on_an_engines_gpu_costs_only_its_uncached_tail() -> None:
    assert prefill_cost(1000, EngineView("a", gpu=768), W) == 232
    assert prefill_cost(1000, EngineView("a"), W) == 1000
    # a hit longer than the prompt (the cache holds a longer conversation) saves the whole prompt
    assert prefill_cost(100, EngineView("a", gpu=512), W) == 0


def test_host_tiers_cost_their_weights_for_the_tokens_past_the_gpus_hit() -> None:
    w = Weights(dram=0.1, disk=0.5, pool=0.25)
    # 256 on the GPU, the host has 512 in DRAM and 512 on disk: 768 more from the host, 976 computed
    v = EngineView("a", gpu=256, dram=512, disk=512)
    assert prefill_cost(2000, v, w) == pytest.approx(768 * (0.5 * 0.1 + 0.5 * 0.5) + 976)
    # the pool covers what neither holds
    v = EngineView("a", pool=1500)
    assert prefill_cost(2000, v, w) == pytest.approx(1500 * 0.25 + 500)


def test_affinity_sends_a_follow_up_to_the_engine_holding_its_history() -> None:
    views = [EngineView("a"), EngineView("b", gpu=1024), EngineView("c", gpu=128)]
    assert choose(Policy.AFFINITY, 1200, views, W) == (1, Reason.AFFINITY)


def test_queued_work_outweighs_a_small_hit() -> None:
    views = [EngineView("a", gpu=128, queued_tokens=4000, requests=1), EngineView("b")]
    assert choose(Policy.AFFINITY, 1200, views, W)[0] == 1


def test_with_nothing_cached_the_least_busy_engine_wins_and_ties_rotate() -> None:
    views = [EngineView("a", requests=1), EngineView("b")]
    assert choose(Policy.AFFINITY, 500, views, W) == (1, Reason.COLD)
    idle = [EngineView("a"), EngineView("b")]
    assert {choose(Policy.AFFINITY, 500, idle, W, turn=t)[0] for t in range(4)} == {0, 1}


def test_past_the_imbalance_threshold_affinity_gives_way_to_the_least_loaded() -> None:
    views = [EngineView("a", gpu=4096, requests=20), EngineView("b", requests=2)]
    assert choose(Policy.AFFINITY, 5000, views, Weights(request=0, queued=0)) == (1, Reason.IMBALANCE)
    # below it, the hit wins
    views = [EngineView("a", gpu=4096, requests=5), EngineView("b", requests=2)]
    assert choose(Policy.AFFINITY, 5000, views, Weights(request=0, queued=0))[0] == 0


def test_round_robin_and_least_loaded() -> None:
    views = [EngineView("a", gpu=4096), EngineView("b", requests=3), EngineView("c", requests=1)]
    assert [choose(Policy.ROUND_ROBIN, 10, views, W, t)[0] for t in range(4)] == [0, 1, 2, 0]
    assert choose(Policy.LEAST_LOADED, 10, views, W) == (0, Reason.LEAST_LOADED)
    views[0].requests = 5
    assert choose(Policy.LEAST_LOADED, 10, views, W)[0] == 2


def test_bad_weights_and_no_engines_are_refused() -> None:
    with pytest.raises(ValueError, match="dram"):
        Weights(dram=-1)
    with pytest.raises(ValueError, match="queued"):
        Weights(queued=float("nan"))
    with pytest.raises(ValueError):
        choose(Policy.AFFINITY, 10, [], W)
    assert cost(100, EngineView("a", queued_tokens=50, requests=1), Weights(request=10)) == 160


CAP = 27 * 128  # a 28-block vLLM cache of 128-token blocks (one is its null block)


def test_a_new_conversation_goes_to_the_cache_that_holds_less_not_the_shorter_queue() -> None:
    # a holds two users' histories, b the one user's whose first prompt it is computing: the third
    # user's 660-token first turn waits less on a, but on a it is past a's share of what the caches
    # hold: as the three histories grow, a evicts at each of their turns
    a = EngineView("a", held=1280, capacity=CAP, requests=2)
    b = EngineView("b", held=656, capacity=CAP, queued_tokens=656, requests=1)
    assert choose(Policy.AFFINITY, 660, [a, b], W)[0] == 1
    share_a, share_b = shares(660, [a, b])
    assert share_a == share_b == (1280 + 656 + 660) / 2
    assert evicted(660, a, share_a) == 1280 + 660 - share_a and evicted(660, b, share_b) == 18
    # without the caches' sizes (an engine whose /metrics does not name them): the queue decides
    a.capacity = None
    assert choose(Policy.AFFINITY, 660, [a, b], W)[0] == 0
    # engines whose host's daemon keeps what they compute reload what they evict from DRAM: the
    # queue decides again
    a.capacity, a.stored, b.stored = CAP, True, True
    assert choose(Policy.AFFINITY, 660, [a, b], W)[0] == 0


def test_a_follow_up_does_not_recompute_its_history_elsewhere_for_a_queue_shorter_than_it() -> None:
    # user 3's second turn (702 tokens, 640 of them in a's cache) just after another user's cold
    # 662-token prompt went to a: waiting behind it costs this request about what computing its
    # history on the idle b would, but that is 640 tokens computed twice, which delay whoever
    # comes to b after it
    a = EngineView("a", gpu=640, queued_tokens=662, requests=2)
    b = EngineView("b", requests=1)
    assert choose(Policy.AFFINITY, 702, [a, b], W) == (0, Reason.AFFINITY)
    assert cost(702, b, W, least_computed=62) - cost(702, b, W) == 640
    # a queue far longer than its history still sends it away
    a.queued_tokens = 4000
    assert choose(Policy.AFFINITY, 702, [a, b], W)[0] == 1
    # with the pool holding its history, b loads it instead of computing it: nothing is computed
    # twice, and the queue sends it to b
    a.queued_tokens, a.pool, b.pool = 662, 640, 640
    assert choose(Policy.AFFINITY, 702, [a, b], W)[0] == 1
    # b holding two histories already: recomputing a third there would also crowd its cache
    a.pool = b.pool = 0
    a.queued_tokens = 1400
    b.held, a.held, a.capacity, b.capacity = 1408, 1280 + 662, CAP, CAP
    assert choose(Policy.AFFINITY, 702, [a, b], W)[0] == 0
    a.capacity = b.capacity = None
    assert choose(Policy.AFFINITY, 702, [a, b], W)[0] == 1


def test_a_prompt_past_a_full_caches_room_evicts_even_at_its_share() -> None:
    full = EngineView("a", held=CAP, capacity=CAP)
    assert evicted(660, full) == 660 and evicted(660, EngineView("b", held=0, capacity=CAP)) == 0
    assert evicted(660, EngineView("c")) == 0  # size unknown: no eviction assumed
    # only what the engine's own cache lacks needs room
    assert evicted(1100, EngineView("a", gpu=1024, held=CAP, capacity=CAP)) == 76
    # a follow-up stays on its full engine rather than compute its whole history on one with room
    views = [EngineView("a", gpu=1024, held=CAP, capacity=CAP, requests=1), EngineView("b", capacity=CAP)]
    assert choose(Policy.AFFINITY, 1100, views, W)[0] == 0


def test_an_engines_cache_is_its_blocks_and_what_it_holds_is_what_it_caches_and_computes() -> None:
    keys = RouteKeys("m")
    e = Engine(EngineSpec("http://127.0.0.1:1"), keys)
    assert e.capacity() is None  # its /metrics has not named its blocks yet
    e.blocks, e.block_tokens = 28, 128  # as the poll reads them
    assert e.capacity() == 27 * 128  # one block is vLLM's null block
    assert e.held() == 0
    e.sent.sent(keys.keys(list(range(640))))  # 5 blocks' worth sent to it (no events followed)
    assert e.held() == 5 * 128
    handle = e.queue(300)  # a prefill in flight: 3 more blocks
    assert e.held() == 8 * 128
    e.unqueue(handle)
    assert e.held(blocks=10) == 10 * 128  # its daemon's count of the blocks it holds (where's gpu_blocks)


def test_the_record_of_what_was_sent_is_a_bounded_prefix_tree() -> None:
    keys = RouteKeys("m")
    user_a = keys.keys(list(range(160)))  # 10 pages
    user_b = keys.keys([7] * 160)
    sent = SentPrefixes(capacity=16)
    sent.sent(user_a)
    assert sent.leading(user_a) == 10
    assert sent.leading(keys.keys(list(range(80)) + [1] * 80)) == 5  # shares its first 5 pages
    sent.sent(user_b)  # 20 pages in a 16-page record: the oldest prompt's deepest pages go first
    assert len(sent) == 16
    assert sent.leading(user_b) == 10
    assert sent.leading(user_a) == 6  # its head still counts: no orphaned tail
    # a prompt longer than the whole record keeps its head
    big = keys.keys(list(range(1000, 1000 + 16 * 40)))
    sent.sent(big)
    assert len(sent) == 16 and sent.leading(big) == 16
    with pytest.raises(ValueError):
        SentPrefixes(0)


def test_keys_name_their_model_and_whole_prefix() -> None:
    a, b = RouteKeys("m1"), RouteKeys("m2")
    assert a.keys(list(range(32))) != b.keys(list(range(32)))
    assert a.keys(list(range(32)))[0] == a.keys(list(range(16)) + [9] * 16)[0]
    assert len(a.keys(list(range(31)))) == 1  # whole pages only


def test_what_a_followed_engine_holds_is_its_stored_blocks_less_its_removed_ones() -> None:
    from polarkvd.server.engine_events import GpuPrefixes

    gpu = GpuPrefixes(bytes(16), 16)

    def stored(h: bytes, parent: bytes | None, tokens: list[int]) -> dict[str, object]:
        return {"type": "BlockStored", "block_hashes": [h], "parent_block_hash": parent, "token_ids": tokens,
                "block_size": len(tokens), "lora_id": None, "medium": "GPU", "lora_name": None}  # fmt: skip

    gpu.apply([stored(b"a", None, list(range(128))), stored(b"b", b"a", list(range(128, 256)))])
    assert gpu.blocks == 2 and len(gpu) == 16  # two 128-token blocks: 16 pages of 16
    gpu.apply([{"type": "BlockRemoved", "block_hashes": [b"b"], "medium": "GPU"}])
    assert gpu.blocks == 1 and gpu.removed_since_clear == 1
    gpu.apply([{"type": "AllBlocksCleared"}])
    assert gpu.blocks == 0 and gpu.removed_since_clear == 0 and gpu.counters["removed_blocks"] == 1
