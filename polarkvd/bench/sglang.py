"""`polarkvd bench sglang`: SGLang's HiCache write-back and prefetch with three storage backends side
by side: polarkvd, SGLang's built-in HiCacheFile and SGLang's built-in Mooncake Store backend.

One "SGLang process" (bench/sglang_rig.py: SGLang's own MHA device pool, `MHATokenToKVPoolHost`,
`HybridCacheController` with `io_backend="direct"`, CPU) holds one stack per backend, all with the
same geometry (SmolLM2-135M's by default: 30 layers, 3 KV heads of 64, bf16, 64-token pages of
1.47 MB). Each round, in an order that rotates, every backend writes `--pages` new pages through the
controller's backup thread (`write_storage`: SGLang's `batch_set_v1`, or HiCacheFile's `batch_set`)
and prefetches them back through its prefetch threads (the hit query `batch_exists`, then the
transfer `batch_get_v1` / `batch_get` into freshly allocated host pages), and the bytes are checked.

- polarkvd: a private daemon (DRAM tier only, `--capacity`), PolarKVStorage through SGLang's
  `dynamic` factory with `interface_v1`.
- file: HiCacheFile in a directory on /dev/shm (tmpfs: no disk, its best case), with its metadata
  cache on.
- mooncake: SGLang's MooncakeStore (zero-copy v1) on the non-CUDA Mooncake package bench chat uses
  (scripts/setup-bench-peers.sh), over TCP on 127.0.0.1, with a fresh `mooncake_master` and, by
  default (`--mooncake-mode client`), a `mooncake_client` process that owns the memory, as polarkvd's
  daemon does (the pages outlive SGLang and are shared by its processes); `--mooncake-mode embedded`
  keeps the memory in SGLang's process instead (SGLang's default: pages die with it).

Reported per backend (medians over rounds): pages/s and GB/s of set (write-back) and get (the
prefetch transfer), the hit query's time, `batch_exists` of 64 stored keys (p50 of 200), and CPU
seconds per GB moved (the SGLang process plus the server's processes: the daemon, Mooncake's master
and client; HiCacheFile's kernel time is in the SGLang process). Top level: `get_vs_file`,
`get_vs_mooncake` (polarkvd's get GB/s over theirs) and `exists_p50_vs_rtt` (polarkvd's
`batch_exists` of 64 keys over one socket round trip, a `ping`, timed in the same thread).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from polarkvd.bench import plots
from polarkvd.bench.harness import (
    PeerUnavailable,
    bench_main,
    free_port,
    median,
    mooncake_store,
    peer_env,
    peers_dir,
    port_open,
    private_daemon,
    ratio,
    server_group,
    table,
)
from polarkvd.config.values import parse_size
from polarkvd.progress import Progress

MARK = "@@sglang "
BACKENDS = ("polarkv", "file", "mooncake")
BARS = {"get_vs_file": 1.5, "get_vs_mooncake": 2.0, "exists_p50_vs_rtt": 1.5}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument(
        "--pages",
        type=int,
        default=128,
        help="pages per round and backend (default 128: SGLang's storage batch)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds, each backend once per round, order rotating (default 3)",
    )
    p.add_argument("--page", type=int, default=64, help="tokens per page (SGLang --page-size; default 64)")
    p.add_argument("--layers", type=int, default=30, help="KV layers (default 30: SmolLM2-135M)")
    p.add_argument("--heads", type=int, default=3, help="KV heads (default 3)")
    p.add_argument("--head-dim", type=int, default=64, help="head size (default 64)")
    p.add_argument("--dtype", default="bfloat16", help="KV dtype (default bfloat16)")
    p.add_argument(
        "--layout", default="page_first", help="host pool layout (default page_first, SGLang's default)"
    )
    p.add_argument("--capacity", default="2GiB", help="the polarkvd daemon's dram.capacity (default 2GiB)")
    p.add_argument("--mooncake-mode", choices=("client", "embedded"), default="client",
                   help="where Mooncake keeps pages: a mooncake_client process (default) or SGLang's own")  # fmt: skip
    p.add_argument(
        "--skip", action="append", default=[], choices=("file", "mooncake"), help="leave a backend out"
    )
    plots.add_plot_arguments(p)


def sglang_dir() -> Path:
    """Where scripts/setup-sglang.sh puts SGLang."""
    env = os.environ.get("POLARKV_SGLANG")
    return Path(env) if env else Path.home() / ".cache" / "polarkvd" / "sglang"


def sglang_available() -> str | None:
    """None when SGLang's classes can be imported by the rig; else why not."""
    if importlib.util.find_spec("sglang") is not None or (sglang_dir() / "sglang").is_dir():
        return None
    return f"SGLang is not installed here or in {sglang_dir()} (./scripts/bootstrap.sh --with-sglang)"


