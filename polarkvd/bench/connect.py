"""`polarkvd bench connect`: a connect flood against a private daemon, loopback only, bounded in time.

Several processes construct and close `EngineClient`s in a tight loop (each keeps one client open,
so the arena stays mapped and a construction is connect + hello + close); optionally the bench first
opens idle connections that never send hello, as a careless or hostile client would. It reports how
many constructions succeeded within the client timeout, why the others failed, and the daemon's
thread count (sampled from `stats` throughout), against the bound its configuration sets.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from polarkvd.bench import plots
from polarkvd.bench.harness import percentile, private_daemon, table
from polarkvd.types import Namespace

NS = Namespace(
    "bench-connect@0", "bfloat16", "bench/v1", num_layers=2, num_kv_heads=1, head_dim=64, page_tokens=16
)


def flood_worker(socket_path: str, count: int, seconds: float, timeout: float, out: Any, go: Any) -> None:
    """One flooding process: `count` constructions (or as many as fit in `seconds` when count is 0)."""
    from polarkvd.client import EngineClient
    from polarkvd.errors import PolarKVError

    give_up = time.monotonic() + 60
    while True:  # the anchor may wait for idle connections over the cap to be closed (hello_timeout)
        try:
            anchor = EngineClient(NS, "flood-anchor", socket_path, timeout=30)
            break
        except PolarKVError:
            if time.monotonic() > give_up:
                raise
            time.sleep(0.1)
    out.put("ready")
    go.wait(120)
    ok = late = 0
    errors: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    n = 0
    while (n < count) if count else (time.monotonic() < deadline):
        n += 1
        t0 = time.perf_counter()
        try:
            EngineClient(NS, f"flood-{os.getpid()}", socket_path, timeout=timeout).close()
        except PolarKVError as e:
            errors[f"{type(e).__name__}: {e}"[:160]] += 1
            continue
        took = time.perf_counter() - t0
        latencies.append(took)
        if took <= timeout:
            ok += 1
        else:
            late += 1
    anchor.close()
    out.put({"tried": n, "ok": ok, "late": late, "errors": dict(errors), "latencies": latencies})


def flood(
    engine_socket: Path,
    control_socket: Path,
    procs: int,
    count: int,
    seconds: float,
    timeout: float,
    before: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """Run `procs` flooding processes to completion; the daemon's peak thread count meanwhile.
    `before` runs once every process has its anchor client, just before they start."""
    from polarkvd.client import ControlClient

    ctx = multiprocessing.get_context("spawn")
    q, go = ctx.Queue(), ctx.Event()
    workers = [
        ctx.Process(target=flood_worker, args=(str(engine_socket), count, seconds, timeout, q, go))
        for _ in range(procs)
    ]
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        with ControlClient(control_socket, timeout=30) as c:
            while not stop.is_set():
                peak[0] = max(peak[0], c.stats()["process"]["threads"])
                stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for w in workers:
        w.start()

    def receive() -> Any:
        while True:
            try:
                return q.get(timeout=1)
            except queue.Empty:
                if not any(w.is_alive() for w in workers) and q.empty():
                    raise RuntimeError("the flooding processes died without a result") from None

    for _ in workers:
        assert receive() == "ready"
    if before is not None:
        before()
    go.set()
    results = [receive() for _ in workers]
    for w in workers:
        w.join(60)
    stop.set()
    sampler.join(30)
    errors: collections.Counter[str] = collections.Counter()
    for r in results:
        errors.update(r["errors"])
    latencies = [x for r in results for x in r["latencies"]]
    return {
        "tried": sum(r["tried"] for r in results),
        "ok": sum(r["ok"] for r in results),
        "late": sum(r["late"] for r in results),
        "failed": sum(errors.values()),
        "errors": dict(errors.most_common(5)),
        "p50_ms": percentile(latencies, 50) * 1e3 if latencies else None,
        "p99_ms": percentile(latencies, 99) * 1e3 if latencies else None,
        "max_ms": max(latencies) * 1e3 if latencies else None,
        "peak_threads": peak[0],
    }


def open_idle(engine_socket: Path, n: int) -> list[socket.socket]:
    """`n` connections that never send hello (those over the daemon's cap are closed by it)."""
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(engine_socket))
        out.append(s)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--procs", type=int, default=4, help="flooding processes (default 4)")
    p.add_argument("--seconds", type=float, default=10.0, help="flood duration per phase (default 10)")
    p.add_argument("--timeout", type=float, default=2.0, help="each EngineClient's timeout (default 2s)")
    p.add_argument("--idle", type=int, default=200,
                   help="a second phase with this many idle connections open (never hello); 0 = skip (default 200)")  # fmt: skip
    p.add_argument(
        "--max-unattached", type=int, default=64, help="daemon.max_unattached_connections (default 64)"
    )
    p.add_argument("--hello-timeout", default="2s", help="daemon.hello_timeout (default 2s: the idle phase "
                   "shows both the refusals and the recovery once the idle connections are closed)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    plots.add_plot_arguments(p)


def main(args: argparse.Namespace) -> int:
    from polarkvd.client import ControlClient

    if args.plot_from:
        return plots.redraw("connect", args)
    plots.check(args)
    sets = {
        "dram.capacity": "64MiB",
        "dram.slab_bytes": "1MiB",
        "disk.enabled": "false",
        "daemon.max_unattached_connections": str(args.max_unattached),
        "daemon.hello_timeout": args.hello_timeout,
    }
    phases: dict[str, dict[str, Any]] = {}
    with private_daemon(sets) as (engine, control):
        with ControlClient(control, timeout=30) as c:
            st = c.stats()
        base = st["process"]["threads"]
        phases["flood"] = flood(engine, control, args.procs, 0, args.seconds, args.timeout)
        if args.idle:
            idle: list[socket.socket] = []
            try:
                phases[f"flood + {args.idle} idle"] = flood(
                    engine, control, args.procs, 0, args.seconds, args.timeout,
                    before=lambda: idle.extend(open_idle(engine, args.idle)),
                )  # fmt: skip
            finally:
                for s in idle:
                    s.close()
        with ControlClient(control, timeout=30) as c:
            counters = c.stats()["counters"]
    bound = base + 1024 + args.max_unattached  # daemon.max_sessions (default) + the unattached cap
    out = {
        "procs": args.procs,
        "seconds": args.seconds,
        "timeout_s": args.timeout,
        "idle_threads": base,
        "thread_bound": bound,
        "phases": phases,
        "connections_refused": counters.get("connections_refused", 0),
        "connections_hello_timeout": counters.get("connections_hello_timeout", 0),
        "connections_dropped_unattached": counters.get("connections_dropped_unattached", 0),
    }
    if args.json:
        print(json.dumps(out, indent=1))
        plots.after_run("connect", out, args)
        return 0
    rows = []
    for name, r in phases.items():
        rows.append((
            name, str(r["tried"]), f"{100 * r['ok'] / max(1, r['tried']):.2f}%", str(r["failed"]), str(r["late"]),
            f"{r['p50_ms']:.2f}" if r["p50_ms"] is not None else "-",
            f"{r['p99_ms']:.2f}" if r["p99_ms"] is not None else "-",
            f"{r['max_ms']:.1f}" if r["max_ms"] is not None else "-",
            f"{r['peak_threads']} (idle {base})",
        ))  # fmt: skip
    print(table(rows, ("phase", "constructions", f"ok <= {args.timeout}s", "failed", "late", "p50 ms", "p99 ms", "max ms", "daemon threads")))  # fmt: skip
    for name, r in phases.items():
        for why, n in r["errors"].items():
            print(f"  {name}: {n} x {why}")
    print(
        f"engine connections refused (over max_sessions + max_unattached): {out['connections_refused']}; "
        f"unattached closed for a newer one: {out['connections_dropped_unattached']}, "
        f"for no hello within the timeout: {out['connections_hello_timeout']}"
    )
    plots.after_run("connect", out, args)
    return 0
