"""`polarkvd bench pipeline`: TTFT of a prefix hit by where the prefix is, layer pipelining on and off.

One run, the real vLLM CPU engine and SmolLM2-135M (fp32), one fixed prefix (`--prefix` tokens, rounded to
whole 128-token pages; SmolLM2's ChatML frame, words of the model's own vocabulary) followed by a short
distinct user turn per trial. Each measured request is a polarkvd hit on the whole prefix, served from

  local   the DRAM of the daemon vLLM is attached to (B);
  disk    B's disk tier (the prefix evicted from B's DRAM; by default dropped from the OS page cache too,
          `--disk-cache warm` keeps it there);
  remote  the DRAM of another daemon of the cluster (A), fetched over TCP: B holds nothing.

and each of the three with pipelining off (connector `load_mode="step"`: the daemon answers a load once
every page is in its DRAM; the worker copies all of it in `start_load_kv`) and on (`load_mode="layer"`:
the daemon answers at once, pages from disk or from a peer arrive layer by layer, and the connector's
copy thread copies each layer as soon as it is there while vLLM computes the layers before it).

Setup: two private daemons A and B on loopback, one cluster (`insecure`: a benchmark on one host), each
with a disk tier; two vLLM processes, one per `load_mode`, both attached to B and both kept up (offline
`LLMEngine`, eager, in-process engine core, vLLM's prefix caching on as deployed and reset before every
request so its own cache never serves the prefix). One request is in flight at a time: each trial serves
a source with both modes back to back, in alternating order, so the machine's noise hits both alike. The
step process first computes the no-cache reference output of every trial's prompt while B refuses stores
(`drain`), then stores the prefix in B (the last reference, stores accepted again); this process copies
those pages B -> A through the client API (the namespace the connector reported, so the same keys and
bytes an engine attached to A would have stored).

Before every request the prefix is put where the trial wants it with the control API (`evict_keys`
demotes B's DRAM copy to B's disk, `evict("disk")` deletes B's disk copy, a plain `load` brings it back
into B's DRAM) and B's lookup must show exactly that tier for every page; after it, B's counters must
show the pages were loaded from there (`loaded_pages_disk`, `loaded_pages_remote`, `fetched_pages_remote`)
and the connector must have loaded the whole prefix with no failed block. Anything else stops the run:
the bench never reports a number measured on the wrong source. Sources rotate their order every trial;
one untimed warm-up round runs first.

TTFT: wall time from `LLMEngine.add_request()` to the `engine.step()` returning the first output token
(as `bench chat`). Greedy outputs of every trial are compared with the no-cache reference of its prompt.

The engine runs with `python -m polarkvd.bench.pipeline_worker SPEC`; the parent never imports vLLM.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import queue
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from polarkvd.bench import plots
from polarkvd.bench.chat import chat_tokens
from polarkvd.bench.harness import (
    bench_main,
    count_cpus,
    cpu_bind,
    fmt,
    kill_group,
    model_kv_bytes_per_token,
    private_daemon,
    ratio,
    shared_seed_file,
    table,
    vllm_env,
)
from polarkvd.progress import Progress

SOURCES = ("local", "disk", "remote")
SOURCE_HELP = {
    "local": "L2 DRAM of the daemon vLLM is attached to",
    "disk": "L4 disk of that daemon",
    "remote": "DRAM of a peer daemon over TCP (L3)",
}
#: pipelining -> the connector's load_mode
MODES = {"off": "step", "on": "layer"}
BLOCK = 128  # vLLM's CPU block size (and the connector's page, page_blocks 1)
MARK = "@@pipeline "
# Targets with pipelining on (docs/BENCHMARKS.md).
BARS = {
    "remote_vs_local": ("<=", 1.2),
    "disk_vs_local": ("<=", 1.5),
    "hidden_fraction": (">=", 0.7),
}
# B's counters recorded around each measured request (deltas): they prove where the pages came from.
B_COUNTERS = (
    "loads",
    "loaded_pages",
    "loaded_pages_disk",
    "loaded_pages_remote",
    "fetched_pages_remote",
    "fetched_bytes_remote",
    "promoted_pages",
    "hit_pages_remote",
    "pipelined_loads",
    "pipelined_loads_unsignalled",
    "promotion_failures",
    "corrupt_pages",
    "cluster_fetch_failures",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.add_argument("--prefix", type=int, default=3000, metavar="TOKENS",
                   help="the cached prefix, rounded to whole 128-token pages (default 3000: 23 pages)")  # fmt: skip
    p.add_argument("--turn", type=int, default=32, metavar="TOKENS",
                   help="each trial's own user message after the prefix (default 32)")  # fmt: skip
    p.add_argument("--answer", type=int, default=16, metavar="TOKENS",
                   help="tokens generated per request, greedy, compared with the reference (default 16)")  # fmt: skip
    p.add_argument("--trials", type=int, default=5, help="measured requests per source and mode (default 5)")
    p.add_argument("--disk-cache", choices=("cold", "warm"), default="cold",
                   help="cold: drop the disk tier's page files from the OS page cache before a disk hit, so "
                   "they are read from the device; warm: leave them cached (default cold)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--cpus", default="", help="VLLM_CPU_OMP_THREADS_BIND for both vLLM processes "
                   "(default: every CPU this process may use)")  # fmt: skip
    p.add_argument("--model", default="", help="model directory (default: the converted SmolLM2-135M)")
    p.add_argument("--keep", action="store_true", help="keep the run directory and daemon directories")
    plots.add_plot_arguments(p)


# ---------------------------------------------------------------------------------------- workload


def build_workload(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    """The prefix (whole pages) and one distinct user turn per trial, from the seed and the tokenizer."""
    enc, text = chat_tokens(model_dir, args.seed)

    head = enc("<|im_start|>system\n")
    pages = max(1, round(args.prefix / BLOCK))
    if pages * BLOCK <= len(head):
        pages += 1
    prefix = head + text(pages * BLOCK - len(head))
    user_open, assistant_open = (
        enc("<|im_end|>\n<|im_start|>user\n"),
        enc("<|im_end|>\n<|im_start|>assistant\n"),
    )
    suffixes = [user_open + text(args.turn) + assistant_open for _ in range(args.trials)]
    return {"prefix": prefix, "suffixes": suffixes, "pages": pages}


# ---------------------------------------------------------------------------------------- placement


class BenchError(RuntimeError):
    """The run cannot give a trustworthy number (pages not where planned, a hit not served)."""


class Placement:
    """Puts the prefix's pages where a trial wants them, through both daemons' control and engine APIs,
    and proves it with lookups before and counters after."""

    def __init__(self, socks: dict[str, str], ns: Any, prefix: list[int], cold_disk: bool) -> None:
        from polarkvd.client import ControlClient, EngineClient

        # the same namespace (hence keys) as the vLLM processes' connector
        self.b = EngineClient(ns, "bench-pipeline-placement", socks["b_engine"])
        self.a = EngineClient(ns, "bench-pipeline-placement", socks["a_engine"])
        self.bc = ControlClient(socks["b_control"], timeout=120)
        self.ac = ControlClient(socks["a_control"], timeout=120)
        self.keys = self.b.page_keys(prefix)
        if self.a.page_keys(prefix) != self.keys:
            raise BenchError("daemons A and B compute different keys for the same prefix")
        self.n = len(self.keys)
        self.cold_disk = cold_disk
        self.b_log = Path(socks["b_engine"]).parent.parent / "daemon.log"  # harness.private_daemon's

    def tiers(self, client: Any) -> list[str]:
        return [t.name.lower() for t in client.lookup(self.keys).tiers]

    def expect_b(self, tier: str, when: str) -> None:
        self._expect(f"B {when}", self.tiers(self.b), tier)

    def _expect(self, what: str, got: list[str], tier: str) -> None:
        if got != [tier] * self.n:
            raise BenchError(
                f"{what}: expected all {self.n} prefix pages in {tier}, lookup says {_runs(got)}"
            )

    def _wait(self, cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.02)

    def _settle_disk(self) -> None:
        """Demotions are written by the daemon's I/O threads: wait until none is queued."""
        self._wait(lambda: self.bc.stats()["tiers"]["disk"]["pending_pages"] == 0, "B's disk writes")

    def _b_dram(self) -> None:
        if self.tiers(self.b) != ["dram"] * self.n:
            r = self.b.load(self.keys)  # promotes from disk or fetches from A
            if r.lease is not None:
                self.b.release(r.lease)
        self._expect("B before a local hit", self.tiers(self.b), "dram")

    def _b_evict_dram(self) -> None:
        if "dram" in self.tiers(self.b):
            self.bc.evict_keys([self.keys[0]])
            self._settle_disk()

    def seed_a(self) -> None:
        """Copy the prefix's pages from B to A: what an engine attached to A would have stored."""
        self._b_dram()
        r = self.b.load(self.keys)
        try:
            self.a.store(self.keys, r.views)
        finally:
            if r.lease is not None:
                self.b.release(r.lease)
        self._expect("A after storing the prefix", self.tiers(self.a), "dram")

    def put(self, source: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        if source == "local":
            self._b_dram()
        elif source == "disk":
            self._b_dram()
            self.bc.evict_keys([self.keys[0]])
            self._settle_disk()
            self._expect("B before a disk hit", self.tiers(self.b), "disk")
            if self.cold_disk:
                self._drop_page_cache()
        elif source == "remote":
            self._b_evict_dram()  # to B's disk ...
            self.bc.evict("disk", 1 << 62)  # ... and off it: B holds nothing
            self._expect("A before a remote hit", self.tiers(self.a), "dram")
            # B's lookup goes to the meta map's owner of each key; removals are announced within ms
            self._wait(lambda: self.tiers(self.b) == ["dmp"] * self.n, "B to see the prefix only on A", 10)
        else:
            raise ValueError(source)
        return {"tiers": _runs(self.tiers(self.b)), "placement_s": time.perf_counter() - t0}

    def _drop_page_cache(self) -> None:
        """Write back and drop B's disk page files from the OS page cache: the hit reads the device."""
        path = self.bc.stats()["tiers"]["disk"]["path"]
        for dirpath, _, files in os.walk(path):
            for name in files:
                if not name.endswith(".pkv"):
                    continue
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

    @staticmethod
    def probe(socks: dict[str, str]) -> list[int]:
        """Daemons A's and B's pids (for their CPU time), from their control sockets."""
        from polarkvd.client import ControlClient

        pids = []
        for name in ("a", "b"):
            with ControlClient(socks[f"{name}_control"], timeout=5) as c:
                pids.append(_peer_pid(c))
        return pids

    def counters(self) -> dict[str, int]:
        c = self.bc.stats()["counters"]
        out = {k: int(c.get(k, 0)) for k in B_COUNTERS}
        out["a_cluster_served_pages"] = int(self.ac.stats()["counters"].get("cluster_served_pages", 0))
        return out

    def check(self, source: str, rec: dict[str, Any], d: dict[str, int]) -> None:
        """The hit was the whole prefix, from `source`, with nothing recomputed."""
        n, problems = self.n, []
        if rec["external_tokens"] != n * BLOCK:
            problems.append(f"the scheduler found {rec['external_tokens']} tokens, not {n * BLOCK}")
        if rec["loaded_tokens"] != n * BLOCK or rec["load_failed_blocks"]:
            problems.append(f"the worker loaded {rec['loaded_tokens']} tokens, {rec['load_failed_blocks']} "
                            "blocks failed")  # fmt: skip
        want = {"local": (0, 0), "disk": (n, 0), "remote": (0, n)}[source]
        got = (d["loaded_pages_disk"], d["loaded_pages_remote"])
        if d["loaded_pages"] != n or got != want:
            problems.append(f"B loaded {d['loaded_pages']} pages, {got[0]} from disk and {got[1]} from peers")
        if source == "remote" and d["fetched_pages_remote"] != n:
            problems.append(f"B fetched {d['fetched_pages_remote']} pages from A")
        if source != "remote" and d["fetched_pages_remote"]:
            problems.append(f"B fetched {d['fetched_pages_remote']} pages from A on a {source} hit")
        if problems:
            for k in ("promotion_failures", "corrupt_pages", "cluster_fetch_failures"):
                if d.get(k):
                    problems.append(f"B counted {d[k]} {k}")
            raise BenchError(
                f"a {source} hit was not served as planned: " + "; ".join(problems) + self._b_log_tail()
            )

    def _b_log_tail(self, lines: int = 25) -> str:
        """The end of daemon B's log (its daemons log at debug level: why a promotion failed)."""
        try:
            tail = self.b_log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\ndaemon B's log, last lines:\n" + "\n".join(tail)

    def close(self) -> None:
        for c in (self.a, self.b, self.ac, self.bc):
            c.close()


def _peer_pid(control: Any) -> int:
    """The daemon's pid, from the kernel's credentials of the control socket's other end."""
    sock = control._ch._sock
    pid, _, _ = struct.unpack(
        "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    )
    return int(pid)


def _runs(tiers: list[str]) -> str:
    """['dram', 'dram', 'disk'] -> 'dram x2, disk x1' (or 'nothing')."""
    out: list[list[Any]] = []
    for t in tiers:
        if out and out[-1][0] == t:
            out[-1][1] += 1
        else:
            out.append([t, 1])
    return ", ".join(f"{t} x{k}" for t, k in out) or "nothing"


# ---------------------------------------------------------------------------------------- parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def two_daemons(dram: int, pending: int, keep: bool) -> Iterator[dict[str, str]]:
    """Daemons A (holder) and B (vLLM's) in one cluster on loopback, each with a disk tier."""
    from polarkvd.client import ControlClient

    gossip = {"a": _free_port(), "b": _free_port()}
    common = {
        "dram.capacity": str(dram),
        "dram.slab_bytes": "64MiB",
        "disk.enabled": "true",
        "disk.max_pending_bytes": str(pending),
        "disk.save_on_shutdown": "false",  # exit at once; the run directory is deleted anyway
        "daemon.log_level": "debug",  # quiet (a few dozen lines a run); says why a promotion failed
        "cluster.enabled": "true",
        "cluster.insecure": "true",  # one host, private ports: no key needed for a benchmark
        "cluster.data_address": "127.0.0.1:0",
        "cluster.seeds": f"127.0.0.1:{gossip['a']}",
        # lenient failure detection: on a busy 2-core box a 100-200 ms probe timeout marks the peer
        # suspect now and then, and lookups skip suspect members (a miss the bench would refuse)
        "cluster.probe_interval": "1s",
        "cluster.probe_timeout": "500ms",
        # a loaded 2-core box can take more than the default 50 ms to answer where a page is; a missed
        # answer would be a miss (a cold prefill), which the bench would then refuse as a wrong source
        "cluster.lookup_timeout": "1s",
    }
    with contextlib.ExitStack() as stack:
        common["daemon.seed_file"] = stack.enter_context(shared_seed_file())  # one seed per cluster
        socks: dict[str, str] = {}
        for name in ("a", "b"):
            sets = {**common, "cluster.node_id": name, "cluster.gossip_address": f"127.0.0.1:{gossip[name]}"}
            engine, control = stack.enter_context(private_daemon(sets, keep=keep))
            socks[f"{name}_engine"], socks[f"{name}_control"] = str(engine), str(control)
        deadline = time.monotonic() + 30
        while True:
            alive = []
            for name in ("a", "b"):
                with ControlClient(socks[f"{name}_control"], timeout=5) as c:
                    members = {m["node"]: m["state"] for m in c.cluster()["members"]}
                alive.append(members.get("a") == "alive" and members.get("b") == "alive")
            if all(alive):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("daemons A and B did not see each other alive within 30 s")
            time.sleep(0.1)
        yield socks


class Worker:
    """One vLLM process (one load_mode), driven one request at a time; its output goes to a log file."""

    def __init__(self, mode: str, spec: dict[str, Any], root: Path, env: dict[str, str]) -> None:
        self.mode = mode
        self.label = f"pipelining {mode} (load_mode={MODES[mode]})"
        cdir = root / f"pipelining-{mode}"
        (cdir / "tmp").mkdir(parents=True)
        (cdir / "spec.json").write_text(json.dumps({**spec, "load_mode": MODES[mode]}))
        self.log_path = cdir / "vllm.log"
        self._log = open(self.log_path, "w")
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self.warnings: list[str] = []  # the connector's warnings and errors during the last request
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "polarkvd.bench.pipeline_worker", str(cdir / "spec.json")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**env, "TMPDIR": str(cdir / "tmp")}, cwd=str(cdir), start_new_session=True,
        )  # fmt: skip
        threading.Thread(target=self._read, name=f"bench-{mode}-log", daemon=True).start()
        self.ready: dict[str, Any] = {}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            self._log.write(line)
            self._tail.append(line)
            if "polarkvd" in line and ("WARNING" in line or "ERROR" in line):
                self.warnings.append(line.strip())
            if line.startswith(MARK):
                self._events.put(json.loads(line[len(MARK) :]))
        self._log.flush()
        self._events.put(None)

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        try:
            msg = self._events.get(timeout=timeout)
        except queue.Empty:
            msg = None
        if msg is None or msg.get("event") != event:
            self.proc.poll()
            raise RuntimeError(
                f"{self.label}: the vLLM worker did not answer {event!r} (exit {self.proc.returncode}); "
                f"log {self.log_path}, last lines:\n" + "".join(self._tail)
            )
        return msg

    def start(self) -> dict[str, Any]:
        self.ready = self.expect("ready", 600)
        return self.ready

    def serve(self, suffix: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.warnings = []
        self.proc.stdin.write((json.dumps({"op": "serve", "suffix": suffix}) + "\n").encode())
        self.proc.stdin.flush()
        return self.expect("served", 600)

    def close(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.close()
                self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            kill_group(self.proc)
            self._log.close()


def measure(
    workers: dict[str, Worker], place: Placement, suffixes: int, trials: int, say: Callable[[str], None]
) -> dict[str, Any]:
    """References, the copy to A, then every trial: place the prefix, serve, check where it came from."""
    refs: dict[int, list[int]] = {}
    # No-cache references: B refuses stores while the prompts are computed cold; the last one is
    # computed with stores accepted again and leaves the prefix in B's DRAM.
    order = list(range(1, suffixes)) + [0]
    place.bc.drain()
    for i in order:
        if i == order[-1]:
            place.bc.resume()
        rec = workers["off"].serve(i)
        if rec["cached_tokens"] or rec["external_tokens"]:
            raise BenchError(f"reference {i} was not computed cold: {rec['cached_tokens']} tokens cached")
        refs[i] = rec["output_ids"]
        say(f"reference {i} computed cold ({rec['prompt_tokens']} tokens, TTFT {rec['ttft_s']:.2f} s)")
    place.expect_b("dram", "after storing the prefix")
    place.seed_a()
    say(f"prefix stored in B ({place.n} pages) and copied to A")
    records: list[dict[str, Any]] = []
    for trial in range(-1, trials):  # -1: a warm-up round (suffix 0), not measured
        k = trial % len(SOURCES)
        for j, source in enumerate(SOURCES[k:] + SOURCES[:k]):
            # both modes back to back, in alternating order, so the machine's noise hits both alike
            for mode in ("off", "on") if (trial + j) % 2 == 0 else ("on", "off"):
                where = place.put(source)
                c0 = place.counters()
                rec = workers[mode].serve(max(trial, 0))
                c1 = place.counters()
                delta = {key: c1[key] - c0[key] for key in c1}
                try:
                    place.check(source, rec, delta)
                except BenchError as e:
                    logged = "\n".join(workers[mode].warnings[-5:]) or "(nothing logged)"
                    raise BenchError(f"{e} (pipelining {mode}); vLLM logged:\n{logged}") from None
                rec.update(
                    mode=mode, source=source, trial=trial, suffix=max(trial, 0), before=where, daemon=delta
                )
                records.append(rec)
                what = "warm-up" if trial < 0 else f"trial {trial}"
                say(
                    f"{source} {what}, pipelining {mode}: TTFT {rec['ttft_s'] * 1000:.0f} ms (was {where['tiers']}; "
                    f"{delta['loaded_pages_disk']} pages from disk, {delta['fetched_pages_remote']} fetched; load "
                    f"call {rec['load_rpc_s'] * 1000:.0f} ms, copy {rec['load_copy_s'] * 1000:.0f} ms, model "
                    f"blocked {rec['blocked_s'] * 1000:.0f} ms; daemons {rec['daemons_cpu_s'] * 1000:.0f} ms CPU)"
                    + (f" (other processes: {rec['others_cpu_s']:.1f} CPU s)" if rec["others_cpu_s"] > 0.5 else "")
                )  # fmt: skip
    return {"references": refs, "records": records}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def hidden_fraction(
    runs: dict[str, dict[str, dict[str, Any]]], key: str = "ttft_ms"
) -> tuple[float | None, float | None]:
    """(clamped, raw) share of a remote hit's transfer time that pipelining hides behind compute.

    transfer = TTFT(remote, off) - TTFT(local, off): what fetching from the peer adds when nothing
    overlaps it; exposed = TTFT(remote, on) - TTFT(local, on): what it still adds with pipelining.
    hidden = 1 - exposed / transfer, clamped to [0, 1] (below 0: pipelining made the remote hit worse;
    above 1: the remote hit beat the local one, noise). None when transfer <= 0 (nothing to hide).
    With key="blocked_ms", the same over the time vLLM's model thread waited for loads.
    """
    try:
        transfer = runs["remote"]["off"][key] - runs["local"]["off"][key]
        exposed = runs["remote"]["on"][key] - runs["local"]["on"][key]
    except (KeyError, TypeError):
        return None, None
    if not transfer > 0:
        return None, None
    raw = 1.0 - exposed / transfer
    return min(1.0, max(0.0, raw)), raw


def summarize(measured: dict[str, Any]) -> dict[str, Any]:
    refs: dict[int, list[int]] = measured["references"]
    records: list[dict[str, Any]] = measured["records"]
    mismatches = [
        {"pipelining": q["mode"], "source": q["source"], "trial": q["trial"]}
        for q in records
        if q["output_ids"] != refs[q["suffix"]]
    ]
    runs: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in SOURCES}
    for source in SOURCES:
        for mode in ("off", "on"):
            ts = [q for q in records if q["mode"] == mode and q["source"] == source and q["trial"] >= 0]
            ms = [q["ttft_s"] * 1000 for q in ts]
            runs[source][mode] = {
                "ttft_ms": _median(ms),
                "trials_ms": [round(x, 2) for x in ms],
                "min_ms": min(ms),
                "max_ms": max(ms),
                "load_mode": MODES[mode],
                "load_call_ms": _median([q["load_rpc_s"] * 1000 for q in ts]),
                "load_copy_ms": _median([q["load_copy_s"] * 1000 for q in ts]),
                "blocked_ms": _median([q["blocked_s"] * 1000 for q in ts]),
                "first_layer_wait_ms": _median([q["first_layer_wait_s"] * 1000 for q in ts]),
                "daemons_cpu_ms": _median([q["daemons_cpu_s"] * 1000 for q in ts]),
                "loaded_tokens": ts[0]["loaded_tokens"],
                "computed_tokens": ts[0]["prompt_tokens"] - ts[0]["cached_tokens"],
                # B's counters summed over the trials (a_cluster_served_pages: A's), and B's lookup
                # before each trial: where the pages were and where they came from
                "daemon_counters": {k: sum(q["daemon"][k] for q in ts) for k in ts[0]["daemon"]},
                "placement": [q["before"]["tiers"] for q in ts],
                "others_cpu_s": sum(q["others_cpu_s"] for q in ts),
            }
    on = {s: runs[s]["on"]["ttft_ms"] for s in SOURCES}
    off = {s: runs[s]["off"]["ttft_ms"] for s in SOURCES}
    # each trial ran both modes of a source back to back: the per-pair ratio is steadier than medians'
    paired = {}
    for source in SOURCES:
        by = {
            (q["trial"], q["mode"]): q["ttft_s"] for q in records if q["source"] == source and q["trial"] >= 0
        }
        paired[source] = _median([by[(t, "on")] / by[(t, "off")] for t, m in by if m == "off"])
    hidden, hidden_raw = hidden_fraction(runs)
    wait_hidden, _ = hidden_fraction(runs, "blocked_ms")
    res: dict[str, Any] = {
        "remote_vs_local": ratio(on["remote"], on["local"]),
        "disk_vs_local": ratio(on["disk"], on["local"]),
        "hidden_fraction": hidden,
        "hidden_fraction_raw": hidden_raw,
        "remote_transfer_ms": off["remote"] - off["local"],
        "remote_exposed_ms": on["remote"] - on["local"],
        "wait_hidden_fraction": wait_hidden,
        "remote_vs_local_unpipelined": ratio(off["remote"], off["local"]),
        "disk_vs_local_unpipelined": ratio(off["disk"], off["local"]),
        "pipelined_vs_step": paired,
        "outputs_identical": bool(records) and not mismatches,
        "outputs_compared": {
            "requests": len(records),
            "references": len(refs),
            "mismatches": mismatches[:10],
        },
    }
    res["bars"] = {}
    for key, (op, bar) in BARS.items():
        v = res.get(key)
        ok = None if v is None else (v <= bar if op == "<=" else v >= bar)
        res["bars"][key] = {"value": v, "bar": f"{op} {bar:g}", "pass": ok}
    res["runs"] = runs
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    from polarkvd.models import ensure_smollm2
    from polarkvd.types import Namespace

    if args.trials < 1 or args.prefix < 1 or args.turn < 1 or args.answer < 1:
        raise SystemExit("polarkvd bench pipeline: --trials, --prefix, --turn and --answer must be >= 1")
    model_dir = args.model or str(ensure_smollm2())
    wl = build_workload(args, model_dir)
    pages = wl["pages"]
    tail = len(wl["suffixes"][0]) + args.answer
    if tail >= BLOCK:
        raise SystemExit(
            f"polarkvd bench pipeline: a trial's turn and answer ({tail} tokens) must fit in one page "
            f"({BLOCK} tokens), so that a trial stores nothing past the prefix: lower --turn or --answer"
        )
    page_bytes = model_kv_bytes_per_token(model_dir) * BLOCK
    prefix_bytes = pages * page_bytes
    # DRAM: the prefix, room to promote or fetch it again, and slack for slabs; A holds one copy.
    dram = max(256 << 20, 3 * prefix_bytes)
    dram = -(-dram // (64 << 20)) * (64 << 20)
    pending = max(256 << 20, 2 * prefix_bytes)  # a whole prefix demoted at once is never dropped
    max_model_len = (pages + 1) * BLOCK
    bind = args.cpus or cpu_bind()
    ncpu = len(os.sched_getaffinity(0)) if not args.cpus else max(1, count_cpus(args.cpus))
    env = vllm_env(bind, ncpu)
    # a live bar on a terminal, plain lines on stderr otherwise; each line says what just happened
    prog = Progress(1 + 2 + args.trials + 1 + 2 * len(SOURCES) * (args.trials + 1))
    say = prog.report
    root = Path(tempfile.mkdtemp(prefix="polarkv-pipeline-"))
    t0 = time.perf_counter()
    ready: dict[str, dict[str, Any]] = {}
    try:
        with two_daemons(dram, pending, args.keep) as socks, contextlib.ExitStack() as stack:
            say("daemons A and B up, one cluster on loopback")
            probe = Placement.probe(socks)
            spec: dict[str, Any] = {
                "model": model_dir,
                "workload": wl,
                "answer": args.answer,
                "max_model_len": max_model_len,
                "max_num_batched_tokens": max(max_model_len, 2048),
                "kv_blocks": pages + 4,
                "b_engine": socks["b_engine"],
                "daemon_pids": probe,
            }
            workers: dict[str, Worker] = {}
            for mode in ("off", "on"):  # one after the other: engine starts are CPU-heavy
                w = Worker(mode, spec, root, env)
                stack.callback(w.close)
                ready[mode] = w.start()
                workers[mode] = w
                say(f"{w.label}: vLLM ready (import {ready[mode]['import_s']:.1f} s, engine "
                    f"{ready[mode]['start_s']:.1f} s)")  # fmt: skip
            if ready["off"]["namespace"] != ready["on"]["namespace"]:
                raise BenchError("the two vLLM processes attached different namespaces")
            ns = Namespace.from_wire(ready["off"]["namespace"])
            place = Placement(socks, ns, wl["prefix"], cold_disk=args.disk_cache == "cold")
            stack.callback(place.close)
            if place.n != pages:
                raise BenchError(f"the prefix has {place.n} pages in vLLM's namespace, expected {pages}")
            measured = measure(workers, place, len(wl["suffixes"]), args.trials, say)
    finally:
        prog.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    res = summarize(measured)
    first = measured["records"][0]
    res["workload"] = {
        "prefix_tokens": len(wl["prefix"]),
        "prefix_pages": pages,
        "prefix_bytes": prefix_bytes,
        "page_bytes": page_bytes,
        "suffix_tokens": len(wl["suffixes"][0]),
        "prompt_tokens": first["prompt_tokens"],
        "answer_tokens": args.answer,
        "trials": args.trials,
        "disk_cache": args.disk_cache,
        "seed": args.seed,
        "model": Path(model_dir).name,
        "dtype": "float32",
        "block_tokens": BLOCK,
        "vllm_cpu_omp_threads_bind": bind,
        "daemon_dram_bytes": dram,
        "wall_s": time.perf_counter() - t0,
        "engine_start_s": {m: r["start_s"] for m, r in ready.items()},
        "engine_thread_cpus": ready["off"]["cpus"],  # vLLM's model thread and the connector's copy thread
        "ttft_method": "wall time from LLMEngine.add_request() to the engine.step() returning the first "
        "output token; vLLM's prefix cache reset before every request; median of the trials",
    }
    res["notes"] = [
        "pipelining on = connector load_mode=layer (pipelined daemon loads, a copy thread per layer); "
        "off = load_mode=step (the daemon answers when every page is in its DRAM)",
        "hidden_fraction = 1 - (TTFT(remote,on) - TTFT(local,on)) / (TTFT(remote,off) - TTFT(local,off)), "
        "clamped to [0, 1]; hidden_fraction_raw unclamped; none when the remote hit costs nothing extra "
        "unpipelined; wait_hidden_fraction: the same over the time vLLM's model thread waited for loads",
        "both vLLM processes stay up; each trial serves a source with both modes back to back",
        "disk hits read "
        + ("the device: page files written back and dropped from the OS page cache before each"
           if args.disk_cache == "cold" else "page files from the OS page cache (--disk-cache warm)"),
        "daemons A and B and both vLLM processes share the same CPUs",
    ]  # fmt: skip
    return res


def render(res: dict[str, Any]) -> str:
    wl, runs = res["workload"], res["runs"]
    lines = [
        f"prefix {wl['prefix_tokens']} tokens ({wl['prefix_pages']} pages, {wl['prefix_bytes'] / 1e6:.0f} MB), "
        f"turn {wl['suffix_tokens']} tokens, answer {wl['answer_tokens']}, {wl['trials']} trials per cell, "
        f"{wl['model']} {wl['dtype']}, VLLM_CPU_OMP_THREADS_BIND={wl['vllm_cpu_omp_threads_bind']}, "
        f"disk cache {wl['disk_cache']}, {wl['wall_s']:.0f} s",
        *("note: " + n for n in res["notes"]),
        "",
    ]
    rows: list[tuple[object, ...]] = []
    for source in SOURCES:
        for mode in ("off", "on"):
            r = runs[source][mode]
            rows.append((
                source, f"{mode} ({r['load_mode']})", fmt(r["ttft_ms"], 1), f"{fmt(r['min_ms'], 1)}-{fmt(r['max_ms'], 1)}",
                fmt(ratio(r["ttft_ms"], runs["local"][mode]["ttft_ms"]), 2), fmt(r["load_call_ms"], 1),
                fmt(r["load_copy_ms"], 1), fmt(r["blocked_ms"], 1), fmt(r["daemons_cpu_ms"], 0), str(r["loaded_tokens"]),
                str(r["computed_tokens"]), fmt(r["others_cpu_s"], 1),
            ))  # fmt: skip
    lines.append(table(rows, ("source", "pipelining", "TTFT ms", "min-max ms", "vs local", "load call ms",
                              "copy ms", "blocked ms", "daemons CPU ms", "loaded tok", "computed tok",
                              "others CPU s")))  # fmt: skip
    lines.append("")
    rows = []
    for key, b in res["bars"].items():
        verdict = "-" if b["pass"] is None else ("pass" if b["pass"] else "FAIL")
        rows.append((key, fmt(b["value"], 3), b["bar"], verdict))
    rows.append(("hidden_fraction_raw", fmt(res["hidden_fraction_raw"], 3), "", ""))
    rows.append(("wait_hidden_fraction", fmt(res["wait_hidden_fraction"], 3), "", "model-thread waits only"))
    rows.append(("remote transfer (off) / exposed (on) ms",
                 f"{fmt(res['remote_transfer_ms'], 1)} / {fmt(res['remote_exposed_ms'], 1)}", "", ""))  # fmt: skip
    rows.append(("remote_vs_local_unpipelined", fmt(res["remote_vs_local_unpipelined"], 3), "", ""))
    rows.append(("disk_vs_local_unpipelined", fmt(res["disk_vs_local_unpipelined"], 3), "", ""))
    for source, v in res["pipelined_vs_step"].items():
        rows.append((f"pipelined_vs_step {source}", fmt(v, 3), "", "paired trials"))
    rows.append(("outputs_identical", str(res["outputs_identical"]),
                 f"{res['outputs_compared']['requests']} requests", ""))  # fmt: skip
    lines.append(table(rows, ("pipelined", "value", "bar", "")))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    return bench_main("pipeline", args, run, render, passed=lambda res: bool(res["outputs_identical"]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="polarkvd bench pipeline")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
