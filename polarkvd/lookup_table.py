"""The shared lookup table: the DRAM page index, readable by engines without a round trip.

A lookup is the engine's most frequent call (the scheduler asks it for every new request) and it
changes nothing, so the daemon publishes which keys have a READY page in DRAM in a hash table in
shared memory, in the tail of the arena file the engines map already, and the client library
probes it in-process: no socket, no wakeup of the daemon, no dependence on how busy its threads
are. The daemon's event loop is the only writer of the table; engines write only their own
*session slot* (lookup counts and touched entries, folded into the daemon's counters and eviction
order as the connection-thread tallies are). Loads stay authoritative: a table hit is a hint, and a
page evicted a moment after the probe is a short load, exactly as after a socket lookup.

Layout (little-endian), at `offset` in the arena file, page-aligned so that a lookup-only client
maps just this part:

    header   4096 B   magic, capacity, session slots, heartbeat, state, overflow, has_vram (u8 at 32:
                      1 while any entry is in L1, so an all-DRAM probe never reads tier bytes)
    entries  capacity x 32 B, open addressing with linear probing from the key's first 8 bytes
             (keys are xxh3-128 digests: uniform); deleted entries become tombstones
             [flags u32: 0 empty, 1 live, 2 deleted][key 16 B][ns u32][tier u8: 1 VRAM, 2 DRAM][spare 7 B]
    slots    session_slots x 1024 B
             [owner u32][pad u32][lookups u64][pages u64][hits u64][touch head u64][vram hits u64]...
             [touch ring: 240 x u32 offsets of entries hit, from byte 64]

The tier byte is written with the key, before the flags; a page moving from L1 to DRAM has its tier
byte rewritten in place (one byte store: a reader sees the old or the new tier, both true a moment
apart; the load that follows is authoritative). L1 pages are in the table so that a miss in it stays
final (docs/DESIGN-NOTES.md, "Engines answer their own lookups from a shared table").

Consistency without locks: the writer stores an entry's key and namespace first and its flags
last (x86 keeps stores in order), and a reader compares flags, key and namespace in one 24-byte
copy. Whatever order that copy's loads take, a hit needs all 16 key bytes to equal the wanted key:
a copy torn between an old and a new key would have to match it in 8 bytes of each, a 64-bit
collision. So a reader sees an entry as it was at some moment of the probe: a page that goes a
moment later is a short load (as after a socket lookup), a page that is not in the table is a miss
(a recompute), and never is a key reported that the table did not hold.

Liveness: the daemon writes CLOCK_MONOTONIC into `heartbeat` every 100 ms and sets `state` to 0 when
it stops or rebuilds the table. A client that finds the table closed or its heartbeat older than
`STALE_NS` asks the daemon over the socket instead, so a daemon that died (or a restarted one, which
created a new arena file) is never answered for by a frozen table.
"""

from __future__ import annotations

import array
import logging
import mmap
import os
import struct
import time
from collections.abc import Sequence
from typing import Any

MAGIC = b"PKVLKT01"
HEADER_BYTES = 4096
ENTRY_BYTES = 32
SLOT_BYTES = 1024
RING_AT = 64  # where a session slot's touch ring starts
RING_ENTRIES = (SLOT_BYTES - RING_AT) // 4
STALE_NS = 1_000_000_000  # a heartbeat older than this: the daemon is not keeping the table
HEARTBEAT_SECONDS = 0.1
MAX_LOAD = 0.75  # above this share of live + deleted entries, inserts are refused (overflow)

EMPTY, LIVE, TOMBSTONE = 0, 1, 2

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<8sIIQII")  # magic, capacity, slots, heartbeat, state, overflow
_HEARTBEAT_AT = 16
_STATE_AT = 24
_OVERFLOW_AT = 28
_HAS_VRAM_AT = 32
_TIER_AT = 24  # in an entry
_VRAM_HITS_AT = 40  # in a session slot
TIER_VRAM, TIER_DRAM = 1, 2  # = types.Tier.VRAM, Tier.DRAM (this module imports no other)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_TALLY = struct.Struct("<QQQ")  # lookups, pages, hits (at byte 8 of a slot)
_ENTRY_TAIL = struct.Struct("<16sIB")  # key, ns, tier (at byte 4 of an entry)
_LIVE_FLAGS = _U32.pack(LIVE)


