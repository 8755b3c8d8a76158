"""The shared lookup table: which keys the daemon holds, readable by engines without a round trip.

A lookup is the engine's most frequent call (the scheduler asks it for every new request) and it
changes nothing, so the daemon publishes which keys it holds (a READY page in L1 or DRAM, or a copy
on the disk tier or queued for it) in a hash table in shared memory, in the tail of the arena file the engines map already, and the client library
probes it in-process: no socket, no wakeup of the daemon, no dependence on how busy its threads
are. The daemon's event loop is the only writer of the table; engines write only their own
*session slot* (lookup counts and touched entries, folded into the daemon's counters and eviction
order as the connection-thread tallies are). Loads stay authoritative: a table hit is a hint, and a
page evicted a moment after the probe is a short load, exactly as after a socket lookup.

Layout (little-endian), at `offset` in the arena file, page-aligned so that a lookup-only client
maps just this part:

    header   4096 B   magic, capacity, session slots, heartbeat, state, overflow (u32 at 28: 1 while
                      the table may lack a key the daemon holds: it was full, or is being refilled
                      after a rebuild; no miss is final then), not_dram (u8 at 32: 1 while any entry
                      is in L1 or on disk; 0: every hit is in DRAM)
    entries  capacity x 32 B, open addressing with linear probing from the key's first 8 bytes
             (keys are xxh3-128 digests: uniform); deleted entries become tombstones
             [flags u32: 0 empty, 1 live, 2 deleted][key 16 B][ns u32][tier u8: 1 VRAM, 2 DRAM, 4 DISK]
             [spare 7 B]
    slots    session_slots x 1024 B
             [owner u32][pad u32][lookups u64][pages u64][hits u64][touch head u64][vram hits u64]
             [disk hits u64][final u32: the daemon sets 1 once every disk page of the session's
             namespace is listed][pad u32][touch ring: 240 x u32 offsets of entries hit, from byte 64]

The tier byte is written with the key, before the flags; a page changing tier (L1 -> DRAM, DRAM ->
disk when it is evicted with a copy on disk, disk -> DRAM when it is promoted) has its tier byte
rewritten in place (one byte store: a reader sees the old or the new tier, both true a moment apart;
the load that follows is authoritative). Two probes answer alike (tests/test_lookup_table.py runs
every test with each, and both side by side): the compiled one (`_probe.c`, built where a C compiler
and Python headers were at hand at install) does a whole probe in one call, key by key; the Python
one, chosen without it or with POLARKVD_PURE_PYTHON set, gathers the entries at its keys' homes in
one numpy copy and compares them with what they must hold in one bytes comparison (tier bytes read
only while the table lists L1 or disk pages), then goes on key by key from the first key not at
its home. L1 and disk pages are in
the table so that a miss in it is final (docs/DESIGN-NOTES.md, "Engines answer their own lookups
from a shared table"): with a disk tier, a session's misses are final once the daemon has listed the
disk pages of its namespace (its slot's `final`, or `final_miss` in the hello reply) and while the
overflow flag is clear; with a cluster never (peers may hold the page).

Consistency without locks: the writer stores an entry's key and namespace first and its flags
last (x86 keeps stores in order), and a reader compares flags, key and namespace in one 24-byte
copy, the flags loaded first (the Python copy reads upwards; the compiled probe loads them with
acquire order), so live flags come with the key written before them or a later one. A hit needs all
16 key bytes to equal the wanted key: a copy torn between an old and a new key would have to match
it in 8 bytes of each, a 64-bit collision. Every store is a plain copy of the new bytes, never `struct.pack_into`, which zeroes its
target first (a live entry rewritten so would show a zero key or empty flags for a moment, and a
probe would stop there); the header's and the slots' words are stored and loaded whole
(shared_words.py). So a reader sees an entry as it was at some moment of the probe: a page that goes
a moment later is a short load (as after a socket lookup), a page that is not in the table is a
miss (a recompute), and never is a key reported that the table did not hold.

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

import numpy as np

from polarkvd.types import KEY_BYTES, Tier
from polarkvd.wire.shared_words import SharedWords

try:  # the probe in C (_probe.c), built where a compiler was at hand when polarkvd was installed
    from polarkvd.wire import _probe
except ImportError:
    _probe = None  # type: ignore[assignment]
#: set (to anything but "" or "0"): probe in Python even where the compiled probe is installed
PURE_PYTHON_ENV = "POLARKVD_PURE_PYTHON"

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
_NOT_DRAM_AT = 32
_TIER_AT = 24  # in an entry
_VRAM_HITS_AT = 40  # in a session slot
_DISK_HITS_AT = 48
_FINAL_AT = 56
TIER_VRAM, TIER_DRAM, TIER_DISK = int(Tier.VRAM), int(Tier.DRAM), int(Tier.DISK)  # plain ints: the hot paths
_DRAM_BYTE = bytes([TIER_DRAM])
_U32 = struct.Struct("<I")
_TALLY_AT = 8  # in a session slot: lookups, pages, hits (u64 each)
_TOUCH_HEAD_AT = 32
_ENTRY_TAIL = struct.Struct("<16sIB")  # key, ns, tier (at byte 4 of an entry)
_LIVE_FLAGS = _U32.pack(LIVE)
#: an entry as the batched probe reads it: flags, key and namespace compared at once, then the tier
_ENTRY_DTYPE = np.dtype([("head", "V24"), ("tier", "u1"), ("spare", "V7")])
#: what a key's home entry holds when the key is there: flags LIVE, the key, the session's namespace
_WANT_DTYPE = np.dtype([("flags", "V4"), ("key", f"V{KEY_BYTES}"), ("ns", "V4")])
_MAX_WANTS = 8  # batch sizes whose want arrays a reader keeps


def table_entries(dram_capacity: int, setting: int = 0, disk_capacity: int = 0) -> int:
    """Entries for a DRAM tier of `dram_capacity` bytes and a disk tier of `disk_capacity`: `setting`
    rounded up to a power of two, or (0 = auto) room for twice as many 64 KiB pages as fit in DRAM
    plus one per 256 KiB of disk (pages there are compressed: ~1.4x for bf16, so one entry per 256 KiB
    is one per 64 KiB page at a quarter of the load, enough for pages of 128 KiB and up), between
    4096 and 4 Mi entries (128 MiB). Past that, a full table sends lookups to the socket."""
    auto = 2 * dram_capacity // (64 << 10) + disk_capacity // (256 << 10)
    want = setting if setting > 0 else min(max(auto, 4096), 4 << 20)
    return 1 << max(want - 1, 1).bit_length()


def table_bytes(entries: int, session_slots: int) -> int:
    """Bytes of a table, rounded up to whole pages."""
    raw = HEADER_BYTES + entries * ENTRY_BYTES + session_slots * SLOT_BYTES
    return -(-raw // mmap.PAGESIZE) * mmap.PAGESIZE


def compiled_probe() -> bool:
    """Whether new TableReaders probe with the compiled probe: it is installed, and
    POLARKVD_PURE_PYTHON does not ask for the Python one."""
    return _probe is not None and os.environ.get(PURE_PYTHON_ENV, "") in ("", "0")


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
        self.words = SharedWords(view)
        self.capacity = entries
        self.mask = entries - 1
        self.session_slots = session_slots
        self.slots_at = HEADER_BYTES + entries * ENTRY_BYTES
        self.used = 0  # live entries
        self.vram_used = 0  # live entries of pages in L1
        self.disk_used = 0  # live entries of pages on disk (and not in L1 or DRAM)
        self.deleted = 0  # tombstones
        self.overflow = False
        self.incomplete = False  # being refilled after a rebuild (`set_incomplete`)
        self.rebuild_needed = False  # so many tombstones, or an overflow with room again: `rebuild`
        self._warned = False  # an overflow is logged once per daemon run
        self._free_slots = list(range(session_slots - 1, -1, -1))
        self._touch_tails: dict[int, int] = {}
        if clear:
            view[: self.slots_at] = bytes(self.slots_at)  # a reused file never shows old entries
            _HEADER.pack_into(view, 0, MAGIC, entries, session_slots, time.monotonic_ns(), 1, 0)

    # -- liveness ---------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        self.words.store64(_HEARTBEAT_AT, time.monotonic_ns())

    def close(self) -> None:
        """Clients stop trusting the table at once (the daemon is stopping)."""
        self.words.store32(_STATE_AT, 0)

    # -- entries ----------------------------------------------------------------------------------

    def _write(self, at: int, key: bytes, ns: int, tier: int) -> None:
        """A live entry: key first, flags last (see the docstring). Rewriting a live entry's own key
        copies the same bytes over it: a reader sees no change but the tier byte."""
        self.view[at + 4 : at + 4 + _ENTRY_TAIL.size] = _ENTRY_TAIL.pack(key, ns, tier)
        self.words.store32(at, LIVE)

    def _count(self, tier: int, delta: int) -> None:
        """An entry of `tier` came (+1) or went (-1): keep the not-DRAM counts and header byte."""
        if tier == TIER_DRAM:
            return
        before = self.vram_used + self.disk_used
        if tier == TIER_VRAM:
            self.vram_used += delta
        else:
            self.disk_used += delta
        after = self.vram_used + self.disk_used
        if (before == 0) != (after == 0):
            self.view[_NOT_DRAM_AT] = 1 if after else 0

    def _flag_overflow(self) -> None:
        self.words.store32(_OVERFLOW_AT, 1 if self.overflow or self.incomplete else 0)

    def set_incomplete(self, on: bool) -> None:
        """While on, no miss is final (the overflow flag): the daemon is putting back entries a
        rebuild could not take at once (disk pages, listed in batches)."""
        self.incomplete = on
        self._flag_overflow()

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

    def put(self, key: bytes, ns: int, tier: int = TIER_DRAM) -> bool:
        """`key` has a READY page of namespace `ns` in DRAM (or, `tier` = TIER_VRAM, in L1; TIER_DISK:
        a copy on the disk tier or queued for it). False: the table is full, the key is not listed."""
        at, free = self._find(key)
        if at >= 0:
            old = self.view[at + _TIER_AT]
            if old != tier:
                self._count(old, -1)
                self._count(tier, 1)
            self._write(at, key, ns, tier)
            return True
        if free >= 0 and self.view[free] == TOMBSTONE:
            self.deleted -= 1
        elif free < 0 or self.used + self.deleted + 1 > self.capacity * MAX_LOAD:
            if not self.overflow:  # the page stays loadable; a table miss is just no longer final
                self.overflow = True
                self._flag_overflow()
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "the shared lookup table is full (%d of %d entries in use): engines now ask the "
                        "daemon about pages it cannot list, which is slower; raise "
                        "dram.lookup_table_entries",
                        self.used + self.deleted, self.capacity,
                    )  # fmt: skip
            # a rebuild only helps when it frees many slots: with a few tombstones it would list
            # every page again and overflow at once (under churn: a rebuild per eviction)
            self.rebuild_needed = self.deleted > self.capacity // 8
            return False
        self._write(free, key, ns, tier)
        self.used += 1
        self._count(tier, 1)
        return True

    def set_tier(self, key: bytes, tier: int) -> bool:
        """The page of `key` changed tier (L1 <-> DRAM, or left both with its copy on disk): one byte
        store, the entry stays live. False when the key has no entry (the table was full)."""
        at, _ = self._find(key)
        if at < 0:
            return False
        old = self.view[at + _TIER_AT]
        if old != tier:
            self._count(old, -1)
            self._count(tier, 1)
            self.view[at + _TIER_AT] = tier
        return True

    def remove(self, key: bytes) -> None:
        """The daemon holds `key` nowhere any more (not in L1 or DRAM, not on disk)."""
        at, _ = self._find(key)
        if at >= 0:
            self._count(self.view[at + _TIER_AT], -1)
            self.words.store32(at, TOMBSTONE)
            self.used -= 1
            self.deleted += 1
            if self.deleted > self.capacity // 4 or (
                self.overflow and self.used < self.capacity * MAX_LOAD / 2
            ):
                self.rebuild_needed = True

    def rebuild(
        self, live: Sequence[tuple[bytes, int] | tuple[bytes, int, int]], *, incomplete: bool = False
    ) -> None:
        """Start over with exactly `live` (key, ns[, tier]): drops every tombstone. Clients use the socket
        meanwhile (state 0), so none of them sees the table half rebuilt. `incomplete`: more entries
        follow (`set_incomplete(False)` when they are in); no miss is final until then."""
        v = self.view
        self.words.store32(_STATE_AT, 0)
        start, end = HEADER_BYTES, HEADER_BYTES + self.capacity * ENTRY_BYTES
        v[start:end] = bytes(end - start)
        self.used = self.deleted = self.vram_used = self.disk_used = 0
        v[_NOT_DRAM_AT] = 0
        self.overflow = False
        self.incomplete = incomplete
        self.rebuild_needed = False
        self._flag_overflow()
        for item in live:
            self.put(*item)
        self.words.store32(_STATE_AT, 1)

    def entries_in(self, tier: int) -> list[tuple[bytes, int]]:
        """(key, ns) of every live entry of `tier`, in table order: what a rebuild puts back. The
        tier and flag columns are copied out at C speed; only matching entries cost Python work."""
        v, start = self.view, HEADER_BYTES
        end = start + self.capacity * ENTRY_BYTES
        tiers = v[start + _TIER_AT : end : ENTRY_BYTES].tobytes()
        flags = v[start:end:ENTRY_BYTES].tobytes()
        out: list[tuple[bytes, int]] = []
        want = bytes([tier])
        i = tiers.find(want)
        while i >= 0:
            if flags[i] == LIVE:
                at = start + i * ENTRY_BYTES
                key, ns, _ = _ENTRY_TAIL.unpack_from(v, at + 4)
                out.append((key, ns))
            i = tiers.find(want, i + 1)
        return out

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
        self.words.store32(at, owner)
        self._touch_tails[slot] = 0
        return slot

    def release_slot(self, slot: int) -> None:
        at = self.slots_at + slot * SLOT_BYTES
        self.words.store32(at, 0)
        self._touch_tails.pop(slot, None)
        self._free_slots.append(slot)

    def tally(self, slot: int) -> tuple[int, int, int]:
        """(lookups, pages, hit pages) the session has answered from the table so far."""
        at = self.slots_at + slot * SLOT_BYTES + _TALLY_AT
        load = self.words.load64
        return load(at), load(at + 8), load(at + 16)

    def vram_hits(self, slot: int) -> int:
        """Of the tally's hit pages, those that were in L1."""
        return self.words.load64(self.slots_at + slot * SLOT_BYTES + _VRAM_HITS_AT)

    def disk_hits(self, slot: int) -> int:
        """Of the tally's hit pages, those that were on disk."""
        return self.words.load64(self.slots_at + slot * SLOT_BYTES + _DISK_HITS_AT)

    def set_final(self, slot: int, final: bool) -> None:
        """Whether the session's misses are final (every page of its namespace the daemon holds is
        listed, and there is no cluster): the reader checks it after a miss."""
        self.words.store32(self.slots_at + slot * SLOT_BYTES + _FINAL_AT, 1 if final else 0)

    def touched(self, slot: int) -> list[bytes]:
        """Keys of the entries the session hit since the last call, oldest first (at most a ring)."""
        at = self.slots_at + slot * SLOT_BYTES
        head = self.words.load64(at + _TOUCH_HEAD_AT)
        tail = self._touch_tails.get(slot, 0)
        if head == tail:
            return []
        tail = max(tail, head - RING_ENTRIES)
        self._touch_tails[slot] = head
        ring = at + RING_AT
        keys = []
        for n in range(tail, head):
            key = self.key_at(self.words.load32(ring + (n % RING_ENTRIES) * 4))
            if key is not None:
                keys.append(key)
        return keys


