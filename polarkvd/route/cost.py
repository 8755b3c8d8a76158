"""The router's choice of engine: the cost of a prompt on each engine, and the three policies.

Owns the arithmetic only (pure functions over `EngineView`s, no I/O, no clock): what a hit from each
tier is worth, what queued work adds, what evicting other prompts from a full engine cache costs,
when load imbalance overrides affinity. The views are filled
by `polarkvd.route.engines`; the server applies the decision.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence


class Policy(str, enum.Enum):
    AFFINITY = "affinity"
    ROUND_ROBIN = "round-robin"
    LEAST_LOADED = "least-loaded"


class Reason(str, enum.Enum):
    """Why an engine was picked (label `reason` of the router's decision counter)."""

    AFFINITY = "affinity"  # the lowest cost, with some of the prompt cached somewhere
    COLD = "cold"  # the lowest cost, nothing of the prompt cached anywhere: queued work decided
    IMBALANCE = "imbalance"  # past the load-imbalance threshold: the least-loaded engine instead
    ROUND_ROBIN = "round-robin"
    LEAST_LOADED = "least-loaded"
    RETRY = "retry"  # the previous engine refused the connection


@dataclasses.dataclass(frozen=True)
class Weights:
    """Cost, in prefill-token equivalents, of one prompt token served from each place (a token
    computed is 1.0), and of the engine's queued work. Defaults: the engine's own GPU cache is free;
    host DRAM costs a copy (FACTS: ~30-70 ms for 138 MB against ~14 s of prefill, so well under 0.1);
    disk and the cluster pool cost a read over slower paths."""

    gpu: float = 0.0
    dram: float = 0.05
    disk: float = 0.2
    pool: float = 0.2
    queued: float = 1.0  # per token of prefill in flight to the engine (not past its first token)
    request: float = 32.0  # per request the engine runs or has waiting (decode steps it shares)
    # per token this prompt adds to an engine's cache past its room or its share of what all the
    # caches hold: tokens of other conversations it will push out, computed again at their next
    # turns. 2: a conversation too many for a cache evicts at each of the others' turns (LRU over
    # a cycle of conversations), not once. An engine whose host's daemon keeps what it computes
    # gets them back from DRAM instead (`dram`).
    evict: float = 2.0
    # per token this engine would compute that another engine would not (has it cached, or loads
    # it): work done twice, which delays whoever comes after it there; a follow-up does not leave
    # its history's engine for a queue shorter than the history
    redundant: float = 1.0
    imbalance_abs: int = 8  # requests: min..max difference past which affinity gives way ...
    imbalance_rel: float = 1.5  # ... when also the busiest has this many times the idlest's load

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not v >= 0:  # also NaN
                raise ValueError(f"weight {f.name} must be >= 0, got {v!r}")


@dataclasses.dataclass
class EngineView:
    """What the router knows of one engine for one prompt, in tokens of that prompt."""

    name: str
    gpu: int = 0  # leading tokens in the engine's own prefix cache (its events, or what we sent it)
    dram: int = 0  # leading tokens the host's daemon holds in L1 / DRAM ...
    disk: int = 0  # ... and on disk (`where`'s `here`: together its leading run)
    pool: int = 0  # leading tokens the best other cluster member holds
    queued_tokens: int = 0  # prefill (tokens the engine must compute) of requests not past their first token
    requests: int = 0  # running + waiting (the engine's own count, or the router's in-flight count)
    held: int = 0  # tokens its cache holds (cached prefixes, and the prefills in flight to it)
    capacity: int | None = None  # tokens its cache can hold (None: unknown)
    stored: bool = False  # what it computes is kept by its host's polarkvd daemon (evicted: reloaded)


def prefill_cost(prompt: int, v: EngineView, w: Weights) -> float:
    """Prefill-token equivalents to serve `prompt` tokens on `v`'s engine: the part past its best
    hit computed at 1.0, each cached part at its tier's weight (the GPU's hit first, then the host's
    tiers for the tokens past it, then the pool for what is past both)."""
    gpu = min(v.gpu, prompt)
    host = min(v.dram + v.disk, prompt)
    cost = gpu * w.gpu
    covered = gpu
    if host > covered:
        extra = host - covered
        share_dram = v.dram / (v.dram + v.disk)
        cost += extra * (share_dram * w.dram + (1 - share_dram) * w.disk)
        covered = host
    pool = min(v.pool, prompt)
    if pool > covered:
        cost += (pool - covered) * w.pool
        covered = pool
    return cost + (prompt - covered)


def shares(prompt: int, views: Sequence[EngineView]) -> list[float | None]:
    """Each engine's share of what all the caches would hold with this prompt added: the total
    split by their sizes (None for all when one's size is unknown)."""
    caps = [v.capacity for v in views]
    if any(c is None or c <= 0 for c in caps):
        return [None] * len(views)
    total, size = sum(v.held for v in views) + prompt, sum(c for c in caps if c is not None)
    return [total * c / size for c in caps if c is not None]


def evicted(prompt: int, v: EngineView, share: float | None = None) -> int:
    """Tokens of other prompts `v`'s engine would drop, now or as its conversations grow, to hold
    the `prompt` tokens its own cache lacks: what they take past its room (its cache is finite:
    each new block then takes a cached one's place), or past its `share` of what all the caches
    hold (the engine holding more than its share is the first to evict as they all fill)."""
    if v.capacity is None:
        return 0
    new = prompt - min(v.gpu, prompt)
    over = v.held + new - v.capacity
    if share is not None:
        over = max(over, round(v.held + new - share))
    return min(new, max(0, over))


def computed(prompt: int, v: EngineView) -> int:
    """Tokens of `prompt` `v`'s engine would compute: past the longest run any place holds for it."""
    return prompt - min(prompt, max(v.gpu, v.dram + v.disk, v.pool))


def cost(
    prompt: int, v: EngineView, w: Weights, share: float | None = None, least_computed: int | None = None
) -> float:
    """`v`'s cost for `prompt`: its prefill (`prefill_cost`), what it crowds out of its cache (at
    `share`, the engine's share of all caches), the tokens it computes past `least_computed` (the
    fewest any engine would compute), its queued work."""
    evict = w.dram if v.stored else w.evict
    extra = 0 if least_computed is None else computed(prompt, v) - least_computed
    return (
        prefill_cost(prompt, v, w)
        + extra * w.redundant
        + evicted(prompt, v, share) * evict
        + v.queued_tokens * w.queued
        + v.requests * w.request
    )


def _load(v: EngineView) -> tuple[int, int]:
    return (v.requests, v.queued_tokens)


def least_loaded(views: Sequence[EngineView], start: int = 0) -> int:
    """Index of the least-loaded view (requests, then queued tokens); ties go to the first from `start`."""
    n = len(views)
    order = [(start + i) % n for i in range(n)]
    return min(order, key=lambda i: _load(views[i]))


def imbalanced(views: Sequence[EngineView], w: Weights) -> bool:
    loads = [v.requests for v in views]
    lo, hi = min(loads), max(loads)
    return hi - lo > w.imbalance_abs and hi > lo * w.imbalance_rel


def choose(
    policy: Policy, prompt: int, views: Sequence[EngineView], w: Weights, turn: int = 0
) -> tuple[int, Reason]:
    """The index of the engine to send a `prompt`-token request to, and why. `turn` counts the
    router's decisions (round-robin's position; the tie-break start of the others)."""
    if not views:
        raise ValueError("no engine to choose from")
    n = len(views)
    if policy is Policy.ROUND_ROBIN:
        return turn % n, Reason.ROUND_ROBIN
    if policy is Policy.LEAST_LOADED:
        return least_loaded(views, turn % n), Reason.LEAST_LOADED
    if n > 1 and imbalanced(views, w):
        return least_loaded(views, turn % n), Reason.IMBALANCE
    least = min(computed(prompt, v) for v in views)
    costs = [cost(prompt, v, w, s, least) for v, s in zip(views, shares(prompt, views))]
    order = [(turn + i) % n for i in range(n)]
    best = min(order, key=lambda i: costs[i])
    cached = any(max(v.gpu, v.dram + v.disk, v.pool) > 0 for v in views)
    return best, Reason.AFFINITY if cached else Reason.COLD
