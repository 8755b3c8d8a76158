"""What every benchmark needs: a private daemon process, timers, percentiles and a table (progress:
`polarkvd.progress`).

Benchmarks compare side by side in one run (ratios), so the machine's noise hits every column alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from polarkvd.bench import plots
from polarkvd.bench.cluster_mooncake import MOONCAKE_PKG
from polarkvd.progress import Progress


class Steps(Progress):
    """Plain progress lines that report what just happened (`bench chat`'s request lines): `step`
    is `polarkvd.progress.Progress.report`, never a live bar (chat prints no close)."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        super().__init__(total, quiet=quiet, live=False)

    def step(self, what: str) -> None:
        self.report(what)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    idx = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[idx]


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing, b is not positive, or either is NaN."""
    if a is None or b is None or not (b > 0) or a != a:
        return None
    return a / b


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: Sequence[object]) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


@contextlib.contextmanager
def shared_seed_file() -> Iterator[str]:
    """A page-key seed file for private daemons that form one insecure cluster: every member must
    hold the same seed (docs/CLUSTER.md), and each would otherwise create its own."""
    from polarkvd.seed import load_seed_file

    root = Path(tempfile.mkdtemp(prefix="polarkv-bench-seed-"))
    try:
        load_seed_file(root / "page-seed")
        yield str(root / "page-seed")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def private_daemon(sets: dict[str, str], keep: bool = False) -> Iterator[tuple[Path, Path]]:
    """A daemon process in a temporary directory; yields (engine socket, control socket)."""
    from polarkvd.client import ControlClient
    from polarkvd.errors import DaemonUnavailable

    root = Path(tempfile.mkdtemp(prefix="polarkv-bench-"))
    args = [sys.executable, "-m", "polarkvd", "serve",
            "--set", f"daemon.runtime_dir={root / 'run'}", "--set", f"daemon.state_dir={root / 'state'}",
            "--set", "metrics.enabled=false"]  # a private daemon: never the host daemon's metrics port  # fmt: skip
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    log = open(root / "daemon.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    engine, control = root / "run" / "engine.sock", root / "run" / "control.sock"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"benchmark daemon exited: {(root / 'daemon.log').read_text()}")
            try:
                with ControlClient(control, timeout=2) as c:
                    c.ping()
                break
            except DaemonUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield engine, control
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------ engine benchmarks (chat, pipeline)


def model_kv_bytes_per_token(model_dir: str) -> int:
    """Bytes of K and V per token of a (float32) HF model directory."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * heads * head_dim * 4  # K and V, float32


def cpu_bind() -> str:
    """This process's CPUs as a cpuset string (`0-1`, `0,2`), for VLLM_CPU_OMP_THREADS_BIND."""
    cpus = sorted(os.sched_getaffinity(0))
    if cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(map(str, cpus))


def busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy (not idle or iowait) since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds this process has used."""
    t = os.times()
    return t.user + t.system


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child started with its own process group, and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def count_cpus(spec: str) -> int:
    """CPUs in a cpuset string like `0-1,4`."""
    n = 0
    for part in spec.split(","):
        a, _, b = part.partition("-")
        n += int(b) - int(a) + 1 if b else 1
    return n


def fmt(v: float | None, d: int = 3) -> str:
    """A number for a table cell: `d` decimals, "-" when missing."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def vllm_env(cpu_bind_spec: str, ncpu: int) -> dict[str, str]:
    """The environment of a benchmark's vLLM CPU process: ours without POLARKV_* variables, the
    engine core in-process (its scheduler-side connector is reachable), OpenMP bound to the CPUs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLARKV_")}
    env.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB, an upper bound; num_gpu_blocks_override sets the real size
        VLLM_CPU_OMP_THREADS_BIND=cpu_bind_spec,
        OMP_NUM_THREADS=str(ncpu),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def event_writer(mark: str) -> Callable[..., None]:
    """`say(event, **fields)` for a benchmark worker: one `mark`-prefixed JSON line on stdout."""

    def say(event: str, **kw: Any) -> None:
        sys.stdout.write(mark + json.dumps({"event": event, **kw}) + "\n")
        sys.stdout.flush()

    return say


def observe_external_tokens(engine: Any) -> dict[str, int] | None:
    """Wrap the in-process scheduler-side connector's lookup so that `out["current"]` holds the
    tokens it last promised beyond vLLM's own prefix cache (one request in flight: every call is
    about it; vLLM renames request ids internally). None when the connector cannot be reached."""
    sched = getattr(getattr(getattr(engine, "engine_core", None), "engine_core", None), "scheduler", None)
    sched_conn = getattr(sched, "connector", None)
    if sched_conn is None:
        return None
    out: dict[str, int] = {}
    lookup = sched_conn.get_num_new_matched_tokens

    def observed(request: Any, num_computed_tokens: int) -> Any:
        got = lookup(request, num_computed_tokens)
        out["current"] = int(got[0] or 0)
        return got

    sched_conn.get_num_new_matched_tokens = observed
    return out


def run_request(engine: Any, rid: str, ids: list[int], params: Any) -> tuple[float, float, Any]:
    """Run one request alone through vLLM's step loop: (TTFT s, latency s, final output)."""
    t = time.perf_counter()
    engine.add_request(rid, {"prompt_token_ids": ids}, params)
    ttft, final = None, None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id != rid:
                continue
            if ttft is None and o.outputs and o.outputs[0].token_ids:
                ttft = time.perf_counter() - t
            if o.finished:
                final = o
    latency = time.perf_counter() - t
    assert final is not None and ttft is not None, f"request {rid} produced no output"
    return ttft, latency, final


