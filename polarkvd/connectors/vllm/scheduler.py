"""The scheduler side: the longest cached prefix of each new request, and per step the plan of loads
and stores (`PolarKVMetadata`)."""

from __future__ import annotations

import collections
import functools
import logging
import time
from typing import TYPE_CHECKING

from polarkvd.connectors.vllm.geometry import Geometry
from polarkvd.connectors.vllm.link import DaemonLink, call_daemon
from polarkvd.connectors.vllm.metadata import LoadSpec, PolarKVMetadata, SaveSpec, cacheable, salt_of
from polarkvd.connectors.vllm.options import Options
from polarkvd.errors import DaemonUnavailable, PolarKVError
from polarkvd.keys import ROOT_KEY, page_keys
from polarkvd.types import Namespace, Tier

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


log = logging.getLogger("vllm.polarkvd.connector")

#: steps computing fewer tokens are not reported to the daemon's cost model (decode steps)
OBSERVE_MIN_TOKENS = 32

#: the engine's load (running, waiting, queued prefill tokens) goes to the daemon at most this often
LOAD_REPORT_SECONDS = 0.25

#: tiers a hit's page may be in that take a promotion (disk) or a fetch (a peer's DRAM) to load
_SLOW_TIERS = frozenset((int(Tier.DISK), int(Tier.DMP)))


class _Req:
    """The scheduler's view of one request."""

    __slots__ = (
        "request", "salt", "cacheable", "keys", "digests", "block_ids", "saved_pages", "matched", "load",
        "load_async", "load_failed", "running", "done",
    )  # fmt: skip

    def __init__(self, request: Request, tp_size: int) -> None:
        self.request = request
        self.salt = salt_of(request)
        self.cacheable = cacheable(request)
        self.keys: list[list[bytes]] = [[] for _ in range(tp_size)]  # keys of its full pages, per rank
        self.digests: tuple[bytes, ...] = ()  # the daemon's namespace digests `keys` chain from
        self.block_ids: list[int] = []  # its vLLM blocks, as the scheduler outputs tell the worker
        self.saved_pages = 0  # pages [0, saved_pages) are stored (or loaded, or planned to be)
        self.matched: tuple[int, int] | None = None  # (local tokens, loadable tokens) of the last ask
        self.load: tuple[int, list[int]] | None = None  # (first block index, block ids) to fill
        self.load_async = False  # the last match is loaded while the request waits (vLLM async load)
        self.load_failed = False  # a load of it lost blocks: it is computed from then on, never loaded
        self.running = False  # scheduled at least once (and not finished): counted as running
        self.done = 0  # prompt tokens cached or computed (or scheduled to be), for the load report


