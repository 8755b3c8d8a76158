"""`polarkvd bench cluster`'s rig: the page data both sides read (a shared-memory file of distinct
pages per size), child processes that die with their parent, the page server a fetch reads from
(`serve_main`, run as `python -m polarkvd.bench.cluster --serve`), CPU meters and the parallel
driver every method is timed with. bench/cluster.py says what is measured."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RAW_REQ = struct.Struct("<QQ")  # raw_tcp request: offset, length (0 = close)


def page_key(size: int, i: int) -> bytes:
    """16-byte keys, like the daemon's; every process derives the same ones."""
    import xxhash

    return xxhash.xxh3_128_digest(f"bench-cluster:{size}:{i}".encode())


# ------------------------------------------------------------------------------------ the pages


@dataclasses.dataclass
class PageSet:
    """`npages` pages of `size` bytes at `offset` in the shared-memory data file."""

    size: int
    offset: int
    npages: int

    def span(self, i: int, n: int) -> tuple[int, int]:
        return self.offset + i * self.size, n * self.size


@dataclasses.dataclass
class DataFile:
    path: Path
    sets: list[PageSet]

    @property
    def total(self) -> int:
        return sum(s.npages * s.size for s in self.sets)

    def layout(self) -> list[list[int]]:
        return [[s.size, s.offset, s.npages] for s in self.sets]

    @classmethod
    def from_layout(cls, path: str, layout: list[list[int]]) -> DataFile:
        return cls(Path(path), [PageSet(*x) for x in layout])


@contextlib.contextmanager
def data_file(
    sizes: list[int], data_bytes: int, batch: int, threads: int, seed: int = 7
) -> Iterator[DataFile]:
    """Random pages in a file on /dev/shm (any process, in any venv, maps it; no resource tracker)."""
    import numpy as np

    sets, off = [], 0
    for size in sizes:
        n = max(batch * threads, data_bytes // size)
        sets.append(PageSet(size, off, n))
        off += n * size
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    fd, path = tempfile.mkstemp(prefix="polarkv-bench-cluster-", dir=shm)
    try:
        os.ftruncate(fd, off)
        with mmap.mmap(fd, off) as mm:
            rng = np.random.default_rng(seed)
            step = 16 << 20
            for start in range(0, off, step):
                n = min(step, off - start)
                mm[start : start + n] = rng.bytes(n)
        os.close(fd)
        fd = -1
        yield DataFile(Path(path), sets)
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def map_file(path: Path | str, writable: bool = False) -> mmap.mmap:
    with open(path, "r+b" if writable else "rb") as f:
        return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))


# ----------------------------------------------------------------------- processes and cleanup


def die_with_parent() -> None:
    """preexec_fn: the kernel kills the child when the process that started it dies, even by SIGKILL
    (Linux prctl PR_SET_PDEATHSIG; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def child_process(args: list[str], *, env: dict[str, str] | None = None, log: Path | None = None,
           stdin: int | None = subprocess.PIPE, stdout: int | None = subprocess.PIPE) -> Iterator[subprocess.Popen[str]]:  # fmt: skip
    """A child in its own process group; the whole group is killed on the way out (Ctrl-C included)."""
    out = open(log, "w") if log is not None else None  # noqa: SIM115
    proc = subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=out or subprocess.DEVNULL, env=env,
                            text=True, start_new_session=True, preexec_fn=die_with_parent)  # fmt: skip
    try:
        yield proc
    finally:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
                if sig is signal.SIGTERM:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group
                break
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        if out is not None:
            out.close()


def read_json_line(
    proc: subprocess.Popen[str], timeout: float, what: str, log: Path | None = None
) -> dict[str, Any]:
    """The child's next JSON line on stdout, or RuntimeError with its log when it dies or stalls."""
    assert proc.stdout is not None
    # No reader thread: one left blocked in readline() when we give up would hold the pipe's lock at
    # exit. Children answer one whole line per request, so select() + readline() cannot block.
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
        state = f"exited {proc.poll()}" if proc.poll() is not None else f"no answer in {timeout:.0f}s"
        raise RuntimeError(f"{what}: {state}\n{tail}".rstrip())
    return json.loads(line)