# ------------------------------------------------ real peers of the vLLM connector (bench chat)
#
# LMCache's multiprocess server (LMCacheMPConnector) and Mooncake Store in standalone-store mode
# (MooncakeStoreConnector). Their connector classes ship inside vLLM and import the peer's package,
# so the package must import in the vLLM worker process; scripts/setup-bench-peers.sh installs both
# with --no-deps into a folder of their own that only the peer's processes get on PYTHONPATH (the
# project venv stays as it is). Each server is private to one configuration: free ports on
# 127.0.0.1, its own process group, killed on every way out, its log under the run directory.

PEERS_ENV = "POLARKV_BENCH_PEERS"


class PeerUnavailable(RuntimeError):
    """A peer that is not installed or did not start; the message is the reason, for the report."""


def peers_dir() -> Path:
    """Where scripts/setup-bench-peers.sh installs lmcache and Mooncake for the vLLM worker."""
    env = os.environ.get(PEERS_ENV)
    return Path(env) if env else Path.home() / ".cache" / "polarkvd" / "bench" / "vllm-peers"


def peer_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with the peers' folder first on PYTHONPATH (it holds only the peers and their few
    missing dependencies, so nothing of the project venv is shadowed)."""
    path = [str(peers_dir())] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    return {**env, "PYTHONPATH": os.pathsep.join(path)}


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server we start (it may race another program, rarely)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][-300:] if lines else "(no output)"


def check_peer_import(module: str, env: dict[str, str], what: str) -> None:
    """Import `module` in a child with the worker's environment; PeerUnavailable with the reason."""
    if not peers_dir().is_dir():
        raise PeerUnavailable(
            f"{what} is not installed ({peers_dir()} missing; run scripts/setup-bench-peers.sh)"
        )
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], env=peer_env(env), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    if proc.returncode != 0:
        raise PeerUnavailable(f"{what} does not import ({module}): {_last_line(proc.stderr)}")


def stop_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM a child's process group, SIGKILL it after `grace` seconds, reap the child."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also what the child left behind in its group
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


@contextlib.contextmanager
def server_group(
    argv: list[str], log_path: Path, env: dict[str, str], ready: Callable[[], bool], what: str,
    timeout: float = 180.0,
) -> Iterator[subprocess.Popen[bytes]]:  # fmt: skip
    """A server in its own process group, logging to `log_path`; yields once `ready()` holds; stopped
    on every way out. PeerUnavailable when it exits or is not ready within `timeout` seconds."""
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)  # fmt: skip
        except OSError as e:
            raise PeerUnavailable(f"{what} does not start: {e}") from e
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                if proc.poll() is not None:
                    raise PeerUnavailable(f"{what} exited with {proc.returncode}: "
                                          f"{_last_line(log_path.read_text(errors='replace'))} (log {log_path})")  # fmt: skip
                if time.monotonic() > deadline:
                    raise PeerUnavailable(f"{what} not ready after {timeout:.0f} s (log {log_path})")
                time.sleep(0.1)
            yield proc
        finally:
            stop_group(proc)


