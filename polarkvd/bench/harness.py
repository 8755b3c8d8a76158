"""What every benchmark needs: a private daemon process, timers, percentiles, progress and a table.

Benchmarks compare side by side in one run (ratios), so the machine's noise hits every column alike.
"""

from __future__ import annotations

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
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


class Progress:
    """One line per step on stderr, so a long run shows where it is (stdout stays clean for --json)."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.done, self.quiet = total, 0, quiet
        self.t0 = time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        if not self.quiet:
            print(
                f"[{self.done}/{self.total} {time.perf_counter() - self.t0:6.1f}s] {what} ...",
                file=sys.stderr,
                flush=True,
            )


class Steps(Progress):
    """Progress lines that report what just happened (a request's numbers), not what starts."""

    def step(self, what: str) -> None:
        self.done += 1
        if not self.quiet:
            print(f"[{self.done}/{self.total} {time.perf_counter() - self.t0:7.1f}s] {what}", file=sys.stderr,
                  flush=True)  # fmt: skip


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