def free_ports(n: int) -> list[int]:
    """Distinct free ports on 127.0.0.1 for servers we start (they may race another program, rarely)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} does not listen on port {port} after {timeout:.0f}s") from None
            time.sleep(0.05)


# --------------------------------------------------------------------- the server side (fetch)


@dataclasses.dataclass
class Endpoints:
    fetch: str  # tcp://HOST:PORT of the PeerServer
    raw_tcp: tuple[str, int] | None  # the raw socket server in the same process, if any
    server_pids: list[int] = dataclasses.field(default_factory=list)  # for CPU per byte, if local


@contextlib.contextmanager
def local_page_server(data: DataFile, key: bytes, workdir: Path) -> Iterator[Endpoints]:
    """The server side: one process serving the data file's pages over the peer transport (op "get")
    and over a raw socket. Replace this to fetch from real daemons: it only has to yield where the
    pages can be fetched (op "get", args {"keys": [...]}, one payload per page)."""
    env = dict(os.environ, POLARKV_BENCH_KEY=key.hex())
    args = [
        sys.executable,
        "-m",
        "polarkvd.bench.cluster",
        "--serve",
        str(data.path),
        json.dumps(data.layout()),
    ]
    log = workdir / "page-server.log"
    with child_process(args, env=env, log=log) as proc:
        ready = read_json_line(proc, 60, "page server", log)
        yield Endpoints(ready["fetch"], tuple(ready["raw_tcp"]), [proc.pid])


def serve_main(path: str, layout_json: str) -> int:
    """`--serve`: the page server process. Runs until its stdin closes (the bench is gone)."""
    import xxhash

    from polarkvd.errors import PageNotFound
    from polarkvd.transport.peer_server import Handler, PayloadReader, PeerServer, Reply

    data = DataFile.from_layout(path, json.loads(layout_json))
    mm = map_file(data.path)
    view = memoryview(mm)
    pages: dict[bytes, memoryview] = {}
    for ps in data.sets:
        for i in range(ps.npages):
            off, n = ps.span(i, 1)
            pages[page_key(ps.size, i)] = view[off : off + n]

    sums = {k: xxhash.xxh3_64_intdigest(v) for k, v in pages.items()}  # "computed when stored"

    def get(args: dict[str, Any], _reader: PayloadReader) -> Reply:
        try:
            return Reply({"n": len(args["keys"])}, [pages[k] for k in args["keys"]])
        except KeyError:
            raise PageNotFound("no such page") from None

    def get_stored_sums(args: dict[str, Any], _reader: PayloadReader) -> Reply:
        try:
            keys = args["keys"]
            return Reply({"n": len(keys)}, [pages[k] for k in keys], sums=[sums[k] for k in keys])
        except KeyError:
            raise PageNotFound("no such page") from None

    handlers: dict[str, Handler] = {"get": get, "get_stored_sums": get_stored_sums}
    server = PeerServer("127.0.0.1", 0, key=bytes.fromhex(os.environ["POLARKV_BENCH_KEY"]), handlers=handlers)
    server.start()
    raw = socket.create_server(("127.0.0.1", 0))

    def raw_conn(c: socket.socket) -> None:
        from polarkvd.transport.peer_wire import tune_socket

        tune_socket(c)  # the same socket options as the transport: the ratio is the protocol's cost alone
        with c:
            while True:
                req = c.recv(RAW_REQ.size, socket.MSG_WAITALL)
                if len(req) < RAW_REQ.size:
                    return
                off, n = RAW_REQ.unpack(req)
                if not n:
                    return
                c.sendall(view[off : off + n])

    def raw_accept() -> None:
        while True:
            c, _ = raw.accept()
            threading.Thread(target=raw_conn, args=(c,), daemon=True).start()

    threading.Thread(target=raw_accept, daemon=True).start()
    print(json.dumps({"fetch": server.address, "raw_tcp": list(raw.getsockname()[:2])}), flush=True)
    sys.stdin.read()  # until the bench closes our stdin or kills us
    server.close()
    return 0


# ------------------------------------------------------------------------------- measurements


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of another process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_meter(pids: list[int]) -> Callable[[], float] | None:
    """CPU seconds used so far by this process (all threads) and `pids`, or None where /proc is not
    there. On a 2-core host CPU per byte is what a transfer really costs: it is less noisy than GB/s
    when other work shares the cores."""
    try:
        for pid in pids:
            proc_cpu(pid)
    except (OSError, ValueError, IndexError):
        return None
    return lambda: time.process_time() + sum(proc_cpu(p) for p in pids)


def run_parallel(
    threads: int, seconds: float, work: Callable[[int], int], cpu: Callable[[], float] | None = None
) -> tuple[float, float | None]:
    """Run `work(thread)` (returns bytes moved by one call) in `threads` threads for `seconds`;
    returns (GB/s over the wall time from the common start to the last call's end, CPU seconds per
    GB of the processes `cpu` measures, or None)."""
    moved = [0] * threads
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def run(t: int) -> None:
        try:
            start.wait()
            while time.perf_counter() < stop_at[0]:
                moved[t] += work(t)
        except BaseException as e:  # reported below, after the others stop
            errors.append(e)
            stop_at[0] = 0.0

    ths = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(threads)]
    for th in ths:
        th.start()
    try:
        cpu0 = cpu() if cpu is not None else 0.0
        t0 = time.perf_counter()
        stop_at[0] = t0 + seconds
        start.wait()
        for th in ths:
            th.join()
    except BaseException:  # Ctrl-C: let the workers finish their call before the clients close
        stop_at[0] = 0.0
        for th in ths:
            th.join(30)
        raise
    elapsed = time.perf_counter() - t0
    used = cpu() - cpu0 if cpu is not None else None
    if errors:
        raise errors[0]
    total = sum(moved)
    return total / elapsed / 1e9, (used / (total / 1e9) if used is not None and total else None)


Sample = tuple[float, "float | None"]  # (GB/s, CPU seconds per GB or None)


class Cursor:
    """Which batch each thread fetches next: threads walk disjoint stretches of the page set."""

    def __init__(self, ps: PageSet, batch: int, threads: int) -> None:
        self.ps, self.batch = ps, batch
        self.nbatches = max(1, ps.npages // batch)
        self.pos = [t * self.nbatches // threads for t in range(threads)]

    def next(self, t: int) -> int:
        b = self.pos[t] % self.nbatches
        self.pos[t] += 1
        return b * self.batch


def namespace_for(size: int) -> Any:
    """A namespace whose pages are `size` bytes (bf16; the 5.9 MB one is bench datapath's)."""
    from polarkvd.bench.datapath import BIG_NS
    from polarkvd.types import Namespace

    if size == BIG_NS.page_bytes:
        return BIG_NS
    per_token = 32 * 2 * 8 * 128 * 2  # 32 layers, K and V, 8 heads of 128, bf16: 128 KiB
    if size % per_token == 0:
        return Namespace("bench-cluster@0", "bfloat16", "bench/v1", 32, 8, 128, size // per_token)
    if size % 4:
        raise ValueError(f"page size {size} is not a multiple of 4 bytes")
    return Namespace("bench-cluster@0", "bfloat16", "bench/v1", 1, 1, size // 4, 1)
