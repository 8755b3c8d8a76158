"""`polarkvd bench datapath`: the engine data path against the hardware's own limits, in one run.

Measures, through a real daemon process and `polarkvd.client`:
- store and load GB/s of realistic pages (256 tokens of a 30-layer model, 3 KV heads x 64 dims, bf16:
  5.9 MB) and of small 64 KiB pages, beside single-thread memcpy of the same bytes;
- lookup latency of 32 keys as engines get it (from the shared lookup table, with the compiled
  probe and with the Python one) and over the socket (a client without the table), beside the raw
  round trip of the same kind of socket (Unix stream, 100 bytes, echo in another process) and of
  ZeroMQ REQ/REP over ipc:// (the alternative we did not pick); and, with the disk tier on, of a
  partial hit (DRAM pages, then disk pages, then a miss: a new request's prompt), the same three
  ways (`--lookup-only`: just these);
- disk tier: compression ratio on bf16 KV-like data and GB/s of loads that promote from disk;
- what write-through costs: stores with the disk tier under write-back and under write-through
  (commit answers once the pages are on disk and synced), side by side, and 64 KiB pages committed
  one per call by several engines at once (group commit);
- metadata bytes per cached page in the daemon's index.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from polarkvd.bench import plots
from polarkvd.bench.harness import bench_main, median, percentile, private_daemon, table
from polarkvd.progress import Progress
from polarkvd.types import Namespace, Tier

BIG_NS = Namespace(
    "bench-30l@0", "bfloat16", "bench/v1", num_layers=30, num_kv_heads=3, head_dim=64, page_tokens=256
)
SMALL_NS = Namespace(
    "bench-small@0", "bfloat16", "bench/v1", num_layers=4, num_kv_heads=4, head_dim=64, page_tokens=16
)
assert SMALL_NS.page_bytes == 64 * 1024


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--pages", type=int, default=32, help="5.9 MB pages per store/load round (default 32)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per measurement; medians are reported")
    p.add_argument("--lookups", type=int, default=3000, help="lookups of 32 keys to time")
    p.add_argument(
        "--lookup-only",
        action="store_true",
        help="only the lookups (both probes and the socket) beside the raw round trips (no --plot)",
    )
    p.add_argument(
        "--write-through-sync",
        choices=("files", "filesystem"),
        default="files",
        help="disk.write_through_sync of the disk-tier daemon (the write-through rows)",
    )
    plots.add_plot_arguments(p)


def kv_like_pages(ns: Namespace, n: int, seed: int = 0) -> list[np.ndarray]:
    """Pages of bf16 values drawn like KV activations (normal), as uint8 views."""
    rng = np.random.default_rng(seed)
    base = [
        (rng.standard_normal(ns.page_bytes // 2, dtype=np.float32).view(np.uint32) >> 16)
        .astype(np.uint16)
        .view(np.uint8)
        for _ in range(min(n, 4))
    ]
    return [base[i % len(base)] for i in range(n)]


# ----------------------------------------------------------------------------- references


def memcpy_seconds(srcs: list[np.ndarray], dsts: list[np.ndarray]) -> float:
    """Single-thread memcpy of the same buffers a store or load moves, one call per page."""
    t = time.perf_counter()
    for src, dst in zip(srcs, dsts):
        np.copyto(dst, src)
    return time.perf_counter() - t


def _echo_server(path: str, ready: Any) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    ready.set()
    conn, _ = srv.accept()
    while True:
        data = conn.recv(4096)
        if not data:
            return
        conn.sendall(data)


def socket_rtt_us(n: int) -> list[float]:
    """Round trips of 100 bytes over a Unix stream socket to an echo process."""
    path = os.path.join(tempfile.mkdtemp(prefix="polarkv-rtt-"), "echo.sock")
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_echo_server, args=(path, ready), daemon=True)
    proc.start()
    ready.wait(30)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    msg = b"x" * 100
    out = []
    for _ in range(n):
        t = time.perf_counter()
        c.sendall(msg)
        got = 0
        while got < len(msg):
            got += len(c.recv(4096))
        out.append((time.perf_counter() - t) * 1e6)
    c.close()
    proc.join(5)
    return out


def _zmq_echo(addr: str, ready: Any) -> None:
    import zmq

    s: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REP)
    s.bind(addr)
    ready.set()
    while True:
        m = s.recv()
        if m == b"stop":
            s.send(b"")
            return
        s.send(m)


def zmq_rtt_us(n: int) -> list[float]:
    import zmq

    addr = "ipc://" + os.path.join(tempfile.mkdtemp(prefix="polarkv-zrtt-"), "echo")
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_zmq_echo, args=(addr, ready), daemon=True)
    proc.start()
    ready.wait(30)
    s: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REQ)
    s.connect(addr)
    msg = b"x" * 100
    out = []
    for _ in range(n):
        t = time.perf_counter()
        s.send(msg)
        s.recv()
        out.append((time.perf_counter() - t) * 1e6)
    s.send(b"stop")
    s.recv()
    s.close(linger=0)
    proc.join(5)
    return out


def metadata_bytes_per_page(n: int = 50_000) -> float:
    """Bytes the daemon's DRAM index holds per cached page: key, Page node, dict entry, policy links."""
    import gc
    import tracemalloc

    from polarkvd.index import READY, Page, PageIndex
    from polarkvd.keys import namespace_digest, page_keys
    from polarkvd.policy import make_policy

    keys = page_keys(namespace_digest(BIG_NS, bytes(32)), np.arange(n * 16) % 50000, 16)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index, policy = PageIndex(), make_policy("lru")
    keys_copy = [bytes(k) for k in keys]  # the daemon holds its own key objects, decoded off the wire
    prev = None
    for i, key in enumerate(keys_copy):
        page = Page(key, 1, i * 5_898_240, 5_898_240, prev, READY)
        index.add(page)
        policy.insert(page)
        prev = key
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / n


