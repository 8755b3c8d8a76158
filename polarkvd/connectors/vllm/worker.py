"""The worker side: runs the plan. Loads pages from the daemon and stores new ones, with
`kv_copy.py`'s movers copying bytes between vLLM's KV tensors and the pages (arena or L1)."""

from __future__ import annotations

import collections
import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from vllm.logger import init_logger

from polarkvd.client import EngineClient
from polarkvd.connectors.kv_copy import CudaMover, HostMover
from polarkvd.connectors.vllm.background import BackgroundLoads
from polarkvd.connectors.vllm.geometry import Geometry
from polarkvd.connectors.vllm.link import DaemonLink, call_daemon
from polarkvd.connectors.vllm.metadata import LoadSpec, PolarKVMetadata
from polarkvd.connectors.vllm.options import Options, copy_mode
from polarkvd.errors import DaemonUnavailable
from polarkvd.types import Namespace, Tier
from polarkvd.wire.frames import Reserved

if TYPE_CHECKING:
    pass


# Under "vllm." so vLLM's logging config (format, VLLM_LOGGING_LEVEL) applies to our lines too.
logger = init_logger("vllm.polarkvd.connector")


class _Load:
    """One step's loads: the pinned pages, what to copy where, and (layer mode) the copying thread.

    Items are (page [L, pb, bytes], block in page, vLLM block); `items` are arena pages (host memory),
    `device_items` L1 pages (CUDA tensors over the daemon's pool), complete when `load` answers.
    """

    def __init__(self, num_layers: int) -> None:
        self.items: list[tuple[torch.Tensor, int, int]] = []
        self.device_items: list[tuple[torch.Tensor, int, int]] = []
        # pipelined loads: the daemon's answers, and per item (answer index, page index in it)
        self.results: list[Any] = []
        self.origin: list[tuple[int, int]] = []
        self.device_origin: list[tuple[int, int]] = []
        self.usable: list[int] = []  # pages of each answer that arrive whole (shrinks on failure)
        self.leases: list[tuple[EngineClient, int]] = []
        self.l1_clients: list[EngineClient] = []  # sessions whose pool the device items are in
        self.blocks_by_req: dict[str, list[int]] = {}
        self.done = [threading.Event() for _ in range(num_layers)]
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.seconds = 0.0

    def layer_items(self, layer: int) -> list[tuple[torch.Tensor, int]]:
        if self.results:  # pipelined: wait until this layer of every usable page is there
            for r, result in enumerate(self.results):
                self.usable[r] = min(self.usable[r], result.wait_layers(layer + 1))
            return [
                (page[layer, j], block)
                for (page, j, block), (r, p) in zip(self.items, self.origin)
                if p < self.usable[r]
            ]
        return [(page[layer, j], block) for page, j, block in self.items]

    def device_layer_items(self, layer: int) -> list[tuple[torch.Tensor, int]]:
        return [(page[layer, j], block) for page, j, block in self.device_items]

    def lost_blocks(self) -> set[int]:
        """vLLM blocks of pages a pipelined load announced but could not deliver (to recompute)."""
        return {
            block
            for items, origin in ((self.items, self.origin), (self.device_items, self.device_origin))
            for (_, _, block), (r, p) in zip(items, origin)
            if p >= self.usable[r]
        }


class _Save:
    """One step's saves: reserved pages per session and what to copy into them."""

    def __init__(self) -> None:
        self.items: list[tuple[torch.Tensor, int, int, str]] = []  # (page, block in page, vLLM block, req)
        self.reserved: dict[int, tuple[EngineClient, list[tuple[bytes, str]]]] = {}  # id(client) -> keys
        self.l1_clients: list[EngineClient] = []  # sessions with pages reserved in their L1 pool
        self.layers_done: set[int] = set()
        self.error: BaseException | None = None  # a copy failed: abort everything reserved
        self.existing = 0
        self.no_space = 0
        self.l1_pages = 0


def _l1_gone(clients: Sequence[EngineClient]) -> BaseException | None:
    """An error when a session's L1 pool was unmapped since its pages were handed out (the daemon
    went away mid-step): nothing may be copied to or from those pages any more."""
    if any(not c.vram for c in clients):
        return DaemonUnavailable("the daemon's GPU page pool was unmapped mid-step (daemon unreachable)")
    return None


