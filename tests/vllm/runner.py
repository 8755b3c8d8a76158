"""A vLLM engine in its own process, driven by a test over stdin/stdout.

Run from the repository root as `python -m tests.vllm.runner SPEC`, SPEC being JSON:
  {"model": DIR, "connector": {kv_connector_extra_config} or null (no connector), "engine": {LLM kwargs}}
The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the test), so the worker-side
connector is reachable here (fault hooks, counters). Commands arrive on stdin, one JSON object a line:
  {"op": "generate", "prompts": [{"ids": [...], "salt": str|null}], "max_tokens": n, "pause_after": k}
      greedy generation through LLMEngine.step(); with pause_after, after k steps it reports "paused"
      and waits for any line on stdin before going on.
  {"op": "hook", "kind": "evict", "control": SOCKET, "bytes": n}  before the next connector load, evict
      n bytes from the daemon's DRAM tier (between the scheduler's lookup and the worker's load)
  {"op": "hook", "kind": "kill", "pid": PID}  before the next connector load, SIGKILL the daemon
  {"op": "stats"}  the worker-side connector's counters
  {"op": "quit"}
Every reply is one stdout line "@@polarkv <json>"; everything else on stdout/stderr is vLLM's log.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

MARK = "@@polarkv "


def _say(event: str, **kw: Any) -> None:
    sys.stdout.write(MARK + json.dumps({"event": event, **kw}) + "\n")
    sys.stdout.flush()


def _wait_dead(pid: int, timeout: float = 10.0) -> None:
    """Until `pid` has exited (a zombie of another parent counts: its sockets are closed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.01)


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kw: dict[str, Any] = {
        "model": spec["model"],
        "enforce_eager": True,
        "dtype": "float32",
        "max_model_len": 4096,
        "seed": 0,
    }
    kw.update(spec.get("engine", {}))
    if "kv_events_config" in kw:  # vLLM's KV event publisher (a dict here, its config class there)
        from vllm.config import KVEventsConfig

        kw["kv_events_config"] = KVEventsConfig(**kw["kv_events_config"])
    if spec.get("connector") is not None:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="PolarKVConnector",
            kv_connector_module_path="polarkvd.connectors.vllm",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config=spec["connector"],
        )
    t0 = time.monotonic()
    llm = LLM(**kw)
    engine = llm.llm_engine
    connector = None
    if spec.get("connector") is not None:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        connector = get_kv_transfer_group()
    _say("ready", seconds=time.monotonic() - t0)
    counter = 0
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        if op == "stats":
            sched = getattr(
                getattr(getattr(engine, "engine_core", None), "engine_core", None), "scheduler", None
            )
            sched_connector = getattr(sched, "connector", None)
            _say(
                "stats",
                worker=connector.stats if connector else {},
                scheduler=sched_connector.stats if sched_connector else {},
            )
        elif op == "reset_prefix_cache":
            _say("reset", ok=bool(llm.reset_prefix_cache()))
        elif op == "hook":
            assert connector is not None and connector.worker is not None
            connector.worker.before_load = _make_hook(cmd, connector)
            _say("hooked")
        elif op == "generate":
            params = SamplingParams(temperature=0.0, max_tokens=cmd["max_tokens"], ignore_eos=True)
            ids: list[str] = []
            start: dict[str, float] = {}
            for p in cmd["prompts"]:
                counter += 1
                rid = f"r{counter}"
                prompt: dict[str, Any] = {"prompt_token_ids": p["ids"]}
                if p.get("salt") is not None:
                    prompt["cache_salt"] = p["salt"]
                start[rid] = time.perf_counter()
                engine.add_request(rid, prompt, params)
                ids.append(rid)
            results: dict[str, dict[str, Any]] = {}
            steps = 0
            t1 = time.perf_counter()
            while engine.has_unfinished_requests():
                outs = engine.step()
                steps += 1
                now = time.perf_counter()
                for o in outs:
                    r = results.setdefault(o.request_id, {})
                    if o.outputs and o.outputs[0].token_ids and "ttft" not in r:
                        r["ttft"] = now - start[o.request_id]
                        r["first_step"] = steps  # the engine step that gave its first token
                    if o.finished:
                        r["ids"] = list(o.outputs[0].token_ids)
                        r["cached"] = o.num_cached_tokens
                if cmd.get("pause_after") == steps:
                    _say("paused", steps=steps)
                    sys.stdin.readline()
            _say("generated", results=[results[r] for r in ids], seconds=time.perf_counter() - t1)
        else:
            _say("error", message=f"unknown op {op!r}")
    _say("bye")


def _make_hook(cmd: dict[str, Any], connector: Any) -> Any:
    kind = cmd.get("kind")
    if kind is None:
        return None

    def hook(loads: list[Any]) -> None:
        connector.worker.before_load = None  # once
        if kind == "evict":
            from polarkvd.client import ControlClient

            with ControlClient(cmd["control"], timeout=30) as c:
                freed = c.evict("dram", cmd["bytes"])
            sys.stderr.write(f"[runner] evicted {freed} bytes before a load of {len(loads)} request(s)\n")
        elif kind == "kill":
            os.kill(cmd["pid"], signal.SIGKILL)
            _wait_dead(cmd["pid"])
            sys.stderr.write(f"[runner] killed the daemon before a load of {len(loads)} request(s)\n")

    return hook


if __name__ == "__main__":
    main()
