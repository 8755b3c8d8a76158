"""The manager's records: namespaces, sessions, leases, pending demotions, counters.

Plain data shared by the manager's parts (polarkvd/manager/); no behaviour beyond `unpin_all`.
"""

from __future__ import annotations

import collections
import dataclasses

from polarkvd.index import Page
from polarkvd.transport.pipeline import LoadProgress
from polarkvd.types import Namespace


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
    # hit pages the connection thread's lookups cut (fetch or recompute), and the part folded
    cut_tally: int = 0
    cut_folded: int = 0
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
    depth: int = 0  # the page's depth code (index.depth_of), kept on disk for the `cost` policy


class Counters(collections.Counter[str]):
    """Monotonic event counters; readers take deltas."""


def unpin_all(pages: list[Page]) -> None:
    for page in pages:
        page.pins -= 1
