"""Eviction policies: which cached page goes first when a tier is full.

This module owns the *order* of pages, never their bytes or their placement. A tier (or the manager)
keeps one node per page; nodes subclass `PolicyNode`, so a policy threads its bookkeeping through the
node itself (an intrusive list) instead of a side table: about 16 bytes per page instead of ~100 for
an `OrderedDict` entry, which keeps daemon metadata under 256 bytes per page.

Contract (what breaks if it is violated):
- `victims(n, evictable, limit)` is atomic: it returns exactly `n` nodes, already unlinked from the
  policy, or `[]` and leaves every node where it was. The caller frees exactly the nodes returned.
  With `limit`, it looks at no more than about `limit` nodes (a bounded search that may miss).
- `evictable(node)` is the caller's veto (pinned pages, pages with cached children: leaf-first). It is
  called during the scan and must not mutate the policy.
- A node is in at most one policy at a time; `remove` of a node that is not linked is a no-op.

Policies are selected by name from `POLICIES` (config `policy = "lru" | "s3fifo" | "cost"`) and can be switched
at run time with `switch_policy`, which carries the pages over coldest first.
"""

from __future__ import annotations

import abc
import itertools
import operator
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np


class PolicyNode:
    """Per-page bookkeeping a policy may use. Subclasses add their own slots."""

    __slots__ = ("key", "prev", "next", "aux")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.prev: PolicyNode | None = None
        self.next: PolicyNode | None = None
        self.aux = 0  # policy-private small int (S3-FIFO: queue id and frequency)


class _NodeList:
    """Doubly linked list of nodes with a sentinel; O(1) push, unlink and head."""

    __slots__ = ("_sentinel", "size")

    def __init__(self) -> None:
        s = PolicyNode(b"")
        s.prev = s.next = s
        self._sentinel = s
        self.size = 0

    def push_tail(self, node: PolicyNode) -> None:
        s = self._sentinel
        last = s.prev
        assert last is not None
        node.prev, node.next = last, s
        last.next = node
        s.prev = node
        self.size += 1

    def push_head(self, node: PolicyNode) -> None:
        s = self._sentinel
        first = s.next
        assert first is not None
        node.prev, node.next = s, first
        first.prev = node
        s.next = node
        self.size += 1

    def unlink(self, node: PolicyNode) -> None:
        p, n = node.prev, node.next
        assert p is not None and n is not None
        p.next, n.prev = n, p
        node.prev = node.next = None
        self.size -= 1

    def head(self) -> PolicyNode | None:
        first = self._sentinel.next
        return None if first is self._sentinel else first

    def __iter__(self) -> Iterator[PolicyNode]:
        node = self._sentinel.next
        while node is not self._sentinel:
            assert node is not None
            nxt = node.next
            yield node
            node = nxt

    def __len__(self) -> int:
        return self.size


Evictable = Callable[[PolicyNode], bool]


class EvictionPolicy(abc.ABC):
    name: ClassVar[str]

    @abc.abstractmethod
    def insert(self, node: PolicyNode) -> None:
        """A page was admitted."""

    @abc.abstractmethod
    def touch(self, node: PolicyNode) -> None:
        """A page was hit."""

    def touch_many(self, nodes: list[PolicyNode], hit: bool = True) -> None:
        """Several pages in use at once, in order: the last node ends up the most recently used.
        `hit`: a request's lookup (a hit, counted by policies that count them); False: the same
        request using them again (its load), which refreshes recency and counts nothing."""
        if hit:
            for node in nodes:
                self.touch(node)

    @abc.abstractmethod
    def remove(self, node: PolicyNode) -> None:
        """A page left for another reason than eviction (deleted, moved). No-op if not linked."""

    @abc.abstractmethod
    def victims(self, n: int, evictable: Evictable, limit: int | None = None) -> list[PolicyNode]:
        """Exactly `n` unlinked nodes in eviction order, or `[]` with nothing changed."""

    @abc.abstractmethod
    def coldest_first(self) -> Iterator[PolicyNode]:
        """Every node, the next to be evicted first (approximately, for policies without a total order)."""

    def coldest(self, n: int) -> list[PolicyNode]:
        """The `n` nodes `coldest_first` starts with, without copying the rest."""
        return list(itertools.islice(self.coldest_first(), n))

    def next_victim(self, evictable: Evictable, sample: int = 1024) -> PolicyNode | None:
        """The node `victims(1, evictable)` would take among the `sample` coldest, taking nothing."""
        return next((node for node in self.coldest(sample) if evictable(node)), None)

    @abc.abstractmethod
    def __len__(self) -> int: ...


