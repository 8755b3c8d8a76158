"""`polarkvd bench policy --real`: the eviction policies behind a real engine, TTFT side by side.

A small version of bench policy's mixed trace (chat users resending their growing history, RAG
questions behind shared documents, questions about three long documents, interleaved) replayed by
vLLM CPU with SmolLM2-135M (float32) through the PolarKVConnector, once per policy, each with a
private daemon (a fresh DRAM and disk tier, DRAM and disk under the same policy) and a fresh engine
process, the same requests in the same order. vLLM's own prefix cache is off, so every reused token
comes from the daemon: a hit's pages are loaded from DRAM or disk, the rest is computed. The tiers
hold about half of what the trace reuses (DRAM a little more than the longest prompt, the rest
disk), as in the simulated bench. Reported per policy: TTFT (mean, p50, sum), prompt tokens the
engine computed, the daemon's bytes demoted and pages dropped; and whether every policy generated the
same tokens (it must: a policy decides what is kept, never what is answered).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from polarkvd.bench.harness import (
    count_cpus,
    cpu_bind,
    mean_percentiles,
    private_daemon,
    run_request,
    vllm_env,
)

PAGE_TOKENS = 128  # vLLM CPU's block, one page of the connector
MAX_TOKENS = 4  # tokens generated per request: the TTFT is the point
ENGINE_TIMEOUT_S = 900


def small_mixed(seed: int, per_kind: int) -> list[list[int]]:
    """`per_kind` requests each of chat, RAG and long-document QA, interleaved (token ids within
    SmolLM2's vocabulary, no two pages alike unless they are the same prefix)."""
    rng = random.Random(seed)
    nxt = [0]

    def take(n: int) -> list[int]:
        out = [1000 + (nxt[0] + i) % 40_000 for i in range(n)]
        nxt[0] += n
        return out

    def zipf(n: int, s: float) -> int:
        return rng.choices(range(n), [1 / (i + 1) ** s for i in range(n)])[0]

    system = take(128)
    users = [system + take(rng.randint(128, 256)) for _ in range(4)]
    rag_system = take(128)
    docs = [take(rng.randint(256, 640)) for _ in range(8)]
    long_docs = [take(rng.randint(768, 1280)) for _ in range(3)]
    out = []
    for _ in range(per_kind):
        u = zipf(len(users), 1.1)
        users[u] = users[u] + take(rng.randint(32, 96))
        out.append(list(users[u]))
        out.append(rag_system + docs[zipf(len(docs), 1.1)] + take(rng.randint(16, 48)))
        out.append(long_docs[zipf(len(long_docs), 0.8)] + take(rng.randint(16, 48)))
    return out


def tier_pages(prompts: list[list[int]]) -> tuple[int, int, int]:
    """(pages reused, DRAM pages, disk pages): the tiers hold half of the reused pages, DRAM at
    least 1.25x the longest prompt."""
    seen: dict[tuple[int, ...], int] = {}
    for p in prompts:
        for i in range(1, len(p) // PAGE_TOKENS + 1):
            key = tuple(p[: i * PAGE_TOKENS])
            seen[key] = seen.get(key, 0) + 1
    reused = sum(1 for n in seen.values() if n > 1)
    longest = max(len(p) for p in prompts) // PAGE_TOKENS
    dram = max(math.ceil(1.25 * longest), math.ceil(reused / 2 / 5))
    disk = max(math.ceil(reused / 2) - dram, math.ceil(reused / 10))
    return reused, dram, disk


def worker_main(spec_path: str) -> int:
    """One policy's engine: every request of the trace in order, alone, TTFT timed; results to a file."""
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    llm = LLM(
        model=spec["model"], enforce_eager=True, dtype="float32", seed=0, max_model_len=4096,
        max_num_batched_tokens=2048, block_size=PAGE_TOKENS, enable_prefix_caching=False,
        kv_transfer_config=KVTransferConfig(
            kv_connector="PolarKVConnector", kv_connector_module_path="polarkvd.connectors.vllm",
            kv_role="kv_both", kv_load_failure_policy="recompute",
            kv_connector_extra_config={"socket": spec["socket"]},
        ),
    )  # fmt: skip
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    run_request(engine, "warmup", [7] * 300, params)  # first-request costs out of the measurement
    out = []
    for i, ids in enumerate(spec["prompts"]):
        ttft, _, final = run_request(engine, f"r{i}", ids, params)
        out.append({"ttft_s": ttft, "prompt_tokens": len(ids), "cached_tokens": int(final.num_cached_tokens or 0),
                    "output_ids": list(final.outputs[0].token_ids)})  # fmt: skip
    Path(spec["out"]).write_text(json.dumps(out))
    return 0


def _daemon_sets(policy: str, dram_pages: int, disk_pages: int, page_bytes: int) -> dict[str, str]:
    slab = -(-page_bytes // (1 << 20)) << 20  # a page a slab: DRAM holds exactly `dram_pages`
    return {
        "dram.capacity": str(dram_pages * slab), "dram.slab_bytes": str(slab),
        "dram.high_watermark": "1.0", "dram.policy": policy,
        "disk.capacity": str(disk_pages * (page_bytes + 4096)), "disk.policy": policy,
    }  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    from polarkvd.bench.harness import model_kv_bytes_per_token
    from polarkvd.client import ControlClient
    from polarkvd.models import ensure_smollm2

    model_dir = str(ensure_smollm2())
    prompts = small_mixed(args.seed, args.real_requests)
    reused, dram, disk = tier_pages(prompts)
    page_bytes = model_kv_bytes_per_token(model_dir) * PAGE_TOKENS
    bind = cpu_bind()
    env = vllm_env(bind, count_cpus(bind))
    res: dict[str, Any] = {"model": "SmolLM2-135M-Instruct float32, vLLM CPU", "requests": len(prompts),
                           "pages": {"reused": reused, "dram": dram, "disk": disk}, "policies": {}}  # fmt: skip
    outputs: dict[str, list[list[int]]] = {}
    for policy in args.policies:
        print(f"[bench policy --real] {policy}: {len(prompts)} requests, DRAM {dram} pages, disk {disk}",
              file=sys.stderr)  # fmt: skip
        with private_daemon(_daemon_sets(policy, dram, disk, page_bytes), keep=False) as (sock, control):
            work = Path(sock).parent
            spec = {
                "model": model_dir,
                "socket": str(sock),
                "prompts": prompts,
                "out": str(work / "out.json"),
            }
            (work / "spec.json").write_text(json.dumps(spec))
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "polarkvd.bench.policy_real", str(work / "spec.json")],
                env=env, capture_output=True, timeout=ENGINE_TIMEOUT_S,
            )  # fmt: skip
            if proc.returncode != 0 or not (work / "out.json").exists():
                tail = proc.stderr.decode(errors="replace")[-2000:]
                raise RuntimeError(f"{policy}: the vLLM worker failed (exit {proc.returncode}): {tail}")
            got = json.loads((work / "out.json").read_text())
            with ControlClient(control) as c:
                counters = c.stats()["counters"]
        outputs[policy] = [r["output_ids"] for r in got]
        ttfts = [r["ttft_s"] for r in got]
        res["policies"][policy] = {
            "ttft_s": mean_percentiles(ttfts),
            "ttft_sum_s": sum(ttfts),
            "computed_tokens": sum(r["prompt_tokens"] - r["cached_tokens"] for r in got),
            "prompt_tokens": sum(r["prompt_tokens"] for r in got),
            "demoted_bytes": counters.get("demoted_bytes", 0),
            "dropped_pages": counters.get("dropped_pages_cheap", 0),
            "wall_s": time.perf_counter() - t0,
        }
    first = next(iter(outputs.values()), [])
    res["outputs_identical"] = all(o == first for o in outputs.values())
    base = res["policies"].get("lru", {}).get("ttft_sum_s")
    for r in res["policies"].values():
        r["ttft_sum_vs_lru"] = r["ttft_sum_s"] / base if base else None
    return res


HEAD = [
    "policy",
    "TTFT mean s",
    "p50 s",
    "sum s",
    "sum vs lru",
    "computed / prompt tokens",
    "MiB demoted",
    "dropped",
]


def render(res: dict[str, Any]) -> str:
    from polarkvd.bench.harness import fmt, table

    rows = [
        [p, fmt(r["ttft_s"]["mean"]), fmt(r["ttft_s"]["p50"]), fmt(r["ttft_sum_s"], 1), fmt(r["ttft_sum_vs_lru"]),
         f"{r['computed_tokens']:,} / {r['prompt_tokens']:,}", f"{r['demoted_bytes'] / 2**20:,.0f}",
         str(r["dropped_pages"])]
        for p, r in res["policies"].items()
    ]  # fmt: skip
    pages = res["pages"]
    return (
        f"bench policy --real: {res['model']}, {res['requests']} requests; pages reused {pages['reused']}, "
        f"DRAM {pages['dram']}, disk {pages['disk']}\n"
        + table(rows, HEAD)
        + f"\noutputs identical across policies: {res['outputs_identical']}\n"
    )


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