# ----------------------------------------------------------------------------- the data path


def _timed_store(kv: Any, keys: Sequence[bytes], pages: list[np.ndarray], batch: int) -> float:
    t = time.perf_counter()
    for i in range(0, len(keys), batch):
        r = kv.store(keys[i : i + batch], pages[i : i + batch], parent=keys[i - 1] if i else None)
        assert r.stored == len(keys[i : i + batch]), r
    return time.perf_counter() - t


def _timed_load(kv: Any, keys: Sequence[bytes], outs: list[np.ndarray], batch: int) -> tuple[float, int]:
    t = time.perf_counter()
    n = 0
    for i in range(0, len(keys), batch):
        n += kv.load_into(keys[i : i + batch], outs[i : i + batch])
    return time.perf_counter() - t, n


def run(args: argparse.Namespace) -> dict[str, Any]:
    with Progress(
        3 if args.lookup_only else 8
    ) as prog:  # a live bar on a terminal, plain lines on stderr otherwise
        return _run(args, prog)


def _run(args: argparse.Namespace, prog: Progress) -> dict[str, Any]:
    from polarkvd.client import ControlClient, EngineClient

    npages, rounds = args.pages, args.rounds
    big = BIG_NS.page_bytes
    dram = max(1 << 30, (npages * 2 + 8) * (big + 4096) + (64 << 20))
    res: dict[str, Any] = {
        "page_bytes": big,
        "small_page_bytes": SMALL_NS.page_bytes,
        "pages_per_round": npages,
    }

    prog.step("raw round trips: Unix stream socket and ZeroMQ REQ/REP ipc")
    rtt = socket_rtt_us(5000)
    res["socket_rtt_p50_us"], res["socket_rtt_p99_us"] = percentile(rtt, 50), percentile(rtt, 99)
    zr = zmq_rtt_us(3000)
    res["zmq_ipc_rtt_p50_us"], res["zmq_ipc_rtt_p99_us"] = percentile(zr, 50), percentile(zr, 99)
    if args.lookup_only:
        return _run_lookups_only(args, prog, res)

    prog.step("metadata bytes per cached page")
    res["metadata_bytes_per_page"] = metadata_bytes_per_page()

    pages = kv_like_pages(BIG_NS, npages)
    outs = [np.empty(big, np.uint8) for _ in range(npages)]
    batch = 8
    # The data path alone: no disk tier, so no background compression competes for the CPU while we time.
    sets = {
        "dram.capacity": str(dram),
        "dram.slab_bytes": "64MiB",
        "disk.enabled": "false",
        "daemon.log_level": "warning",
    }
    with private_daemon(sets) as (engine_sock, control_sock):
        ctl = ControlClient(control_sock)
        kv = EngineClient(BIG_NS, "bench", engine_sock)
        prog.step(f"store and load {rounds} x {npages} pages of {big / 1e6:.1f} MB ({batch} per call)")
        store_t, load_t, copy_t = [], [], []
        warm_keys = kv.page_keys(np.arange(npages * 256) + 7_000_000)
        _timed_store(kv, warm_keys, pages, batch)  # first touch of the arena slots
        ctl.evict("dram", 1 << 40)
        for r in range(rounds):
            # memcpy of the same bytes, interleaved with the rounds so machine noise hits both alike
            copy_t.append(memcpy_seconds(pages, outs))
            keys = kv.page_keys(np.arange(npages * 256) + r * 10_000_000)
            store_t.append(_timed_store(kv, keys, pages, batch))
            lt, n = _timed_load(kv, keys, outs, batch)
            assert n == npages, f"loaded {n} of {npages}"
            load_t.append(lt)
            if r < rounds - 1:
                ctl.evict("dram", 1 << 40)  # room for the next round
        assert all(np.array_equal(o, p) for o, p in zip(outs, pages)), "loaded bytes differ from stored bytes"
        res["memcpy_gbps"] = npages * big / median(copy_t) / 1e9
        res["store_gbps"] = npages * big / median(store_t) / 1e9
        res["load_gbps"] = npages * big / median(load_t) / 1e9

        prog.step(f"lookup of 32 keys x {args.lookups}: shared table (both probes), and over the socket")
        res.update(table_lookups(kv, engine_sock, keys[:32], args.lookups))
        kv.close()

        prog.step("64 KiB pages: store and load, 64 per call")
        skv = EngineClient(SMALL_NS, "bench-small", engine_sock)
        spages = kv_like_pages(SMALL_NS, 512, seed=3)
        souts = [np.empty(SMALL_NS.page_bytes, np.uint8) for _ in spages]
        sst, slt, sct = [], [], []
        for r in range(rounds):
            sct.append(memcpy_seconds(spages, souts))
            keys = skv.page_keys(np.arange(len(spages) * 16) + r * 10_000_000 + 5)
            sst.append(_timed_store(skv, keys, spages, 64))
            lt, _ = _timed_load(skv, keys, souts, 64)
            slt.append(lt)
        res["memcpy_small_gbps"] = len(spages) * SMALL_NS.page_bytes / median(sct) / 1e9
        res["store_small_gbps"] = len(spages) * SMALL_NS.page_bytes / median(sst) / 1e9
        res["load_small_gbps"] = len(spages) * SMALL_NS.page_bytes / median(slt) / 1e9
        skv.close()
        ctl.close()

    prog.step("disk tier: store, demote everything to disk, load (promote) it back")
    sets = {
        "dram.capacity": str(dram),
        "dram.slab_bytes": "64MiB",
        "disk.capacity": str(max(4 << 30, 4 * npages * big)),
        "disk.write_through_sync": args.write_through_sync,
        "daemon.log_level": "warning",
    }
    with private_daemon(sets) as (engine_sock, control_sock):
        ctl = ControlClient(control_sock)
        kv = EngineClient(BIG_NS, "bench", engine_sock)
        keys = kv.page_keys(np.arange(npages * 256) + 99_000_000)
        _timed_store(kv, keys, pages, batch)
        ctl.evict("dram", 1 << 40)
        deadline = time.monotonic() + 300
        while ctl.stats()["tiers"]["disk"]["pending_pages"] and time.monotonic() < deadline:
            time.sleep(0.05)
        disk = ctl.stats()["tiers"]["disk"]
        res["disk_ratio"] = disk["raw_bytes"] / disk["bytes"] if disk["bytes"] else float("nan")
        assert kv.lookup(keys).tiers == [Tier.DISK] * npages, "evicted pages should be disk hits"
        lt, n = _timed_load(kv, keys, outs, batch)
        assert n == npages, f"disk load returned {n} of {npages} pages"
        assert all(np.array_equal(o, p) for o, p in zip(outs, pages)), "bytes promoted from disk differ"
        res["disk_load_gbps"] = npages * big / lt / 1e9
        kv.close()

        prog.step("store with the disk tier: write-back and write-through side by side")
        res.update(write_through_cost(ctl, engine_sock, pages, rounds, batch))
        res["write_through_sync"] = args.write_through_sync

        prog.step(f"partial-hit lookup of 32 keys x {args.lookups} with the disk tier: table and socket")
        res.update(partial_hit_lookups(ctl, engine_sock, args.lookups))
        ctl.close()

    res["store_vs_memcpy"] = res["store_gbps"] / res["memcpy_gbps"]
    res["load_vs_memcpy"] = res["load_gbps"] / res["memcpy_gbps"]
    lookup_ratios(res)
    return res


