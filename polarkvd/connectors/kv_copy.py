"""Moving KV bytes between an engine's per-layer KV cache tensors and polarkvd pages.

What it owns: the worker-side byte movers of the engine connectors. A mover copies one layer's slice
of a batch of blocks at a time, between the engine's KV tensors (`[num_blocks, ...]` per layer, in any
physical layout) and page slices (flat uint8 tensors of one block's bytes, in the block's logical
order): `HostMover` for KV caches in host memory (vLLM CPU), `CudaMover` for KV caches on a CUDA
device, where a page slice is either in the daemon's shared-memory arena (L2: host memory) or in its
GPU page pool (L1: device memory, opened through CUDA IPC). `ArenaRegistry` page-locks this process's
mapping of the arena for the GPU (cuMemHostRegister), so CUDA copies run by DMA straight between the
arena and the device instead of through a pinned staging buffer.

What it must not do: import vLLM or any other engine (it is tested without one: on CPU here, with
CUDA tensors on a GPU machine); talk to the daemon (pages and sessions come from the connector; the
only client calls are reading the arena mapping and hooking its unmap); run CUDA calls at import time
(CPU-only machines import it); make a page visible or release a lease before the copies that touch it
have completed (the caller commits after `finish_saves` and releases after `end_load`).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["ArenaRegistry", "CudaMover", "HostMover", "Item", "driver_registrar"]

log = logging.getLogger("vllm.polarkvd.kv_copy")  # under "vllm." so vLLM's logging config applies

#: One copy: (page slice, engine block). The page slice is a flat uint8 tensor of one block's bytes
#: for one layer (an arena page in host memory, or an L1 pool page on a device).
Item = tuple[torch.Tensor, int]


class HostMover:
    """KV layers in host memory: one `copy_` per (layer, block) between the tensor and the arena page.

    `rows[l][b]` is block b of layer l as uint8 (a view, never a copy) when the block is contiguous
    (vLLM CPU, LBHNC); otherwise the typed strided block view is copied from a typed view of the page.
    A layer tensor with `num_blocks * r` rows on dim 0 (kernel block splitting) is handled as r
    sub-blocks per block.
    """

    def __init__(self, layers: list[torch.Tensor], num_blocks: int, block_bytes: int) -> None:
        self.device = layers[0].device
        self.block_bytes = block_bytes
        self.blocks: list[torch.Tensor] = []
        self.rows: list[torch.Tensor | None] = []
        for kv in layers:
            t = kv if kv.shape[0] == num_blocks else kv.unflatten(0, (num_blocks, -1))
            self.blocks.append(t)
            if t.is_contiguous():
                rows = t.view(torch.uint8).view(num_blocks, block_bytes)
                assert rows.data_ptr() == kv.data_ptr()
                self.rows.append(rows)
            else:
                self.rows.append(None)
        #: Bytes moved, by path ("load_vram", "load_direct", "load_staged", "save_..."): CUDA only.
        self.copied: collections.Counter[str] = collections.Counter()

    def _typed(self, layer: int, page_slice: torch.Tensor) -> torch.Tensor:
        block = self.blocks[layer][0]
        return page_slice.view(block.dtype).view(block.shape)

    def use_arena(self, client: Any) -> bool:
        """Prepare direct copies with `client`'s arena mapping; False: none needed or possible."""
        return False

    def begin_load(self) -> None:
        pass

    def load_layer(self, layer: int, items: Sequence[Item]) -> None:
        rows = self.rows[layer]
        if rows is not None:
            for src, block in items:
                rows[block].copy_(src)
        else:
            blocks = self.blocks[layer]
            for src, block in items:
                blocks[block].copy_(self._typed(layer, src))

    def layer_ready(self, layer: int) -> None:
        pass

    def end_load(self) -> None:
        pass

    def save_layer(self, layer: int, items: Sequence[Item]) -> None:
        rows = self.rows[layer]
        if rows is not None:
            for dst, block in items:
                dst.copy_(rows[block])
        else:
            blocks = self.blocks[layer]
            for dst, block in items:
                self._typed(layer, dst).copy_(blocks[block])

    def finish_saves(self) -> None:
        pass

    def quiesce(self) -> None:
        """Wait for every copy in flight (before the memory they touch may go away)."""

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------ arena registration

Register = Callable[[int, int], None]  # (address, bytes); raises when the driver refuses
Unregister = Callable[[int], None]


def driver_registrar(device_index: int) -> tuple[Register, Unregister]:
    """cuMemHostRegister / cuMemHostUnregister through polarkvd's driver-API binding, in the primary
    context of `device_index` (the one torch uses). The driver API rather than torch's cudart: a
    refused registration then leaves no "last error" behind for the runtime, which torch would
    otherwise report at its next kernel launch check, far from here."""

    def api() -> Any:
        from polarkvd.cuda import load_api  # ctypes, loaded at first use

        a = load_api()
        a.use_device(device_index)
        return a

    def register(addr: int, nbytes: int) -> None:
        api().host_register(addr, nbytes)

    def unregister(addr: int) -> None:
        api().host_unregister(addr)

    return register, unregister


