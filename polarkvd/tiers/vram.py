"""L1: the daemon-owned VRAM page pool.

Owns:
- the start-up decision (`probe` -> `VramChoice`, `describe_choice` -> the one `vram: ...` log line);
- `VramPool`: one device allocation of `vram.capacity` bytes cut into page slots (`PageSlots`, the
  DRAM tier's slab allocator), the region's CUDA IPC handle for engines (`RegionHandle`), and batched
  copies on one stream with one synchronisation per batch: device->device inside the pool,
  device->pinned host (demotion into a DRAM arena slot) and host->device (promotion);
- `HostRegion`: a host buffer (the DRAM arena's mmap) page-locked for the device;
The engine's side of the pool (the handle's wire form, `AttachedRegion`) is `polarkvd/wire/region.py`.

It must not know keys, sessions, namespaces or policy: the manager decides what lives in which slot
(docs/VRAM.md says how); here are only offsets, lengths and bytes. The CUDA calls themselves are in
`polarkvd/cuda.py`. Pure parts (slots, copy planning, the wire form of a handle, the probe's
decisions) take no CUDA call and are tested on machines without a GPU; everything that calls CUDA is
tested on a GPU (`-m gpu`, scripts/gpu-check.sh, docs/HARDWARE.md).

Threads: every operation first makes the pool's device current in the calling thread (the driver's
current context is per thread), so the pool may be used from the event loop and from I/O threads.
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from polarkvd.cuda import (
    CopyKind,
    CudaApi,
    CudaError,
    CudaUnavailable,
    DeviceInfo,
    load_api,
)
from polarkvd.tiers.dram import SlabAllocator, slot_size
from polarkvd.wire.region import RegionHandle

if TYPE_CHECKING:
    from polarkvd.config import VramConfig

_GiB = 1 << 30


# ------------------------------------------------------------------------------------------ the probe


@dataclasses.dataclass(frozen=True)
class VramChoice:
    """What the daemon decided about L1 at start, and why (one line: `describe_choice`)."""

    enabled: bool
    reason: str
    capacity: int = 0
    device: DeviceInfo | None = None
    api: str = ""  # "driver" or "runtime"
    library: str = ""  # what was loaded, as dlopen was given it
    version: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["line"] = describe_choice(self)
        return out


def describe_choice(choice: VramChoice) -> str:
    if choice.enabled and choice.device is not None:
        d = choice.device
        return f"vram: {choice.capacity / _GiB:.1f} GiB on GPU {d.index} ({d.name}, {d.pci_bus_id})"
    return f"vram: {choice.reason}"


def probe(settings: VramConfig, *, load: Callable[[str], CudaApi] = load_api) -> VramChoice:
    """Decide whether L1 runs here. Never raises for a host without CUDA: the reason says why not.

    Creates no CUDA context and allocates nothing: the pool is made later (`VramPool`), where a
    failing allocation reports the device's free memory."""
    if not settings.enabled:
        return VramChoice(False, "disabled (vram.enabled = false)")

    def unavailable(why: str, api: CudaApi | None = None) -> VramChoice:
        if api is not None and api.skipped:  # e.g. no libcuda, and a toolkit's libcudart fails on that
            why = f"{api.skipped}; {api.library}: {why}"
        return VramChoice(
            False,
            f"unavailable: {why}",
            settings.capacity,
            api=api.kind.value if api else "",
            library=api.library if api else "",
        )

    try:
        api = load(settings.cuda_api)
    except CudaUnavailable as err:
        return unavailable(str(err))
    try:
        count = api.device_count()
    except CudaUnavailable as err:
        return unavailable(str(err), api)
    except CudaError as err:
        if err.status == 100:  # CUDA_ERROR_NO_DEVICE == cudaErrorNoDevice
            return unavailable(f"no CUDA device ({err})", api)
        return unavailable(str(err), api)
    if count == 0:
        return unavailable("no CUDA device", api)
    if not 0 <= settings.device < count:
        n = "1 device" if count == 1 else f"{count} devices"
        return unavailable(f"vram.device {settings.device} out of range ({n})", api)
    try:
        info = api.device_info(settings.device)
        version = api.version()
    except CudaError as err:
        return unavailable(str(err), api)
    if settings.capacity > info.total_bytes:
        return unavailable(
            f"vram.capacity {settings.capacity / _GiB:.1f} GiB is more than GPU {info.index} "
            f"({info.name}) has: {info.total_bytes / _GiB:.1f} GiB",
            api,
        )
    return VramChoice(True, "available", settings.capacity, info, api.kind.value, api.library, version)


