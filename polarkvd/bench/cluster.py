"""`polarkvd bench cluster`: remote page fetch between two processes on loopback, side by side with
raw TCP, Redis and Mooncake Store, in one run.

For each page size (default 1 MiB, 4 MiB and the 5.9 MB page of `bench datapath`'s big namespace) the
same random pages sit in one shared-memory file, and each method moves them from a server process to
the measuring process on 127.0.0.1:
  fetch     what a user gets: two real daemons in a cluster on loopback. The pages are stored through
            an engine session on daemon A; an engine session on daemon B loads `--batch` x `--threads`
            pages per call, which B finds in the meta map and pulls from A into its own DRAM
            (`cluster.fetch_batch` pages per request, several requests in flight), checksums checked,
            before answering. Timed: the engine's `load` call. Between calls B's copies are evicted
            (untimed), so every load is remote. This is `fetch_gbps` in the JSON.
  transport polarkvd's peer transport alone: a `PeerServer` in a server process answers op "get"
            (args {"keys": [...]}, one payload per page) straight out of the shared memory; a
            `PeerClient` here receives each page into a preallocated destination buffer, checksums
            checked, `--batch` pages per call, `--threads` calls in parallel. The server hashes every
            page as it sends it.
  transport_stored_sums  the same, but the server sends checksums computed once when the pages were
            stored (`Reply.sums`; the disk tier already keeps one per page): the end-to-end check
            without the sender's hashing on the fetch path. Op "get_stored_sums" (bench only).
  raw_tcp   the same bytes over plain sockets from the same server process (`sendall` of the batch,
            `recv_into` the destination), same batches and threads: the floor any protocol pays.
  redis     redis-server (started here on a free port, `--save "" --appendonly no`), MGET of the same
            batches with redis-py + hiredis (values arrive as new bytes objects, not in our buffer).
  mooncake  Mooncake Store over TCP (master + holder + client, all on 127.0.0.1), `batch_get_into` a
            registered destination buffer, driven by this file run as a script in Mooncake's own venv.
Rounds interleave the methods, so machine noise hits every column alike; each number is the median
over `--rounds` rounds of one `--seconds` measurement. Peers that are not installed
(`scripts/setup-bench-peers.sh`) are reported as not available with the reason (null in JSON).

The transport columns' server side is one function, `local_page_server()`.

This file also runs as a plain script in Mooncake's venv (`--mooncake-driver`, `--mooncake-holder`),
with this package's folder on PYTHONPATH: its top-level imports are the standard library and the rig
(itself standard library only); the rest of the package is imported inside functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from polarkvd.bench.cluster_mooncake import MOONCAKE_PKG
from polarkvd.bench.cluster_rig import (
    RAW_REQ,
    Cursor,
    DataFile,
    PageSet,
    Sample,
    child_process,
    cpu_meter,
    data_file,
    free_ports,
    local_page_server,
    map_file,
    namespace_for,
    page_key,
    read_json_line,
    run_parallel,
    serve_main,
    wait_port,
)

METHODS = ("fetch", "transport", "transport_stored_sums", "raw_tcp", "redis", "mooncake")
DEFAULT_SIZES = ("1MiB", "4MiB", "big")  # "big": the 5.9 MB page of bench datapath's BIG_NS
HEADLINE = 4 << 20


def mooncake_venv() -> Path:
    env = os.environ.get("POLARKV_MOONCAKE_VENV")
    return Path(env) if env else Path.home() / ".cache" / "polarkvd" / "bench" / "mooncake-venv"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), metavar="SIZE",
                   help="page sizes, e.g. 1MiB 4MiB 5898240; 'big' = the 5.9 MB page (default: 1MiB 4MiB big)")  # fmt: skip
    p.add_argument("--seconds", type=float, default=0.6, help="length of one measurement (default 0.6)")
    p.add_argument("--rounds", type=int, default=9, help="rounds; medians are reported (default 9)")
    p.add_argument("--data", default="128MiB", metavar="SIZE",
                   help="distinct page bytes per page size, cycled through (default 128MiB)")  # fmt: skip
    p.add_argument("--batch", type=int, default=8, help="pages per call (default 8)")
    p.add_argument(
        "--threads", type=int, default=2, help="calls in parallel, one connection each (default 2)"
    )
    p.add_argument("--skip", nargs="*", default=[], choices=METHODS[1:], metavar="METHOD",
                   help="methods to leave out: transport, transport_stored_sums, raw_tcp, redis, mooncake")  # fmt: skip
    from polarkvd.bench.plots import add_plot_arguments

    add_plot_arguments(p)


def parse_page_size(text: str) -> int:
    if text == "big":
        from polarkvd.bench.datapath import BIG_NS

        return BIG_NS.page_bytes
    from polarkvd.config.values import parse_size

    n = parse_size(text)
    if n <= 0:
        raise ValueError(f"page size must be > 0: {text!r}")
    return n


def size_label(n: int) -> str:
    return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n / 1e6:.1f} MB"


class DaemonFetchMethod:
    """Two daemons in a cluster: pages stored on A, loaded through B (B fetches them from A)."""

    def __init__(
        self, data: DataFile, src: memoryview, threads: int, batch: int, stack: contextlib.ExitStack
    ) -> None:
        from polarkvd.bench.harness import private_daemon, shared_seed_file
        from polarkvd.client import ControlClient

        self.data, self.src, self.per_call = data, src, batch * threads
        self.cpu: Callable[[], float] | None = None
        slab = max(64 << 20, -(-max(ps.size for ps in data.sets) // (1 << 20)) * (1 << 20))
        a_bytes = -(-(data.total + 2 * slab * len(data.sets)) // slab) * slab
        b_bytes = (
            -(-(2 * self.per_call * max(ps.size for ps in data.sets) + 2 * slab * len(data.sets)) // slab)
            * slab
        )
        ga, gb = free_ports(2)
        common = {
            "cluster.enabled": "true",
            "cluster.insecure": "true",
            "cluster.data_address": "127.0.0.1:0",
            "cluster.seeds": f"127.0.0.1:{ga}",
            "cluster.lookup_timeout": "2s",
            "cluster.fetch_timeout": "30s",
            "disk.enabled": "false",
            "dram.slab_bytes": str(slab),
            "daemon.log_level": "warning",
            "daemon.seed_file": stack.enter_context(shared_seed_file()),  # one seed per cluster
        }
        self.a_engine, self.a_control = stack.enter_context(private_daemon(
            {**common, "cluster.node_id": "bench-a", "cluster.gossip_address": f"127.0.0.1:{ga}", "dram.capacity": str(a_bytes)}
        ))  # fmt: skip
        self.b_engine, self.b_control = stack.enter_context(private_daemon(
            {**common, "cluster.node_id": "bench-b", "cluster.gossip_address": f"127.0.0.1:{gb}", "dram.capacity": str(b_bytes)}
        ))  # fmt: skip
        self.b = ControlClient(self.b_control, timeout=120)
        stack.callback(self.b.close)
        deadline = time.monotonic() + 30
        while self.b.cluster().get("alive", 0) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the two benchmark daemons did not see each other within 30 s")
            time.sleep(0.05)
        self.stored: set[int] = set()

    def _store(self, ps: PageSet) -> None:
        """Every page of `ps` into daemon A (once), and wait until B finds them all in the meta map."""
        from polarkvd.client import EngineClient

        if ps.size in self.stored:
            return
        ns = namespace_for(ps.size)
        keys = [page_key(ps.size, i) for i in range(ps.npages)]
        with EngineClient(ns, "bench-store", self.a_engine, timeout=120) as kv:
            for i, key in enumerate(keys):
                off, n = ps.span(i, 1)
                r = kv.store([key], [self.src[off : off + n]])
                if r.stored + r.existing != 1:
                    raise RuntimeError(f"daemon A did not take page {i} of {size_label(ps.size)}: {r}")
        with EngineClient(ns, "bench-lookup", self.b_engine, timeout=120, map_arena=False) as kv:
            deadline = time.monotonic() + 60
            while kv.lookup(keys).hits < len(keys):
                if time.monotonic() > deadline:
                    raise RuntimeError("daemon B does not find A's pages in the meta map after 60 s")
                time.sleep(0.05)
        self.stored.add(ps.size)

    def measure(self, ps: PageSet, seconds: float) -> Sample:
        from polarkvd.client import EngineClient

        self._store(ps)
        ns = namespace_for(ps.size)
        n = min(self.per_call, ps.npages)
        keys = [page_key(ps.size, i) for i in range(ps.npages)]
        calls = max(1, ps.npages // n)
        moved = 0
        busy = 0.0
        cpu0 = self.cpu() if self.cpu else None
        with EngineClient(ns, "bench-load", self.b_engine, timeout=120) as kv:
            end = time.monotonic() + seconds
            i = 0
            while True:
                first = (i % calls) * n
                batch = keys[first : first + n]
                t0 = time.perf_counter()
                r = kv.load(batch)
                busy += time.perf_counter() - t0
                if r.loaded != len(batch) or set(r.tiers) != {3}:
                    raise RuntimeError(
                        f"fetch: B loaded {r.loaded} of {len(batch)} pages, tiers {set(r.tiers)}"
                    )
                if i == 0:  # checked byte for byte
                    off, nbytes = ps.span(first, len(batch))
                    for j, view in enumerate(r.views):
                        if view != self.src[off + j * ps.size : off + (j + 1) * ps.size]:
                            raise RuntimeError("fetch: loaded bytes differ from the pages stored")
                moved += len(batch) * ps.size
                del r.views[:]
                assert r.lease is not None  # a load always holds its pages under a lease
                kv.release(r.lease)
                self.b.evict_keys(batch)  # untimed: the next load of these is remote again
                i += 1
                if time.monotonic() >= end:
                    break
        used = (self.cpu() - cpu0) if self.cpu and cpu0 is not None else None
        return moved / busy / 1e9, (used / (moved / 1e9) if used is not None else None)

    def close(self) -> None:
        pass


class FetchMethod:
    """polarkvd's transport: PeerClient calls of `op` straight into a preallocated destination buffer."""

    def __init__(
        self, addr: str, key: bytes, src: memoryview, threads: int, batch: int, op: str = "get"
    ) -> None:
        from polarkvd.transport.peer_client import PeerClient

        self.addr, self.src, self.threads, self.batch, self.op = addr, src, threads, batch, op
        self.cpu: Callable[[], float] | None = None  # set by run(): this process + the server's
        self.client = PeerClient(key=key, timeout=30, connections_per_peer=threads)
        self.dest: bytearray | None = None
        self.corrupt = 0
        try:
            self.client.call(addr, op, {"keys": []})  # connects, and says now if the server lacks the op
        except BaseException:
            self.client.close()
            raise

    def measure(self, ps: PageSet, seconds: float) -> Sample:
        per = self.batch * ps.size
        if self.dest is None or len(self.dest) < per * self.threads:
            self.dest = bytearray(per * self.threads)
        dest = memoryview(self.dest)
        keys = [page_key(ps.size, i) for i in range(ps.npages)]
        cur = Cursor(ps, self.batch, self.threads)
        views = [[dest[t * per + j * ps.size : t * per + (j + 1) * ps.size] for j in range(self.batch)]
                 for t in range(self.threads)]  # fmt: skip

        last = [0] * self.threads

        def work(t: int) -> int:
            last[t] = first = cur.next(t)
            _, oks = self.client.call(self.addr, self.op, {"keys": keys[first : first + self.batch]},
                                      into=lambda h: views[t])  # fmt: skip
            self.corrupt += oks.count(False)
            return per

        work(0)  # warm up
        sample = run_parallel(self.threads, seconds, work, self.cpu)
        work(0)  # one more, checked byte for byte
        off, n = ps.span(last[0], self.batch)
        if dest[:n] != self.src[off : off + n] or self.corrupt:
            raise RuntimeError(f"{self.op}: received bytes differ from the pages served")
        return sample

    def close(self) -> None:
        self.client.close()


