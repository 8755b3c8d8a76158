"""The manager: what lives where, and every state change of a page.

It owns policy: the page index of the memory tiers (L2 DRAM and, when the daemon has a GPU pool,
L1 VRAM), eviction (leaf-first, through a pluggable policy, one instance per memory tier), demotion
of L1 pages to DRAM and of evicted DRAM pages to disk, promotion of disk hits back into DRAM,
sessions with their reservations and leases, and the counters everyone reads. It owns no bytes (the arena and the disk tier do) and no
sockets (the servers do). Everything here runs on the daemon's event loop thread; only disk I/O runs
in the I/O thread pool, and its results come back to the loop before any index changes. The one
exception is the read-only lookup: `probe` and `lookup_in_thread` are called by the engine
connection threads (server/engine_thread.py); they only read (single dict gets, page attributes),
append to `touches` and write their own session's `thread_tally`. The loop applies those touches
(`apply_touches`) and folds the tallies into the counters (`fold_thread_lookups`).

Page life cycle in DRAM:  reserve -> RESERVED --commit--> READY --evict--> (demoted to disk) gone
                                            \\--abort / engine gone / lease expiry--> gone
                          load of a disk page -> PROMOTING --read ok--> READY (pinned by the load)
In L1 (docs/VRAM.md):     reserve(tier=VRAM) -> RESERVED_VRAM --commit--> READY_VRAM
                          READY_VRAM --demote (unpinned; pressure, a non-L1 loader, drain)-->
                              PROMOTING (DRAM slot taken, pool -> arena copy in the I/O pool)
                              --copied--> READY in DRAM (L1 slot freed)  | --failed--> READY_VRAM
                          load by an L1 session of a peer's page, RDMA with GPUDirect (docs/RDMA.md) ->
                              PROMOTING_VRAM (L1 slot) --READ + verified--> READY_VRAM
                              --RDMA failed--> PROMOTING (DRAM slot; L1 slot freed) --TCP--> READY
                          READY in DRAM, loaded vram.promote_after_loads times by L1 sessions --chore,
                              unpinned--> (still READY in DRAM, pinned by the DRAM -> pool copy)
                              --copied, nobody pinned it meanwhile--> READY_VRAM (DRAM slot freed)
L1 pages are announced to the cluster's meta map with tier VRAM (and as DRAM once demoted there).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from polarkvd.config import Config, format_size
from polarkvd.errors import (
    ErrorCode,
    NamespaceError,
    NoSpaceError,
    PageCorrupt,
    PageNotFound,
    PolarKVError,
    ProtocolError,
)
from polarkvd.index import (
    PROMOTING,
    PROMOTING_VRAM,
    READY,
    READY_VRAM,
    RESERVED,
    RESERVED_VRAM,
    VRAM,
    Page,
    PageIndex,
)
from polarkvd.keys import namespace_digest
from polarkvd.lookup_table import TIER_DISK, LookupTable
from polarkvd.policy import EvictionPolicy, make_policy, switch_policy
from polarkvd.server.protocol import RESERVE_EXISTS, RESERVE_NO_SPACE
from polarkvd.tiers.dram import SlabAllocator, slot_size
from polarkvd.transport.pipeline import (
    SIGNAL_BOARD_BYTES,
    LoadProgress,
    SignalBoard,
    layer_group_ends,
    layer_groups,
)
from polarkvd.types import Namespace, Tier

log = logging.getLogger(__name__)

#: How many DRAM pages loaded by L1 sessions the promotion count remembers (~100 B each).
L1_LOADS_REMEMBERED = 1 << 16
#: Disk pages put in the shared lookup table per turn of the event loop when listing them (a
#: namespace's pages on disk, or the disk entries a rebuild puts back): ~2-3 us each, ~5 ms a turn.
LIST_BATCH = 2048


@dataclasses.dataclass
class NamespaceInfo:
    id: int
    ns: Namespace
    digest: bytes
    slot_bytes: int
    # totals of sessions that have detached (live sessions are added when stats are read)
    lookup_pages: int = 0
    hit_pages: int = 0
    stored_pages: int = 0
    loaded_pages: int = 0


@dataclasses.dataclass
class Lease:
    id: int
    session: Session
    pages: list[Page]
    expires: float
    progress: LoadProgress | None = None  # a pipelined load's readiness slot, freed with the lease


@dataclasses.dataclass
class Session:
    id: int
    engine_id: str
    ns: NamespaceInfo
    reserved: dict[bytes, Page] = dataclasses.field(default_factory=dict)
    reserved_at: float = 0.0  # the latest reserve; reservations older than the lease time expire
    leases: dict[int, Lease] = dataclasses.field(default_factory=dict)
    # Slots of expired reservations: the engine may still be writing into them (it is connected,
    # only slow), so they are not reused until its connection closes.
    quarantined: list[tuple[int, int, bool]] = dataclasses.field(default_factory=list)  # offset, bytes, in L1
    hit_pages: int = 0
    lookup_pages: int = 0
    stored_pages: int = 0
    loaded_pages: int = 0
    # Lookups answered on the session's connection thread: (lookups, lookup_pages, hit_pages_dram,
    # hit_pages_disk, hit_pages_vram), written by that thread only and replaced whole, so the loop never
    # reads half an update; `thread_folded` is the part already added to the counters
    # (Manager.fold_thread_lookups).
    thread_tally: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
    thread_folded: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
    # Lookups the engine answered itself from the shared lookup table: its slot there, and the part
    # of the slot's (lookups, pages, hit pages) already counted.
    table_slot: int | None = None
    table_folded: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)  # and the slot's L1 and disk hits
    vram: bool = False  # attached with L1 (its process maps the pool): reserves may go there


@dataclasses.dataclass
class PendingDemotion:
    """A page evicted from DRAM whose disk write has not finished: still a hit, served from memory."""

    data: bytes
    ns_digest: bytes
    parent: bytes | None
    itemsize: int


def _read_error(e: BaseException) -> BaseException:
    """A disk read that the I/O pool's shutdown cancelled is a miss, not an error to log."""
    return PageNotFound("read cancelled") if isinstance(e, asyncio.CancelledError) else e


def _refuse_duplicates(keys: list[bytes], op: str) -> None:
    """A key twice in one commit/abort would pop its reservation twice and fail halfway through."""
    if len(set(keys)) != len(keys):
        raise ProtocolError(f"{op}: duplicate keys in one request; nothing done")


class Counters(collections.Counter[str]):
    """Monotonic event counters; readers take deltas."""