def _address(view: memoryview) -> int:
    anchor = ctypes.c_char.from_buffer(view)  # needs a writable buffer; released at once below
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


class ArenaRegistry:
    """This process's arena mappings page-locked for the GPU: one registration per mapping.

    A mapping is registered the first time a session on it is used (`ensure`) and unregistered just
    before the client library unmaps it (its last session closed: `EngineClient.on_arena_unmap`),
    after `before_unregister` (the mover's: wait for copies in flight) — never later, since a new
    mapping may then reuse the addresses. A refusal (RLIMIT_MEMLOCK, no driver, permissions) is
    logged once with the reason; copies then go through pinned staging buffers as before. One
    registry per process should own a mapping: CUDA refuses to register a range twice
    (CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED), so a second mover in the same process stages.
    """

    def __init__(
        self, register: Register, unregister: Unregister, before_unregister: Callable[[], None]
    ) -> None:
        self._register = register
        self._unregister = unregister
        self._before_unregister = before_unregister
        self._lock = threading.Lock()
        self._spans: dict[int, int] = {}  # start -> end of each registered mapping
        self._refused_at: set[int] = set()  # mappings already refused (not asked again)
        self.refused = ""  # the first refusal's reason ("" while none)

    @property
    def registered(self) -> int:
        """How many arena mappings are page-locked now."""
        return len(self._spans)

    def ensure(self, client: Any) -> bool:
        """Register `client`'s arena mapping unless it is already (or was refused); True when it is."""
        view = client.arena
        addr, nbytes = _address(view), view.nbytes
        with self._lock:
            if addr in self._spans:
                return True
            if addr in self._refused_at:
                return False
        try:
            self._register(addr, nbytes)
        except Exception as e:  # noqa: BLE001 - any refusal: the staging path still works
            with self._lock:
                self._refused_at.add(addr)
                first = not self.refused
                self.refused = self.refused or str(e)
            client.on_arena_unmap(lambda a=addr: self._forget_refusal(a))
            (log.warning if first else log.debug)(
                "polarkvd: cannot page-lock the DRAM arena for the GPU (%s); copies between the arena "
                "and CUDA KV blocks go through pinned staging buffers (one extra host copy)",
                e,
            )
            return False
        with self._lock:
            self._spans[addr] = addr + nbytes
        client.on_arena_unmap(lambda a=addr: self._drop(a))
        log.info("polarkvd: DRAM arena (%d MiB) page-locked: CUDA copies run by DMA", nbytes >> 20)
        return True

    def covers(self, ptr: int) -> bool:
        for start, end in self._spans.items():
            if start <= ptr < end:
                return True
        return False

    def _forget_refusal(self, addr: int) -> None:
        with self._lock:
            self._refused_at.discard(addr)

    def _drop(self, addr: int) -> None:
        with self._lock:
            if self._spans.pop(addr, None) is None:
                return
        try:
            self._before_unregister()
        finally:
            try:
                self._unregister(addr)
            except Exception as e:  # noqa: BLE001 - the mapping goes anyway; nothing else to undo
                log.warning("polarkvd: unregistering the DRAM arena from CUDA failed: %s", e)

    def close(self) -> None:
        for addr in list(self._spans):
            self._drop(addr)


# ------------------------------------------------------------------------------------------ CUDA