class RawTcpMethod:
    """The same batches as plain bytes over plain sockets: (offset, length) in, the bytes out."""

    def __init__(self, where: tuple[str, int], src: memoryview, threads: int, batch: int) -> None:
        from polarkvd.transport.peer_wire import tune_socket

        self.src, self.threads, self.batch = src, threads, batch
        self.cpu: Callable[[], float] | None = None
        self.socks = [socket.create_connection(where, timeout=30) for _ in range(threads)]
        for s in self.socks:
            tune_socket(s)
            s.settimeout(None)
        self.dest: bytearray | None = None

    def _get(self, t: int, off: int, n: int, into: memoryview) -> None:
        s = self.socks[t]
        s.sendall(RAW_REQ.pack(off, n))
        got = 0
        while got < n:
            k = s.recv_into(into[got:])
            if not k:
                raise ConnectionError("raw server closed")
            got += k

    def measure(self, ps: PageSet, seconds: float) -> Sample:
        per = self.batch * ps.size
        if self.dest is None or len(self.dest) < per * self.threads:
            self.dest = bytearray(per * self.threads)
        dest = memoryview(self.dest)
        cur = Cursor(ps, self.batch, self.threads)

        def work(t: int) -> int:
            off, n = ps.span(cur.next(t), self.batch)
            self._get(t, off, n, dest[t * per : (t + 1) * per])
            return n

        work(0)
        sample = run_parallel(self.threads, seconds, work, self.cpu)
        off, n = ps.span(cur.next(0), self.batch)
        self._get(0, off, n, dest[:per])
        if dest[:n] != self.src[off : off + n]:
            raise RuntimeError("raw_tcp: received bytes differ from the pages served")
        return sample

    def close(self) -> None:
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.sendall(RAW_REQ.pack(0, 0))
            s.close()