def table_entries(dram_capacity: int, setting: int = 0) -> int:
    """Entries for a DRAM tier of `dram_capacity` bytes: `setting` rounded up to a power of two, or
    (0 = auto) room for twice as many 64 KiB pages as fit, between 4096 and 4 Mi entries (128 MiB)."""
    want = setting if setting > 0 else min(max(2 * dram_capacity // (64 << 10), 4096), 4 << 20)
    return 1 << max(want - 1, 1).bit_length()


def table_bytes(entries: int, session_slots: int) -> int:
    """Bytes of a table, rounded up to whole pages."""
    raw = HEADER_BYTES + entries * ENTRY_BYTES + session_slots * SLOT_BYTES
    return -(-raw // mmap.PAGESIZE) * mmap.PAGESIZE


def _home(key: bytes, mask: int) -> int:
    return int.from_bytes(key[:8], "little") & mask


class LookupTable:
    """The daemon's side: the only writer of entries, the reader of session slots. Loop only."""

    def __init__(self, view: memoryview, entries: int, session_slots: int, *, clear: bool = True) -> None:
        """`clear=False` attaches to a table already in `view` without wiping it (its counts start at
        zero): a second writer process in the tests, never two in the daemon."""
        if entries & (entries - 1):
            raise ValueError("table entries must be a power of two")
        if len(view) < table_bytes(entries, session_slots):
            raise ValueError("view too small for the lookup table")
        self.view = view
        self.capacity = entries
        self.mask = entries - 1
        self.session_slots = session_slots
        self.slots_at = HEADER_BYTES + entries * ENTRY_BYTES
        self.used = 0  # live entries
        self.vram_used = 0  # live entries of pages in L1
        self.deleted = 0  # tombstones
        self.overflow = False
        self.rebuild_needed = False  # so many tombstones, or an overflow with room again: `rebuild`
        self._warned = False  # an overflow is logged once per daemon run
        self._free_slots = list(range(session_slots - 1, -1, -1))
        self._touch_tails: dict[int, int] = {}
        if clear:
            view[: self.slots_at] = bytes(self.slots_at)  # a reused file never shows old entries
            _HEADER.pack_into(view, 0, MAGIC, entries, session_slots, time.monotonic_ns(), 1, 0)

    # -- liveness ---------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        _U64.pack_into(self.view, _HEARTBEAT_AT, time.monotonic_ns())

    def close(self) -> None:
        """Clients stop trusting the table at once (the daemon is stopping)."""
        _U32.pack_into(self.view, _STATE_AT, 0)

    # -- entries ----------------------------------------------------------------------------------

    def _write(self, at: int, flags: int, key: bytes, ns: int, tier: int = TIER_DRAM) -> None:
        _ENTRY_TAIL.pack_into(self.view, at + 4, key, ns, tier)  # key first, flags last: see the docstring
        _U32.pack_into(self.view, at, flags)

    def _count_vram(self, delta: int) -> None:
        before = self.vram_used
        self.vram_used += delta
        if (before == 0) != (self.vram_used == 0):
            self.view[_HAS_VRAM_AT] = 1 if self.vram_used else 0

    def _find(self, key: bytes) -> tuple[int, int]:
        """(entry offset of `key` if live else -1, offset of the first reusable entry on its path)."""
        v, mask = self.view, self.mask
        i = _home(key, mask)
        reusable = -1
        for _ in range(self.capacity):
            at = HEADER_BYTES + i * ENTRY_BYTES
            flags = v[at]
            if flags == EMPTY:
                return -1, (reusable if reusable >= 0 else at)
            if flags == LIVE and v[at + 4 : at + 20] == key:
                return at, reusable
            if flags == TOMBSTONE and reusable < 0:
                reusable = at
            i = (i + 1) & mask
        return -1, reusable

    def put(self, key: bytes, ns: int, tier: int = TIER_DRAM) -> None:
        """`key` has a READY page of namespace `ns` in DRAM (or, `tier` = TIER_VRAM, in L1)."""
        at, free = self._find(key)
        if at >= 0:
            self._count_vram((tier == TIER_VRAM) - (self.view[at + _TIER_AT] == TIER_VRAM))
            self._write(at, LIVE, key, ns, tier)
            return
        if free >= 0 and self.view[free] == TOMBSTONE:
            self.deleted -= 1
        elif free < 0 or self.used + self.deleted + 1 > self.capacity * MAX_LOAD:
            if not self.overflow:  # the page stays loadable; a table miss is just no longer final
                self.overflow = True
                _U32.pack_into(self.view, _OVERFLOW_AT, 1)
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "the shared lookup table is full (%d of %d entries in use): engines now ask the "
                        "daemon about pages it cannot list, which is slower; raise "
                        "dram.lookup_table_entries",
                        self.used + self.deleted, self.capacity,
                    )  # fmt: skip
            self.rebuild_needed = self.deleted > 0
            return
        self._write(free, LIVE, key, ns, tier)
        self.used += 1
        if tier == TIER_VRAM:
            self._count_vram(1)

    def set_tier(self, key: bytes, tier: int) -> None:
        """The READY page of `key` moved between L1 and DRAM: one byte store, the entry stays live."""
        at, _ = self._find(key)
        if at >= 0 and self.view[at + _TIER_AT] != tier:
            self._count_vram((tier == TIER_VRAM) - (self.view[at + _TIER_AT] == TIER_VRAM))
            self.view[at + _TIER_AT] = tier

    def remove(self, key: bytes) -> None:
        """`key` has no READY page in DRAM or L1 any more."""
        at, _ = self._find(key)
        if at >= 0:
            if self.view[at + _TIER_AT] == TIER_VRAM:
                self._count_vram(-1)
            self._write(at, TOMBSTONE, key, 0)
            self.used -= 1
            self.deleted += 1
            if self.deleted > self.capacity // 4 or (
                self.overflow and self.used < self.capacity * MAX_LOAD / 2
            ):
                self.rebuild_needed = True

    def rebuild(self, live: Sequence[tuple[bytes, int] | tuple[bytes, int, int]]) -> None:
        """Start over with exactly `live` (key, ns[, tier]): drops every tombstone. Clients use the socket
        meanwhile (state 0), so none of them sees the table half rebuilt."""
        v = self.view
        _U32.pack_into(v, _STATE_AT, 0)
        start, end = HEADER_BYTES, HEADER_BYTES + self.capacity * ENTRY_BYTES
        v[start:end] = bytes(end - start)
        self.used = self.deleted = 0
        self._count_vram(-self.vram_used)
        self.overflow = False
        self.rebuild_needed = False
        _U32.pack_into(v, _OVERFLOW_AT, 0)
        for item in live:
            self.put(*item)
        _U32.pack_into(v, _STATE_AT, 1)

    def key_at(self, at: int) -> bytes | None:
        """The key of the live entry at table offset `at` (touch rings name entries so), or None."""
        if not HEADER_BYTES <= at < self.slots_at or at % ENTRY_BYTES:
            return None
        return bytes(self.view[at + 4 : at + 20]) if self.view[at] == LIVE else None

    # -- session slots ------------------------------------------------------------------------------

    def claim_slot(self, owner: int) -> int | None:
        """A zeroed slot for session `owner`, or None when all are taken (it then asks the socket)."""
        if not self._free_slots:
            return None
        slot = self._free_slots.pop()
        at = self.slots_at + slot * SLOT_BYTES
        self.view[at : at + SLOT_BYTES] = bytes(SLOT_BYTES)
        _U32.pack_into(self.view, at, owner)
        self._touch_tails[slot] = 0
        return slot

    def release_slot(self, slot: int) -> None:
        at = self.slots_at + slot * SLOT_BYTES
        _U32.pack_into(self.view, at, 0)
        self._touch_tails.pop(slot, None)
        self._free_slots.append(slot)

    def tally(self, slot: int) -> tuple[int, int, int]:
        """(lookups, pages, hit pages) the session has answered from the table so far."""
        return _TALLY.unpack_from(self.view, self.slots_at + slot * SLOT_BYTES + 8)

    def vram_hits(self, slot: int) -> int:
        """Of the tally's hit pages, those that were in L1."""
        return _U64.unpack_from(self.view, self.slots_at + slot * SLOT_BYTES + _VRAM_HITS_AT)[0]

    def touched(self, slot: int) -> list[bytes]:
        """Keys of the entries the session hit since the last call, oldest first (at most a ring)."""
        at = self.slots_at + slot * SLOT_BYTES
        head = _U64.unpack_from(self.view, at + 32)[0]
        tail = self._touch_tails.get(slot, 0)
        if head == tail:
            return []
        tail = max(tail, head - RING_ENTRIES)
        self._touch_tails[slot] = head
        ring = at + RING_AT
        keys = []
        for n in range(tail, head):
            key = self.key_at(_U32.unpack_from(self.view, ring + (n % RING_ENTRIES) * 4)[0])
            if key is not None:
                keys.append(key)
        return keys


class TableReader:
    """The client's side: probes the table for one session. Not thread-safe (like EngineClient)."""

    def __init__(self, buf: Any, ns: int, slot: int, final_miss: bool) -> None:
        self.buf = buf  # a memoryview of the table (or an mmap of just the table)
        magic, capacity, slots, _, _, _ = _HEADER.unpack_from(buf, 0)
        if magic != MAGIC or not 0 <= slot < slots:
            raise ValueError("not a polarkvd lookup table")
        self.mask = capacity - 1
        self.ns = _U32.pack(ns)
        self.final_miss = final_miss  # no disk tier, no cluster: a page not in DRAM is a miss
        self.entries_end = HEADER_BYTES + capacity * ENTRY_BYTES
        self.slot_at = self.entries_end + slot * SLOT_BYTES
        #: after `probe`: the tier byte of each hit, or None when every hit is in DRAM
        self.last_tiers: bytes | None = None

    def usable(self) -> bool:
        """The daemon keeps the table: open, and its heartbeat is recent."""
        b = self.buf
        if _U32.unpack_from(b, _STATE_AT)[0] != 1:
            return False
        return time.monotonic_ns() - _U64.unpack_from(b, _HEARTBEAT_AT)[0] < STALE_NS

    def probe(self, keys: Sequence[bytes]) -> tuple[int, bool]:
        """(pages of the longest prefix of `keys` in DRAM or L1, whether a miss after them is final);
        the session's tally and touch ring are updated, `last_tiers` says where the hits are (None:
        all in DRAM). Call only when `usable()`. Keys must be bytes (TypeError otherwise); one of
        another length is a miss."""
        b, mask, ns = self.buf, self.mask, self.ns
        homes = array.array("Q", b"".join(keys))[::2]  # each key's first 8 bytes (ValueError: not 16)
        hits: list[int] = []
        for h, key in zip(homes, keys):
            at = HEADER_BYTES + ((h & mask) << 5)
            want = _LIVE_FLAGS + key + ns
            if b[at : at + 24] != want:
                at = self._probe_on(at, want)
                if at < 0:
                    break
            hits.append(at)
        n = len(hits)
        self.last_tiers = None
        if n and b[_HAS_VRAM_AT]:  # only while L1 holds pages: the all-DRAM path reads no tier byte
            codes = bytes([b[h + _TIER_AT] for h in hits])
            if TIER_VRAM in codes:
                self.last_tiers = codes
                at = self.slot_at + _VRAM_HITS_AT
                _U64.pack_into(b, at, _U64.unpack_from(b, at)[0] + codes.count(TIER_VRAM))
        final = n == len(keys) or (self.final_miss and _U32.unpack_from(b, _OVERFLOW_AT)[0] == 0)
        # a lookup that goes on over the socket is counted by the daemon; here only its pages so far
        at = self.slot_at
        lookups, pages, hit_pages = _TALLY.unpack_from(b, at + 8)
        _TALLY.pack_into(b, at + 8, lookups + final, pages + (len(keys) if final else n), hit_pages + n)
        if n:
            hits.reverse()  # leaf first: the root ends up the most recently used
            head = _U64.unpack_from(b, at + 32)[0]
            skip = max(0, n - RING_ENTRIES)  # more than a ring: the newest ones
            data = array.array("I", hits[skip:]).tobytes()
            pos, ring = (head + skip) % RING_ENTRIES, at + RING_AT
            first = min(len(data), (RING_ENTRIES - pos) * 4)
            b[ring + pos * 4 : ring + pos * 4 + first] = data[:first]
            if first < len(data):
                b[ring : ring + len(data) - first] = data[first:]
            _U64.pack_into(b, at + 32, head + n)
        return n, final

    def _probe_on(self, at: int, want: bytes) -> int:
        """Linear probing past the key's home entry: its offset, or -1 at an empty entry."""
        b, end = self.buf, self.entries_end
        for _ in range(self.mask + 1):
            if b[at] == EMPTY:
                return -1
            at += ENTRY_BYTES
            if at >= end:
                at = HEADER_BYTES
            if b[at : at + 24] == want:
                return at
        return -1


def map_table(path: str, offset: int, size: int) -> mmap.mmap:
    """Map just the lookup table of the arena file at `path` (for clients that do not map the arena)."""
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
    finally:
        os.close(fd)
