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
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from polarkvd.config import Config
from polarkvd.index import Page, PageIndex
from polarkvd.keys import SEED_BYTES
from polarkvd.manager.events import EventLog
from polarkvd.manager.l1 import L1Moves
from polarkvd.manager.loads import Loads
from polarkvd.manager.lookups import Lookups
from polarkvd.manager.operator import Operator
from polarkvd.manager.peers import PeerPages
from polarkvd.manager.quotas import Quotas
from polarkvd.manager.records import Counters, Lease, NamespaceInfo, PendingDemotion, Session
from polarkvd.manager.remote import RemoteFetches
from polarkvd.manager.sessions import Attachments
from polarkvd.manager.slab_reclaim import SlabReclaimer
from polarkvd.manager.space import Space
from polarkvd.manager.stats import Reports
from polarkvd.manager.store import Store
from polarkvd.manager.table import TableUpkeep
from polarkvd.manager.worth import Worth
from polarkvd.policy import EvictionPolicy, make_policy
from polarkvd.tiers.disk import DiskTier
from polarkvd.tiers.dram import SlabAllocator
from polarkvd.tiers.group_commit import GroupCommit
from polarkvd.tiers.vram import HostRegion, VramPool
from polarkvd.transport.pipeline import SIGNAL_BOARD_BYTES, SignalBoard
from polarkvd.wire.lookup_table import LookupTable

if TYPE_CHECKING:
    from polarkvd.cluster.pool import ClusterPool

__all__ = ["Counters", "Lease", "Manager", "NamespaceInfo", "PendingDemotion", "Session"]

log = logging.getLogger(__name__)