# --------------------------------------------------------------------------- slots and copy planning (pure)


class PageSlots:
    """Which byte ranges of the pool are handed out: the DRAM tier's slab allocator, plus a record of
    every slot given out, so an offset that comes back (from the manager, later from an engine) is
    checked: freeing a slot twice, or one never handed out, is a ValueError, never a corrupt pool."""

    def __init__(self, capacity: int, slab_bytes: int) -> None:
        self.slabs = SlabAllocator(capacity, slab_bytes)
        self.capacity = capacity
        self._out: dict[int, int] = {}  # offset -> slot bytes

    @property
    def used_bytes(self) -> int:
        return self.slabs.used_bytes

    def alloc(self, page_bytes: int) -> int | None:
        """Offset of a free slot for a page of `page_bytes` (rounded up to 4 KiB), or None when full."""
        size = slot_size(page_bytes)
        off = self.slabs.alloc(size)
        if off is not None:
            self._out[off] = size
        return off

    def free(self, offset: int) -> None:
        size = self._out.pop(offset, None)
        if size is None:
            raise ValueError(f"offset {offset} is not a slot in use")
        self.slabs.free(offset, size)

    def slot_bytes(self, offset: int) -> int | None:
        return self._out.get(offset)

    def free_slots(self, page_bytes: int) -> int:
        return self.slabs.free_slots(slot_size(page_bytes))

    def __len__(self) -> int:
        return len(self._out)


def plan_copies(
    items: Iterable[tuple[int, int, int]], src_size: int, dst_size: int, *, same_region: bool = False
) -> list[tuple[int, int, int]]:
    """Validate (src_offset, dst_offset, nbytes) items and merge neighbours that are contiguous on
    both sides into one copy (a page's layers, consecutive slots). Order is kept.

    Every range must lie inside its region (`src_size`, `dst_size`); with `same_region` (device to
    device inside the pool) no item's source may overlap its destination, and no destination may
    overlap another's: CUDA does not define the result of either. ValueError names the bad item."""
    out: list[list[int]] = []
    src_ranges: list[tuple[int, int]] = []
    dst_ranges: list[tuple[int, int]] = []
    for i, item in enumerate(items):
        if len(item) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in item):
            raise ValueError(f"copy {i}: expected (src_offset, dst_offset, nbytes) integers, got {item!r}")
        src, dst, n = item
        if n <= 0 or src < 0 or dst < 0:
            raise ValueError(f"copy {i}: offsets must be >= 0 and nbytes > 0, got {item!r}")
        if src + n > src_size:
            raise ValueError(f"copy {i}: source [{src}, {src + n}) lies outside {src_size} bytes")
        if dst + n > dst_size:
            raise ValueError(f"copy {i}: destination [{dst}, {dst + n}) lies outside {dst_size} bytes")
        if same_region:
            if src < dst + n and dst < src + n:
                raise ValueError(f"copy {i}: source and destination overlap: {item!r}")
            src_ranges.append((src, src + n))
            dst_ranges.append((dst, dst + n))
        if out and out[-1][0] + out[-1][2] == src and out[-1][1] + out[-1][2] == dst:
            out[-1][2] += n
        else:
            out.append([src, dst, n])
    if same_region:
        # Within one batch no copy may read what another writes, nor two write the same bytes:
        # merged neighbours would otherwise turn a chain a->b, b->c into one overlapping copy.
        dst_ranges.sort()
        for (_, hi), (lo, _) in zip(dst_ranges, dst_ranges[1:]):
            if lo < hi:
                raise ValueError(f"two copies of the batch write the same bytes at [{lo}, {hi})")
        starts = [lo for lo, _ in dst_ranges]
        for s_lo, s_hi in src_ranges:
            j = bisect.bisect_left(starts, s_hi)  # the destinations before j start below s_hi
            if j and dst_ranges[j - 1][1] > s_lo:
                raise ValueError(f"a copy reads [{s_lo}, {s_hi}) that a copy of the same batch writes")
    return [(s, d, n) for s, d, n in out]


# ---------------------------------------------------------------------------------------------- the pool