class RedisMethod:
    """redis-server on a free port, MGET of the same batches (redis-py + hiredis)."""

    def __init__(self, data: DataFile, src: memoryview, threads: int, batch: int, workdir: Path) -> None:
        import redis  # noqa: F401  (fails early with the reason when missing)

        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found (scripts/setup-bench-peers.sh installs it)")
        self.src, self.threads, self.batch = src, threads, batch
        self.cpu: Callable[[], float] | None = None
        (self.port,) = free_ports(1)
        self._stack = contextlib.ExitStack()
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(workdir), "--logfile", str(workdir / "redis.log"), "--daemonize", "no"]  # fmt: skip
        try:
            proc = self._stack.enter_context(
                child_process(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            )
            self.cpu = cpu_meter([proc.pid])  # our client threads + redis-server
            wait_port(self.port, proc, 30, "redis-server")
            self.clients = [self._client() for _ in range(threads)]
            self.clients[0].ping()
            self.version = self.clients[0].info("server")["redis_version"]
            for ps in data.sets:
                pipe = self.clients[0].pipeline(transaction=False)
                for i in range(ps.npages):
                    off, n = ps.span(i, 1)
                    pipe.set(page_key(ps.size, i), src[off : off + n].tobytes())
                    if i % 16 == 15:
                        pipe.execute()
                pipe.execute()
        except BaseException:
            self._stack.close()
            raise

    def _client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=30)

    @staticmethod
    def hiredis() -> bool:
        try:
            from redis.utils import HIREDIS_AVAILABLE
        except ImportError:
            return False
        return bool(HIREDIS_AVAILABLE)

    def measure(self, ps: PageSet, seconds: float) -> Sample:
        keys = [page_key(ps.size, i) for i in range(ps.npages)]
        cur = Cursor(ps, self.batch, self.threads)
        last: list[Any] = []

        def work(t: int) -> int:
            first = cur.next(t)
            vals = self.clients[t].mget(keys[first : first + self.batch])
            if t == 0:
                last[:] = [first, vals]
            return sum(len(v) for v in vals)

        work(0)
        sample = run_parallel(self.threads, seconds, work, self.cpu)
        first, vals = last
        off, n = ps.span(first, self.batch)
        if b"".join(vals) != self.src[off : off + n]:
            raise RuntimeError("redis: values differ from the pages stored")
        return sample

    def close(self) -> None:
        for c in getattr(self, "clients", []):
            with contextlib.suppress(Exception):
                c.close()
        self._stack.close()


