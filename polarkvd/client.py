"""The client library: how engines (and the CLI, and the TUI) talk to a polarkvd daemon.

Synchronous and thread-compatible (one client per thread, or guard it), so a vLLM worker thread can
call it directly. Every call is one round trip for any number of pages. Bytes never cross the socket:
`EngineClient` maps the daemon's shared-memory arena and copies pages in and out of it.

    ns = Namespace(model="smollm2-135m@abc123", dtype="float32", layout="vllm-cpu/v1",
                   num_layers=30, num_kv_heads=3, head_dim=64, page_tokens=256)
    with EngineClient(ns, engine_id="vllm-0") as kv:
        keys = kv.page_keys(token_ids)
        hit = kv.lookup(keys)                       # longest cached prefix, with the tier of each page
        kv.store(keys[hit.hits:], pages, parent=keys[hit.hits - 1] if hit.hits else None)
        n = kv.load_into(keys[:hit.hits], buffers)  # copies pages out, releases the pins

With `vram=True` (an engine whose process has CUDA) the session also maps the daemon's L1 pool, and
`store_cuda` / `load_into_cuda` move pages between torch CUDA tensors and the pool GPU to GPU (pages
in L1) or through the arena (pages in DRAM). torch is imported only by those two calls.

Imports only the wire protocol, the shared-memory mapping and the leaves: never the daemon.
"""

from __future__ import annotations

import array
import dataclasses
import logging
import mmap
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from polarkvd.config.machine import default_control_socket, default_engine_socket
from polarkvd.errors import (
    DaemonUnavailable,
    ErrorCode,
    LeaseExpired,
    PageNotFound,
    PolarKVError,
)
from polarkvd.keys import ROOT_KEY, page_keys
from polarkvd.types import KEY_BYTES, Namespace, PageKey, Tier
from polarkvd.wire import frames as P
from polarkvd.wire.arena import map_arena
from polarkvd.wire.channel import Channel
from polarkvd.wire.lookup_table import TableReader, map_table
from polarkvd.wire.shared_words import SharedWords
from polarkvd.wire.signals import SIGNAL_BYTES, SIGNAL_NONE, read_signal

log = logging.getLogger(__name__)
_TIER = {int(t): t for t in Tier}
#: Default seconds a commit may take (see EngineClient.commit_timeout).
COMMIT_TIMEOUT = 60.0
_vram_warned = False  # "the daemon's GPU is not visible here" is said once per process
_DRAM_CODES = (
    bytes([Tier.DRAM]) * 64
)  # sliced for a lookup answered from the table  # Tier(n) costs ~0.4 us per call; a dict lookup a tenth of that


@dataclasses.dataclass
class LookupResult:
    tier_codes: bytes  # one byte per page of the longest cached prefix: its Tier number
    lease: int | None = None  # with pin=True: a lease holding the DRAM pages of the prefix

    @property
    def hits(self) -> int:
        return len(self.tier_codes)

    @property
    def tiers(self) -> list[Tier]:
        return [_TIER[t] for t in self.tier_codes]


@dataclasses.dataclass
class LoadResult:
    offsets: list[int]
    tiers: list[Tier]
    lease: int | None
    views: list[memoryview]  # writable views of the pinned pages in the arena; valid until release
    num_layers: int = 0
    signal: SharedWords | None = None  # a pipelined load's readiness slot (transport/pipeline.py)

    @property
    def loaded(self) -> int:
        return len(self.offsets)

    def ready(self) -> tuple[int, int]:
        """(layers every usable page holds, usable pages). A plain load is complete at once; a
        pipelined one grows as layers arrive, and `usable` shrinks to the pages before the first
        failed one if a transfer fails (the engine recomputes from there)."""
        if self.signal is None:
            return self.num_layers, len(self.offsets)
        layers, failed = read_signal(self.signal)
        return layers, len(self.offsets) if failed == SIGNAL_NONE else min(failed, len(self.offsets))

    def wait_layers(self, n: int, timeout: float | None = 30.0) -> int:
        """Wait until every usable page holds layers [0, n); returns how many pages are usable.

        Spins briefly, then sleeps in short steps: layers arrive in milliseconds.
        """
        layers, usable = self.ready()
        if layers >= n or self.signal is None:
            return usable
        deadline = None if timeout is None else time.monotonic() + timeout
        spins = 0
        while True:
            layers, usable = self.ready()
            if layers >= n:
                return usable
            spins += 1
            if spins < 200:
                time.sleep(0)
            else:
                time.sleep(0.0001)
            if deadline is not None and time.monotonic() > deadline:
                raise PolarKVError(
                    f"pipelined load: layer {n - 1} not there after {timeout}s ({layers} layers ready)",
                    code=ErrorCode.UNAVAILABLE,
                )


