"""Loads beside the model: pages a request needs from disk or from a peer, fetched and copied into
its blocks on a thread of their own while vLLM goes on computing the other requests.

vLLM's asynchronous loads: the scheduler side answers `get_num_new_matched_tokens` with "load
asynchronously" when part of the hit is on the disk tier or on a peer (a promotion or a fetch takes
tens to hundreds of milliseconds; a DRAM hit is a memory copy and stays in the step). vLLM then holds
the request in WAITING_FOR_REMOTE_KVS with its blocks allocated, and schedules it once the worker's
`get_finished` names it; blocks that did not arrive are reported through
`get_block_ids_with_load_errors` no later than that, and vLLM recomputes from the first of them.

The thread has its own daemon sessions (an `EngineClient` is not thread-safe): it asks the daemon
for the pages (the daemon promotes them from disk or fetches them from the peer and answers once they
are in DRAM), copies them into vLLM's KV tensors and lets the pages go. Only host KV caches are
loaded so (one plain memory copy per block with numpy, outside torch's thread pool, which the
model's forward pass holds meanwhile; into blocks no forward pass touches while the request
waits); a CUDA worker loads such requests in the step instead (`WorkerSide`), where layer-pipelined
loads already hide the transfer behind the model's compute.
"""

from __future__ import annotations

import collections
import functools
import queue
import threading
from typing import TYPE_CHECKING

import numpy as np
import torch
from vllm.logger import init_logger

from polarkvd.connectors.vllm.geometry import Geometry
from polarkvd.connectors.vllm.link import DaemonLink, call_daemon
from polarkvd.connectors.vllm.metadata import LoadSpec
from polarkvd.connectors.vllm.options import Options
from polarkvd.types import Namespace, Tier

if TYPE_CHECKING:
    from polarkvd.connectors.kv_copy import HostMover

logger = init_logger("vllm.polarkvd.connector")


class BackgroundLoads:
    """The worker's loads that vLLM runs asynchronously (see the module docstring)."""

    def __init__(self, geo: Geometry, opts: Options, mover: HostMover, rank: int) -> None:
        self.geo = geo
        self.rank = rank
        self.mover = mover
        self.link = DaemonLink(opts, "worker-bg")
        # numpy views of the KV layers (contiguous blocks), for copies that never enter torch's thread
        # pool: the model's forward pass holds it meanwhile, and an OpenMP copy would wait for it
        self._rows: list[np.ndarray[tuple[int, int], np.dtype[np.uint8]] | None] = [
            None if rows is None else rows.numpy() for rows in mover.rows
        ]
        self._namespaces: dict[str, Namespace] = {}
        self._jobs: queue.SimpleQueue[LoadSpec | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done: set[str] = set()  # requests whose load ended, not reported yet
        self._failed: set[int] = set()  # their blocks that did not arrive
        self._pending = 0  # specs submitted and not ended
        self.stats: collections.Counter[str] = collections.Counter()
        self.stats_seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._thread = threading.Thread(target=self._run, name="polarkv-bg-load", daemon=True)
        self._thread.start()

    def submit(self, specs: list[LoadSpec]) -> None:
        with self._lock:
            self._pending += len(specs)
        for spec in specs:
            self._jobs.put(spec)

    def take_done(self) -> tuple[set[str], set[int]]:
        """(requests whose load ended since the last call, their blocks that did not arrive)."""
        with self._lock:
            done, self._done = self._done, set()
            failed, self._failed = self._failed, set()
        return done, failed

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def close(self) -> None:
        """Finish the loads submitted (each ends, loaded or failed), then close the sessions."""
        self._jobs.put(None)
        self._thread.join(timeout=60)
        self.link.close()

    def _run(self) -> None:
        while True:
            spec = self._jobs.get()
            if spec is None:
                return
            got = 0
            try:
                got = self._load(spec)
            except Exception as e:  # noqa: BLE001 - a failed load is recomputed, never raised into vLLM
                logger.warning("polarkvd: a background load for request %s failed (%r)", spec.req_id, e)
                got = 0
            failed = spec.block_ids[got:]
            self.stats["load_blocks"] += got
            self.stats["load_failed_blocks"] += len(failed)
            if failed:
                logger.warning(
                    "polarkvd: request %s got %d of %d blocks from the daemon; vLLM recomputes the other %d",
                    spec.req_id, got, len(spec.block_ids), len(failed),
                )  # fmt: skip
            with self._lock:
                self._done.add(spec.req_id)
                self._failed.update(failed)
                self._pending -= 1

    def _load(self, spec: LoadSpec) -> int:
        """Fetch the pages of `spec` and copy them into its blocks: how many blocks arrived (a prefix)."""
        ns = self._namespaces.get(spec.salt)
        if ns is None:
            ns = self._namespaces[spec.salt] = self.geo.namespace(spec.salt, self.rank)
        client = self.link.session(ns)
        if client is None or self.rank >= len(spec.keys):
            return 0
        result = call_daemon(
            self.link, "load", functools.partial(client.load, spec.keys[self.rank]), self.stats_seconds
        )
        if result is None:
            return 0
        g = self.geo
        pages: list[np.ndarray[tuple[int, int, int], np.dtype[np.uint8]]] = []
        items: list[tuple[int, int, int]] = []  # (page, block in page, vLLM block)
        try:
            for tier, view in zip(result.tiers, result.views):
                if tier is Tier.VRAM:  # a host worker never maps the GPU pool
                    break
                pages.append(
                    np.frombuffer(view, np.uint8).reshape(g.num_layers, g.page_blocks, g.block_bytes)
                )
            for i, block in enumerate(spec.block_ids):
                p, j = divmod(spec.skip + i, g.page_blocks)
                if p >= len(pages):
                    break
                items.append((p, j, block))
            for layer, rows in enumerate(self._rows):
                if rows is not None:  # a plain memory copy per block (numpy lets go of the GIL)
                    for p, j, block in items:
                        rows[block] = pages[p][layer, j]
                else:  # strided blocks: torch's typed copy
                    self.mover.load_layer(
                        layer, [(torch.from_numpy(pages[p][layer, j]), block) for p, j, block in items]
                    )
            return len(items)
        finally:
            pages.clear()  # drop the views of the arena before the pins go
            items.clear()
            if result.lease is not None:
                call_daemon(self.link, "release", functools.partial(client.release, result.lease))
