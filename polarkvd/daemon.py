"""The composition root: builds the daemon from a resolved config, runs it, shuts it down cleanly.

Owns start-up order (resource checks, directories, metrics endpoint, arena, L1 pool, disk tier,
manager, sockets), the periodic chores (lease expiry, disk index flush, systemd status and watchdog), signals
(SIGTERM/SIGINT: bounded graceful shutdown; SIGHUP: reload the config file), the systemd
notifications that go with them, and the order of shutdown. Holds no policy itself.

systemd sees: STATUS while starting, READY=1 once both sockets answer and the tiers are open,
WATCHDOG=1 from the event loop (a hung loop stops them and gets the daemon restarted), RELOADING=1
then READY=1 around a reload, STOPPING=1 at shutdown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import faulthandler
import logging
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import xxhash

from polarkvd import __version__
from polarkvd.config import LIVE_KNOBS, Config, load_config, option_fields, shown_knob
from polarkvd.config.values import format_size
from polarkvd.errors import EXIT_CONFIG, ConfigError, PolarKVError, ResourceError
from polarkvd.manager import Manager
from polarkvd.manager.knobs import apply_knobs
from polarkvd.metrics import MetricsServer, OpTimings, Snapshot, StatsCollector
from polarkvd.resources import check_resources
from polarkvd.sdnotify import Notifier
from polarkvd.seed import PageSeed, page_seed
from polarkvd.server.connection import RequestServer, claim_socket_path
from polarkvd.server.control import control_handlers
from polarkvd.server.engine import engine_api
from polarkvd.server.engine_events import EngineEvents
from polarkvd.server.engine_thread import EngineThreadServer
from polarkvd.tiers.dram import SlabAllocator
from polarkvd.transport.pipeline import SIGNAL_BOARD_BYTES, SignalBoard
from polarkvd.wire.arena import Arena
from polarkvd.wire.lookup_table import HEARTBEAT_SECONDS as TABLE_HEARTBEAT_SECONDS
from polarkvd.wire.lookup_table import LookupTable, table_bytes
from polarkvd.wire.lookup_table import table_entries as table_entries_for

log = logging.getLogger("polarkvd.daemon")

GiB = 1 << 30
STATUS_SECONDS = 5.0  # how often the one-line STATUS shown by `systemctl status` is refreshed
# Engine connection threads answer lookups while the loop runs other work: with CPython's default
# 5 ms GIL switch interval a lookup could wait that long behind the loop (docs/BENCHMARKS.md).
GIL_SWITCH_SECONDS = 0.0005
TOUCH_SECONDS = 0.02  # how often the loop applies the LRU touches of thread-side lookups at the latest
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ConfigSource:
    """Where the running config came from, so SIGHUP can build it again the same way.

    `loaded` is the config as loaded, before `resolve()` filled in paths and "auto" sizes: a reload
    compares against it, so an "auto" size that resolves differently now is not a change.
    """

    path: Path | None
    overrides: Mapping[str, object]
    loaded: Config


class Daemon:
    def __init__(
        self, cfg: Config, source: ConfigSource | None = None, notifier: Notifier | None = None
    ) -> None:
        self.cfg = cfg
        self.source = source
        self.notifier = notifier or Notifier(env={})
        self.stopping = asyncio.Event()
        self._forced = asyncio.Event()  # a second SIGTERM/SIGINT: stop waiting for disk writes
        self.ready = False
        self.manager: Manager | None = None
        self.timings = OpTimings()
        self.metrics_url = ""
        self.http: MetricsServer | None = None
        self._reload_pending = False
        self.reloads_ok = self.reloads_failed = 0
        self.last_reload_ok = True
        self.last_reload_time = 0.0
        self.restart_needed: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._cut_short = 0  # disk operations cancelled at shutdown
        self.cluster_keys: Any = None
        self.cluster: Any = None  # polarkvd.cluster.node.ClusterNode when [cluster] enabled
        self.pool: Any = None  # polarkvd.cluster.pool.ClusterPool, likewise
        self.transport: Any = None  # polarkvd.transport.rdma_probe.TransportChoice, likewise
        self.vram: Any = None  # polarkvd.tiers.vram.VramChoice: L1 or why not, decided at start
        self.seed: PageSeed | None = None  # the page-key seed, read (or created) at start

    def arena_path(self) -> Path:
        tag = xxhash.xxh3_64_hexdigest(str(Path(self.cfg.daemon.engine_socket).resolve()).encode())[:12]
        return Path(self.cfg.dram.shm_dir) / f"polarkv-{tag}.arena"

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        self._loop, self._loop_thread = loop, threading.get_ident()
        chores: list[asyncio.Task[None]] = []
        if self.notifier.watchdog_seconds:
            # From the first moment: start-up (disk verification) runs on this loop too.
            chores.append(asyncio.create_task(self._every(self.notifier.watchdog_seconds, self.notifier.watchdog, now=True)))  # fmt: skip
            log.debug("systemd watchdog: pinging every %.3fs", self.notifier.watchdog_seconds)
        self.notifier.status("starting: checking resources")
        try:
            problems = await loop.run_in_executor(None, check_resources, cfg)
            if problems:
                raise ResourceError(
                    "this machine cannot give what the config asks for:\n  "
                    + "\n  ".join(f"{k} = {v!r}: {why}" for k, v, why in problems)
                )
            if cfg.cluster.enabled:
                from polarkvd.cluster.node import load_keys

                self.cluster_keys = load_keys(cfg.cluster)  # a bad key file stops the start (exit 78)
                from polarkvd.transport.rdma_probe import describe_choice, probe_cluster

                self.transport = probe_cluster(cfg.cluster)  # transport = "rdma" without RDMA: exit 78
                log.info(
                    "%s", describe_choice(self.transport), extra={"transport": self.transport.kind.value}
                )
            # A broken, unreadable or world-readable seed file stops the start (exit 78).
            secret = self.cluster_keys.secret if self.cluster_keys is not None else None
            self.seed = page_seed(cfg.daemon.seed_file, secret)
            log.info("page-key seed %s (from %s)", self.seed.fingerprint, self.seed.source)
            self.vram = await loop.run_in_executor(None, self._probe_vram)
            engine_path = Path(cfg.daemon.engine_socket)
            control_path = Path(cfg.daemon.control_socket)
            for p in (engine_path, control_path):
                claim_socket_path(p)  # refuses when another daemon answers there
            metrics = None
            if cfg.metrics.enabled and cfg.metrics.address != "off":
                # Before the arena: a port in use fails the start at once, with the option's name.
                metrics = MetricsServer(cfg.metrics.address, StatsCollector(self._snapshot_from_thread))
                self.metrics_url = metrics.start()
            self.http = metrics  # `where` is served there too, once the handlers exist
            try:
                await self._serve(engine_path, control_path, chores)
            finally:
                if metrics is not None:
                    metrics.stop()
        finally:
            for task in chores:
                task.cancel()
            await asyncio.gather(*chores, return_exceptions=True)
            self.notifier.close()

    async def _serve(self, engine_path: Path, control_path: Path, chores: list[asyncio.Task[None]]) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        try:
            table_entries = table_entries_for(
                cfg.dram.capacity, cfg.dram.lookup_table_entries, cfg.disk.capacity if cfg.disk.enabled else 0
            )
            table_at = cfg.dram.capacity + SIGNAL_BOARD_BYTES
            table_size = table_bytes(table_entries, cfg.daemon.max_sessions)
            arena = Arena(
                self.arena_path(),
                table_at + table_size,  # page slots, the pipelined-load signals, the lookup table
                mode=cfg.daemon.engine_socket_mode,
                lock=cfg.dram.lock_memory,
            )
        except OSError as e:
            raise ResourceError(f"cannot create the DRAM arena: {e}") from None
        executor = concurrent.futures.ThreadPoolExecutor(cfg.disk.io_threads, thread_name_prefix="polarkv-io")
        disk = None
        pool = host = None  # L1: the GPU page pool and the arena registered with it (docs/VRAM.md)
        servers: list[RequestServer | EngineThreadServer] = []
        finished = False  # disk writes completed within the shutdown timeout
        table: LookupTable | None = None
        kv_events: Any = None
        engine_events: EngineEvents | None = None
        switch_interval = sys.getswitchinterval()
        try:
            if cfg.disk.enabled:
                from polarkvd.tiers.disk import DiskTier

                self.notifier.status(f"starting: verifying the disk tier at {cfg.disk.path}")
                disk = DiskTier(
                    Path(cfg.disk.path),
                    cfg.disk.capacity,
                    policy=cfg.disk.policy,
                    level=cfg.disk.compression_level,
                    min_ratio=cfg.disk.min_compression_ratio,
                    seed_fingerprint=self.seed.fingerprint if self.seed is not None else None,
                    readers=cfg.disk.io_threads,
                )
                try:
                    report = await loop.run_in_executor(executor, disk.open)
                except OSError as e:  # a path check at start passed, the file system said otherwise
                    raise ResourceError(
                        f"disk.path = {cfg.disk.path!r}: cannot open the disk tier: {e}"
                    ) from None
                log.info(
                    "disk tier %s: %d pages (%s of %s) verified in %.2fs; %d recovered, %d dropped",
                    cfg.disk.path, report.pages, format_size(report.stored_bytes), format_size(cfg.disk.capacity),
                    report.seconds, report.recovered, report.dropped,
                )  # fmt: skip
            pool, host = await self._open_vram(arena)
            allocator = SlabAllocator(cfg.dram.capacity, cfg.dram.slab_bytes)
            signals = SignalBoard(arena.view[cfg.dram.capacity : table_at])
            table = LookupTable(arena.view[table_at:], table_entries, cfg.daemon.max_sessions)
            manager = Manager(
                cfg,
                arena.view,
                allocator,
                disk,
                executor,
                signals=signals,
                table=table,
                vram=pool,
                vram_host=host,
                seed=self.seed.seed if self.seed is not None else None,
            )
            self.manager = manager

            engine_events = EngineEvents()  # engines' own KV event streams (server/engine_events.py)

            def on_close(conn: Any) -> None:
                if conn.session is not None:
                    engine_events.detach(conn.session)
                    manager.detach(conn.session)

            api = engine_api(
                manager,
                arena_path=str(arena.path),
                arena_size=arena.size,
                max_keys=cfg.daemon.max_keys_per_request,
                timings=self.timings,
                signal_offset=cfg.dram.capacity,
                table_offset=table_at,
                table_size=table_size,
                vram_region=pool.export().to_wire() if pool is not None else None,
                engine_events=engine_events,
            )
            engine_srv = EngineThreadServer(
                "engine",
                api.handlers,
                api.thread_handlers,
                max_frame_bytes=cfg.daemon.max_frame_bytes,
                on_close=on_close,
                before_loop_op=lambda conn: manager.apply_touches(conn.session),
                max_unattached=cfg.daemon.max_unattached_connections,
                max_connections=cfg.daemon.max_sessions + cfg.daemon.max_unattached_connections,
                hello_timeout=cfg.daemon.hello_timeout,
                counters=manager.counters,
            )
            sys.setswitchinterval(GIL_SWITCH_SECONDS)
            if cfg.cluster.enabled:
                self.cluster = self._start_cluster(manager, engine_events)
            if cfg.kv_events.enabled:  # vLLM KV events out (server/kv_events.py, docs/ROUTING.md)
                from polarkvd.server.kv_events import KvEventsPublisher

                kv_events = KvEventsPublisher(cfg.kv_events, manager)
                kv_events.start()
                chores.append(asyncio.create_task(self._every(cfg.kv_events.interval, kv_events.tick)))
            handlers = control_handlers(
                manager,
                cluster_report=self.cluster_report,
                vram_report=lambda: self.vram.as_dict() if self.vram is not None else None,
                where_cluster=lambda: (
                    (self.pool.node_id, self.pool.leading) if self.pool is not None else None
                ),
                engine_events=engine_events,
            )
            if self.http is not None:  # `where` over HTTP beside /metrics (docs/ROUTING.md)
                from polarkvd.server.where import http_route

                self.http.route("/where", http_route(asyncio.get_running_loop(), handlers["where"]))
            control_srv = RequestServer("control", handlers, max_frame_bytes=cfg.daemon.max_frame_bytes)
            servers = [engine_srv, control_srv]
            for srv, key, path, mode in (
                (engine_srv, "engine_socket", engine_path, cfg.daemon.engine_socket_mode),
                (control_srv, "control_socket", control_path, cfg.daemon.control_socket_mode),
            ):
                try:
                    await srv.start(path, mode)
                except OSError as e:
                    raise ResourceError(f"daemon.{key} = {str(path)!r}: cannot listen: {e}") from None
            chores.append(asyncio.create_task(self._every(1.0, manager.expire)))
            chores.append(asyncio.create_task(self._every(0.02, engine_events.tick)))
            chores.append(asyncio.create_task(self._every(1.0, manager.forget_idle_namespaces)))
            chores.append(asyncio.create_task(self._every(TOUCH_SECONDS, manager.apply_touches)))
            chores.append(asyncio.create_task(self._every(TOUCH_SECONDS, manager.apply_table_touches)))
            chores.append(asyncio.create_task(self._every(TABLE_HEARTBEAT_SECONDS, table.heartbeat)))
            # dram.high_watermark / low_watermark: background demotion (a no-op below the high mark)
            chores.append(asyncio.create_task(self._every(0.25, manager.enforce_watermarks)))
            if pool is not None:  # vram.high_watermark / low_watermark: L1 -> DRAM in the background
                chores.append(asyncio.create_task(self._every(0.25, manager.schedule_vram_demotion)))
                # vram.promote_after_loads: DRAM pages L1 engines keep loading go back into L1
                chores.append(asyncio.create_task(self._every(0.25, manager.schedule_vram_promotion)))
            if disk is not None:
                chores.append(
                    asyncio.create_task(
                        self._every(cfg.disk.index_flush_seconds, lambda: executor.submit(disk.flush_index))
                    )
                )
            if self.notifier.enabled:
                chores.append(asyncio.create_task(self._every(STATUS_SECONDS, self._refresh_status)))
            log.info(
                "polarkvd ready (pid %d): engine socket %s, control socket %s, DRAM arena %s (%s, policy %s), disk tier %s, metrics %s",
                os.getpid(), engine_path, control_path, arena.path, format_size(cfg.dram.capacity), cfg.dram.policy,
                f"{cfg.disk.path} ({format_size(cfg.disk.capacity)})" if disk is not None else "disabled",
                self.metrics_url or "disabled",
                extra={"metrics_url": self.metrics_url} if self.metrics_url else {},
            )  # fmt: skip
            self.ready = True
            self.notifier.ready(self.status_line())
            if self._reload_pending:
                self.reload()
            await self.stopping.wait()

            # ---- graceful shutdown, bounded by daemon.shutdown_timeout
            self.notifier.stopping("stopping: finishing disk writes")
            # Disk reads and writes cut short from here on complete their futures as cancelled; the
            # manager's callbacks then see CancelledError: expected at shutdown, not an error.
            loop.set_exception_handler(self._quiet_cancelled)
            await self._stop_cluster()
            started = time.monotonic()
            log.info(
                "shutting down: refusing new stores, finishing disk writes%s (at most %.0fs)",
                " and saving DRAM pages to disk" if disk is not None and cfg.disk.save_on_shutdown else "",
                cfg.daemon.shutdown_timeout,
            )
            finished = await self._bounded(self._save(manager, disk), cfg.daemon.shutdown_timeout)
            if not finished:  # the queued writes are cancelled below: those pages are not on disk
                log.warning(
                    "shutdown: disk writes did not finish within daemon.shutdown_timeout = %.0fs%s; "
                    "dropping the queued ones (pages already written stay, the index is saved)",
                    cfg.daemon.shutdown_timeout, " (second signal)" if self._forced.is_set() else "",
                )  # fmt: skip
            log.info("shutdown: disk writes done in %.2fs", time.monotonic() - started)
        finally:
            self.ready = False
            loop.set_exception_handler(self._quiet_cancelled)
            try:
                await self._stop_cluster()
            except Exception:
                log.exception("shutdown: leaving the cluster failed")
            if kv_events is not None:
                kv_events.close()
            if engine_events is not None:
                engine_events.close()
            if table is not None:
                table.close()  # engines ask the socket from now on, and learn that it is gone
            for srv in servers:
                await srv.stop()
            sys.setswitchinterval(switch_interval)
            # After a clean drain nothing is queued; after a timeout the queue is dropped and only
            # the writes already running (one page per I/O thread) are waited for.
            executor.shutdown(wait=True, cancel_futures=True)
            if self.manager is not None and self.manager.group_commit is not None:
                self.manager.group_commit.shutdown()  # write-through's own pool, the same way
            if disk is not None:
                try:
                    disk.close()  # saves the index, then releases the directory
                except OSError as e:
                    log.error(
                        "saving the disk index failed: %s (it is rebuilt from page headers at start)", e
                    )
            # the pool after every copy (the executor is done), the registration before the arena
            for part, what in ((host, "unregistering the arena"), (pool, "freeing the pool")):
                if part is not None:
                    try:
                        part.close()
                    except Exception as e:
                        log.error("shutdown: L1: %s failed: %s", what, e)
            arena.close()
            if self._cut_short:
                log.info("shutdown: %d queued disk operations were dropped", self._cut_short)
            log.info("polarkvd stopped", extra={"clean": finished})

    def _probe_vram(self) -> Any:
        """L1 or why not, as one `vram: ...` line (docs/VRAM.md). Runs in a thread: loading the CUDA
        library and cuInit can take a second. A host without CUDA (or a failing probe) serves on
        without L1; the line says why."""
        from polarkvd.tiers.vram import VramChoice, describe_choice, probe

        try:
            choice = probe(self.cfg.vram)
        except Exception as e:  # a bug or a broken driver must not keep DRAM and disk from serving
            log.exception("vram: the probe failed")
            choice = VramChoice(False, f"unavailable: the probe failed: {e}")
        state = "enabled" if choice.enabled else "disabled" if not self.cfg.vram.enabled else "unavailable"
        if choice.enabled:
            log.info("%s", describe_choice(choice), extra={"vram": state})
        elif state == "unavailable":
            log.warning("%s", describe_choice(choice), extra={"vram": state})
        else:
            log.info("%s", describe_choice(choice), extra={"vram": state})
        return choice

    async def _open_vram(self, arena: Arena) -> tuple[Any, Any]:
        """When the probe chose L1: allocate the pool (`VramPool`) and register the arena's page slots
        with it (`HostRegion`: page-locked, so demotions run by DMA). Without the pool the daemon
        serves from DRAM and disk (the reason goes into the log and `status`); without page-locking
        (RLIMIT_MEMLOCK below the arena) L1 runs with demotions through pageable memory, slower."""
        choice, cfg = self.vram, self.cfg
        if choice is None or not choice.enabled:
            return None, None
        from polarkvd.cuda import CudaError, load_api
        from polarkvd.tiers.vram import VramPool

        loop = asyncio.get_running_loop()
        v = cfg.vram
        try:  # cuMemAlloc of gigabytes takes a while: off the loop
            pool = await loop.run_in_executor(
                None, lambda: VramPool(load_api(v.cuda_api), v.device, v.capacity, v.slab_bytes)
            )
        except Exception as e:  # out of GPU memory (the error has free and total), a broken driver
            log.warning("L1 pool not allocated, serving without L1: %s", e, extra={"vram": "unavailable"})
            self.vram = dataclasses.replace(choice, enabled=False, reason=f"unavailable: {e}")
            return None, None
        slots = arena.view[: cfg.dram.capacity]
        try:
            host = pool.register_host(slots)
        except CudaError as e:
            soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
            why = str(e)
            if soft != resource.RLIM_INFINITY and soft < cfg.dram.capacity:
                why = (
                    f"RLIMIT_MEMLOCK is {format_size(soft)}, below the arena's {format_size(cfg.dram.capacity)} "
                    f"({e}); set LimitMEMLOCK=infinity in the service unit (systemd/polarkvd.service has it) "
                    "or `ulimit -l unlimited` before `polarkvd serve`"
                )
            log.warning(
                "L1: page-locking the DRAM arena for the GPU failed: %s. L1 runs on; demotions to DRAM copy "
                "through pageable memory, several times slower",
                why,
                extra={"vram_host": "pageable"},
            )
            try:
                host = pool.register_host(slots, pin=False)
            except Exception:
                pool.close()
                raise
        log.info(
            "L1 pool allocated: %s on GPU %d (%s); DRAM arena %s for demotions",
            format_size(v.capacity), v.device, pool.info.name, "page-locked" if host.pinned else "pageable",
        )  # fmt: skip
        return pool, host

    def _start_cluster(self, manager: Manager, engine_events: EngineEvents) -> Any:
        """Peer service and pool first (their address goes into our gossip metadata), then gossip."""
        from polarkvd.cluster.node import ClusterNode, advertised_host, tcp_url
        from polarkvd.cluster.pool import ClusterPool
        from polarkvd.config.values import split_address

        cfg = self.cfg
        pool = ClusterPool(
            cfg, manager.peers, self.cluster_keys, cfg.cluster.node_id, transport=self.transport
        )
        bound = pool.start()
        host, _ = split_address(cfg.cluster.data_address)
        data_address = tcp_url(advertised_host(host, cfg.cluster.advertise_host), bound.rsplit(":", 1)[1])
        manager.cluster = pool
        self.pool = pool

        def meta() -> dict[str, Any]:
            space = {**manager.tier_space(), **pool.space()}
            engines = engine_events.gossip_meta()  # their URLs, for `polarkvd route --discover`
            return {**{name: [used, cap] for name, (used, cap) in space.items()}, **engines}

        node = ClusterNode(
            cfg.cluster,
            self.cluster_keys,
            data_address=data_address,
            meta_source=meta,
            on_members=pool.on_members,
            extra_meta=pool.gossip_meta,
            seed_fingerprint=self.seed.fingerprint if self.seed is not None else "",
        )
        node.start()
        return node

    def cluster_report(self) -> dict[str, Any]:
        if self.cluster is None:
            return {"enabled": False}
        rep: dict[str, Any] = self.cluster.report(self.pool.report() if self.pool is not None else None)
        if self.transport is not None:
            rep["page_transport"] = self.transport.as_dict()
        return rep

    async def _stop_cluster(self) -> None:
        """Leave gracefully (peers record LEFT, not DEAD), then close the peer service."""
        node, self.cluster = self.cluster, None
        if node is not None:
            await node.stop()
        pool, self.pool = self.pool, None
        if pool is not None:
            if self.manager is not None:
                self.manager.cluster = None
            await pool.stop()

    async def _save(self, manager: Manager, disk: Any) -> None:
        if disk is not None and self.cfg.disk.save_on_shutdown:
            report = await manager.drain()  # refuses stores, writes DRAM pages, waits, saves the index
            log.info(
                "shutdown: %d DRAM pages written to disk", report.get("written_pages", 0),
                extra={"written_pages": report.get("written_pages", 0)},
            )  # fmt: skip
        else:
            manager.draining = True
            await manager.flush()

    async def _bounded(self, coro: Coroutine[Any, Any, None], timeout: float) -> bool:
        """Run `coro` for at most `timeout` seconds (less after a second signal). True if it finished."""
        task = asyncio.ensure_future(coro)
        forced = asyncio.ensure_future(self._forced.wait())
        try:
            done, _ = await asyncio.wait({task, forced}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            forced.cancel()
        if task in done:
            try:
                task.result()
            except Exception:
                log.exception("shutdown: saving pages failed")
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return False

    async def _every(self, seconds: float, fn: Callable[[], object], *, now: bool = False) -> None:
        """Call `fn` every `seconds` at a fixed rate (the watchdog must not drift late); after a
        stall it runs once at once, then keeps the rate, never in a burst."""
        loop = asyncio.get_running_loop()
        due = loop.time() + (0.0 if now else seconds)
        while True:
            delay = due - loop.time()
            # behind (fn takes longer than `seconds`): still yield once, or the loop serves nothing else
            await asyncio.sleep(max(delay, 0.0))
            try:
                fn()
            except Exception:
                log.exception("periodic chore failed")
            due = max(due + seconds, loop.time())

    # ------------------------------------------------------------------ signals

    def request_stop(self) -> None:
        if self.stopping.is_set():
            log.warning("second stop signal: not waiting for disk writes any longer")
            self._forced.set()
            return
        log.info("stop requested (signal)")
        self.stopping.set()

    def request_reload(self) -> None:
        if self.stopping.is_set():
            log.info("reload requested while stopping: ignored")
            return
        if not self.ready:
            log.info("reload requested while starting: it runs once the daemon is ready")
            self._reload_pending = True
            return
        self.reload()

    def reload(self) -> None:
        """SIGHUP: rebuild the config from the same file, environment and --set overrides; apply the
        live knobs that changed; report the other changes as needing a restart. An invalid file
        changes nothing."""
        self._reload_pending = False
        self.notifier.reloading()
        try:
            self._reload()
        except Exception:  # a bug here must not take the daemon down
            self.reloads_failed += 1
            self.last_reload_ok = False
            log.exception("reload failed; still running the previous configuration")
        finally:
            self.last_reload_time = time.time()
            self.notifier.ready(self.status_line())

    def _reload(self) -> None:
        if self.source is None or self.manager is None:
            log.warning("reload: this daemon was not started from a config source; nothing to reload")
            return
        path = self.source.path
        shown = str(path) if path is not None else "the built-in defaults (no --config)"
        try:
            new = load_config(path, overrides=self.source.overrides, tuning=True)
        except ConfigError as e:
            self.reloads_failed += 1
            self.last_reload_ok = False
            log.error(
                "reload refused, still running the previous configuration: %s has %d problem(s): %s",
                shown, len(e.problems), "; ".join(f"{k} = {v!r}: {why}" for k, v, why in e.problems),
                extra={"config": shown},
            )  # fmt: skip
            return
        running = self.manager.cfg
        changes = {n: (running.get(n), new.get(n)) for n in LIVE_KNOBS if new.get(n) != running.get(n)}
        try:  # the path `polarkvd tune` takes too (manager/knobs.py)
            apply_knobs(self.manager, {name: value for name, (_old, value) in changes.items()})
        except PolarKVError as e:
            self.reloads_failed += 1
            self.last_reload_ok = False
            log.error("reload refused, still running the previous configuration: %s: %s", shown, e)
            return
        base = self.source.loaded
        self.restart_needed = [
            n for n in option_fields() if n not in LIVE_KNOBS and new.get(n) != base.get(n)
        ]
        self.reloads_ok += 1
        self.last_reload_ok = True
        log.info(
            "reloaded %s: %s", shown,
            ", ".join(f"{n} {shown_knob(n, old)} -> {shown_knob(n, value)}" for n, (old, value) in changes.items())
            or "no live option changed",
            extra={"changed": ",".join(changes) or "-"},
        )  # fmt: skip
        if self.restart_needed:
            log.warning(
                "reload: %s changed in %s but only take(s) effect after a restart (systemctl restart "
                "polarkvd); running with %s",
                ", ".join(self.restart_needed), shown,
                ", ".join(f"{n} = {base.get(n)!r}" for n in self.restart_needed),
                extra={"restart_needed": ",".join(self.restart_needed)},
            )  # fmt: skip

    # ------------------------------------------------------------------ status and metrics

    def status_line(self) -> str:
        if self.manager is None:
            return "starting"
        st = self.manager.stats()
        c = st["counters"]
        dram = st["tiers"]["dram"]
        parts = [
            f"DRAM {dram['pages']} pages ({format_size(dram['bytes'])} of {format_size(dram['capacity_bytes'])})"
        ]
        disk = st["tiers"].get("disk")
        if disk is not None:
            parts.append(f"disk {disk['pages']} pages ({format_size(disk['bytes'])})")
        looked = c.get("lookup_pages", 0)
        hit = sum(c.get(f"hit_pages_{t}", 0) for t in ("vram", "dram", "disk", "remote"))
        parts.append(f"hit {hit / looked * 100:.1f}% of {looked} pages" if looked else "no lookups yet")
        parts.append(f"{len(st['sessions'])} engines")
        state = "draining" if st["draining"] else "serving" if self.ready else "stopping"
        return f"{state}: " + ", ".join(parts)

    def _quiet_cancelled(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Loop exception handler at shutdown: count disk operations cut short, report the rest."""
        if isinstance(context.get("exception"), asyncio.CancelledError):
            self._cut_short += 1
            return
        loop.default_exception_handler(context)

    def _refresh_status(self) -> None:
        self.notifier.status(self.status_line())

    def snapshot(self) -> Snapshot:
        """Everything a scrape shows; call on the event loop."""
        return Snapshot(
            stats=self.manager.stats() if self.manager is not None else None,
            timings={op: h.snapshot() for op, h in self.timings.ops.items()},
            ready=self.ready,
            reloads_ok=self.reloads_ok,
            reloads_failed=self.reloads_failed,
            last_reload_ok=self.last_reload_ok,
            last_reload_time=self.last_reload_time,
            restart_needed=len(self.restart_needed),
            version=__version__,
            cluster=self.cluster.member_counts() if self.cluster is not None else None,
        )

    def _snapshot_from_thread(self) -> Snapshot:
        """The metrics server's threads read the manager through the loop: it is not thread-safe."""
        return _call_on_loop(self._loop, self._loop_thread, self.snapshot)