class RigProcess:
    """bench/sglang_rig.py in a child process: JSON commands in, `@@sglang` answers out."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "polarkvd.bench.sglang_rig"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, env=env, start_new_session=True,
        )  # fmt: skip
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._reply(300)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            if line.startswith(MARK):
                self._replies.put(json.loads(line[len(MARK) :]))
        self._replies.put(None)

    def _reply(self, timeout: float) -> dict[str, Any]:
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(
                f"the SGLang rig did not answer in {timeout:.0f} s (log {self.log_path})"
            ) from None
        if reply is None:
            raise RuntimeError(f"the SGLang rig exited with {self.proc.wait()} (log {self.log_path})")
        return reply

    def send(self, op: str, timeout: float = 600, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        reply = self._reply(timeout)
        if reply["event"] == "error":
            raise RuntimeError(f"{op}: {reply['type']}: {reply['message']}")
        return reply

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("quit", timeout=60)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _cpu(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


@contextlib.contextmanager
def _mooncake(
    mode: str, workdir: Path, segment: int, env: dict[str, str]
) -> Iterator[tuple[dict[str, Any], list[int], str]]:
    """Mooncake for SGLang's MooncakeStore: (its extra config, the server pids, a description)."""
    common = {"metadata_server": "P2PHANDSHAKE", "protocol": "tcp", "device_name": "",
              "local_hostname": "127.0.0.1", "check_server": False}  # fmt: skip
    if mode == "client":
        with mooncake_store(workdir, segment, env) as peer:
            cfg = json.loads((workdir / "mooncake.json").read_text())
            pids = _group_pids(workdir)
            yield (
                {**common, "master_server_address": cfg["master_server_address"], "global_segment_size": 0},
                pids,
                peer["server"],
            )
        return
    pkg = peers_dir() / "mooncake"
    master = pkg / "mooncake_master"
    if not master.is_file():
        raise PeerUnavailable(
            f"mooncake-transfer-engine-non-cuda is not installed ({master} missing; run scripts/setup-bench-peers.sh)"
        )
    rpc, metrics = free_port(), free_port()
    argv = [str(master), "--rpc_address=127.0.0.1", f"--rpc_port={rpc}", "--metrics_host=127.0.0.1",
            f"--metrics_port={metrics}", "--enable_http_metadata_server=false"]  # fmt: skip
    with server_group(
        argv, workdir / "mooncake-master.log", env, lambda: port_open(rpc), "mooncake_master"
    ) as proc:
        yield (
            {**common, "master_server_address": f"127.0.0.1:{rpc}", "global_segment_size": segment},
            [proc.pid],
            f"mooncake_master 127.0.0.1:{rpc}, segment {segment >> 20} MB in SGLang's process, tcp",
        )


