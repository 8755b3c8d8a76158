"""Rendezvous (highest random weight) hashing: which member owns a key, where to place copies.

Owns the score function and nothing else: pure functions of (key, member ids, weights), no state
that outlives a call except caches of per-member seeds, no I/O, no clock. The meta map uses `Ring`
to find a key's owner; the DMP uses `place` to put demoted pages on peers by free space.

The score is a cross-process contract (every member must compute the same owner):

    seed(member) = xxh3_64(member_id.encode("utf-8"), seed=0)
    score(member, key) = xxh3_64(key, seed=seed(member))

the owner of a key is the member with the highest score (ties, which need a 64-bit collision, go to
the smallest member id). Seeding xxh3 with a per-member value instead of hashing `member_id + key`
saves a concatenation per member per key, and spreads keys as evenly (tests/cluster/test_ring.py
checks balance and movement); the seeds are computed once per member. Rendezvous moves only what it must: adding a member to N moves ~1/(N+1) of the keys, all of
them to the new member; removing one moves only its own keys.

`place` is weighted rendezvous (Schindelhauer and Schomaker, 2005): score = -w / ln(u), with
u = ((score >> 11) + 0.5) / 2**53, the same 64-bit score mapped into (0, 1). The first choice is member m with probability
w_m / sum(w); with equal weights the order is that of `owners`.

Cost per key (Python 3.11, one core of the dev box, 16-byte keys, best of 3 over 100k keys):
`Ring.owner` 0.24 µs with 3 members (unrolled), 1.4 µs with 16, 4.2 µs with 64, 15 µs with 256 (one
xxh3 per member, ~60 ns each, plus ~0.4 µs of call overhead); the module-level `owner` adds ~0.3 µs
for the cached ring lookup, so hot loops should hold a `Ring`. `place` over 16 weighted members ~6 µs
(a log and a division per member); it runs per demoted page, not per lookup. `Ring.owner_indexes`
scores many 16-byte keys at once with numpy (xxh3's 9-16 byte path written out, checked against
xxhash in tests/cluster/test_ring.py): ~0.1 µs a key with 4 members, for the meta map's `plan`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from itertools import repeat

import numpy as np
import xxhash

__all__ = ["Ring", "member_seed", "owner", "owners", "place", "score"]

_h = xxhash.xxh3_64_intdigest
_TWO_M53 = 2.0**-53


@functools.lru_cache(maxsize=4096)
def member_seed(member: str) -> int:
    """The xxh3 seed of a member id (see the module docstring)."""
    return _h(member.encode("utf-8"))


def score(key: bytes, member: str) -> int:
    """The rendezvous score of `member` for `key`: a 64-bit integer, higher wins."""
    return _h(key, member_seed(member))


class Ring:
    """The members, sorted and deduplicated, with their seeds precomputed: build one per membership
    view and ask it per key. Immutable."""

    __slots__ = ("members", "seeds", "_n", "_index")

    def __init__(self, members: Iterable[str]) -> None:
        self.members: tuple[str, ...] = tuple(sorted(set(members)))
        self.seeds: tuple[int, ...] = tuple(member_seed(m) for m in self.members)
        self._n = len(self.members)
        self._index = {m: i for i, m in enumerate(self.members)}

    def __len__(self) -> int:
        return self._n

    def __contains__(self, member: object) -> bool:
        return member in self._index

    def __repr__(self) -> str:
        return f"Ring({list(self.members)!r})"

    def owner(self, key: bytes) -> str | None:
        """The member with the highest score for `key`; None when there are no members."""
        n = self._n
        if n <= 3:  # unrolled: 3x faster than the general path for the smallest clusters
            ms, sd = self.members, self.seeds
            if n <= 1:
                return ms[0] if n else None
            a, b = _h(key, sd[0]), _h(key, sd[1])
            if n == 2:
                return ms[0] if a >= b else ms[1]
            c = _h(key, sd[2])
            if a >= b:
                return ms[0] if a >= c else ms[2]
            return ms[1] if b >= c else ms[2]
        sc = list(map(_h, repeat(key, n), self.seeds))
        # index() returns the first maximum: ties go to the smallest id, as in owners()
        return self.members[sc.index(max(sc))]

    def owner_indexes(self, keys: Sequence[bytes]) -> np.ndarray | None:
        """The owner of each key as an index into `members` (an int array), the same as `owner`
        gives, computed for all keys at once; None when a key is not 16 bytes (ask `owner`)."""
        blob = b"".join(keys)
        if len(blob) != 16 * len(keys) or not self._n:
            return None
        words = np.frombuffer(blob, "<u8").reshape(-1, 2)
        scores = _xxh3_16(words[:, 0], words[:, 1], np.array(self.seeds, np.uint64)[:, None])
        return scores.argmax(axis=0)  # the first maximum: ties go to the smallest id, as in owner()

    def owners(self, key: bytes, n: int) -> list[str]:
        """The `n` highest-scoring members for `key`, best first (fewer when there are fewer)."""
        if n <= 0 or not self._n:
            return []
        if n == 1:
            return [self.owner(key)]  # type: ignore[list-item]
        sc = list(map(_h, repeat(key, self._n), self.seeds))
        order = sorted(range(self._n), key=lambda i: (-sc[i], i))
        return [self.members[i] for i in order[:n]]

    def score(self, key: bytes, member: str) -> int:
        return _h(key, self.seeds[self._index[member]])


# xxh3_64 of 16-byte inputs with a seed (XXH3_len_9to16_64b): the default secret's words 3-6
_FLIP1, _FLIP2 = np.uint64(0x6782737BEA4239B9), np.uint64(0xAF56BC3B0996523A)
_M32, _PRIME = np.uint64(0xFFFFFFFF), np.uint64(0x165667919E3779F9)
_S32, _S37 = np.uint64(32), np.uint64(37)


def _xxh3_16(lo: np.ndarray, hi: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """xxh3_64(key, seed) for keys given as their two little-endian words, broadcast over `seeds`
    (a column: one row of scores per seed)."""
    with np.errstate(over="ignore"):
        a = lo ^ (_FLIP1 + seeds)
        b = hi ^ (_FLIP2 - seeds)
        al, ah, bl, bh = a & _M32, a >> _S32, b & _M32, b >> _S32
        ll, hl, lh = al * bl, ah * bl, al * bh
        cross = (ll >> _S32) + (hl & _M32) + lh  # the 128-bit product in 32-bit halves
        upper = (hl >> _S32) + (cross >> _S32) + ah * bh
        lower = (cross << _S32) | (ll & _M32)
        acc = np.uint64(16) + a.byteswap() + b + (lower ^ upper)
        acc ^= acc >> _S37
        acc *= _PRIME
        acc ^= acc >> _S32
    return acc


@functools.lru_cache(maxsize=64)
def _ring(members: tuple[str, ...]) -> Ring:
    return Ring(members)


def owner(key: bytes, members: Sequence[str]) -> str | None:
    """The owner of `key` among `members` (order and duplicates do not matter); None when empty."""
    return _ring(tuple(members)).owner(key)


def owners(key: bytes, members: Sequence[str], n: int) -> list[str]:
    """The `n` highest-scoring members for `key`, best first, distinct."""
    return _ring(tuple(members)).owners(key, n)


def place(key: bytes, weights: Mapping[str, float], n: int) -> list[str]:
    """Weighted rendezvous: up to `n` distinct members for `key`, best first, each chosen first with
    probability proportional to its weight (e.g. free DMP bytes). Members whose weight is not a finite
    number > 0 are never chosen. Deterministic for the same key and weights; when one weight changes,
    only keys whose choice involved that member can move."""
    if n <= 0:
        return []
    log = math.log
    # w / ln(u) is minus the score: an ascending sort puts the best first, ties to the smallest id
    scored = []
    for m, w in weights.items():
        if not w > 0 or w == math.inf:  # also rejects NaN
            continue
        u = ((_h(key, member_seed(m)) >> 11) + 0.5) * _TWO_M53  # strictly inside (0, 1)
        scored.append((w / log(u), m))
    if n == 1:
        return [min(scored)[1]] if scored else []
    scored.sort()
    return [m for _, m in scored[:n]]