@dataclasses.dataclass
class StoreResult:
    stored: int = 0  # pages written and committed
    existing: int = 0  # pages the daemon already had
    no_space: int = 0  # pages not stored: no room (everything pinned) or daemon draining
    durable: int | None = None  # of `stored`, on disk and synced (write-through); None: write-back


@dataclasses.dataclass(frozen=True)
class CommitResult:
    committed: int
    #: With the daemon's disk.write_through: how many of the committed pages were on disk and synced
    #: when it answered (fewer: the disk was full or failed, or pages went to L1; they are still
    #: committed in memory). None under write-back: nothing was written yet.
    durable: int | None = None


class _ArenaMaps:
    """One mapping per arena file per process, shared by every EngineClient that needs it.

    Mapping (and pre-faulting) a 2 GiB arena costs up to ~0.8 s, and an engine opens a session per
    `cache_salt`. Mappings are keyed by the file's identity (device, inode), not only its path: a
    restarted daemon creates a new arena at the same path, and a client must never keep writing into
    the unlinked old one.
    """

    _lock = threading.Lock()
    _maps: dict[tuple[int, int, int], tuple[mmap.mmap, memoryview, int]] = {}
    _unmap_hooks: dict[tuple[int, int, int], list[Callable[[], None]]] = {}

    @classmethod
    def acquire(cls, path: str, size: int) -> tuple[tuple[int, int, int], memoryview]:
        st = os.stat(path)
        ident = (st.st_dev, st.st_ino, size)
        with cls._lock:
            entry = cls._maps.get(ident)
            if entry is None:
                m = map_arena(path, size)
                entry = (m, memoryview(m), 0)
            cls._maps[ident] = (entry[0], entry[1], entry[2] + 1)
            return ident, entry[1]

    @classmethod
    def on_unmap(cls, ident: tuple[int, int, int], hook: Callable[[], None]) -> None:
        with cls._lock:
            if ident in cls._maps:
                cls._unmap_hooks.setdefault(ident, []).append(hook)

    @classmethod
    def release(cls, ident: tuple[int, int, int]) -> None:
        with cls._lock:
            m, view, refs = cls._maps[ident]
            if refs > 1:
                cls._maps[ident] = (m, view, refs - 1)
                return
            del cls._maps[ident]
            hooks = cls._unmap_hooks.pop(ident, [])
        for hook in hooks:  # state tied to the mapping's addresses goes before the addresses do
            try:
                hook()
            except Exception:  # noqa: BLE001 - one hook's failure must not keep the mapping alive
                log.exception("arena unmap hook %r failed", hook)
        try:
            view.release()
            m.close()
        except (BufferError, ValueError):
            pass  # a caller still holds a page view; the mapping goes away with the process