class Manager:
    """What lives where: the state every part shares, the parts, and the API bound to them."""

    def __init__(
        self,
        cfg: Config,
        arena: memoryview,
        allocator: SlabAllocator,
        disk: DiskTier | None,
        executor: concurrent.futures.Executor,
        clock: Callable[[], float] = time.monotonic,
        signals: SignalBoard | None = None,
        table: LookupTable | None = None,
        vram: VramPool | None = None,
        vram_host: HostRegion | None = None,
        seed: bytes | None = None,
    ) -> None:
        """`seed`: the page-key seed (seed.py); None draws a random one (in-process tests)."""
        # the parts, each owning one concern (their modules say which); they share this state
        self.attachments = Attachments(self)
        self.lookups = Lookups(self)
        self.table_upkeep = TableUpkeep(self)
        self.store = Store(self)
        self.loads = Loads(self)
        self.fetches = RemoteFetches(self)
        self.l1 = L1Moves(self)
        self.space = Space(self)
        self.operator = Operator(self)
        self.reports = Reports(self)
        self.peers = PeerPages(self)  # what the cluster pool sees of our pages
        self.worth = Worth(self)  # what pages are worth keeping: the `cost` policy's valuer
        self.cfg = cfg
        self.seed = seed if seed is not None else secrets.token_bytes(SEED_BYTES)
        self.arena = arena
        self.allocator = allocator
        self.disk = disk
        self.executor = executor
        self.clock = clock
        self.index = PageIndex()
        # which keys are READY in DRAM, for engines to probe without a round trip (lookup_table.py)
        self.table = self.index.table = table
        self.policy: EvictionPolicy = make_policy(cfg.dram.policy)
        self.worth.attach(self.policy)
        self.namespaces: dict[bytes, NamespaceInfo] = {}
        self._ns_by_id: dict[int, NamespaceInfo] = {}
        self._ns_ids = itertools.count(1)  # never reused: the shared lookup table may hold an old one
        # namespaces without a session that still held pages when the last one left (digests):
        # forgotten once the pages are gone (forget_idle_namespaces)
        self._idle_ns: set[bytes] = set()
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
        self.prefix_hits: collections.Counter[bytes] = (
            collections.Counter()
        )  # first key of a load -> pages loaded (`top`)
        self.write_through_bytes = 0  # write-through copies queued and not yet durable
        # write-through: durable writes of committed pages, synced per batch (tiers/group_commit.py)
        self.group_commit = (
            GroupCommit(
                disk,
                cfg.disk.io_threads,
                lambda: self.cfg.disk.group_commit_window,
                lambda: self.cfg.disk.write_through_sync,
            )
            if disk is not None
            else None
        )
        # readiness slots of pipelined loads: in the arena file's tail in the daemon, private otherwise
        self.signals = signals or SignalBoard(memoryview(bytearray(SIGNAL_BOARD_BYTES)))
        self.cluster: ClusterPool | None = None  # when [cluster] is enabled
        # what happened to pages, for whoever follows them (the cluster's meta map): events.py
        self.events = EventLog()
        self._cluster_tasks: set[asyncio.Future[Any]] = set()  # fetches from and demotions to peers in flight
        self._disk_reads: set[asyncio.Future[Any]] = set()  # layer-group promotions in flight
        # L1: the daemon's GPU page pool (tiers/vram.py VramPool) and the arena registered with it
        # (HostRegion: what demotions copy into), or None. The pool owns bytes; which page is where,
        # and in which order they leave, is decided here, with a policy instance of L1's own.
        self.vram = vram
        self.vram_host = vram_host
        self.vram_policy: EvictionPolicy | None = make_policy(cfg.vram.policy) if vram is not None else None
        self.worth.attach(self.vram_policy)
        self._vram_task: asyncio.Future[Any] | None = None  # a background demotion in flight
        # Promotion back into L1 (schedule_vram_promotion): DRAM pages that L1 sessions loaded lately,
        # with how often (bounded, the oldest forgotten first), those due for a copy into L1, and
        # the copy in flight.
        self._l1_loads: dict[bytes, int] = {}
        self._l1_due: dict[bytes, None] = {}
        self._vram_promotion: asyncio.Future[Any] | None = None
        # Disk pages in the shared lookup table (tier DISK): a page leaving DRAM and L1 keeps its
        # entry while a copy is on disk or queued for it (`table_upkeep.held_on_disk`); disk writes and
        # removals bring the entry in line (`table_upkeep.sync_disk_entry`); a namespace's pages already on
        # disk are listed when it becomes known (`table_upkeep.list_disk_pages`). Misses of a namespace are
        # final only once it is listed (`final_miss`).
        self._disk_listed: set[int] = set()  # namespace ids
        self._table_tasks: set[asyncio.Future[Any]] = set()  # listings in flight
        self._refilling = False  # a rebuild's disk entries are going back in (no rebuild meanwhile)
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # in-process tests: no loop, disk events are applied where they happen
            self._loop = None
        self.reclaim = SlabReclaimer(self)  # room for a page size that has none (two models)
        self.index.claim = allocator.claim
        self.quotas = Quotas(cfg.quotas)  # per-tenant DRAM and disk limits (quotas.py)
        if disk is not None:
            disk.set_valuer(self.worth.disk_value)  # the disk tier's `cost` policy
            disk.quota_of = self.quotas.disk_quota
            disk.on_removed = (
                self.table_upkeep.disk_removed
            )  # the manager owns it; the cluster pool is told too
            if table is not None:
                self.index.held_on_disk = self.table_upkeep.held_on_disk
        # the API the servers, the daemon and the cluster pool call: bound to the part that owns it
        self.attach = self.attachments.attach
        self.detach = self.attachments.detach
        self.forget_idle_namespaces = self.attachments.forget_idle_namespaces
        self.probe = self.lookups.probe
        self.lookup = self.lookups.lookup
        self.lookup_in_thread = self.lookups.lookup_in_thread
        self.apply_touches = self.lookups.apply_touches
        self.apply_table_touches = self.lookups.apply_table_touches
        self.fold_thread_lookups = self.lookups.fold_thread_lookups
        self.final_miss = self.table_upkeep.final_miss
        self.reserve = self.store.reserve
        self.reserve_in = self.store.reserve_in
        self.commit = self.store.commit
        self.commit_pages = self.store.commit_pages
        self.abort = self.store.abort
        self.load = self.loads.load
        self.load_pipelined = self.loads.load_pipelined
        self.lookup_remote = self.lookups.lookup_remote
        self.release = self.attachments.release
        self.expire = self.attachments.expire
        self.schedule_vram_demotion = self.l1.schedule_vram_demotion
        self.demote_vram = self.l1.demote_vram
        self.schedule_vram_promotion = self.l1.schedule_vram_promotion
        self.evict_bytes = self.space.evict_bytes
        self.evict_disk = self.space.evict_disk
        self.evict_vram = self.l1.evict_vram
        self.set_policy = self.space.set_policy
        self.enforce_watermarks = self.space.enforce_watermarks
        self.pin = self.operator.pin
        self.unpin = self.operator.unpin
        self.evict_prefixes = self.operator.evict_prefixes
        self.top = self.operator.top
        self.drain = self.space.drain
        self.flush = self.space.flush
        self.resume = self.space.resume
        self.tier_space = self.reports.tier_space
        self.stats = self.reports.stats

    def namespace_digest(self, ns_id: int) -> bytes:
        return self._ns_by_id[ns_id].digest
