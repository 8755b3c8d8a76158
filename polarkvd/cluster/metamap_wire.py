"""The meta map's messages and their wire form: `Announce` (a holder's stored and removed pages),
`Hello`, `Where` (who holds these keys?) and `Here` (the answer), batched into msgpack blobs with
a protocol name and version. Decoding checks every field and refuses a bad batch whole (`BadBatch`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack
import xxhash

from polarkvd.errors import ProtocolError
from polarkvd.types import KEY_BYTES, Tier

_h = xxhash.xxh3_64_intdigest

#: First element of every batch: protocol name and version, so a foreign sender is rejected.
MAGIC = "pkm1"
#: Hard limits against hostile or broken peers.
MAX_BATCH_BYTES = 8 << 20
MAX_MESSAGES = 4096
MAX_KEYS = 65536  # per message
MAX_ID_CHARS = 1024


class BadBatch(ProtocolError, ValueError):
    """`decode_batch` got something that is not a well-formed meta map batch of this version."""


@dataclasses.dataclass(frozen=True, slots=True)
class Announce:
    """Holder → owner: these keys are now stored here at these tiers / no longer stored here."""

    view: int  # view_digest() of the sender's member list when it sent this
    stored: tuple[tuple[bytes, int], ...] = ()  # (key, Tier value): the best tier holding it
    removed: tuple[bytes, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    """Sender → a member that just appeared in its view: drop what you hold from me, I re-announce;
    send me your pages I own. Always before the sender's announcements in the same stream."""


