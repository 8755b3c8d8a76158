"""The distributed meta map: which members hold copies of which pages, as a pure state machine.

Owns, for one daemon: the location records of the keys this member *owns* (the owner of a key is the
live member that `ring.Ring` ranks first for it), the list of this daemon's own pages (its DRAM and the
DMP region it lends) grouped by their owner, the outgoing announcement queues, and the wire messages
(`Announce`, `Hello`, `Where`, `Here`) with their codec. Must not do I/O, start threads, sleep or read
a clock: the caller passes `now`, delivers what `take_outgoing` returns, feeds received messages to
`on_message`, answers `Where` queries with `answer`, and calls `set_members` on membership changes.

Records are hints. A stale one (a copy evicted since, a holder that died before anyone noticed) makes
a fetch fail and the engine recompute; a missing one makes a miss. Neither can produce wrong bytes:
pages carry their key and checksum, checked by the reader. So this module prefers cheap and
convergent over exact: updates are batched and coalesced, nothing is acknowledged or retried, and
views of the membership may disagree for a while.

How records converge (each rule has a test in tests/cluster/test_metamap.py):

- A holder sends each stored/removed event to the key's owner under its view, coalesced per key
  (last event wins) and batched per owner (`batch_max` entries, after `flush_after` seconds). Events
  for keys we own ourselves are applied at once.
- `set_members`: records whose holder left are dropped; records of keys a new member now wins are
  dropped (the new owner gets them from the holders); our pages whose owner changed are queued for
  the new owner. Rendezvous hashing keeps this to the keys that really moved.
- A member that appears in our view gets a `Hello` before our announcements to it. Its receiver drops
  every record it had from us (we may have restarted, or falsely been declared dead and missed
  events) and sends us all its pages we own (we may have restarted with an empty map, or have dropped
  its records while it was out of our view). The first `set_members` after start greets everyone, so a
  daemon that restarts faster than failure detection still resynchronises.
- Announcements from members outside our view are ignored (they greet us when we see each other).
  Each `Announce` carries a digest of its sender's view; entries sent under a view other than ours are
  kept (our view is probably just behind) but checked against our ring after `verify_after` seconds,
  and dropped if we do not own them then.

Costs (Python 3.11, one core of the dev box; docs/CLUSTER.md "Meta map" has the table): 85-110 bytes
per owned record with one holder (the 16-byte key object and its dict slot; holders are interned),
`locate` ~60 ns per key (one dict probe), a full re-announcement of 100k pages ~120 ms of CPU for both
sides together and 19 bytes per page on the wire; a member joining 16 costs a holder of 100k pages
~35 ms.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgpack
import xxhash

from polarkvd.cluster.ring import Ring, member_seed
from polarkvd.errors import ProtocolError
from polarkvd.types import KEY_BYTES, Tier

__all__ = [
    "Announce",
    "BadBatch",
    "Hello",
    "Here",
    "MAGIC",
    "Message",
    "MetaMap",
    "Where",
    "decode_batch",
    "encode_batch",
    "encode_batches",
    "view_digest",
]

_h = xxhash.xxh3_64_intdigest

# ------------------------------------------------------------------------------------- messages

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
_TIERS = frozenset(_TIER_BYTES)


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


# ------------------------------------------------------------------------------------ the map


class _Copy:
    """One holder's copy of a key, at its best tier. Interned per (node, tier): a record of a key
    with one holder costs the dict slot and nothing else."""

    __slots__ = ("node", "tier", "nodes")

    def __init__(self, node: str, tier: int) -> None:
        self.node = node
        self.tier = tier
        self.nodes = (node,)  # what locate() returns for a single holder, built once

    def __repr__(self) -> str:
        return f"_Copy({self.node!r}, {self.tier})"


def _rank(c: _Copy) -> tuple[int, str]:
    return (c.tier, c.node)  # faster tiers first, then by id: a stable order for every querier


def _best(mask: int) -> int:
    """The fastest (lowest) tier in a bit mask of tiers."""
    return (mask & -mask).bit_length() - 1


_Record = _Copy | tuple[_Copy, ...]


class MetaMap:
    """One daemon's share of the meta map. See the module docstring for the protocol.

    Owner side: `on_message` (announcements), `locate`/`answer` (queries). Holder side:
    `local_stored`, `local_removed`. Querier side: `plan`, `merge_answers`, `longest_prefix`. Sending:
    `take_outgoing` whenever `now >= next_deadline()`. Membership: `set_members` on every change of
    the live member set (it is cheap when nothing changed)."""

    def __init__(
        self,
        self_id: str,
        *,
        batch_max: int = 512,
        flush_after: float = 0.005,
        verify_after: float = 30.0,
    ) -> None:
        if not self_id:
            raise ValueError("self_id must be a non-empty member id")
        if not 1 <= batch_max <= MAX_KEYS:
            raise ValueError(f"batch_max = {batch_max!r}: must be in 1..{MAX_KEYS}")
        if not flush_after >= 0 or not verify_after >= 0:
            raise ValueError(f"flush_after = {flush_after!r}, verify_after = {verify_after!r}: must be >= 0")
        self.self_id = self_id
        self.batch_max = batch_max
        self.flush_after = flush_after
        self.verify_after = verify_after
        self._ring = Ring([self_id])
        self._view = view_digest(self._ring.members)
        # owner side
        self._records: dict[bytes, _Record] = {}
        self._held: dict[str, int] = {}  # holder -> records naming it (skips scans for idle holders)
        self._copies: dict[tuple[str, int], _Copy] = {}
        # (when to check, keys) per announcement sent under another view than ours
        self._unverified: collections.deque[tuple[float, tuple[bytes, ...]]] = collections.deque()
        self._n_unverified = 0
        # holder side: owner -> our key -> bit mask of the tiers holding it here
        self._local: dict[str, dict[bytes, int]] = {}
        self._n_local = 0
        # outgoing: destination -> key -> tier (0: removed); coalesced, insertion-ordered
        self._out: dict[str, dict[bytes, int]] = {}
        self._since: dict[str, float] = {}  # destination -> when its oldest pending item was queued
        self._hello: set[str] = set()
        self._stats = dict.fromkeys(
            (
                "announcements_sent",
                "announcements_received",
                "reannounced",
                "dropped_records",
                "handed_off",
                "unverified_dropped",
                "bad_messages",
                "stale_messages",
                "hellos_sent",
                "hellos_received",
                "located",
                "requeued",
            ),
            0,
        )

    # ----------------------------------------------------------------------------- membership

    @property
    def ring(self) -> Ring:
        """The live members as of the last `set_members` (always including ourselves)."""
        return self._ring

    @property
    def view(self) -> int:
        return self._view

    def owner(self, key: bytes) -> str:
        return self._ring.owner(key)  # type: ignore[return-value]  # never empty: we are in it

    def set_members(self, members: Iterable[str], now: float) -> None:
        """The live members (we are added if missing). Cost when the set changed: one pass over our
        records (1 + added hashes each) and over our pages (1 + added hashes each, a full ring
        evaluation for pages whose owner left); nothing when it did not change."""
        new = set(members)
        new.add(self.self_id)
        old = set(self._ring.members)
        if new == old:
            return
        added, removed = new - old, old - new
        ring = Ring(new)
        self._ring, self._view = ring, view_digest(ring.members)
        for d in removed:
            # our pending news for a departed owner is moot: its keys are re-announced below
            self._out.pop(d, None)
            self._since.pop(d, None)
            self._hello.discard(d)
        for a in added:
            self._hello.add(a)
            self._since.setdefault(a, now)
        self._sweep(removed, added, ring)
        self._reroute_pending(added)
        self._repartition(removed, added, ring, now)

    def _sweep(self, removed: set[str], added: set[str], ring: Ring) -> None:
        recs, held = self._records, self._held
        if removed and any(held.get(r) for r in removed):
            dropped = 0
            for key, v in list(recs.items()):
                if type(v) is _Copy:
                    if v.node in removed:
                        del recs[key]
                        dropped += 1
                else:
                    rest = tuple(c for c in v if c.node not in removed)  # type: ignore[union-attr]
                    if len(rest) != len(v):  # type: ignore[arg-type]
                        dropped += len(v) - len(rest)  # type: ignore[arg-type]
                        if rest:
                            recs[key] = rest[0] if len(rest) == 1 else rest
                        else:
                            del recs[key]
            self._stats["dropped_records"] += dropped
        for r in removed:
            held.pop(r, None)
        if added and recs:
            # rendezvous: a key we owned is now someone else's only if a newcomer outscores us
            me, seeds, lost = self.self_id, [member_seed(a) for a in added], []
            mine = member_seed(me)
            for key in recs:
                s = _h(key, mine)
                for sd in seeds:
                    t = _h(key, sd)
                    if t > s or (t == s and ring.owner(key) != me):
                        lost.append(key)
                        break
            for key in lost:
                self._forget(key)
            self._stats["handed_off"] += len(lost)

    def _reroute_pending(self, added: set[str]) -> None:
        """Pending items whose key a newcomer now owns would leave a stray record at the old owner
        (or be dropped by it): take them out. The repartition queues the current state of those keys
        for the new owner."""
        if not added:
            return
        seeds = [member_seed(a) for a in added]
        for dest, q in self._out.items():
            if dest in added or not q:
                continue
            sd0 = member_seed(dest)
            moved = [k for k in q if _outscored(k, sd0, seeds)]
            for k in moved:
                del q[k]

    def _repartition(self, removed: set[str], added: set[str], ring: Ring, now: float) -> None:
        local = self._local
        moves: list[tuple[bytes, int, str]] = []
        for d in removed:
            part = local.pop(d, None)
            if part:
                owner = ring.owner
                moves.extend((k, m, owner(k)) for k, m in part.items())  # type: ignore[misc]
        if added:
            cand = sorted((member_seed(a), a) for a in added)
            for o, part in list(local.items()):
                so = member_seed(o)
                gone = []
                for key, mask in part.items():
                    best, bs = o, _h(key, so)
                    for sd, a in cand:
                        t = _h(key, sd)
                        if t >= bs:
                            if t == bs:  # a 64-bit tie: let the ring's tie rule decide
                                best = ring.owner(key)  # type: ignore[assignment]
                                break
                            best, bs = a, t
                    if best != o:
                        gone.append((key, mask, best))
                for key, _, _ in gone:
                    del part[key]
                if not part:
                    del local[o]
                moves.extend(gone)
        me = self.self_id
        for key, mask, o in moves:
            local.setdefault(o, {})[key] = mask
            if o == me:
                self._put(me, key, _best(mask))
            else:
                self._queue(o, key, _best(mask), now)
        self._stats["reannounced"] += len(moves)

    # ---------------------------------------------------------------------------- holder side

    def local_stored(self, key: bytes, tier: int, now: float) -> None:
        """One of our tiers (DRAM, or the DMP region we lend) now holds `key`. Announced to its owner
        when it is new here or its best tier got faster."""
        if len(key) != KEY_BYTES:
            raise ValueError(f"a page key is {KEY_BYTES} bytes, got {len(key)}")
        if tier not in _TIERS:
            raise ValueError(f"tier {tier!r} is not one of {sorted(_TIERS)} (polarkvd.types.Tier)")
        tier = int(tier)
        o = self._ring.owner(key)
        part = self._local.get(o)  # type: ignore[arg-type]
        if part is None:
            part = self._local[o] = {}  # type: ignore[index]
        old = part.get(key, 0)
        new = old | (1 << tier)
        if new == old:
            return
        part[key] = new
        if not old:
            self._n_local += 1
        if not old or _best(new) != _best(old):
            self._emit(o, key, _best(new), now)  # type: ignore[arg-type]

    def local_removed(self, key: bytes, now: float, tier: int | None = None) -> None:
        """`key` left our tier `tier` (None: every tier here). Announced as removed when no tier here
        holds it any more, as stored at the new best tier when only the fastest copy left. Unknown
        keys are ignored."""
        o = self._ring.owner(key)
        part = self._local.get(o)  # type: ignore[arg-type]
        old = part.get(key) if part else None
        if old is None:
            return
        new = 0 if tier is None else old & ~(1 << int(tier))
        if new == old:
            return
        if new:
            part[key] = new  # type: ignore[index]
            if _best(new) != _best(old):
                self._emit(o, key, _best(new), now)  # type: ignore[arg-type]
            return
        del part[key]  # type: ignore[union-attr]
        self._n_local -= 1
        self._emit(o, key, 0, now)  # type: ignore[arg-type]

    def requeue(self, dest: str, msgs: Sequence[Message], now: float) -> int:
        """Messages to `dest` were lost (the send failed): queue again what they said, as it stands
        *now* — keys still ours at their current best tier, keys gone as removed — for keys `dest`
        still owns. A lost `Hello` is owed again. Returns how many keys were queued."""
        if dest == self.self_id or dest not in self._ring:
            return 0
        n = 0
        for msg in msgs:
            if type(msg) is Hello:
                self._hello.add(dest)
                self._since.setdefault(dest, now)
                continue
            if type(msg) is not Announce:
                continue
            for key in itertools.chain((k for k, _ in msg.stored), msg.removed):
                if self._ring.owner(key) != dest:
                    continue
                mask = (self._local.get(dest) or {}).get(key, 0)
                self._queue(dest, key, _best(mask) if mask else 0, now)
                n += 1
        self._stats["requeued"] += n
        return n

    def _emit(self, o: str, key: bytes, tier: int, now: float) -> None:
        if o == self.self_id:
            if tier:
                self._put(o, key, tier)
            else:
                self._drop(o, key)
        else:
            self._queue(o, key, tier, now)

    def _queue(self, dest: str, key: bytes, tier: int, now: float) -> None:
        q = self._out.get(dest)
        if q is None:
            q = self._out[dest] = {}
        elif key in q:
            del q[key]  # last event wins, and it moves to the back of the queue
        q[key] = tier
        if dest not in self._since:
            self._since[dest] = now

    # ----------------------------------------------------------------------------- owner side

    def on_message(self, src: str, msg: Message, now: float) -> None:
        """Apply an `Announce` or `Hello` from member `src` (the id the transport authenticated).
        Messages from members outside our view are counted in `stale_messages` and ignored; anything
        else (a `Where` or `Here` here) in `bad_messages`. Never raises."""
        t = type(msg)
        if t is Announce:
            assert isinstance(msg, Announce)
            if src not in self._ring or src == self.self_id:
                self._stats["stale_messages"] += 1
                return
            if msg.view != self._view and msg.stored:
                # sent under another view: ours is probably behind; check ownership once it settled
                self._unverified.append((now + self.verify_after, tuple(k for k, _ in msg.stored)))
                self._n_unverified += len(msg.stored)
            put = self._put
            for key, tier in msg.stored:
                put(src, key, tier)
            drop = self._drop
            for key in msg.removed:
                drop(src, key)
            self._stats["announcements_received"] += len(msg.stored) + len(msg.removed)
        elif t is Hello:
            if src not in self._ring or src == self.self_id:
                self._stats["stale_messages"] += 1
                return
            self._stats["hellos_received"] += 1
            if self._held.get(src):
                self._forget_holder(src)
            part = self._local.get(src)
            if part:
                for key, mask in part.items():
                    self._queue(src, key, _best(mask), now)
                self._stats["reannounced"] += len(part)
        else:
            self._stats["bad_messages"] += 1

    def _copy(self, node: str, tier: int) -> _Copy:
        c = self._copies.get((node, tier))
        if c is None:
            c = self._copies[(node, tier)] = _Copy(node, tier)
        return c

    def _put(self, holder: str, key: bytes, tier: int) -> None:
        c = self._copy(holder, tier)
        recs = self._records
        v = recs.get(key)
        if v is None:
            recs[key] = c
        elif type(v) is _Copy:
            if v.node == holder:
                recs[key] = c
                return
            recs[key] = (v, c) if _rank(v) <= _rank(c) else (c, v)
        else:
            rest = [x for x in v if x.node != holder]  # type: ignore[union-attr]
            known = len(rest) != len(v)  # type: ignore[arg-type]
            rest.append(c)
            rest.sort(key=_rank)
            recs[key] = tuple(rest)
            if known:
                return
        self._held[holder] = self._held.get(holder, 0) + 1

    def _drop(self, holder: str, key: bytes) -> None:
        recs = self._records
        v = recs.get(key)
        if v is None:
            return
        if type(v) is _Copy:
            if v.node != holder:
                return
            del recs[key]
        else:
            rest = tuple(x for x in v if x.node != holder)  # type: ignore[union-attr]
            if len(rest) == len(v):  # type: ignore[arg-type]
                return
            recs[key] = rest[0] if len(rest) == 1 else rest
        self._held[holder] -= 1

    def _forget(self, key: bytes) -> None:
        v = self._records.pop(key, None)
        if v is None:
            return
        for c in (v,) if type(v) is _Copy else v:  # type: ignore[union-attr]
            self._held[c.node] -= 1

    def _forget_holder(self, holder: str) -> None:
        for key, v in list(self._records.items()):
            if type(v) is _Copy:
                if v.node == holder:
                    del self._records[key]
            else:
                rest = tuple(c for c in v if c.node != holder)  # type: ignore[union-attr]
                if len(rest) != len(v):  # type: ignore[arg-type]
                    self._records[key] = rest[0] if len(rest) == 1 else rest
        self._stats["dropped_records"] += self._held.pop(holder, 0)

    def locate(self, keys: Sequence[bytes]) -> list[tuple[str, ...]]:
        """Holder ids per key from our records, fastest tier first; () for a key with no record,
        which includes every key we do not own (never raises). One dict probe per key. May include
        ourselves: the querier passes its own id as `exclude` to `longest_prefix`."""
        get = self._records.get
        out: list[tuple[str, ...]] = []
        for k in keys:
            v = get(k)
            if v is None:
                out.append(())
            elif type(v) is _Copy:
                out.append(v.nodes)
            else:
                out.append(tuple(c.node for c in v))  # type: ignore[union-attr]
        self._stats["located"] += len(keys)
        return out

    def answer(self, where: Where) -> Here:
        """The reply to a `Where` query from another member."""
        return Here(tuple(self.locate(where.keys)))

    # --------------------------------------------------------------------------- querier side

    def plan(self, keys: Sequence[bytes]) -> dict[str, list[int]]:
        """owner -> indexes into `keys` it owns, ourselves included (ask that part with `locate`,
        the rest with one `Where(tuple(keys[i] for i in idxs))` per owner)."""
        owner = self._ring.owner
        out: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            o = owner(k)
            lst = out.get(o)  # type: ignore[arg-type]
            if lst is None:
                out[o] = [i]  # type: ignore[index]
            else:
                lst.append(i)
        return out

    @staticmethod
    def merge_answers(
        plan: Mapping[str, Sequence[int]], replies: Mapping[str, Sequence[tuple[str, ...]]]
    ) -> dict[int, tuple[str, ...]]:
        """Per-owner replies (a `Here.holders` or a `locate` result, aligned with the plan's indexes)
        → holders per key index. An owner that did not answer (missing, or a reply of the wrong
        length) leaves its keys unknown."""
        out: dict[int, tuple[str, ...]] = {}
        for o, idxs in plan.items():
            r = replies.get(o)
            if r is None or len(r) != len(idxs):
                continue
            out.update(zip(idxs, r))
        return out

    @staticmethod
    def longest_prefix(
        n: int, answers: Mapping[int, tuple[str, ...]], exclude: str | None = None
    ) -> list[tuple[str, ...]]:
        """Holders (without `exclude`) of keys 0, 1, ... up to the first of the `n` keys that has no
        holder other than `exclude` (our own id: our own pages are found locally). Keys chain, so a
        gap ends the usable prefix."""
        out: list[tuple[str, ...]] = []
        for i in range(n):
            hs = answers.get(i, ())
            if exclude is not None and exclude in hs:
                hs = tuple(h for h in hs if h != exclude)
            if not hs:
                break
            out.append(hs)
        return out

    # -------------------------------------------------------------------------------- sending

    def take_outgoing(self, now: float) -> dict[str, list[Message]]:
        """Batches due now, per destination: a `Hello` first where one is owed, then `Announce`s of at
        most `batch_max` entries. A destination is due `flush_after` seconds after its oldest pending
        item, or at once for its full batches. Also drops unverified records whose time has come.
        Deliver each destination's list in order (one connection per destination)."""
        if self._unverified and self._unverified[0][0] <= now:
            self._verify(now)
        out: dict[str, list[Message]] = {}
        bm = self.batch_max
        for dest, since in list(self._since.items()):
            q = self._out.get(dest)
            n = len(q) if q else 0
            due = now >= since + self.flush_after
            if not due and n < bm:
                continue
            msgs: list[Message] = []
            if dest in self._hello:
                self._hello.discard(dest)
                msgs.append(Hello())
                self._stats["hellos_sent"] += 1
            take = n if due else n - n % bm
            if take:
                items = list(q.items())  # type: ignore[union-attr]
                for i in range(0, take, bm):
                    chunk = items[i : i + bm]
                    msgs.append(
                        Announce(
                            self._view,
                            tuple((k, t) for k, t in chunk if t),
                            tuple(k for k, t in chunk if not t),
                        )
                    )
                if take < n:
                    self._out[dest] = dict(items[take:])
                self._stats["announcements_sent"] += take
            if take == n:
                self._out.pop(dest, None)
                del self._since[dest]
            if msgs:
                out[dest] = msgs
        return out

    def next_deadline(self) -> float:
        """When `take_outgoing` next has something to do (math.inf: nothing pending; a time in the
        past: now)."""
        d = math.inf
        bm = self.batch_max
        for dest, since in self._since.items():
            q = self._out.get(dest)
            if q is not None and len(q) >= bm:
                return since
            d = min(d, since + self.flush_after)
        if self._unverified:
            d = min(d, self._unverified[0][0])
        return d

    def _verify(self, now: float, budget: int = 8192) -> None:
        """Check due unverified entries against our ring, about `budget` keys per call (the rest stay
        due, so next_deadline() says to call again)."""
        uv, recs, owner, me = self._unverified, self._records, self._ring.owner, self.self_id
        dropped = 0
        while uv and uv[0][0] <= now and budget > 0:
            _, keys = uv.popleft()
            budget -= len(keys)
            self._n_unverified -= len(keys)
            for key in keys:
                if key in recs and owner(key) != me:
                    self._forget(key)
                    dropped += 1
        self._stats["unverified_dropped"] += dropped

    # ---------------------------------------------------------------------------------- stats

    def stats(self) -> dict[str, int]:
        """Counters (since start) and gauges: owned_records (keys with a record here), local_pages,
        pending (queued announcement entries), unverified (entries waiting for their check)."""
        s = dict(self._stats)
        s["owned_records"] = len(self._records)
        s["local_pages"] = self._n_local
        s["pending"] = sum(len(q) for q in self._out.values())
        s["unverified"] = self._n_unverified
        s["members"] = len(self._ring)
        return s


def _outscored(key: bytes, seed: int, others: list[int]) -> bool:
    s = _h(key, seed)
    return any(_h(key, sd) > s for sd in others)
