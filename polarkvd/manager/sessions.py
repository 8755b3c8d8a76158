"""Sessions and leases: attaching and detaching engines (and forgetting namespaces nobody
uses), the leases that pin loaded pages, and expiry of what unresponsive engines hold.

A part of the manager (polarkvd/manager/__init__.py): it holds no state of its own beyond what
is named here; the shared state is the manager's.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from polarkvd.errors import (
    NamespaceError,
    NoSpaceError,
    PageNotFound,
)
from polarkvd.index import (
    VRAM,
    Page,
)
from polarkvd.keys import namespace_digest
from polarkvd.manager.events import NamespaceKnown
from polarkvd.manager.records import Lease, NamespaceInfo, Session, unpin_all
from polarkvd.tiers.dram import slot_size
from polarkvd.types import Namespace

if TYPE_CHECKING:
    from polarkvd.manager import Manager

log = logging.getLogger(__name__)


class Attachments:
    """Sessions and their leases."""

    def __init__(self, m: Manager) -> None:
        self.m = m

    def attach(self, ns: Namespace, engine_id: str, vram: bool = False) -> Session:
        """A new session. `vram`: the engine can use L1 (its process has CUDA); it is granted when
        this daemon has a pool and a page of the namespace fits one of its slabs."""
        problems = ns.problems()
        if problems:
            raise NamespaceError("invalid namespace: " + "; ".join(problems))
        slot = slot_size(ns.page_bytes)
        if not self.m.allocator.fits(slot):
            raise NoSpaceError(
                f"a page of this namespace is {ns.page_bytes} bytes, larger than dram.slab_bytes "
                f"({self.m.allocator.slab_bytes}); raise dram.slab_bytes or use smaller pages"
            )
        digest = namespace_digest(ns, self.m.seed)
        info = self.m.namespaces.get(digest)
        if info is None:
            info = NamespaceInfo(next(self.m._ns_ids), ns, digest, slot)
            self.m.namespaces[digest] = info
            self.m._ns_by_id[info.id] = info
            if self.m.disk is not None and self.m.events.wanted:
                # its pages on our disk can be promoted for peers from now on
                self.m.events.emit(NamespaceKnown(digest))
            if self.m.table is not None and self.m.disk is not None:
                self.m.table_upkeep.list_disk_pages(info)
        self.m._idle_ns.discard(digest)
        session = Session(next(self.m._ids), engine_id, info)
        session.vram = vram and self.m.vram is not None and self.m.vram.slots.slabs.fits(slot)
        if self.m.table is not None:
            session.table_slot = self.m.table.claim_slot(session.id)
            if session.table_slot is not None:
                self.m.table.set_final(session.table_slot, self.m.table_upkeep.final_miss(info))
        self.m.sessions[session.id] = session
        self.m.counters["sessions_attached"] += 1
        log.info(
            "engine %r attached as session %d (model %.200s, %d-byte pages%s)",
            engine_id,
            session.id,
            ns.model,
            ns.page_bytes,
            ", L1" if session.vram else "",
        )
        return session

    def detach(self, session: Session) -> None:
        """The engine went away: abort its reservations, drop its leases."""
        if self.m.sessions.pop(session.id, None) is None:
            return
        self.m.lookups.fold_thread_lookups(session)  # its connection thread has ended: the tally is final
        if session.table_slot is not None:
            self.m.table.release_slot(session.table_slot)  # type: ignore[union-attr]
            session.table_slot = None
        if session.reserved:
            self.m.store.abort_reserved(session, list(session.reserved))
        for lease in list(session.leases.values()):
            self._drop_lease(lease)
        for offset, slot_bytes, in_vram in session.quarantined:
            if in_vram:
                self.m.vram.free(offset)  # type: ignore[union-attr]
            else:
                self.m.allocator.free(offset, slot_bytes)
        session.quarantined.clear()
        info = session.ns
        info.lookup_pages += session.lookup_pages
        info.hit_pages += session.hit_pages
        info.stored_pages += session.stored_pages
        info.loaded_pages += session.loaded_pages
        log.info("session %d (%r) detached", session.id, session.engine_id)
        if all(s.ns is not info for s in self.m.sessions.values()):
            self.m._idle_ns.add(info.digest)
            self.forget_idle_namespaces()

    def forget_idle_namespaces(self) -> int:
        """Forget the namespaces no session uses that hold no page in L1 or DRAM (in any state) and
        none queued for disk: a client making up namespaces must not grow the daemon. Their pages
        on disk stay and are found again (listed anew) when an engine attaches to it again; their
        per-namespace stats go. With a cluster every namespace is kept: peers ask for its pages.
        Returns how many were forgotten."""
        if not self.m._idle_ns or self.m.cluster is not None:
            return 0
        queued = {item.ns_digest for item in self.m.pending.values()} if self.m.pending else set()
        forgotten = 0
        for digest in list(self.m._idle_ns):
            info = self.m.namespaces.get(digest)
            if info is not None and (info.id in self.m.index.ns_pages or digest in queued):
                continue
            self.m._idle_ns.discard(digest)
            if info is None:
                continue
            del self.m.namespaces[digest]
            del self.m._ns_by_id[info.id]
            self.m._disk_listed.discard(info.id)
            forgotten += 1
        self.m.counters["namespaces_forgotten"] += forgotten
        return forgotten

    def release(self, session: Session, lease_id: int) -> int:
        lease = session.leases.get(lease_id)
        if lease is None:
            raise PageNotFound(f"no lease {lease_id} in this session (expired or released)")
        return self._drop_lease(lease)

    def new_lease(self, session: Session, pages: list[Page]) -> Lease:
        for page in pages:
            page.pins += 1
        lease = Lease(next(self.m._ids), session, pages, self.m.clock() + self.m.cfg.daemon.lease_seconds)
        session.leases[lease.id] = lease
        return lease

    def _drop_lease(self, lease: Lease) -> int:
        lease.session.leases.pop(lease.id, None)
        if lease.progress is not None:
            lease.progress.close()
        unpin_all(lease.pages)
        return len(lease.pages)

    def expire(self) -> int:
        """Drop leases and reservations older than the lease time. Returns how many expired.

        Only engines that stay connected but stop answering get here (a closed connection lets go at
        once). An expired lease unpins its pages: the engine learns it when its `release` fails, and the
        client then discards what it copied. An expired reservation disappears from the index, but its
        slot stays out of use until the engine disconnects: a slow writer must never scribble over a
        page that someone else owns meanwhile.
        """
        now = self.m.clock()
        lease_time = self.m.cfg.daemon.lease_seconds
        expired = 0
        for session in list(self.m.sessions.values()):
            for lease in list(session.leases.values()):
                if lease.expires <= now:
                    self._drop_lease(lease)
                    expired += 1
            if session.reserved and session.reserved_at + lease_time <= now:
                for key, page in list(session.reserved.items()):
                    del session.reserved[key]
                    self.m.index.remove(key)
                    session.quarantined.append((page.offset, session.ns.slot_bytes, bool(page.state & VRAM)))
                    expired += 1
        if expired:
            self.m.counters["expired"] += expired
            log.info("expired %d leases/reservations of unresponsive engines", expired)
        return expired