class LRUPolicy(EvictionPolicy):
    """Least recently used first. Callers touch a prefix chain leaf-to-root, so leaves go first."""

    name = "lru"

    def __init__(self) -> None:
        self._list = _NodeList()

    def insert(self, node: PolicyNode) -> None:
        if node.prev is None:
            self._list.push_tail(node)

    def touch(self, node: PolicyNode) -> None:
        if node.prev is not None:
            self._list.unlink(node)
            self._list.push_tail(node)

    def touch_many(self, nodes: list[PolicyNode], hit: bool = True) -> None:
        # The lookup hot path: a hot prefix looked up again is usually already at the tail in this
        # order, so check that first (a pointer walk) and move nothing; otherwise relink inline.
        s = self._list._sentinel
        cur = s.prev
        for node in reversed(nodes):
            if cur is not node:
                break
            cur = node.prev
        else:
            return
        for node in nodes:
            p = node.prev
            if p is None:
                continue
            n = node.next
            p.next = n
            n.prev = p  # type: ignore[union-attr]
            last = s.prev
            node.prev = last
            node.next = s
            last.next = node  # type: ignore[union-attr]
            s.prev = node

    def remove(self, node: PolicyNode) -> None:
        if node.prev is not None:
            self._list.unlink(node)

    def victims(self, n: int, evictable: Evictable, limit: int | None = None) -> list[PolicyNode]:
        if n <= 0:
            return []
        chosen: list[PolicyNode] = []
        nodes = self._list if limit is None else itertools.islice(self._list, limit)
        for node in nodes:
            if evictable(node):
                chosen.append(node)
                if len(chosen) == n:
                    break
        if len(chosen) < n:
            return []
        for node in chosen:
            self._list.unlink(node)
        return chosen

    def coldest_first(self) -> Iterator[PolicyNode]:
        return iter(list(self._list))

    def coldest(self, n: int) -> list[PolicyNode]:
        return list(itertools.islice(self._list, n))

    def __len__(self) -> int:
        return len(self._list)


