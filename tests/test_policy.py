"""Eviction policies: order, leaf-first through the veto, atomic victims, scan resistance, switching.

Pure in-process tests over policy nodes, plus the manager's use of them with an injected clock
(no daemon, no sleeps).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from polarkvd.keys import page_keys
from polarkvd.policy import (
    POLICIES,
    CostPolicy,
    FrequencySketch,
    LRUPolicy,
    PolicyNode,
    S3FIFOPolicy,
    make_policy,
    switch_policy,
)
from polarkvd.types import Tier
from tests.conftest import TEST_NS, make_manager, manager_store


class Node(PolicyNode):
    __slots__ = ("children", "parent")

    def __init__(self, key: bytes, parent: Node | None = None) -> None:
        super().__init__(key)
        self.children = 0
        self.parent = parent
        if parent is not None:
            parent.children += 1


def k(i: int) -> bytes:
    return i.to_bytes(16, "little")


def leaf(node: PolicyNode) -> bool:
    return node.children == 0  # type: ignore[attr-defined]


def anything(node: PolicyNode) -> bool:
    return True


def evict(policy, n: int = 1, veto=leaf) -> list[Node]:  # type: ignore[no-untyped-def]
    """What a tier does: take victims, then unlink them from their parents."""
    out = policy.victims(n, veto)
    for node in out:
        if node.parent is not None:
            node.parent.children -= 1
    return out


def chain(start: int, n: int) -> list[Node]:
    nodes: list[Node] = []
    for i in range(n):
        nodes.append(Node(k(start + i), nodes[-1] if nodes else None))
    return nodes


@pytest.fixture(params=sorted(POLICIES))
def policy(request: pytest.FixtureRequest) -> Iterator:
    yield make_policy(request.param)


def test_lru_evicts_least_recently_used_first() -> None:
    p = LRUPolicy()
    nodes = [Node(k(i)) for i in range(6)]
    for n in nodes:
        p.insert(n)
    p.touch(nodes[0])
    p.touch(nodes[3])
    order = [n.key for n in evict(p, 6, anything)]
    assert order == [k(1), k(2), k(4), k(5), k(0), k(3)]
    assert len(p) == 0


def test_leaf_first_through_the_veto(policy) -> None:  # type: ignore[no-untyped-def]
    # Roots were admitted first, so they are the oldest: without the veto they would go first.
    nodes = chain(0, 4)
    for n in nodes:
        policy.insert(n)
    order = [evict(policy)[0].key for _ in range(4)]
    assert order == [k(3), k(2), k(1), k(0)]
    # a pinned-style veto that refuses everything frees nothing
    policy.insert(Node(k(9)))
    assert policy.victims(1, lambda n: False) == [] and len(policy) == 1


def test_leaf_first_across_chains(policy) -> None:  # type: ignore[no-untyped-def]
    a, b = chain(0, 3), chain(10, 3)
    for n in a + b:
        policy.insert(n)
    victims = [evict(policy)[0] for _ in range(6)]
    for v in victims:  # no page ever leaves while a child of it is still cached
        assert v.children == 0
    positions = {v.key: i for i, v in enumerate(victims)}
    for ch in (a, b):
        assert positions[ch[2].key] < positions[ch[1].key] < positions[ch[0].key]


def _state(p) -> tuple[list[bytes], list[int]]:  # type: ignore[no-untyped-def]
    nodes = list(p.coldest_first())
    return [n.key for n in nodes], [n.aux for n in nodes]


def _populate(policy) -> list[Node]:  # type: ignore[no-untyped-def]
    nodes = [Node(k(i)) for i in range(10)]
    for n in nodes:
        policy.insert(n)
    for n in nodes[::3]:
        policy.touch(n)  # some hit pages (S3-FIFO moves these to main while it scans)
    for _ in range(3):
        evict(policy, 1, anything)
    return nodes


def test_victims_is_atomic(policy) -> None:  # type: ignore[no-untyped-def]
    nodes = _populate(policy)
    pinned = {n.key for n in nodes[5:]}
    before = _state(policy)
    size = len(policy)
    assert policy.victims(size - len(pinned) + 1, lambda n: n.key not in pinned) == []
    assert _state(policy) == before and len(policy) == size
    assert policy.victims(size + 1, anything) == []
    assert _state(policy) == before and len(policy) == size
    # a failed call is invisible: from here on the policy evicts exactly like a twin that never saw it
    twin = make_policy(policy.name)
    _populate(twin)
    assert [n.key for n in policy.victims(size, anything)] == [n.key for n in twin.victims(size, anything)]


def test_remove_and_reinsert_are_safe(policy) -> None:  # type: ignore[no-untyped-def]
    a, b = Node(k(1)), Node(k(2))
    policy.insert(a)
    policy.insert(a)  # twice: still one entry
    policy.remove(b)  # not linked: no-op
    policy.insert(b)
    policy.remove(a)
    assert len(policy) == 1 and [n.key for n in evict(policy, 1, anything)] == [k(2)]
    assert policy.victims(0, anything) == []


def _run_scan(policy, capacity: int, hot: int, scan: int) -> set[bytes]:  # type: ignore[no-untyped-def]
    """A cache of `capacity` pages: a hot working set hit repeatedly, then one pass over `scan` new keys."""
    resident: set[bytes] = set()

    def admit(node: Node) -> None:
        while len(policy) >= capacity:
            (victim,) = policy.victims(1, anything)
            resident.discard(victim.key)
        policy.insert(node)
        resident.add(node.key)

    working = [Node(k(i)) for i in range(hot)]
    for n in working:
        admit(n)
    for _ in range(2):
        for n in working:
            policy.touch(n)
    for i in range(scan):
        admit(Node(k(10_000 + i)))
    return resident & {n.key for n in working}


def test_s3fifo_resists_a_scan_that_flushes_lru() -> None:
    hot = 20
    assert _run_scan(LRUPolicy(), capacity=60, hot=hot, scan=500) == set()  # the scan flushes LRU
    assert len(_run_scan(S3FIFOPolicy(), capacity=60, hot=hot, scan=500)) == hot


def test_s3fifo_ghost_readmits_to_main() -> None:
    p = S3FIFOPolicy()
    first = Node(k(1))
    p.insert(first)
    for i in range(2, 30):
        p.insert(Node(k(i)))
    evicted = p.victims(1, anything)
    assert [n.key for n in evicted] == [k(1)]  # never hit: leaves from the small queue at once
    again = Node(k(1))
    p.insert(again)  # its key is a ghost: it comes back straight into main
    for i in range(30, 40):
        p.insert(Node(k(i)))
    out = [n.key for n in p.victims(20, anything)]
    assert k(1) not in out


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("lru", "s3fifo"),
        ("s3fifo", "lru"),
        ("lru", "lru"),
        ("s3fifo", "s3fifo"),
        ("lru", "cost"),
        ("cost", "s3fifo"),
    ],
)
def test_switch_policy_keeps_every_node(src: str, dst: str) -> None:
    old = make_policy(src)
    nodes = [Node(k(i)) for i in range(100)]
    for n in nodes:
        old.insert(n)
    for n in nodes[::7]:
        old.touch(n)
    coldest = [n.key for n in old.coldest_first()]
    new = switch_policy(old, dst)
    assert new.name == dst and len(new) == 100 and len(old) == 0
    assert {n.key for n in new.coldest_first()} == {n.key for n in nodes}
    # carried over coldest first: with the history reset, the new policy evicts in the old order
    freed = [n.key for n in new.victims(100, anything)]
    assert freed == coldest
    assert len(new) == 0


def worth(values: dict[bytes, float]):  # type: ignore[no-untyped-def]
    """A valuer from a table: seconds saved per byte by keeping each page."""
    return lambda node: values[node.key]


def test_cost_keeps_the_pages_dear_to_recompute() -> None:
    p = CostPolicy()
    values = {k(i): (1e-9 if i % 2 else 1e-12) for i in range(100)}  # odd: 1000x dearer
    p.valuer = worth(values)
    nodes = [Node(k(i)) for i in range(100)]
    for n in nodes:
        p.insert(n)
    freed = {int.from_bytes(n.key, "little") for n in p.victims(50, anything)}
    assert freed == set(range(0, 100, 2))  # every cheap page before any dear one, whatever its age


def test_cost_ages_out_a_dear_page_nobody_hits() -> None:
    """Inflation: each victim raises the floor, so a dear page that is never hit again sinks below
    cheap pages that keep being hit, and goes."""
    p = CostPolicy()
    values = {k(0): 1e-9, **{k(i): 1e-10 for i in range(1, 40)}}
    p.valuer = worth(values)
    dear = Node(k(0))
    p.insert(dear)
    for round_ in range(30):
        hot = [Node(k(1 + (round_ % 39)))]
        for n in hot:
            p.insert(n)
            p.touch(n)
        if dear.prev is None:
            break
        p.victims(1, anything)
    assert dear.prev is None, "the dear page was never evicted"


def test_cost_without_values_is_lru() -> None:
    cost, lru = CostPolicy(), LRUPolicy()
    nodes = {name: [Node(k(i)) for i in range(50)] for name in ("cost", "lru")}
    for p, name in ((cost, "cost"), (lru, "lru")):
        for n in nodes[name]:
            p.insert(n)
        for i in (3, 17, 5, 40):
            p.touch(nodes[name][i])
    assert [n.key for n in cost.victims(50, anything)] == [n.key for n in lru.victims(50, anything)]


def test_cost_scores_every_page_when_the_sample_has_too_few_evictable() -> None:
    p = CostPolicy()
    p.SAMPLE = 8
    nodes = [Node(k(i)) for i in range(64)]
    for n in nodes:
        p.insert(n)
    late = {n.key for n in nodes[40:]}
    got = p.victims(4, lambda node: node.key in late)  # none of the 32 least recent are evictable
    assert len(got) == 4 and all(n.key in late for n in got)


def test_cost_finds_the_lowest_leaf_among_10000_when_the_lowest_are_vetoed() -> None:
    """10,000 candidates scored at once: the partial sort's first picks are all vetoed (parents,
    leaf-first), and the victim is still the evictable page of lowest priority."""
    p = CostPolicy()
    p.SAMPLE = 10_000
    nodes = [Node(k(i)) for i in range(10_000)]
    rng = random.Random(4)
    for n in nodes:
        p.insert(n)
        n.aux = rng.randrange(1 << 40)
    ranked = sorted(nodes, key=lambda n: n.aux)
    parents = {n.key for n in ranked[:500]}  # the 500 lowest may not go
    got = p.victims(2, lambda n: n.key not in parents)
    assert [n.key for n in got] == [n.key for n in ranked[500:502]]


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="mru"):
        make_policy("mru")


# ------------------------------------------------------------------------------ the manager's use of the policy


def test_manager_lookup_touches_leaf_first_so_roots_outlive_leaves() -> None:
    m, _clock = make_manager(32)  # one 1 MiB slab: 32 pages
    s = m.attach(TEST_NS, "t")

    chains = [page_keys(s.ns.digest, list(range(i * 1000, i * 1000 + 16 * 8)), 16) for i in range(4)]
    for c in chains:
        manager_store(m, s, c)
    assert m.index.ready_pages == 32
    tiers, _ = m.lookup(s, chains[0])  # chain 0 is hot again; chains 1..3 are colder
    assert tiers == [Tier.DRAM] * 8
    manager_store(m, s, page_keys(s.ns.digest, list(range(90_000, 90_000 + 16 * 12)), 16))  # needs 12 slots
    hits = [len(m.lookup(s, c)[0]) for c in chains]
    # chain 1 (coldest) went entirely, then chain 2 lost its last 4 pages but keeps its root half;
    # the recently used chain 0 is intact
    assert hits == [8, 0, 4, 8]
    assert m.counters["evicted_pages_dram_capacity"] == 12
    assert m.allocator.used_bytes <= m.allocator.capacity


def test_manager_policy_switch_keeps_pages() -> None:
    m, _clock = make_manager(32)
    s = m.attach(TEST_NS, "t")

    keys = page_keys(s.ns.digest, list(range(16 * 20)), 16)
    manager_store(m, s, keys)
    m.set_policy(Tier.DRAM, "s3fifo")
    assert m.stats()["tiers"]["dram"]["policy"] == "s3fifo" and len(m.policy) == 20
    assert len(m.lookup(s, keys)[0]) == 20
    m.set_policy(Tier.DRAM, "lru")
    assert len(m.policy) == 20 and m.index.ready_pages == 20


def test_cost_frequency_halves_every_turnover_of_the_tier() -> None:
    """A page's hits decay with a half-life of one turnover: as many pages admitted as the tier
    holds. Three hits and its admission make 4; after 100 admissions through a tier of 100 pages it
    counts 2, and a hit then makes 3."""
    p = CostPolicy()
    hot = Node(k(0))
    p.valuer = lambda node: 1e-6 if node is hot else 1e-12
    for i in range(1, 100):
        p.insert(Node(k(i)))
    p.insert(hot)
    for _ in range(3):
        p.touch(hot)
    assert p.frequency(hot) == pytest.approx(4, abs=0.15)
    for i in range(100, 200):
        p.insert(Node(k(i)))
        assert p.victims(1, anything)[0] is not hot
    assert p.frequency(hot) == pytest.approx(2, abs=0.15)
    p.touch(hot)
    assert p.frequency(hot) == pytest.approx(3, abs=0.15)


def test_the_sketch_counts_uses_never_fewer_and_halves_after_its_window() -> None:
    """The frequency sketch (TinyLFU) behind drop-or-demote: a key's estimate is never below its
    uses, exact for a few keys, and every count halves once `window` uses were added."""
    sketch = FrequencySketch(window=FrequencySketch.MIN_WINDOW)
    rng = random.Random(1)
    true: dict[bytes, int] = {}
    for _ in range(5000):
        key = k(int(rng.paretovariate(1.0)) % 3000)
        sketch.add(key)
        true[key] = true.get(key, 0) + 1
    assert all(sketch.estimate(key) >= min(n, 255) for key, n in true.items())  # one byte a counter
    assert sum(sketch.estimate(key) == min(n, 255) for key, n in true.items()) >= 0.95 * len(true)
    assert sketch.estimate(k(999_999)) == 0
    hot = k(1)  # the most used (Pareto draws are 1 or more)
    before = sketch.estimate(hot)
    for i in range(FrequencySketch.MIN_WINDOW - 5000):
        sketch.add(k(10_000 + i))
    assert before == 255 and sketch.estimate(hot) == 127


def test_cost_counts_one_use_per_request_in_its_sketch() -> None:
    """A page's uses: its admission, then one per request's lookup (hit); the same request's load
    (hit=False) counts nothing."""
    p = CostPolicy()
    p.sketch = FrequencySketch()
    nodes = chain(0, 3)
    for node in nodes:
        p.insert(node)
    for _ in range(4):
        p.touch_many(nodes[::-1], hit=True)
        p.touch_many(nodes[::-1], hit=False)
    assert [p.sketch.estimate(node.key) for node in nodes] == [5, 5, 5]


def test_cost_admits_a_page_worth_less_than_its_last_victim_at_the_lowest_priority() -> None:
    """DRAM admission by worth (W-TinyLFU weighed by cost): once the tier has let a page go, a
    page coming in worth less (uses lately x value) than that victim enters as the next victim
    instead of pushing out the pages used more; one worth more enters as before. A request's hit
    lifts a page admitted low; its own load does not."""
    p = CostPolicy()
    p.sketch = FrequencySketch()
    p.valuer = lambda node: 1e-6  # every page worth the same per byte: uses decide
    popular = [Node(k(i)) for i in range(4)]
    for node in popular:
        p.insert(node)
    for _ in range(3):  # used by three more requests each
        p.touch_many(popular, hit=True)
    cold = Node(k(100))
    p.insert(cold)
    assert p.admitted_low == 0  # nothing let go yet: no bar
    assert evict(p) == [cold]  # the least worth, as before
    p.touch_many(popular, hit=True)
    assert evict(p) == [popular[0]]  # room for more: a popular page goes (4 uses) ...
    rare = Node(k(101))
    p.insert(rare)  # ... and a page used once comes in below it
    assert p.admitted_low == 1
    p.touch_many([rare], hit=False)  # its own request's load: still the lowest
    assert p.next_victim(anything) is rare
    liked = Node(k(102))
    for _ in range(8):  # a page used often before (the sketch remembers it across its stays)
        p.sketch.add(liked.key)
    p.insert(liked)
    assert p.admitted_low == 1  # worth more than the bar: admitted as before
    p.touch_many([rare], hit=True)  # a second request for it: it rises
    assert p.next_victim(anything) is not rare
    assert evict(p, 2)[0] is not rare


def test_without_a_sketch_cost_admits_every_page_alike() -> None:
    """The disk tier's `cost` (no sketch) and a policy before its owner attached one: no admission."""
    p = CostPolicy()
    p.valuer = lambda node: 1e-6
    nodes = [Node(k(i)) for i in range(3)]
    for node in nodes:
        p.insert(node)
    evict(p)
    p.insert(Node(k(9)))
    assert p.admitted_low == 0 and p.bar == 0


def test_the_admission_bar_ages_with_the_sketch() -> None:
    """The bar is a count taken when its victim left: once the sketch has halved its counts, a page
    used as often as that victim was, counted after, clears it (not admitted low for ever)."""
    p = CostPolicy()
    p.sketch = FrequencySketch()
    p.valuer = lambda node: 1e-6
    old = Node(k(1))
    for _ in range(4):
        p.sketch.add(old.key)
    p.insert(old)
    evict(p, veto=anything)
    assert p.bar == pytest.approx(5e-6)
    for i in range(FrequencySketch.MIN_WINDOW):  # a window of other pages: every count halves
        p.sketch.add(k(10_000 + i))
    new = Node(k(2))
    for _ in range(2):
        p.sketch.add(new.key)
    p.insert(new)  # 3 uses against the victim's 5, halved: 2.5
    assert p.admitted_low == 0