def lookup_ratios(res: dict[str, Any]) -> None:
    """Each lookup's p50 against the raw Unix socket round trip of the same run."""
    rtt = res["socket_rtt_p50_us"]
    for name in ("lookup", "lookup_python", "lookup_socket", "lookup_partial", "lookup_partial_python",
                 "lookup_partial_socket"):  # fmt: skip
        res[f"{name}_p50_vs_rtt"] = res[f"{name}_p50_us"] / rtt


def _run_lookups_only(args: argparse.Namespace, prog: Progress, res: dict[str, Any]) -> dict[str, Any]:
    """`--lookup-only`: the lookups of the full run (same pages, same daemons' settings), nothing else."""
    from polarkvd.client import ControlClient, EngineClient

    pages = kv_like_pages(BIG_NS, 32)
    sets = {"dram.capacity": "1GiB", "dram.slab_bytes": "64MiB", "disk.enabled": "false",
            "daemon.log_level": "warning"}  # fmt: skip
    with private_daemon(sets) as (engine_sock, _):
        kv = EngineClient(BIG_NS, "bench", engine_sock)
        keys = kv.page_keys(np.arange(32 * 256))
        _timed_store(kv, keys, pages, 8)
        prog.step(f"lookup of 32 keys x {args.lookups}: shared table (both probes), and over the socket")
        res.update(table_lookups(kv, engine_sock, keys, args.lookups))
        kv.close()
    sets = {"dram.capacity": "1GiB", "dram.slab_bytes": "64MiB", "disk.capacity": "4GiB",
            "daemon.log_level": "warning"}  # fmt: skip
    with private_daemon(sets) as (engine_sock, control_sock):
        ctl = ControlClient(control_sock)
        prog.step(f"partial-hit lookup of 32 keys x {args.lookups} with the disk tier: table and socket")
        res.update(partial_hit_lookups(ctl, engine_sock, args.lookups))
        ctl.close()
    lookup_ratios(res)
    return res


