"""What the router believes each engine's own prefix cache holds, as chained page keys.

Owns the router's private key space (`RouteKeys`: page keys under a digest of the router's own, so
they never mix with a daemon's) and the approximate record of what was sent where
(`SentPrefixes`: bounded, least recently used first out), the fallback for an engine whose KV events
the router does not follow. An engine's events are followed with the daemon's own tracker
(`polarkvd.server.engine_events.GpuPrefixes`), fed the same keys.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

from polarkvd.keys import page_keys

#: Tokens per page of the router's keys: a hit is counted in whole pages. vLLM hits whole blocks (16
#: on GPUs, 128 on its CPU build), multiples of 16: a finer page would only cost hashing.
PAGE_TOKENS = 16


class RouteKeys:
    """Page keys of prompts for one model, in the router's own namespace."""

    def __init__(self, model: str, page_tokens: int = PAGE_TOKENS) -> None:
        self.digest = hashlib.blake2b(f"polarkvd-route:{model}".encode(), digest_size=16).digest()
        self.page_tokens = page_tokens

    def keys(self, tokens: Sequence[int]) -> list[bytes]:
        return [bytes(k) for k in page_keys(self.digest, tokens, self.page_tokens)]


class SentPrefixes:
    """The pages of prompts sent to one engine, at most `capacity` of them. A key names its whole
    prefix (keys chain), so a set of keys is a prefix tree; `leading` walks it from the root. Each
    send refreshes its pages; past the capacity the least recently sent go first, deepest first (an
    engine's own LRU cache drops its coldest blocks the same way)."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._keys: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def leading(self, keys: Sequence[bytes]) -> int:
        n = 0
        for k in keys:
            if k not in self._keys:
                break
            n += 1
        return n

    def sent(self, keys: Sequence[bytes]) -> None:
        d = self._keys
        # the prompt's first page refreshed last: eviction drops the tails of prefixes first (leaf
        # first), never a prefix's head while its tail stays (that tail could never be hit)
        for k in reversed(keys[: self.capacity]):
            d[k] = None
            d.move_to_end(k)
        while len(d) > self.capacity:
            d.popitem(last=False)

    def clear(self) -> None:
        self._keys.clear()