class HostRegion:
    """A host buffer the pool copies to and from: the DRAM arena's mmap (or any writable buffer).

    With `pin` it is page-locked for the device (cuMemHostRegister, portable), so copies run by DMA
    at full PCIe speed and truly asynchronously; pageable memory is staged by the driver at a fraction
    of that (scripts/gpu-check.sh measures both). Pinning needs RLIMIT_MEMLOCK >= the buffer's size.
    Close it before the buffer is unmapped."""

    def __init__(self, api: CudaApi, buffer: Any, *, pin: bool = True) -> None:
        view = memoryview(buffer)
        self.size = view.nbytes
        self._anchor: Any = (ctypes.c_char * self.size).from_buffer(view)  # keeps the buffer exported
        self.addr = ctypes.addressof(self._anchor)
        self.api = api
        self.pinned = False
        if pin:
            api.host_register(self.addr, self.size)
            self.pinned = True

    def close(self) -> None:
        if self.pinned:
            self.pinned = False
            self.api.host_unregister(self.addr)
        self._anchor = None


class VramPool:
    """One device allocation of `capacity` bytes, cut into page slots, exported to engines by one IPC
    handle, with batched copies on one non-blocking stream (one synchronisation per batch).

    `alloc`/`free` are the slot side (no CUDA call); `copy_within`, `to_host`, `from_host` move bytes;
    `export()` is what engines get. Offsets are relative to the start of the pool."""

    def __init__(self, api: CudaApi, device: int, capacity: int, slab_bytes: int) -> None:
        self.slots = PageSlots(capacity, slab_bytes)  # refuses a bad geometry before any CUDA call
        self.api, self.device, self.capacity = api, device, capacity
        self.info = api.device_info(device)
        api.use_device(device)
        try:
            self.base = api.malloc(capacity)
        except CudaError as err:
            free, total = api.mem_info()
            raise CudaError(
                f"allocating vram.capacity = {capacity / _GiB:.2f} GiB on GPU {device} ({self.info.name}: "
                f"{free / _GiB:.2f} of {total / _GiB:.2f} GiB free) -> cuMemAlloc",
                err.status,
                err.name,
                err.text,
            ) from None
        self.stream = 0
        try:
            self.stream = api.stream_create()
            self.handle = api.ipc_get(self.base)
        except BaseException:
            self._release()
            raise
        self._closed = False
        self.copied_bytes = {kind: 0 for kind in CopyKind}
        self.batches = 0

    # ---- slots (no CUDA)

    def alloc(self, page_bytes: int) -> int | None:
        return self.slots.alloc(page_bytes)

    def free(self, offset: int) -> None:
        self.slots.free(offset)

    def export(self) -> RegionHandle:
        return RegionHandle(self.handle, self.capacity, self.info.uuid, self.info.pci_bus_id)

    def export_dmabuf(self) -> int:
        """The whole pool as a dma-buf file descriptor, for an RDMA NIC to register (GPUDirect RDMA:
        `RdmaDevice.register_dmabuf`); the caller closes it once registered (the registration holds
        its own reference). CudaError / CudaUnavailable with the reason when this host cannot:
        the runtime API (no such call), a driver before CUDA 11.7, a GPU or kernel module without
        dma-buf support (`CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED` = 0: the proprietary kernel modules
        do not export dma-bufs; the open ones, 515+, on a kernel with CONFIG_DMABUF_MOVE_NOTIFY and
        PCI P2PDMA, do), or a pool not aligned to the host page size, which the call requires of
        both the address and the length."""
        self._check_open()
        page = os.sysconf("SC_PAGE_SIZE")
        if self.base % page or self.capacity % page:
            raise CudaError(
                "cuMemGetHandleForAddressRange",
                name="CUDA_ERROR_INVALID_VALUE",
                text=f"the pool ({self.capacity} bytes at {self.base:#x}) is not aligned to the "
                f"host page size ({page} bytes)",
            )
        self.api.use_device(self.device)
        if not self.api.dmabuf_supported(self.device):
            raise CudaError(
                "cuMemGetHandleForAddressRange",
                name="CUDA_ERROR_NOT_SUPPORTED",
                text=f"GPU {self.device} ({self.info.name}) cannot export dma-bufs "
                "(CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED = 0: needs the open NVIDIA kernel modules and "
                "a kernel with dma-buf peer-to-peer support)",
            )
        self.api.sync_memops(self.base)
        return self.api.export_dmabuf(self.base, self.capacity)

    # ---- bytes

    def register_host(self, buffer: Any, *, pin: bool = True) -> HostRegion:
        self.api.use_device(self.device)
        return HostRegion(self.api, buffer, pin=pin)

    def copy_within(self, items: Iterable[tuple[int, int, int]]) -> int:
        """Device to device inside the pool: (src_offset, dst_offset, nbytes). Returns bytes copied."""
        plan = plan_copies(items, self.capacity, self.capacity, same_region=True)
        return self._run(CopyKind.D2D, [(self.base + d, self.base + s, n) for s, d, n in plan])

    def to_host(self, host: HostRegion, items: Iterable[tuple[int, int, int]]) -> int:
        """Demotion: (pool_offset, host_offset, nbytes) from the pool into `host`."""
        plan = plan_copies(items, self.capacity, host.size)
        return self._run(CopyKind.D2H, [(host.addr + d, self.base + s, n) for s, d, n in plan])

    def from_host(self, host: HostRegion, items: Iterable[tuple[int, int, int]]) -> int:
        """Promotion: (host_offset, pool_offset, nbytes) from `host` into the pool."""
        plan = plan_copies(items, host.size, self.capacity)
        return self._run(CopyKind.H2D, [(self.base + d, host.addr + s, n) for s, d, n in plan])

    def fill(self, offset: int, nbytes: int, value: int = 0) -> None:
        plan_copies([(offset, offset, nbytes)], self.capacity, self.capacity)
        self._check_open()
        self.api.use_device(self.device)
        self.api.memset(self.base + offset, value, nbytes, self.stream)
        self.api.stream_sync(self.stream)

    def _run(self, kind: CopyKind, copies: Sequence[tuple[int, int, int]]) -> int:
        """Enqueue (dst_address, src_address, nbytes) copies, then wait once. On an error the stream
        is still synchronised before it is raised, so no copy of this batch lands later."""
        self._check_open()
        self.api.use_device(self.device)
        total = 0
        try:
            for dst, src, n in copies:
                self.api.copy_async(kind, dst, src, n, self.stream)
                total += n
        finally:
            self.api.stream_sync(self.stream)
        self.copied_bytes[kind] += total
        self.batches += 1
        return total

    def _check_open(self) -> None:
        if self._closed:
            raise CudaError("vram pool", name="closed")

    def close(self) -> None:
        if not getattr(self, "_closed", True):
            self._closed = True
            self._release()

    def _release(self) -> None:
        self.api.use_device(self.device)
        try:
            if self.stream:
                self.api.stream_sync(self.stream)
                self.api.stream_destroy(self.stream)
        finally:
            self.stream = 0
            self.api.free(self.base)

    def stats(self) -> dict[str, Any]:
        return {
            "capacity_bytes": self.capacity,
            "slot_bytes_used": self.slots.used_bytes,
            "slots": len(self.slots),
            "copied_bytes": {k.value: v for k, v in self.copied_bytes.items()},
            "batches": self.batches,
        }