def _call_on_loop(loop: asyncio.AbstractEventLoop | None, loop_thread: int, fn: Callable[[], T]) -> T:
    if loop is None or threading.get_ident() == loop_thread:
        return fn()
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

    loop.call_soon_threadsafe(run)
    return fut.result(timeout=10)  # a loop that does not answer in 10 s makes the scrape fail


def _run(coro: object) -> None:
    """Run on uvloop where it is installed: about twice the request rate of the stdlib loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
        return
    log.debug("event loop: uvloop %s", uvloop.__version__)
    uvloop.run(coro)  # type: ignore[arg-type]


def serve(cfg: Config, source: ConfigSource | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT; SIGHUP reloads from `source`. Returns the exit code."""
    # A watchdog kill (SIGABRT) or a crash in C code prints every thread's Python stack to stderr,
    # i.e. into the journal: where the loop hung.
    faulthandler.enable()
    notifier = Notifier()

    async def main() -> None:
        daemon = Daemon(cfg, source, notifier)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.request_stop)
        loop.add_signal_handler(signal.SIGHUP, daemon.request_reload)
        await daemon.run()

    try:
        _run(main())
    except PolarKVError as e:
        log.error("%s", e)
        notifier.status("failed: " + str(e).splitlines()[0])
        return EXIT_CONFIG
    except Exception:
        log.exception("polarkvd failed")
        return 1
    return 0