class EngineClient:
    """An attached engine session: one namespace, one connection, the arena mapped.

    `map_arena=False` makes a lookup-only client (a scheduler process that never touches bytes): it
    skips mapping the arena; `page`, `load`, `store` and `load_into` then raise.
    """

    def __init__(
        self,
        namespace: Namespace,
        engine_id: str = "",
        socket_path: str | Path | None = None,
        timeout: float | None = 60.0,
        map_arena: bool = True,
        lookup_table: bool = True,
        vram: bool = False,
        commit_timeout: float | None = COMMIT_TIMEOUT,
        kv_events: dict[str, Any] | None = None,
    ) -> None:
        self.namespace = namespace
        #: seconds a commit may wait for its reply when that is longer than `timeout`: with the
        #: daemon's disk.write_through it answers once the pages are on disk and synced
        self.commit_timeout = commit_timeout
        self._arena_id: tuple[int, int, int] | None = None
        self._region: Any = None  # wire/region.py AttachedRegion: the daemon's L1 pool, opened here
        self._table: TableReader | None = None
        self._table_map: mmap.mmap | None = None
        self.engine_id = engine_id or f"pid-{os.getpid()}"
        self._ch = Channel(socket_path or default_engine_socket(), timeout)
        try:
            hello: dict[str, Any] = {"namespace": namespace.to_wire(), "engine_id": self.engine_id}
            if vram:
                hello["vram"] = True
            if kv_events is not None:  # the engine's KV event publisher: the daemon follows its GPU cache
                hello["kv_events"] = kv_events
            info = self._ch.call(P.Op.HELLO.value, hello)
            self.session_id: int = info["session"]
            self.ns_digest: bytes = info["ns_digest"]
            self.page_bytes: int = info["page_bytes"]
            self.layer_bytes: int = info["layer_bytes"]
            self.lease_seconds: float = info["lease_seconds"]
            self.max_keys: int = info["max_keys"]
            self.signal_offset: int | None = info.get("signal_offset")
            if map_arena:
                self._arena_id, self._arena = _ArenaMaps.acquire(info["arena_path"], info["arena_size"])
            table = info.get("lookup_table")
            if lookup_table and table:
                self._open_table(info["arena_path"], table)
            if info.get("vram") is not None:
                self._open_region(info["vram"])
        except BaseException:
            self._ch.close()
            raise

    # -- keys -------------------------------------------------------------------------------------

    def page_keys(self, token_ids: Sequence[int] | np.ndarray, parent: bytes = ROOT_KEY) -> list[PageKey]:
        """Keys of every full page of `token_ids` in this session's namespace, chained from the digest
        `hello` returned (keyed with the daemon's secret seed: only the daemon computes digests)."""
        return page_keys(self.ns_digest, token_ids, self.namespace.page_tokens, parent)

    # -- raw ops (one round trip each) -------------------------------------------------------------

    def _open_table(self, arena_path: str, t: dict[str, Any]) -> None:
        """Probe lookups in the daemon's shared lookup table from now on (lookup_table.py). The table
        gets a mapping of its own even where the arena is mapped: slicing an mmap gives bytes, which
        compare several times faster than memoryview slices."""
        self._table_map = map_table(arena_path, t["offset"], t["size"])
        self._table = TableReader(self._table_map, t["ns"], t["slot"], t["final_miss"])

    def _open_region(self, wire: Any) -> None:
        """Map the daemon's L1 pool (docs/VRAM.md). A GPU this process cannot see (another GPU,
        CUDA_VISIBLE_DEVICES) or no CUDA here: said once, and every page goes through the arena."""
        global _vram_warned
        from polarkvd.cuda import CudaError
        from polarkvd.wire.region import AttachedRegion, RegionHandle

        region = RegionHandle.from_wire(wire)  # a malformed reply is a ProtocolError: a bug to see
        try:
            self._region = AttachedRegion(region)
        except CudaError as e:
            if not _vram_warned:
                _vram_warned = True
                log.warning(
                    "polarkvd: not using the daemon's GPU page pool (L1): %s; pages go through DRAM", e
                )

    @property
    def vram(self) -> bool:
        """Whether this session maps the daemon's L1 pool (stores may land there)."""
        return self._region is not None

    def pool_tensor(self) -> Any:
        """The whole L1 pool as a torch uint8 CUDA tensor (no copy; slice it at `load`/`reserve_tiers`
        offsets), or None without L1. Drop it before `close()`: the pool is unmapped there."""
        return self._region.tensor() if self._region is not None else None

    @property
    def arena(self) -> memoryview:
        """The whole mapped arena: every `page()` view is a slice of it (shared by every session on
        the same arena in this process)."""
        self._need_arena()
        return self._arena

    def on_arena_unmap(self, hook: Callable[[], None]) -> None:
        """Call `hook()` once, just before this process unmaps the arena this session maps (when the
        last session on it closes), so that state tied to the mapping's addresses (a CUDA host
        registration) goes first: a later mapping may reuse them."""
        self._need_arena()
        assert self._arena_id is not None
        _ArenaMaps.on_unmap(self._arena_id, hook)

    def lookup(self, keys: Sequence[bytes], pin: bool = False) -> LookupResult:
        """Tiers of the longest cached prefix of `keys` (a hint: `load` is what counts). Answered
        from the shared lookup table without a round trip while the daemon keeps it; what the table
        cannot settle (pages on peers, `pin`, a table still listing this namespace's disk pages, a full
        table) is asked over the socket."""
        table = self._table
        if table is not None and not pin and keys and table.usable():
            try:
                n, final = table.probe(keys)
            except (TypeError, ValueError):  # not 16-byte keys: the daemon says what is wrong
                return self._lookup_socket(keys, pin)
            codes = table.last_tiers  # None: every hit is in DRAM (always so on a host without L1)
            if codes is None:
                codes = _DRAM_CODES[:n] if n <= 64 else bytes([Tier.DRAM]) * n
            if n == len(keys):
                return LookupResult(codes)
            stop = keys[n]
            if final and type(stop) is bytes and len(stop) == KEY_BYTES:
                return LookupResult(codes)
            rest = self._lookup_socket(keys[n:], False)  # counted there as the lookup it is
            return LookupResult(codes + rest.tier_codes)
        return self._lookup_socket(keys, pin)

    def _lookup_socket(self, keys: Sequence[bytes], pin: bool) -> LookupResult:
        if len(keys) <= self.max_keys:  # the common case: one round trip
            r = self._ch.call(P.Op.LOOKUP.value, {"keys": P.pack_keys(keys), "pin": pin})  # type: ignore[arg-type]
            return LookupResult(r["tiers"], r["lease"])
        codes, lease = b"", None
        for i in range(0, len(keys), self.max_keys):
            chunk = list(keys[i : i + self.max_keys])
            r = self._ch.call(P.Op.LOOKUP.value, {"keys": chunk, "pin": pin})
            codes += r["tiers"]
            lease = lease or r["lease"]  # one lease per call: the first chunk's pins the head
            if len(r["tiers"]) < len(chunk):
                break
        return LookupResult(codes, lease)

    def reserve(self, keys: Sequence[bytes], parent: bytes | None = None) -> list[int]:
        """Arena offsets to write (or Reserved.EXISTS / Reserved.NO_SPACE): DRAM slots only."""
        return self._ch.call(P.Op.RESERVE.value, {"keys": P.pack_keys(list(keys)), "parent": parent})[
            "offsets"
        ]

    def reserve_tiers(
        self, keys: Sequence[bytes], parent: bytes | None = None, tier: Tier = Tier.VRAM
    ) -> tuple[list[int], bytes]:
        """Offsets and, per key, the tier each is in (1: the L1 pool, 2: the arena, 0: not to write),
        preferring `tier`; the daemon gives L1 slots only to a session that mapped its pool."""
        r = self._ch.call(
            P.Op.RESERVE.value, {"keys": P.pack_keys(list(keys)), "parent": parent, "tier": int(tier)}
        )
        return r["offsets"], r["tiers"]

    def commit(self, keys: Sequence[bytes]) -> int:
        return self.commit_result(keys).committed

    def commit_result(self, keys: Sequence[bytes]) -> CommitResult:
        """Commit, and learn how many pages are durable (see CommitResult). Under write-through the
        daemon answers once they are on disk and synced: this waits up to `commit_timeout`."""
        r = self._ch.call(P.Op.COMMIT.value, {"keys": P.pack_keys(list(keys))}, self.commit_timeout)
        return CommitResult(r["committed"], r.get("durable"))

    def abort(self, keys: Sequence[bytes]) -> int:
        return self._ch.call(P.Op.ABORT.value, {"keys": P.pack_keys(list(keys))})["aborted"]

    def load(
        self, keys: Sequence[bytes], pipelined: bool = False, release: int | None = None, serial: bool = False
    ) -> LoadResult:
        """Pin the longest loadable prefix of `keys` in DRAM; copy from `views`, then `release`.

        `pipelined`: answer at once, while pages from disk or from peers are still arriving, layer by
        layer: call `wait_layers(i + 1)` on the result before reading layer i of the pages.
        `release`: a lease of this session to release first, in the same round trip (a load in
        batches: the batch before, copied out). `LeaseExpired` if it had expired: what was read
        under it may be stale, and nothing was loaded. `serial`: the daemon reads the disk pages on
        one I/O thread in turn (a paced load beside a computing engine: less CPU at once, slower).
        """
        self._need_arena()
        args: dict[str, Any] = {"keys": P.pack_keys(list(keys))}
        if pipelined:
            args["pipelined"] = True
        if release is not None:
            args["release"] = release
        if serial:
            args["serial"] = True
        try:
            r = self._ch.call(P.Op.LOAD.value, args)
        except PageNotFound as e:
            if release is None:
                raise
            raise LeaseExpired(
                f"lease {release} expired before release; pages read under it may be stale ({e})"
            ) from None
        views = [self.page(off) for off in r["offsets"]]
        slot = r.get("signal")
        signal = None
        if slot is not None and self.signal_offset is not None:
            at = self.signal_offset + slot * SIGNAL_BYTES
            signal = SharedWords(self._arena[at : at + SIGNAL_BYTES])
        return LoadResult(
            r["offsets"], [_TIER[t] for t in r["tiers"]], r["lease"], views, self.namespace.num_layers, signal
        )

    def ping(self) -> None:
        self._ch.call(P.Op.PING.value, {})

    def observe_prefill(self, tokens: int, depth: int, seconds: float) -> None:
        """Tell the daemon what computing `tokens` tokens after `depth` took (its `cost` policy)."""
        self._ch.call(P.Op.OBSERVE.value, {"tokens": tokens, "depth": depth, "seconds": seconds})

    def report_load(self, running: int, waiting: int, queued_prefill_tokens: int, url: str = "") -> None:
        """Tell the daemon this engine's load now (`where` returns the last report per engine)."""
        args: dict[str, Any] = {
            "running": running,
            "waiting": waiting,
            "queued_prefill_tokens": queued_prefill_tokens,
        }
        if url:
            args["url"] = url
        self._ch.call(P.Op.REPORT_LOAD.value, args)

    def page(self, offset: int) -> memoryview:
        """A writable view of the page at `offset` in the arena."""
        self._need_arena()
        return self._arena[offset : offset + self.page_bytes]

    def _need_arena(self) -> None:
        if self._arena_id is None:
            raise PolarKVError("this client did not map the arena (map_arena=False) or is closed")

    # -- batched conveniences ----------------------------------------------------------------------

    def store(
        self,
        keys: Sequence[bytes],
        pages: Sequence[Any] | Callable[[int, memoryview], None],
        parent: bytes | None = None,
    ) -> StoreResult:
        """Store consecutive pages of one chain: reserve, copy each page in, commit.

        `pages[i]` is any buffer of `page_bytes` bytes (bytes, numpy array, memoryview), or `pages` is a
        function `write(i, view)` that fills page i straight into the arena (no intermediate copy).
        `parent` is the key of the page before keys[0] (None at the start of a sequence). On any error
        while copying, the reservation is aborted: nothing half-written becomes visible.
        """
        self._need_arena()
        offsets = self.reserve(keys, parent)
        result = StoreResult()
        written: list[bytes] = []
        try:
            for i, (key, off) in enumerate(zip(keys, offsets)):
                if off == P.Reserved.EXISTS:
                    result.existing += 1
                    continue
                if off == P.Reserved.NO_SPACE:
                    result.no_space += 1
                    continue
                dst = self.page(off)
                if callable(pages):
                    pages(i, dst)
                else:
                    src = memoryview(pages[i]).cast("B")
                    if src.nbytes != self.page_bytes:
                        raise ValueError(
                            f"page {i} has {src.nbytes} bytes; this namespace's pages have {self.page_bytes}"
                        )
                    dst[:] = src
                written.append(key)
        except BaseException:
            reserved = [k for k, off in zip(keys, offsets) if off >= 0]
            if reserved:
                self.abort(reserved)
            raise
        if written:
            c = self.commit_result(written)
            result.stored, result.durable = c.committed, c.durable
        return result

    def load_into(self, keys: Sequence[bytes], outs: Sequence[Any]) -> int:
        """Copy the longest loadable prefix of `keys` into `outs` (writable buffers); returns pages copied.

        If the lease expired while copying (this process stalled for `lease_seconds`), the pages may have
        been reused meanwhile: `LeaseExpired` is raised and the copies must be discarded.
        """
        r = self.load(keys)
        try:
            for view, out in zip(r.views, outs):
                memoryview(out).cast("B")[:] = view
        finally:
            if r.lease is not None:
                self.release(r.lease)
        return r.loaded

    def store_cuda(
        self, keys: Sequence[bytes], tensors: Sequence[Any], parent: bytes | None = None
    ) -> StoreResult:
        """`store` from torch CUDA tensors (each `page_bytes` bytes, contiguous): pages that get an L1
        slot are copied GPU to GPU into the pool, the others device to host into the arena; the
        stream is synchronised before `commit`, so no page is visible half-written. Without L1 (no
        `vram=True`, or the pool not visible here) every page goes to the arena."""
        import torch  # lazily: only engines that move CUDA tensors pay for it

        self._need_arena()
        if self._region is not None:
            offsets, tiers = self.reserve_tiers(keys, parent, Tier.VRAM)
        else:
            offsets = self.reserve(keys, parent)
            tiers = bytes(Tier.DRAM if off >= 0 else 0 for off in offsets)
        result = StoreResult()
        written: list[bytes] = []
        try:
            for i, (key, off, tier) in enumerate(zip(keys, offsets, tiers)):
                if off == P.Reserved.EXISTS:
                    result.existing += 1
                    continue
                if off == P.Reserved.NO_SPACE:
                    result.no_space += 1
                    continue
                src = self._page_bytes_of(tensors[i], i)
                if tier == Tier.VRAM:
                    self._region.tensor(off, self.page_bytes).copy_(src, non_blocking=True)
                else:
                    torch.frombuffer(self.page(off), dtype=torch.uint8).copy_(src)  # waits for the copy
                written.append(key)
            if written:
                torch.cuda.synchronize(self._region.device if self._region is not None else None)
        except BaseException as e:
            if isinstance(e, DaemonUnavailable):
                self._close_region()
            reserved = [k for k, off in zip(keys, offsets) if off >= 0]
            if reserved and not isinstance(e, DaemonUnavailable):
                self.abort(reserved)
            raise
        if written:
            c = self.commit_result(written)
            result.stored, result.durable = c.committed, c.durable
        return result

    def load_into_cuda(self, keys: Sequence[bytes], tensors: Sequence[Any]) -> int:
        """`load_into` torch CUDA tensors: L1 pages GPU to GPU from the pool, the rest host to device
        from the arena; synchronised before the lease is released. Returns the pages copied."""
        import torch

        r = self.load(keys)
        try:
            for i, (off, tier, view) in enumerate(zip(r.offsets, r.tiers, r.views)):
                dst = self._page_bytes_of(tensors[i], i)
                if tier is Tier.VRAM and self._region is not None:
                    dst.copy_(self._region.tensor(off, self.page_bytes), non_blocking=True)
                else:
                    dst.copy_(torch.frombuffer(view, dtype=torch.uint8))
            if r.offsets:
                torch.cuda.synchronize(self._region.device if self._region is not None else None)
        except DaemonUnavailable:
            self._close_region()
            raise
        finally:
            del r.views
            if r.lease is not None and not self._ch_closed():
                self.release(r.lease)
        return r.loaded

    def _page_bytes_of(self, tensor: Any, i: int) -> Any:
        """A tensor's bytes as a flat uint8 view (no copy); ValueError when it is not one page."""
        import torch

        flat = tensor.reshape(-1).view(torch.uint8)
        if flat.numel() != self.page_bytes:
            raise ValueError(
                f"tensor {i} has {flat.numel()} bytes; this namespace's pages have {self.page_bytes}"
            )
        return flat

    def _ch_closed(self) -> bool:
        return self._ch._sock.fileno() < 0

    def connection_lost(self) -> bool:
        """Whether the daemon has closed this session's connection (it exited or restarted), checked
        without blocking or a round trip: the socket reads as ended. A session whose daemon is only
        slow, or has not answered yet, is not lost."""
        if self._ch_closed():
            return True
        try:
            return self._ch._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False  # open, nothing to read: the usual case
        except OSError:
            return True

    def _close_region(self) -> None:
        """Unmap the pool: at close, and when the daemon is gone (it freed the pool: CUDA does not
        say what an importer sees then, so the region is never touched again)."""
        region, self._region = self._region, None
        if region is not None:
            try:
                region.close()
            except Exception as e:  # a dead daemon's handle: nothing left to do
                log.debug("closing the L1 region: %s", e)

    def release(self, lease: int) -> None:
        """Unpin a lease's pages. Raises `LeaseExpired` if the daemon had already let it go."""
        try:
            self._ch.call(P.Op.RELEASE.value, {"lease": lease})
        except PageNotFound as e:
            raise LeaseExpired(
                f"lease {lease} expired before release; pages read under it may be stale ({e})"
            ) from None

    def close(self) -> None:
        self._close_region()
        self._ch.close()
        if self._table is not None:
            self._table.close()  # never probed again
            self._table = None
            if self._table_map is not None:
                self._table_map.close()
                self._table_map = None
        if self._arena_id is not None:
            _ArenaMaps.release(self._arena_id)
            self._arena_id = None

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ControlClient:
    """The operator side: status, eviction, drain, live knobs."""

    def __init__(self, socket_path: str | Path | None = None, timeout: float | None = 600.0) -> None:
        self._ch = Channel(socket_path or default_control_socket(), timeout)

    def stats(self) -> dict[str, Any]:
        return self._ch.call(P.Op.STATS.value, {})

    def evict(self, tier: str, nbytes: int) -> int:
        return self._ch.call(P.Op.EVICT.value, {"tier": tier, "bytes": nbytes})["freed_bytes"]

    def drain(self) -> dict[str, Any]:
        return self._ch.call(P.Op.DRAIN.value, {})

    def resume(self) -> None:
        self._ch.call(P.Op.RESUME.value, {})

    def knobs(self) -> dict[str, Any]:
        return self._ch.call(P.Op.GET_KNOBS.value, {})["knobs"]

    def set_knobs(self, knobs: dict[str, Any]) -> dict[str, Any]:
        return self._ch.call(P.Op.SET_KNOBS.value, {"knobs": knobs})["knobs"]

    def save_tuning(self, names: Sequence[str]) -> dict[str, Any]:
        """Write these live knobs' current values to the daemon's tuning overlay (read at its next
        start). Returns {"path": overlay file, "saved": everything the file now holds}."""
        return self._ch.call(P.Op.SAVE_TUNING.value, {"names": list(names)})

    def cluster(self) -> dict[str, Any]:
        """This daemon's view of its cluster: {"enabled": False} or members with state and metadata."""
        return self._ch.call(P.Op.CLUSTER.value, {})

    def top(self, limit: int = 20) -> dict[str, Any]:
        """Largest namespaces and prefixes: {"namespaces": [...], "prefixes": [...], "prefix_count"}."""
        return self._ch.call(P.Op.TOP.value, {"limit": limit})

    def pin(self, keys: Sequence[bytes]) -> dict[str, Any]:
        """Pin the DRAM pages of these prefixes (each key and everything after it)."""
        return self._ch.call(P.Op.PIN.value, {"keys": list(keys)})

    def unpin(self, keys: Sequence[bytes]) -> int:
        return self._ch.call(P.Op.UNPIN.value, {"keys": list(keys)})["unpinned_pages"]

    def evict_keys(self, keys: Sequence[bytes]) -> dict[str, Any]:
        """Evict these prefixes from DRAM now (demoted to disk); pinned pages stay."""
        return self._ch.call(P.Op.EVICT_KEYS.value, {"keys": list(keys)})

    def where(self, args: dict[str, Any]) -> dict[str, Any]:
        """How much of a prefix is cached here (by tier) and on other members, in tokens: `args` names
        the namespace (`namespace`, or `model` and `salt`) and the prefix (`tokens` or `keys`).
        Token ids go packed as uint32 bytes (the daemon unpacks them ~10x faster than an array)."""
        tokens = args.get("tokens")
        if isinstance(tokens, list):
            try:
                packed = array.array("I", tokens)
            except (TypeError, OverflowError):
                packed = None  # sent as given: the daemon's error names what is wrong
            if packed is not None and packed.itemsize == 4:
                if sys.byteorder == "big":
                    packed.byteswap()
                args = {**args, "tokens": packed.tobytes()}
        return self._ch.call(P.Op.WHERE.value, args)

    def ping(self) -> None:
        self._ch.call(P.Op.PING.value, {})

    def close(self) -> None:
        self._ch.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
