"""Page keys: stable, chained hashes over token ids, keyed by the daemon's secret seed.

A leaf module (imports only `types`). The key of page *n* of a token sequence is

    ns_digest = BLAKE2b-128(msgpack(namespace fields), key = seed)
    key[n]    = xxh3_128(key[n-1] ‖ ns_digest ‖ token ids of page n as little-endian uint32)

with key[-1] = 16 zero bytes. A key therefore names its whole prefix: a hit on page *n* implies the
prefix up to *n*, and the namespace (model, dtype, layout, geometry, TP shard, cache salt) is inside
every key, so different namespaces never share a page. The seed (32 secret bytes per daemon or
cluster, `seed.py`) makes the digest, and so every key, unpredictable without it: engines receive
their namespace's digest in `hello`, never the seed. xxh3-128 is stable across processes, hosts and
Python versions (never Python's `hash()`); ~0.4 ms for 200k tokens. Only full pages get keys: a
partial trailing page is never cached. Chunk pages (`chunk_keys`, CacheBlend) are a second family
with a domain tag of their own, so a chunk key never equals a prefix key; a chunk computed behind a
context (a shared header) chains from that context's root (`chunk_root`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgpack
import numpy as np
import xxhash

from polarkvd.types import KEY_BYTES, Namespace, PageKey

ROOT_KEY = PageKey(bytes(KEY_BYTES))
#: Length of a page-key seed.
SEED_BYTES = 32
_NS_PERSON = b"polarkv-ns-v2"
_FP_PERSON = b"polarkv-seed-fp"


def _check_seed(seed: bytes) -> None:
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise ValueError(f"a page-key seed is {SEED_BYTES} bytes")


def namespace_digest(ns: Namespace, seed: bytes) -> bytes:
    """16 bytes that identify a namespace under `seed`: a keyed BLAKE2b over every field in a fixed
    order. Without the seed, nobody can compute it (or any page key of the namespace)."""
    _check_seed(seed)
    fields = [
        ns.model,
        ns.dtype,
        ns.layout,
        ns.num_layers,
        ns.num_kv_heads,
        ns.head_dim,
        ns.page_tokens,
        ns.tp_rank,
        ns.tp_size,
        ns.kv_parts,
        ns.cache_salt,
    ]
    return hashlib.blake2b(msgpack.packb(fields), digest_size=KEY_BYTES, key=seed, person=_NS_PERSON).digest()


def seed_fingerprint(seed: bytes) -> str:
    """16 hex characters that tell seeds apart and reveal nothing of them: published in gossip,
    recorded by the disk tier, shown by `status`."""
    _check_seed(seed)
    return hashlib.blake2b(b"", digest_size=8, key=seed, person=_FP_PERSON).hexdigest()


def page_keys(
    ns_digest: bytes,
    token_ids: Sequence[int] | np.ndarray,
    page_tokens: int,
    parent: bytes = ROOT_KEY,
) -> list[PageKey]:
    """Keys of every full page of `token_ids`, chained from `parent` (the key before the first page)."""
    if len(ns_digest) != KEY_BYTES or len(parent) != KEY_BYTES:
        raise ValueError("namespace digest and parent key must be 16 bytes")
    if page_tokens <= 0:
        raise ValueError("page_tokens must be positive")
    tokens = np.asarray(token_ids)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 0xFFFFFFFF):
        raise ValueError("token ids must fit in uint32")
    full = (tokens.size // page_tokens) * page_tokens
    data = tokens[:full].astype("<u4", copy=False).tobytes()
    step = page_tokens * 4
    keys: list[PageKey] = []
    h = xxhash.xxh3_128_digest
    prev = parent
    for off in range(0, len(data), step):
        prev = h(prev + ns_digest + data[off : off + step])
        keys.append(PageKey(prev))
    return keys


#: Domain tag in front of every chunk-page hash input. Prefix-page inputs are 32 + 4·n bytes long;
#: with these 2 bytes a chunk-page input is 34 + 4·n: never the same bytes, so a chunk key equals a
#: prefix key only by a 128-bit hash collision, whatever the tokens.
_CHUNK_TAG = b"\xc4\x01"
#: Domain tag of a chunk context's root (the hash of the tokens a chunk was computed behind). Its
#: input is 18 + 4·m bytes: never a prefix page's length, and never a chunk page's bytes (the tag).
_CONTEXT_TAG = b"\xc4\x02"


def _u32(token_ids: Sequence[int] | np.ndarray) -> bytes:
    tokens = np.asarray(token_ids)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 0xFFFFFFFF):
        raise ValueError("token ids must fit in uint32")
    return tokens.astype("<u4", copy=False).tobytes()


def chunk_root(ns_digest: bytes, context: Sequence[int] | np.ndarray = ()) -> PageKey:
    """The key a chunk's chain starts from: `ROOT_KEY` for a chunk computed from position 0, else

        croot = xxh3_128(0xC4 0x02 ‖ ns_digest ‖ context token ids)

    for a chunk computed behind `context` (the prompts' shared header): its KV depends on the
    context, so the context is inside each of its keys, and another context never shares it."""
    if len(ns_digest) != KEY_BYTES:
        raise ValueError("namespace digest must be 16 bytes")
    data = _u32(context)
    if not data:
        return ROOT_KEY
    return PageKey(xxhash.xxh3_128_digest(_CONTEXT_TAG + ns_digest + data))


def chunk_keys(
    ns_digest: bytes,
    token_ids: Sequence[int] | np.ndarray,
    page_tokens: int,
    context: Sequence[int] | np.ndarray = (),
) -> list[PageKey]:
    """Keys of the pages of a chunk: a text whose KV was computed on its own, from position 0 or
    behind `context` (CacheBlend, polarkvd/blend). Its own family, chained from the chunk root:

        ckey[n] = xxh3_128(0xC4 0x01 ‖ ckey[n-1] ‖ ns_digest ‖ token ids of page n)

    with ckey[-1] = `chunk_root(ns_digest, context)`. Unlike `page_keys`, a partial last page gets a
    key too (a chunk is stored whole: its length is in its last key, through the shorter input), so
    `ceil(len / page_tokens)` keys. The namespace (salt included) is in every key, as for prefix pages."""
    if page_tokens <= 0:
        raise ValueError("page_tokens must be positive")
    prev: bytes = chunk_root(ns_digest, context)
    data = _u32(token_ids)
    step = page_tokens * 4
    keys: list[PageKey] = []
    h = xxhash.xxh3_128_digest
    for off in range(0, len(data), step):
        prev = h(_CHUNK_TAG + prev + ns_digest + data[off : off + step])
        keys.append(PageKey(prev))
    return keys