class Manager:
    def __init__(
        self,
        cfg: Config,
        arena: memoryview,
        allocator: SlabAllocator,
        disk: Any | None,
        executor: concurrent.futures.Executor,
        clock: Callable[[], float] = time.monotonic,
        signals: SignalBoard | None = None,
        table: LookupTable | None = None,
        vram: Any | None = None,
        vram_host: Any | None = None,
    ) -> None:
        self.cfg = cfg
        self.arena = arena
        self.allocator = allocator
        self.disk = disk
        self.executor = executor
        self.clock = clock
        self.index = PageIndex()
        # which keys are READY in DRAM, for engines to probe without a round trip (lookup_table.py)
        self.table = self.index.table = table
        self.policy: EvictionPolicy = make_policy(cfg.dram.policy)
        self.namespaces: dict[bytes, NamespaceInfo] = {}
        self._ns_by_id: dict[int, NamespaceInfo] = {}
        self.sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self.pending: dict[bytes, PendingDemotion] = {}
        self.pending_bytes = 0
        self._promotions: dict[bytes, asyncio.Future[bool]] = {}
        self._disk_writes: set[asyncio.Future[Any]] = set()
        self.draining = False
        self.counters = Counters()
        # Hit pages of lookups answered on connection threads, leaf first, waiting for the loop to
        # touch them in the policy (apply_touches). Bounded: if the loop stalls, the oldest touches
        # are dropped (lookups are hints), never memory.
        self.touches: collections.deque[list[Page]] = collections.deque(maxlen=1 << 16)
        self.started = time.time()
        self.operator_pins: dict[bytes, Page] = {}  # pages pinned with the `pin` op, one pin each
        self.prefix_hits: Counters = Counters()  # first key of a load -> pages loaded (see `top`)
        self.write_through_bytes = 0  # write-through copies queued and not yet written
        # readiness slots of pipelined loads: in the arena file's tail in the daemon, private otherwise
        self.signals = signals or SignalBoard(memoryview(bytearray(SIGNAL_BOARD_BYTES)))
        self.cluster: Any = None  # polarkvd.cluster.pool.ClusterPool when [cluster] is enabled
        self._cluster_tasks: set[asyncio.Future[Any]] = set()  # fetches from and demotions to peers in flight
        self._disk_reads: set[asyncio.Future[Any]] = set()  # layer-group promotions in flight
        # L1: the daemon's GPU page pool (tiers/vram.py VramPool) and the arena registered with it
        # (HostRegion: what demotions copy into), or None. The pool owns bytes; which page is where,
        # and in which order they leave, is decided here, with a policy instance of L1's own.
        self.vram = vram
        self.vram_host = vram_host
        self.vram_policy: EvictionPolicy | None = make_policy(cfg.vram.policy) if vram is not None else None
        self._vram_task: asyncio.Future[Any] | None = None  # a background demotion in flight
        # Promotion back into L1 (schedule_vram_promotion): DRAM pages that L1 sessions loaded lately,
        # with how often (bounded, the oldest forgotten first), those due for a copy into L1, and
        # the copy in flight.
        self._l1_loads: dict[bytes, int] = {}
        self._l1_due: dict[bytes, None] = {}
        self._vram_promotion: asyncio.Future[Any] | None = None
        # Disk pages in the shared lookup table (tier DISK): a page leaving DRAM and L1 keeps its
        # entry while a copy is on disk or queued for it (`_held_on_disk`); disk writes and
        # removals bring the entry in line (`_sync_disk_entry`); a namespace's pages already on
        # disk are listed when it becomes known (`_list_disk_pages`). Misses of a namespace are
        # final only once it is listed (`final_miss`).
        self._disk_listed: set[int] = set()  # namespace ids
        self._table_tasks: set[asyncio.Future[Any]] = set()  # listings in flight
        self._refilling = False  # a rebuild's disk entries are going back in (no rebuild meanwhile)
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # in-process tests: no loop, disk events are applied where they happen
            self._loop = None
        if disk is not None:
            disk.on_removed = self._disk_removed  # the manager owns it; the cluster pool is told too
            if table is not None:
                self.index.held_on_disk = self._held_on_disk

    # ------------------------------------------------------------------ sessions

    def attach(self, ns: Namespace, engine_id: str, vram: bool = False) -> Session:
        """A new session. `vram`: the engine can use L1 (its process has CUDA); it is granted when
        this daemon has a pool and a page of the namespace fits one of its slabs."""
        problems = ns.problems()
        if problems:
            raise NamespaceError("invalid namespace: " + "; ".join(problems))
        slot = slot_size(ns.page_bytes)
        if not self.allocator.fits(slot):
            raise NoSpaceError(
                f"a page of this namespace is {ns.page_bytes} bytes, larger than dram.slab_bytes "
                f"({self.allocator.slab_bytes}); raise dram.slab_bytes or use smaller pages"
            )
        digest = namespace_digest(ns)
        info = self.namespaces.get(digest)
        if info is None:
            info = NamespaceInfo(len(self.namespaces) + 1, ns, digest, slot)
            self.namespaces[digest] = info
            self._ns_by_id[info.id] = info
            if self.cluster is not None and self.disk is not None:
                # its pages on our disk can be promoted for peers from now on: tell the meta map
                self.cluster.announce_disk_pages(digest)
            if self.table is not None and self.disk is not None:
                self._list_disk_pages(info)
        session = Session(next(self._ids), engine_id, info)
        session.vram = vram and self.vram is not None and self.vram.slots.slabs.fits(slot)
        if self.table is not None:
            session.table_slot = self.table.claim_slot(session.id)
            if session.table_slot is not None:
                self.table.set_final(session.table_slot, self.final_miss(info))
        self.sessions[session.id] = session
        self.counters["sessions_attached"] += 1
        log.info(
            "engine %r attached as session %d (model %s, %d-byte pages%s)",
            engine_id,
            session.id,
            ns.model,
            ns.page_bytes,
            ", L1" if session.vram else "",
        )
        return session

    def detach(self, session: Session) -> None:
        """The engine went away: abort its reservations, drop its leases."""
        if self.sessions.pop(session.id, None) is None:
            return
        self.fold_thread_lookups(session)  # its connection thread has ended: the tally is final
        if session.table_slot is not None:
            self.table.release_slot(session.table_slot)  # type: ignore[union-attr]
            session.table_slot = None
        if session.reserved:
            self._abort(session, list(session.reserved))
        for lease in list(session.leases.values()):
            self._drop_lease(lease)
        for offset, slot_bytes, in_vram in session.quarantined:
            if in_vram:
                self.vram.free(offset)  # type: ignore[union-attr]
            else:
                self.allocator.free(offset, slot_bytes)
        session.quarantined.clear()
        info = session.ns
        info.lookup_pages += session.lookup_pages
        info.hit_pages += session.hit_pages
        info.stored_pages += session.stored_pages
        info.loaded_pages += session.loaded_pages
        log.info("session %d (%r) detached", session.id, session.engine_id)

    # ------------------------------------------------------------------ lookup

    def probe(self, ns: NamespaceInfo, keys: list[bytes]) -> tuple[list[Tier], list[Page]]:
        """Tiers of the longest cached prefix of `keys`, and its DRAM and L1 pages in key order. Pure read:
        safe on any thread (single dict gets and attribute reads, each atomic under the GIL; the disk
        tier's `entry` takes its own lock). A page evicted a moment later is a miss at load time."""
        hit_pages: list[Page] = []
        ns_id = ns.id
        # the hot path of every request: DRAM hits in one loop of dict gets, then the rest
        for page in map(self.index.get, keys):
            if page is None or page.state != READY or page.ns != ns_id:
                break
            hit_pages.append(page)
        tiers = [Tier.DRAM] * len(hit_pages)
        if len(hit_pages) < len(keys):
            dram, disk, vram = Tier.DRAM, Tier.DISK, Tier.VRAM
            get = self.index.get
            for key in keys[len(hit_pages) :]:
                page = get(key)
                if page is not None and page.state == READY and page.ns == ns_id:
                    hit_pages.append(page)
                    tiers.append(dram)
                elif page is not None and page.state == READY_VRAM and page.ns == ns_id:
                    hit_pages.append(page)
                    tiers.append(vram)
                elif self._on_disk(key, ns.digest):
                    tiers.append(disk)
                else:
                    break
        return tiers, hit_pages

    def lookup(self, session: Session, keys: list[bytes], pin: bool = False) -> tuple[list[Tier], int | None]:
        """Tiers of the longest cached prefix of `keys`; with `pin`, its DRAM pages under a new lease."""
        tiers, hit_pages = self.probe(session.ns, keys)
        hit_pages.reverse()  # leaf first, so the root ends up most recent: leaves are evicted first
        self.apply_touches()  # earlier lookups answered on threads first: LRU order is request order
        self._touch(hit_pages)
        n = len(hit_pages)
        in_vram = tiers.count(Tier.VRAM) if self.vram is not None else 0
        self._count_lookups(session, 1, len(keys), n - in_vram, len(tiers) - n, in_vram)
        lease = self._new_lease(session, hit_pages).id if pin and hit_pages else None
        return tiers, lease

    def lookup_in_thread(self, session: Session, keys: list[bytes]) -> list[Tier] | None:
        """`lookup` without `pin`, on the session's connection thread: the same probe; the touch is
        queued for the loop (`apply_touches`) and the counts go to the session's `thread_tally`.

        None, with nothing counted, when the prefix stops short here while a cluster is configured:
        asking the cluster is asynchronous, so the caller hands the whole request to the loop.
        """
        tiers, hit_pages = self.probe(session.ns, keys)
        if len(tiers) < len(keys) and self.cluster is not None:
            return None
        n = len(hit_pages)
        if n:
            hit_pages.reverse()
            self.touches.append(hit_pages)
        in_vram = tiers.count(Tier.VRAM) if self.vram is not None else 0
        t = session.thread_tally
        session.thread_tally = (
            t[0] + 1, t[1] + len(keys), t[2] + n - in_vram, t[3] + len(tiers) - n, t[4] + in_vram
        )  # fmt: skip
        return tiers

    def apply_touches(self, session: Session | None = None) -> None:
        """Touch the hit pages of thread-side lookups in the policy, oldest first, and those of
        `session`'s lookups from the shared table (the engine about to be served: its own requests
        stay in order). Loop only: called before every engine op served on the loop, before every
        eviction, and on a short timer. A page evicted since is unlinked: touching it is a no-op."""
        queue = self.touches
        if queue:
            touch_many = self.policy.touch_many if self.vram is None else self._touch
            while queue:  # only the loop pops: never empty between the check and the pop
                touch_many(queue.popleft())  # type: ignore[arg-type]
        if session is not None and session.table_slot is not None:
            self._touch_table_hits(session.table_slot)

    def _touch_table_hits(self, slot: int) -> None:
        keys = self.table.touched(slot)  # type: ignore[union-attr]
        if keys:
            # only pages READY in L1 or DRAM: a disk entry's key has no page here (or one on its way
            # up from disk, PROMOTING, which no policy holds yet)
            pages = [p for p in map(self.index.get, keys) if p is not None and p.state & ~VRAM == READY]
            self._touch(pages)

    def _touch(self, pages: list[Page]) -> None:
        """Hits, leaf first, each in its own tier's policy (a node lives in one policy only)."""
        if self.vram_policy is None:
            self.policy.touch_many(pages)  # type: ignore[arg-type]
            return
        self.policy.touch_many([p for p in pages if not p.state & VRAM])  # type: ignore[arg-type]
        self.vram_policy.touch_many([p for p in pages if p.state & VRAM])  # type: ignore[arg-type]

    def apply_table_touches(self) -> None:
        """Touch the pages engines hit in the shared lookup table, and rebuild the table when it
        asks for it. Loop only: on the touch timer and before every eviction (not before every op:
        it visits every session)."""
        table = self.table
        if table is not None:
            for s in self.sessions.values():
                if s.table_slot is not None:
                    self._touch_table_hits(s.table_slot)
            if table.rebuild_needed and not self._refilling:
                self._rebuild_table()

    def fold_thread_lookups(self, session: Session | None = None) -> None:
        """Add what connection threads counted since the last fold (of `session`, or of every session)
        to the counters and session totals. Loop only: stats fold first, a detaching session last."""
        for s in self.sessions.values() if session is None else (session,):
            now, was = s.thread_tally, s.thread_folded
            if now != was:
                s.thread_folded = now
                self._count_lookups(*(s, *(a - b for a, b in zip(now, was))))  # type: ignore[arg-type]
            if s.table_slot is not None:
                table = self.table
                slot = s.table_slot
                got = (*table.tally(slot), table.vram_hits(slot), table.disk_hits(slot))  # type: ignore[union-attr]
                had = s.table_folded
                if got != had:
                    s.table_folded = got
                    self.counters["table_lookups"] += got[0] - had[0]
                    vram, disk = got[3] - had[3], got[4] - had[4]
                    self._count_lookups(
                        s, got[0] - had[0], got[1] - had[1], got[2] - had[2] - vram - disk, disk, vram
                    )

    def _count_lookups(
        self, session: Session, lookups: int, pages: int, dram: int, disk: int, vram: int = 0
    ) -> None:
        c = self.counters
        c["lookups"] += lookups
        c["lookup_pages"] += pages
        c["hit_pages_dram"] += dram
        c["hit_pages_disk"] += disk
        if vram:
            c["hit_pages_vram"] += vram
        c["miss_pages"] += pages - dram - disk - vram
        session.lookup_pages += pages
        session.hit_pages += dram + disk + vram

    def _on_disk(self, key: bytes, digest: bytes) -> bool:
        pending = self.pending.get(key)
        if pending is not None:
            return pending.ns_digest == digest
        if self.disk is None:
            return False
        entry = self.disk.entry(key)
        return entry is not None and entry.ns == digest

    # ------------------------------------------------------------------ disk pages in the shared lookup table

    def final_miss(self, info: NamespaceInfo) -> bool:
        """Whether a key of this namespace missing from the shared table is cached nowhere: no
        cluster (peers are not listed), and no disk tier or the namespace's disk pages are listed."""
        return self.cluster is None and (self.disk is None or info.id in self._disk_listed)

    def _held_on_disk(self, page: Page) -> bool:
        """PageIndex's hook: a page leaving L1 and DRAM keeps its table entry (tier DISK) when a copy
        is on disk or queued for it."""
        info = self._ns_by_id.get(page.ns)
        return info is not None and self._on_disk(page.key, info.digest)

    def _sync_disk_entry(self, key: bytes) -> None:
        """Make `key`'s table entry true after its disk copy came or went (a write finished, failed
        or was dropped; the disk tier evicted or removed it). Loop only. A page READY in L1 or DRAM
        keeps its own entry; otherwise the entry is DISK while a copy is on disk or queued (of a
        namespace known here: the entry carries its id), and gone when none is."""
        table = self.table
        if table is None:
            return
        page = self.index.get(key)
        if page is not None and page.state & ~VRAM == READY:
            return
        pending = self.pending.get(key)
        if pending is not None:
            digest: bytes | None = pending.ns_digest
        else:
            entry = self.disk.entry(key) if self.disk is not None else None
            digest = entry.ns if entry is not None else None
        info = self.namespaces.get(digest) if digest is not None else None
        if info is None:
            table.remove(key)
        else:
            table.put(key, info.id, TIER_DISK)

    def _disk_removed(self, keys: list[bytes]) -> None:
        """DiskTier.on_removed (any thread): pages left the disk tier. The cluster withdraws their
        announcements; on the loop, pages still in DRAM or L1 lose their `on_disk` mark (they are
        written again when they leave memory, not dropped) and table entries follow."""
        cluster = self.cluster
        if cluster is not None:
            cluster.disk_removed(keys)
        loop = self._loop
        if loop is None:  # no event loop (in-process tests): this is the only thread
            self._disk_copies_gone(keys)
            return
        try:
            loop.call_soon_threadsafe(self._disk_copies_gone, keys)
        except RuntimeError:  # the loop is closed: the daemon has stopped, and so has its table
            pass

    def _disk_copies_gone(self, keys: list[bytes]) -> None:
        disk = self.disk
        for key in keys:
            page = self.index.get(key)
            if page is not None and page.on_disk and (disk is None or disk.entry(key) is None):
                page.on_disk = False  # (unless a new write of it already landed: then it is there)
        if self.table is not None:
            self._sync_disk_entries(keys)

    def _sync_disk_entries(self, keys: list[bytes]) -> None:
        for key in keys:
            self._sync_disk_entry(key)

    def _list_disk_pages(self, info: NamespaceInfo) -> None:
        """List the namespace's pages already on disk (from before this daemon started, or written
        by an earlier session) in the shared table: its misses become final when done. The disk
        index is scanned on an I/O thread; the entries go in on the loop, LIST_BATCH a turn."""
        if self._loop is None:  # in-process tests: at once
            self._sync_disk_entries(self.disk.keys_of(info.digest))  # type: ignore[union-attr]
            self._listed(info)
            return

        async def run() -> None:
            keys = await self._loop.run_in_executor(self.executor, self.disk.keys_of, info.digest)  # type: ignore[union-attr]
            await self._put_disk_entries(keys)
            self._listed(info)
            log.debug("lookup table: %d disk pages of namespace %d listed", len(keys), info.id)

        self._table_task(run())

    def _listed(self, info: NamespaceInfo) -> None:
        self._disk_listed.add(info.id)
        final = self.final_miss(info)
        for s in self.sessions.values():
            if s.ns is info and s.table_slot is not None:
                self.table.set_final(s.table_slot, final)  # type: ignore[union-attr]

    async def _put_disk_entries(self, keys: list[bytes]) -> None:
        """`_sync_disk_entry` for each key, LIST_BATCH a turn of the loop: every entry is checked
        against the disk tier when it goes in, so a page dropped since the scan is not listed."""
        for i in range(0, len(keys), LIST_BATCH):
            if i:
                await asyncio.sleep(0)
            self._sync_disk_entries(keys[i : i + LIST_BATCH])

    def _table_task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._table_tasks.add(task)

        def done(t: asyncio.Future[Any]) -> None:
            self._table_tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("listing disk pages in the lookup table failed: %r", t.exception())

        task.add_done_callback(done)

    def _rebuild_table(self) -> None:
        """Rebuild the shared table without its tombstones (or, after it was full, with room again).

        What it costs the loop: the READY pages of L1 and DRAM go back at once, ~1 us each (about a
        second per million pages, as before disk pages were listed); engines use the socket
        meanwhile. The disk entries, which can be many more, go back LIST_BATCH per turn of the loop
        (~5 ms each) with the table marked incomplete, so no miss is final (engines ask the socket for
        the rest) until they are all in; no other rebuild starts meanwhile. They are taken from the
        table itself (a C-speed copy of its tier column), or, when it was full and refused some,
        from the disk index again (scanned on an I/O thread) for every namespace known here."""
        table = self.table
        assert table is not None
        lost = table.overflow  # entries were refused: only the disk index knows every disk page
        disk_keys = [] if lost else [key for key, _ in table.entries_in(TIER_DISK)]
        # every namespace known here: a listing still in flight put some of its entries already
        relist = list(self.namespaces) if lost and self.disk is not None else []
        live = [(p.key, p.ns, int(Tier.VRAM if p.state & VRAM else Tier.DRAM)) for p in self.index if p.state & ~VRAM == READY]  # fmt: skip
        more = bool(disk_keys or relist)
        table.rebuild(live, incomplete=more)
        if not more:
            return
        if self._loop is None:  # in-process tests: at once
            for digest in relist:
                disk_keys += self.disk.keys_of(digest)  # type: ignore[union-attr]
            self._sync_disk_entries(disk_keys)
            table.set_incomplete(False)
            return
        self._refilling = True

        async def refill(keys: list[bytes]) -> None:
            try:
                for digest in relist:
                    keys += await self._loop.run_in_executor(self.executor, self.disk.keys_of, digest)  # type: ignore[union-attr]
                await self._put_disk_entries(keys)
            finally:
                self._refilling = False
                table.set_incomplete(False)

        self._table_task(refill(disk_keys))

    # ------------------------------------------------------------------ store: reserve / commit / abort

    def reserve(self, session: Session, keys: list[bytes], parent: bytes | None) -> list[int]:
        """An arena offset per key to write, or RESERVE_EXISTS / RESERVE_NO_SPACE."""
        return self.reserve_in(session, keys, parent)[0]

    def reserve_in(
        self, session: Session, keys: list[bytes], parent: bytes | None, prefer: Tier = Tier.DRAM
    ) -> tuple[list[int], list[int]]:
        """Per key an offset to write and the tier it is in (VRAM: in the pool; DRAM: in the arena),
        or RESERVE_EXISTS / RESERVE_NO_SPACE (tier 0). With `prefer` = VRAM, a session attached with
        L1 gets pool slots while the pool has room, then DRAM slots; a full pool starts a background
        demotion (the reserve itself never waits for a copy)."""
        if self.draining:
            raise PolarKVError("the daemon is draining and accepts no new pages", code=ErrorCode.DRAINING)
        if keys and parent == keys[0]:  # it would count as its own child: never a leaf, never evicted
            raise ProtocolError("reserve: parent is the first key itself; nothing reserved")
        ns = session.ns
        size = ns.ns.page_bytes
        need = self.cfg.dram.min_prefix_pages
        if keys and need > len(keys) and self._chain_length(parent, need) + len(keys) < need:
            session.reserved_at = self.clock()
            self.counters["not_admitted_pages"] += len(keys)
            return [RESERVE_NO_SPACE] * len(keys), [0] * len(keys)
        out: list[int] = []
        tiers: list[int] = []
        prev = parent
        now = self.clock()
        pool = self.vram if prefer is Tier.VRAM and session.vram else None
        for i, key in enumerate(keys):
            if (
                key in self.index
                or key in self.pending
                or (self.disk is not None and self.disk.entry(key) is not None)
            ):
                out.append(RESERVE_EXISTS)
                tiers.append(0)
                prev = key
                continue
            offset = pool.alloc(size) if pool is not None else None
            if offset is not None:
                page = Page(key, ns.id, offset, size, prev, RESERVED_VRAM)
                tiers.append(Tier.VRAM)
            else:
                if pool is not None:  # the pool is full: DRAM for the rest, and make room for next time
                    pool = None
                    self.counters["reserve_vram_full_pages"] += len(keys) - i
                    self.schedule_vram_demotion(len(keys) - i)
                offset = self._alloc(ns.slot_bytes)
                if offset is None:
                    self.counters["reserve_no_space"] += len(keys) - i
                    out.extend([RESERVE_NO_SPACE] * (len(keys) - i))
                    tiers.extend([0] * (len(keys) - i))
                    break
                page = Page(key, ns.id, offset, size, prev, RESERVED)
                tiers.append(Tier.DRAM)
            self.index.add(page)
            session.reserved[key] = page
            out.append(offset)
            prev = key
        session.reserved_at = now
        if pool is not None:
            self.schedule_vram_demotion()  # above vram.high_watermark now? (a no-op below it)
        return out, tiers

    def _chain_length(self, key: bytes | None, limit: int) -> int:
        """Pages from the root of a sequence up to `key` inclusive, counting at most `limit`.

        A parent the daemon no longer holds still counts (the engine's sequence has it); its own
        ancestors are then unknown, so the count stops there.
        """
        n = 0
        while key is not None and n < limit:
            n += 1
            page = self.index.get(key)
            if page is not None:
                key = page.parent
                continue
            pending = self.pending.get(key)
            if pending is not None:
                key = pending.parent
                continue
            entry = self.disk.entry(key) if self.disk is not None else None
            key = entry.parent if entry is not None else None
        return n

    def commit(self, session: Session, keys: list[bytes]) -> int:
        _refuse_duplicates(keys, "commit")
        missing = [k for k in keys if k not in session.reserved]
        if missing:
            raise PolarKVError(
                f"{len(missing)} of {len(keys)} keys were not reserved by this session "
                f"(first: {missing[0].hex()}); nothing committed",
                code=ErrorCode.NOT_RESERVED,
            )
        write_through = self.cfg.disk.write_through and self.disk is not None
        in_vram = 0
        for key in keys:
            page = session.reserved.pop(key)
            self.index.mark_ready(page)
            if page.state & VRAM:
                # L1 pages are not written through (the disk tier reads the arena): they are once
                # demoted there. Peers may have them (pool.py: by RDMA from the pool's dma-buf, or
                # through DRAM), so they are announced with their tier.
                self.vram_policy.insert(page)  # type: ignore[union-attr]
                if self.cluster is not None:
                    self.cluster.page_added(key, Tier.VRAM)
                in_vram += 1
                continue
            self.policy.insert(page)
            if write_through:
                self._write_through(session.ns, page)
            if self.cluster is not None:
                self.cluster.page_added(key, Tier.DRAM)
        if in_vram:
            self.counters["stored_pages_vram"] += in_vram
            self.counters["stored_bytes_vram"] += in_vram * session.ns.ns.page_bytes
        session.stored_pages += len(keys)
        self.counters["stored_pages"] += len(keys)
        self.counters["stored_bytes"] += len(keys) * session.ns.ns.page_bytes
        return len(keys)

    def _write_through(self, info: NamespaceInfo, page: Page) -> None:
        """Queue a disk copy of a just-committed page (disk.write_through), within max_pending_bytes."""
        if self.write_through_bytes + page.size > self.cfg.disk.max_pending_bytes:
            self.counters["write_through_skipped"] += 1  # written back when evicted instead
            return
        data = bytes(self.arena[page.offset : page.offset + page.size])
        self.write_through_bytes += page.size
        item = PendingDemotion(data, info.digest, page.parent, info.ns.itemsize)
        fut = self._write_to_disk(page.key, item, counter="written_through_pages")

        def done(_: object, size: int = page.size) -> None:
            self.write_through_bytes -= size

        fut.add_done_callback(done)

    def abort(self, session: Session, keys: list[bytes]) -> int:
        _refuse_duplicates(keys, "abort")
        missing = [k for k in keys if k not in session.reserved]
        if missing:
            raise PolarKVError(
                f"{len(missing)} of {len(keys)} keys were not reserved by this session; nothing aborted",
                code=ErrorCode.NOT_RESERVED,
            )
        return self._abort(session, keys)

    def _abort(self, session: Session, keys: list[bytes]) -> int:
        for key in keys:
            page = session.reserved.pop(key)
            self.index.remove(key)
            if page.state & VRAM:
                self.vram.free(page.offset)  # type: ignore[union-attr]
            else:
                self.allocator.free(page.offset, session.ns.slot_bytes)
        self.counters["aborted_pages"] += len(keys)
        return len(keys)

    # ------------------------------------------------------------------ load / release

    async def load(self, session: Session, keys: list[bytes]) -> tuple[list[int], list[Tier], int | None]:
        """Pin the longest loadable prefix of `keys` in DRAM (promoting disk and remote pages first).

        Returns (offsets, source tier of each, lease id). An offset is in the pool for a page whose
        tier is VRAM (only sessions attached with L1 get those; for the others L1 pages are moved
        to DRAM first, like disk pages), in the arena for every other. The engine copies the pages
        out, then releases the lease. A page that fails on the way (evicted meanwhile, corrupt on disk, a peer
        gone) ends the prefix there: the engine recomputes from that page on.
        """
        pinned, tiers, waits, remote_from = self._pin_prefix(session, keys)
        if remote_from is not None:
            for page, fut in await self._start_fetches(session.ns, keys[remote_from:], vram=session.vram):
                page.pins += 1
                pinned.append(page)
                tiers.append(Tier.DMP)
                waits.append((len(pinned) - 1, fut))
        if waits:
            results = await asyncio.gather(*(f for _, f in waits))
            for (pos, _), ok in zip(waits, results):
                if not ok:
                    self._unpin_all(pinned[pos:])
                    del pinned[pos:]
                    del tiers[pos:]
                    break
            # pages that arrived in L1 (a peer's, READ straight into the pool): their offsets are
            # in the pool now, and the tier says so (only L1 sessions wait for such pages)
            landed = 0
            for pos, _ in waits:
                if pos < len(pinned) and pinned[pos].state & VRAM:
                    landed += tiers[pos] is Tier.DMP
                    tiers[pos] = Tier.VRAM
            if landed:
                self.counters["loaded_pages_remote"] += landed  # `_loaded` counts them as L1 loads
        lease = self._loaded(session, keys, pinned, tiers)
        return [p.offset for p in pinned], tiers, lease.id if lease is not None else None

    async def load_pipelined(
        self, session: Session, keys: list[bytes]
    ) -> tuple[list[int], list[Tier], int | None, int | None]:
        """Like `load`, but answers at once: (offsets, tiers, lease id, signal slot).

        Pages still on their way (disk pages, read and decoded one layer group at a time; remote pages,
        fetched one layer group at a time)
        fill in behind the answer; the signal slot (see transport/pipeline.py) says how many leading
        layers every page has, and from which page on the load failed. None when nothing is on its way.
        """
        ns = session.ns
        from_disk: list[tuple[int, Page, asyncio.Future[bool]]] = []  # read layer group by group
        pinned, tiers, waits, remote_from = self._pin_prefix(session, keys, from_disk)
        layered: list[tuple[int, Page, asyncio.Future[bool], str]] = []
        if remote_from is not None:
            started = await self._start_fetches(ns, keys[remote_from:], layered=True)
            for page, fut, holder in started:  # type: ignore[misc]
                page.pins += 1
                pinned.append(page)
                tiers.append(Tier.DMP)
                layered.append((len(pinned) - 1, page, fut, holder))
        slot = self.signals.alloc() if (waits or layered) else None
        if (waits or layered) and slot is None:  # every slot taken: behave like a plain load
            self.counters["pipelined_loads_unsignalled"] += 1
            if from_disk:
                self._promote_layered(ns, from_disk, None)
            if layered:
                self._fetch_layered(ns, layered, None)
            results = await asyncio.gather(*(f for _, f in waits), *(f for _, _, f, _ in layered))
            positions = [pos for pos, _ in waits] + [pos for pos, _, _, _ in layered]
            bad = [pos for pos, ok in zip(positions, results) if not ok]
            if bad:
                cut = min(bad)
                self._unpin_all(pinned[cut:])
                del pinned[cut:]
                del tiers[cut:]
            lease = self._loaded(session, keys, pinned, tiers)
            return [p.offset for p in pinned], tiers, lease.id if lease is not None else None, None
        lease = self._loaded(session, keys, pinned, tiers)
        if slot is None or lease is None:
            if slot is not None:
                self.signals.free(slot)
            if from_disk:  # (nothing pinned: no lease) the reads still finish their promotions
                self._promote_layered(ns, from_disk, None)
            return [p.offset for p in pinned], tiers, lease.id if lease is not None else None, None
        progress = LoadProgress(self.signals, slot, len(pinned), ns.ns.num_layers)
        lease.progress = progress
        waiting = {pos for pos, _ in waits} | {pos for pos, _, _, _ in layered}
        for i in range(len(pinned)):
            if i not in waiting:
                progress.page_done(i)
        for pos, fut in waits:
            fut.add_done_callback(
                lambda f, i=pos: (
                    progress.page_done(i) if not f.cancelled() and f.result() else progress.fail(i)
                )
            )
        if from_disk:
            self._promote_layered(ns, from_disk, progress)
        if layered:
            self._fetch_layered(ns, layered, progress)
        self.counters["pipelined_loads"] += 1
        return [p.offset for p in pinned], tiers, lease.id, slot

    def _pin_prefix(
        self,
        session: Session,
        keys: list[bytes],
        from_disk: list[tuple[int, Page, asyncio.Future[bool]]] | None = None,
    ) -> tuple[list[Page], list[Tier], list[tuple[int, asyncio.Future[bool]]], int | None]:
        """Pin what is in DRAM, start promotions of what is on disk, for the longest prefix; says
        where the remote part would begin (None when the cluster cannot continue it). With
        `from_disk`, disk pages get their slots but are not read: they are listed there for
        `_promote_layered` (their futures are in the waits all the same)."""
        ns = session.ns
        pinned: list[Page] = []
        tiers: list[Tier] = []
        waits: list[tuple[int, asyncio.Future[bool]]] = []
        remote_from: int | None = None
        to_dram: list[tuple[int, Page]] = []  # L1 pages a session without L1 asked for
        for key in keys:
            page = self.index.get(key)
            if page is not None and page.state & ~VRAM == READY:
                if page.ns != ns.id:
                    self._unpin_all(pinned)
                    raise NamespaceError(f"key {key.hex()} belongs to another namespace")
                if page.state & VRAM and not session.vram:
                    if page.pins:  # an L1 engine is reading it: it cannot move now
                        break
                    to_dram.append((len(pinned), page))
                page.pins += 1
                pinned.append(page)
                # a tier says where the offset is: VRAM the pool, anything else the arena
                tiers.append(Tier.VRAM if page.state & VRAM and session.vram else Tier.DRAM)
                continue
            if page is not None and page.state & ~VRAM == PROMOTING:
                fut = self._promotions.get(key)
                # a page landing in L1 may still move to DRAM (an RDMA fallback): only a plain load
                # of an L1 session, whose offsets are read after the wait, can wait for it
                if fut is None or (page.state & VRAM and (not session.vram or from_disk is not None)):
                    break
                page.pins += 1
                pinned.append(page)
                tiers.append(Tier.DISK)
                waits.append((len(pinned) - 1, fut))
                continue
            if page is not None:  # RESERVED by someone: not readable yet
                break
            if not self._on_disk(key, ns.digest):
                if self._on_disk_any_ns(key):
                    self._unpin_all(pinned)
                    raise NamespaceError(f"key {key.hex()} belongs to another namespace")
                if self.cluster is not None:
                    remote_from = len(pinned)
                break
            promoted = self._start_promotion(ns, key, read=from_disk is None)
            if promoted is None:
                break
            page, fut = promoted
            page.pins += 1
            pinned.append(page)
            tiers.append(Tier.DISK)
            waits.append((len(pinned) - 1, fut))
            if from_disk is not None and not fut.done():  # (a pending demotion is copied at once)
                from_disk.append((len(pinned) - 1, page, fut))
        if to_dram:
            moved = self._start_vram_demotion([p for _, p in to_dram])
            for (pos, _), fut in zip(to_dram, moved):
                waits.append((pos, fut))
            if len(moved) < len(to_dram):  # no DRAM slot for the rest: the prefix ends there
                cut = to_dram[len(moved)][0]
                self._unpin_all(pinned[cut:])
                del pinned[cut:], tiers[cut:]
                waits[:] = [(pos, f) for pos, f in waits if pos < cut]
                if remote_from is not None and remote_from > cut:
                    remote_from = None
            waits.sort(key=lambda w: w[0])
        return pinned, tiers, waits, remote_from

    def _loaded(
        self, session: Session, keys: list[bytes], pinned: list[Page], tiers: list[Tier]
    ) -> Lease | None:
        """Account a load and put its pinned pages under a lease (None when nothing was pinned)."""
        ns = session.ns
        self._touch(pinned[::-1])
        n = len(pinned)
        self.counters["loads"] += 1
        self.counters["loaded_pages"] += n
        self.counters["loaded_bytes"] += n * ns.ns.page_bytes
        if self.vram is not None:
            self.counters["loaded_pages_vram"] += tiers.count(Tier.VRAM)
        self.counters["loaded_pages_disk"] += tiers.count(Tier.DISK)
        self.counters["loaded_pages_remote"] += tiers.count(Tier.DMP)
        self.counters["load_short_pages"] += len(keys) - n
        session.loaded_pages += n
        if not pinned:
            return None
        if session.vram and self.cfg.vram.promote_after_loads:
            self._note_l1_loads(pinned)
        self._count_prefix_hit(keys[0], n)
        lease = Lease(next(self._ids), session, pinned, self.clock() + self.cfg.daemon.lease_seconds)
        session.leases[lease.id] = lease
        return lease

    async def lookup_remote(self, session: Session, keys: list[bytes], tiers: list[Tier]) -> list[Tier]:
        """After a local lookup stopped short: how much further the cluster's pages reach."""
        found = await self.cluster.locate(keys[len(tiers) :])
        n = len(found)
        if n:
            self.counters["hit_pages_remote"] += n
            self.counters["miss_pages"] -= n
            session.hit_pages += n
        return tiers + [Tier.DMP] * n

    async def _start_fetches(
        self, ns: NamespaceInfo, keys: list[bytes], layered: bool = False, vram: bool = False
    ) -> list[Any]:
        """Start pulling the longest prefix of `keys` that peers hold into new DRAM slots.

        Holders come from the lookup that preceded this load, or from a fresh meta map query.
        Pages arrive in batches per holder, several batches in flight; each page's future says
        whether its bytes arrived verified. With `layered`, nothing is sent yet: the caller gets
        (page, future, holder) and runs `_fetch_layered`.

        With `vram` (the loading session attached with L1) and RDMA able to write into our pool
        (`cluster.vram_landing()`: the pool registered as a dma-buf), pages get L1 slots while the
        pool has room (PROMOTING_VRAM) and are READ straight into them (GPUDirect); `_fetch` moves
        them to DRAM slots when that cannot be done. Never for `layered` loads: their offsets go to
        the engine before the bytes arrive, so they cannot change tier on the way.
        """
        hints = self.cluster.hints
        holders = []
        for key in keys:
            h = hints.get(key)
            if not h:
                break
            holders.append(h)
        if not holders:
            holders = await self.cluster.locate(keys)
        loop = asyncio.get_running_loop()
        started: list[tuple[Page, asyncio.Future[bool]]] = []
        pool = self.vram if vram and not layered and self.cluster.vram_landing() else None
        for key in keys[: len(holders)]:
            if key in self.index:  # appeared meanwhile (another load of the same prefix)
                break
            offset = pool.alloc(ns.ns.page_bytes) if pool is not None else None
            if offset is not None:
                page = Page(key, ns.id, offset, ns.ns.page_bytes, None, PROMOTING_VRAM)
            else:
                pool = None  # full: DRAM for the rest (a fetch never waits for a demotion)
                offset = self._alloc(ns.slot_bytes)
                if offset is None:
                    break
                page = Page(key, ns.id, offset, ns.ns.page_bytes, None, PROMOTING)
            self.index.add(page)
            fut: asyncio.Future[bool] = loop.create_future()
            self._promotions[key] = fut
            started.append((page, fut))
        if pool is not None or (vram and self.vram is not None):
            self.schedule_vram_demotion()  # above vram.high_watermark now? (a no-op below it)
        if layered:
            return [(page, fut, holders[i][0]) for i, (page, fut) in enumerate(started)]
        batch: list[tuple[Page, asyncio.Future[bool]]] = []
        for i, item in enumerate(started):
            batch.append(item)
            last = i + 1 == len(started)
            if (
                last
                or len(batch) == self.cluster.fetch_batch
                or holders[i + 1][0] != holders[i][0]
                or started[i + 1][0].state != item[0].state  # a batch lands in one tier
            ):
                task = asyncio.ensure_future(self._fetch(ns, holders[i][0], batch))
                self._cluster_tasks.add(task)
                task.add_done_callback(self._cluster_tasks.discard)
                batch = []
        return started

    async def _fetch(
        self, ns: NamespaceInfo, holder: str, batch: list[tuple[Page, asyncio.Future[bool]]]
    ) -> None:
        sums: list[int | None] = []
        results: list[Any] | None = None
        if batch and batch[0][0].state == PROMOTING_VRAM:
            try:
                results = await self.cluster.fetch_into_vram(
                    holder, ns.digest, [p.key for p, _ in batch], [p.offset for p, _ in batch], ns.ns.page_bytes, sums
                )  # fmt: skip
            except Exception as e:  # the DRAM path below still delivers
                log.error("cluster: fetch from %s into L1 failed: %r", holder, e)
                results = None
            if results is None:  # not over RDMA into L1: the same pages into DRAM, in this call
                batch = self._land_in_dram_instead(ns, batch)
                sums = []
            else:
                n = sum(r is not False for r in results)
                self.counters["fetched_pages_vram"] += n
        if results is None:
            views = [self.arena[p.offset : p.offset + p.size] for p, _ in batch]
            try:
                results = await self.cluster.fetch(
                    holder, ns.digest, [p.key for p, _ in batch], views, sums=sums
                )
            except Exception as e:  # never leave a loader waiting
                log.error("cluster: fetch from %s failed: %r", holder, e)
                results = [False] * len(batch)
        for i, ((page, fut), parent) in enumerate(zip(batch, results)):
            if parent is False:
                self._finish_promotion(page, fut, PageNotFound("remote fetch failed"), on_disk=False)
            else:
                page.parent = parent  # type: ignore[assignment]
                page.checksum = sums[i] if i < len(sums) else None  # verified on arrival: kept for peers
                self.counters["fetched_pages_remote"] += 1
                self.counters["fetched_bytes_remote"] += page.size
                self._finish_promotion(page, fut, None, on_disk=False)

    def _land_in_dram_instead(
        self, ns: NamespaceInfo, batch: list[tuple[Page, asyncio.Future[bool]]]
    ) -> list[tuple[Page, asyncio.Future[bool]]]:
        """Pages meant to arrive in L1 get DRAM slots instead (their L1 slots are freed: nothing
        writes there any more, the RDMA attempt is over). Pages no DRAM slot is found for end the
        prefix: they and those after them fail. Returns the pages that go on, in order."""
        out: list[tuple[Page, asyncio.Future[bool]]] = []
        for i, (page, fut) in enumerate(batch):
            offset = self._alloc(ns.slot_bytes)
            if offset is None:
                for p, f in batch[i:]:
                    self._finish_promotion(
                        p, f, PageNotFound("no DRAM slot for a remote page"), on_disk=False
                    )
                break
            self.vram.free(page.offset)  # type: ignore[union-attr]
            self.index.land_in_dram(page, offset)
            out.append((page, fut))
        self.counters["fetch_vram_to_dram_pages"] += len(batch)
        return out

    def _fetch_layered(
        self,
        ns: NamespaceInfo,
        items: list[tuple[int, Page, asyncio.Future[bool], str]],
        progress: LoadProgress | None,
    ) -> None:
        task = asyncio.ensure_future(self._fetch_layer_groups(ns, items, progress))
        self._cluster_tasks.add(task)
        task.add_done_callback(self._cluster_tasks.discard)

    async def _fetch_layer_groups(
        self,
        ns: NamespaceInfo,
        items: list[tuple[int, Page, asyncio.Future[bool], str]],
        progress: LoadProgress | None,
    ) -> None:
        """Remote pages, layer group after layer group (each group: every page, in batches per holder,
        in parallel), publishing progress after each group; a page that fails ends the load there."""
        num_layers, layer_bytes = ns.ns.num_layers, ns.ns.layer_bytes
        batches: list[list[tuple[int, Page, asyncio.Future[bool], str]]] = []
        for item in items:
            if batches and item[3] == batches[-1][0][3] and len(batches[-1]) < self.cluster.fetch_batch:
                batches[-1].append(item)
            else:
                batches.append([item])
        done_layers = dict.fromkeys((pos for pos, _, _, _ in items), 0)
        failed_at: int | None = None
        try:
            for lo, hi in layer_groups(num_layers, self.cluster.layer_groups):
                # nothing after a failed page is asked for again
                live = [[it for it in b if failed_at is None or it[0] < failed_at] for b in batches]
                live = [b for b in live if b]
                if not live:
                    break
                results = await asyncio.gather(
                    *(
                        self.cluster.fetch(
                            b[0][3],
                            ns.digest,
                            [p.key for _, p, _, _ in b],
                            [
                                self.arena[p.offset + lo * layer_bytes : p.offset + hi * layer_bytes]
                                for _, p, _, _ in b
                            ],
                            layers=(lo, hi, layer_bytes),
                        )
                        for b in live
                    ),
                    return_exceptions=True,
                )
                good: list[int] = []
                for b, res in zip(live, results):
                    if isinstance(res, BaseException):
                        log.warning(
                            "cluster: layers %d-%d of %d pages from %s failed: %r", lo, hi, len(b), b[0][3], res,
                        )  # fmt: skip
                        res = [False] * len(b)
                    elif False in res:
                        log.warning(
                            "cluster: layers %d-%d from %s: %d of %d pages arrived (the load ends at the first missing)",
                            lo, hi, b[0][3], res.index(False), len(b),
                        )  # fmt: skip
                    for (pos, page, _, _), parent in zip(b, res):
                        if failed_at is not None and pos >= failed_at:
                            break
                        if parent is False:
                            failed_at = pos if failed_at is None else min(failed_at, pos)
                            if progress is not None:
                                progress.fail(pos)
                            break
                        if lo == 0:
                            page.parent = parent  # type: ignore[assignment]
                        done_layers[pos] = hi
                        good.append(pos)
                if progress is not None:
                    progress.layers_done([p for p in good if failed_at is None or p < failed_at], hi)
        finally:
            for pos, page, fut, _ in items:
                if done_layers[pos] == num_layers and (failed_at is None or pos < failed_at):
                    self.counters["fetched_pages_remote"] += 1
                    self.counters["fetched_bytes_remote"] += page.size
                    self._finish_promotion(page, fut, None, on_disk=False)
                else:
                    self._finish_promotion(page, fut, PageNotFound("remote fetch failed"), on_disk=False)

    def promote_for_peer(
        self,
        ns_digest: bytes,
        keys: list[bytes],
        held_elsewhere: Callable[[bytes], bool],
        *,
        vram_ok: bool = False,
        from_vram: list[bytes] | None = None,
    ) -> list[asyncio.Future[bool]]:
        """A peer asks for `keys`: start bringing the disk pages and the L1 pages of the longest
        prefix held here into DRAM, so they can be sent like DRAM pages. Returns the futures of
        pages on their way (True: in DRAM now). Pages in DRAM, keys `held_elsewhere` (the lent DMP
        region) and, with `vram_ok` (the peer READs our pool directly), L1 pages need nothing; the
        walk stops at the first key held nowhere here, and at an L1 page that is pinned (an engine
        reading it, a peer's lease): it cannot move now. L1 pages go down through the demotion path
        engines without L1 use (`_start_vram_demotion`, one batch); their keys go to `from_vram`. A
        namespace no engine attached to since this daemon started is not known here (its page size
        and slots): nothing is promoted, and its disk pages are announced only once one does
        (`ClusterPool.announce_disk_pages`)."""
        info = self.namespaces.get(ns_digest)
        if info is None:
            return []
        futs: list[asyncio.Future[bool]] = []
        to_dram: list[Page] = []
        for key in keys:
            page = self.index.get(key)
            if page is not None:
                if page.state == READY or (page.state == READY_VRAM and vram_ok):
                    continue
                if page.state == READY_VRAM:
                    if page.pins or page.ns != info.id:
                        break
                    to_dram.append(page)
                    continue
                fut = self._promotions.get(key) if page.state & ~VRAM == PROMOTING else None
                if fut is None:
                    break
                futs.append(fut)
                continue
            if held_elsewhere(key):
                continue
            if not self._on_disk(key, ns_digest):
                break
            promoted = self._start_promotion(info, key)
            if promoted is None:
                break
            futs.append(promoted[1])
            self.counters["promoted_pages_for_peers"] += 1
        if to_dram and self.vram is not None:
            moved = self._start_vram_demotion(to_dram)
            futs.extend(moved)
            self.counters["demoted_pages_vram_for_peers"] += len(moved)
            if from_vram is not None:
                from_vram.extend(p.key for p in to_dram[: len(moved)])
        return futs

    def _on_disk_any_ns(self, key: bytes) -> bool:
        return key in self.pending or (self.disk is not None and self.disk.entry(key) is not None)

    def _start_promotion(
        self, ns: NamespaceInfo, key: bytes, read: bool = True
    ) -> tuple[Page, asyncio.Future[bool]] | None:
        """A DRAM slot for a disk page (PROMOTING) and the future of its arrival; its bytes come from
        a pending demotion at once, else from the disk tier on an I/O thread (or, `read=False`,
        from `_promote_layered`, which the caller runs)."""
        offset = self._alloc(ns.slot_bytes)
        if offset is None:
            return None
        pending = self.pending.get(key)
        parent = pending.parent if pending is not None else self.disk.entry(key).parent
        page = Page(key, ns.id, offset, ns.ns.page_bytes, parent, PROMOTING)
        self.index.add(page)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._promotions[key] = fut
        view = self.arena[offset : offset + page.size]
        if pending is not None:
            view[:] = pending.data
            self._finish_promotion(page, fut, None, on_disk=False)
        elif read:
            io = loop.run_in_executor(self.executor, self.disk.get_into, key, view)
            io.add_done_callback(
                lambda f: self._finish_promotion(
                    page,
                    fut,
                    PageNotFound("read cancelled") if f.cancelled() else f.exception(),
                    on_disk=True,
                )
            )
        return page, fut

    def _promote_layered(
        self,
        ns: NamespaceInfo,
        items: list[tuple[int, Page, asyncio.Future[bool]]],
        progress: LoadProgress | None,
    ) -> None:
        task = asyncio.ensure_future(self._promote_layer_groups(ns, items, progress))
        self._disk_reads.add(task)
        task.add_done_callback(self._disk_reads.discard)

    async def _promote_layer_groups(
        self,
        ns: NamespaceInfo,
        items: list[tuple[int, Page, asyncio.Future[bool]]],
        progress: LoadProgress | None,
    ) -> None:
        """Disk pages of a pipelined load, layer group by layer group: every page's file is read,
        then group 0 of every page is decoded and verified (on the I/O threads), published, then
        group 1, ... Pages stored in layer groups (`DiskTier.put(groups=...)`) give the engine layer
        0 of the whole prefix after 1/8 of the decoding; a page stored whole arrives whole. A page
        that fails (gone, corrupt) ends the load there, as a failed remote page does."""
        loop = asyncio.get_running_loop()
        run = functools.partial(loop.run_in_executor, self.executor)
        lb = ns.ns.layer_bytes
        opened = await asyncio.gather(
            *(run(self.disk.open_grouped, page.key) for _, page, _ in items), return_exceptions=True
        )
        live: list[tuple[int, Page, asyncio.Future[bool], Any]] = []
        for (pos, page, fut), grouped in zip(items, opened):
            if isinstance(grouped, BaseException):
                self._finish_promotion(page, fut, _read_error(grouped), on_disk=True)
            else:
                live.append((pos, page, fut, grouped))
        group = 0
        while live:
            batch = [it for it in live if group < len(it[3].ranges)]
            results = await asyncio.gather(
                *(
                    run(grouped.decode, group, self.arena[page.offset : page.offset + page.size])
                    for _, page, _, grouped in batch
                ),
                return_exceptions=True,
            )
            ready: list[int] = []
            for (pos, page, fut, grouped), res in zip(batch, results):
                if isinstance(res, BaseException):
                    self._finish_promotion(page, fut, _read_error(res), on_disk=True)
                elif group + 1 == len(grouped.ranges):
                    self._finish_promotion(page, fut, None, on_disk=True)  # whole: READY
                else:
                    ready.append(pos)
            if progress is not None and ready and lb > 0:
                ends = {pos: grouped.ranges[group][1] for pos, _, _, grouped in batch}
                for layers in sorted({ends[p] // lb for p in ready}):
                    progress.layers_done([p for p in ready if ends[p] // lb == layers], layers)
            live = [it for it in live if not it[2].done()]
            group += 1

    def _finish_promotion(
        self, page: Page, fut: asyncio.Future[bool], error: BaseException | None, *, on_disk: bool
    ) -> None:
        self._promotions.pop(page.key, None)
        in_vram = bool(page.state & VRAM)  # a peer's page READ into L1 (GPUDirect)
        if error is None:
            page.on_disk = on_disk
            self.index.mark_ready(page)
            (self.vram_policy if in_vram else self.policy).insert(page)  # type: ignore[union-attr]
            if self.cluster is not None:
                self.cluster.page_added(page.key, Tier.VRAM if in_vram else Tier.DRAM)
            self.counters["promoted_pages"] += 1
            self.counters["promoted_bytes"] += page.size
            fut.set_result(True)
            return
        if isinstance(error, PageCorrupt):
            self.counters["corrupt_pages"] += 1
            log.warning("disk page %s failed its checksum and was dropped: %s", page.key.hex(), error)
        elif not isinstance(error, PageNotFound):
            log.error("promotion of %s failed: %r", page.key.hex(), error)
        else:  # gone since the lookup (evicted, deleted): the engine recomputes it
            log.debug("promotion of %s: %s", page.key.hex(), error)
        self.counters["promotion_failures"] += 1
        self.index.remove(page.key)
        if in_vram:
            self.vram.free(page.offset)  # type: ignore[union-attr]
        else:
            self.allocator.free(page.offset, slot_size(page.size))
        fut.set_result(False)

    def release(self, session: Session, lease_id: int) -> int:
        lease = session.leases.get(lease_id)
        if lease is None:
            raise PageNotFound(f"no lease {lease_id} in this session (expired or released)")
        return self._drop_lease(lease)

    def _new_lease(self, session: Session, pages: list[Page]) -> Lease:
        for page in pages:
            page.pins += 1
        lease = Lease(next(self._ids), session, pages, self.clock() + self.cfg.daemon.lease_seconds)
        session.leases[lease.id] = lease
        return lease

    def _drop_lease(self, lease: Lease) -> int:
        lease.session.leases.pop(lease.id, None)
        if lease.progress is not None:
            lease.progress.close()
        self._unpin_all(lease.pages)
        return len(lease.pages)

    @staticmethod
    def _unpin_all(pages: list[Page]) -> None:
        for page in pages:
            page.pins -= 1

    def expire(self) -> int:
        """Drop leases and reservations older than the lease time. Returns how many expired.

        Only engines that stay connected but stop answering get here (a closed connection lets go at
        once). An expired lease unpins its pages: the engine learns it when its `release` fails, and the
        client then discards what it copied. An expired reservation disappears from the index, but its
        slot stays out of use until the engine disconnects: a slow writer must never scribble over a
        page that someone else owns meanwhile.
        """
        now = self.clock()
        lease_time = self.cfg.daemon.lease_seconds
        expired = 0
        for session in list(self.sessions.values()):
            for lease in list(session.leases.values()):
                if lease.expires <= now:
                    self._drop_lease(lease)
                    expired += 1
            if session.reserved and session.reserved_at + lease_time <= now:
                for key, page in list(session.reserved.items()):
                    del session.reserved[key]
                    self.index.remove(key)
                    session.quarantined.append((page.offset, session.ns.slot_bytes, bool(page.state & VRAM)))
                    expired += 1
        if expired:
            self.counters["expired"] += expired
            log.info("expired %d leases/reservations of unresponsive engines", expired)
        return expired

    # ------------------------------------------------------------------ L1: demotion to DRAM

    def schedule_vram_demotion(self, min_pages: int = 0) -> None:
        """Start a background demotion of L1 when it is above vram.high_watermark, or (`min_pages`)
        when a reserve found it full; one at a time. Loop only (a periodic chore, and reserves); a
        no-op outside a running loop (in-process tests call `demote_vram` themselves)."""
        pool = self.vram
        if pool is None or (self._vram_task is not None and not self._vram_task.done()):
            return
        if not min_pages and pool.slots.used_bytes <= self.cfg.vram.high_watermark * pool.capacity:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._vram_task = loop.create_task(self.demote_vram(min_pages))

    async def demote_vram(
        self, min_pages: int = 0, *, everything: bool = False, batch_bytes: int = 256 << 20
    ) -> int:
        """Move L1 pages to DRAM until L1 is at vram.low_watermark and at least `min_pages` moved
        (`everything`: every page that can). Victims come from L1's policy, leaf first, unpinned only;
        each batch (at most `batch_bytes`) is one pool -> arena copy in the I/O pool. Returns the pages
        moved. A batch that fails leaves its pages in L1 and ends the call."""
        pool = self.vram
        if pool is None:
            return 0
        moved = 0
        while True:
            target = 0 if everything else self.cfg.vram.low_watermark * pool.capacity
            if pool.slots.used_bytes <= target and moved >= min_pages:
                break
            want = min(batch_bytes, max(0, int(pool.slots.used_bytes - target)))
            victims = self._vram_victims(want, max(0, min_pages - moved))
            futs = self._start_vram_demotion(victims) if victims else []
            if not futs:
                break
            ok = sum(await asyncio.gather(*futs))
            moved += ok
            if ok < len(futs):
                break
        return moved

    def _note_l1_loads(self, pages: list[Page]) -> None:
        """An L1 session loaded `pages`: those in DRAM count a load, and once loaded
        `vram.promote_after_loads` times (within the last L1_LOADS_REMEMBERED such loads) are due
        for promotion into L1. Pages loaded once (a scan) never are."""
        due, seen = self.cfg.vram.promote_after_loads, self._l1_loads
        for page in pages:
            if page.state & VRAM:
                continue
            n = seen.pop(page.key, 0) + 1
            if n >= due:
                self._l1_due[page.key] = None
            else:
                seen[page.key] = n  # re-inserted: now the newest
        while len(seen) > L1_LOADS_REMEMBERED:
            del seen[next(iter(seen))]
        while len(self._l1_due) > L1_LOADS_REMEMBERED:
            del self._l1_due[next(iter(self._l1_due))]

    def schedule_vram_promotion(self, batch_bytes: int = 256 << 20) -> int:
        """Start copying the DRAM pages due for L1 into free L1 slots: one batch (`VramPool.from_host`
        in the I/O pool) at a time. A chore (loop only), after loads: never on a load's path.

        The page stays READY in DRAM while its bytes are copied (lookups and loads go on; a pin keeps
        its slot from eviction), and moves to L1 only if nobody pinned it meanwhile. Pages being
        read wait for the next round; pages gone or moved are forgotten. Promotion never makes room:
        it stops at `vram.high_watermark`, during a demotion and while draining. Returns the pages
        whose copy started."""
        pool = self.vram
        if pool is None or not self._l1_due or self.draining:
            return 0
        if self._vram_promotion is not None and not self._vram_promotion.done():
            return 0
        if self._vram_task is not None and not self._vram_task.done():
            return 0
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return 0
        limit = self.cfg.vram.high_watermark * pool.capacity
        if pool.slots.used_bytes >= limit:
            return 0  # no room: the due pages wait (every 0.25 s, so not a walk over all of them)
        moves: list[tuple[Page, int]] = []
        total = 0
        for key in list(self._l1_due):
            page = self.index.get(key)
            if page is None or page.state != READY or key in self.operator_pins:
                del self._l1_due[key]  # gone, moved, or pinned in DRAM by the operator
                continue
            if page.pins:
                continue  # an engine is reading it: next round
            if pool.slots.used_bytes + page.size > limit or total >= batch_bytes:
                break
            offset = pool.alloc(page.size)
            if offset is None:
                break
            del self._l1_due[key]
            page.pins += 1  # the copy reads its DRAM slot
            moves.append((page, offset))
            total += page.size
        if not moves:
            return 0
        items = [(page.offset, offset, page.size) for page, offset in moves]
        io = loop.run_in_executor(self.executor, pool.from_host, self.vram_host, items)
        self._vram_promotion = io
        io.add_done_callback(lambda f: self._finish_vram_promotion(moves, f))
        return len(moves)

    def _finish_vram_promotion(self, moves: list[tuple[Page, int]], f: asyncio.Future[Any]) -> None:
        error = asyncio.CancelledError() if f.cancelled() else f.exception()
        if error is not None:
            log.error("vram: copying %d pages into L1 failed; they stay in DRAM: %r", len(moves), error)
            self.counters["promotion_failures_vram"] += len(moves)
        pool, pol = self.vram, self.vram_policy
        assert pool is not None and pol is not None
        for page, offset in moves:
            page.pins -= 1
            current = self.index.get(page.key) is page and page.state == READY
            if error is not None or not current or page.pins:
                pool.free(offset)
                if error is None and current:
                    self._l1_due[page.key] = None  # pinned while copied: again next round
                continue
            self.policy.remove(page)
            self.allocator.free(page.offset, slot_size(page.size))
            self.index.move_to_vram(page, offset)
            pol.insert(page)
            if self.cluster is not None:  # still ours, one tier up (added first: never a gap)
                self.cluster.page_added(page.key, Tier.VRAM)
                self.cluster.page_removed(page.key, Tier.DRAM)
            self.counters["promoted_pages_vram"] += 1
            self.counters["promoted_bytes_vram"] += page.size

    def _vram_victims(self, max_bytes: int, min_pages: int = 0) -> list[Page]:
        """Unpinned L1 pages in L1's policy order, unlinked from it: first those without cached
        children (leaves), then, when none is left, the coldest of the rest (interior pages whose
        leaves went down to DRAM already: moving them keeps the prefix in memory). Enough pages to
        free `max_bytes` of slots, and at least `min_pages`."""
        self.apply_touches()
        self.apply_table_touches()
        pol = self.vram_policy
        assert pol is not None

        taken: collections.Counter[bytes] = collections.Counter()  # children already chosen, by parent

        def leaf(node: Any) -> bool:
            return node.pins == 0 and node.children == taken[node.key] and node.state == READY_VRAM

        def unpinned(node: Any) -> bool:
            return node.pins == 0 and node.state == READY_VRAM

        out: list[Page] = []
        total = 0
        test = leaf
        while total < max_bytes or len(out) < min_pages:
            got = pol.victims(1, test)
            if not got:
                if test is unpinned:
                    break
                test = unpinned
                continue
            page: Page = got[0]  # type: ignore[assignment]
            out.append(page)
            total += page.size
            if page.linked and page.parent is not None:
                taken[page.parent] += 1
        return out

    def _start_vram_demotion(self, pages: list[Page]) -> list[asyncio.Future[bool]]:
        """Start moving READY_VRAM `pages` to DRAM: a DRAM slot each (while DRAM has room; the rest
        stay in L1), PROMOTING meanwhile (lookups miss them, loads wait for them), one batched copy
        `VramPool.to_host` in the I/O pool (ctypes releases the GIL: the loop runs on). One future
        per page started, in order: True once it is READY in DRAM, False when it stayed in L1."""
        loop = asyncio.get_running_loop()
        pol = self.vram_policy
        assert pol is not None and self.vram is not None
        moves: list[tuple[Page, int, asyncio.Future[bool]]] = []
        for page in pages:
            offset = self._alloc(self._ns_by_id[page.ns].slot_bytes)
            if offset is None:
                break
            pol.remove(page)
            pool_offset = page.offset
            self.index.unready(page, offset)
            fut: asyncio.Future[bool] = loop.create_future()
            self._promotions[page.key] = fut
            moves.append((page, pool_offset, fut))
        for page in pages[len(moves) :]:
            pol.insert(page)  # no room in DRAM: stays in L1 (a no-op when it never left the policy)
        if not moves:
            return []
        items = [(pool_offset, page.offset, page.size) for page, pool_offset, _ in moves]
        io = loop.run_in_executor(self.executor, self.vram.to_host, self.vram_host, items)
        io.add_done_callback(lambda f: self._finish_vram_demotion(moves, f))
        return [fut for _, _, fut in moves]

    def _finish_vram_demotion(
        self, moves: list[tuple[Page, int, asyncio.Future[bool]]], f: asyncio.Future[Any]
    ) -> None:
        error = asyncio.CancelledError() if f.cancelled() else f.exception()
        if error is not None:
            log.error("vram: copying %d pages to DRAM failed; they stay in L1: %r", len(moves), error)
            self.counters["demotion_failures_vram"] += len(moves)
        for page, pool_offset, fut in moves:
            self._promotions.pop(page.key, None)
            if error is None:
                self.vram.free(pool_offset)  # type: ignore[union-attr]
                self.index.mark_ready(page)  # PROMOTING -> READY in DRAM
                self.policy.insert(page)
                if self.cluster is not None:  # still ours, one tier down (added first: never a gap)
                    self.cluster.page_added(page.key, Tier.DRAM)
                    self.cluster.page_removed(page.key, Tier.VRAM)
                self.counters["demoted_pages_vram"] += 1
                self.counters["demoted_bytes_vram"] += page.size
            else:
                self.allocator.free(page.offset, slot_size(page.size))
                self.index.restore_vram(page, pool_offset)
                self.vram_policy.insert(page)  # type: ignore[union-attr]
            if not fut.done():
                fut.set_result(error is None)

    # ------------------------------------------------------------------ space: allocation, eviction, demotion

    def _alloc(self, slot_bytes: int) -> int | None:
        offset = self.allocator.alloc(slot_bytes)
        while offset is None:
            if not self._evict_one(slot_bytes, "capacity"):
                return None
            offset = self.allocator.alloc(slot_bytes)
        return offset

    def _evict_one(self, slot_bytes: int | None, reason: str) -> bool:
        self.apply_touches()  # the policy must know every lookup answered so far before it picks
        self.apply_table_touches()

        def evictable_same(node: Any) -> bool:
            return (
                node.pins == 0
                and node.children == 0
                and node.state == READY
                and slot_size(node.size) == slot_bytes
            )

        def evictable_any(node: Any) -> bool:
            return node.pins == 0 and node.children == 0 and node.state == READY

        victims = self.policy.victims(1, evictable_same) if slot_bytes is not None else []
        if not victims:
            victims = self.policy.victims(1, evictable_any)
        if not victims:
            return False
        page = victims[0]
        assert isinstance(page, Page)
        self._demote(page)
        self.index.remove(page.key)
        self.allocator.free(page.offset, slot_size(page.size))
        self.counters[f"evicted_pages_dram_{reason}"] += 1
        self.counters["evicted_bytes_dram"] += page.size
        return True

    def _demote(self, page: Page) -> None:
        """An evicted page leaves DRAM: to peers' lent DRAM (L3) when the cluster has room, else
        queued for the disk tier (unless it is there already)."""
        if self.cluster is not None:
            self.cluster.page_removed(page.key, Tier.DRAM)
            if not page.on_disk and self._demote_to_pool(page):
                return
        if self.disk is None or page.on_disk:
            return
        if self.pending_bytes + page.size > self.cfg.disk.max_pending_bytes:
            self.counters["demotions_dropped"] += 1
            return
        self._write_to_disk(page.key, self._pend(page))

    def _pend(self, page: Page) -> PendingDemotion:
        """A copy of a page leaving DRAM, readable (lookups, promotions) until it lands elsewhere."""
        info = self._ns_by_id[page.ns]
        item = PendingDemotion(
            bytes(self.arena[page.offset : page.offset + page.size]),
            info.digest,
            page.parent,
            info.ns.itemsize,
        )
        self.pending[page.key] = item
        self.pending_bytes += page.size
        return item

    def _unpend(self, key: bytes, item: PendingDemotion) -> None:
        if self.pending.get(key) is item:
            del self.pending[key]
            self.pending_bytes -= len(item.data)

    def _demote_to_pool(self, page: Page) -> bool:
        """Send an evicted page to the peers `cluster.replicas` picks; the disk gets it if they fail."""
        targets = self.cluster.demote_targets(page.key, page.size)
        if not targets or self.pending_bytes + page.size > self.cfg.disk.max_pending_bytes:
            return False
        info = self._ns_by_id[page.ns]
        item = self._pend(page)
        fut = asyncio.ensure_future(
            self.cluster.demote(info.digest, page.key, page.parent, item.data, targets)
        )
        self._cluster_tasks.add(fut)

        def done(f: asyncio.Future[int]) -> None:
            self._cluster_tasks.discard(f)
            stored = 0 if f.cancelled() or f.exception() is not None else f.result()
            if stored:
                self.counters["demoted_pages_dmp"] += 1
                self.counters["demoted_bytes_dmp"] += len(item.data)
                self._unpend(page.key, item)
                self._sync_disk_entry(page.key)  # on peers now, not on our disk
            elif self.pending.get(page.key) is not item:
                pass  # a later demotion of the same page replaced it
            elif self.disk is not None:
                self.counters["demotions_dmp_to_disk"] += 1
                self._write_to_disk(page.key, item)  # the pending entry stays until written
            else:
                self._unpend(page.key, item)
                self._sync_disk_entry(page.key)
                self.counters["demotions_dropped"] += 1

        fut.add_done_callback(done)
        return True

    def _write_to_disk(
        self, key: bytes, item: PendingDemotion, counter: str = "demoted_pages"
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        info = self.namespaces.get(item.ns_digest)
        # stored in layer groups, each readable and verifiable on its own: a pipelined load can
        # hand the engine layer 0 of every page before the last group is decoded
        groups = (
            layer_group_ends(info.ns.num_layers, info.ns.layer_bytes, len(item.data))
            if info is not None
            else None
        )
        fut = loop.run_in_executor(
            self.executor, self.disk.put, key, item.parent, item.ns_digest, item.data, item.itemsize, groups
        )
        self._disk_writes.add(fut)

        def done(f: asyncio.Future[Any]) -> None:
            self._disk_writes.discard(f)
            self._unpend(key, item)
            self._sync_disk_entry(key)  # on disk now, or (failed, dropped) nowhere but maybe DRAM
            if f.cancelled():  # the I/O pool shut down under it (daemon stopping)
                self.counters["demotions_cancelled"] += 1
            elif f.exception() is not None:
                self.counters["demotion_failures"] += 1
                log.error("writing page %s to disk failed: %r", key.hex(), f.exception())
            elif f.result():
                self.counters[counter] += 1
                self.counters[counter.replace("_pages", "_bytes")] += len(item.data)
                page = self.index.get(key)
                if page is not None:
                    page.on_disk = True
                if self.cluster is not None:  # peers can have it from our disk too
                    self.cluster.page_added(key, Tier.DISK)
            else:
                self.counters["demotions_dropped"] += 1

        fut.add_done_callback(done)
        return fut

    def evict_bytes(self, tier: Tier, nbytes: int) -> int:
        """Operator eviction from DRAM (demoting to disk). Returns bytes freed."""
        if tier is not Tier.DRAM:
            raise PolarKVError(f"evict from {tier.label} goes through evict_disk", code=ErrorCode.BAD_VALUE)
        freed = 0
        while freed < nbytes:
            before = self.index.ready_bytes
            if not self._evict_one(None, "operator"):
                break
            freed += before - self.index.ready_bytes
        return freed

    async def evict_disk(self, nbytes: int) -> int:
        if self.disk is None:
            return 0
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.disk.evict_bytes, nbytes)

    async def evict_vram(self, nbytes: int, *, batch_bytes: int = 256 << 20) -> int:
        """Operator eviction from L1: move at least `nbytes` of unpinned L1 pages to DRAM (as a
        demotion under pressure does: L1's policy order, leaves first, batched copies), or every page
        that can move. Returns the bytes of L1 freed. Pages pinned by a lease stay; so do pages DRAM has
        no room for (the call then ends short)."""
        if self.vram is None:
            raise PolarKVError("this daemon has no L1 (VRAM) tier", code=ErrorCode.BAD_VALUE)
        freed = 0
        while freed < nbytes:
            victims = self._vram_victims(min(batch_bytes, nbytes - freed), 1)
            sizes = [p.size for p in victims]
            futs = self._start_vram_demotion(victims) if victims else []
            if not futs:
                break
            moved = await asyncio.gather(*futs)
            freed += sum(size for size, ok in zip(sizes, moved) if ok)
            if not all(moved):
                break
        if freed:  # counted with every demotion in demoted_pages_vram / demoted_bytes_vram
            log.info("operator: moved %s of L1 pages to DRAM", format_size(freed))
        return freed

    def set_policy(self, tier: Tier, name: str) -> None:
        if tier is Tier.DRAM:
            if name != self.policy.name:
                self.policy = switch_policy(self.policy, name)
            self.cfg.dram.policy = name
        elif tier is Tier.DISK and self.disk is not None:
            self.disk.set_policy(name)
            self.cfg.disk.policy = name
        log.info("eviction policy of %s is now %s", tier.label, name)

    # ------------------------------------------------------------------ operator: watermarks, pins, top

    def enforce_watermarks(self, budget_bytes: int = 64 << 20) -> int:
        """Background demotion (a periodic chore): above dram.high_watermark, evict down to low.

        Evicts like a full arena would (policy order, leaf-first, pinned pages stay), demoting to
        disk. Frees at most `budget_bytes` per call so the loop stays responsive, and stops before
        the disk queue (disk.max_pending_bytes) would have to drop a demotion: background work waits
        for the disk rather than losing pages. Returns the pages evicted.
        """
        cap = self.allocator.capacity
        if self.allocator.used_bytes <= self.cfg.dram.high_watermark * cap:
            return 0
        target = self.cfg.dram.low_watermark * cap
        largest = max((info.ns.page_bytes for info in self.namespaces.values()), default=0)
        freed = evicted = 0
        while self.allocator.used_bytes > target and freed < budget_bytes:
            if self.disk is not None and self.pending_bytes + largest > self.cfg.disk.max_pending_bytes:
                break
            before = self.allocator.used_bytes
            if not self._evict_one(None, "watermark"):
                break
            freed += before - self.allocator.used_bytes
            evicted += 1
        return evicted

    def _count_prefix_hit(self, first_key: bytes, pages: int) -> None:
        hits = self.prefix_hits
        hits[first_key] += pages
        if len(hits) > 4096:  # bounded: keep the hottest half
            self.prefix_hits = Counters(dict(hits.most_common(2048)))

    def _roots(self) -> dict[bytes, bytes]:
        """key -> key of the first DRAM page of its chain, for every READY page in DRAM."""
        root_of: dict[bytes, bytes] = {}
        get = self.index.get
        for page in self.index:
            if page.state != READY or page.key in root_of:
                continue
            path = [page.key]
            on_path = {page.key}
            node = page
            while True:
                parent = get(node.parent) if node.parent is not None else None
                # parents that loop back (an engine may reserve a key under its own descendant) end it
                if parent is None or parent.state != READY or parent.key in on_path:
                    root = node.key
                    break
                if parent.key in root_of:
                    root = root_of[parent.key]
                    break
                path.append(parent.key)
                on_path.add(parent.key)
                node = parent
            for key in path:
                root_of[key] = root
        return root_of

    def _subtree(self, roots: list[bytes]) -> list[Page]:
        """READY DRAM pages that are one of `roots` or descend from one; parents before children."""
        children: dict[bytes, list[Page]] = {}
        for page in self.index:
            if page.state == READY and page.parent is not None:
                children.setdefault(page.parent, []).append(page)
        out: list[Page] = []
        seen: set[bytes] = set()
        queue: list[bytes] = []
        for key in roots:
            if key in seen:
                continue
            seen.add(key)
            page = self.index.get(key)
            if page is not None and page.state == READY:
                out.append(page)
            queue.append(key)
        while queue:
            key = queue.pop()
            for child in children.get(key, ()):
                if child.key not in seen:
                    seen.add(child.key)
                    out.append(child)
                    queue.append(child.key)
        # depth-first pops can put a child before a sibling's subtree, never before its parent
        return out

    def pin(self, roots: list[bytes]) -> dict[str, int]:
        """Keep the DRAM pages of these prefixes (each key and everything after it) from eviction.

        Pins only what is in DRAM now (load a prefix first to bring its disk pages up). Operator pins
        may hold at most half of the arena, so engines always keep room to store.
        """
        pages = [p for p in self._subtree(roots) if p.key not in self.operator_pins]
        held = sum(slot_size(p.size) for p in self.operator_pins.values())
        adding = sum(slot_size(p.size) for p in pages)
        limit = self.allocator.capacity // 2
        if held + adding > limit:
            raise NoSpaceError(
                f"pinning {len(pages)} more pages ({adding} bytes) would hold {held + adding} bytes of DRAM "
                f"pinned; operator pins may hold at most half the arena ({limit} bytes)"
            )
        for page in pages:
            page.pins += 1
            self.operator_pins[page.key] = page
        self.counters["operator_pins"] += len(pages)
        return {"pinned_pages": len(pages), "pinned_bytes": sum(p.size for p in pages)}

    def unpin(self, roots: list[bytes]) -> int:
        """Release operator pins on these prefixes. Returns the pages unpinned."""
        released = 0
        for page in self._subtree(roots):
            if self.operator_pins.pop(page.key, None) is not None:
                page.pins -= 1
                released += 1
        return released

    def evict_prefixes(self, roots: list[bytes]) -> dict[str, int]:
        """Evict these prefixes from DRAM now (demoting to disk), leaves first.

        Pages pinned (by a lease or an operator pin) stay, and so do their ancestors.
        """
        evicted = freed = kept = 0
        for page in reversed(self._subtree(roots)):
            if page.pins or page.children or page.state != READY:
                kept += 1
                continue
            self.policy.remove(page)
            self._demote(page)
            self.index.remove(page.key)
            self.allocator.free(page.offset, slot_size(page.size))
            self.counters["evicted_pages_dram_operator"] += 1
            self.counters["evicted_bytes_dram"] += page.size
            evicted += 1
            freed += page.size
        return {"evicted_pages": evicted, "freed_bytes": freed, "kept_pages": kept}

    def _namespace_totals(self) -> dict[int, dict[str, Any]]:
        self.fold_thread_lookups()
        out: dict[int, dict[str, Any]] = {}
        for info in self.namespaces.values():
            out[info.id] = {
                "model": info.ns.model,
                "page_tokens": info.ns.page_tokens,
                "page_bytes": info.ns.page_bytes,
                "cache_salt": bool(info.ns.cache_salt),
                "sessions": 0,
                "lookup_pages": info.lookup_pages,
                "hit_pages": info.hit_pages,
                "stored_pages": info.stored_pages,
                "loaded_pages": info.loaded_pages,
            }
        for s in self.sessions.values():
            t = out[s.ns.id]
            t["sessions"] += 1
            t["lookup_pages"] += s.lookup_pages
            t["hit_pages"] += s.hit_pages
            t["stored_pages"] += s.stored_pages
            t["loaded_pages"] += s.loaded_pages
        return out

    async def top(self, limit: int) -> dict[str, Any]:
        """The largest namespaces, and prefixes (DRAM chains by first page) by bytes and by hits.

        `hits` of a prefix are the pages loaded by requests starting in it. The disk tier's share per
        namespace is counted in the I/O pool, off the event loop.
        """
        totals = self._namespace_totals()
        for t in totals.values():
            t.update(dram_pages=0, dram_bytes=0, disk_pages=0, disk_bytes=0)
        root_of = self._roots()
        prefixes: dict[bytes, dict[str, Any]] = {}
        for page in self.index:
            if page.state != READY:
                continue
            t = totals.get(page.ns)
            if t is not None:
                t["dram_pages"] += 1
                t["dram_bytes"] += page.size
            root = root_of[page.key]
            pr = prefixes.get(root)
            if pr is None:
                info = self._ns_by_id[page.ns]
                pr = prefixes[root] = {
                    "key": root,
                    "model": info.ns.model,
                    "pages": 0,
                    "bytes": 0,
                    "pinned_pages": 0,
                    "hits": 0,
                }
            pr["pages"] += 1
            pr["bytes"] += page.size
            if page.key in self.operator_pins:
                pr["pinned_pages"] += 1
        for key, n in self.prefix_hits.items():
            pr = prefixes.get(root_of.get(key, key))
            if pr is not None:
                pr["hits"] += n
        if self.disk is not None:
            by_digest = await asyncio.get_running_loop().run_in_executor(
                self.executor, _disk_by_namespace, self.disk
            )
            for digest, (pages, nbytes) in by_digest.items():
                info = self.namespaces.get(digest)
                if info is not None:
                    totals[info.id]["disk_pages"] += pages
                    totals[info.id]["disk_bytes"] += nbytes
        namespaces = sorted(
            totals.values(), key=lambda t: (t["dram_bytes"] + t["disk_bytes"], t["hit_pages"]), reverse=True
        )
        by_bytes = sorted(prefixes.values(), key=lambda p: (p["bytes"], p["hits"]), reverse=True)[:limit]
        by_hits = sorted(prefixes.values(), key=lambda p: (p["hits"], p["bytes"]), reverse=True)[:limit]
        chosen = {p["key"]: p for p in by_bytes + by_hits}
        return {
            "namespaces": namespaces[:limit],
            "prefixes": list(chosen.values()),
            "prefix_count": len(prefixes),
        }

    # ------------------------------------------------------------------ drain

    async def drain(self) -> dict[str, int]:
        """Stop taking new pages; write every DRAM page that is not on disk yet; flush the disk index."""
        self.draining = True
        written = 0
        if self.vram is not None:  # L1 pages go down to DRAM first, and from there to disk below
            await self.demote_vram(everything=True)
        if self.disk is not None:
            for page in self.index:
                if page.state == READY and not page.on_disk and page.key not in self.pending:
                    info = self._ns_by_id[page.ns]
                    while (
                        self._disk_writes and self.pending_bytes + page.size > self.cfg.disk.max_pending_bytes
                    ):
                        # bounded like demotions: never a second copy of the whole arena in memory
                        await asyncio.wait(list(self._disk_writes), return_when=asyncio.FIRST_COMPLETED)
                    if page.state != READY or page.key in self.pending:
                        continue  # evicted or being written while we waited
                    data = bytes(self.arena[page.offset : page.offset + page.size])
                    item = PendingDemotion(data, info.digest, page.parent, info.ns.itemsize)
                    self.pending[page.key] = item
                    self.pending_bytes += page.size
                    self._write_to_disk(page.key, item)
                    written += 1
            await self.flush()
        log.info("drained: %d pages written to disk; new stores are refused until `polarkvd resume`", written)
        return {"written_pages": written, "dram_pages": self.index.ready_pages}

    async def flush(self) -> None:
        """Wait for queued disk writes and persist the disk index."""
        while self._disk_writes:
            await asyncio.gather(*list(self._disk_writes), return_exceptions=True)
        if self.disk is not None:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.disk.flush_index)

    def resume(self) -> None:
        self.draining = False

    # ------------------------------------------------------------------ status

    def namespace_digest(self, ns_id: int) -> bytes:
        return self._ns_by_id[ns_id].digest

    @staticmethod
    def unpin_page(page: Page) -> None:
        page.pins -= 1

    def tier_space(self) -> dict[str, tuple[int, int]]:
        """(used, capacity) bytes per tier: what a cluster member publishes to its peers."""
        out = {"dram": (self.allocator.used_bytes, self.allocator.capacity)}
        if self.vram is not None:
            out["vram"] = (self.vram.slots.used_bytes, self.vram.capacity)
        if self.disk is not None:
            d = self.disk.stats()
            out["disk"] = (d.stored_bytes, d.capacity_bytes)
        return out

    def _vram_stats(self, pool: Any) -> dict[str, Any]:
        host = self.vram_host
        return {
            "tier": int(Tier.VRAM),
            "pages": self.index.vram_pages,
            "bytes": self.index.vram_bytes,
            "reserved_pages": sum(
                bool(p.state & VRAM) for s in self.sessions.values() for p in s.reserved.values()
            ),
            "slot_bytes_used": pool.slots.used_bytes,
            "capacity_bytes": pool.capacity,
            "policy": self.vram_policy.name,  # type: ignore[union-attr]
            "pinned_pages": sum(
                bool(p.state & VRAM)
                for s in self.sessions.values()
                for lease in s.leases.values()
                for p in lease.pages
            ),
            "high_watermark": self.cfg.vram.high_watermark,
            "low_watermark": self.cfg.vram.low_watermark,
            "device": pool.info.name,
            "pinned_host": bool(host is not None and host.pinned),  # demotions by DMA from page-locked DRAM
            "batches": pool.batches,
            "sessions": sum(s.vram for s in self.sessions.values()),
        }

    def stats(self) -> dict[str, Any]:
        self.fold_thread_lookups()
        dram = {
            "tier": int(Tier.DRAM),
            "pages": self.index.ready_pages,
            "bytes": self.index.ready_bytes,
            "reserved_pages": sum(
                not p.state & VRAM for s in self.sessions.values() for p in s.reserved.values()
            ),
            "quarantined_pages": sum(len(s.quarantined) for s in self.sessions.values()),
            "slot_bytes_used": self.allocator.used_bytes,
            "capacity_bytes": self.allocator.capacity,
            "policy": self.policy.name,
            "pinned_pages": sum(
                not p.state & VRAM
                for s in self.sessions.values()
                for lease in s.leases.values()
                for p in lease.pages
            ),
            "operator_pinned_pages": len(self.operator_pins),
            "high_watermark": self.cfg.dram.high_watermark,
            "low_watermark": self.cfg.dram.low_watermark,
        }
        if self.table is not None:
            t = self.table
            dram["lookup_table"] = {
                "entries": t.capacity,
                "used": t.used,
                "deleted": t.deleted,
                "full": t.overflow,
            }
        tiers = {"dram": dram}
        if self.vram is not None:
            pool = self.vram
            tiers = {"vram": self._vram_stats(pool), "dram": dram}  # in tier order
        if self.disk is not None:
            d = self.disk.stats()
            tiers["disk"] = {
                "tier": int(Tier.DISK),
                "pages": d.pages,
                "bytes": d.stored_bytes,
                "raw_bytes": d.raw_bytes,
                "capacity_bytes": d.capacity_bytes,
                "policy": self.cfg.disk.policy,
                "evictions": d.evictions,
                "corrupt_dropped": d.corrupt_dropped,
                "pending_pages": len(self.pending),
                "pending_bytes": self.pending_bytes,
                "write_through": self.cfg.disk.write_through,
                "write_through_bytes": self.write_through_bytes,
                "path": str(self.cfg.disk.path),
            }
        dmp = self.cluster.dmp if self.cluster is not None else None
        if dmp is not None:
            tiers["dmp"] = {
                "tier": int(Tier.DMP),
                "pages": len(dmp),
                "bytes": dmp.ready_bytes,
                "capacity_bytes": dmp.capacity,
                "policy": "lru",
                **dmp.stats,
            }
        sessions = [
            {
                "id": s.id,
                "engine_id": s.engine_id,
                "model": s.ns.ns.model,
                "page_bytes": s.ns.ns.page_bytes,
                "cache_salt": bool(s.ns.ns.cache_salt),
                "reserved_pages": len(s.reserved),
                "leases": len(s.leases),
                "lookup_pages": s.lookup_pages,
                "hit_pages": s.hit_pages,
                "stored_pages": s.stored_pages,
                "loaded_pages": s.loaded_pages,
            }
            for s in self.sessions.values()
        ]
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "draining": self.draining,
            "tiers": tiers,
            "counters": dict(self.counters),
            "sessions": sessions,
            "leases": sum(len(s.leases) for s in self.sessions.values()),
            "namespaces": len(self.namespaces),
            "namespace_stats": list(self._namespace_totals().values()),
            "tuning_file": self.cfg.daemon.tuning_file,
        }


def _disk_by_namespace(disk: Any) -> dict[bytes, tuple[int, int]]:
    """(pages, stored bytes) per namespace digest on the disk tier; runs in the I/O pool."""
    out: dict[bytes, list[int]] = {}
    for key in disk.keys():
        entry = disk.entry(key)
        if entry is not None:
            acc = out.setdefault(entry.ns, [0, 0])
            acc[0] += 1
            acc[1] += entry.stored_bytes
    return {k: (v[0], v[1]) for k, v in out.items()}
