"""The manager: what lives where, and every state change of a page.

It owns policy: the DRAM page index, eviction (leaf-first, through a pluggable policy), demotion of
evicted pages to disk, promotion of disk hits back into DRAM, sessions with their reservations and
leases, and the counters everyone reads. It owns no bytes (the arena and the disk tier do) and no
sockets (the servers do). Everything here runs on the daemon's event loop thread; only disk I/O runs
in the I/O thread pool, and its results come back to the loop before any index changes.

Page life cycle in DRAM:  reserve -> RESERVED --commit--> READY --evict--> (demoted to disk) gone
                                            \\--abort / engine gone / lease expiry--> gone
                          load of a disk page -> PROMOTING --read ok--> READY (pinned by the load)
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from polarkvd.config import Config
from polarkvd.errors import (
    ErrorCode,
    NamespaceError,
    NoSpaceError,
    PageCorrupt,
    PageNotFound,
    PolarKVError,
    ProtocolError,
)
from polarkvd.index import PROMOTING, READY, RESERVED, Page, PageIndex
from polarkvd.keys import namespace_digest
from polarkvd.policy import EvictionPolicy, make_policy, switch_policy
from polarkvd.server.protocol import RESERVE_EXISTS, RESERVE_NO_SPACE
from polarkvd.tiers.dram import SlabAllocator, slot_size
from polarkvd.types import Namespace, Tier

log = logging.getLogger(__name__)


@dataclasses.dataclass
class NamespaceInfo:
    id: int
    ns: Namespace
    digest: bytes
    slot_bytes: int


@dataclasses.dataclass
class Lease:
    id: int
    session: Session
    pages: list[Page]
    expires: float


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
    quarantined: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    hit_pages: int = 0
    lookup_pages: int = 0
    stored_pages: int = 0
    loaded_pages: int = 0


@dataclasses.dataclass
class PendingDemotion:
    """A page evicted from DRAM whose disk write has not finished: still a hit, served from memory."""

    data: bytes
    ns_digest: bytes
    parent: bytes | None
    itemsize: int


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
    ) -> None:
        self.cfg = cfg
        self.arena = arena
        self.allocator = allocator
        self.disk = disk
        self.executor = executor
        self.clock = clock
        self.index = PageIndex()
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
        self.started = time.time()

    # ------------------------------------------------------------------ sessions

    def attach(self, ns: Namespace, engine_id: str) -> Session:
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
        session = Session(next(self._ids), engine_id, info)
        self.sessions[session.id] = session
        self.counters["sessions_attached"] += 1
        log.info(
            "engine %r attached as session %d (model %s, %d-byte pages)",
            engine_id,
            session.id,
            ns.model,
            ns.page_bytes,
        )
        return session

    def detach(self, session: Session) -> None:
        """The engine went away: abort its reservations, drop its leases."""
        if self.sessions.pop(session.id, None) is None:
            return
        if session.reserved:
            self._abort(session, list(session.reserved))
        for lease in list(session.leases.values()):
            self._drop_lease(lease)
        for offset, slot_bytes in session.quarantined:
            self.allocator.free(offset, slot_bytes)
        session.quarantined.clear()
        log.info("session %d (%r) detached", session.id, session.engine_id)

    # ------------------------------------------------------------------ lookup

    def lookup(self, session: Session, keys: list[bytes], pin: bool = False) -> tuple[list[Tier], int | None]:
        """Tiers of the longest cached prefix of `keys`; with `pin`, its DRAM pages under a new lease."""
        hit_pages: list[Page] = []
        tiers: list[Tier] = []
        ns = session.ns
        ns_id = ns.id
        get = self.index.get
        dram, disk = Tier.DRAM, Tier.DISK
        for key in keys:  # the hot path of every request: keep it to dict lookups
            page = get(key)
            if page is not None and page.state == READY and page.ns == ns_id:
                hit_pages.append(page)
                tiers.append(dram)
            elif self._on_disk(key, ns.digest):
                tiers.append(disk)
            else:
                break
        disk_hits = len(tiers) - len(hit_pages)
        hit_pages.reverse()  # leaf first, so the root ends up most recent: leaves are evicted first
        self.policy.touch_many(hit_pages)  # type: ignore[arg-type]
        c = self.counters
        c["lookups"] += 1
        c["lookup_pages"] += len(keys)
        c["hit_pages_dram"] += len(hit_pages)
        c["hit_pages_disk"] += disk_hits
        c["miss_pages"] += len(keys) - len(tiers)
        session.lookup_pages += len(keys)
        session.hit_pages += len(tiers)
        lease = self._new_lease(session, hit_pages).id if pin and hit_pages else None
        return tiers, lease

    def _on_disk(self, key: bytes, digest: bytes) -> bool:
        pending = self.pending.get(key)
        if pending is not None:
            return pending.ns_digest == digest
        if self.disk is None:
            return False
        entry = self.disk.entry(key)
        return entry is not None and entry.ns == digest

    # ------------------------------------------------------------------ store: reserve / commit / abort

    def reserve(self, session: Session, keys: list[bytes], parent: bytes | None) -> list[int]:
        """An arena offset per key to write, or RESERVE_EXISTS / RESERVE_NO_SPACE."""
        if self.draining:
            raise PolarKVError("the daemon is draining and accepts no new pages", code=ErrorCode.DRAINING)
        ns = session.ns
        size = ns.ns.page_bytes
        out: list[int] = []
        prev = parent
        now = self.clock()
        for i, key in enumerate(keys):
            if (
                key in self.index
                or key in self.pending
                or (self.disk is not None and self.disk.entry(key) is not None)
            ):
                out.append(RESERVE_EXISTS)
                prev = key
                continue
            offset = self._alloc(ns.slot_bytes)
            if offset is None:
                self.counters["reserve_no_space"] += len(keys) - i
                out.extend([RESERVE_NO_SPACE] * (len(keys) - i))
                break
            page = Page(key, ns.id, offset, size, prev, RESERVED)
            self.index.add(page)
            session.reserved[key] = page
            out.append(offset)
            prev = key
        session.reserved_at = now
        return out

    def commit(self, session: Session, keys: list[bytes]) -> int:
        _refuse_duplicates(keys, "commit")
        missing = [k for k in keys if k not in session.reserved]
        if missing:
            raise PolarKVError(
                f"{len(missing)} of {len(keys)} keys were not reserved by this session "
                f"(first: {missing[0].hex()}); nothing committed",
                code=ErrorCode.NOT_RESERVED,
            )
        for key in keys:
            page = session.reserved.pop(key)
            self.index.mark_ready(page)
            self.policy.insert(page)
        session.stored_pages += len(keys)
        self.counters["stored_pages"] += len(keys)
        self.counters["stored_bytes"] += len(keys) * session.ns.ns.page_bytes
        return len(keys)

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
            self.allocator.free(page.offset, session.ns.slot_bytes)
        self.counters["aborted_pages"] += len(keys)
        return len(keys)

    # ------------------------------------------------------------------ load / release

    async def load(self, session: Session, keys: list[bytes]) -> tuple[list[int], list[Tier], int | None]:
        """Pin the longest loadable prefix of `keys` in DRAM (promoting disk pages first).

        Returns (arena offsets, source tier of each, lease id). The engine copies the pages out, then
        releases the lease. A page that fails on the way (evicted meanwhile, corrupt on disk) ends the
        prefix there: the engine recomputes from that page on.
        """
        ns = session.ns
        pinned: list[Page] = []
        tiers: list[Tier] = []
        waits: list[tuple[int, asyncio.Future[bool]]] = []
        for key in keys:
            page = self.index.get(key)
            if page is not None and page.state == READY:
                if page.ns != ns.id:
                    self._unpin_all(pinned)
                    raise NamespaceError(f"key {key.hex()} belongs to another namespace")
                page.pins += 1
                pinned.append(page)
                tiers.append(Tier.DRAM)
                continue
            if page is not None and page.state == PROMOTING:
                fut = self._promotions.get(key)
                if fut is None:
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
                break
            promoted = self._start_promotion(ns, key)
            if promoted is None:
                break
            page, fut = promoted
            page.pins += 1
            pinned.append(page)
            tiers.append(Tier.DISK)
            waits.append((len(pinned) - 1, fut))
        if waits:
            results = await asyncio.gather(*(f for _, f in waits))
            for (pos, _), ok in zip(waits, results):
                if not ok:
                    self._unpin_all(pinned[pos:])
                    del pinned[pos:]
                    del tiers[pos:]
                    break
        self.policy.touch_many(pinned[::-1])  # type: ignore[arg-type]
        n = len(pinned)
        self.counters["loads"] += 1
        self.counters["loaded_pages"] += n
        self.counters["loaded_bytes"] += n * ns.ns.page_bytes
        self.counters["loaded_pages_disk"] += tiers.count(Tier.DISK)
        self.counters["load_short_pages"] += len(keys) - n
        session.loaded_pages += n
        if not pinned:
            return [], [], None
        lease = Lease(next(self._ids), session, pinned, self.clock() + self.cfg.daemon.lease_seconds)
        session.leases[lease.id] = lease
        return [p.offset for p in pinned], tiers, lease.id

    def _on_disk_any_ns(self, key: bytes) -> bool:
        return key in self.pending or (self.disk is not None and self.disk.entry(key) is not None)

    def _start_promotion(self, ns: NamespaceInfo, key: bytes) -> tuple[Page, asyncio.Future[bool]] | None:
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
        else:
            io = loop.run_in_executor(self.executor, self.disk.get_into, key, view)
            io.add_done_callback(lambda f: self._finish_promotion(page, fut, f.exception(), on_disk=True))
        return page, fut

    def _finish_promotion(
        self, page: Page, fut: asyncio.Future[bool], error: BaseException | None, *, on_disk: bool
    ) -> None:
        self._promotions.pop(page.key, None)
        if error is None:
            page.on_disk = on_disk
            self.index.mark_ready(page)
            self.policy.insert(page)
            self.counters["promoted_pages"] += 1
            fut.set_result(True)
            return
        if isinstance(error, PageCorrupt):
            self.counters["corrupt_pages"] += 1
            log.warning("disk page %s failed its checksum and was dropped: %s", page.key.hex(), error)
        elif not isinstance(error, PageNotFound):
            log.error("promotion of %s failed: %r", page.key.hex(), error)
        self.counters["promotion_failures"] += 1
        self.index.remove(page.key)
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
                    session.quarantined.append((page.offset, session.ns.slot_bytes))
                    expired += 1
        if expired:
            self.counters["expired"] += expired
            log.info("expired %d leases/reservations of unresponsive engines", expired)
        return expired

    # ------------------------------------------------------------------ space: allocation, eviction, demotion

    def _alloc(self, slot_bytes: int) -> int | None:
        offset = self.allocator.alloc(slot_bytes)
        while offset is None:
            if not self._evict_one(slot_bytes, "capacity"):
                return None
            offset = self.allocator.alloc(slot_bytes)
        return offset

    def _evict_one(self, slot_bytes: int | None, reason: str) -> bool:
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
        """Queue a copy of an evicted page for the disk tier, unless it is there already."""
        if self.disk is None or page.on_disk:
            return
        if self.pending_bytes + page.size > self.cfg.disk.max_pending_bytes:
            self.counters["demotions_dropped"] += 1
            return
        info = self._ns_by_id[page.ns]
        item = PendingDemotion(
            bytes(self.arena[page.offset : page.offset + page.size]),
            info.digest,
            page.parent,
            info.ns.itemsize,
        )
        self.pending[page.key] = item
        self.pending_bytes += page.size
        self._write_to_disk(page.key, item)

    def _write_to_disk(self, key: bytes, item: PendingDemotion) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(
            self.executor, self.disk.put, key, item.parent, item.ns_digest, item.data, item.itemsize
        )
        self._disk_writes.add(fut)

        def done(f: asyncio.Future[Any]) -> None:
            self._disk_writes.discard(f)
            if self.pending.get(key) is item:
                del self.pending[key]
                self.pending_bytes -= len(item.data)
            if f.exception() is not None:
                self.counters["demotion_failures"] += 1
                log.error("writing page %s to disk failed: %r", key.hex(), f.exception())
            elif f.result():
                self.counters["demoted_pages"] += 1
                page = self.index.get(key)
                if page is not None:
                    page.on_disk = True
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

    def set_policy(self, tier: Tier, name: str) -> None:
        if tier is Tier.DRAM:
            if name != self.policy.name:
                self.policy = switch_policy(self.policy, name)
            self.cfg.dram.policy = name
        elif tier is Tier.DISK and self.disk is not None:
            self.disk.set_policy(name)
            self.cfg.disk.policy = name
        log.info("eviction policy of %s is now %s", tier.label, name)

    # ------------------------------------------------------------------ drain

    async def drain(self) -> dict[str, int]:
        """Stop taking new pages; write every DRAM page that is not on disk yet; flush the disk index."""
        self.draining = True
        written = 0
        if self.disk is not None:
            for page in self.index:
                if page.state == READY and not page.on_disk and page.key not in self.pending:
                    info = self._ns_by_id[page.ns]
                    data = bytes(self.arena[page.offset : page.offset + page.size])
                    self._write_to_disk(
                        page.key, PendingDemotion(data, info.digest, page.parent, info.ns.itemsize)
                    )
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

    def stats(self) -> dict[str, Any]:
        dram = {
            "tier": int(Tier.DRAM),
            "pages": self.index.ready_pages,
            "bytes": self.index.ready_bytes,
            "reserved_pages": sum(len(s.reserved) for s in self.sessions.values()),
            "quarantined_pages": sum(len(s.quarantined) for s in self.sessions.values()),
            "slot_bytes_used": self.allocator.used_bytes,
            "capacity_bytes": self.allocator.capacity,
            "policy": self.policy.name,
            "pinned_pages": sum(
                len(lease.pages) for s in self.sessions.values() for lease in s.leases.values()
            ),
        }
        tiers = {"dram": dram}
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
                "path": str(self.cfg.disk.path),
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
        }