class CudaMover(HostMover):
    """KV layers on a CUDA device; every copy is `non_blocking` on a side stream.

    Per page slice, by where it is:
      * on a device (L1, the daemon's pool): device to device;
      * in a page-locked arena mapping (`use_arena` registered it): DMA straight between the arena and
        the device ("direct");
      * otherwise (registration refused): through pinned staging buffers ("staged"). Loads: a CPU copy
        into a staging buffer, then host to device; two buffers alternate between layers, so filling
        layer l+1's overlaps layer l's transfer. Saves: device to staging, into the arena in
        `finish_saves`.
    Loads record one event per layer, which the compute stream waits on in `layer_ready` (the host
    never blocks there); `end_load` waits for all of them (the caller releases the lease after).
    Saves wait for the compute stream's writes (an event), and `finish_saves` waits for every copy
    (the caller commits after). `copied` counts bytes by path. `quiesce` waits for what is in flight.
    A lock orders enqueueing against `quiesce`, so a load thread cannot slip a copy in between the
    wait and an unregistration.
    """

    def __init__(
        self,
        layers: list[torch.Tensor],
        num_blocks: int,
        block_bytes: int,
        *,
        direct: bool = True,
        registrar: tuple[Register, Unregister] | None = None,
    ) -> None:
        super().__init__(layers, num_blocks, block_bytes)
        self.stream = torch.cuda.Stream(device=self.device)
        self._lock = threading.RLock()
        self._load_stage: list[torch.Tensor] = []
        self._load_events: list[torch.cuda.Event | None] = [None] * len(layers)
        self._save_stage: list[torch.Tensor | None] = [None] * len(layers)  # grow-only, per layer
        self._save_jobs: list[tuple[torch.cuda.Event, list[tuple[torch.Tensor, torch.Tensor]]]] = []
        self.arenas: ArenaRegistry | None = None
        if direct:
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            register, unregister = registrar or driver_registrar(index)
            self.arenas = ArenaRegistry(register, unregister, self.quiesce)

    def _pinned(self, n: int) -> torch.Tensor:
        return torch.empty((n, self.block_bytes), dtype=torch.uint8, pin_memory=True)

    def use_arena(self, client: Any) -> bool:
        return self.arenas is not None and self.arenas.ensure(client)

    def _direct(self, t: torch.Tensor) -> bool:
        return self.arenas is not None and self.arenas.covers(t.data_ptr())

    def quiesce(self) -> None:
        with self._lock:
            self.stream.synchronize()

    # -- loads

    def begin_load(self) -> None:
        """Order this step's loads after work already queued on the compute stream (block zeroing)."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def load_layer(self, layer: int, items: Sequence[Item]) -> None:
        rows, blocks = self.rows[layer], self.blocks[layer]
        staged: list[Item] = []
        with self._lock, torch.cuda.stream(self.stream):
            for src, block in items:
                if src.is_cuda:
                    path = "load_vram"
                elif self._direct(src):
                    path = "load_direct"
                else:
                    staged.append((src, block))
                    continue
                if rows is not None:
                    rows[block].copy_(src, non_blocking=True)
                else:
                    blocks[block].copy_(self._typed(layer, src), non_blocking=True)
                self.copied[path] += src.numel()
            if staged:
                self._load_staged(layer, staged)
            event = torch.cuda.Event()
            event.record(self.stream)
        self._load_events[layer] = event

    def _load_staged(self, layer: int, items: Sequence[Item]) -> None:
        n = len(items)
        slot = layer % 2
        while len(self._load_stage) <= slot:
            self._load_stage.append(self._pinned(0))
        prev = self._load_events[layer - 2] if layer >= 2 else None
        if prev is not None:
            prev.synchronize()  # the buffer we are about to refill has reached the device
        if self._load_stage[slot].shape[0] < n:
            self._load_stage[slot] = self._pinned(n)
        stage = self._load_stage[slot]
        for i, (src, _) in enumerate(items):
            stage[i].copy_(src)
        blocks = self.blocks[layer]
        for i, (_, block) in enumerate(items):
            blocks[block].copy_(self._typed(layer, stage[i]), non_blocking=True)
        self.copied["load_staged"] += n * self.block_bytes

    def layer_ready(self, layer: int) -> None:
        event = self._load_events[layer]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def end_load(self) -> None:
        for event in self._load_events:
            if event is not None:
                event.synchronize()
        self._load_events = [None] * len(self._load_events)

    # -- saves

    def save_layer(self, layer: int, items: Sequence[Item]) -> None:
        written = torch.cuda.Event()
        written.record(torch.cuda.current_stream(self.device))
        rows, blocks = self.rows[layer], self.blocks[layer]
        staged: list[Item] = []
        with self._lock, torch.cuda.stream(self.stream):
            self.stream.wait_event(written)
            for dst, block in items:
                if dst.is_cuda:
                    path = "save_vram"
                elif self._direct(dst):
                    path = "save_direct"
                else:
                    staged.append((dst, block))
                    continue
                if rows is not None:
                    dst.copy_(rows[block], non_blocking=True)
                else:
                    self._typed(layer, dst).copy_(blocks[block], non_blocking=True)
                self.copied[path] += dst.numel()
            pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
            if staged:
                stage = self._save_stage[layer]
                if stage is None or stage.shape[0] < len(staged):  # drained by finish_saves every step
                    stage = self._save_stage[layer] = self._pinned(len(staged))
                for i, (dst, block) in enumerate(staged):
                    self._typed(layer, stage[i]).copy_(blocks[block], non_blocking=True)
                    pairs.append((dst, stage[i]))
                self.copied["save_staged"] += len(staged) * self.block_bytes
            done = torch.cuda.Event()
            done.record(self.stream)
        self._save_jobs.append((done, pairs))

    def finish_saves(self) -> None:
        """Wait for every save copy; staged ones are copied into the arena. The caller commits after."""
        jobs, self._save_jobs = self._save_jobs, []
        for done, pairs in jobs:
            done.synchronize()
            for dst, staged in pairs:
                dst.copy_(staged)

    def close(self) -> None:
        self.quiesce()
        if self.arenas is not None:
            self.arenas.close()