def _python_probe_client(ns: Namespace, engine_id: str, engine_sock: Any) -> Any:
    """A client whose shared-table probe is the Python one (POLARKVD_PURE_PYTHON while it attaches)."""
    from polarkvd.client import EngineClient
    from polarkvd.wire.lookup_table import PURE_PYTHON_ENV

    before = os.environ.get(PURE_PYTHON_ENV)
    os.environ[PURE_PYTHON_ENV] = "1"
    try:
        return EngineClient(ns, engine_id, engine_sock, map_arena=False)
    finally:
        if before is None:
            del os.environ[PURE_PYTHON_ENV]
        else:
            os.environ[PURE_PYTHON_ENV] = before


def _time_lookups(clients: Sequence[Any], lk: Sequence[bytes], n: int) -> list[tuple[list[float], Any]]:
    """`n` lookups of `lk` by each client, each in its own loop as an engine would call it
    (interleaved, each one's cache misses would land on the other): (latencies in us, last answer)."""
    out = []
    for client in clients:
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            hit = client.lookup(lk)
            lat.append((time.perf_counter() - t) * 1e6)
        out.append((lat, hit))
    return out


def _probe_name(client: Any) -> str:
    table = client._table  # the bench reports which probe the engine's client got
    return "none" if table is None else "compiled" if table.compiled else "python"


