"""What a page is worth: the seconds an engine would spend recomputing it, against the seconds it
takes to fetch it back from a tier. The numbers the `cost` eviction policy and the drop-or-demote
rule weigh (docs/DESIGN-NOTES.md, "Cost-aware retention").

`RecomputeModel` fits, per namespace, the engine's prefill time as a function of how many tokens it
computes and how deep in the context they are:

    seconds ~= a + b * tokens + c * tokens * (depth + tokens / 2)

(the last term is attention: every new token attends to everything before it). Engines report what
they observe (tokens computed, the depth they started at, seconds); the fit is a least-squares over
the last `WINDOW` observations, coefficients kept non-negative. Until `MIN_OBSERVATIONS` have come in,
a default from the namespace's geometry that over-estimates on any real engine (`default_for`), so
that an unmeasured namespace keeps and demotes its pages as the recency policies always did.

`FetchCosts` keeps, per tier, what bringing a page back has cost (latency plus bytes over bandwidth,
moving medians of the daemon's own measurements: DRAM copies, disk promotions, peer fetches), with
defaults until measured; and the fast end of the measurements (the low quantile `FAST_QUANTILE` of
the same window, rising slowly: `FAST_RISE`), what the tier does when nothing else is in its way:
the decisions that lose a page or a hit (drop, cut) are taken on it.

Nothing here holds locks or does I/O: the manager owns the instances and feeds them on its loop.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics

import numpy as np

from polarkvd.types import Namespace, Tier

WINDOW = 256  # observations a fit uses, the newest
MIN_OBSERVATIONS = 8  # fewer: the geometry's default
#: a fit is redone after this many new observations (fitting is ~50 us; observations come per request)
REFIT_EVERY = 8


@dataclasses.dataclass(frozen=True)
class PrefillCost:
    """seconds ~= fixed + per_token * n + per_token_depth * n * (depth + n / 2)"""

    fixed: float
    per_token: float
    per_token_depth: float
    observations: int = 0  # 0: the geometry's default

    def seconds(self, tokens: int, depth: int) -> float:
        """Prefill seconds for `tokens` new tokens after `depth` tokens of context."""
        return self.fixed + self.per_token * tokens + self.per_token_depth * tokens * (depth + tokens / 2)

    def page_seconds(self, page_tokens: int, index: int) -> float:
        """What recomputing page `index` (0 = the first) of a chain costs, the fixed part left out:
        a page is recomputed with the others of its request."""
        depth = index * page_tokens
        return self.per_token * page_tokens + self.per_token_depth * page_tokens * (depth + page_tokens / 2)


def default_for(ns: Namespace) -> PrefillCost:
    """An over-estimate from the geometry alone: 100 us per layer per token for the dense part, and
    attention as dear as that at a depth of 4,096 tokens. A 30-layer model: 3 ms/token, more than two
    CPU cores take for a 135M model (~2 ms) and ~1000x what a GPU takes: unmeasured pages look dear,
    so they are kept and demoted, never dropped."""
    per_token = 1e-4 * ns.num_layers
    return PrefillCost(fixed=0.0, per_token=per_token, per_token_depth=per_token / 4096)


class RecomputeModel:
    """The prefill cost of one namespace: observed, fitted, or the default (see the module docstring)."""

    def __init__(self, ns: Namespace) -> None:
        self.default = default_for(ns)
        self._obs: collections.deque[tuple[int, int, float]] = collections.deque(maxlen=WINDOW)
        self._since_fit = 0
        self.cost = self.default

    def observe(self, tokens: int, depth: int, seconds: float) -> None:
        """An engine computed `tokens` tokens after `depth` of context in `seconds`. Nonsense (no
        tokens, negative or non-finite values) is ignored."""
        if not (tokens > 0 and depth >= 0 and 0 < seconds < 3600):
            return
        self._obs.append((tokens, depth, seconds))
        self._since_fit += 1
        if len(self._obs) >= MIN_OBSERVATIONS and (
            self.cost.observations == 0 or self._since_fit >= REFIT_EVERY
        ):
            self._fit()

    def _fit(self) -> None:
        obs = np.array(self._obs, dtype=np.float64)
        n, d, s = obs[:, 0], obs[:, 1], obs[:, 2]
        x = np.stack([np.ones_like(n), n, n * (d + n / 2)], axis=1)
        active = [0, 1, 2]
        coef = np.zeros(3)
        while active:  # least squares, dropping terms that come out negative (a small NNLS)
            sol, *_ = np.linalg.lstsq(x[:, active], s, rcond=None)
            if (sol >= 0).all():
                coef[:] = 0
                coef[active] = sol
                break
            active = [a for a, v in zip(active, sol) if v > 0]
        self._since_fit = 0
        if not coef.any():
            return  # nothing fits (all terms negative): keep what there was
        self.cost = PrefillCost(float(coef[0]), float(coef[1]), float(coef[2]), len(self._obs))

    @property
    def observations(self) -> int:
        return len(self._obs)


class _Rate:
    """A tier's (or a peer's) seconds per byte: the default until measured, then the median of
    the last `_RECENT` measurements (a moving median: one read stalled by a busy moment moves an
    average far, a median hardly), and the fast end (`FAST_QUANTILE`, `FAST_RISE`)."""

    __slots__ = ("latency", "per_byte", "fast_per_byte", "observations", "_recent")

    def __init__(self, latency: float, per_byte: float) -> None:
        self.latency = latency  # seconds per fetch (the default's; 0 once measured)
        self.per_byte = per_byte
        self.fast_per_byte = per_byte
        self.observations = 0
        self._recent: collections.deque[float] = collections.deque(maxlen=_RECENT)

    def observe(self, nbytes: int, seconds: float) -> None:
        self._recent.append(seconds / nbytes)
        ordered = sorted(self._recent)  # 63 floats: ~3 us, once per measured fetch batch
        self.per_byte = statistics.median(ordered)
        fast = ordered[int(FAST_QUANTILE * (len(ordered) - 1))]
        # the floor: down at once, up by at most FAST_RISE a measurement (see FAST_RISE)
        rise = self.fast_per_byte * (1 + FAST_RISE) if self.observations else fast
        self.fast_per_byte = min(fast, rise)
        self.latency = 0.0
        self.observations += 1

    def seconds(self, nbytes: int) -> float:
        return self.latency + self.per_byte * nbytes

    def fast_seconds(self, nbytes: int) -> float:
        return self.latency + self.fast_per_byte * nbytes


#: until measured: DRAM ~5 GB/s, disk read and decode ~0.5 GB/s + 1 ms, a peer ~1 GB/s + 0.5 ms
_DEFAULT_RATES = {
    Tier.VRAM: (0.0, 1 / 20e9),
    Tier.DRAM: (0.0, 1 / 5e9),
    Tier.DMP: (5e-4, 1 / 1e9),
    Tier.DISK: (1e-3, 1 / 0.5e9),
}
_RECENT = 63  # measurements a rate is the median of
#: the fast end of a rate's window: its 10th percentile (the 7th fastest of 63). What the tier
#: does unhindered, steady where the median follows the machine's load: on the shared 2-core VM the
#: median of 32 KiB disk reads moved 9x between runs, the fast end far less (docs/BENCHMARKS.md)
FAST_QUANTILE = 0.1
#: how fast the fast end may rise, per measurement: it follows a faster window at once, a slower one
#: by at most this (doubling in ~45,000 measurements, minutes of a busy daemon's reads). Within a
#: run of bench policy the daemon's window moved 2-4x as its batches of reads grew (the 2-core VM:
#: reads timed on threads that share the cores with the loop), which a window alone follows; a
#: disk that really slowed is followed all the same, late, and until then pages are kept and fetched
FAST_RISE = 1 / 65536
#: measurements of a tier before decisions trust its rate (the first reads of a cold disk are slow)
TRUSTED_AFTER = 16


class FetchCosts:
    """Seconds to bring a page back from each tier, and from each peer, from the daemon's own
    measurements (the disk: each read and decode on its I/O thread; a peer: each batch's wall time
    over its bytes), a moving median per tier and per peer. The latency of the defaults is folded
    into the per-byte rate once measured: pages of one namespace are all one size."""

    def __init__(self) -> None:
        self._rates = {tier: _Rate(lat, per) for tier, (lat, per) in _DEFAULT_RATES.items()}
        self._peers: dict[str, _Rate] = {}
        #: tiers whose rate the operator set (`pin`): seconds per byte, used instead of measurements
        self._pinned: dict[Tier, float] = {}

    def pin(self, tier: Tier, gbps: float) -> None:
        """Decide by `gbps` for `tier` from now on, measured or not (disk.read_gbps): for a disk the
        daemon cannot measure well, and for tests that need a slow disk on demand. Measurements go
        on being counted (and shown), not used. `gbps` 0 unpins."""
        if gbps > 0:
            self._pinned[tier] = 1e-9 / gbps
        else:
            self._pinned.pop(tier, None)

    def observe(self, tier: Tier, nbytes: int, seconds: float, peer: str | None = None) -> None:
        """A fetch of `nbytes` from `tier` (from `peer`, for the pool) took `seconds` (a batch: its
        bytes together). Nonsense is ignored."""
        if nbytes <= 0 or not 0 < seconds < 3600:
            return
        self._rates[tier].observe(nbytes, seconds)
        if peer is not None:
            rate = self._peers.get(peer)
            if rate is None:
                lat, per = _DEFAULT_RATES[Tier.DMP]
                rate = self._peers[peer] = _Rate(lat, per)
            rate.observe(nbytes, seconds)

    def seconds(self, tier: Tier, nbytes: int, peer: str | None = None) -> float:
        """The estimate for `nbytes` from `tier` (from `peer` when it was measured)."""
        if tier in self._pinned:
            return self._pinned[tier] * nbytes
        rate = self._peers.get(peer) if peer is not None else None
        return (rate or self._rates[tier]).seconds(nbytes)

    def fast_seconds(self, tier: Tier, nbytes: int, peer: str | None = None) -> float:
        """The optimistic estimate: `nbytes` from `tier` (or `peer`) at the fast end of its recent
        measurements. A decision that loses a page or a hit (drop, cut) is taken only if recomputing
        is cheaper even against this: a slow spell of the machine must not make pages look dear
        to fetch."""
        if tier in self._pinned:
            return self._pinned[tier] * nbytes
        rate = self._peers.get(peer) if peer is not None else None
        return (rate or self._rates[tier]).fast_seconds(nbytes)

    def gbps(self, tier: Tier) -> float:
        return 1e-9 / self._pinned.get(tier, self._rates[tier].per_byte)

    def measured(self, tier: Tier) -> int:
        return self._rates[tier].observations

    def trusted(self, tier: Tier) -> bool:
        """Whether `tier`'s rate has been measured often enough to decide by (`TRUSTED_AFTER`)."""
        return tier in self._pinned or self._rates[tier].observations >= TRUSTED_AFTER

    def peers(self) -> dict[str, tuple[float, int]]:
        """Per peer: (GB/s, measurements)."""
        return {peer: (1e-9 / r.per_byte, r.observations) for peer, r in self._peers.items()}