class WorkerSide:
    def __init__(self, geo: Geometry, opts: Options) -> None:
        self.geo = geo
        self.opts = opts
        self.link = DaemonLink(opts, "worker")
        self.rank = 0
        self.mover: HostMover | None = None
        # the copy modes in use: `Options` resolved ("auto") once the KV caches' device is known
        self.load_mode = copy_mode(opts.load_mode, cuda=False)
        self.save_mode = copy_mode(opts.save_mode, cuda=False)
        self._index: dict[str, int] = {name: i for i, name in enumerate(geo.layer_names)}
        self._namespaces: dict[tuple[str, int], Namespace] = {}
        self._load: _Load | None = None
        self._save: _Save | None = None
        self._errors: set[int] = set()
        self._failed_reqs: set[str] = set()
        #: loads vLLM runs asynchronously: on their own thread (host KV caches), else in the step
        self.background: BackgroundLoads | None = None
        self._finished_now: set[str] = set()  # asynchronous loads done in the step, to report
        self.disabled = ""
        self.stats: collections.Counter[str] = collections.Counter()
        self.stats_seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
        #: Fault injection for tests: called with this step's LoadSpecs before the daemon is asked.
        self.before_load: Callable[[list[LoadSpec]], None] | None = None

    def _session(self, salt: str) -> tuple[EngineClient | None, Namespace]:
        ns = self._namespaces.get((salt, self.rank))
        if ns is None:
            ns = self._namespaces[(salt, self.rank)] = self.geo.namespace(salt, self.rank)
        client = self.link.session(ns)
        if client is not None and self.mover is not None:
            self.mover.use_arena(client)  # page-locks its arena mapping once (CUDA workers)
        return client, ns

    def _page(self, view: memoryview) -> torch.Tensor:
        g = self.geo
        return torch.frombuffer(view, dtype=torch.uint8).view(g.num_layers, g.page_blocks, g.block_bytes)

    def _pool_page(self, pools: dict[int, Any], client: EngineClient, offset: int) -> torch.Tensor | None:
        """The L1 page at `offset` of `client`'s pool (a CUDA tensor), None when the pool is not mapped."""
        pool = pools.get(id(client))
        if pool is None:
            pool = pools[id(client)] = client.pool_tensor()
            if pool is None:
                return None
        g = self.geo
        return pool[offset : offset + client.page_bytes].view(g.num_layers, g.page_blocks, g.block_bytes)

    # -- registration

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self.rank = int(get_tensor_model_parallel_rank())
        except Exception:  # noqa: BLE001 - no TP group (single process): rank 0
            self.rank = 0
        g = self.geo
        missing = [n for n in g.layer_names if n not in kv_caches]
        if missing:
            self.disabled = f"vLLM registered no KV cache for layers {missing[:3]}"
        else:
            layers = [kv_caches[n] for n in g.layer_names]
            first = layers[0]
            blocks = first.shape[0]
            slice_bytes = (
                first[0].numel()
                * first.element_size()
                * (1 if blocks == g.num_blocks else blocks // g.num_blocks)
            )
            if (
                blocks % g.num_blocks
                or slice_bytes != g.block_bytes
                or str(first.dtype).removeprefix("torch.") != g.dtype
            ):
                self.disabled = (
                    f"unexpected KV cache tensor {tuple(first.shape)} {first.dtype} for {g.num_blocks} blocks "
                    f"of {g.block_bytes} bytes"
                )
            elif first.is_cuda and torch.cuda.is_available():
                self.mover = CudaMover(layers, g.num_blocks, g.block_bytes)
                self.link.vram = self.opts.vram
                self.link.before_close = self.mover.quiesce
                self.load_mode = copy_mode(self.opts.load_mode, cuda=True)
                self.save_mode = copy_mode(self.opts.save_mode, cuda=True)
            elif first.device.type == "cpu":
                self.mover = HostMover(layers, g.num_blocks, g.block_bytes)
                if self.opts.async_loads:
                    self.background = BackgroundLoads(g, self.opts, self.mover, self.rank)
            else:
                self.disabled = f"KV caches on {first.device.type} are not supported"
        if self.disabled:
            logger.error(
                "PolarKVConnector disabled on this worker: %s; every planned load is recomputed",
                self.disabled,
            )
        else:
            logger.info(
                "PolarKVConnector: %d layers, pages of %d tokens (%d bytes), layout %s, model %s, daemon %s, "
                "copies: loads per %s, stores per %s",
                g.num_layers, g.page_tokens, g.num_layers * g.page_blocks * g.block_bytes, g.layout, g.model, self.link.path,
                self.load_mode, self.save_mode,
            )  # fmt: skip
            # Attach now (maps the arena, page-locks it on CUDA) rather than in the first request's step.
            client, _ = self._session("")
            if client is not None and client.vram:
                logger.info("PolarKVConnector: using the daemon's GPU page pool (L1) on %s", first.device)

    # -- loads

    def start_load(self, meta: PolarKVMetadata) -> None:
        if self.background is not None:  # once per step (vLLM calls it in every step, even empty ones)
            self.background.step(meta.computing)
        if not meta.loads:
            return
        if self.before_load is not None:
            self.before_load(meta.loads)
        specs = meta.loads
        later = [spec for spec in specs if spec.background]
        if later:
            if self.background is not None:
                self.background.submit(later)
                specs = [spec for spec in specs if not spec.background]
            else:  # loaded in this step like the others (CUDA: layer-pipelined), reported done after it
                self._finished_now.update(spec.req_id for spec in later)
        load = _Load(self.geo.num_layers)
        pb = self.geo.page_blocks
        pools: dict[int, Any] = {}
        for spec in specs:
            got = 0
            client = None if self.disabled or self.mover is None else self._session(spec.salt)[0]
            if client is not None:
                keys = spec.keys[self.rank] if self.rank < len(spec.keys) else []
                pipelined = self.load_mode == "layer"
                result = call_daemon(
                    self.link,
                    "load",
                    functools.partial(client.load, keys, pipelined=pipelined),
                    self.stats_seconds,
                )
                if result is not None:
                    if result.lease is not None:
                        load.leases.append((client, result.lease))
                    pages: list[tuple[torch.Tensor, bool]] = []  # (page, in L1)
                    for off, tier, view in zip(result.offsets, result.tiers, result.views):
                        if tier is Tier.VRAM:
                            page = self._pool_page(pools, client, off)
                            if page is None:  # not mapped here (cannot happen while attached): recompute
                                break
                            if not load.l1_clients or load.l1_clients[-1] is not client:
                                load.l1_clients.append(client)
                            pages.append((page, True))
                        else:
                            pages.append((self._page(view), False))
                    r = len(load.results)
                    if pipelined:
                        load.results.append(result)
                        load.usable.append(len(pages))
                    for i, block in enumerate(spec.block_ids):
                        p, j = divmod(spec.skip + i, pb)
                        if p >= len(pages):
                            break
                        page, on_device = pages[p]
                        (load.device_items if on_device else load.items).append((page, j, block))
                        if pipelined:
                            (load.device_origin if on_device else load.origin).append((r, p))
                        if on_device:
                            self.stats["load_blocks_vram"] += 1
                        got += 1
            load.blocks_by_req[spec.req_id] = spec.block_ids[:got]
            self.stats["load_blocks"] += got
            if got < len(spec.block_ids):
                failed = spec.block_ids[got:]
                self._errors.update(failed)
                self._failed_reqs.add(spec.req_id)
                self.stats["load_failed_blocks"] += len(failed)
                logger.warning(
                    "polarkvd: request %s got %d of %d blocks from the daemon; vLLM recomputes the other %d",
                    spec.req_id, got, len(spec.block_ids), len(failed),
                )  # fmt: skip
        pools.clear()
        if not load.items and not load.device_items:
            self._release(load)
            return
        assert self.mover is not None
        self._load = load
        self.mover.begin_load()
        if load.device_items:
            # L1 pages are whole already: queued here, on the thread whose daemon calls could unmap
            # the pool (the link waits for queued copies before it closes a session), never later.
            load.error = _l1_gone(load.l1_clients)
            t0 = time.perf_counter()
            try:
                if load.error is None:
                    for layer in range(self.geo.num_layers):
                        self.mover.load_layer(layer, load.device_layer_items(layer))
            except Exception as e:  # noqa: BLE001 - reported as load errors, never raised into vLLM
                load.error = e
            load.seconds += time.perf_counter() - t0
        if not load.items:
            for done in load.done:
                done.set()
        elif self.load_mode == "layer":
            load.thread = threading.Thread(
                target=self._copy_loads, args=(load,), name="polarkv-load", daemon=True
            )
            load.thread.start()
        else:
            self._copy_loads(load)

    def _copy_loads(self, load: _Load) -> None:
        assert self.mover is not None
        t0 = time.perf_counter()
        try:
            for layer in range(self.geo.num_layers):
                try:
                    if load.error is None:
                        self.mover.load_layer(layer, load.layer_items(layer))
                except BaseException as e:  # noqa: BLE001 - reported as load errors, never raised into vLLM
                    load.error = e
                finally:
                    load.done[layer].set()
        finally:
            load.seconds += time.perf_counter() - t0

    def wait_layer(self, name: str) -> None:
        load = self._load
        if load is None:
            return
        layer = self._index.get(name)
        if layer is None:
            return
        load.done[layer].wait()
        if self.mover is not None and load.error is None:
            self.mover.layer_ready(layer)

    def _finish_load(self) -> None:
        load, self._load = self._load, None
        if load is None:
            return
        if load.thread is not None:
            load.thread.join()
        if self.mover is not None:
            try:
                self.mover.end_load()
                if load.error is not None:
                    self.mover.quiesce()  # a copy that failed half-way may have left others queued
            except Exception as e:  # noqa: BLE001 - a device error: the blocks are recomputed
                load.error = load.error or e
        lost = load.lost_blocks() if load.results else set()
        if lost and load.error is None:
            logger.warning(
                "polarkvd: %d blocks did not arrive (a peer or the disk failed mid-transfer); vLLM recomputes them",
                len(lost),
            )
            self._errors.update(lost)
            self.stats["load_failed_blocks"] += len(lost)
            for req_id, blocks in load.blocks_by_req.items():
                if lost.intersection(blocks):
                    self._failed_reqs.add(req_id)
        if load.error is not None:
            logger.warning(
                "polarkvd: copying loaded pages failed (%r); vLLM recomputes those blocks", load.error
            )
            for req_id, blocks in load.blocks_by_req.items():
                if blocks:
                    self._errors.update(blocks)
                    self._failed_reqs.add(req_id)
        else:
            n = len(load.items) + len(load.device_items)
            self.stats["load_copied_bytes"] += n * self.geo.num_layers * self.geo.block_bytes
            self.stats_seconds["load_copy"] += load.seconds
        self._release(load)

    def _release(self, load: _Load) -> None:
        load.items.clear()  # drop the tensors over the arena (and the pool) before the pins go
        load.device_items.clear()
        for client, lease in load.leases:
            call_daemon(self.link, "release", functools.partial(client.release, lease), self.stats_seconds)

    def take_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    def take_finished_loads(self) -> set[str]:
        """Requests whose asynchronous load ended since the last call (their lost blocks are in
        `take_errors` from now on, as vLLM requires)."""
        done, self._finished_now = self._finished_now, set()
        if self.background is not None:
            ended, failed = self.background.take_done()
            done |= ended
            self._errors |= failed
        return done

    # -- saves

    def _reserve(self, meta: PolarKVMetadata) -> _Save:
        save = _Save()
        if self.disabled or self.mover is None:
            return save
        pb = self.geo.page_blocks
        pools: dict[int, Any] = {}
        for spec in meta.saves:
            if spec.req_id in self._failed_reqs or self.rank >= len(spec.keys):
                continue
            client, _ = self._session(spec.salt)
            if client is None:
                continue
            keys = spec.keys[self.rank]
            parent = spec.parents[self.rank]
            if client.vram:  # L1 slots first (device to device), DRAM where the pool has no room
                reply = call_daemon(
                    self.link,
                    "reserve",
                    functools.partial(client.reserve_tiers, keys, parent, Tier.VRAM),
                    self.stats_seconds,
                )
                offsets, tiers = reply if reply is not None else (None, b"")
            else:
                offsets = call_daemon(
                    self.link,
                    "reserve",
                    functools.partial(client.reserve, keys, parent),
                    self.stats_seconds,
                )
                tiers = b""
            if offsets is None:
                continue
            entry = save.reserved.setdefault(id(client), (client, []))
            for p, (key, off) in enumerate(zip(keys, offsets)):
                if off < 0:
                    save.existing += off == Reserved.EXISTS
                    save.no_space += off == Reserved.NO_SPACE
                    continue
                if tiers and tiers[p] == Tier.VRAM:
                    page = self._pool_page(pools, client, off)
                    if page is None:  # cannot happen while attached; the slot is aborted
                        save.error = save.error or DaemonUnavailable("the GPU page pool is not mapped")
                        entry[1].append((key, spec.req_id))
                        continue
                    if client not in save.l1_clients:
                        save.l1_clients.append(client)
                    save.l1_pages += 1
                else:
                    page = self._page(client.page(off))
                entry[1].append((key, spec.req_id))
                for j in range(pb):
                    save.items.append((page, j, spec.block_ids[p * pb + j], spec.req_id))
        return save

    def _copy_save_layer(self, save: _Save, layer: int) -> None:
        assert self.mover is not None
        if layer in save.layers_done or not save.items:
            return
        gone = _l1_gone(save.l1_clients)
        if gone is not None:
            raise gone
        save.layers_done.add(layer)
        self.mover.save_layer(layer, [(page[layer, j], block) for page, j, block, _ in save.items])

    def save_layer(self, name: str, meta: PolarKVMetadata) -> None:
        if self.save_mode != "layer" or not meta.saves:
            return
        layer = self._index.get(name)
        if layer is None:
            return
        if self._save is None:
            t0 = time.perf_counter()
            self._save = self._reserve(meta)
            self.stats_seconds["save_reserve"] += time.perf_counter() - t0
        if self._save.error is not None:
            return
        t0 = time.perf_counter()
        try:
            self._copy_save_layer(self._save, layer)
        except Exception as e:  # noqa: BLE001 - never raised into vLLM: the step's stores are aborted
            self._save.error = e
        self.stats_seconds["save_copy"] += time.perf_counter() - t0

    def wait_save(self, meta: PolarKVMetadata | None) -> None:
        """The end of every step: finish this step's loads, store its completed pages."""
        self._finish_load()
        try:
            if meta is not None and meta.saves:
                self._store(meta)
        finally:
            self._save = None
            self._failed_reqs = set()

    def _store(self, meta: PolarKVMetadata) -> None:
        t0 = time.perf_counter()
        save = self._save if self._save is not None else self._reserve(meta)
        self._save = None
        t1 = time.perf_counter()
        try:
            if save.error is None:
                for layer in range(self.geo.num_layers):
                    self._copy_save_layer(save, layer)
        except Exception as e:  # noqa: BLE001 - a failed copy aborts the step's stores, nothing else
            save.error = e
        if self.mover is not None:
            # Every copy into a reserved slot ends before its commit or abort: an aborted L1 slot is
            # handed to the next writer at once.
            try:
                self.mover.finish_saves()
                if save.error is not None:
                    self.mover.quiesce()
            except Exception as e:  # noqa: BLE001 - a device error: nothing is committed
                save.error = save.error or e
        ok = save.error is None
        if not ok:
            logger.warning(
                "polarkvd: copying blocks to store failed (%r); this step's pages are not stored", save.error
            )
        t2 = time.perf_counter()
        copied = len(save.items)
        save.items.clear()
        for client, entries in save.reserved.values():
            good = [k for k, req in entries if ok and req not in self._failed_reqs]
            bad = [k for k, req in entries if not ok or req in self._failed_reqs]
            if (
                bad
                and call_daemon(self.link, "abort", functools.partial(client.abort, bad), self.stats_seconds)
                is not None
            ):
                self.stats["save_aborted_pages"] += len(bad)
            done = good and call_daemon(
                self.link, "commit", functools.partial(client.commit_result, good), self.stats_seconds
            )
            if done:
                self.stats["saved_pages"] += done.committed
                if done.durable is not None and done.durable < done.committed:  # write-through fell short
                    self.stats["saved_pages_not_durable"] += done.committed - done.durable
        if ok and save.l1_pages:
            self.stats["saved_pages_vram"] += save.l1_pages
        self.stats["save_existing_pages"] += save.existing
        self.stats["save_no_space_pages"] += save.no_space
        self.stats["save_copied_bytes"] += copied * self.geo.block_bytes * len(save.layers_done)
        self.stats_seconds["save_copy"] += t2 - t1
        self.stats_seconds["save_total"] += time.perf_counter() - t0

    def close(self) -> None:
        self._finish_load()
        if self.background is not None:
            self.background.close()
        self.link.close()
        if self.mover is not None:
            self.mover.close()