class Staging:
    """A bounded host buffer through which bytes of the pool are looked at on the host: the
    checksums of L1 pages sent to peers over RDMA, and of pages a peer wrote into L1 by RDMA READ
    (GPUDirect), which never pass through host memory otherwise. Copies go D2H in chunks of at most
    `nbytes` (one batch, one stream synchronisation per chunk); one user at a time (a lock), so its
    memory is bounded whatever the traffic. Page-locked when RLIMIT_MEMLOCK allows (DMA at full
    speed), else pageable (the driver stages it). Close it before the pool."""

    def __init__(self, pool: VramPool, nbytes: int = 8 << 20) -> None:
        self.pool = pool
        self.buf = bytearray(max(4096, nbytes))
        try:
            self.host = pool.register_host(self.buf, pin=True)
        except CudaError:
            self.host = pool.register_host(self.buf, pin=False)
        self._lock = threading.Lock()
        self.bytes = 0  # copied through it so far (what verifying L1 pages costs in PCIe traffic)

    def checksums(self, ranges: Sequence[tuple[int, int]]) -> list[int]:
        """xxh3_64 of each (pool_offset, length) range of the pool, as `xxhash.xxh3_64_intdigest` of
        those bytes would be."""
        import xxhash

        hashers = [xxhash.xxh3_64() for _ in ranges]
        cap = len(self.buf)
        view = memoryview(self.buf)
        with self._lock:
            pieces: list[tuple[int, int, int, int]] = []  # (range index, pool offset, buffer offset, n)
            used = 0

            def flush() -> None:
                nonlocal used
                if pieces:
                    self.pool.to_host(self.host, [(src, at, n) for _, src, at, n in pieces])
                    for i, _, at, n in pieces:
                        hashers[i].update(view[at : at + n])
                    self.bytes += used
                    pieces.clear()
                used = 0

            for i, (offset, length) in enumerate(ranges):
                done = 0
                while done < length:
                    if used == cap:
                        flush()
                    n = min(length - done, cap - used)
                    pieces.append((i, offset + done, used, n))
                    used += n
                    done += n
            flush()
        return [h.intdigest() for h in hashers]

    def close(self) -> None:
        with self._lock:
            self.host.close()
