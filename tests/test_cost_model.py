"""The cost model (polarkvd/cost_model.py): recompute cost fitted from an engine's observations,
fetch costs from the daemon's measurements, defaults until measured."""

from __future__ import annotations

import math
import random

import pytest

from polarkvd.cost_model import MIN_OBSERVATIONS, TRUSTED_AFTER, FetchCosts, RecomputeModel, default_for
from polarkvd.types import Tier
from tests.conftest import TEST_NS


def test_the_fit_follows_a_synthetic_engine() -> None:
    """An engine whose prefill takes 20 ms + 0.5 ms/token + attention 1e-7 s per token per token of
    depth, observed with 2% noise: the fit recovers what a page costs at any depth within 5%."""
    truth = (0.02, 5e-4, 1e-7)
    rng = random.Random(3)
    model = RecomputeModel(TEST_NS)
    assert model.cost == default_for(TEST_NS) and model.cost.observations == 0
    for _ in range(200):
        tokens, depth = rng.randint(16, 2048), rng.randint(0, 30_000)
        s = truth[0] + truth[1] * tokens + truth[2] * tokens * (depth + tokens / 2)
        model.observe(tokens, depth, s * rng.uniform(0.98, 1.02))
    assert model.cost.observations > 0
    for index in (0, 10, 200):
        want = truth[1] * 128 + truth[2] * 128 * (index * 128 + 64)
        assert model.cost.page_seconds(128, index) == pytest.approx(want, rel=0.05)


def test_a_deep_page_costs_more_than_a_shallow_one() -> None:
    cost = default_for(TEST_NS)
    assert cost.page_seconds(128, 500) > 2 * cost.page_seconds(128, 0)


def test_few_or_nonsense_observations_keep_the_default() -> None:
    model = RecomputeModel(TEST_NS)
    for _ in range(MIN_OBSERVATIONS - 1):
        model.observe(100, 0, 0.05)
    for bad in ((0, 0, 1.0), (10, -1, 1.0), (10, 0, -1.0), (10, 0, float("nan")), (10, 0, float("inf"))):
        model.observe(*bad)
    assert model.cost == default_for(TEST_NS)
    model.observe(100, 0, 0.05)
    assert model.cost.observations == MIN_OBSERVATIONS


def test_a_fit_never_has_negative_terms() -> None:
    """Observations that a negative fixed cost would fit best (time falls with depth: a warming cache)
    give non-negative coefficients."""
    model = RecomputeModel(TEST_NS)
    for depth in range(0, 20_000, 1000):
        model.observe(100, depth, max(0.001, 0.2 - depth * 1e-5))
    c = model.cost
    assert c.fixed >= 0 and c.per_token >= 0 and c.per_token_depth >= 0 and c.observations > 0


def test_fetch_costs_follow_measurements() -> None:
    f = FetchCosts()
    before = f.seconds(Tier.DISK, 6 << 20)
    for _ in range(50):
        f.observe(Tier.DISK, 6 << 20, 0.060)  # 100 MB/s: a slow disk
    assert f.measured(Tier.DISK) == 50
    assert f.seconds(Tier.DISK, 6 << 20) > 4 * before
    assert f.gbps(Tier.DISK) == pytest.approx(0.105, rel=0.05)
    f.observe(Tier.DMP, 0, 1.0)  # nonsense: ignored
    assert f.measured(Tier.DMP) == 0


def test_fetch_costs_per_peer_and_trust() -> None:
    """A slow peer's fetches are estimated from its own measurements, the pool's from all; a tier
    is trusted to decide by after TRUSTED_AFTER measurements, and the first one replaces the
    default's fixed latency (pages of one size: the per-byte rate holds it)."""
    f = FetchCosts()
    assert not f.trusted(Tier.DMP)
    for _ in range(TRUSTED_AFTER):
        f.observe(Tier.DMP, 1 << 20, 0.1, peer="slow:1")
        f.observe(Tier.DMP, 1 << 20, 0.001, peer="fast:2")
    assert f.trusted(Tier.DMP)
    assert f.seconds(Tier.DMP, 1 << 20, peer="slow:1") == pytest.approx(0.1)
    assert f.seconds(Tier.DMP, 1 << 20, peer="fast:2") == pytest.approx(0.001)
    assert f.seconds(Tier.DMP, 1 << 20, peer="fast:2") < f.seconds(Tier.DMP, 1 << 20) < 0.1
    assert set(f.peers()) == {"slow:1", "fast:2"}
    f.observe(Tier.DISK, 1000, 1e-6)
    assert f.seconds(Tier.DISK, 1000) == pytest.approx(1e-6)  # no 1 ms default latency left