class TableReader:
    """The client's side: probes the table for one session. Not thread-safe (like EngineClient)."""

    def __init__(
        self, buf: Any, ns: int, slot: int, final_miss: bool, *, compiled: bool | None = None
    ) -> None:
        """`compiled`: probe with the compiled probe (True; ImportError where it is not installed) or
        in Python (False); None: `compiled_probe()`."""
        self.buf = buf  # a memoryview of the table (or an mmap of just the table)
        self.words: SharedWords | None = SharedWords(buf)
        magic, capacity, slots, _, _, _ = _HEADER.unpack_from(buf, 0)
        if magic != MAGIC or not 0 <= slot < slots:
            raise ValueError("not a polarkvd lookup table")
        self.mask = capacity - 1
        self.ns = _U32.pack(ns)
        self.ns_dram = self.ns + _DRAM_BYTE
        # no cluster, and no disk tier or the namespace's disk pages listed: a key not in the table
        # is a miss (also when the daemon sets the slot's `final` later)
        self.final_miss = final_miss
        self.entries_end = HEADER_BYTES + capacity * ENTRY_BYTES
        self.slot_at = self.entries_end + slot * SLOT_BYTES
        #: after `probe`: the tier byte of each hit, or None when every hit is in DRAM
        self.last_tiers: bytes | None = None
        entries = np.frombuffer(buf, _ENTRY_DTYPE, count=capacity, offset=HEADER_BYTES)
        # plain (unstructured) views: numpy gathers these far faster than whole structured entries
        self._heads: np.ndarray[Any, Any] | None = entries["head"]
        self._tiers: np.ndarray[Any, Any] | None = entries["tier"]
        self._wants: dict[int, np.ndarray[Any, Any]] = {}  # batch size -> flags and ns filled in
        if compiled is None:
            compiled = compiled_probe()
        elif compiled and _probe is None:
            raise ImportError("the compiled probe (polarkvd.wire._probe) is not installed")
        self._prober: _probe.Prober | None = None
        if compiled:
            self._prober = _probe.Prober(buf, capacity, ns, self.slot_at, final_miss)

    @property
    def compiled(self) -> bool:
        """Whether this reader probes with the compiled probe."""
        return self._prober is not None

    def usable(self) -> bool:
        """The daemon keeps the table: open, and its heartbeat is recent."""
        if self._prober is not None:
            return self._prober.usable(STALE_NS)
        w = self.words
        if w is None or w.load32(_STATE_AT) != 1:
            return False
        return time.monotonic_ns() - w.load64(_HEARTBEAT_AT) < STALE_NS

    def close(self) -> None:
        """Never probed again; the mapping under it may close now."""
        if self.words is not None:
            self.words.release()
            self.words = None
        if self._prober is not None:
            self._prober.close()
            self._prober = None
        self._heads = self._tiers = None  # numpy's views of the mapping go with them
        self._wants.clear()
        self.buf = b""

    def probe(self, keys: Sequence[bytes]) -> tuple[int, bool]:
        """(pages of the longest prefix of `keys` the daemon holds, in L1, DRAM or on disk, whether a
        miss after them is final); the session's tally and touch ring are updated, `last_tiers` says
        where the hits are (None: all in DRAM). Call only when `usable()`. Keys must be bytes of 16
        (TypeError, ValueError otherwise, before anything is probed or counted: the caller asks the
        daemon, which says what is wrong).

        Keys found at their home entry, the usual case, are checked in one batch: their entries are
        gathered and compared with what they must hold in two copies and one comparison, not key by
        key; from the first key that is not at home the probe goes on key by key (`_probe_on`). The
        compiled probe does all of it in one call."""
        if self._prober is not None:
            n, final, self.last_tiers = self._prober.probe(keys)
            return n, final
        b, w = self.buf, self.words
        if w is None or self._heads is None or self._tiers is None:
            raise ValueError("probe after close")
        joined = b"".join(keys)  # TypeError: not bytes
        m = len(keys)
        if len(joined) != KEY_BYTES * m or max(map(len, keys), default=KEY_BYTES) != KEY_BYTES:
            raise ValueError(f"lookup keys must be {KEY_BYTES} bytes")
        # each key's home entry: its first 8 bytes (little-endian) under the mask, which is below
        # 2**32, so the first 4 bytes are enough
        homes = np.frombuffer(joined, "<u4")[::4] & self.mask
        want = self._want(m)
        want["key"] = np.frombuffer(joined, want.dtype["key"])
        seen, wanted = self._heads[homes].tobytes(), want.tobytes()
        if seen == wanted:
            at_home = m
        else:  # the first byte that differs is in the first entry that is not the key's
            diff = int.from_bytes(seen, "little") ^ int.from_bytes(wanted, "little")
            at_home = ((diff & -diff).bit_length() - 1) // (8 * 24)  # lowest bit: first byte
        if b[_NOT_DRAM_AT]:  # only while L1 or disk pages are listed
            tiers = self._tiers[homes[:at_home]].tobytes()
        else:
            tiers = _DRAM_BYTE * at_home
        hits = self._probe_rest(keys, at_home) if at_home < m else []
        n = at_home + len(hits)
        if hits:
            tiers += bytes(b[at + _TIER_AT] for at in hits)
        self.last_tiers = None
        if tiers.count(_DRAM_BYTE) != n:
            self.last_tiers = tiers
            for tier, at in ((TIER_VRAM, _VRAM_HITS_AT), (TIER_DISK, _DISK_HITS_AT)):
                count = tiers.count(tier)
                if count:
                    at += self.slot_at
                    w.store64(at, w.load64(at) + count)
        # a miss is final only if the table was open all along (a rebuild empties it after closing)
        final = n == len(keys) or (
            (self.final_miss or b[self.slot_at + _FINAL_AT] == 1)
            and w.load32(_OVERFLOW_AT) == 0
            and w.load32(_STATE_AT) == 1
        )
        # a lookup that goes on over the socket is counted by the daemon; here only its pages so far
        at = self.slot_at + _TALLY_AT
        w.store64(at, w.load64(at) + final)
        w.store64(at + 8, w.load64(at + 8) + (len(keys) if final else n))
        w.store64(at + 16, w.load64(at + 16) + n)
        at = self.slot_at
        if n:
            # entry offsets of the hits, leaf first: the root ends up the most recently used
            offsets = array.array("I", hits[::-1])
            if at_home:
                offsets.frombytes(((homes[at_home - 1 :: -1] << 5) + HEADER_BYTES).tobytes())
            head = w.load64(at + _TOUCH_HEAD_AT)
            skip = max(0, n - RING_ENTRIES)  # more than a ring: the newest ones
            data = offsets[skip:].tobytes()
            pos, ring = (head + skip) % RING_ENTRIES, at + RING_AT
            first = min(len(data), (RING_ENTRIES - pos) * 4)
            b[ring + pos * 4 : ring + pos * 4 + first] = data[:first]
            if first < len(data):
                b[ring : ring + len(data) - first] = data[first:]
            w.store64(at + _TOUCH_HEAD_AT, head + n)
        return n, final

    def _want(self, m: int) -> np.ndarray[Any, Any]:
        """The want array for a batch of `m` keys: flags LIVE and this session's namespace filled in."""
        want = self._wants.get(m)
        if want is None:
            if len(self._wants) >= _MAX_WANTS:
                self._wants.clear()
            want = self._wants[m] = np.empty(m, _WANT_DTYPE)
            want["flags"] = _LIVE_FLAGS
            want["ns"] = self.ns
        return want

    def _probe_rest(self, keys: Sequence[bytes], start: int) -> list[int]:
        """Entry offsets of `keys[start:]` (16 bytes each) up to the first the table does not hold,
        key by key: at home or past it, in any tier."""
        b, mask, ns = self.buf, self.mask, self.ns
        rest = keys[start:]
        homes = array.array("Q", b"".join(rest))[::2]  # each key's first 8 bytes
        hits: list[int] = []
        for h, key in zip(homes, rest):
            at = HEADER_BYTES + ((h & mask) << 5)
            want = _LIVE_FLAGS + key + ns
            if b[at : at + 24] != want:
                at = self._probe_on(at, want)
                if at < 0:
                    break
            hits.append(at)
        return hits

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
