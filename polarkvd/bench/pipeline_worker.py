"""`polarkvd bench pipeline`'s engine side: one vLLM process per `load_mode`, started by the parent
as `python -m polarkvd.bench.pipeline_worker SPEC`, serving the parent's requests one at a time
(bench/pipeline.py says what is measured). Only this process imports vLLM."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from polarkvd.bench.harness import (
    busy_cpu_s,
    event_writer,
    observe_external_tokens,
    own_cpu_s,
    run_request,
)
from polarkvd.bench.pipeline import BLOCK, MARK, BenchError


def processes_cpu_s(pids: list[int]) -> float:
    """CPU seconds these processes have used so far, all their threads (utime + stime)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def worker_main(spec_path: str) -> int:
    """One load_mode in this (fresh) process: start vLLM, then serve the parent's requests one at a time.

    Commands are JSON lines on stdin (`{"op": "serve", "suffix": i}`, `{"op": "quit"}`); answers are
    MARK lines on stdout. The parent places the pages and checks where they came from.
    """
    spec = json.loads(Path(spec_path).read_text())
    wl = spec["workload"]
    prefix, suffixes = wl["prefix"], wl["suffixes"]

    say = event_writer(MARK)

    t_import = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        enforce_eager=True,
        dtype="float32",
        seed=0,
        max_model_len=spec["max_model_len"],
        max_num_batched_tokens=spec["max_num_batched_tokens"],  # >= every prompt: no chunked prefill
        num_gpu_blocks_override=spec["kv_blocks"],
        enable_prefix_caching=True,
        kv_transfer_config=KVTransferConfig(
            kv_connector="PolarKVConnector",
            kv_connector_module_path="polarkvd.connectors.vllm",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            # loads in the step, pipelined or not: what this bench compares (not asynchronous loads)
            kv_connector_extra_config={
                "socket": spec["b_engine"],
                "load_mode": spec["load_mode"],
                "async_loads": False,
            },
        ),
    )
    engine = llm.llm_engine
    connector: Any = get_kv_transfer_group()  # our PolarKVConnector: its `stats` and `geometry`
    # tokens the scheduler-side connector promised (beyond vLLM's own cache), as in bench chat
    external = observe_external_tokens(engine)
    if external is None:
        raise BenchError("cannot reach vLLM's scheduler-side connector (in-process engine core expected)")
    # How long the model's thread waits for loaded KV: in start_load_kv (step mode: the whole load
    # and copy) and in wait_for_layer_load (layer mode: until layer i is copied). vLLM calls both
    # on the worker-side connector object, so wrapping them there sees every call.
    blocked = {"start": 0.0, "layers": 0.0, "first": 0.0, "calls": 0}
    start_load, wait_layer = connector.start_load_kv, connector.wait_for_layer_load

    def timed_start_load(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return start_load(*a, **kw)
        finally:
            blocked["start"] += time.perf_counter() - t
            blocked["calls"] = 0

    def timed_wait_layer(layer_name: str) -> Any:
        t = time.perf_counter()
        try:
            return wait_layer(layer_name)
        finally:
            dt = time.perf_counter() - t
            blocked["layers"] += dt
            if blocked["calls"] == 0:
                blocked["first"] += dt
            blocked["calls"] += 1

    connector.start_load_kv = timed_start_load
    connector.wait_for_layer_load = timed_wait_layer
    params = SamplingParams(temperature=0.0, max_tokens=spec["answer"], ignore_eos=True)
    daemon_pids = spec["daemon_pids"]
    counter = 0

    def serve(ids: list[int]) -> dict[str, Any]:
        """One request with vLLM's own prefix cache emptied first; TTFT through the step loop."""
        nonlocal counter
        counter += 1
        rid = f"req-{counter}"
        if not engine.reset_prefix_cache():
            raise BenchError("vLLM's prefix cache did not reset")
        before = dict(connector.stats)
        external.clear()
        blocked.update(start=0.0, layers=0.0, first=0.0, calls=0)
        cpu0, own0, daemons0 = busy_cpu_s(), own_cpu_s(), processes_cpu_s(daemon_pids)
        ttft, latency, final = run_request(engine, rid, ids, params)
        own = own_cpu_s() - own0
        daemons = processes_cpu_s(daemon_pids) - daemons0
        foreign = max(0.0, busy_cpu_s() - cpu0 - own - daemons)
        after = dict(connector.stats)
        d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        return {
            "prompt_tokens": len(ids),
            "cached_tokens": int(final.num_cached_tokens or 0),
            "external_tokens": external.pop("current", 0),
            "ttft_s": ttft,
            "latency_s": latency,
            "output_ids": list(final.outputs[0].token_ids),
            "loaded_tokens": int(d.get("load_blocks", 0)) * BLOCK,
            "load_failed_blocks": int(d.get("load_failed_blocks", 0)),
            # the worker's load call (pipelined: returns at once), and arena -> KV tensors (layer mode:
            # the copy thread's time, waits for arriving layers included)
            "load_rpc_s": d.get("daemon_load_seconds", 0.0),
            "load_copy_s": d.get("load_copy_seconds", 0.0),
            # the model thread blocked on loads: start_load_kv plus every wait_for_layer_load
            "blocked_s": blocked["start"] + blocked["layers"],
            "first_layer_wait_s": blocked["first"],
            "cpu_s": own,
            "daemons_cpu_s": daemons,  # A and B together
            "others_cpu_s": foreign,  # every other process on the machine meanwhile (noise)
        }

    ns = connector.geometry.namespace("", 0)
    # vLLM binds its OpenMP threads, this thread among them; the connector's copy thread inherits this mask
    cpus = sorted(os.sched_getaffinity(0))
    say("ready", import_s=t0 - t_import, start_s=time.perf_counter() - t0, namespace=ns.to_wire(), cpus=cpus)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        say("served", **serve(prefix + suffixes[cmd["suffix"]]))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