def table_lookups(kv: Any, engine_sock: Any, lk: Sequence[bytes], n: int) -> dict[str, Any]:
    """Lookups of 32 keys held in DRAM: the engine's client (the shared table, with the compiled
    probe where it is built), a client probing the table in Python, and one without the table (every
    lookup a round trip, answered on its connection thread)."""
    from polarkvd.client import EngineClient

    py_kv = _python_probe_client(BIG_NS, "bench-python-probe", engine_sock)
    sock_kv = EngineClient(BIG_NS, "bench-socket", engine_sock, map_arena=False, lookup_table=False)
    out: dict[str, Any] = {"lookup_probe": _probe_name(kv), "lookup_python_probe": _probe_name(py_kv)}
    for name, (lat, hit) in zip(
        ("lookup", "lookup_python", "lookup_socket"), _time_lookups((kv, py_kv, sock_kv), lk, n)
    ):
        assert hit.hits == len(lk), "the looked-up pages should be in DRAM"
        out[f"{name}_p50_us"], out[f"{name}_p99_us"] = percentile(lat, 50), percentile(lat, 99)
    py_kv.close()
    sock_kv.close()
    return out


def _settle(ctl: Any) -> None:
    """Empty DRAM and wait until its demotions are written: nothing competes with the next timing."""
    ctl.evict("dram", 1 << 40)
    deadline = time.monotonic() + 300
    while ctl.stats()["tiers"]["disk"]["pending_pages"] and time.monotonic() < deadline:
        time.sleep(0.02)


def _commit_one_by_one(engine_sock: Any, engines: int, commits: int, base: int) -> tuple[float, list[float]]:
    """`engines` clients (threads) each storing `commits` 64 KiB pages, one page per commit: the
    wall time and every commit's latency in microseconds."""
    from polarkvd.client import EngineClient

    page = kv_like_pages(SMALL_NS, 1, seed=9)[0]

    def one(i: int) -> list[float]:
        lat = []
        with EngineClient(SMALL_NS, f"bench-commit-{i}", engine_sock) as kv:
            keys = kv.page_keys(np.arange(commits * 16) + base + i * 1_000_000)
            for k in keys:
                off = kv.reserve([k])[0]
                assert off >= 0, "no room for a 64 KiB page"
                kv.page(off)[:] = page.data
                t = time.perf_counter()
                kv.commit([k])
                lat.append((time.perf_counter() - t) * 1e6)
        return lat

    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(engines) as pool:
        lats = [x for part in pool.map(one, range(engines)) for x in part]
    return time.perf_counter() - t, lats


def write_through_cost(
    ctl: Any, engine_sock: Any, pages: list[np.ndarray], rounds: int, batch: int, engines: int = 4
) -> dict[str, Any]:
    """Store GB/s of 5.9 MB pages (`batch` per commit) and commits of single 64 KiB pages by
    `engines` engines at once, under write-back and under write-through (disk.write_through: the
    commit answers once its pages are on disk and synced), in alternating rounds so machine noise
    hits both alike; DRAM is emptied, and its demotions written, before each timing."""
    from polarkvd.client import EngineClient

    big = BIG_NS.page_bytes
    kv = EngineClient(BIG_NS, "bench-write-through", engine_sock)
    store: dict[bool, list[float]] = {False: [], True: []}
    small: dict[bool, list[float]] = {False: [], True: []}
    lat: dict[bool, list[float]] = {False: [], True: []}
    commits = 64
    before = ctl.stats()["tiers"]["disk"]["group_commit"]
    for r in range(rounds):
        for wt in (False, True):
            ctl.set_knobs({"disk.write_through": wt})
            base = 200_000_000 + r * 20_000_000 + wt * 10_000_000
            _settle(ctl)
            keys = kv.page_keys(np.arange(len(pages) * 256) + base)
            store[wt].append(_timed_store(kv, keys, pages, batch))
            _settle(ctl)
            wall, lats = _commit_one_by_one(engine_sock, engines, commits, base + 5_000_000)
            small[wt].append(wall)
            lat[wt] += lats
    ctl.set_knobs({"disk.write_through": False})
    after = ctl.stats()["tiers"]["disk"]["group_commit"]
    kv.close()
    _settle(ctl)
    out: dict[str, Any] = {"commit_engines": engines}
    for wt, name in ((False, "wb"), (True, "wt")):
        out[f"store_{name}_gbps"] = len(pages) * big / median(store[wt]) / 1e9
        out[f"commits_{name}_per_s"] = engines * commits / median(small[wt])
        out[f"commit_{name}_p50_us"] = percentile(lat[wt], 50)
        out[f"commit_{name}_p99_us"] = percentile(lat[wt], 99)
    batches = after["batches"] - before["batches"]
    written = after["pages"] - before["pages"]
    out["group_commit_pages_per_batch"] = written / batches if batches else 0.0
    out["group_commit_syncs_per_page"] = (after["syncs"] - before["syncs"]) / written if written else 0.0
    out["group_commit_failed_pages"] = after["failed_pages"] - before["failed_pages"]
    return out