def disk_reads(pattern: str, fast: float = 60e-6) -> list[float]:
    """63 synthetic read times of one page whose unhindered read takes `fast` seconds, as a busy
    machine gives them: `noisy` (log-normal delays of up to ~9x), `bimodal` (every other read 9x
    slower, the spread measured between runs on the shared VM), `slow burst` (23 reads at the
    unhindered speed, then 40 stalled ones at 30x)."""
    rng = random.Random(3)
    if pattern == "noisy":
        return [fast * math.exp(abs(rng.gauss(0, 1.5))) for _ in range(63)]
    if pattern == "bimodal":
        return [fast * (1 if i % 2 else 9) for i in range(63)]
    assert pattern == "slow burst"
    return [fast] * 23 + [30 * fast] * 40


@pytest.mark.parametrize("pattern", ["noisy", "bimodal", "slow burst"])
def test_the_fast_end_of_a_noisy_rate_stays_near_what_the_disk_can_do(pattern: str) -> None:
    """Whatever the machine's load does to the daemon's reads, the rate decisions are taken on (the
    fast end of the window) stays within 1.3x of the unhindered read, where the median moves 2-30x."""
    f = FetchCosts()
    for seconds in disk_reads(pattern):
        f.observe(Tier.DISK, 1 << 15, seconds)
    assert 60e-6 <= f.fast_seconds(Tier.DISK, 1 << 15) <= 1.3 * 60e-6
    assert f.seconds(Tier.DISK, 1 << 15) > 2 * 60e-6  # the median: where the old rule decided


def test_the_fast_end_follows_a_slower_disk_late_and_a_faster_one_at_once() -> None:
    """A disk slow for good (reads 4x slower from now on) is followed slowly: after a few thousand
    reads the fast end has hardly moved, after 100,000 it sees the disk's new speed. A faster disk
    is seen at once."""
    f = FetchCosts()
    for seconds in disk_reads("bimodal") + [240e-6] * 4000:
        f.observe(Tier.DISK, 1 << 15, seconds)
    assert f.fast_seconds(Tier.DISK, 1 << 15) < 1.1 * 60e-6
    for _ in range(100_000):
        f.observe(Tier.DISK, 1 << 15, 240e-6)
    assert f.fast_seconds(Tier.DISK, 1 << 15) == pytest.approx(240e-6)
    for _ in range(7):
        f.observe(Tier.DISK, 1 << 15, 30e-6)
    assert f.fast_seconds(Tier.DISK, 1 << 15) == pytest.approx(30e-6)


def test_a_pinned_rate_is_decided_by_whatever_is_measured() -> None:
    """disk.read_gbps: the operator's rate replaces the measurements (still counted), trusted at
    once; 0 goes back to the measurements."""
    f = FetchCosts()
    f.pin(Tier.DISK, 0.001)  # 1 MB/s
    assert f.trusted(Tier.DISK) and f.gbps(Tier.DISK) == pytest.approx(0.001)
    for _ in range(TRUSTED_AFTER):
        f.observe(Tier.DISK, 1 << 20, 1e-4)
    assert f.measured(Tier.DISK) == TRUSTED_AFTER
    assert f.seconds(Tier.DISK, 1 << 20) == f.fast_seconds(Tier.DISK, 1 << 20) == pytest.approx(1.048576)
    f.pin(Tier.DISK, 0)
    assert f.seconds(Tier.DISK, 1 << 20) == pytest.approx(1e-4)