def _group_pids(workdir: Path) -> list[int]:
    """The pids of Mooncake's master and client that harness.mooncake_store started (by their
    command lines, children of this process)."""
    import psutil

    out = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            name = " ".join(child.cmdline()[:1])
            if name.endswith(("mooncake_master", "mooncake_client")):
                out.append(child.pid)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    why = sglang_available()
    if why:
        raise SystemExit(f"bench sglang: {why}")
    page_bytes = (
        2
        * args.layers
        * args.heads
        * args.head_dim
        * args.page
        * (2 if args.dtype in ("bfloat16", "float16") else 4)
    )
    working = args.pages * page_bytes * (args.rounds + 1)
    backends = [b for b in BACKENDS if b not in args.skip]
    prog = Progress(3 + args.rounds)  # a live bar on a terminal, plain lines on stderr otherwise
    res: dict[str, Any] = {
        "geometry": {
            "layers": args.layers,
            "kv_heads": args.heads,
            "head_dim": args.head_dim,
            "dtype": args.dtype,
            "page_tokens": args.page,
            "page_bytes": page_bytes,
            "layout": args.layout,
        },  # fmt: skip
        "pages": args.pages,
        "rounds": args.rounds,
        "backends": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="polarkv-bench-sglang-"))
    filedir = Path(tempfile.mkdtemp(prefix="polarkv-bench-sglang-file-", dir="/dev/shm"))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("POLARKV_") or k in ("POLARKV_SGLANG", "POLARKV_BENCH_PEERS")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", POLARKV_RIG_LOG="WARNING")
    path = [str(sglang_dir())] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(path)
    sets = {
        "dram.capacity": str(parse_size(args.capacity)),
        "disk.enabled": "false",
        "daemon.log_level": "info",
    }
    servers: dict[str, list[int]] = {"file": []}
    try:
        with contextlib.ExitStack() as stack, private_daemon(sets) as (engine, control):
            from polarkvd.client import ControlClient

            with ControlClient(control, timeout=60) as c:
                servers["polarkv"] = [int(c.stats()["process"]["pid"])]
            mooncake_extra: dict[str, Any] | None = None
            if "mooncake" in backends:
                try:
                    mooncake_extra, servers["mooncake"], desc = stack.enter_context(
                        _mooncake(args.mooncake_mode, workdir, 2 * working, peer_env(env))
                    )
                    res["backends"]["mooncake"] = {"server": desc}
                except PeerUnavailable as e:
                    backends.remove("mooncake")
                    res["backends"]["mooncake"] = {"not_available": str(e)}
            prog.step(
                f"starting an SGLang process (SGLang's import takes 10-20 s); backends {', '.join(backends)}"
            )
            rig = RigProcess(peer_env(env) if "mooncake" in backends else env, workdir / "sglang-rig.log")
            stack.callback(rig.close)
            geometry = {"page": args.page, "layers": args.layers, "heads": args.heads, "head_dim": args.head_dim,
                        "dtype": args.dtype, "layout": args.layout, "device_tokens": 4 * args.page,
                        "host_tokens": 2 * args.pages * args.page + 4 * args.page, "model": "bench/smollm2-135m"}  # fmt: skip
            specs = {
                "polarkv": {"backend": "polarkv", "extra": {"socket": str(engine), "timeout": 60.0}},
                "file": {"backend": "file", "path": str(filedir), "extra": {"enable_metadata_cache": True}},
                "mooncake": {"backend": "mooncake", "extra": mooncake_extra or {}},
            }
            for b in list(backends):
                try:
                    page_bytes = rig.send("stack", name=b, spec={**geometry, **specs[b]})["page_bytes"]
                    res["geometry"]["page_bytes"] = page_bytes
                except RuntimeError as e:
                    backends.remove(b)
                    res["backends"].setdefault(b, {})["not_available"] = str(e)
            prog.step("warming up (each thread's first call attaches)")
            for i, b in enumerate(backends):
                rig.send("write", name=b, seed=900 + i, pages=2)
                rig.send("read", name=b, seed=900 + i, pages=2)
            samples: dict[str, list[dict[str, float]]] = {b: [] for b in backends}
            for r in range(args.rounds):
                order = backends[r % len(backends) :] + backends[: r % len(backends)]
                prog.step(f"round {r + 1}: {' -> '.join(order)}, {args.pages} pages each")
                for b in order:
                    seed = 1000 * (r + 1) + BACKENDS.index(b)
                    c0 = _cpu(servers[b])
                    w = rig.send("write", name=b, seed=seed, pages=args.pages)
                    c1 = _cpu(servers[b])
                    g = rig.send("read", name=b, seed=seed, pages=args.pages)
                    c2 = _cpu(servers[b])
                    samples[b].append(
                        {
                            "stored": w["stored_tokens"] // args.page, "set_s": w["seconds"],
                            "set_cpu": w["cpu_seconds"] + c1 - c0, "loaded": g["loaded_tokens"] // args.page,
                            "match": g["match"], "query_s": g["query_seconds"], "get_s": g["transfer_seconds"],
                            "get_cpu": g["cpu_seconds"] + c2 - c1,
                        }
                    )  # fmt: skip
            prog.step("batch_exists of 64 stored keys, and the socket round trip")
            for b in backends:
                t = rig.send("exists_timing", name=b, seed=1000 + BACKENDS.index(b), pages=args.pages)
                samples[b].append(
                    {"exists64_s": t["exists_p50_s"], "exists64_hits": t["hits"], "ping_s": t["ping_p50_s"]}
                )
            for b in backends:
                res["backends"].setdefault(b, {}).update(_summary(samples[b], args.pages, page_bytes))
    finally:
        prog.close()
        shutil.rmtree(filedir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    bk = res["backends"]
    pk = bk.get("polarkv", {})
    res["get_vs_file"] = ratio(pk.get("get_gbps"), bk.get("file", {}).get("get_gbps"))
    res["get_vs_mooncake"] = ratio(pk.get("get_gbps"), bk.get("mooncake", {}).get("get_gbps"))
    res["set_vs_file"] = ratio(pk.get("set_gbps"), bk.get("file", {}).get("set_gbps"))
    res["set_vs_mooncake"] = ratio(pk.get("set_gbps"), bk.get("mooncake", {}).get("set_gbps"))
    res["rtt_p50_us"] = pk.get("rtt_p50_us")
    res["exists_p50_vs_rtt"] = ratio(pk.get("exists64_p50_us"), pk.get("rtt_p50_us"))
    res["bars"] = {
        "get_vs_file >= 1.5": _holds(res["get_vs_file"], BARS["get_vs_file"], True),
        "get_vs_mooncake >= 2": _holds(res["get_vs_mooncake"], BARS["get_vs_mooncake"], True),
        "exists_p50_vs_rtt <= 1.5": _holds(res["exists_p50_vs_rtt"], BARS["exists_p50_vs_rtt"], False),
    }
    res["mooncake_mode"] = args.mooncake_mode
    return res


def _holds(value: float | None, bar: float, at_least: bool) -> bool | None:
    if value is None:
        return None
    return value >= bar if at_least else value <= bar


def _summary(samples: list[dict[str, float]], pages: int, page_bytes: int) -> dict[str, Any]:
    rounds = [s for s in samples if "set_s" in s]
    timing = next(s for s in samples if "exists64_s" in s)
    gb = pages * page_bytes / 1e9
    set_s, get_s = median([s["set_s"] for s in rounds]), median([s["get_s"] for s in rounds])
    return {
        "rounds_all_pages": all(s["stored"] == pages and s["loaded"] == pages for s in rounds),
        "bytes_identical": all(bool(s["match"]) for s in rounds),
        "set_pages_s": pages / set_s,
        "set_gbps": gb / set_s,
        "get_pages_s": pages / get_s,
        "get_gbps": gb / get_s,
        "hit_query_ms": median([s["query_s"] for s in rounds]) * 1e3,
        "exists64_p50_us": timing["exists64_s"] * 1e6,
        "exists64_hits": timing["exists64_hits"],
        "rtt_p50_us": timing["ping_s"] * 1e6 if timing["ping_s"] is not None else None,
        "cpu_s_per_gb_set": median([s["set_cpu"] for s in rounds]) / gb,
        "cpu_s_per_gb_get": median([s["get_cpu"] for s in rounds]) / gb,
        "set_s": [round(s["set_s"], 4) for s in rounds],
        "get_s": [round(s["get_s"], 4) for s in rounds],
    }


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(res: dict[str, Any]) -> str:
    g = res["geometry"]
    head = (
        f"SGLang HiCache storage, {res['pages']} pages of {g['page_tokens']} tokens ({g['page_bytes'] / 1e6:.2f} MB: "
        f"{g['layers']} layers x {g['kv_heads']} KV heads x {g['head_dim']}, {g['dtype']}, {g['layout']}) per round, "
        f"{res['rounds']} rounds, medians"
    )
    rows = []
    notes = []
    for name in BACKENDS:
        b = res["backends"].get(name)
        if b is None:
            continue
        if "not_available" in b:
            notes.append(f"{name}: not available: {b['not_available']}")
            continue
        rows.append(
            (
                name, f"{b['set_pages_s']:.0f}", f"{b['set_gbps']:.2f}", f"{b['get_pages_s']:.0f}", f"{b['get_gbps']:.2f}",
                f"{b['hit_query_ms']:.2f}", f"{b['exists64_p50_us']:.0f}", f"{b['cpu_s_per_gb_set']:.2f}",
                f"{b['cpu_s_per_gb_get']:.2f}", "yes" if b["bytes_identical"] and b["rounds_all_pages"] else "NO",
            )
        )  # fmt: skip
        if b.get("server"):
            notes.append(f"{name}: {b['server']}")
    out = [head, table(rows, ("backend", "set pages/s", "set GB/s", "get pages/s", "get GB/s", "hit query ms",
                              "exists(64) us", "CPU s/GB set", "CPU s/GB get", "bytes ok"))]  # fmt: skip
    out.append(
        f"get vs file {_f(res['get_vs_file'], '.2f')}x (bar >= 1.5), get vs mooncake {_f(res['get_vs_mooncake'], '.2f')}x "
        f"(bar >= 2), batch_exists(64) p50 / socket round trip p50 ({_f(res['rtt_p50_us'], '.0f')} us) "
        f"{_f(res['exists_p50_vs_rtt'], '.2f')} (bar <= 1.5)"
    )
    out += notes
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    return bench_main("sglang", args, run, render)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(main(p.parse_args()))
