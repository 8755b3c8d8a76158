"""The distributed meta map: which members hold copies of which pages, as a pure state machine.

Owns, for one daemon: the location records of the keys this member *owns* (the owner of a key is the
live member that `ring.Ring` ranks first for it), the list of this daemon's own pages (its DRAM and the
DMP region it lends) grouped by their owner, the outgoing announcement queues, and what it does with
the wire messages (`metamap_wire.py`: `Announce`, `Hello`, `Where`, `Here`). Must not do I/O, start threads, sleep or read
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
- `regreet`: another process used our member id for a while (a misconfigured twin); its greeting
  made the owners drop our records, and our view never changed. We greet every member again and
  queue all our pages to their owners, as if they had all just joined.
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
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import xxhash

from polarkvd.cluster.metamap_wire import MAX_KEYS, TIERS, Announce, Hello, Here, Message, Where, view_digest
from polarkvd.cluster.ring import Ring, member_seed
from polarkvd.types import KEY_BYTES

__all__ = ["MetaMap", "leading_run"]

_h = xxhash.xxh3_64_intdigest
_VECTOR_PLAN = 32  # keys from which `plan` scores them all at once (numpy) rather than one by one


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


def _copies(v: _Record) -> tuple[_Copy, ...]:
    return (v,) if type(v) is _Copy else v  # type: ignore[return-value]


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

    def regreet(self, now: float) -> None:
        """Greet every other member again and queue every page we hold for its owner: after a process
        with our id stopped (its greeting made the owners take it for us, restarted). Costs what a
        restart costs the others: they drop and re-learn our records, and send us their pages we own."""
        me = self.self_id
        for m in self._ring.members:
            if m == me:
                continue
            self._hello.add(m)
            self._since.setdefault(m, now)
            part = self._local.get(m)
            if part:
                for key, mask in part.items():
                    self._queue(m, key, _best(mask), now)
                self._stats["reannounced"] += len(part)

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
        if tier not in TIERS:
            raise ValueError(f"tier {tier!r} is not one of {sorted(TIERS)} (polarkvd.types.Tier)")
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

    def leading(self, keys: Sequence[bytes]) -> dict[str, int]:
        """Per holder of keys[0], for how many of keys 0, 1, ... our records name it without a gap
        (ourselves included): what a `where` query needs of our part, instead of every key's
        holders (`merge_leading` puts the owners' parts together).

        Safe to call from another thread than the one that changes the map (a peer's transport
        thread): it only reads records, one `dict.get` each, and a record is never changed in
        place (a change replaces it whole), so each key is seen before or after a change, never
        half-way; it counts nothing. Consecutive keys mostly share one record object (a holder's
        copies are interned per tier), so the holders are compared only where the object changes."""
        if not keys:
            return {}
        found = map(self._records.get, keys)
        prev = next(found)
        if prev is None:
            return {}
        running = {c.node for c in _copies(prev)}
        counts: dict[str, int] = {}
        i = 1
        for v in found:
            if v is not prev:
                if v is None:
                    break
                if v != prev:
                    here = {c.node for c in _copies(v)}
                    for h in [h for h in running if h not in here]:
                        running.discard(h)
                        counts[h] = i
                    if not running:
                        return counts
                prev = v
            i += 1
        for h in running:
            counts[h] = i
        return counts

    def answer(self, where: Where) -> Here:
        """The reply to a `Where` query from another member."""
        return Here(tuple(self.locate(where.keys)))

    # --------------------------------------------------------------------------- querier side

    def plan(self, keys: Sequence[bytes]) -> dict[str, list[int]]:
        """owner -> indexes into `keys` it owns, ourselves included (ask that part with `locate`,
        the rest with one `Where(tuple(keys[i] for i in idxs))` per owner)."""
        out: dict[str, list[int]] = {}
        if len(keys) >= _VECTOR_PLAN:
            found = self._ring.owner_indexes(keys)
            if found is not None:
                members = self._ring.members
                counts = np.bincount(found, minlength=len(members))
                order = np.argsort(found, kind="stable").tolist()  # indexes grouped by owner, in order
                at = 0
                for m, c in enumerate(counts.tolist()):
                    if c:
                        out[members[m]] = order[at : at + c]
                        at += c
                return out
        owner = self._ring.owner
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
    def merge_leading(
        n: int, plan: Mapping[str, Sequence[int]], replies: Mapping[str, Mapping[str, int]]
    ) -> dict[str, int]:
        """Per member, how many of the `n` keys 0, 1, ... it holds without a gap, from each owner's
        `leading` over its part of the plan (its indexes, ascending). A member's prefix ends at the
        first index of the plan where its owner's count for it runs out; an owner that did not
        answer ends every prefix at its first index. Members holding no key 0 are left out."""
        out: dict[str, int] = {}
        for h in {h for r in replies.values() for h in r}:
            end = n
            for o, idxs in plan.items():
                c = replies.get(o, {}).get(h, 0)
                if c < len(idxs) and idxs[c] < end:
                    end = idxs[c]
            if end:
                out[h] = end
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


def leading_run(holders: Sequence[tuple[str, ...]]) -> dict[str, int]:
    """Per member in holders[0], for how many of the entries from the first it is listed without a
    gap. Consecutive keys mostly have the same holders: the set is narrowed only where they change."""
    if not holders:
        return {}
    running = set(holders[0])
    counts: dict[str, int] = {}
    prev = holders[0]
    i, n = 1, len(holders)
    while i < n and running:
        here = holders[i]
        if here != prev:
            for h in [h for h in running if h not in here]:
                running.discard(h)
                counts[h] = i
            prev = here
        i += 1
    for h in running:
        counts[h] = i
    return counts


def _outscored(key: bytes, seed: int, others: list[int]) -> bool:
    s = _h(key, seed)
    return any(_h(key, sd) > s for sd in others)
