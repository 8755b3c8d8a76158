"""`PolarKVStorage`: SGLang's HiCache storage backend (`HiCacheStorage`) on polarkvd.

Built by SGLang's `dynamic` backend factory as `PolarKVStorage(storage_config, kwargs)`, then handed
the host pool (`register_mem_pool_host`). Pages move between SGLang's host pool and the daemon's
shared-memory arena by `memmove` over the pool's own buffer metadata (`get_page_buffer_meta`): one
copy per buffer, nothing through the socket.

What it must not do: raise into SGLang's prefetch, prefetch I/O or backup threads, or return None
from a v1 call (SGLang's prefetch thread does not survive it). Every daemon problem (down, restarted,
a page evicted between `batch_exists` and `batch_get_v1`) is a miss; the link reconnects by itself.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket as _socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import xxhash
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, PoolTransferResult

from polarkvd.config.machine import default_engine_socket
from polarkvd.connectors.sglang.geometry import PagePlan, check_storage_config, plan_pages
from polarkvd.connectors.sglang.link import DaemonLink, Session
from polarkvd.connectors.sglang.options import Options
from polarkvd.errors import ConfigError, DaemonUnavailable, ErrorCode, LeaseExpired, PolarKVError
from polarkvd.wire.frames import Reserved

log = logging.getLogger("polarkvd.connectors.sglang")
_memmove = ctypes.memmove
_KEY_CACHE = 1 << 16  # mapped keys remembered (batch_exists then batch_get_v1 map the same keys)
_METRICS_KEEP = 4096  # entries of each SGLang metrics list kept between two get_stats calls
T = TypeVar("T")


class PolarKVStorage(HiCacheStorage):
    """HiCache L3 storage in the host's polarkvd daemon (and, through it, its cluster)."""

    def __init__(self, storage_config: Any, kwargs: dict[str, Any] | None = None) -> None:
        self.storage_config = storage_config
        self.opts, unknown = Options.from_extra(getattr(storage_config, "extra_config", None))
        check_storage_config(storage_config)
        if unknown:
            log.warning(
                "polarkvd: extra config keys %s are not polarkvd options (socket, timeout, "
                "commit_timeout, retry_seconds, model_fingerprint, engine_id); ignored",
                unknown,
            )
        self.socket_path = self.opts.socket or str(default_engine_socket())
        tp = getattr(storage_config, "tp_rank", 0)
        pp = getattr(storage_config, "pp_rank", 0)
        self.engine_id = self.opts.engine_id or (
            f"sglang-{_socket.gethostname()}-{os.getpid()}-tp{tp}" + (f"-pp{pp}" if pp else "")
        )
        self.plan: PagePlan | None = None
        self.link: DaemonLink | None = None
        self.mem_pool_host: Any = None
        self._keys: dict[str, bytes] = {}
        self._keys_digest = b""
        self._stats_lock = threading.Lock()
        self.counters: dict[str, float] = dict.fromkeys(
            (
                "exists_calls exists_keys exists_hits get_pages get_hits get_bytes get_seconds "
                "set_pages set_stored set_existing set_failed set_skipped set_bytes set_seconds "
                "errors"
            ).split(),
            0,
        )
        self._metrics: dict[str, list[float]] = {
            k: [] for k in ("prefetch_pgs", "backup_pgs", "prefetch_bandwidth", "backup_bandwidth")
        }
        self._warned: set[str] = set()

    # -- start -------------------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """The host pool whose pages are stored: the page plan and namespace come from it (refused
        with the reason when polarkvd cannot store its pages), then the first session attaches."""
        self.mem_pool_host = mem_pool_host
        plan = plan_pages(self.storage_config, mem_pool_host, self.opts.model_fingerprint)
        if self.link is not None:
            self.link.close()
        self.plan = plan
        self.link = DaemonLink(
            plan.namespace,
            self.socket_path,
            self.engine_id,
            self.opts.timeout,
            self.opts.commit_timeout,
            self.opts.retry_seconds,
        )
        ns = plan.namespace
        log.info(
            "polarkvd HiCache storage: daemon at %s, model %s, %s %s, %d layers x %d x %d, %d-token "
            "pages of %d bytes, TP %d/%d%s",
            self.socket_path,
            ns.model,
            ns.layout,
            ns.dtype,
            ns.num_layers,
            ns.num_kv_heads,
            ns.head_dim,
            ns.page_tokens,
            ns.page_bytes,
            getattr(self.storage_config, "tp_rank", 0),
            ns.tp_size,
            "" if plan.writer else " (MLA: another rank writes, this one reads)",
        )
        # Attach now: a daemon that refuses this namespace stops the start. Then let go: this thread
        # (SGLang's scheduler) does not call storage again, and an idle session would keep a
        # restarted daemon's old arena mapped.
        self.link.session()
        if self.link.refused:
            raise ConfigError([("model", ns.model, self.link.refused)])
        self.link.drop_current()

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        """Hybrid models register their extra pools (Mamba, SWA, indexer, ...) here; only the KV pool
        itself (registered again by SGLang's KV-only stack) is stored."""
        if str(host_pool_name) == "kv" and (host_pool is self.mem_pool_host or self.mem_pool_host is None):
            super().register_mem_host_pool_v2(host_pool, host_pool_name)
            return
        raise ConfigError(
            [
                (
                    "model",
                    f"host pool {host_pool_name} ({type(host_pool).__name__})",
                    "hybrid models (Mamba, sliding-window or indexer pools beside the KV pool, "
                    "SGLang's v2 storage interface) are not supported by polarkvd yet",
                )
            ]
        )

    # -- plumbing ----------------------------------------------------------------------------------

    def _count(self, **inc: float) -> None:
        with self._stats_lock:
            for k, v in inc.items():
                self.counters[k] += v

    def _metric(self, name: str, value: float) -> None:
        with self._stats_lock:
            m = self._metrics[name]
            m.append(value)
            if len(m) > _METRICS_KEEP:
                del m[: len(m) - _METRICS_KEEP]

    def _once(self, what: str, message: str, *args: object) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(message, *args)
        else:
            log.debug(message, *args)

    def _call(self, what: str, fn: Callable[[Session], T], default: T) -> T:
        """Run `fn` with this thread's session; `default` (a miss) instead of any exception."""
        link = self.link
        if link is None or self.plan is None:
            return default
        s = link.session()
        if s is None:
            return default
        with s.lock:
            if s.closed:
                return default
            try:
                return fn(s)
            except DaemonUnavailable as e:
                link.failed(e)
            except PolarKVError as e:
                self._count(errors=1)
                if e.code is ErrorCode.DRAINING:
                    log.debug("polarkvd is draining: %s skipped", what)
                else:
                    self._once(f"{what}:{e.code}", "polarkvd %s failed: %s", what, e)
            except Exception as e:  # noqa: BLE001 - never into SGLang's threads
                self._count(errors=1)
                if what not in self._warned:
                    self._warned.add(what)
                    log.exception("polarkvd %s failed (%r); treated as a miss", what, e)
        return default

    def _map(self, s: Session, keys: Sequence[str]) -> list[bytes]:
        """polarkvd page keys of SGLang's keys: xxh3-128 over the namespace digest (keyed with the
        daemon's secret seed) and the key's 32 bytes. SGLang's keys already chain (each names its
        prefix, `cache_salt` and extra key included), so the page key does too."""
        digest = s.client.ns_digest
        cache = self._keys
        if self._keys_digest != digest or len(cache) > _KEY_CACHE:
            cache = self._keys = {}
            self._keys_digest = digest
        h = xxhash.xxh3_128_digest
        out = []
        for k in keys:
            m = cache.get(k)
            if m is None:
                try:
                    raw = b"h" + bytes.fromhex(k)
                except (TypeError, ValueError):
                    raw = b"s" + str(k).encode()
                m = cache[k] = h(digest + raw)
            out.append(m)
        return out

    def _page_buffers(self, host_indices: Any, pages: int) -> list[tuple[int, int]] | None:
        """(pointer, size) of every buffer of `pages` pages at `host_indices`, page by page in the
        flat page's order; None (warned once) when SGLang's metadata does not match the plan."""
        plan = self.plan
        assert plan is not None
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        per = plan.buffers_per_page
        if len(ptrs) != per * pages or len(sizes) != len(ptrs):
            self._once("meta", "polarkvd: %d buffers for %d pages (expected %d each)", len(ptrs), pages, per)
            return None
        out = []
        for p in range(pages):
            for j, size in zip(plan.order, plan.sizes):
                if int(sizes[p * per + j]) != size:
                    self._once(
                        "meta-size",
                        "polarkvd: page buffer of %s bytes, expected %d",
                        sizes[p * per + j],
                        size,
                    )
                    return None
                out.append((int(ptrs[p * per + j]), size))
        return out

    # -- zero-copy interface (interface_v1) ----------------------------------------------------------

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        """Pages of the longest prefix of `keys` held anywhere in the cluster (L1, DRAM, disk, peers)."""
        if not keys:
            return 0

        def op(s: Session) -> int:
            return s.client.lookup(self._map(s, keys)).hits

        hits = self._call("lookup", op, 0)
        self._count(exists_calls=1, exists_keys=len(keys), exists_hits=hits)
        return hits

    def batch_get_v1(self, keys: list[str], host_indices: Any, extra_info: Any = None) -> list[bool]:
        """Copy the longest loadable prefix of `keys` into the host pool at `host_indices`; one bool
        per key (a prefix of True)."""
        n = len(keys)
        if not n:
            return []
        t0 = time.perf_counter()
        got = self._call("load", lambda s: self._load(s, keys, lambda i: None, host_indices), 0)
        took = time.perf_counter() - t0
        nbytes = got * (self.plan.page_bytes if self.plan else 0)
        self._count(get_pages=n, get_hits=got, get_bytes=nbytes, get_seconds=took)
        if got:
            self._metric("prefetch_pgs", got)
            self._metric("prefetch_bandwidth", nbytes / 1e9 / max(took, 1e-9))
        return [True] * got + [False] * (n - got)

    def _load(
        self, s: Session, keys: Sequence[str], target: Callable[[int], int | None], host_indices: Any = None
    ) -> int:
        """Load `keys` and copy each loaded page out: into the host pool's buffers at `host_indices`,
        or to the address `target(i)` gives (None: stop there). Returns the pages copied."""
        plan = self.plan
        assert plan is not None
        buffers = None
        if host_indices is not None:
            buffers = self._page_buffers(host_indices, len(keys))
            if buffers is None:
                return 0
        r = s.client.load(self._map(s, keys))
        per = plan.buffers_per_page
        copied = 0
        try:
            for i, off in enumerate(r.offsets):
                src = s.base + off
                if buffers is not None:
                    for ptr, size in buffers[i * per : (i + 1) * per]:
                        _memmove(ptr, src, size)
                        src += size
                else:
                    dst = target(i)
                    if dst is None:
                        break
                    _memmove(dst, src, plan.page_bytes)
                copied += 1
        finally:
            del r.views
            if r.lease is not None:
                try:
                    s.client.release(r.lease)
                except LeaseExpired as e:  # the pages may have been reused while copying
                    self._once("lease", "polarkvd: %s; those pages count as misses", e)
                    copied = 0
        return copied

    def batch_set_v1(self, keys: list[str], host_indices: Any, extra_info: Any = None) -> list[bool]:
        """Store the pages at `host_indices` under `keys`; one bool per key (True: stored or already
        there)."""
        n = len(keys)
        if not n:
            return []
        plan = self.plan
        if plan is not None and not plan.writer:  # MLA: the writer rank stores the same bytes
            self._count(set_pages=n, set_skipped=n)
            return [True] * n
        t0 = time.perf_counter()
        parent = self._parent_of(extra_info)
        out = self._call(
            "store", lambda s: self._store(s, keys, parent, host_indices=host_indices), [False] * n
        )
        self._record_set(n, out, time.perf_counter() - t0)
        return out

    @staticmethod
    def _parent_of(extra_info: Any) -> str | None:
        prefix = getattr(extra_info, "prefix_keys", None)
        return prefix[-1] if prefix else None

    def _record_set(self, n: int, out: list[bool], took: float) -> None:
        ok = sum(out)
        nbytes = ok * (self.plan.page_bytes if self.plan else 0)
        self._count(set_pages=n, set_failed=n - ok, set_seconds=took)
        if ok:
            self._metric("backup_pgs", ok)
            self._metric("backup_bandwidth", nbytes / 1e9 / max(took, 1e-9))

    def _store(
        self,
        s: Session,
        keys: Sequence[str],
        parent: str | None,
        host_indices: Any = None,
        sources: Sequence[int] | None = None,
    ) -> list[bool]:
        """Reserve, copy in (from the host pool's buffers at `host_indices`, or from the addresses
        `sources`), commit. Aborts what it reserved when copying fails."""
        plan = self.plan
        assert plan is not None
        n = len(keys)
        buffers = None
        if host_indices is not None:
            buffers = self._page_buffers(host_indices, n)
            if buffers is None:
                return [False] * n
        mapped = self._map(s, keys)
        parent_key = self._map(s, [parent])[0] if parent else None
        offsets = s.client.reserve(mapped, parent_key)
        out = [False] * n
        written: list[int] = []
        per = plan.buffers_per_page
        try:
            for i, off in enumerate(offsets):
                if off == Reserved.EXISTS:
                    out[i] = True
                    continue
                if off < 0:  # no space, not admitted, over quota
                    continue
                dst = s.base + off
                if buffers is not None:
                    for ptr, size in buffers[i * per : (i + 1) * per]:
                        _memmove(dst, ptr, size)
                        dst += size
                else:
                    assert sources is not None
                    _memmove(dst, sources[i], plan.page_bytes)
                written.append(i)
        except BaseException:
            reserved = [mapped[i] for i, off in enumerate(offsets) if off >= 0]
            if reserved:
                s.client.abort(reserved)
            raise
        existing = out.count(True)
        stored = 0
        if written:
            if s.client.commit([mapped[i] for i in written]) == len(written):
                stored = len(written)
                for i in written:
                    out[i] = True
        self._count(set_stored=stored, set_existing=existing, set_bytes=stored * plan.page_bytes)
        return out

    # -- generic interface -------------------------------------------------------------------------

    def _page_address(self, tensor: Any) -> int | None:
        """The address of a CPU tensor holding exactly one page, contiguously; None otherwise."""
        plan = self.plan
        if tensor is None or plan is None:
            return None
        if (
            getattr(tensor, "device", None) is None
            or tensor.device.type != "cpu"
            or not tensor.is_contiguous()
        ):
            self._once(
                "tensor", "polarkvd: generic get/set need contiguous CPU tensors, got %s", tensor.device
            )
            return None
        if tensor.numel() * tensor.element_size() != plan.page_bytes:
            self._once(
                "tensor-size",
                "polarkvd: a page tensor of %d bytes, expected %d",
                tensor.numel() * tensor.element_size(),
                plan.page_bytes,
            )
            return None
        return int(tensor.data_ptr())

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any:
        """The page `key`, copied into `target_location` (a flat page tensor; a new one when None),
        or None when it is not there."""
        return self.batch_get([key], [target_location])[0]

    def batch_get(self, keys: list[str], target_locations: Any = None, target_sizes: Any = None) -> list[Any]:
        """Pages of the longest loadable prefix of `keys`, copied into `target_locations`; None for
        the rest."""
        n = len(keys)
        if not n or self.plan is None:
            return [None] * n
        targets = list(target_locations or [None] * n)
        for i, t in enumerate(targets):
            if t is None and self.mem_pool_host is not None:
                targets[i] = self.mem_pool_host.get_dummy_flat_data_page()
        addresses = [self._page_address(t) for t in targets]
        t0 = time.perf_counter()
        got = self._call("load", lambda s: self._load(s, keys, lambda i: addresses[i]), 0)
        took = time.perf_counter() - t0
        self._count(get_pages=n, get_hits=got, get_bytes=got * self.plan.page_bytes, get_seconds=took)
        return targets[:got] + [None] * (n - got)

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(
        self, keys: list[str], values: Any = None, target_locations: Any = None, target_sizes: Any = None
    ) -> bool:
        """Store flat page tensors under `keys` (chained in order); True when every page is stored."""
        n = len(keys)
        if not n:
            return True
        plan = self.plan
        if plan is None or values is None or len(values) != n:
            return False
        if not plan.writer:
            self._count(set_pages=n, set_skipped=n)
            return True
        values = [v.contiguous() if hasattr(v, "contiguous") else v for v in values]
        addresses = [self._page_address(v) for v in values]
        if any(a is None for a in addresses):
            return False
        t0 = time.perf_counter()
        out = self._call("store", lambda s: self._store(s, keys, None, sources=addresses), [False] * n)  # type: ignore[arg-type]
        self._record_set(n, out, time.perf_counter() - t0)
        return all(out)

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # -- hybrid (v2) interface: refused at registration; answered as misses if ever called -----------

    def batch_exists_v2(self, keys: list[str], pool_transfers: Any = None, extra_info: Any = None) -> Any:
        if pool_transfers:
            return PoolTransferResult(0, {})
        return PoolTransferResult(self.batch_exists(keys, extra_info), {})

    def batch_get_v2(self, transfers: list[Any], extra_info: Any = None) -> dict[str, list[bool]]:
        return {t.name: [False] * len(t.keys or []) for t in transfers}

    def batch_set_v2(self, transfers: list[Any], extra_info: Any = None) -> dict[str, list[bool]]:
        return {t.name: [False] * len(t.keys or []) for t in transfers}

    # -- the rest ----------------------------------------------------------------------------------

    def clear(self) -> bool:
        """Pages in polarkvd are shared with every engine of the host and the cluster, and the engine
        API cannot delete them: nothing is deleted (`polarkvd evict --tier dram|disk` does, for every
        engine). Returns False (SGLang 0.5.23's controller ignores the answer and forgets which pages
        it believed stored; writing them again costs a reserve that finds them there)."""
        log.warning(
            "polarkvd: clear() deletes nothing: pages in polarkvd are shared with other engines; an "
            "operator evicts them with `polarkvd evict --tier dram|disk --bytes N`"
        )
        return False

    def get_stats(self) -> Any:
        """SGLang's StorageMetrics (pages and GB/s per prefetch and backup since the last call), with
        this backend's running counters as `.polarkv` (hits, misses, bytes, seconds, errors)."""
        try:
            from sglang.srt.observability.metrics_collector import StorageMetrics
        except Exception:  # noqa: BLE001 - an SGLang without it: no metrics
            return None
        with self._stats_lock:
            m = StorageMetrics()
            for name, values in self._metrics.items():
                getattr(m, name).extend(values)
                values.clear()
            counters = dict(self.counters)
        counters["get_misses"] = counters["get_pages"] - counters["get_hits"]
        counters["exists_misses"] = counters["exists_keys"] - counters["exists_hits"]
        m.polarkv = counters
        return m

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