@dataclasses.dataclass(frozen=True, slots=True)
class Where:
    """Querier → owner: who holds these keys?"""

    keys: tuple[bytes, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Here:
    """Owner → querier: holder ids per key of the `Where`, in its order (empty: unknown)."""

    holders: tuple[tuple[str, ...], ...]


Message = Announce | Hello | Where | Here

_ANNOUNCE, _HELLO, _WHERE, _HERE = 1, 2, 3, 4
_TIER_BYTES = bytes(int(t) for t in Tier)
TIERS = frozenset(_TIER_BYTES)  # the tier bytes a message may carry


def view_digest(members: Iterable[str]) -> int:
    """A 64-bit digest of a member set (order and duplicates do not matter)."""
    return _h("\0".join(sorted(set(members))).encode("utf-8"))


def _to_wire(m: Message) -> list[Any]:
    t = type(m)
    if t is Announce:
        assert isinstance(m, Announce)
        return [_ANNOUNCE, m.view, [k for k, _ in m.stored], bytes(t for _, t in m.stored), list(m.removed)]
    if t is Hello:
        return [_HELLO]
    if t is Where:
        assert isinstance(m, Where)
        return [_WHERE, list(m.keys)]
    if t is Here:
        assert isinstance(m, Here)
        table: dict[str, int] = {}
        idx = [[table.setdefault(h, len(table)) for h in hs] for hs in m.holders]
        return [_HERE, list(table), idx]
    raise TypeError(f"not a meta map message: {type(m).__name__}")


def encode_batch(msgs: Sequence[Message]) -> bytes:
    """Messages → one batch of bytes. ValueError when it would be over MAX_BATCH_BYTES or
    MAX_MESSAGES (use `encode_batches`)."""
    if len(msgs) > MAX_MESSAGES:
        raise ValueError(f"{len(msgs)} messages in one batch (max {MAX_MESSAGES})")
    data = msgpack.packb([MAGIC, [_to_wire(m) for m in msgs]], use_bin_type=True)
    if len(data) > MAX_BATCH_BYTES:
        raise ValueError(f"batch of {len(data)} bytes is over {MAX_BATCH_BYTES}")
    return data


def encode_batches(msgs: Sequence[Message], per_batch: int = 64) -> list[bytes]:
    """Messages → batches of at most `per_batch` messages each (64 full announcements ≈ 1.2 MiB)."""
    return [encode_batch(msgs[i : i + per_batch]) for i in range(0, len(msgs), per_batch)]


def _int64(v: Any, what: str) -> int:
    if type(v) is not int or v < 0 or v >= 1 << 64:
        raise BadBatch(f"{what}: expected an unsigned 64-bit int, got {type(v).__name__}")
    return v


def _keys(v: Any, what: str) -> tuple[bytes, ...]:
    if type(v) is not list:
        raise BadBatch(f"{what}: keys are not a list")
    if len(v) > MAX_KEYS:
        raise BadBatch(f"{what}: {len(v)} keys in one message (max {MAX_KEYS})")
    for k in v:
        if type(k) is not bytes or len(k) != KEY_BYTES:
            raise BadBatch(f"{what}: a key is not a {KEY_BYTES}-byte bin")
    return tuple(v)


def _from_wire(w: Any) -> Message:
    if type(w) is not list or not w:
        raise BadBatch("message is not a non-empty list")
    t = w[0]
    if t == _ANNOUNCE and type(t) is int:
        if len(w) != 5:
            raise BadBatch(f"announce: expected 5 fields, got {len(w)}")
        view = _int64(w[1], "announce.view")
        keys = _keys(w[2], "announce.stored")
        tiers = w[3]
        if type(tiers) is not bytes or len(tiers) != len(keys):
            raise BadBatch("announce: tiers are not a bin of one byte per stored key")
        if tiers.translate(None, _TIER_BYTES):
            raise BadBatch(f"announce: a tier is not one of {list(_TIER_BYTES)}")
        return Announce(view, tuple(zip(keys, tiers)), _keys(w[4], "announce.removed"))
    if t == _HELLO and type(t) is int:
        if len(w) != 1:
            raise BadBatch(f"hello: expected no fields, got {len(w) - 1}")
        return Hello()
    if t == _WHERE and type(t) is int:
        if len(w) != 2:
            raise BadBatch(f"where: expected 1 field, got {len(w) - 1}")
        return Where(_keys(w[1], "where.keys"))
    if t == _HERE and type(t) is int:
        if len(w) != 3 or type(w[1]) is not list or type(w[2]) is not list:
            raise BadBatch("here: expected [table, indexes]")
        table = w[1]
        if len(table) > MAX_MESSAGES or len(w[2]) > MAX_KEYS:
            raise BadBatch("here: too many holders or keys")
        for node in table:
            if type(node) is not str or not 0 < len(node) <= MAX_ID_CHARS:
                raise BadBatch("here: a holder id is not a short non-empty str")
        n = len(table)
        holders = []
        for ix in w[2]:
            if type(ix) is not list or len(ix) > n:
                raise BadBatch("here: a key's holders are not a list of table indexes")
            for i in ix:
                if type(i) is not int or not 0 <= i < n:
                    raise BadBatch("here: a holder index is out of the table")
            holders.append(tuple(table[i] for i in ix))
        return Here(tuple(holders))
    raise BadBatch(f"unknown message type {t!r}")


def decode_batch(data: bytes) -> list[Message]:
    """Bytes → messages, or `BadBatch` (a ValueError and a ProtocolError) that says what is wrong.
    Never raises anything else, never instantiates anything the bytes name."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadBatch(f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_BATCH_BYTES:
        raise BadBatch(f"batch of {len(data)} bytes is over {MAX_BATCH_BYTES}")
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True, max_bin_len=MAX_BATCH_BYTES)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise BadBatch(f"not msgpack: {e}") from None
    if type(obj) is not list or len(obj) != 2 or obj[0] != MAGIC or type(obj[1]) is not list:
        raise BadBatch("not a polarkvd meta map batch")
    if len(obj[1]) > MAX_MESSAGES:
        raise BadBatch(f"{len(obj[1])} messages in one batch (max {MAX_MESSAGES})")
    return [_from_wire(w) for w in obj[1]]
