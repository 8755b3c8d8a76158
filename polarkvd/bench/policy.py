"""`polarkvd bench policy`: eviction policies replayed on the same request traces, side by side.

Each trace is a sequence of prompts (token ids). Every request goes through the real manager with a
real arena (in memory) and a real disk tier (a temporary directory), as an engine would use the
daemon: look the prompt's pages up, load the hit (disk pages are promoted, really read and decoded),
release, store the pages it computed. Only the engine's compute is simulated: a request that misses
`n` tokens after `d` hit tokens costs `a + b*n + c*n*(d + n/2)` seconds (--engine), and the simulated
engine reports those timings to the daemon as the vLLM connector does (the `cost` policy's fit).

Traces (deterministic from --seed; 128-token pages of a small geometry, so that thousands of pages
fit the machine):
  chat   users with Zipf popularity resend their growing history plus a new turn
  rag    shared documents of 1K-8K tokens with Zipf popularity behind short unique questions
  qa     a few documents of 20K-100K tokens asked many short questions
  mixed  the three interleaved, sharing one DRAM and one disk

Reported per trace and policy: prompt tokens recomputed, the simulated prefill seconds, hit rates by
tier, bytes demoted to disk and read back. JSON (--json): `traces[trace][policy]`, and at top level
`mixed_cost_vs_lru` and `mixed_cost_vs_s3fifo` (recomputed prefill seconds, ratio) and
`worst_cost_vs_best_other` (the largest ratio of `cost` to the better of `lru` and `s3fifo` over chat,
rag and qa).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from polarkvd.bench.harness import fmt, ratio, table

POLICY_CHOICES = ("lru", "s3fifo", "cost")
TRACES = ("chat", "rag", "qa", "mixed")
PAGE_TOKENS = 128
#: simulated engines: (fixed s, s per token, s per token per token of depth)
ENGINES = {
    "gpu": (0.01, 5e-5, 1e-9),  # ~20K tokens/s; attention as dear as the rest at a depth of 50K
    "cpu": (0.07, 2.4e-3, 2e-8),  # SmolLM2-135M on 2 cores (docs/BENCHMARKS.md, bench chat)
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.add_argument("--traces", nargs="+", choices=TRACES, default=list(TRACES), metavar="TRACE",
                   help=f"traces to replay (default all: {' '.join(TRACES)})")  # fmt: skip
    p.add_argument("--policies", nargs="+", choices=POLICY_CHOICES, default=list(POLICY_CHOICES),
                   metavar="POLICY", help="eviction policies, of DRAM and disk alike (default lru s3fifo cost)")  # fmt: skip
    p.add_argument("--requests", type=int, default=300, help="requests per trace (mixed: 2x; default 300)")
    p.add_argument("--dram-pages", type=int, default=400, help="DRAM capacity in pages (default 400)")
    p.add_argument("--disk-pages", type=int, default=1600, help="disk capacity in pages (default 1600)")
    p.add_argument("--engine", choices=sorted(ENGINES), default="gpu",
                   help="simulated prefill speed (default gpu)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="trace seed (default 0)")


# ------------------------------------------------------------------------------------------ traces


class _Tokens:
    """Unique token sequences: every call gives tokens no other call gives."""

    def __init__(self) -> None:
        self.next = 1

    def take(self, n: int) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def _zipf(rng: random.Random, n: int, s: float = 1.1) -> int:
    weights = [1 / (i + 1) ** s for i in range(n)]
    return rng.choices(range(n), weights)[0]


def chat_trace(rng: random.Random, tok: _Tokens, requests: int) -> list[list[int]]:
    system = tok.take(1024)
    users = [system + tok.take(rng.randint(200, 2000)) for _ in range(40)]
    out = []
    for _ in range(requests):
        u = _zipf(rng, len(users))
        users[u] = users[u] + tok.take(rng.randint(40, 200))  # a new turn (and the last answer)
        out.append(list(users[u]))
    return out


def rag_trace(rng: random.Random, tok: _Tokens, requests: int) -> list[list[int]]:
    system = tok.take(512)
    docs = [tok.take(rng.randint(1024, 8192)) for _ in range(120)]
    return [system + docs[_zipf(rng, len(docs))] + tok.take(rng.randint(20, 80)) for _ in range(requests)]


def qa_trace(rng: random.Random, tok: _Tokens, requests: int) -> list[list[int]]:
    docs = [tok.take(rng.randint(20_000, 100_000)) for _ in range(4)]
    return [docs[_zipf(rng, len(docs), 0.8)] + tok.take(rng.randint(20, 80)) for _ in range(requests)]


def build_traces(names: list[str], requests: int, seed: int) -> dict[str, list[list[int]]]:
    out: dict[str, list[list[int]]] = {}
    makers = {"chat": chat_trace, "rag": rag_trace, "qa": qa_trace}
    for name in names:
        if name == "mixed":
            rng, tok = random.Random(seed + 99), _Tokens()
            parts = [makers[k](rng, tok, requests * 2 // 3) for k in ("chat", "rag", "qa")]
            mixed = [p for trio in zip(*parts) for p in trio]
            out[name] = mixed
        else:
            out[name] = makers[name](random.Random(seed + TRACES.index(name)), _Tokens(), requests)
    return out


# ------------------------------------------------------------------------------------------ replay


async def replay(
    prompts: list[list[int]], policy: str, args: argparse.Namespace, root: Path
) -> dict[str, Any]:
    from polarkvd.config import load_config
    from polarkvd.keys import page_keys
    from polarkvd.manager import Manager
    from polarkvd.tiers.disk import DiskTier
    from polarkvd.tiers.dram import SlabAllocator
    from polarkvd.types import Namespace, Tier

    ns = Namespace(model="bench-policy@0", dtype="float16", layout="bench/v1", num_layers=2, num_kv_heads=1,
                   head_dim=32, page_tokens=PAGE_TOKENS)  # fmt: skip
    page = ns.page_bytes
    slab = 1 << 20
    dram = -(-args.dram_pages * page // slab) * slab
    cfg = load_config(env={}, overrides={
        "dram.capacity": str(dram), "dram.slab_bytes": str(slab), "dram.policy": policy,
        "dram.high_watermark": "1.0", "disk.path": str(root / policy / "disk"), "disk.policy": policy,
    })  # fmt: skip
    disk = DiskTier(root / policy / "disk", args.disk_pages * (page + 4096), policy=policy)
    disk.open()
    executor = concurrent.futures.ThreadPoolExecutor(2)
    m = Manager(cfg, memoryview(bytearray(dram)), SlabAllocator(dram, slab), disk, executor)
    s = m.attach(ns, "bench")
    a, b, c = ENGINES[args.engine]
    rnd = random.Random(7)
    filler = bytes(rnd.getrandbits(8) for _ in range(page))  # incompressible enough: zstd works for it
    recomputed = 0
    seconds = 0.0
    hits = {"dram": 0, "disk": 0}
    pages = 0
    fetch_s = 0.0
    for prompt in prompts:
        keys = [bytes(k) for k in page_keys(s.ns.digest, prompt, PAGE_TOKENS)]
        tiers = m.lookup(s, keys)[0]
        n_hit = len(tiers)
        if n_hit:
            t = time.perf_counter()
            offsets, got, lease = await m.load(s, keys[:n_hit])
            fetch_s += time.perf_counter() - t
            n_hit = len(offsets)
            hits["dram"] += sum(1 for x in got if x is Tier.DRAM)
            hits["disk"] += sum(1 for x in got if x is Tier.DISK)
            if lease is not None:
                m.release(s, lease)
        pages += len(keys)
        depth = n_hit * PAGE_TOKENS
        missing = len(prompt) - depth
        cost = a + b * missing + c * missing * (depth + missing / 2)
        recomputed += missing
        seconds += cost
        m.worth.observe_prefill(s.ns.id, missing, depth, cost)  # what the connector reports
        new = list(keys[n_hit:])
        if new:
            offsets = m.reserve(s, new, keys[n_hit - 1] if n_hit else None)
            done = []
            for key, off in zip(new, offsets):
                if off >= 0:
                    m.arena[off : off + page] = filler
                    done.append(key)
                else:
                    break
            m.commit(s, done)
        await asyncio.sleep(0)  # let demotions start
    await m.flush()
    counters = dict(m.counters)
    executor.shutdown(wait=True)
    disk.close()
    return {
        "requests": len(prompts),
        "prompt_tokens": sum(len(p) for p in prompts),
        "recomputed_tokens": recomputed,
        "prefill_s": seconds,
        "hit_rate_dram": hits["dram"] / pages,
        "hit_rate_disk": hits["disk"] / pages,
        "demoted_bytes": counters.get("demoted_pages", 0) * page,
        "fetched_bytes": counters.get("promoted_pages", 0) * page,
        "dropped_pages": counters.get("dropped_pages_cheap", 0),
        "fetch_s": fetch_s,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    traces = build_traces(args.traces, args.requests, args.seed)
    root = Path(tempfile.mkdtemp(prefix="polarkv-policy-"))
    out: dict[str, Any] = {"engine": args.engine, "dram_pages": args.dram_pages, "disk_pages": args.disk_pages,
                           "traces": {}}  # fmt: skip
    try:
        for name, prompts in traces.items():
            out["traces"][name] = {}
            for policy in args.policies:
                print(f"[bench policy] {name}: {policy} ({len(prompts)} requests)", file=sys.stderr)
                out["traces"][name][policy] = asyncio.run(replay(prompts, policy, args, root / name))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    t = out["traces"]

    def secs(trace: str, policy: str) -> float | None:
        return t.get(trace, {}).get(policy, {}).get("prefill_s")

    out["mixed_cost_vs_lru"] = ratio(secs("mixed", "cost"), secs("mixed", "lru"))
    out["mixed_cost_vs_s3fifo"] = ratio(secs("mixed", "cost"), secs("mixed", "s3fifo"))
    worst = [
        ratio(secs(k, "cost"), min(v for v in (secs(k, "lru"), secs(k, "s3fifo")) if v is not None))
        for k in ("chat", "rag", "qa")
        if secs(k, "cost") is not None and (secs(k, "lru") is not None or secs(k, "s3fifo") is not None)
    ]
    out["worst_cost_vs_best_other"] = max((w for w in worst if w is not None), default=None)
    return out


def render(res: dict[str, Any]) -> str:
    rows = []
    for trace, by_policy in res["traces"].items():
        for policy, r in by_policy.items():
            rows.append([
                trace, policy, f"{r['recomputed_tokens']:,}", f"{r['recomputed_tokens'] / r['prompt_tokens']:.3f}",
                fmt(r["prefill_s"], 1), f"{r['hit_rate_dram']:.3f}", f"{r['hit_rate_disk']:.3f}",
                f"{r['demoted_bytes'] / 2**20:,.0f}", f"{r['fetched_bytes'] / 2**20:,.0f}", str(r["dropped_pages"]),
            ])  # fmt: skip
    head = ["trace", "policy", "tokens recomputed", "of prompt", "prefill s (simulated)", "DRAM hits",
            "disk hits", "MiB demoted", "MiB read back", "dropped pages"]  # fmt: skip
    return (
        f"bench policy: engine {res['engine']}, DRAM {res['dram_pages']} pages, disk {res['disk_pages']} pages\n"
        + table(rows, head)
        + f"\nmixed: cost/lru {fmt(res['mixed_cost_vs_lru'])}, cost/s3fifo {fmt(res['mixed_cost_vs_s3fifo'])}; "
        f"worst of chat, rag, qa: cost/best other {fmt(res['worst_cost_vs_best_other'])}\n"
    )


def main(args: argparse.Namespace) -> int:
    res = run(args)
    print(json.dumps(res) if args.json else render(res))
    return 0
