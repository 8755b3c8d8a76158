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
import dataclasses
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
from polarkvd.connectors.sglang.geometry import PagePlan, check_storage_config, plan_pages, plan_sidecar
from polarkvd.connectors.sglang.link import DaemonLink, Session
from polarkvd.connectors.sglang.options import Options
from polarkvd.errors import ConfigError, DaemonUnavailable, ErrorCode, LeaseExpired, PolarKVError
from polarkvd.wire.frames import Reserved

log = logging.getLogger("polarkvd.connectors.sglang")
_memmove = ctypes.memmove
_KEY_CACHE = 1 << 16  # mapped keys remembered (batch_exists then batch_get_v1 map the same keys)
_METRICS_KEEP = 4096  # entries of each SGLang metrics list kept between two get_stats calls
T = TypeVar("T")
KV = "kv"  # SGLang's PoolName.KV


@dataclasses.dataclass
class Pool:
    """One of SGLang's host pools whose pages are stored: the KV pool, or a hybrid model's extra pool
    (Mamba states, ...), each in a namespace of its own with sessions of its own."""

    name: str
    host: Any
    plan: PagePlan
    link: DaemonLink


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
        self.pools: dict[str, Pool] = {}  # by SGLang's pool name ("kv", "mamba", ...)
        self._keys: dict[bytes, dict[str, bytes]] = {}  # by namespace digest: SGLang key -> page key
        self._stats_lock = threading.Lock()
        self.counters: dict[str, float] = dict.fromkeys(
            (
                "exists_calls exists_keys exists_hits get_pages get_hits get_bytes get_seconds "
                "set_pages set_stored set_existing set_failed set_skipped set_bytes set_seconds "
                "side_get_pages side_get_hits side_set_pages side_set_stored errors"
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
        self.close()
        self.plan = plan
        self.link = self._link(plan)
        self.pools = {KV: Pool(KV, mem_pool_host, plan, self.link)}
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

    def _link(self, plan: PagePlan, tag: str = "") -> DaemonLink:
        return DaemonLink(
            plan.namespace,
            self.socket_path,
            self.engine_id + tag,
            self.opts.timeout,
            self.opts.commit_timeout,
            self.opts.retry_seconds,
        )

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        """Every pool of SGLang's host pool group: the KV pool again (already planned), and a hybrid
        model's extra pools (Mamba states, sliding-window KV, an indexer), each planned from its own
        buffer metadata into a namespace of its own; one whose pages polarkvd cannot copy is refused
        with the reason."""
        super().register_mem_host_pool_v2(host_pool, host_pool_name)
        name = str(getattr(host_pool_name, "value", host_pool_name))
        known = self.pools.get(name)
        if known is not None and known.host is host_pool:
            return
        if name == KV:
            raise ConfigError([("model", type(host_pool).__name__, "a second KV pool is not supported")])
        plan = plan_sidecar(self.storage_config, host_pool, name, self.opts.model_fingerprint)
        link = self._link(plan, f"-{name}")
        if known is not None:
            known.link.close()
        self.pools[name] = Pool(name, host_pool, plan, link)
        log.info(
            "polarkvd HiCache storage: %s pool pages of %d bytes in namespace %s",
            name,
            plan.page_bytes,
            plan.namespace.layout,
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

    def _call(self, what: str, fn: Callable[[Session], T], default: T, pool: Pool | None = None) -> T:
        """Run `fn` with this thread's session of `pool` (default: the KV pool); `default` (a miss)
        instead of any exception."""
        pool = pool or self.pools.get(KV)
        if pool is None:
            return default
        link = pool.link
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
        cache = self._keys.get(digest)
        if cache is None or len(cache) > _KEY_CACHE:
            if len(self._keys) > 16:  # digests of daemons gone (another seed after a restart)
                self._keys.clear()
            cache = self._keys[digest] = {}
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

    def _page_buffers(self, pool: Pool, host_indices: Any, pages: int) -> list[tuple[int, int]] | None:
        """(pointer, size) of every buffer of `pages` pages of `pool` at `host_indices`, page by page
        in the plan's order; None (warned once) when SGLang's metadata does not match the plan."""
        plan = pool.plan
        if host_indices is None or int(host_indices.numel()) != pages * plan.host_page:
            self._once(
                "indices", "polarkvd: %s host indices for %d pages of %s", host_indices, pages, pool.name
            )
            return None
        ptrs, sizes = pool.host.get_page_buffer_meta(host_indices)
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
        self,
        s: Session,
        keys: Sequence[str],
        target: Callable[[int], int | None],
        host_indices: Any = None,
        pool: Pool | None = None,
    ) -> int:
        """Load `keys` and copy each loaded page out: into `pool`'s buffers at `host_indices` (default:
        the KV pool), or to the address `target(i)` gives (None: stop there). Returns the pages copied."""
        pool = pool or self.pools[KV]
        plan = pool.plan
        buffers = None
        if host_indices is not None:
            buffers = self._page_buffers(pool, host_indices, len(keys))
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
        pool: Pool | None = None,
    ) -> list[bool]:
        """Reserve, copy in (from `pool`'s buffers at `host_indices`, default the KV pool, or from the
        addresses `sources`), commit. Aborts what it reserved when copying fails."""
        pool = pool or self.pools[KV]
        plan = pool.plan
        n = len(keys)
        buffers = None
        if host_indices is not None:
            buffers = self._page_buffers(pool, host_indices, n)
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
        if pool.name == KV:
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

    # -- hybrid models (v2): the KV pool plus extra pools, each under its own namespace -------------

    def _present(self, pool: Pool, keys: Sequence[str]) -> list[bool]:
        """Whether each of `keys` is held in `pool`'s namespace (not only as a prefix: a pool of
        trailing states holds some pages of a prefix and not others)."""

        def op(s: Session) -> list[bool]:
            mapped = self._map(s, keys)
            head = s.client.lookup(mapped).hits  # the held prefix at once; then key by key
            out = [True] * head + [False] * (len(mapped) - head)
            for i in range(head + 1, len(mapped)):
                out[i] = s.client.lookup([mapped[i]]).hits == 1
            return out

        return self._call("lookup", op, [False] * len(keys), pool)

    def batch_exists_v2(self, keys: list[str], pool_transfers: Any = None, extra_info: Any = None) -> Any:
        """The usable prefix of `keys` when the extra pools of `pool_transfers` must come with the KV
        pages, with each pool's own boundary and every restorable prefix length, under SGLang's hit
        policies: `all_pages` (every page of the prefix), `trailing_pages` (the last len(keys) pages
        of it, e.g. Mamba states). Another policy counts as absent."""
        try:
            kv = self.batch_exists(keys, extra_info)
            hits: dict[Any, int] = {KV: kv} if kv else {}
            restorable = list(range(1, kv + 1))
            for t in pool_transfers or []:
                if not restorable:
                    break
                pool = self.pools.get(str(getattr(t.name, "value", t.name)))
                present = self._present(pool, keys[:kv]) if pool is not None else [False] * kv
                policy = str(getattr(t.hit_policy, "value", t.hit_policy))
                if policy == "all_pages":
                    boundary = present.index(False) if False in present else kv
                    ok = set(range(1, boundary + 1))
                elif policy == "trailing_pages":
                    trailing = max(1, len(t.keys) if t.keys else 1)
                    ok = {p for p in range(1, kv + 1) if all(present[max(0, p - trailing) : p])}
                    boundary = max(ok, default=0)
                else:
                    self._once(f"policy:{policy}", "polarkvd: hit policy %s is not supported: a miss", policy)
                    ok, boundary = set(), 0
                if boundary:
                    hits[t.name] = boundary
                restorable = [p for p in restorable if p in ok]
            return PoolTransferResult(restorable[-1] if restorable else 0, hits, restorable)
        except Exception as e:  # noqa: BLE001 - never into SGLang's threads
            self._once("exists_v2", "polarkvd batch_exists_v2 failed (%r); treated as a miss", e)
            return PoolTransferResult(0, {})

    def _v2(self, what: str, transfers: list[Any], extra_info: Any) -> dict[Any, list[bool]]:
        out: dict[Any, list[bool]] = {}
        for t in transfers:
            keys = list(t.keys or [])
            n = len(keys)
            out[t.name] = [False] * n
            try:
                name = str(getattr(t.name, "value", t.name))
                pool = self.pools.get(name)
                if pool is None or not n:
                    continue
                if what == "store" and not pool.plan.writer:
                    out[t.name] = [True] * n
                    continue
                if what == "load":
                    got = self._load_pool(pool, keys, t.host_indices)
                    out[t.name] = [True] * got + [False] * (n - got)
                    self._count(side_get_pages=n, side_get_hits=got)
                else:
                    parent = self._parent_of(extra_info) if name == KV else None
                    out[t.name] = res = self._store_pool(pool, keys, t.host_indices, parent)
                    self._count(side_set_pages=n, side_set_stored=sum(res))
            except Exception as e:  # noqa: BLE001 - never into SGLang's threads
                self._once(f"{what}_v2", "polarkvd %s of pool %s failed (%r): misses", what, t.name, e)
        return out

    def _load_pool(self, pool: Pool, keys: list[str], host_indices: Any) -> int:
        return self._call("load", lambda s: self._load(s, keys, lambda _: None, host_indices, pool), 0, pool)

    def _store_pool(self, pool: Pool, keys: list[str], host_indices: Any, parent: str | None) -> list[bool]:
        def op(s: Session) -> list[bool]:
            return self._store(s, keys, parent, host_indices=host_indices, pool=pool)

        return self._call("store", op, [False] * len(keys), pool)

    def batch_get_v2(self, transfers: list[Any], extra_info: Any = None) -> dict[Any, list[bool]]:
        """Load each transfer's pages into its pool at its host indices; a prefix of True per pool."""
        return self._v2("load", transfers, extra_info)

    def batch_set_v2(self, transfers: list[Any], extra_info: Any = None) -> dict[Any, list[bool]]:
        """Store each transfer's pages from its pool; True per page stored or already there."""
        return self._v2("store", transfers, extra_info)

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
        for pool in getattr(self, "pools", {}).values():
            pool.link.close()