class MooncakeMethod:
    """Mooncake Store, driven by this file as a script in Mooncake's own venv (JSON lines on stdio)."""

    def __init__(self, data: DataFile, threads: int, batch: int, workdir: Path) -> None:
        venv = mooncake_venv()
        py, master = venv / "bin" / "python", venv / "bin" / "mooncake_master"
        if not py.exists():
            raise RuntimeError(f"no Mooncake venv at {venv} (scripts/setup-bench-peers.sh makes it)")
        if not master.exists():
            raise RuntimeError(f"{master} missing ({MOONCAKE_PKG} not installed in {venv})")
        self.threads, self.batch = threads, batch
        self.log = workdir / "mooncake-driver.log"
        cfg = {"data": str(data.path), "layout": data.layout(), "venv": str(venv), "workdir": str(workdir),
               "holder_bytes": data.total + (256 << 20), "pages_in_flight": threads * batch}  # fmt: skip
        self._stack = contextlib.ExitStack()
        args = [
            str(py),
            str(Path(__file__).resolve().with_name("cluster_mooncake.py")),
            "--mooncake-driver",
            json.dumps(cfg),
        ]
        # the script imports the rig (polarkvd.bench.cluster_rig, standard library only): Mooncake's
        # venv has no polarkvd, so the folder that holds this package goes on its path
        top = str(Path(__file__).resolve().parents[2])
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (top, os.environ.get("PYTHONPATH")) if p),
        }
        try:
            self.proc = self._stack.enter_context(child_process(args, env=env, log=self.log))
            ready = read_json_line(self.proc, 180, "mooncake driver", self.log)
            if "error" in ready:
                raise RuntimeError(ready["error"])
            self.version = ready.get("version", "?")
        except BaseException:
            self._stack.close()
            raise

    def _ask(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        res = read_json_line(self.proc, timeout, "mooncake driver", self.log)
        if "error" in res:
            raise RuntimeError(f"mooncake: {res['error']}")
        return res

    def measure(self, ps: PageSet, seconds: float) -> Sample:
        cmd = {
            "cmd": "measure",
            "size": ps.size,
            "seconds": seconds,
            "threads": self.threads,
            "batch": self.batch,
        }
        res = self._ask(cmd, 120 + 4 * seconds)
        return float(res["gbps"]), res.get("cpu_s_per_gb")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.poll() is None:
                self._ask({"cmd": "quit"}, 10)
        self._stack.close()


# ---------------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    from polarkvd.progress import Progress

    skip = set(args.skip or [])
    methods = [m for m in METHODS if m not in skip]
    # a live bar on a terminal, plain lines on stderr otherwise
    with Progress(2 + len(methods) + args.rounds, quiet=getattr(args, "quiet", False)) as prog:
        return _run(args, methods, prog)


def _run(args: argparse.Namespace, methods: list[str], prog: Any) -> dict[str, Any]:
    from polarkvd.bench.harness import median, ratio
    from polarkvd.config.values import parse_size
    from polarkvd.transport.peer_wire import data_key

    sizes = sorted({parse_page_size(s) for s in args.sizes})
    res: dict[str, Any] = {
        "sizes": sizes,
        "threads": args.threads,
        "batch": args.batch,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "not_available": {},
        "versions": {},
    }
    key = data_key(os.urandom(40))
    samples: dict[str, dict[int, list[Sample]]] = {m: {s: [] for s in sizes} for m in methods}
    workdir = Path(tempfile.mkdtemp(prefix="polarkv-bench-cluster-"))
    try:
        with contextlib.ExitStack() as stack:
            prog.step(f"random pages: {', '.join(size_label(s) for s in sizes)}")
            data = stack.enter_context(data_file(sizes, parse_size(args.data), args.batch, args.threads))
            src_map = map_file(data.path)
            stack.callback(src_map.close)
            src = memoryview(src_map)
            stack.callback(src.release)
            prog.step("page server process (PeerServer + raw socket)")
            ends = stack.enter_context(local_page_server(data, key, workdir))
            runners: dict[str, Any] = {}
            for m in methods:
                prog.step(f"setting up {m}")
                try:
                    if m == "fetch":
                        runners[m] = DaemonFetchMethod(data, src, args.threads, args.batch, stack)
                    elif m == "transport":
                        runners[m] = FetchMethod(ends.fetch, key, src, args.threads, args.batch)
                    elif m == "transport_stored_sums":
                        runners[m] = FetchMethod(
                            ends.fetch, key, src, args.threads, args.batch, "get_stored_sums"
                        )
                    elif m == "raw_tcp":
                        assert ends.raw_tcp is not None, "this server side has no raw socket"
                        runners[m] = RawTcpMethod(ends.raw_tcp, src, args.threads, args.batch)
                    elif m == "redis":
                        runners[m] = redis = RedisMethod(data, src, args.threads, args.batch, workdir)
                        res["versions"]["redis"] = (
                            f"redis-server {redis.version}, hiredis {'yes' if redis.hiredis() else 'NO'}"
                        )
                    elif m == "mooncake":
                        runners[m] = mc = MooncakeMethod(data, args.threads, args.batch, workdir)
                        res["versions"]["mooncake"] = f"{MOONCAKE_PKG} {mc.version}"
                    stack.callback(runners[m].close)
                except Exception as e:
                    if m in ("fetch", "transport"):
                        raise
                    res["not_available"][m] = f"{type(e).__name__}: {e}".strip()
                    prog.note(f"  {m}: not available: {e}")
            server_cpu = cpu_meter(ends.server_pids) if ends.server_pids else None
            for m in ("transport", "transport_stored_sums", "raw_tcp"):
                if m in runners:
                    runners[m].cpu = server_cpu
            for r in range(args.rounds):
                prog.step(f"round {r + 1}/{args.rounds}: {', '.join(runners)}")
                # every other round in reverse order, so no method always runs first or after another
                order = list(runners.items()) if r % 2 == 0 else list(reversed(runners.items()))
                for size in sizes:
                    ps = next(p for p in data.sets if p.size == size)
                    for m, runner in order:
                        samples[m][size].append(runner.measure(ps, args.seconds))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    by_size: dict[str, dict[str, Any]] = {}
    for size in sizes:
        row: dict[str, Any] = {"page_bytes": size, "label": size_label(size)}
        got = {m: samples.get(m, {}).get(size, []) for m in METHODS}
        for m, vals in got.items():
            gbps = [g for g, _ in vals]
            cpus = [c for _, c in vals if c is not None]
            row[f"{m}_gbps"] = median(gbps) if gbps else None
            row[f"{m}_cpu_s_per_gb"] = median(cpus) if cpus else None
            row[f"{m}_rounds_gbps"] = gbps
        # Ratios are medians of per-round ratios: the two measurements of a pair ran back to back, so
        # they share the machine's mood of that moment; a ratio of two medians would not.
        for a, b in (
            ("fetch", "raw_tcp"),
            ("fetch", "mooncake"),
            ("fetch", "redis"),
            ("transport", "raw_tcp"),
            ("transport", "mooncake"),
            ("transport_stored_sums", "raw_tcp"),
        ):
            pairs = [x[0] / y[0] for x, y in zip(got[a], got[b]) if y[0]]
            row[f"{a}_vs_{b}"] = median(pairs) if pairs else None
        row["fetch_cpu_vs_raw_tcp"] = ratio(row["fetch_cpu_s_per_gb"], row["raw_tcp_cpu_s_per_gb"])
        by_size[str(size)] = row
    head = by_size.get(str(HEADLINE)) or by_size[str(sizes[-1])]
    res["headline_page_bytes"] = head["page_bytes"]
    for k in (
        "fetch_gbps",
        "raw_tcp_gbps",
        "redis_gbps",
        "mooncake_gbps",
        "fetch_vs_raw_tcp",
        "fetch_vs_mooncake",
        "fetch_cpu_vs_raw_tcp",
        "transport_gbps",
        "transport_vs_raw_tcp",
    ):
        res[k] = head[k]
    res["by_size"] = by_size
    return res


def render(res: dict[str, Any]) -> str:
    from polarkvd.bench.harness import table

    def f(v: float | None, unit: str = "") -> str:
        return "n/a" if v is None else f"{v:.2f}{unit}"

    rows, cpu_rows = [], []
    for row in res["by_size"].values():
        rows.append((row["label"], f(row["fetch_gbps"]), f(row["transport_gbps"]), f(row["transport_stored_sums_gbps"]),
                     f(row["raw_tcp_gbps"]), f(row["redis_gbps"]), f(row["mooncake_gbps"]), f(row["fetch_vs_raw_tcp"], "x"),
                     f(row["transport_vs_raw_tcp"], "x"), f(row["fetch_vs_mooncake"], "x")))  # fmt: skip
        cpu_rows.append((row["label"], *(f(row[f"{m}_cpu_s_per_gb"]) for m in METHODS),
                         f(row["fetch_cpu_vs_raw_tcp"], "x")))  # fmt: skip
    header = ("page", "fetch (daemons)", "transport", "stored sums", "raw TCP", "Redis", "Mooncake", "fetch/raw",
              "transport/raw", "fetch/Mooncake")  # fmt: skip
    cpu_header = (
        "page",
        "fetch (daemons)",
        "transport",
        "stored sums",
        "raw TCP",
        "Redis",
        "Mooncake",
        "fetch/raw",
    )
    out = [
        "GB/s (1e9 bytes): medians; ratios are medians of per-round ratios\n" + table(rows, header),
        "\nCPU seconds per GB, both sides (client + server processes), medians\n"
        + table(cpu_rows, cpu_header),
        f"\n127.0.0.1, two processes; {res['threads']} threads x {res['batch']} pages per call; "
        f"{res['rounds']} rounds of {res['seconds']:g} s. Bars: fetch >= 0.7x raw TCP and >= 2x Mooncake.",
    ]
    for m, v in res["versions"].items():
        out.append(f"{m}: {v}")
    for m, why in res["not_available"].items():
        out.append(f"{m}: not available: {why}")
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    from polarkvd.bench.harness import bench_main

    return bench_main("cluster", args, run, render)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--serve":
        sys.exit(serve_main(sys.argv[2], sys.argv[3]))
    p = argparse.ArgumentParser(prog="polarkvd bench cluster")
    add_arguments(p)
    sys.exit(main(p.parse_args()))
