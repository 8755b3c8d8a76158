"""`polarkvd bench mixed`: what a hit on disk costs the requests that are decoding meanwhile.

Real vLLM (offline `LLMEngine`, in-process engine core, vLLM's own prefix cache off so every hit is
polarkvd's) with a private daemon whose disk tier holds a long document's pages and whose DRAM does
not (they are evicted there before each measured hit). `--decoders` requests decode steadily; once
each has `--warmup` tokens, a request whose prefix is the document arrives, and the engine steps on
until it has its first token. Recorded per engine step: its wall time, which requests got a token.

Three scenarios, each in a fresh vLLM process, the same requests:
  disk, async   the hit's pages on disk, the connector's asynchronous loads on (the default): vLLM
                holds the request while a connector thread has the daemon promote its pages and
                copies them in; the decoders' steps go on
  disk, sync    the same, `async_loads` off: the load happens inside the step that schedules the hit
  dram          the hit's pages in DRAM (a memory copy, always in the step): the step that schedules
                the hit costs its prefill and copy only, the reference for the two above

Inter-token latency (ITL) of the decoders = the wall time of a step in which they all got a token.
"usual" is the median of the steady half of the steps before the hit arrives (the later half);
"during the load" is every step from the hit's arrival to the step that gives its first token, that
step excluded (async: the steps the load overlaps; sync
and dram: none, the load is inside the hit's step); "hit's step" is that last step (its prefill of the
new tokens, plus the load where it is synchronous). The bar: the decoders' ITL during the load <= 1.2x
usual (async). Outputs are checked identical across the three scenarios.

Where the CPU went (`CpuWatch`, the kernel's per-thread accounting, steadier than the slowest step on
a shared machine): the CPU a step the load took beside the model (the daemon's threads and the
connector's loading thread, over what they used before the hit), and how long a step the engine's
main thread waited for a CPU, before and during the load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from polarkvd.bench import plots
from polarkvd.bench.harness import (
    bench_main,
    count_cpus,
    cpu_bind,
    event_writer,
    fmt,
    kill_group,
    median,
    private_daemon,
    ratio,
    table,
    vllm_env,
)
from polarkvd.progress import Progress

MARK = "@@mixed "
SCENARIOS = ("disk_async", "disk_sync", "dram")
LABELS = {"disk_async": "disk hit, async loads", "disk_sync": "disk hit, sync loads", "dram": "DRAM hit"}
BAR_ITL_DURING_LOAD = 1.2  # async: the decoders' ITL during the load / their usual ITL


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--document", type=int, default=3000, metavar="TOKENS",
                   help="tokens of the document whose pages are on disk (default 3000)")  # fmt: skip
    p.add_argument("--decoders", type=int, default=3, help="requests decoding meanwhile (default 3)")
    p.add_argument("--warmup", type=int, default=12, metavar="TOKENS",
                   help="tokens each decoder has before the hit arrives (default 12)")  # fmt: skip
    p.add_argument("--block-size", type=int, default=128, help="vLLM's block size (default 128)")
    p.add_argument("--step-bytes", type=int, default=None, metavar="BYTES",
                   help="the connector's async_load_step_bytes (default: its own, 16 MiB)")  # fmt: skip
    p.add_argument("--cpus", default="", help="VLLM_CPU_OMP_THREADS_BIND (default: every CPU)")
    p.add_argument("--model", default="", help="model directory (default: the converted SmolLM2-135M)")
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    plots.add_plot_arguments(p)


# ------------------------------------------------------------------------------ the vLLM process


def worker_main(spec_path: str) -> int:
    """One scenario in this process: start vLLM, store the document, place its pages, measure."""
    spec = json.loads(Path(spec_path).read_text())
    say = event_writer(MARK)
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    from polarkvd.client import ControlClient

    llm = LLM(
        model=spec["model"],
        enforce_eager=True,
        dtype="float32",
        seed=0,
        block_size=spec["block_size"],
        max_model_len=spec["max_model_len"],
        max_num_batched_tokens=spec["max_model_len"],  # no prompt chunked
        num_gpu_blocks_override=spec["kv_blocks"],
        enable_prefix_caching=False,  # every hit is the connector's
        kv_transfer_config=KVTransferConfig(
            kv_connector="PolarKVConnector",
            kv_connector_module_path="polarkvd.connectors.vllm",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={
                "socket": spec["engine"],
                "async_loads": spec["async_loads"],
                **({"async_load_step_bytes": spec["step_bytes"]} if spec["step_bytes"] is not None else {}),
            },
        ),
    )
    engine: Any = llm.llm_engine
    connector: Any = get_kv_transfer_group()  # our PolarKVConnector (worker side): its `stats`
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    hit_params = SamplingParams(temperature=0.0, max_tokens=spec["hit_tokens"], ignore_eos=True)
    long = SamplingParams(temperature=0.0, max_tokens=spec["decode_tokens"], ignore_eos=True)

    def drain() -> None:
        while engine.has_unfinished_requests():
            engine.step()

    engine.add_request("warm", {"prompt_token_ids": spec["warm"]}, one)
    drain()
    engine.add_request("store", {"prompt_token_ids": spec["document"]}, one)  # its pages to the daemon
    drain()
    want = len(spec["document"]) // spec["block_size"]  # the document's full pages
    with ControlClient(spec["control"], timeout=60) as c:
        if spec["place"] == "disk":
            c.evict("dram", 1 << 40)  # every DRAM page goes, demoted to disk
        deadline = time.monotonic() + 120
        while True:  # the disk tier writes in the background: wait until every page is there
            disk = c.stats()["tiers"]["disk"]
            if disk["pending_pages"] == 0 and (disk["pages"] >= want or spec["place"] != "disk"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the document's pages did not reach the disk tier: {disk}")
            time.sleep(0.05)
        disk_pages = disk["pages"]
        daemon_pid = c.stats()["process"]["pid"]

    decoders = [f"d{i}" for i in range(len(spec["decoders"]))]
    for rid, ids in zip(decoders, spec["decoders"]):
        engine.add_request(rid, {"prompt_token_ids": ids}, long)
    tokens = dict.fromkeys(decoders, 0)
    steps: list[dict[str, Any]] = []  # per step: seconds, decoders that got a token, phase
    outputs: dict[str, list[int]] = {}
    phase = "before"
    hit_added = hit_first = None
    cpu = CpuWatch(daemon_pid)
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        if phase == "before" and min(tokens.values()) >= spec["warmup"]:
            cpu.mark("arrival", len(steps))
            engine.add_request("hit", {"prompt_token_ids": spec["hit"]}, hit_params)
            hit_added, phase = time.perf_counter(), "loading"
            t = time.perf_counter()  # the arrival starts a step interval of its own
        outs = engine.step()
        now = time.perf_counter()
        got = [o.request_id for o in outs if o.request_id in tokens and o.outputs]
        hit_token = any(o.request_id == "hit" and o.outputs and o.outputs[0].token_ids for o in outs)
        for o in outs:
            if o.request_id in tokens and o.outputs:
                tokens[o.request_id] = len(o.outputs[0].token_ids)
            if o.finished:
                outputs[o.request_id] = list(o.outputs[0].token_ids)
        if hit_token and hit_first is None:
            hit_first, phase = now, "hit_step"
        steps.append({"s": now - t, "decoders": len(got), "phase": phase})
        if phase == "hit_step":
            phase = "after"
        t = now
        if (phase == "before" and len(steps) == 1 + spec["warmup"] // 2) or phase == "loading":  # as `usual`
            cpu.mark("from" if phase == "before" else "loaded", len(steps))
            t = time.perf_counter()  # a mark is not part of the next step
        if phase == "after" and "hit" in outputs:
            for rid in decoders:
                if rid not in outputs:
                    engine.abort_request([rid])
            drain()
            break
    assert hit_added is not None and hit_first is not None, "the hit request never got a token"
    with ControlClient(spec["control"], timeout=60) as c:
        counters = c.stats()["counters"]
    say(
        "result",
        steps=steps,
        hit_ttft_s=hit_first - hit_added,
        hit_ids=outputs.get("hit", []),
        disk_pages=disk_pages,
        loaded_pages_disk=counters.get("loaded_pages_disk", 0),
        worker=dict(connector.stats),
        cpu=cpu.windows(),
        scheduler=dict(engine.engine_core.engine_core.scheduler.connector.stats),
    )
    return 0


class CpuWatch:
    """Where the CPU went, from the kernel's per-thread accounting (/proc/PID/task/TID/schedstat:
    nanoseconds on a CPU, nanoseconds runnable but waiting for one): the daemon's threads, the
    connector's loading thread, and the engine's main thread (the one that runs each step's Python
    and is preempted when the load takes its CPU). Marks: "from" (where `usual`'s steady half begins),
    "arrival" (the hit arrives), "loaded" (after each step of the load; the last one counts).
    About 0.1 ms a mark, outside the steps' times."""

    def __init__(self, daemon_pid: int) -> None:
        import threading

        self.daemon_pid = daemon_pid
        self.loader = next((t.native_id for t in threading.enumerate() if t.name == "polarkv-bg-load"), None)
        self.marks: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {}

    def _read(self) -> dict[str, tuple[int, int]]:
        def stat(path: str) -> tuple[int, int]:
            try:
                with open(path) as f:
                    run, wait, _ = f.read().split()
                return int(run), int(wait)
            except (OSError, ValueError):  # a thread that ended
                return 0, 0

        me, d = os.getpid(), self.daemon_pid
        out = {"main": stat(f"/proc/{me}/task/{me}/schedstat")}
        if self.loader is not None:
            out["loader"] = stat(f"/proc/{me}/task/{self.loader}/schedstat")
        try:
            tids = os.listdir(f"/proc/{d}/task")
        except OSError:
            tids = []
        runs = [stat(f"/proc/{d}/task/{tid}/schedstat") for tid in tids]
        out["daemon"] = (sum(r for r, _ in runs), sum(w for _, w in runs))
        return out

    def mark(self, name: str, step: int) -> None:
        self.marks[name] = (step, self._read())

    def windows(self) -> dict[str, dict[str, float]]:
        """Per window ("before": from → arrival, "loading": arrival → loaded), milliseconds a step:
        the daemon's and the loader's CPU, the main thread's CPU and its wait for a CPU."""
        out = {}
        for window, (a, b) in {"before": ("from", "arrival"), "loading": ("arrival", "loaded")}.items():
            if a not in self.marks or b not in self.marks or self.marks[b][0] <= self.marks[a][0]:
                continue
            (sa, ta), (sb, tb) = self.marks[a], self.marks[b]
            n = sb - sa
            ms = {
                key: ((tb[key][0] - ta[key][0]) / 1e6 / n, (tb[key][1] - ta[key][1]) / 1e6 / n)
                for key in ta
                if key in tb
            }
            out[window] = {
                "steps": n,
                "daemon_cpu_ms": ms["daemon"][0],
                "loader_cpu_ms": ms.get("loader", (0.0, 0.0))[0],
                "main_cpu_ms": ms["main"][0],
                "main_wait_ms": ms["main"][1],
            }
        return out


# ------------------------------------------------------------------------------ the parent


def summarize(steps: list[dict[str, Any]], decoders: int) -> dict[str, Any]:
    """ITL of the decoders before the hit, during its load, in its step (see the module docstring)."""
    full = [s for s in steps if s["decoders"] == decoders]
    before = [s["s"] for s in full if s["phase"] == "before"][1:]  # the first: their prefill
    # the steady half, right before the hit: the decoders' first steps can be many times longer
    # (1.4 s once on a busy machine), and with 11 steps they moved the median
    usual = median(before[len(before) // 2 :])
    during = [s["s"] for s in full if s["phase"] == "loading"]
    hit_step = [s["s"] for s in steps if s["phase"] == "hit_step"]
    return {
        "usual_itl_s": usual,
        "steps_during_load": len(during),
        "itl_during_load_mean_s": sum(during) / len(during) if during else None,
        "itl_during_load_max_s": max(during) if during else None,
        "hit_step_s": hit_step[0] if hit_step else None,
        # the slowest step during the load against the usual one (the bar), and the mean step
        "itl_during_load_ratio": ratio(max(during), usual) if during else None,
        "itl_during_load_mean_ratio": ratio(sum(during) / len(during), usual) if during else None,
        "hit_step_ratio": ratio(hit_step[0], usual) if hit_step else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from polarkvd.models import ensure_smollm2

    if args.block_size < 32 or args.block_size % 32:
        raise SystemExit("--block-size must be a multiple of 32 (vLLM's CPU attention)")
    if args.step_bytes is not None and args.step_bytes < 0:
        raise SystemExit("--step-bytes must be 0 (not paced) or more")
    model_dir = args.model or str(ensure_smollm2())
    words = list(range(1000, 40000, 7))  # token ids of ordinary words of the vocabulary

    def text(n: int, seed: int) -> list[int]:
        return [words[(seed * 7919 + i * 104729) % len(words)] for i in range(n)]

    document = text(args.document, 1)
    spec_base = {
        "model": model_dir,
        "block_size": args.block_size,
        "warm": text(200, 2),
        "document": document,
        "hit": document + text(32, 3),  # the document, then a new question
        "hit_tokens": 4,
        "decoders": [text(64, 10 + i) for i in range(args.decoders)],
        "decode_tokens": 2000,  # more than the run needs: they are aborted once the hit has its token
        "warmup": args.warmup,
        "max_model_len": args.document + 256,
        "step_bytes": args.step_bytes,
    }
    blocks = (args.decoders * 2200 + args.document + 512) // args.block_size + 4
    spec_base["kv_blocks"] = blocks
    cpus = args.cpus or cpu_bind()
    env = vllm_env(cpus, count_cpus(cpus))
    root = Path(tempfile.mkdtemp(prefix="polarkv-mixed-"))
    results: dict[str, Any] = {}
    sets = {"dram.capacity": "2GiB", "disk.enabled": "true"}
    with Progress(len(SCENARIOS), label="bench mixed") as prog:  # a live bar on a terminal, else lines
        for scenario in SCENARIOS:
            results[scenario] = _scenario(args, scenario, spec_base, sets, env, root, prog)
    ids = {tuple(r["hit_ids"]) for r in results.values()}
    report = {
        "shape": {
            "document": args.document,
            "decoders": args.decoders,
            "block_size": args.block_size,
            "cpus": cpus,
            "step_bytes": args.step_bytes,
        },  # fmt: skip
        "scenarios": results,
        "outputs_identical": len(ids) == 1,
        "bar_itl_during_load": BAR_ITL_DURING_LOAD,
        "run_dir": str(root) if args.keep else None,
    }
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return report


def _scenario(
    args: argparse.Namespace, scenario: str, spec_base: dict[str, Any], sets: dict[str, str],
    env: dict[str, str], root: Path, prog: Progress,
) -> dict[str, Any]:  # fmt: skip
    """One scenario in a fresh vLLM process and a fresh private daemon: its summary and steps."""
    with private_daemon(sets, keep=args.keep) as (engine_sock, control_sock):
        spec = {
            **spec_base,
            "engine": str(engine_sock),
            "control": str(control_sock),
            "place": "dram" if scenario == "dram" else "disk",
            "async_loads": scenario == "disk_async",
        }
        sdir = root / scenario
        (sdir / "tmp").mkdir(parents=True)
        (sdir / "spec.json").write_text(json.dumps(spec))
        log = sdir / "vllm.log"
        prog.step(f"{LABELS[scenario]}: vLLM and a private daemon (log {log})")
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "polarkvd.bench.mixed", "--worker", str(sdir / "spec.json")],
                stdout=out, stderr=subprocess.STDOUT, env={**env, "TMPDIR": str(sdir / "tmp")},
                cwd=str(sdir), start_new_session=True,
            )  # fmt: skip
            try:
                rc = proc.wait(timeout=1800)
            finally:
                kill_group(proc)
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith(MARK)]
        if rc != 0 or not lines:
            tail = "\n".join(log.read_text().splitlines()[-30:])
            raise SystemExit(f"bench mixed: {scenario} failed (exit {rc}); log {log}:\n{tail}")
        res = json.loads(lines[-1][len(MARK) :])
        worker, sched = res["worker"], res["scheduler"]
        return {
            **summarize(res["steps"], args.decoders),
            "hit_ttft_s": res["hit_ttft_s"],
            "hit_ids": res["hit_ids"],
            "disk_pages": res["disk_pages"],
            "loaded_pages_disk": res["loaded_pages_disk"],
            "async_loads": sched.get("async_loads", 0),
            "loaded_blocks": worker.get("load_blocks", 0),
            "load_failed_blocks": worker.get("load_failed_blocks", 0),
            "cpu": res.get("cpu", {}),  # CpuWatch: per window, milliseconds a step
            **load_cpu(res.get("cpu", {})),
            "steps": res["steps"],  # every engine step: its seconds, decoders served, phase (the plot)
        }


def load_cpu(cpu: dict[str, dict[str, float]]) -> dict[str, float | None]:
    """The load's CPU a step beside the model (daemon and loading thread, over their usual), and how
    long a step the engine's main thread waited for a CPU before and during the load."""
    before, during = cpu.get("before"), cpu.get("loading")
    if before is None or during is None:
        return {
            "load_cpu_ms_per_step": None,
            "main_wait_ms_per_step_before": None,
            "main_wait_ms_per_step": None,
        }

    def theirs(w: dict[str, float]) -> float:
        return w["daemon_cpu_ms"] + w["loader_cpu_ms"]

    return {
        "load_cpu_ms_per_step": theirs(during) - theirs(before),
        "main_wait_ms_per_step_before": before["main_wait_ms"],
        "main_wait_ms_per_step": during["main_wait_ms"],
    }


def render(res: dict[str, Any]) -> str:
    rows = []
    for scenario in SCENARIOS:
        r = res["scenarios"][scenario]
        rows.append([
            LABELS[scenario], fmt(r["usual_itl_s"]), str(r["steps_during_load"]),
            f"{fmt(r['itl_during_load_mean_s'])} / {fmt(r['itl_during_load_max_s'])}",
            f"{fmt(r.get('itl_during_load_mean_ratio'), 2)} / {fmt(r['itl_during_load_ratio'], 2)}",
            fmt(r["hit_step_s"]), fmt(r["hit_step_ratio"], 2),
            fmt(r["hit_ttft_s"]),
        ])  # fmt: skip
    head = ["scenario", "usual ITL s", "steps during load", "ITL during load mean / max s",
            "during / usual: mean / max", "hit's step s", "hit's step / usual", "hit TTFT s"]  # fmt: skip
    s = res["shape"]
    a = res["scenarios"].get("disk_async", {})
    cpu = ""
    if a.get("load_cpu_ms_per_step") is not None:
        cpu = (
            f"\ndisk hit, async: the load took {a['load_cpu_ms_per_step']:.2f} ms of CPU a step (daemon and "
            f"loading thread); the engine's main thread waited for a CPU {a['main_wait_ms_per_step']:.2f} ms "
            f"a step during it, {a['main_wait_ms_per_step_before']:.2f} before"
        )
    return (
        f"bench mixed: {s['decoders']} requests decoding, a {s['document']}-token document hit, "
        f"block {s['block_size']}, CPUs {s['cpus']}"
        + (
            f", async loads paced at {s['step_bytes']} bytes a step"
            if s.get("step_bytes") is not None
            else ""
        )
        + "\n"
        + table(rows, head)
        + f"\noutputs identical: {res['outputs_identical']}; bar: async ITL during the load <= "
        f"{res['bar_itl_during_load']}x usual{cpu}\n"
    )


def main(args: argparse.Namespace) -> int:
    return bench_main("mixed", args, run, render)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        sys.exit(worker_main(sys.argv[2]))
    parser = argparse.ArgumentParser(prog="python -m polarkvd.bench.mixed")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