class SchedulerSide:
    def __init__(self, geo: Geometry, opts: Options, kv_events: dict[str, str] | None = None) -> None:
        self.geo = geo
        self.opts = opts
        self.link = DaemonLink(opts, "scheduler")
        self.link.kv_events = kv_events  # vLLM's KV event publisher, told at hello (kv_events.py)
        self._reqs: dict[str, _Req] = {}
        self._namespaces: dict[tuple[str, int], Namespace] = {}
        self._inflight: dict[str, tuple[int, list[int]]] = {}  # req -> (first block, ids) loading this step
        self._async_ready: list[str] = []  # requests with an asynchronous load to hand the worker
        self._async_inflight: dict[str, tuple[int, list[int]]] = {}  # req -> (first block, ids) until done
        # steps planned and not finished: (tokens, sum of tokens x their mean depth, start): what a
        # step computed and how long it took, told to the daemon (its cost policy's prefill fit)
        self._steps: collections.deque[tuple[int, float, float]] = collections.deque(maxlen=8)
        self._observe = True  # off when the daemon does not know the op
        self._report_loads = True  # off when the daemon does not know `report_load`
        self._load_sent: tuple[int, int, int] | None = None
        self._load_sent_at = -LOAD_REPORT_SECONDS
        self.stats: collections.Counter[str] = collections.Counter()
        # Open the unsalted sessions now: attaching maps the arena (0.1-0.8 s), which the first request
        # should not pay, and a daemon that is down gets reported at start.
        for rank in range(geo.tp_size):
            self.link.session(self._namespace("", rank))
        if opts.engine_url:  # routers that find engines from the cluster see it before its first request
            self._report_load(force=True)

    def _namespace(self, salt: str, rank: int) -> Namespace:
        ns = self._namespaces.get((salt, rank))
        if ns is None:
            ns = self._namespaces[(salt, rank)] = self.geo.namespace(salt, rank)
        return ns

    def _digests(self, salt: str) -> tuple[bytes, ...] | None:
        """The daemon's digest of each rank's namespace (keyed with its seed: only the daemon computes
        them), or None when a session is not available."""
        out = []
        for rank in range(self.geo.tp_size):
            client = self.link.session(self._namespace(salt, rank))
            if client is None:
                return None
            out.append(client.ns_digest)
        return tuple(out)

    def _state(self, request: Request) -> _Req:
        st = self._reqs.get(request.request_id)
        if st is None:
            st = self._reqs[request.request_id] = _Req(request, self.geo.tp_size)
        return st

    def _keys(self, st: _Req, pages: int) -> list[list[bytes]] | None:
        """Keys of the first `pages` pages of the request (computed once, extended as it grows), or
        None when the daemon cannot be asked for its digests. A daemon that came back with another
        seed gives other digests: the keys are computed again from the first page."""
        digests = self._digests(st.salt)
        if digests is None:
            return None
        if digests != st.digests:
            st.keys = [[] for _ in digests]
            st.digests = digests
        have = len(st.keys[0])
        if pages > have:
            pt = self.geo.page_tokens
            tokens = list(st.request.all_token_ids[have * pt : pages * pt])
            for digest, keys in zip(digests, st.keys):
                keys.extend(page_keys(digest, tokens, pt, keys[-1] if keys else ROOT_KEY))
        return st.keys

    # -- vLLM callbacks

    def on_new_request(self, request: Request) -> None:
        self._state(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        st = self._state(request)
        st.done = max(st.done, num_computed_tokens)
        st.matched = None
        st.load_async = False
        if not st.cacheable or not self.link.available:
            return 0, False
        if st.load_failed:
            # vLLM asks again after a failed asynchronous load; a lookup may still see the pages
            # (a table the dead daemon left, a page that is corrupt on disk): never load it twice
            self.stats["lookups_after_failed_load"] += 1
            return 0, False
        g = self.geo
        bs, pb, pt = g.block_size, g.page_blocks, g.page_tokens
        max_blocks = (request.num_tokens - 1) // bs  # a sync load must leave one token to compute
        first_page = num_computed_tokens // pt
        last_page = min(request.num_tokens // pt, -(-max_blocks // pb))
        if max_blocks * bs <= num_computed_tokens or last_page <= first_page:
            return 0, False
        keys = self._keys(st, last_page)
        if keys is None:
            return 0, False
        hits = last_page - first_page
        slow = False  # a page of the hit is on disk or on a peer: a promotion or a fetch
        for rank in range(g.tp_size):
            client = self.link.session(self._namespace(st.salt, rank))
            if client is None:
                return 0, False
            found = call_daemon(
                self.link, "lookup", functools.partial(client.lookup, keys[rank][first_page:last_page])
            )
            if found is None:
                return 0, False
            hits = min(hits, found.hits)
            if hits == 0:
                break
            slow = slow or any(code in _SLOW_TIERS for code in found.tier_codes[:hits])
        end_block = min((first_page + hits) * pb, max_blocks)
        tokens = end_block * bs - num_computed_tokens
        self.stats["lookups"] += 1
        if tokens <= 0:
            return 0, False
        st.matched = (num_computed_tokens, tokens)
        st.load_async = slow and self.opts.async_loads
        self.stats["async_loads" if st.load_async else "sync_loads"] += 1
        return tokens, st.load_async

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        if num_external_tokens <= 0 or st.matched is None:
            st.load = None
            return
        bs = self.geo.block_size
        local = st.matched[0]
        first, end = local // bs, (local + num_external_tokens) // bs
        ids = blocks.get_block_ids()[0]
        st.load = (first, list(ids[first:end]))
        if st.load_async:  # the request is not scheduled until its load ends: planned on its own
            self._async_ready.append(request.request_id)

    def build_connector_meta(self, so: SchedulerOutput) -> PolarKVMetadata:
        meta = PolarKVMetadata(computing=bool(so.num_scheduled_tokens))
        self._inflight.clear()
        self._note_step(so)
        for req_id in self._async_ready:
            st = self._reqs.get(req_id)
            if st is not None and st.load is not None:
                meta.loads.append(self._load_spec(st, req_id, background=True))
        self._async_ready.clear()
        scheduled = so.num_scheduled_tokens
        for new in so.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0]) if new.block_ids else []
            self._plan(st, new.req_id, new.num_computed_tokens, scheduled.get(new.req_id, 0), meta)
        cached = so.scheduled_cached_reqs
        resumed: set[str] = getattr(cached, "resumed_req_ids", set())
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:  # after a preemption: its whole new block list
                st.block_ids = list(new_ids[0]) if new_ids else []
                st.saved_pages = 0  # what it recomputes is stored again (the daemon may have lost pages)
                self.stats["resumed_requests"] += 1
            elif new_ids:
                st.block_ids.extend(new_ids[0])
            self._plan(st, req_id, cached.num_computed_tokens[i], scheduled.get(req_id, 0), meta)
        for req_id in getattr(so, "preempted_req_ids", None) or ():  # back to waiting, its KV freed
            st = self._reqs.get(req_id)
            if st is not None:
                st.running, st.done = False, 0
        for new in so.scheduled_new_reqs:
            self._progress(new.req_id, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        for i, req_id in enumerate(cached.req_ids):
            self._progress(req_id, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        self._report_load()
        return meta

    def _progress(self, req_id: str, done: int) -> None:
        st = self._reqs.get(req_id)
        if st is not None:
            st.running = True
            st.done = max(st.done, done)

    def _report_load(self, force: bool = False) -> None:
        """Tell the daemon the engine's load (`where` shows it): at most every LOAD_REPORT_SECONDS,
        only when it changed, at once when `force` (the engine ran out of work: no step follows)."""
        now = time.monotonic()
        if not self._report_loads or (not force and now - self._load_sent_at < LOAD_REPORT_SECONDS):
            return
        running = waiting = queued = 0
        for st in self._reqs.values():
            if st.running:
                running += 1
            else:
                waiting += 1
            queued += max(0, st.request.num_prompt_tokens - st.done)
        load = (running, waiting, queued)
        if load == self._load_sent or not self.link.available:
            return
        client = self.link.session(self._namespace("", 0))
        if client is None:
            return
        try:
            client.report_load(running, waiting, queued, self.opts.engine_url)
        except DaemonUnavailable as e:
            self.link.failed(e)
            return
        except PolarKVError as e:  # an older daemon: it has no `report_load`
            self._report_loads = False
            log.info("polarkvd does not take load reports (%s); not sending them", e)
            return
        self._load_sent, self._load_sent_at = load, now
        self.stats["load_reports"] += 1

    def _plan(self, st: _Req, req_id: str, computed: int, scheduled: int, meta: PolarKVMetadata) -> None:
        g = self.geo
        pb, pt = g.page_blocks, g.page_tokens
        if st.load is not None:
            meta.loads.append(self._load_spec(st, req_id, background=False))
        if not st.cacheable or scheduled <= 0:
            return
        request = st.request
        limit = min(computed + scheduled, request.num_tokens)
        if not self.opts.save_decode:
            limit = min(limit, request.num_prompt_tokens)
        end_page = min(limit // pt, len(st.block_ids) // pb)
        start = st.saved_pages
        if end_page <= start or not self.link.available:
            return  # nothing completes this step, or the daemon is down (those pages are simply not stored)
        keys = self._keys(st, end_page)
        if keys is None:
            return  # the daemon went away: those pages are not stored
        meta.saves.append(
            SaveSpec(
                req_id,
                st.salt,
                [k[start:end_page] for k in keys],
                [k[start - 1] if start else None for k in keys],
                st.block_ids[start * pb : end_page * pb],
            )
        )
        st.saved_pages = end_page
        self.stats["planned_save_pages"] += end_page - start

    def _load_spec(self, st: _Req, req_id: str, *, background: bool) -> LoadSpec:
        """The worker's part of the load planned at allocation (`st.load`, cleared here)."""
        assert st.load is not None
        pb = self.geo.page_blocks
        first, ids = st.load
        st.load = None
        first_page, end_page = first // pb, -(-(first + len(ids)) // pb)
        # keys exist: the match computed them (a daemon gone since makes the load fail: recomputed)
        load_keys = self._keys(st, end_page) or st.keys
        (self._async_inflight if background else self._inflight)[req_id] = (first, ids)
        st.saved_pages = max(st.saved_pages, end_page)
        self.stats["planned_load_blocks"] += len(ids)
        keys = [k[first_page:end_page] for k in load_keys]
        return LoadSpec(req_id, st.salt, keys, ids, first - first_page * pb, background)

    def _note_step(self, so: SchedulerOutput) -> None:
        """Remember what this step computes: tokens, and tokens x depth (attention's share)."""
        tokens, weighted = 0, 0.0
        cached = so.scheduled_cached_reqs
        computed = dict(zip(cached.req_ids, cached.num_computed_tokens))
        computed.update((new.req_id, new.num_computed_tokens) for new in so.scheduled_new_reqs)
        for req_id, n in so.num_scheduled_tokens.items():
            tokens += n
            weighted += n * (computed.get(req_id, 0) + n / 2)
        self._steps.append((tokens, weighted, time.perf_counter()))

    def _report_step(self) -> None:
        """Tell the daemon how long the oldest step in flight took, when it prefilled enough tokens:
        (tokens, the depth that gives the same attention work, seconds)."""
        if not self._steps:
            return
        tokens, weighted, started = self._steps.popleft()
        if not self._observe or tokens < OBSERVE_MIN_TOKENS or not self.link.available:
            return
        client = self.link.session(self._namespace("", 0))
        if client is None:
            return
        depth = max(0, int(weighted / tokens - tokens / 2))
        try:
            client.observe_prefill(tokens, depth, time.perf_counter() - started)
            self.stats["observed_steps"] += 1
        except DaemonUnavailable as e:
            self.link.failed(e)
        except PolarKVError as e:  # an older daemon: it has no cost model to feed
            self._observe = False
            log.info("polarkvd does not take prefill timings (%s); not sending them", e)

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        self._report_step()
        bad = output.invalid_block_ids
        if bad:
            # vLLM recomputes from the first failed block; the worker dropped this step's saves of
            # these requests (computed on top of garbage), so plan them again from there.
            pb = self.geo.page_blocks
            loading = {**self._inflight, **self._async_inflight}
            for req_id, (first, ids) in loading.items():
                st = self._reqs.get(req_id)
                if st is None:
                    continue
                for i, block in enumerate(ids):
                    if block in bad:
                        st.saved_pages = min(st.saved_pages, (first + i) // pb)
                        st.load_failed = True
                        self.stats["load_failures"] += 1
                        break
        self._inflight.clear()
        for req_id in output.finished_recving or ():
            self._async_inflight.pop(req_id, None)

    def request_finished(self, request: Request) -> None:
        self._reqs.pop(request.request_id, None)
        self._inflight.pop(request.request_id, None)
        self._async_inflight.pop(request.request_id, None)
        self._report_load(force=not self._reqs)  # the last one: no step follows to report the zero

    def close(self) -> None:
        self.link.close()