_SMALL, _MAIN = 1, 2
_FREQ_MASK = 3


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP 2023): scan-resistant with FIFO queues only.

    New pages enter a small FIFO (10% of pages). A page hit while there moves to the main FIFO when it
    reaches the head; one never hit is evicted from the small queue at once, and its key is remembered
    in a ghost FIFO. A page re-admitted while its key is a ghost goes straight to main. Main is a FIFO
    with reinsertion: a page with frequency > 0 is moved back with frequency - 1. A one-pass scan over
    many new prefixes therefore flushes only the small queue, never the reused pages in main.
    """

    name = "s3fifo"
    small_fraction = 0.10

    def __init__(self) -> None:
        self._small = _NodeList()
        self._main = _NodeList()
        self._ghost: OrderedDict[bytes, None] = OrderedDict()

    def _ghost_limit(self) -> int:
        return max(16, len(self._main))

    def insert(self, node: PolicyNode) -> None:
        if node.prev is not None:
            return
        if node.key in self._ghost:
            del self._ghost[node.key]
            node.aux = _MAIN << 2
            self._main.push_tail(node)
        else:
            node.aux = _SMALL << 2
            self._small.push_tail(node)

    def touch(self, node: PolicyNode) -> None:
        if node.prev is not None and (node.aux & _FREQ_MASK) < 3:
            node.aux += 1

    def remove(self, node: PolicyNode) -> None:
        if node.prev is None:
            return
        (self._small if node.aux >> 2 == _SMALL else self._main).unlink(node)

    def victims(self, n: int, evictable: Evictable, limit: int | None = None) -> list[PolicyNode]:
        if n <= 0:
            return []
        chosen: list[tuple[PolicyNode, int]] = []  # node, aux before it was unlinked
        # Every head taken off a queue, in order: (node, its queue, its aux, the queue it went back to).
        # Replayed backwards on failure, it puts every node back where it was with its frequency.
        moves: list[tuple[PolicyNode, _NodeList, int, _NodeList | None]] = []
        budget = 2 * len(self) + 2 * n if limit is None else min(2 * len(self) + 2 * n, limit)
        small_skips = 0
        while len(chosen) < n and budget > 0 and (self._small.size or self._main.size):
            budget -= 1
            use_small = self._small.size and (
                self._small.size > self.small_fraction * len(self) or not self._main.size
            )
            if use_small and small_skips >= self._small.size and self._main.size:
                use_small = False  # every small page is vetoed: look in main this round
            src = self._small if use_small else self._main
            node = src.head()
            assert node is not None
            aux = node.aux
            src.unlink(node)
            if not evictable(node):
                dst = src
                small_skips += use_small
            elif node.aux & _FREQ_MASK:
                if use_small:
                    node.aux = _MAIN << 2  # hit while in small: promoted to main
                else:
                    node.aux -= 1  # main: reinserted with one less
                dst = self._main
            else:
                dst = None
                chosen.append((node, aux))
            if dst is not None:
                dst.push_tail(node)
            moves.append((node, src, aux, dst))
        if len(chosen) < n:
            for node, src, aux, dst in reversed(moves):  # atomic: undo every move, newest first
                if dst is not None:
                    dst.unlink(node)
                node.aux = aux
                src.push_head(node)
            return []
        for node, aux in chosen:
            if aux >> 2 == _SMALL:
                self._ghost[node.key] = None
        while len(self._ghost) > self._ghost_limit():
            self._ghost.popitem(last=False)
        return [node for node, _ in chosen]

    def coldest_first(self) -> Iterator[PolicyNode]:
        return iter(list(self._small) + list(self._main))

    def coldest(self, n: int) -> list[PolicyNode]:
        return list(itertools.islice(itertools.chain(self._small, self._main), n))

    def __len__(self) -> int:
        return self._small.size + self._main.size


_MASK64 = (1 << 64) - 1
#: one odd multiplier per row of the sketch: each row takes other bits of the key's hash
_ROW_MULTIPLIERS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)


class FrequencySketch:
    """How many requests used each page lately, for every page the daemon ever saw, in a fixed
    space: a count-min sketch with conservative update and aging (TinyLFU, Einziger et al., ACM
    ToS 2017). `ROWS` rows of `width` one-byte counters; a key picks one counter per row (each row
    its own bits of the key's hash), and its estimate is the least of them
    (collisions only ever add). After `window` additions every counter is halved, so the counts are
    of the last one to two windows: a popularity with a memory far longer than a tier's turnover,
    kept for pages long gone from every tier (what decides whether a page leaving DRAM is worth
    its disk write: worth.Worth.cheaper_to_recompute)."""

    ROWS = 4
    MIN_WINDOW = 1 << 14
    MAX_WIDTH = 1 << 24  # 64 MiB of counters: a window of 16M uses, ~1.6M pages the tiers hold

    def __init__(self, window: int = MIN_WINDOW) -> None:
        self.window = 0
        self.width = 0
        self._counts = bytearray()
        self._adds = 0
        #: halvings so far (a restart counts 8: every count from before is gone): a count taken
        #: `ages` ago is worth count / 2**(ages now - then) today (CostPolicy.bar)
        self.ages = 0
        self.fit(window)

    def fit(self, window: int) -> None:
        """Age every `window` additions (at least MIN_WINDOW); the counters grow (and restart from
        zero) when the window outgrows them, never shrink."""
        self.window = max(self.MIN_WINDOW, window)
        width = min(1 << (self.window - 1).bit_length(), self.MAX_WIDTH)
        if width > self.width:
            self.width = width
            self._counts = bytearray(self.ROWS * width)
            self._adds = 0
            self.ages += 8

    def _slots(self, key: bytes) -> list[int]:
        # a page key is a hash already: its bits folded to 64, not hash() (salted per process:
        # which keys share counters, and so every decision weighed by them, would change per run)
        h = int.from_bytes(key, "little")
        h, w = (h ^ h >> 64) & _MASK64, self.width
        mask = w - 1
        return [r * w + ((h * odd & _MASK64) >> 32 & mask) for r, odd in enumerate(_ROW_MULTIPLIERS)]

    def add(self, key: bytes) -> None:
        """One more use of `key`: its least counters are raised (conservative update)."""
        c = self._counts
        slots = self._slots(key)
        low = min(c[i] for i in slots)
        if low < 255:
            for i in slots:
                if c[i] == low:
                    c[i] = low + 1
        self._adds += 1
        if self._adds >= self.window:
            counts = np.frombuffer(self._counts, dtype=np.uint8)
            counts >>= 1
            self._adds //= 2
            self.ages += 1

    def estimate(self, key: bytes) -> int:
        """Uses of `key` counted (never fewer than it had; more where it shares counters)."""
        c = self._counts
        return min(c[i] for i in self._slots(key))


#: a `cost` node's aux: its priority (seconds saved per byte x _PRIO_SCALE, plus the inflation L)
#: above _LOW_BITS; below, when its frequency was last counted (_STAMP_BITS, the policy's decay clock
#: in 1/_STAMP_RES half-lives, modulo 2^_STAMP_BITS) and the frequency itself (_FREQ_BITS, in
#: 1/_FREQ_ONE hits). Victims are chosen on the priority alone (ties: least recently used first).
_PRIO_SCALE = 1e16
_FREQ_BITS = 6
_FREQ_ONE = 8  # one hit; the frequency caps at 63/8 = 7.9 hits
_FREQ_MAX = (1 << _FREQ_BITS) - 1
_STAMP_BITS = 8
_STAMP_RES = 16  # stamp units per half-life: a frequency not counted for 16 half-lives is 2^-16: 0
_STAMP_MASK = (1 << _STAMP_BITS) - 1
_LOW_BITS = _FREQ_BITS + _STAMP_BITS
_PRIO_MAX = (1 << (63 - _LOW_BITS)) - 1  # auxes stay int64 (scored in numpy)
#: the decay factor of a frequency after k stamp units
_DECAY = [2.0 ** (-k / _STAMP_RES) for k in range(1 << _STAMP_BITS)]
_MIN_HALF_LIFE = 64  # admissions: a near-empty tier does not forget at once


class CostPolicy(LRUPolicy):
    """GreedyDual-Size-Frequency with what a page is worth as its cost (docs/DESIGN-NOTES.md,
    "Cost-aware retention"): the victim is the evictable page of lowest priority H = L + value x f,
    where `value` is the owner's `valuer(node)` (seconds an engine saves per byte the page holds;
    never below 0), `f` its frequency, and L rises to each victim's H. A page not hit for a while
    sinks below newer ones as L passes it; of pages hit alike, the dear outlive the cheap.

    The frequency counts hits with exponential decay: one at admission, one more per request that
    hits the page (`touch_many(hit=True)`: a request's lookup; its load refreshes the priority and
    the recency, `hit=False`, and counts nothing), halved every half-life. The half-life is counted
    in pages admitted, one turnover of the tier (as many admissions as it holds pages): what pushes
    a page out is what comes in, and requests bring from one page (a chat turn) to hundreds (a long
    document), so neither requests nor seconds are the tier's clock.

    A parent is worth at least what its children need: touched in one call leaf first (a hit's
    chain), a page's priority is raised to its child's; leaf-first stays the owner's veto.

    Admission by worth (W-TinyLFU's, weighed by cost): with a `sketch`, a page coming in (stored or
    promoted) whose uses lately x value is below that of the last page the policy let go for room
    (`bar`, aged with the sketch's counts) enters at the lowest priority, the next victim, instead of pushing out pages worth more;
    it rises like any page once a request hits it (a load refreshing it does not). Counted in
    `admitted_low`.

    An LRU list is kept too: the `SAMPLE` least recently used pages are the candidates a `victims`
    call scores, in one numpy batch (all pages when fewer are evictable among them), and it is the
    order `coldest_first` gives (LRUPolicy's list, removal and order, inherited). Without a valuer
    every value is 0 and the policy is LRU.
    """

    name = "cost"
    SAMPLE = 1024

    def __init__(self) -> None:
        super().__init__()
        self.inflation = 0  # L, in aux units (its low bits 0)
        #: seconds saved per byte by keeping the page (set by the owner); None: 0 for every page
        self.valuer: Callable[[PolicyNode], float] | None = None
        self._clock = 0.0  # the decay clock, in stamp units (1/_STAMP_RES half-lives)
        #: every use counted here as well (set by the owner): admission here and to the next tier
        self.sketch: FrequencySketch | None = None
        #: uses lately x value of the last page let go at full priority: what a page coming in
        #: must be worth to enter above the lowest (0 until the tier first evicts)
        self.bar = 0.0
        self._bar_ages = 0  # the sketch's `ages` when `bar` was taken: it ages with the counts
        self.admitted_low = 0  # pages that came in at the lowest priority (worth less than `bar`)

    def _aux(self, node: PolicyNode, freq: int) -> int:
        """L + value x freq, above the stamp of now and `freq` (in 1/_FREQ_ONE hits)."""
        value = self.valuer(node) if self.valuer is not None else 0.0
        worth = int(value * (_PRIO_SCALE / _FREQ_ONE) * freq) if value > 0 else 0
        prio = min((self.inflation >> _LOW_BITS) + worth, _PRIO_MAX)
        if not freq:  # admitted low: below every page at L too (those it ties with go after it)
            prio = max(prio - 1, 0)
        return prio << _LOW_BITS | (int(self._clock) & _STAMP_MASK) << _FREQ_BITS | freq

    @staticmethod
    def priority(node: PolicyNode) -> int:
        """`node`'s priority H (what victims are chosen by, lowest first)."""
        return node.aux >> _LOW_BITS

    def frequency(self, node: PolicyNode) -> float:
        """`node`'s hits as counted now, decayed (a reading: changes nothing)."""
        return self._decayed(node.aux) / _FREQ_ONE

    def _decayed(self, aux: int) -> float:
        stamp = aux >> _FREQ_BITS & _STAMP_MASK
        return (aux & _FREQ_MAX) * _DECAY[(int(self._clock) - stamp) & _STAMP_MASK]

    def insert(self, node: PolicyNode) -> None:
        if node.prev is None:
            self._clock += _STAMP_RES / max(len(self._list), _MIN_HALF_LIFE)
            sketch = self.sketch
            if sketch is not None:
                sketch.add(node.key)
                bar = self.bar / (1 << min(sketch.ages - self._bar_ages, 62))
                if bar > 0 and self._worth(node) < bar:
                    # frequency 0 marks it: its priority is L (value x 0) until a request hits it
                    node.aux = self._aux(node, 0)
                    self._list.push_head(node)
                    self.admitted_low += 1
                    return
            node.aux = self._aux(node, _FREQ_ONE)
            self._list.push_tail(node)

    def _worth(self, node: PolicyNode) -> float:
        """Uses lately (the sketch's count) x value: what admission weighs."""
        value = self.valuer(node) if self.valuer is not None else 0.0
        return self.sketch.estimate(node.key) * value if self.sketch is not None else 0.0

    def touch(self, node: PolicyNode) -> None:
        self.touch_many([node])

    def touch_many(self, nodes: list[PolicyNode], hit: bool = True) -> None:
        """Hits, in order (the last ends up the most recently used). With `hit`, each counts one
        more in its frequency; without, only its priority and recency are refreshed. Consecutive
        nodes of which the second is the first's parent (a chain, leaf first) keep the parent's
        priority at least its child's."""
        child: PolicyNode | None = None
        sketch = self.sketch if hit else None
        for node in nodes:
            if node.prev is None:
                child = None
                continue
            if sketch is not None:
                sketch.add(node.key)
            aux = node.aux
            freq = int(self._decayed(aux) + (_FREQ_ONE if hit else 0.5))  # hit: +1, rounded down
            # a page admitted low (frequency 0) stays low when its own request loads it
            floor = 1 if hit or aux & _FREQ_MAX else 0
            aux = self._aux(node, min(max(freq, floor), _FREQ_MAX))
            if child is not None and getattr(child, "parent", None) == node.key:
                low = aux & ((1 << _LOW_BITS) - 1)
                aux = max(aux >> _LOW_BITS, child.aux >> _LOW_BITS) << _LOW_BITS | low
            node.aux = aux
            self._list.unlink(node)
            self._list.push_tail(node)
            child = node

    def victims(self, n: int, evictable: Evictable, limit: int | None = None) -> list[PolicyNode]:
        if n <= 0:
            return []
        sample = max(self.SAMPLE, 4 * n) if limit is None else min(max(self.SAMPLE, 4 * n), limit)
        chosen = self._lowest(list(itertools.islice(self._list, sample)), n, evictable)
        if len(chosen) < n and sample < len(self._list) and limit is None:
            chosen = self._lowest(list(self._list), n, evictable)  # too few evictable: every page
        if len(chosen) < n:
            return []
        for node in chosen:
            self._list.unlink(node)
        top = max(node.aux for node in chosen) >> _LOW_BITS << _LOW_BITS
        self.inflation = max(self.inflation, top)
        if self.sketch is not None:
            full = [node for node in chosen if node.aux & _FREQ_MAX]  # not admitted low
            if full:
                self.bar = max(self._worth(node) for node in full)
                self._bar_ages = self.sketch.ages
        return chosen

    def next_victim(self, evictable: Evictable, sample: int = SAMPLE) -> PolicyNode | None:
        found = self._lowest(self.coldest(sample), 1, evictable)
        return found[0] if found else None

    @staticmethod
    def _lowest(candidates: list[PolicyNode], n: int, evictable: Evictable) -> list[PolicyNode]:
        """The `n` evictable candidates of lowest priority (ties: least recently used first). The
        lowest few are found by a partial sort (`argpartition`); only when the owner vetoes too
        many of them (leaf-first: a long chain has one leaf) are all candidates sorted."""
        prio = np.fromiter(map(_AUX, candidates), dtype=np.int64, count=len(candidates)) >> _LOW_BITS
        chosen: list[PolicyNode] = []
        first = min(len(candidates), 4 * n + 60)
        if first < len(candidates):
            part = np.argpartition(prio, first - 1)[:first]
            head = part[np.lexsort((part, prio[part]))]  # by priority, then list position
        else:
            head = np.lexsort((np.arange(len(candidates)), prio))
        seen = head.tolist()
        for i in seen:
            node = candidates[i]
            if evictable(node):
                chosen.append(node)
                if len(chosen) == n:
                    return chosen
        if first == len(candidates):
            return chosen
        tried = set(seen)
        for i in np.argsort(prio, kind="stable").tolist():
            if i in tried:
                continue
            node = candidates[i]
            if evictable(node):
                chosen.append(node)
                if len(chosen) == n:
                    break
        return chosen


_AUX = operator.attrgetter("aux")


POLICIES: dict[str, type[EvictionPolicy]] = {p.name: p for p in (LRUPolicy, S3FIFOPolicy, CostPolicy)}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}") from None


def switch_policy(old: EvictionPolicy, name: str) -> EvictionPolicy:
    """A new policy of kind `name` holding every node of `old`, inserted coldest first."""
    new = make_policy(name)
    nodes = list(old.coldest_first())
    for node in nodes:
        old.remove(node)
    for node in nodes:
        node.aux = 0
        new.insert(node)
    return new
