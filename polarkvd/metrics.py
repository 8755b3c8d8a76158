"""Prometheus metrics: the latency histograms the engine handlers fill, and the /metrics endpoint.

Owns metric names, labels and help texts (docs/METRICS.md lists them), and the HTTP endpoint (which
also serves JSON routes others register, e.g. `/where`: server/where.py). Keeps
no counters of its own: every series is computed at scrape time from a `Snapshot` the daemon takes
on its event loop — `Manager.stats()` (the same dict `polarkvd status` prints), the op histograms and
the daemon's own state — so metrics and `status` can never disagree.

`LatencyHistogram` itself has no lock: an observation is a bisect and two additions (see
docs/METRICS.md for its measured cost on the lookup path). Ops served only on the event loop observe
without one; the lookup histogram is also written by engine connection threads, which observe it
under a lock (server/engine.py).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import io
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from polarkvd.config.values import split_address
from polarkvd.errors import ConfigError

log = logging.getLogger(__name__)

#: Histogram bucket upper bounds, nanoseconds: 5 us .. 10 s. Lookups of a few pages take ~5-30 us
#: in the daemon; a load that promotes from disk takes milliseconds.
_BUCKETS_US = (5, 10, 25, 50, 100, 250, 500, 1e3, 2.5e3, 5e3, 1e4, 2.5e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2.5e6, 5e6, 1e7)  # fmt: skip
BUCKETS_NS: tuple[int, ...] = tuple(int(us * 1000) for us in _BUCKETS_US)

#: The engine ops that are timed (label `op` of polarkv_engine_op_duration_seconds).
TIMED_OPS = ("lookup", "reserve", "commit", "load")

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip


class LatencyHistogram:
    """Fixed-bucket histogram of durations in nanoseconds. Not thread-safe: one writer at a time
    (the loop, or a lock shared by the writers)."""

    __slots__ = ("bounds", "counts", "sum_ns")

    def __init__(self, bounds: tuple[int, ...] = BUCKETS_NS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum_ns = 0

    def observe_ns(self, ns: int) -> None:
        self.counts[bisect.bisect_left(self.bounds, ns)] += 1
        self.sum_ns += ns

    def snapshot(self) -> tuple[list[int], int]:
        return list(self.counts), self.sum_ns


class OpTimings:
    """One histogram per timed engine op; the engine handlers observe, the collector reads."""

    def __init__(self) -> None:
        self.ops = {op: LatencyHistogram() for op in TIMED_OPS}

    def __getitem__(self, op: str) -> LatencyHistogram:
        return self.ops[op]


@dataclasses.dataclass
class Snapshot:
    """Everything one scrape shows, taken at one instant on the event loop."""

    stats: dict[str, Any] | None  # Manager.stats(); None while the daemon is starting
    timings: dict[str, tuple[list[int], int]]
    ready: bool
    reloads_ok: int = 0
    reloads_failed: int = 0
    last_reload_ok: bool = True
    last_reload_time: float = 0.0
    restart_needed: int = 0
    version: str = ""
    cluster: dict[str, int] | None = None  # members by state, when [cluster] is enabled


# ---------------------------------------------------------------------------------------- collector

_EVICTED_DRAM = re.compile(r"^evicted_pages_dram_(\w+)$")

#: manager counter -> (metric name, help). Each is a monotonic counter in Manager.counters.
_SIMPLE_COUNTERS = {
    "lookups": ("polarkv_lookups_total", "Lookup requests."),
    "lookup_pages": ("polarkv_lookup_pages_total", "Page keys asked for in lookups."),
    "table_lookups": (
        "polarkv_table_lookups_total",
        "Lookups engines answered from the shared lookup table, without a round trip (in lookups, "
        "not in the op duration histogram).",
    ),
    "miss_pages": (
        "polarkv_miss_pages_total",
        "Looked-up pages past the longest cached prefix.",
    ),
    "loads": ("polarkv_loads_total", "Load requests."),
    "load_short_pages": (
        "polarkv_load_short_pages_total",
        "Pages asked for in loads that could not be served.",
    ),
    "reserve_no_space": (
        "polarkv_reserve_no_space_pages_total",
        "Pages refused at reserve: no room in DRAM.",
    ),
    "reserve_over_quota": (
        "polarkv_reserve_over_quota_pages_total",
        "Pages refused at reserve: the tenant is at its DRAM quota and none of its own pages can go.",
    ),
    "aborted_pages": ("polarkv_aborted_pages_total", "Reserved pages given up (abort, engine gone, expiry)."),
    "promotion_failures": (
        "polarkv_promotion_failures_total",
        "Promotions that failed (missing or corrupt).",
    ),
    "demotions_dropped": (
        "polarkv_demotions_dropped_total",
        "Evicted pages not written to disk (queue full or refused).",
    ),
    "demotion_failures": ("polarkv_demotion_failures_total", "Disk writes that failed."),
    "corrupt_pages": (
        "polarkv_corrupt_pages_total",
        "Disk pages that failed their checksum on read (dropped).",
    ),
    "expired": ("polarkv_expired_total", "Leases and reservations expired after daemon.lease_seconds."),
    "dropped_pages_cheap": (
        "polarkv_dropped_pages_cheap_total",
        "Pages the cost policy dropped on leaving DRAM instead of demoting them: cheaper to recompute than to read back.",
    ),
    "recompute_instead_pages": (
        "polarkv_recompute_instead_pages_total",
        "Hit pages a lookup or load cut off (cost policy): recomputing them costs the engine less than fetching them.",
    ),
    "sessions_attached": ("polarkv_sessions_attached_total", "Engine sessions attached since start."),
}
#: polarkv_cluster_fetched_{pages,bytes}_total{transport}: pages and bytes fetched from peers, by
#: the transport that moved them (pages counted once per page, also when it came in layer slices).
_CLUSTER_FETCHED = tuple(f"cluster_fetched_{w}_{t}" for w in ("pages", "bytes") for t in ("rdma", "tcp"))
# Counters shown through labelled families below, not as events.
_LABELLED = {"stored_pages", "promoted_pages", "demoted_pages", "hit_pages_vram", "hit_pages_dram", "stored_pages_vram",
             "stored_bytes_vram", "demoted_pages_vram", "demoted_bytes_vram", "promoted_pages_vram", "promoted_bytes_vram", "loaded_pages_vram", "hit_pages_disk", "hit_pages_remote", "loaded_pages", "loaded_pages_disk", "loaded_pages_remote", "stored_bytes",
             "loaded_bytes", "evicted_bytes_dram", "promoted_bytes", "demoted_bytes", "written_through_pages",
             "written_through_bytes", *_CLUSTER_FETCHED, "cluster_rdma_fallbacks"}  # fmt: skip

#: Data paths of polarkv_transfer_bytes_total / _pages_total: (path label, bytes counters, page
#: counters); a path's value is the sum of its counters. DRAM -> disk covers demotions (eviction,
#: drain, shutdown save) and write-through copies. Stores into L1 are counted in `stored_*` too and
#: taken out of engine_to_dram (`_MINUS`); loads are one path whatever tier they read.
_PATHS = (
    ("engine_to_vram", ("stored_bytes_vram",), ("stored_pages_vram",)),
    ("engine_to_dram", ("stored_bytes",), ("stored_pages",)),
    ("dram_to_engine", ("loaded_bytes",), ("loaded_pages",)),
    ("vram_to_dram", ("demoted_bytes_vram",), ("demoted_pages_vram",)),
    ("dram_to_vram", ("promoted_bytes_vram",), ("promoted_pages_vram",)),
    ("disk_to_dram", ("promoted_bytes",), ("promoted_pages",)),
    ("dram_to_disk", ("demoted_bytes", "written_through_bytes"), ("demoted_pages", "written_through_pages")),
)

_MINUS = {"engine_to_dram": ("stored_bytes_vram", "stored_pages_vram")}


def families(snap: Snapshot) -> Iterator[Any]:
    """The metric families of one snapshot (a pure function: easy to test without HTTP)."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
    )

    yield InfoMetricFamily("polarkv_build", "polarkvd version.", value={"version": snap.version})
    yield GaugeMetricFamily("polarkv_ready", "1 once the daemon serves its sockets.", value=int(snap.ready))

    reloads = CounterMetricFamily(
        "polarkv_config_reloads", "SIGHUP reloads of the config file.", labels=["result"]
    )
    reloads.add_metric(["ok"], snap.reloads_ok)
    reloads.add_metric(["failed"], snap.reloads_failed)
    yield reloads
    yield GaugeMetricFamily(
        "polarkv_config_last_reload_successful",
        "0 when the last reload was refused (invalid file): the daemon runs the older config.",
        value=int(snap.last_reload_ok),
    )
    yield GaugeMetricFamily(
        "polarkv_config_last_reload_timestamp_seconds",
        "Unix time of the last reload (0: none since start).",
        value=snap.last_reload_time,
    )
    yield GaugeMetricFamily(
        "polarkv_config_restart_needed_options",
        "Options changed in the config file that only take effect after a restart.",
        value=snap.restart_needed,
    )

    hist = HistogramMetricFamily(
        "polarkv_engine_op_duration_seconds",
        "Time the daemon spends on an engine request, from parsed request to reply (socket time excluded).",
        labels=["op"],
    )
    for op, (counts, sum_ns) in snap.timings.items():
        buckets, acc = [], 0
        for bound, n in zip((*BUCKETS_NS, None), counts):
            acc += n
            buckets.append(("+Inf" if bound is None else _seconds_label(bound), acc))
        hist.add_metric([op], buckets, sum_ns / 1e9)
    yield hist

    st = snap.stats
    if st is None:
        return
    c = st["counters"]
    tiers = st["tiers"]

    yield GaugeMetricFamily(
        "polarkv_uptime_seconds", "Seconds since the daemon started.", value=st["uptime_s"]
    )
    yield GaugeMetricFamily(
        "polarkv_draining", "1 while new stores are refused (drain or shutdown).", value=int(st["draining"])
    )

    pages = GaugeMetricFamily("polarkv_tier_pages", "Pages held in a tier (readable ones).", labels=["tier"])
    size = GaugeMetricFamily(
        "polarkv_tier_bytes", "Bytes held in a tier (disk: compressed file sizes).", labels=["tier"]
    )
    cap = GaugeMetricFamily("polarkv_tier_capacity_bytes", "Capacity of a tier.", labels=["tier"])
    for name, t in tiers.items():
        pages.add_metric([name], t["pages"])
        size.add_metric([name], t["bytes"])
        cap.add_metric([name], t["capacity_bytes"])
    yield pages
    yield size
    yield cap
    dram = tiers["dram"]
    yield GaugeMetricFamily(
        "polarkv_dram_slot_bytes_used", "Arena bytes allocated to page slots.", value=dram["slot_bytes_used"]
    )
    yield GaugeMetricFamily(
        "polarkv_dram_reserved_pages",
        "DRAM slots reserved by engines, not committed yet.",
        value=dram["reserved_pages"],
    )
    yield GaugeMetricFamily(
        "polarkv_dram_pinned_pages", "DRAM pages pinned by engine leases.", value=dram["pinned_pages"]
    )
    disk = tiers.get("disk")
    if disk is not None:
        yield GaugeMetricFamily(
            "polarkv_disk_raw_bytes", "Uncompressed bytes of the pages on disk.", value=disk["raw_bytes"]
        )
        yield GaugeMetricFamily(
            "polarkv_disk_pending_pages",
            "Evicted pages queued for writing to disk.",
            value=disk["pending_pages"],
        )
        yield GaugeMetricFamily(
            "polarkv_disk_pending_bytes", "Bytes queued for writing to disk.", value=disk["pending_bytes"]
        )

    hits = CounterMetricFamily(
        "polarkv_hit_pages", "Looked-up pages found, by the tier that holds them.", labels=["tier"]
    )
    hits.add_metric(["vram"], c.get("hit_pages_vram", 0))
    hits.add_metric(["dram"], c.get("hit_pages_dram", 0))
    hits.add_metric(["disk"], c.get("hit_pages_disk", 0))
    hits.add_metric(["remote"], c.get("hit_pages_remote", 0))
    yield hits
    loaded = CounterMetricFamily(
        "polarkv_loaded_pages", "Pages handed to engines by loads, by source tier.", labels=["tier"]
    )
    remote, vram = c.get("loaded_pages_remote", 0), c.get("loaded_pages_vram", 0)
    loaded.add_metric(["vram"], vram)
    loaded.add_metric(["dram"], c.get("loaded_pages", 0) - c.get("loaded_pages_disk", 0) - remote - vram)
    loaded.add_metric(["disk"], c.get("loaded_pages_disk", 0))
    loaded.add_metric(["remote"], remote)
    yield loaded

    moved_pages = CounterMetricFamily("polarkv_transfer_pages", "Pages moved, by data path.", labels=["path"])
    moved_bytes = CounterMetricFamily(
        "polarkv_transfer_bytes", "Page bytes moved, by data path.", labels=["path"]
    )
    for path, bytes_keys, pages_keys in _PATHS:
        minus = _MINUS.get(path, ("", ""))
        moved_pages.add_metric([path], sum(c.get(k, 0) for k in pages_keys) - c.get(minus[1], 0))
        # Byte counts only where the manager counts bytes (it does not for promotions and
        # demotions yet): an absent series is honest, a zero would not be.
        if any(k in c for k in bytes_keys) or path in ("engine_to_dram", "dram_to_engine"):
            moved_bytes.add_metric([path], sum(c.get(k, 0) for k in bytes_keys) - c.get(minus[0], 0))
    yield moved_pages
    yield moved_bytes

    evicted = CounterMetricFamily(
        "polarkv_evicted_pages", "Pages evicted, by tier and reason.", labels=["tier", "reason"]
    )
    for key, value in sorted(c.items()):
        m = _EVICTED_DRAM.match(key)
        if m:
            evicted.add_metric(["dram", m.group(1)], value)
    if disk is not None:
        evicted.add_metric(["disk", "any"], disk["evictions"])
    yield evicted
    evicted_bytes = CounterMetricFamily("polarkv_evicted_bytes", "Bytes evicted, by tier.", labels=["tier"])
    evicted_bytes.add_metric(["dram"], c.get("evicted_bytes_dram", 0))
    yield evicted_bytes

    for key, (name, doc) in _SIMPLE_COUNTERS.items():
        yield CounterMetricFamily(name.removesuffix("_total"), doc, value=c.get(key, 0))
    if disk is not None:
        yield CounterMetricFamily("polarkv_disk_corrupt_dropped", "Disk pages dropped as corrupt by the disk tier.",
                                  value=disk["corrupt_dropped"])  # fmt: skip
        yield CounterMetricFamily("polarkv_disk_seed_refused", "Disk pages deleted at start: keyed with another page-key seed.",
                                  value=disk.get("seed_refused", 0))  # fmt: skip
        yield CounterMetricFamily("polarkv_disk_write_errors", "Page writes the disk tier could not make (ENOSPC, EIO, ...).",
                                  value=disk.get("write_errors", 0))  # fmt: skip

    worth = st.get("worth")
    if worth is not None:
        rates = GaugeMetricFamily(
            "polarkv_fetch_rate_gbps",
            "What fetching a page back costs, measured by the daemon (moving average, GB/s; a default until measured).",
            labels=["tier"],
        )
        for tier, r in worth["fetch_gbps"].items():
            rates.add_metric([tier], r["gbps"])
        yield rates

    other = CounterMetricFamily(
        "polarkv_manager_events", "Manager counters without a dedicated series above.", labels=["event"]
    )
    for key, value in sorted(c.items()):
        if key not in _SIMPLE_COUNTERS and key not in _LABELLED and not _EVICTED_DRAM.match(key):
            other.add_metric([key], value)
    yield other

    if snap.cluster is not None:
        members = GaugeMetricFamily(
            "polarkv_cluster_members",
            "Cluster members this daemon knows, by state (itself included).",
            labels=["state"],
        )
        for state in ("alive", "suspect", "dead", "left"):
            members.add_metric([state], snap.cluster.get(state, 0))
        yield members
        for what, doc in (("pages", "Pages"), ("bytes", "Page bytes")):
            fam = CounterMetricFamily(
                f"polarkv_cluster_fetched_{what}",
                f"{doc} fetched from other members, by the transport that moved them.",
                labels=["transport"],
            )
            for t in ("rdma", "tcp"):
                fam.add_metric([t], c.get(f"cluster_fetched_{what}_{t}", 0))
            yield fam
        yield CounterMetricFamily(
            "polarkv_cluster_rdma_fallbacks",
            "Fetches whose RDMA attempt failed and that were done over TCP at once.",
            value=c.get("cluster_rdma_fallbacks", 0),
        )
    quotas = st.get("quotas")
    if quotas is not None:
        yield from _tenant_families(quotas)
    yield GaugeMetricFamily("polarkv_sessions", "Attached engine sessions.", value=len(st["sessions"]))
    yield GaugeMetricFamily("polarkv_leases", "Open leases (pinned loads and lookups).", value=st["leases"])
    yield GaugeMetricFamily(
        "polarkv_namespaces",
        "Namespaces known now: attached, or with pages in memory.",
        value=st["namespaces"],
    )


