"""Rendezvous hashing: the properties the meta map and the DMP placement rely on."""

from __future__ import annotations

import collections
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import xxhash

from polarkvd.cluster import ring
from polarkvd.cluster.ring import Ring, owner, owners, place

from .conftest import SEED


def _keys(n: int, seed: int = SEED) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(16) for _ in range(n)]


def _members(n: int) -> list[str]:
    return [f"host-{i:02d}.rack{i % 3}" for i in range(n)]


def test_score_is_the_documented_formula():
    key = bytes(range(16))
    seed = xxhash.xxh3_64_intdigest(b"n1")
    assert ring.score(key, "n1") == xxhash.xxh3_64_intdigest(key, seed=seed)
    ms = ["n1", "n2", "n3", "n4"]
    assert owner(key, ms) == max(ms, key=lambda m: ring.score(key, m))


def test_owner_is_deterministic_across_processes_and_member_order():
    keys = _keys(50)
    ms = _members(7)
    here = [owner(k, ms) for k in keys]
    assert here == [owner(k, list(reversed(ms))) for k in keys]
    assert here == [owner(k, ms + ms[:3]) for k in keys]  # duplicates do not matter
    code = (
        "import sys; from polarkvd.cluster.ring import owner; "
        "ms = sys.argv[1].split(','); "
        "print(' '.join(owner(bytes.fromhex(k), ms) for k in sys.argv[2].split(',')))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")  # builtin hash() must play no part
    out = subprocess.run(
        [sys.executable, "-c", code, ",".join(ms), ",".join(k.hex() for k in keys)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.split()
    assert out == here


def test_no_members_no_owner():
    assert owner(b"k" * 16, []) is None
    assert owners(b"k" * 16, [], 3) == []
    assert place(b"k" * 16, {}, 2) == []
    assert Ring([]).owner(b"k" * 16) is None


@pytest.mark.parametrize("n", [1, 2, 3, 4, 16])
def test_ring_owner_agrees_with_owners_and_scores(n):
    r = Ring(_members(n))
    for k in _keys(500):
        best = max(r.members, key=lambda m: (ring.score(k, m), [-ord(c) for c in m]))
        assert r.owner(k) == best == r.owners(k, n)[0]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 16])
def test_owners_of_many_keys_at_once_are_those_owner_gives(n):
    r = Ring(_members(n))
    keys = _keys(3000)
    assert [r.members[i] for i in r.owner_indexes(keys)] == [r.owner(k) for k in keys]
    assert r.owner_indexes([b"k" * 16, b"short"]) is None  # only 16-byte keys: the caller asks owner()


def test_the_vectorised_hash_is_xxh3():
    keys = _keys(1000)
    words = np.frombuffer(b"".join(keys), "<u8").reshape(-1, 2)
    for seed in (0, 1, 2**63 + 5, 2**64 - 1):
        got = ring._xxh3_16(words[:, 0], words[:, 1], np.uint64(seed)).tolist()
        assert got == [xxhash.xxh3_64_intdigest(k, seed) for k in keys]


@pytest.mark.parametrize("n,tolerance", [(3, 0.03), (16, 0.05)])
def test_each_member_gets_its_fair_share(n, tolerance):
    r = Ring(_members(n))
    counts = collections.Counter(r.owner(k) for k in _keys(100_000))
    fair = 100_000 / n
    assert set(counts) == set(r.members)
    # 3 members: std ~150 keys, tolerance 1000; 16: std ~77, tolerance 312 (both > 4 std)
    for m, c in counts.items():
        assert abs(c - fair) <= tolerance * fair, (m, c, fair)


@pytest.mark.parametrize("n", [3, 16])
def test_adding_a_member_moves_only_its_share_and_only_to_it(n):
    keys = _keys(30_000)
    ms = _members(n + 1)
    before, after = Ring(ms[:n]), Ring(ms)
    moved = [k for k in keys if before.owner(k) != after.owner(k)]
    assert all(after.owner(k) == ms[n] for k in moved)
    expected = len(keys) / (n + 1)
    assert abs(len(moved) - expected) <= 0.08 * expected, (len(moved), expected)


@pytest.mark.parametrize("n", [3, 16])
def test_removing_a_member_moves_only_its_keys(n):
    keys = _keys(30_000)
    ms = _members(n)
    gone = ms[1]
    before, after = Ring(ms), Ring(m for m in ms if m != gone)
    for k in keys:
        if before.owner(k) != gone:
            assert after.owner(k) == before.owner(k)
        else:
            assert after.owner(k) != gone


def test_owners_are_distinct_and_ordered_by_score():
    ms = _members(8)
    for k in _keys(200):
        top = owners(k, ms, 3)
        assert len(set(top)) == 3
        scores = [ring.score(k, m) for m in top]
        assert scores == sorted(scores, reverse=True)
        assert top[0] == owner(k, ms)
        assert max(ring.score(k, m) for m in ms if m not in top) < scores[-1]
        assert owners(k, ms, 20) == owners(k, ms, 8)  # never more than there are


def test_weighted_placement_is_proportional_to_weights():
    weights = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 0.0, "e": -5.0, "f": float("nan")}
    counts = collections.Counter(place(k, weights, 1)[0] for k in _keys(60_000))
    assert set(counts) == {"a", "b", "c"}
    for m, share in (("a", 1 / 6), ("b", 2 / 6), ("c", 3 / 6)):
        assert abs(counts[m] / 60_000 - share) < 0.012, (m, counts[m])


def test_place_returns_n_distinct_members_with_positive_weight():
    weights = {f"m{i}": float(i) for i in range(6)}  # m0 has weight 0
    for k in _keys(300):
        got = place(k, weights, 3)
        assert len(got) == 3 and len(set(got)) == 3 and "m0" not in got
        assert place(k, weights, 1) == got[:1]
        assert sorted(place(k, weights, 10)) == [f"m{i}" for i in range(1, 6)]
    assert place(b"k" * 16, {"x": 0.0, "y": float("inf")}, 2) == []
    assert place(b"k" * 16, weights, 0) == []


def test_equal_weights_place_like_owners():
    ms = _members(5)
    for k in _keys(300):
        assert place(k, dict.fromkeys(ms, 7.0), 3) == owners(k, ms, 3)


def test_changing_one_weight_moves_only_keys_involving_it():
    keys = _keys(20_000)
    w1 = {"a": 1.0, "b": 1.0, "c": 1.0}
    w2 = {"a": 1.0, "b": 1.0, "c": 2.0}  # c got more free space
    before = [place(k, w1, 1)[0] for k in keys]
    after = [place(k, w2, 1)[0] for k in keys]
    moved = [(x, y) for x, y in zip(before, after) if x != y]
    assert moved and all(y == "c" for _, y in moved)  # only toward the member that grew
    assert collections.Counter(after)["c"] / len(keys) == pytest.approx(0.5, abs=0.015)


def test_owner_cost_per_key():
    # measured (Python 3.11, one core of the dev box): 3 members ~0.25 µs, 16 ~1.35 µs per key.
    # The bound is loose so a loaded CI box passes; it catches an accidental O(n log n) or a
    # per-call seed computation.
    keys = _keys(20_000)
    r = Ring(_members(16))
    own = r.owner
    t = time.perf_counter()
    for k in keys:
        own(k)
    per_key = (time.perf_counter() - t) / len(keys)
    assert per_key < 20e-6, per_key
