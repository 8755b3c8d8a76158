"""The router's arithmetic: what a cached prefix saves, what queued work costs, and the policies."""

from __future__ import annotations

import pytest

from polarkvd.route.cost import EngineView, Policy, Reason, Weights, choose, cost, evicted, prefill_cost
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
    assert cost(100, EngineView("a", queued_tokens=50, requests=1), Weights(request=10, queued=1)) == 160


def test_a_follow_up_stays_with_its_history_behind_another_users_cold_prompt() -> None:
    # user 3's second turn (702 tokens, 640 of them in engine a's cache) just after another user's
    # cold 662-token prompt went to a: waiting behind it costs this request about what computing
    # its history again on the idle engine would, but that would also be 640 tokens of extra work
    # for b's next requests (and its cache): it stays
    views = [EngineView("a", gpu=640, queued_tokens=662, requests=2), EngineView("b", requests=1)]
    assert choose(Policy.AFFINITY, 702, views, W) == (0, Reason.AFFINITY)
    # a queue far longer than its history still sends it away
    views[0].queued_tokens = 4000
    assert choose(Policy.AFFINITY, 702, views, W)[0] == 1


def test_a_new_prompt_goes_where_it_evicts_no_one() -> None:
    # a's cache is full of three users' histories, b's has room: a new user's first turn on a would
    # push 660 tokens of their histories out (computed again at their next turns)
    full, roomy = EngineView("a", room=0), EngineView("b", room=2048, queued_tokens=400, requests=1)
    assert evicted(660, full) == 660 and evicted(660, roomy) == 0
    assert choose(Policy.AFFINITY, 660, [full, roomy], W)[0] == 1
    # unknown room (no block count from the engine): no eviction is assumed
    assert evicted(660, EngineView("c")) == 0
    # only what the engine's own cache lacks needs room
    assert evicted(1100, EngineView("a", gpu=1024, room=0)) == 76


def test_a_follow_up_stays_on_its_full_engine_rather_than_recompute_its_history() -> None:
    # its history's engine is full (its new tail evicts a little), the other has room but nothing
    views = [EngineView("a", gpu=1024, room=0, requests=1), EngineView("b", room=4096)]
    assert choose(Policy.AFFINITY, 1100, views, W)[0] == 0


def test_an_engines_room_is_its_blocks_less_what_its_cache_holds_and_what_is_in_flight() -> None:
    keys = RouteKeys("m")
    e = Engine(EngineSpec("http://127.0.0.1:1"), keys)
    assert e.room() is None  # its /metrics has not named its blocks yet
    e.blocks, e.block_tokens = 28, 128  # as the poll reads them
    assert e.room() == 27 * 128  # one block is vLLM's null block
    e.sent.sent(keys.keys(list(range(640))))  # 5 blocks' worth sent to it (no events followed)
    assert e.room() == 22 * 128
    handle = e.queue(300)  # a prefill in flight: 3 more blocks
    assert e.room() == 19 * 128
    e.unqueue(handle)
    assert e.room(held=10) == 17 * 128  # its daemon's count of the blocks it holds (where's gpu_blocks)
    e.sent.sent(keys.keys(list(range(10_000, 14_000))))  # more than it can hold: no room
    assert e.room() == 0


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