def partial_hit_lookups(ctl: Any, engine_sock: Any, n: int) -> dict[str, float]:
    """Lookups of 32 keys that a new request makes: 12 pages in DRAM, 12 on disk, 8 never stored
    (64 KiB pages), from the shared table (DRAM and disk pages listed, the miss final) and over the
    socket. Checks that the table lookups never reached the daemon."""
    from polarkvd.client import EngineClient

    kv = EngineClient(SMALL_NS, "bench-partial", engine_sock)
    py_kv = _python_probe_client(SMALL_NS, "bench-partial-python", engine_sock)
    sock_kv = EngineClient(SMALL_NS, "bench-partial-socket", engine_sock, map_arena=False, lookup_table=False)
    pages = kv_like_pages(SMALL_NS, 24, seed=5)
    keys = kv.page_keys(np.arange(24 * 16) + 77_000_000)
    _timed_store(kv, keys, pages, 24)
    ctl.evict_keys([keys[12]])  # the last 12 pages go to disk
    deadline = time.monotonic() + 60
    while ctl.stats()["tiers"]["disk"]["pending_pages"] and time.monotonic() < deadline:
        time.sleep(0.05)  # written: no compression competes with the timing
    lk = keys + kv.page_keys(np.arange(8 * 16) + 78_000_000)
    want = [Tier.DRAM] * 12 + [Tier.DISK] * 12
    while (kv.lookup(lk).tiers != want or py_kv.lookup(lk).tiers != want) and time.monotonic() < deadline:
        time.sleep(0.05)
    before = ctl.stats()["counters"]
    timed = _time_lookups((kv, py_kv, sock_kv), lk, n)
    after = ctl.stats()["counters"]
    from_table = after.get("table_lookups", 0) - before.get("table_lookups", 0)
    assert from_table == 2 * n, f"{2 * n - from_table} of {2 * n} partial-hit lookups went to the daemon"
    out: dict[str, float] = {}
    for name, (lat, hit) in zip(("lookup_partial", "lookup_partial_python", "lookup_partial_socket"), timed):
        assert hit.tiers == want, f"expected 12 DRAM then 12 disk hits, got {[int(x) for x in hit.tiers]}"
        out[f"{name}_p50_us"], out[f"{name}_p99_us"] = percentile(lat, 50), percentile(lat, 99)
    kv.close()
    py_kv.close()
    sock_kv.close()
    return out


