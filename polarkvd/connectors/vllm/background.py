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

Pacing. On a host worker the load shares the cores and the memory bandwidth with the model: the
daemon decoding pages and this thread copying them at full speed doubled the decoding requests'
step times while it lasted (`polarkvd bench mixed`). So while the engine computes, a load moves
about `async_load_step_bytes` per step: it asks the daemon for a batch of pages that size (one
round trip, which also releases the batch before; the daemon reads its disk pages on one I/O thread),
copies it, and waits for the next step (`step`, called by the worker once per engine step). A step that
computes nothing (every request waits) lifts the limit, and so does an engine silent for
`IDLE_SECONDS`. The hit's request waits longer; the others barely notice it.
"""

from __future__ import annotations

import collections
import functools
import queue
import threading
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from vllm.logger import init_logger

from polarkvd.connectors.vllm.geometry import Geometry
from polarkvd.connectors.vllm.link import DaemonLink, call_daemon
from polarkvd.connectors.vllm.metadata import LoadSpec
from polarkvd.connectors.vllm.options import Options
from polarkvd.errors import LeaseExpired
from polarkvd.types import Namespace, Tier

if TYPE_CHECKING:
    from polarkvd.client import EngineClient, LoadResult
    from polarkvd.connectors.kv_copy import HostMover

logger = init_logger("vllm.polarkvd.connector")

#: A paced load goes on at full speed once the engine has not stepped for this long (it stopped
#: computing, or one step is a long prefill).
IDLE_SECONDS = 1.0


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
        # pacing: bytes this load may still move before the next engine step (inf: not paced now)
        self._step_bytes = opts.async_load_step_bytes
        self._allowance = float("inf")
        self._stepped = threading.Condition(self._lock)
        self.stats: collections.Counter[str] = collections.Counter()
        self.stats_seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._thread = threading.Thread(target=self._run, name="polarkv-bg-load", daemon=True)
        self._thread.start()

    def submit(self, specs: list[LoadSpec]) -> None:
        """Start loading `specs` (called in the step that scheduled them, after its `step`)."""
        with self._lock:
            self._pending += len(specs)
            if self._allowance != float("inf"):
                # paced: the first batch waits for the next step, like every later one. vLLM starts
                # loads after the step's forward pass, so a batch started now runs into the next
                # one, which then gets its own batch on top (1.4x its length, `bench mixed`)
                self._allowance = 0
        for spec in specs:
            self._jobs.put(spec)

    def step(self, computing: bool) -> None:
        """An engine step ended (or began): while it computes other requests, a load may move one
        more batch of `async_load_step_bytes`; otherwise it is not held back."""
        if not self._step_bytes:
            return
        with self._stepped:
            self._allowance = self._step_bytes if computing else float("inf")
            self._stepped.notify_all()

    def _wait_allowance(self, page_bytes: int) -> float:
        """Bytes the next batch may move, waiting for the next step while less than a page may (or
        less than a step's worth, when a page is larger than that: then one page per step)."""
        if not self._step_bytes:
            return float("inf")
        deadline = time.monotonic() + IDLE_SECONDS
        with self._stepped:
            while self._allowance < min(page_bytes, self._step_bytes):
                left = deadline - time.monotonic()
                if left <= 0:  # the engine is not stepping: nothing to give way to
                    self._allowance = float("inf")
                    break
                self.stats["load_paced_waits"] += 1
                self._stepped.wait(left)
            return self._allowance

    def _spend(self, nbytes: int) -> None:
        if self._step_bytes:
            with self._stepped:
                self._allowance -= nbytes

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
        self._step_bytes = 0  # no more steps come: finish at full speed
        with self._stepped:
            self._stepped.notify_all()
        self._jobs.put(None)
        self._thread.join(timeout=60)
        self.link.close()

    def _run(self) -> None:
        # this thread's session of the default namespace now, not in the step that schedules the first
        # hit: connecting and attaching took ~4 ms of CPU there, beside the model (`bench mixed`)
        try:
            self._client("")
        except Exception as e:  # noqa: BLE001 - the first load tries again; this thread must live
            logger.warning("polarkvd: the background loads' daemon session did not open (%r)", e)
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
        """Fetch the pages of `spec` and copy them into its blocks, a batch of pages at a time (paced):
        how many blocks arrived (a prefix).

        One daemon round trip per batch: the lease of a batch copied out is released by the next
        batch's `load`, and the last one's on its own. A lease that expired before its release may
        have let its pages be reused while they were copied: that batch and the rest are recomputed."""
        client = self._client(spec.salt)
        if client is None or self.rank >= len(spec.keys):
            return 0
        g = self.geo
        keys = spec.keys[self.rank]
        page_bytes = g.num_layers * g.page_blocks * g.block_bytes
        # which vLLM blocks each page fills: (block in page, vLLM block) per page
        fills: list[list[tuple[int, int]]] = [[] for _ in keys]
        for i, block in enumerate(spec.block_ids):
            p, j = divmod(spec.skip + i, g.page_blocks)
            if p < len(fills):
                fills[p].append((j, block))
        got = start = 0
        held: int | None = None  # the lease of the batch copied last, not released yet
        held_blocks = 0  # the blocks copied under it (not sure until it is released)
        while start < len(keys):
            allowance = self._wait_allowance(page_bytes)
            n = len(keys) - start
            if allowance < n * page_bytes:
                n = max(1, int(allowance) // page_bytes)
            paced = allowance != float("inf")  # the daemon reads a paced batch on one I/O thread
            arrived, lease, ok = self._load_batch(
                client, keys[start : start + n], fills[start : start + n], held, paced
            )
            if not ok:  # the lease before had expired: its batch may be stale (and this one never came)
                return got
            got += held_blocks
            held, held_blocks = lease, sum(len(f) for f in fills[start : start + arrived])
            self._spend(arrived * page_bytes)
            if arrived < n:  # the rest is not there (evicted, daemon gone): recomputed
                break
            start += n
        if held is not None and not self._release(client, held):
            return got
        return got + held_blocks

    def _release(self, client: EngineClient, lease: int) -> bool:
        """Release a lease whose pages were copied: False if it had expired (the copies may be stale)."""
        return (
            call_daemon(self.link, "release", functools.partial(_release, client, lease), self.stats_seconds)
            is not _EXPIRED
        )

    def _client(self, salt: str) -> EngineClient | None:
        """This thread's daemon session for the namespace of `salt` (None: the daemon is down)."""
        ns = self._namespaces.get(salt)
        if ns is None:
            ns = self._namespaces[salt] = self.geo.namespace(salt, self.rank)
        return self.link.session(ns)

    def _load_batch(
        self,
        client: EngineClient,
        keys: list[bytes],
        fills: list[list[tuple[int, int]]],
        release: int | None,
        serial: bool,
    ) -> tuple[int, int | None, bool]:
        """Ask the daemon for `keys` (releasing the lease `release` first, in the same round trip) and
        copy each page into its blocks: (pages that arrived, their lease, whether `release` was still
        held: False when it had expired, and then nothing was loaded)."""
        result = call_daemon(
            self.link, "load", functools.partial(_load, client, keys, release, serial), self.stats_seconds
        )
        if result is _EXPIRED:
            return 0, None, False
        if result is None:
            return 0, None, True
        g = self.geo
        pages: list[np.ndarray[tuple[int, int, int], np.dtype[np.uint8]]] = []
        try:
            for tier, view in zip(result.tiers, result.views):
                if tier is Tier.VRAM:  # a host worker never maps the GPU pool
                    break
                pages.append(
                    np.frombuffer(view, np.uint8).reshape(g.num_layers, g.page_blocks, g.block_bytes)
                )
            items = [(p, j, block) for p in range(len(pages)) for j, block in fills[p]]
            for layer, rows in enumerate(self._rows):
                if rows is not None:  # a plain memory copy per block (numpy lets go of the GIL)
                    for p, j, block in items:
                        rows[block] = pages[p][layer, j]
                else:  # strided blocks: torch's typed copy
                    self.mover.load_layer(
                        layer, [(torch.from_numpy(pages[p][layer, j]), block) for p, j, block in items]
                    )
        except BaseException:
            pages.clear()
            if result.lease is not None:
                self._release(client, result.lease)
            raise
        arrived = len(pages)
        pages.clear()  # drop the views of the arena: the next batch's load releases their pins
        result.views.clear()
        return arrived, result.lease, True


#: A lease had expired before its release (`_load`, `_release`): what was copied under it may be stale.
_EXPIRED = object()


def _load(client: EngineClient, keys: list[bytes], release: int | None, serial: bool) -> LoadResult | object:
    try:
        return client.load(keys, release=release, serial=serial)
    except LeaseExpired as e:
        logger.warning("polarkvd: a background load's pages may have changed while copied (%s)", e)
        return _EXPIRED


def _release(client: EngineClient, lease: int) -> object:
    try:
        client.release(lease)
    except LeaseExpired as e:
        logger.warning("polarkvd: a background load's pages may have changed while copied (%s)", e)
        return _EXPIRED
    return None