@contextlib.contextmanager
def lmcache_server(
    workdir: Path, chunk_tokens: int, l1_bytes: int, env: dict[str, str]
) -> Iterator[dict[str, Any]]:
    """LMCache's multiprocess server (fresh: empty L1), for LMCacheMPConnector. Yields the connector's
    extra config and the worker's environment. Transfer mode `auto` (its default hangs vLLM-CPU at
    register_kv_caches); metrics off (they need an OpenTelemetry exporter we do not install, and a
    fixed Prometheus port)."""
    check_peer_import("lmcache.v1.multiprocess.server", env, "lmcache")
    port, http = free_port(), free_port()
    gb = max(1, math.ceil(l1_bytes / (1 << 30)))
    argv = [sys.executable, "-m", "lmcache.cli.main", "server", "--host", "localhost", "--port", str(port),
            "--chunk-size", str(chunk_tokens), "--l1-size-gb", str(gb), "--eviction-policy", "LRU",
            "--max-workers", "1", "--supported-transfer-mode", "auto", "--http-host", "127.0.0.1",
            "--http-port", str(http), "--disable-metrics"]  # fmt: skip
    with server_group(argv, workdir / "lmcache-server.log", peer_env(env),
                      lambda: port_open(http) and port_open(port), "LMCache server"):  # fmt: skip
        yield {
            "extra_config": {
                "lmcache.mp.host": "tcp://localhost",
                "lmcache.mp.port": port,
                "lmcache.mp.mq_timeout": 60,
            },  # fmt: skip
            "env": peer_env(env),
            "server": f"lmcache MP server, chunk {chunk_tokens} tokens, L1 {gb} GB, tcp://localhost:{port}",
        }


