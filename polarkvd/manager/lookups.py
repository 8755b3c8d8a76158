"""Lookups: the longest cached prefix of a request (on the loop or on an engine connection
thread), the policy touches of hits, and the hit and miss counts, including what engines answered
themselves from the shared lookup table.

A part of the manager (polarkvd/manager/__init__.py): it holds no state of its own beyond what
is named here; the shared state is the manager's.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from polarkvd.index import (
    READY,
    READY_VRAM,
    VRAM,
    Page,
)
from polarkvd.manager.records import NamespaceInfo, Session
from polarkvd.types import Tier

if TYPE_CHECKING:
    from polarkvd.manager import Manager

log = logging.getLogger(__name__)


class Lookups:
    """Lookups and their accounting."""

    def __init__(self, m: Manager) -> None:
        self.m = m

    def probe(self, ns: NamespaceInfo, keys: list[bytes]) -> tuple[list[Tier], list[Page]]:
        """Tiers of the longest cached prefix of `keys`, and its DRAM and L1 pages in key order. Pure read:
        safe on any thread (single dict gets and attribute reads, each atomic under the GIL; the disk
        tier's `entry` takes its own lock). A page evicted a moment later is a miss at load time."""
        hit_pages: list[Page] = []
        ns_id = ns.id
        # the hot path of every request: DRAM hits in one loop of dict gets, then the rest
        for page in map(self.m.index.get, keys):
            if page is None or page.state != READY or page.ns != ns_id:
                break
            hit_pages.append(page)
        tiers = [Tier.DRAM] * len(hit_pages)
        if len(hit_pages) < len(keys):
            dram, disk, vram = Tier.DRAM, Tier.DISK, Tier.VRAM
            get = self.m.index.get
            for key in keys[len(hit_pages) :]:
                page = get(key)
                if page is not None and page.state == READY and page.ns == ns_id:
                    hit_pages.append(page)
                    tiers.append(dram)
                elif page is not None and page.state == READY_VRAM and page.ns == ns_id:
                    hit_pages.append(page)
                    tiers.append(vram)
                elif self.on_disk(key, ns.digest):
                    tiers.append(disk)
                else:
                    break
        return tiers, hit_pages

    def lookup(self, session: Session, keys: list[bytes], pin: bool = False) -> tuple[list[Tier], int | None]:
        """Tiers of the longest cached prefix of `keys`; with `pin`, its DRAM pages under a new lease."""
        tiers, hit_pages = self.cut_dear_fetches(session, keys, *self.probe(session.ns, keys))
        hit_pages.reverse()  # leaf first, so the root ends up most recent: leaves are evicted first
        self.apply_touches()  # earlier lookups answered on threads first: LRU order is request order
        self.touch(hit_pages, hit=True)
        n = len(hit_pages)
        in_vram = tiers.count(Tier.VRAM) if self.m.vram is not None else 0
        self._count_lookups(session, 1, len(keys), n - in_vram, len(tiers) - n, in_vram)
        lease = self.m.attachments.new_lease(session, hit_pages).id if pin and hit_pages else None
        return tiers, lease

    def lookup_in_thread(self, session: Session, keys: list[bytes]) -> list[Tier] | None:
        """`lookup` without `pin`, on the session's connection thread: the same probe; the touch is
        queued for the loop (`apply_touches`) and the counts go to the session's `thread_tally`.

        None, with nothing counted, when the prefix stops short here while a cluster is configured:
        asking the cluster is asynchronous, so the caller hands the whole request to the loop.
        """
        tiers, hit_pages = self.probe(session.ns, keys)
        if len(tiers) < len(keys) and self.m.cluster is not None:
            return None
        tiers, hit_pages = self.cut_dear_fetches(session, keys, tiers, hit_pages, thread=True)
        n = len(hit_pages)
        if n:
            hit_pages.reverse()
            self.m.touches.append(hit_pages)
        in_vram = tiers.count(Tier.VRAM) if self.m.vram is not None else 0
        t = session.thread_tally
        session.thread_tally = (
            t[0] + 1, t[1] + len(keys), t[2] + n - in_vram, t[3] + len(tiers) - n, t[4] + in_vram
        )  # fmt: skip
        return tiers

    def cut_dear_fetches(
        self,
        session: Session,
        keys: list[bytes],
        tiers: list[Tier],
        hit_pages: list[Page],
        thread: bool = False,
    ) -> tuple[list[Tier], list[Page]]:
        """Fetch or recompute (worth.worth_fetching): the hit ends where recomputing the rest costs
        the engine less than fetching it. The pages cut are counted (`recompute_instead_pages`; on a
        connection thread in the session's tally, folded on the loop)."""
        n = self.m.worth.worth_fetching(session.ns.id, keys, tiers)
        if n == len(tiers):
            return tiers, hit_pages
        if thread:
            session.cut_tally += len(tiers) - n
        else:
            self.m.counters["recompute_instead_pages"] += len(tiers) - n
        kept = sum(1 for t in tiers[:n] if t is Tier.DRAM or t is Tier.VRAM)
        return tiers[:n], hit_pages[:kept]

    def apply_touches(self, session: Session | None = None) -> None:
        """Touch the hit pages of thread-side lookups in the policy, oldest first, and those of
        `session`'s lookups from the shared table (the engine about to be served: its own requests
        stay in order). Loop only: called before every engine op served on the loop, before every
        eviction, and on a short timer. A page evicted since is unlinked: touching it is a no-op."""
        queue = self.m.touches
        if queue:
            touch_many = self.m.policy.touch_many if self.m.vram is None else self.touch
            while queue:  # only the loop pops: never empty between the check and the pop
                touch_many(queue.popleft(), hit=True)  # type: ignore[arg-type]
        if session is not None and session.table_slot is not None:
            self._touch_table_hits(session.table_slot)

    def _touch_table_hits(self, slot: int) -> None:
        keys = self.m.table.touched(slot)  # type: ignore[union-attr]
        if keys:
            # only pages READY in L1 or DRAM: a disk entry's key has no page here (or one on its way
            # up from disk, PROMOTING, which no policy holds yet)
            pages = [p for p in map(self.m.index.get, keys) if p is not None and p.state & ~VRAM == READY]
            self.touch(pages, hit=True)

    def touch(self, pages: list[Page], hit: bool = False) -> None:
        """Pages a request uses, leaf first, each in its own tier's policy (a node lives in one
        policy only). `hit`: the request's lookup, counted once as a hit (of the daemon's lookups,
        a thread's, or the shared table's); without it, a use the lookup already counted (the
        request's load): recency only, so that frequencies count requests."""
        if self.m.vram_policy is None:
            self.m.policy.touch_many(pages, hit)  # type: ignore[arg-type]
            return
        self.m.policy.touch_many([p for p in pages if not p.state & VRAM], hit)
        self.m.vram_policy.touch_many([p for p in pages if p.state & VRAM], hit)

    def apply_table_touches(self) -> None:
        """Touch the pages engines hit in the shared lookup table, and rebuild the table when it
        asks for it. Loop only: on the touch timer and before every eviction (not before every op:
        it visits every session)."""
        table = self.m.table
        if table is not None:
            for s in self.m.sessions.values():
                if s.table_slot is not None:
                    self._touch_table_hits(s.table_slot)
            if table.rebuild_needed and not self.m._refilling:
                self.m.table_upkeep.rebuild_table()

    def fold_thread_lookups(self, session: Session | None = None) -> None:
        """Add what connection threads counted since the last fold (of `session`, or of every session)
        to the counters and session totals. Loop only: stats fold first, a detaching session last."""
        for s in self.m.sessions.values() if session is None else (session,):
            if s.cut_tally != s.cut_folded:  # (only the thread writes the tally, only the loop this)
                self.m.counters["recompute_instead_pages"] += s.cut_tally - s.cut_folded
                s.cut_folded = s.cut_tally
            now, was = s.thread_tally, s.thread_folded
            if now != was:
                s.thread_folded = now
                self._count_lookups(*(s, *(a - b for a, b in zip(now, was))))  # type: ignore[arg-type]
            if s.table_slot is not None:
                table = self.m.table
                slot = s.table_slot
                got = (*table.tally(slot), table.vram_hits(slot), table.disk_hits(slot))  # type: ignore[union-attr]
                had = s.table_folded
                if got != had:
                    s.table_folded = got
                    self.m.counters["table_lookups"] += got[0] - had[0]
                    vram, disk = got[3] - had[3], got[4] - had[4]
                    self._count_lookups(
                        s, got[0] - had[0], got[1] - had[1], got[2] - had[2] - vram - disk, disk, vram
                    )

    def _count_lookups(
        self, session: Session, lookups: int, pages: int, dram: int, disk: int, vram: int = 0
    ) -> None:
        c = self.m.counters
        c["lookups"] += lookups
        c["lookup_pages"] += pages
        c["hit_pages_dram"] += dram
        c["hit_pages_disk"] += disk
        if vram:
            c["hit_pages_vram"] += vram
        c["miss_pages"] += pages - dram - disk - vram
        session.lookup_pages += pages
        session.hit_pages += dram + disk + vram

    def on_disk(self, key: bytes, digest: bytes) -> bool:
        pending = self.m.pending.get(key)
        if pending is not None:
            return pending.ns_digest == digest
        if self.m.disk is None:
            return False
        entry = self.m.disk.entry(key)
        return entry is not None and entry.ns == digest

    def on_disk_any_ns(self, key: bytes) -> bool:
        return key in self.m.pending or (self.m.disk is not None and self.m.disk.entry(key) is not None)

    async def lookup_remote(self, session: Session, keys: list[bytes], tiers: list[Tier]) -> list[Tier]:
        """After a local lookup stopped short: how much further the cluster's pages reach."""
        cluster = self.m.cluster
        assert cluster is not None  # the engine API asks only in a cluster
        found = await cluster.locate(keys[len(tiers) :])
        n = len(found)
        if n:
            self.m.counters["hit_pages_remote"] += n
            self.m.counters["miss_pages"] -= n
            session.hit_pages += n
        return tiers + [Tier.DMP] * n