def lookup_rows(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The lookups' rows: the engine's (with the probe its client got), the Python probe's and the
    socket's, each against the raw Unix socket round trip."""

    def row(label: str, name: str, bar: str = "") -> tuple[str, str, str, str]:
        value = f"{res[name + '_p50_us']:.1f} / {res[name + '_p99_us']:.1f} us"
        return label, value, f"{res[name + '_p50_vs_rtt']:.2f}x socket RTT", bar

    return [
        row(f"lookup 32 keys p50/p99 ({res['lookup_probe']} probe)", "lookup", "p50 <= 0.5x, p99 <= 1000 us"),
        row("  Python probe", "lookup_python"),
        row("  over the socket", "lookup_socket"),
        row(f"lookup 32 keys, DRAM+disk+miss ({res['lookup_probe']} probe)", "lookup_partial"),
        row("  Python probe", "lookup_partial_python"),
        row("  over the socket", "lookup_partial_socket"),
    ]


def render(res: dict[str, Any]) -> str:
    f = lambda v, d=2: f"{v:.{d}f}"  # noqa: E731
    rtt = [
        (
            "Unix socket RTT p50/p99",
            f"{res['socket_rtt_p50_us']:.1f} / {res['socket_rtt_p99_us']:.1f} us",
            "",
            "",
        ),
        (
            "ZeroMQ ipc RTT p50/p99",
            f"{res['zmq_ipc_rtt_p50_us']:.1f} / {res['zmq_ipc_rtt_p99_us']:.1f} us",
            "",
            "",
        ),
    ]
    if "store_gbps" not in res:  # --lookup-only
        return table([*lookup_rows(res), *rtt], ("measure", "value", "ratio", "bar"))
    rows = [
        (
            "store 5.9 MB pages",
            f(res["store_gbps"]) + " GB/s",
            f(res["store_vs_memcpy"]) + "x memcpy",
            ">= 0.8x",
        ),
        (
            "load 5.9 MB pages",
            f(res["load_gbps"]) + " GB/s",
            f(res["load_vs_memcpy"]) + "x memcpy",
            ">= 0.8x",
        ),
        ("memcpy (1 thread)", f(res["memcpy_gbps"]) + " GB/s", "", ""),
        (
            "store 64 KiB pages",
            f(res["store_small_gbps"]) + " GB/s",
            f(res["store_small_gbps"] / res["memcpy_small_gbps"]) + "x memcpy",
            "",
        ),
        (
            "load 64 KiB pages",
            f(res["load_small_gbps"]) + " GB/s",
            f(res["load_small_gbps"] / res["memcpy_small_gbps"]) + "x memcpy",
            "",
        ),
        *lookup_rows(res),
        *rtt,
        ("disk load (promote)", f(res["disk_load_gbps"]) + " GB/s", "", ""),
        (
            "store 5.9 MB pages, disk on: write-back",
            f(res["store_wb_gbps"]) + " GB/s",
            "",
            "",
        ),
        (
            "  write-through (durable commit)",
            f(res["store_wt_gbps"]) + " GB/s",
            f(res["store_wt_gbps"] / res["store_wb_gbps"]) + "x write-back",
            "",
        ),
        (
            f"commit 1 x 64 KiB, {res['commit_engines']} engines: write-back",
            f"{res['commits_wb_per_s']:.0f} /s",
            f"p50/p99 {res['commit_wb_p50_us']:.0f} / {res['commit_wb_p99_us']:.0f} us",
            "",
        ),
        (
            "  write-through (durable commit)",
            f"{res['commits_wt_per_s']:.0f} /s",
            f"p50/p99 {res['commit_wt_p50_us']:.0f} / {res['commit_wt_p99_us']:.0f} us",
            "",
        ),
        (
            f"  write-through pages per group commit ({res['write_through_sync']})",
            f(res["group_commit_pages_per_batch"], 1),
            f"{res['group_commit_syncs_per_page']:.2f} syncs/page, {res['group_commit_failed_pages']:.0f} failed",
            "",
        ),
        ("disk compression (bf16)", f(res["disk_ratio"]) + "x", "", ">= 1.4x"),
        ("metadata per page", f(res["metadata_bytes_per_page"], 0) + " B", "", "<= 256 B"),
    ]
    return table(rows, ("measure", "value", "ratio", "bar"))


def main(args: argparse.Namespace) -> int:
    if args.lookup_only and args.plot:
        print("bench datapath: --plot draws a whole run; leave out --lookup-only", file=sys.stderr)
        return 2
    return bench_main("datapath", args, run, render)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(main(p.parse_args()))
