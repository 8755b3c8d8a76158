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
moving averages of the daemon's own measurements: DRAM copies, disk promotions, peer fetches), with
defaults until measured.

Nothing here holds locks or does I/O: the manager owns the instances and feeds them on its loop.
"""

from __future__ import annotations

import collections
import dataclasses

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


@dataclasses.dataclass
class _Rate:
    latency: float  # seconds per fetch
    per_byte: float  # seconds per byte
    observations: int = 0


#: until measured: DRAM ~5 GB/s, disk promotion ~0.5 GB/s + 1 ms, a peer ~1 GB/s + 0.5 ms
_DEFAULT_RATES = {
    Tier.VRAM: (0.0, 1 / 20e9),
    Tier.DRAM: (0.0, 1 / 5e9),
    Tier.DMP: (5e-4, 1 / 1e9),
    Tier.DISK: (1e-3, 1 / 0.5e9),
}
_ALPHA = 0.1  # weight of a new measurement in the moving averages


class FetchCosts:
    """Seconds to bring a page back from each tier, from the daemon's own measurements."""

    def __init__(self) -> None:
        self._rates = {tier: _Rate(lat, per) for tier, (lat, per) in _DEFAULT_RATES.items()}

    def observe(self, tier: Tier, nbytes: int, seconds: float) -> None:
        """A fetch of `nbytes` from `tier` took `seconds` (a batch: its bytes together)."""
        if nbytes <= 0 or not 0 < seconds < 3600:
            return
        r = self._rates[tier]
        per = seconds / nbytes
        r.per_byte = per if r.observations == 0 else (1 - _ALPHA) * r.per_byte + _ALPHA * per
        r.observations += 1

    def seconds(self, tier: Tier, nbytes: int) -> float:
        r = self._rates[tier]
        return r.latency + r.per_byte * nbytes

    def gbps(self, tier: Tier) -> float:
        return 1e-9 / self._rates[tier].per_byte

    def measured(self, tier: Tier) -> int:
        return self._rates[tier].observations