@contextlib.contextmanager
def mooncake_store(workdir: Path, segment_bytes: int, env: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Mooncake Store, standalone-store mode: a fresh `mooncake_master` and a `mooncake_client` that
    owns the segment (so KV outlives the engine), both on 127.0.0.1. Yields the worker's
    environment (MOONCAKE_CONFIG_PATH, VLLM_HOST_IP)."""
    pkg = peers_dir() / "mooncake"
    master, client = pkg / "mooncake_master", pkg / "mooncake_client"
    for b in (master, client):
        if not b.is_file():
            raise PeerUnavailable(f"{MOONCAKE_PKG} is not installed ({b} missing; run "
                                  "scripts/setup-bench-peers.sh)")  # fmt: skip
        if not os.access(b, os.X_OK):
            b.chmod(b.stat().st_mode | 0o111)
    check_peer_import("mooncake.store", env, MOONCAKE_PKG)
    rpc, metrics, client_port = free_port(), free_port(), free_port()
    mb = max(1024, math.ceil(segment_bytes / (1 << 20)))
    cfg = {"metadata_server": "P2PHANDSHAKE", "master_server_address": f"127.0.0.1:{rpc}", "protocol": "tcp",
           "device_name": "", "mode": "standalone-store", "global_segment_size": 0,
           "local_buffer_size": "256MB"}  # fmt: skip
    (workdir / "mooncake.json").write_text(json.dumps(cfg))
    m_argv = [str(master), "--rpc_address=127.0.0.1", f"--rpc_port={rpc}", "--metrics_host=127.0.0.1",
              f"--metrics_port={metrics}", "--enable_http_metadata_server=false"]  # fmt: skip
    c_argv = [str(client), "--host=127.0.0.1", f"--port={client_port}", f"--master_server_address=127.0.0.1:{rpc}",
              "--metadata_server=P2PHANDSHAKE", "--protocol=tcp", f"--global_segment_size={mb} MB"]  # fmt: skip
    # Its TCP transport queues at most ~1k transfers per peer by default and fails the rest
    # (TRANSFER_FAIL, "TCP lane queue-full"): a 4,000-token prompt at block 32 is 125 objects of
    # 1.5 MB, in slices. Deployments over TCP raise these bounds; so does the bench.
    tcp = {"MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER": "65535", "MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER": "65535"}
    env = {**env, **tcp}
    with (
        server_group(m_argv, workdir / "mooncake-master.log", env, lambda: port_open(rpc), "mooncake_master"),
        server_group(c_argv, workdir / "mooncake-client.log", env, lambda: port_open(client_port), "mooncake_client"),
    ):  # fmt: skip
        yield {
            "extra_config": {},
            "env": {
                **peer_env(env),
                "MOONCAKE_CONFIG_PATH": str(workdir / "mooncake.json"),
                "VLLM_HOST_IP": "127.0.0.1",
            },  # fmt: skip
            "server": f"mooncake_master 127.0.0.1:{rpc} + mooncake_client, segment {mb} MB, tcp",
        }


def relay_worker(
    argv: list[str], env: dict[str, str], cwd: Path, log_path: Path, mark: str,
    on_event: Callable[[dict[str, Any]], None], silence_s: float,
) -> tuple[int, list[str], bool]:  # fmt: skip
    """Run a benchmark worker in its own process group, its output to `log_path`, each `mark`-prefixed
    JSON line to `on_event`; a worker with no event for `silence_s` seconds (a hung engine, or one
    that retries a failing connector forever while logging) is killed. Returns (exit code, the last
    40 lines, whether it was killed for that); the group is killed on every way out."""
    tail: list[str] = []
    heard, stalled = [time.monotonic()], False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(cwd), start_new_session=True)  # fmt: skip

        def watchdog() -> None:
            nonlocal stalled
            while proc.poll() is None:
                if time.monotonic() - heard[0] > silence_s:
                    stalled = True
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    return
                time.sleep(1)

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace")
                log.write(line)
                tail = (tail + [line])[-40:]
                if line.startswith(mark):
                    heard[0] = time.monotonic()
                    on_event(json.loads(line[len(mark) :]))
            proc.wait()
        finally:
            kill_group(proc)
    return proc.returncode, tail, stalled


def reset_prefix_cache(engine: Any, timeout: float = 30.0) -> None:
    """Empty vLLM's prefix cache. A connector may hold blocks a moment after a request ends (the
    reset then returns False): step the idle engine until it lets go."""
    deadline = time.monotonic() + timeout
    while not engine.reset_prefix_cache():
        if time.monotonic() > deadline:
            raise RuntimeError(f"vLLM's prefix cache did not reset in {timeout:.0f} s")
        engine.step()
        time.sleep(0.01)


def mean_percentiles(values: list[float]) -> dict[str, float]:
    """mean, p50, p99 and n of `values` (NaN when there are none)."""
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan"), "n": 0}
    return {"mean": sum(values) / len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "n": len(values)}  # fmt: skip


def vllm_tolerates_numba() -> None:
    """Call before building a vLLM-CPU 0.32 engine in a process that imports numba (lmcache does):
    vLLM's kernel rebinding (`vllm/triton_utils/dispatcher.py`) calls `vars(x).get` on every module
    attribute, and numba's function wrappers have a `__dict__` that is no dict."""
    import builtins

    import vllm.triton_utils.dispatcher as dispatcher

    def dict_vars(obj: Any) -> Any:
        d = builtins.vars(obj)
        return d if isinstance(d, dict) else {}

    setattr(dispatcher, "vars", dict_vars)  # noqa: B010 (a module global that shadows the builtin)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises SystemExit while inside, so `finally` blocks stop servers and workers (main
    thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def bench_main(
    kind: str,
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
    passed: Callable[[dict[str, Any]], bool] = lambda res: True,
) -> int:
    """A benchmark's `main`: `--plot-from` redraws a recorded run and runs nothing; otherwise a bad
    `--plot` fails before the run, the run unwinds on SIGTERM (every server and worker is stopped), the
    table or `--json` is printed and `--plot` drawn. A run that fails outright (a RuntimeError: a worker
    died, a peer would not start) is one line and exit 1, and so is a result `passed` rejects (outputs
    that differ)."""
    if args.plot_from:
        return plots.redraw(kind, args)
    plots.check(args)
    try:
        with sigterm_unwinds():
            res = run(args)
    except RuntimeError as e:
        print(f"polarkvd bench {kind}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(res, indent=2) if args.json else render(res))
    plots.after_run(kind, res, args)
    return 0 if passed(res) else 1
