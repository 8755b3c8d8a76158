"""`polarkvd bench page-sizes`: a second page size arriving in a full arena (two models on one host).

Engine A (32 KiB pages) fills the arena twice over with chains of 8 pages, loading two earlier chains
after each store; engine B (8 KiB pages: 2 layers, 1 KV head) then reserves one page, which needs a
slab A's pages hold. Reports how long that reserve took, how many of A's pages it evicted or moved
(against one slab's worth), and the latency of a third engine's `ping`, sent every millisecond from
its own process, while A fills the arena and around B's reserve (issue 13, defect 1).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from typing import Any

import numpy as np

from polarkvd.bench import plots
from polarkvd.bench.harness import bench_main, percentile, private_daemon, table
from polarkvd.config.values import format_size, parse_size
from polarkvd.progress import Progress
from polarkvd.types import Namespace, PageKey

A_NS = Namespace(
    "bench-a@0", "bfloat16", "bench/v1", num_layers=4, num_kv_heads=2, head_dim=64, page_tokens=16
)
B_NS = Namespace(
    "bench-b@0", "bfloat16", "bench/v1", num_layers=2, num_kv_heads=1, head_dim=64, page_tokens=16
)
assert A_NS.page_bytes == 32 << 10 and B_NS.page_bytes == 8 << 10
CHAIN = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--capacity", default="1GiB", help="dram.capacity (default 1GiB)")
    p.add_argument("--slab", default="64MiB", help="dram.slab_bytes (default 64MiB, the daemon's default)")
    p.add_argument(
        "--fill", type=float, default=2.0, help="engine A stores this many arenas' worth (default 2)"
    )
    p.add_argument("--disk", action="store_true", help="with the disk tier (evicted pages are written there)")
    plots.add_plot_arguments(p)


def _pinger(path: str, stop: Any, out: Any) -> None:
    """Ping the daemon every millisecond until `stop`; send (monotonic send time, seconds) pairs."""
    from polarkvd.client import EngineClient

    kv = EngineClient(A_NS, "pinger", path, timeout=60, lookup_table=False)
    samples: list[tuple[float, float]] = []
    while not stop.is_set():
        t = time.monotonic()
        kv.ping()
        samples.append((t, time.monotonic() - t))
        time.sleep(0.001)
    kv.close()
    out.send(samples)


def _ping_row(samples: list[tuple[float, float]], lo: float, hi: float) -> dict[str, float]:
    ms = [s * 1e3 for t, s in samples if lo <= t <= hi]
    return {
        "pings": len(ms),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms, default=float("nan")),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from polarkvd.client import ControlClient, EngineClient

    capacity, slab = parse_size(args.capacity), parse_size(args.slab)
    per_slab = slab // A_NS.page_bytes
    chains = int(args.fill * capacity // A_NS.page_bytes // CHAIN)
    sets = {"dram.capacity": str(capacity), "dram.slab_bytes": str(slab), "daemon.log_level": "info"}
    sets["disk.enabled"] = "true" if args.disk else "false"
    if args.disk:
        sets["disk.capacity"] = str(2 * capacity)
    page = np.full(A_NS.page_bytes, 3, np.uint8)
    res: dict[str, Any] = {
        "capacity": capacity,
        "slab_bytes": slab,
        "a_pages_per_slab": per_slab,
        "chains": chains,
        "disk": bool(args.disk),
    }
    ctx = mp.get_context("spawn")
    # a live bar on a terminal, plain lines on stderr otherwise
    with Progress(3) as prog, private_daemon(sets) as (engine, control):
        stop = ctx.Event()
        recv, send = ctx.Pipe(duplex=False)
        pinger = ctx.Process(target=_pinger, args=(str(engine), stop, send), daemon=True)
        pinger.start()
        a = EngineClient(A_NS, "a", engine, timeout=60)
        prog.step(f"engine A stores {chains} chains of {CHAIN} pages")
        fill_start = time.monotonic()
        stored: list[list[PageKey]] = []
        rng = np.random.default_rng(0)
        for c in range(chains):
            keys = a.page_keys(rng.integers(0, 50_000, CHAIN * A_NS.page_tokens))
            a.store(keys, [page] * CHAIN)
            stored.append(keys)
            for old in (c // 2, c // 3):
                r = a.load(stored[old])
                del r.views
                if r.lease is not None:
                    a.release(r.lease)
        fill_end = time.monotonic()
        with ControlClient(control, timeout=60) as ctl:
            before = ctl.stats()
        prog.step("engine B reserves one page of another size")
        time.sleep(0.2)  # a quiet stretch of pings before
        b = EngineClient(B_NS, "b", engine, timeout=60)
        keys = b.page_keys(np.arange(B_NS.page_tokens))
        t0 = time.monotonic()
        offsets = b.reserve(keys)
        t1 = time.monotonic()
        b.page(offsets[0])[:] = b"\x07" * B_NS.page_bytes
        b.commit(keys)
        more = b.page_keys(np.arange(64 * B_NS.page_tokens) + 7)
        t2 = time.monotonic()
        more_offsets = b.reserve(more)
        t3 = time.monotonic()
        b.abort([k for k, o in zip(more, more_offsets) if o >= 0])
        time.sleep(0.2)
        stop.set()
        prog.step("done")
        samples = recv.recv()
        pinger.join(10)
        with ControlClient(control, timeout=60) as ctl:
            after = ctl.stats()
        a.close()
        b.close()
    c0, c1 = before["counters"], after["counters"]
    res["reserve_ms"] = (t1 - t0) * 1e3
    res["reserve_64_more_ms"] = (t3 - t2) * 1e3
    res["evicted_pages"] = sum(c1.get(k, 0) - c0.get(k, 0) for k in c1 if k.startswith("evicted_pages_dram_"))
    res["moved_pages"] = c1.get("slab_moved_pages", 0) - c0.get("slab_moved_pages", 0)
    res["a_pages_before"] = before["tiers"]["dram"]["pages"]
    res["pages_after"] = after["tiers"]["dram"]["pages"]
    res["ping_fill"] = _ping_row(samples, fill_start, fill_end)
    res["ping_reserve"] = _ping_row(samples, t0 - 0.1, t3 + 0.1)
    return res


def render(res: dict[str, Any]) -> str:
    rows = [
        ("reserve of 1 page of the 2nd size", f"{res['reserve_ms']:.1f} ms", "<= 50 ms"),
        ("then 64 more pages of it", f"{res['reserve_64_more_ms']:.1f} ms", ""),
        ("A's pages evicted", str(res["evicted_pages"]), f"with moved <= {res['a_pages_per_slab']} (one slab)"),
        ("A's pages moved", str(res["moved_pages"]), ""),
    ]  # fmt: skip
    for name, key in (("while A fills", "ping_fill"), ("around B's reserve", "ping_reserve")):
        p = res[key]
        rows.append(
            (f"ping p50 / p99 / max, {name}", f"{p['p50_ms']:.2f} / {p['p99_ms']:.2f} / {p['max_ms']:.2f} ms",
             f"p99 <= 10 ms ({p['pings']} pings)")
        )  # fmt: skip
    head = (
        f"arena {format_size(res['capacity'])} in slabs of {format_size(res['slab_bytes'])} "
        f"({res['a_pages_per_slab']} pages of 32 KiB), {res['chains']} chains of {CHAIN} stored, "
        f"disk tier {'on' if res['disk'] else 'off'}"
    )
    return head + "\n" + table(rows, ("", "measured", "bar"))


def main(args: argparse.Namespace) -> int:
    return bench_main("page-sizes", args, run, render)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(main(p.parse_args()))