def _tenant_families(quotas: dict[str, Any]) -> Iterator[Any]:
    """Per tenant ([quotas]; the largest DRAM users, as in `status`): usage, quota, quota evictions."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    used = GaugeMetricFamily(
        "polarkv_tenant_bytes",
        "Bytes a tenant (a cache_salt, shown by its configured name or a digest) holds, by tier.",
        labels=["tenant", "tier"],
    )
    quota = GaugeMetricFamily(
        "polarkv_tenant_quota_bytes", "A tenant's quota, by tier (0 = unlimited).", labels=["tenant", "tier"]
    )
    evicted = CounterMetricFamily(
        "polarkv_tenant_evicted_pages",
        "Pages of a tenant evicted to keep it within its own quota, by tier.",
        labels=["tenant", "tier"],
    )
    for t in quotas["tenants"]:
        for tier in ("dram", "disk"):
            if t[f"{tier}_bytes"] is not None:
                used.add_metric([t["tenant"], tier], t[f"{tier}_bytes"])
            quota.add_metric([t["tenant"], tier], t[f"{tier}_quota"])
            evicted.add_metric([t["tenant"], tier], t[f"evicted_pages_{tier}"])
    yield used
    yield quota
    yield evicted


def _seconds_label(ns: int) -> str:
    return f"{ns / 1e9:g}"


class StatsCollector:
    """A prometheus_client collector that reads one Snapshot per scrape.

    `take_snapshot` is called from the HTTP server's thread and must itself hop onto the event loop
    (the daemon passes a function that does). No `describe()`: the registry is created with
    auto_describe off, so registering does not scrape.
    """

    def __init__(self, take_snapshot: Callable[[], Snapshot]) -> None:
        self.take_snapshot = take_snapshot

    def collect(self) -> Iterator[Any]:
        yield from families(self.take_snapshot())


#: (method, query string, body) -> (HTTP status, JSON-able answer), run on an HTTP server thread
Route = Callable[[str, str, bytes], tuple[int, Any]]
MAX_BODY_BYTES = 16 << 20
#: Each HTTP connection holds a thread: at most this many at once (more are answered 503 and closed),
#: and each socket read or write may wait at most HTTP_IO_TIMEOUT, so clients that send nothing, or
#: never end their body, cannot pile up threads and memory in the daemon.
MAX_HTTP_CONNECTIONS = 64
HTTP_IO_TIMEOUT = 10.0
#: A request's headers and body must arrive whole within this (answered 408, or 400 for a body): a
#: client trickling a byte per read timeout holds its slot this long, not forever.
HTTP_REQUEST_DEADLINE = 20.0
_LATE = (
    f"the request did not arrive whole (headers and body within {HTTP_REQUEST_DEADLINE:.0f} s, "
    f"each read within {HTTP_IO_TIMEOUT:.0f} s)"
)
#: A body over this is read and handled one at a time: 16 MiB of JSON can take ~25x in Python objects.
BIG_BODY_BYTES = 1 << 20
_BUSY = b'{"error": "too many HTTP connections to this daemon at once; retry"}'


class MetricsServer:
    """The HTTP endpoint (prometheus_client's threaded WSGI server) on `metrics.address`: /metrics,
    and the JSON routes registered with `route`."""

    def __init__(self, address: str, collector: StatsCollector) -> None:
        self.address = address
        self.collector = collector
        self._httpd: Any = None
        self.url = ""
        self._routes: dict[str, Route] = {}
        self._big_bodies = threading.Lock()

    def route(self, path: str, fn: Route) -> None:
        """Serve `path` with `fn` (from now on; the rest stays prometheus_client's)."""
        self._routes[path] = fn

    def _app(self, metrics_app: Any) -> Any:
        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            fn = self._routes.get(environ.get("PATH_INFO", ""))
            if fn is None:
                return metrics_app(environ, start_response)
            status, out = 400, {"error": "the body must be at most 16 MiB"}
            try:
                n = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                n = -1
            if 0 <= n <= MAX_BODY_BYTES:
                with self._big_bodies if n > BIG_BODY_BYTES else contextlib.nullcontext():
                    try:
                        body = environ["wsgi.input"].read(n) if n else b""
                        if len(body) < n:
                            raise TimeoutError
                    except OSError:  # a timeout or a reset: the body never came whole
                        out = {"error": _LATE}
                    else:
                        try:
                            status, out = fn(
                                environ.get("REQUEST_METHOD", "GET"), environ.get("QUERY_STRING", ""), body
                            )
                        except Exception as e:  # a bug in a route must not take the endpoint down
                            log.exception("HTTP %s failed", environ.get("PATH_INFO"))
                            status, out = 500, {"error": f"internal error: {e!r:.200}"}
            data = json.dumps(out).encode()
            start_response(
                f"{status} {_REASONS.get(status, 'Error')}",
                [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
            )
            return [data]

        return app

    def start(self) -> str:
        """Bind and serve; returns the URL. A bind failure is a ConfigError naming metrics.address."""
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.gc_collector import GCCollector
        from prometheus_client.platform_collector import PlatformCollector
        from prometheus_client.process_collector import ProcessCollector

        host, port = split_address(self.address)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        try:
            self._httpd, _thread = start_http_server(port, host, registry=registry)
        except OSError as e:
            why = e.strerror or str(e)
            if e.errno == errno.EADDRINUSE:
                why = (
                    "address already in use (another polarkvd or exporter listens there): choose another "
                    "port, port 0 for any free one, or set metrics.enabled = false"
                )
            raise ConfigError([("metrics.address", self.address, f"cannot listen: {why}")]) from None
        self._httpd.set_app(self._app(self._httpd.get_app()))
        _bound_connections(self._httpd)
        bound_host, bound_port = self._httpd.server_address[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}/metrics"
        return self.url

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


class _RequestReader(io.RawIOBase):
    """A connection's reads under one deadline: each waits at most HTTP_IO_TIMEOUT and never past
    the request's deadline (then TimeoutError, and `late` is set)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self.sock, self.deadline, self.late = sock, deadline, False

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.late = True
            raise TimeoutError(_LATE)
        self.sock.settimeout(min(HTTP_IO_TIMEOUT, left))
        try:
            return self.sock.recv_into(buf)
        except TimeoutError:
            self.late = True
            raise
        finally:
            self.sock.settimeout(HTTP_IO_TIMEOUT)  # for the answer's writes


def _handler_class(base: Any) -> type:
    """`base` (a WSGIRequestHandler) with the per-read timeout, the request deadline, and a 408 to a
    client whose request line or headers did not arrive in time (wsgiref would close silently)."""

    class Handler(base):
        timeout = HTTP_IO_TIMEOUT
        rfile: Any
        reader: _RequestReader

        def setup(self) -> None:
            super().setup()
            self.rfile.close()
            self.reader = _RequestReader(self.connection, time.monotonic() + HTTP_REQUEST_DEADLINE)
            self.rfile = io.BufferedReader(self.reader)

        def handle(self) -> None:
            try:
                super().handle()
            except TimeoutError:
                if not self.reader.late:  # the answer's write timed out: nothing more to say
                    raise
                body = json.dumps({"error": _LATE}).encode()
                with contextlib.suppress(OSError):
                    self.connection.sendall(
                        b"HTTP/1.0 408 Request Timeout\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
                    )

    return Handler


def _bound_connections(httpd: Any) -> None:
    """Give `httpd` (a ThreadingWSGIServer) an I/O timeout per read, a deadline per request and a cap
    on connections: over MAX_HTTP_CONNECTIONS a new one gets a 503 at once and is closed, never a thread."""
    httpd.socket.listen(4096)  # socketserver's 5 makes a burst of connects wait a second for SYN retries
    httpd.RequestHandlerClass = _handler_class(httpd.RequestHandlerClass)
    slots = threading.BoundedSemaphore(MAX_HTTP_CONNECTIONS)
    start, serve = httpd.process_request, httpd.process_request_thread

    def process_request(request: Any, client_address: Any) -> None:
        if not slots.acquire(blocking=False):
            try:
                request.settimeout(0)
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY)
                )
            except OSError:
                pass
            httpd.shutdown_request(request)
            return
        try:
            start(request, client_address)
        except BaseException:
            slots.release()
            raise

    def process_request_thread(request: Any, client_address: Any) -> None:
        try:
            serve(request, client_address)
        finally:
            slots.release()

    def handle_error(request: Any, client_address: Any) -> None:  # e.g. a client that timed out
        log.debug("HTTP connection from %s failed", client_address, exc_info=True)

    httpd.process_request, httpd.process_request_thread = process_request, process_request_thread
    httpd.handle_error = handle_error
