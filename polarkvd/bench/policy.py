"""`polarkvd bench policy`: eviction policies replayed on the same request traces, side by side.

Every request goes through the real manager with a real arena (in memory) and a real disk tier (a
temporary directory), as a vLLM engine uses the daemon: the daemon's lookup, one load of the hit
(disk pages really read and decoded), release, a store of the pages it computed. Only the engine's
compute is simulated, by a model of a real one (--engine, `ENGINES`): a request that computes `n`
tokens after `d` hit tokens costs `a + b*n + c*n*(d + n/2)` seconds, b and c from the model's
FLOPs per token (2 x parameters) and per token of depth (attention: 4 x layers x query width) over
an effective GPU throughput. The simulated engine reports its timings as the connector does.

The bench's pages are 32 KiB (so thousands fit this machine); the modelled engine's are MiBs. By
default (--disk-rate pinned) the daemon decides by a disk rate pinned (disk.read_gbps, as an
operator may) to the one that reads a bench page in the time the modelled NVMe disk (`DISK_GBPS`)
reads a model page, and the engine reports its own seconds: the daemon sees the modelled node's
costs, and every policy the same ones. With --disk-rate measured it decides by its own
measurements of its reads, the engine's time scaled to them (at each report, the daemon's fast end
over the modelled read; before the disk is trusted, a calibration on the trace's first quarter
under `lru`): on the shared 2-core VM a 32 KiB read is CPU-bound Python sharing the cores with
everything else, its fast end differed 2-4x between runs minutes apart, and `cost` on the mixed
trace moved ~10% between runs of the same code (docs/BENCHMARKS.md). Results are in the model's
seconds: prefill = recompute + loading the hit (disk pages at DISK_GBPS, DRAM pages at DRAM_GBPS).
`offline_bound`: what no policy, offline included, can beat at the same capacities.

Traces (deterministic from --seed; 128-token pages):
  chat   users with Zipf popularity resend their growing history plus a new turn
  rag    shared documents of 1K-8K tokens with Zipf popularity behind short unique questions
  qa     ten documents of 20K-100K tokens asked many short questions
  mixed  the three interleaved, sharing one DRAM and one disk
Sizing (`tier_sizes`): the tiers of each trace hold 1/--pressure of its working set (the pages it
asks for twice or more), a fifth DRAM, the rest disk; DRAM at least 1.25x the longest prompt (a
load pins the whole hit in DRAM). The same traces and sizes for every policy.

JSON (--json): `traces[trace][policy]` (`--plot FILE`: prefill seconds per policy per trace); at top level `mixed_cost_vs_lru`, `mixed_cost_vs_s3fifo`
(prefill seconds of the mixed trace, ratio; `*_recompute` the same for recompute alone),
`worst_cost_vs_best_other` (the largest ratio of `cost` to the better of `lru` and `s3fifo` over
chat, rag and qa), `disk_bytes_drop_vs_demote` and `recompute_drop_vs_demote` (mixed: `cost` against
`cost` always demoting), `score_10k_ms` (the `cost` policy picking a victim among 10,000 pages),
`mixed_bound_vs_lru` (`offline_bound` over `lru`'s prefill seconds); per run `admitted_low` (pages
DRAM's `cost` admitted as its next victims). A replay is the same every run (`_InOrder`, `_SEED`).
`--real`: bench/policy_real.py.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import heapq
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from polarkvd.bench import plots
from polarkvd.bench.harness import bench_main, fmt, ratio, table

POLICY_CHOICES = ("lru", "s3fifo", "cost")
TRACES = ("chat", "rag", "qa", "mixed")
PAGE_TOKENS = 128
DISK_GBPS = 3.0  # the modelled node's NVMe: read and decode of a page, GB/s
DRAM_GBPS = 25.0  # DRAM to GPU (PCIe 5 x16, effective)


@dataclasses.dataclass(frozen=True)
class Engine:
    """A modelled engine: prefill seconds from the model's geometry and an effective throughput."""

    label: str
    params: float
    layers: int
    q_width: int  # query heads x head dim
    kv_bytes_per_token: int
    flops: float  # effective prefill FLOP/s
    fixed: float  # seconds per request (scheduling, the sampler, launch overheads)

    @property
    def per_token(self) -> float:
        return 2 * self.params / self.flops

    @property
    def per_token_depth(self) -> float:
        return 4 * self.layers * self.q_width / self.flops

    @property
    def page_bytes(self) -> int:
        return self.kv_bytes_per_token * PAGE_TOKENS

    def seconds(self, n: int, depth: int) -> float:
        return self.fixed + self.per_token * n + self.per_token_depth * n * (depth + n / 2)


ENGINES = {
    "8b": Engine(
        "Llama-3-8B-like (32 layers, 4096 wide, 8 KV heads of 128, bf16) at 400 TFLOP/s",
        8.0e9,
        32,
        4096,
        2 * 32 * 8 * 128 * 2,
        4e14,
        0.01,
    ),  # fmt: skip
    "smollm2": Engine(
        "SmolLM2-135M-like (30 layers, 576 wide, 3 KV heads of 64, bf16) at 50 TFLOP/s",
        1.35e8,
        30,
        576,
        2 * 30 * 3 * 64 * 2,
        5e13,
        0.005,
    ),  # fmt: skip
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.add_argument("--traces", nargs="+", choices=TRACES, default=list(TRACES), metavar="TRACE",
                   help=f"traces to replay (default all: {' '.join(TRACES)})")  # fmt: skip
    p.add_argument("--policies", nargs="+", choices=POLICY_CHOICES, default=list(POLICY_CHOICES),
                   metavar="POLICY", help="eviction policies, of DRAM and disk alike (default lru s3fifo cost)")  # fmt: skip
    p.add_argument("--requests", type=int, default=300, help="requests per trace (mixed: 2x; default 300)")
    p.add_argument("--pressure", type=float, default=2.0,
                   help="working set / tiers: the tiers hold 1/PRESSURE of each trace's reused pages (default 2)")  # fmt: skip
    p.add_argument(
        "--dram-pages", type=int, default=None, help="DRAM capacity in pages (default: from --pressure)"
    )
    p.add_argument(
        "--disk-pages", type=int, default=None, help="disk capacity in pages (default: from --pressure)"
    )
    p.add_argument("--engine", choices=sorted(ENGINES), default="8b", help="modelled engine (default 8b)")
    p.add_argument("--seed", type=int, default=0, help="trace seed (default 0)")
    plots.add_plot_arguments(p)
    p.add_argument("--disk-rate", choices=("pinned", "measured"), default="pinned",
                   help="what the daemon decides by: its disk's read rate pinned to the modelled disk's "
                        "(disk.read_gbps; default), or its own measurements of its reads (the engine's "
                        "time scaled to them)")  # fmt: skip
    p.add_argument("--real", action="store_true",
                   help="instead: the short real-engine check (vLLM CPU with SmolLM2 on a small mixed "
                        "trace, TTFT per policy; bench/policy_real.py)")  # fmt: skip
    p.add_argument("--real-requests", type=int, default=10,
                   help="--real: requests of each kind (chat, RAG, long document; default 10)")  # fmt: skip
    p.add_argument("--no-demote-check", action="store_true",
                   help="skip the mixed trace's second `cost` run that always demotes")  # fmt: skip


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
    docs = [tok.take(rng.randint(20_000, 100_000)) for _ in range(10)]
    return [docs[_zipf(rng, len(docs), 0.8)] + tok.take(rng.randint(20, 80)) for _ in range(requests)]


def build_traces(names: list[str], requests: int, seed: int) -> dict[str, list[list[int]]]:
    out: dict[str, list[list[int]]] = {}
    makers = {"chat": chat_trace, "rag": rag_trace, "qa": qa_trace}
    for name in names:
        if name == "mixed":
            rng, tok = random.Random(seed + 99), _Tokens()
            parts = [makers[k](rng, tok, requests * 2 // 3) for k in ("chat", "rag", "qa")]
            out[name] = [p for trio in zip(*parts) for p in trio]
        else:
            out[name] = makers[name](random.Random(seed + TRACES.index(name)), _Tokens(), requests)
    return out


def working_set(prompts: list[list[int]]) -> int:
    """Pages (whole 128-token prefixes) the trace asks for twice or more."""
    seen: dict[int, int] = {}
    for prompt in prompts:
        h = 0
        for i in range(len(prompt) // PAGE_TOKENS):
            h = hash((h, tuple(prompt[i * PAGE_TOKENS : (i + 1) * PAGE_TOKENS])))
            seen[h] = seen.get(h, 0) + 1
    return sum(1 for n in seen.values() if n > 1)


def tier_sizes(prompts: list[list[int]], args: argparse.Namespace) -> tuple[int, int, int]:
    """(working set, DRAM pages, disk pages): see the module docstring."""
    ws = working_set(prompts)
    tiers = math.ceil(ws / args.pressure)
    longest = max(len(p) for p in prompts) // PAGE_TOKENS
    dram = args.dram_pages or max(math.ceil(tiers / 5), math.ceil(1.25 * longest))
    disk = args.disk_pages or max(tiers - dram, math.ceil(tiers / 5))
    return ws, dram, disk


# ------------------------------------------------------------------------------------------ replay


def pinned_gbps(engine: Engine) -> float:
    """The disk rate that makes a bench page read in the time the modelled disk reads a model page."""
    return _namespace().page_bytes / (engine.page_bytes / (DISK_GBPS * 1e9)) / 1e9


def _manager(
    policy: str,
    dram_pages: int,
    disk_pages: int,
    root: Path,
    demote_always: bool = False,
    read_gbps: float = 0.0,
) -> Any:
    from polarkvd.config import load_config
    from polarkvd.manager import Manager
    from polarkvd.tiers.disk import DiskTier
    from polarkvd.tiers.dram import SlabAllocator

    page = _namespace().page_bytes
    slab = 1 << 20
    dram = -(-dram_pages * page // slab) * slab
    cfg = load_config(env={}, overrides={
        "dram.capacity": str(dram), "dram.slab_bytes": str(slab), "dram.policy": policy,
        "dram.high_watermark": "1.0", "disk.path": str(root / "disk"), "disk.policy": policy,
        "disk.read_gbps": str(read_gbps),
    })  # fmt: skip
    disk = DiskTier(root / "disk", disk_pages * (page + 4096), policy=policy)
    disk.open()
    executor = _InOrder()
    m = Manager(cfg, memoryview(bytearray(dram)), SlabAllocator(dram, slab), disk, executor, seed=_SEED)
    if demote_always:
        m.worth.cheaper_to_recompute = lambda page: False  # type: ignore[method-assign]
    return m, disk, executor


#: the page-key seed of every replay: the same keys, and so the same sketch counters, every run
_SEED = bytes(32)


class _InOrder(concurrent.futures.Executor):
    """The replay's I/O "pool": each disk write and read runs when it is queued, in the order the
    manager queues them. With the daemon's I/O threads, which writes had landed (and which pages
    they had evicted) when drop-or-demote weighed the next page depended on thread timing: the
    same code's disk bytes moved 0.53-0.78x between runs. In order, a replay is the same every
    run; the bench waits for every write after each request all the same, as the engine's compute
    would."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the awaiting side, as a pool's worker would
            fut.set_exception(exc)
        return fut


def _namespace() -> Any:
    from polarkvd.types import Namespace

    return Namespace(model="bench-policy@0", dtype="float16", layout="bench/v1", num_layers=2, num_kv_heads=1,
                     head_dim=32, page_tokens=PAGE_TOKENS)  # fmt: skip


async def replay(
    prompts: list[list[int]], policy: str, sizes: tuple[int, int], engine: Engine, scale: float, root: Path,
    demote_always: bool = False, pinned: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """One policy on one trace. `pinned`: the daemon decides by the modelled disk's rate, and the
    engine reports its own seconds; else by its measurements, the engine's seconds times `scale`
    (then, once the disk is measured, the daemon's fast end over the modelled read)."""
    from polarkvd.keys import page_keys
    from polarkvd.types import Tier

    m, disk, executor = _manager(policy, *sizes, root, demote_always, pinned_gbps(engine) if pinned else 0.0)
    s = m.attach(_namespace(), "bench")
    page = s.ns.ns.page_bytes
    model_read = engine.page_bytes / (DISK_GBPS * 1e9)  # the modelled disk's read of a model page
    filler = random.Random(7).randbytes(page)  # incompressible: stored raw, as fp16 KV mostly is
    recomputed = 0
    compute_s = load_s = 0.0
    hits = {"dram": 0, "disk": 0}
    pages = 0
    for prompt in prompts:
        keys = [bytes(k) for k in page_keys(s.ns.digest, prompt, PAGE_TOKENS)]
        n_hit = len(m.lookup(s, keys)[0])
        if n_hit:
            offsets, got, lease = await m.load(s, keys[:n_hit])
            n_hit = len(offsets)
            dram, on_disk = got.count(Tier.DRAM), got.count(Tier.DISK)
            hits["dram"] += dram
            hits["disk"] += on_disk
            load_s += engine.page_bytes * (on_disk / (DISK_GBPS * 1e9) + dram / (DRAM_GBPS * 1e9))
            if lease is not None:
                m.release(s, lease)
        pages += len(keys)
        depth = n_hit * PAGE_TOKENS
        missing = len(prompt) - depth
        cost = engine.seconds(missing, depth)
        recomputed += missing
        compute_s += cost
        if missing >= 32:  # what the vLLM connector reports: steps of 32 tokens or more
            if not pinned and m.worth.fetch.trusted(Tier.DISK):  # the engine in the daemon's disk units now
                scale = m.worth.fetch.fast_seconds(Tier.DISK, page) / model_read
            m.worth.observe_prefill(s.ns.id, missing, depth, cost * scale)
        new = list(keys[n_hit:])
        if new:
            offsets = m.reserve(s, new, keys[n_hit - 1] if n_hit else None)
            done = []
            for key, off in zip(new, offsets):
                if off < 0:
                    break
                m.arena[off : off + page] = filler
                done.append(key)
            m.commit(s, done)
            left = [k for k in new[len(done) :] if k in s.reserved]
            if left:
                m.abort(s, left)
        while m._disk_writes:  # the engine computes meanwhile: demotions land on disk, as they would
            await asyncio.gather(*list(m._disk_writes), return_exceptions=True)
    await m.flush()
    counters = dict(m.counters)
    executor.shutdown(wait=True)
    disk.close()
    return {
        "requests": len(prompts),
        "prompt_tokens": sum(len(p) for p in prompts),
        "recomputed_tokens": recomputed,
        "recompute_s": compute_s,
        "load_s": load_s,
        "prefill_s": compute_s + load_s,
        "hit_rate_dram": hits["dram"] / pages,
        "hit_rate_disk": hits["disk"] / pages,
        "demoted_bytes": counters.get("demoted_bytes", 0),
        "fetched_bytes": counters.get("promoted_bytes", 0),
        "dropped_pages": counters.get("dropped_pages_cheap", 0),
        "dropped_rare": counters.get("dropped_pages_rare", 0),
        "recompute_instead_pages": counters.get("recompute_instead_pages", 0),
        "admitted_low": getattr(m.policy, "admitted_low", 0),
        "disk_fetch_us": m.worth.fetch.seconds(Tier.DISK, page) * 1e6,
        "disk_fetch_fast_us": m.worth.fetch.fast_seconds(Tier.DISK, page) * 1e6,
    }


def _most_hits(seq: list[int], cap: int) -> int:
    """Belady's MIN (bypass allowed): the most hits any cache of `cap` pages can have on `seq`."""
    nxt, last = [0] * len(seq), {}  # type: ignore[var-annotated]
    for t in range(len(seq) - 1, -1, -1):
        nxt[t], last[seq[t]] = last.get(seq[t], len(seq)), t
    cached: dict[int, int] = {}  # page: its next use
    heap: list[tuple[int, int]] = []  # (-next use, page), stale entries skipped
    hits = 0
    for item, n in zip(seq, nxt):
        if item in cached or len(cached) < cap:
            hits += item in cached
        else:
            while cached.get(heap[0][1]) != -heap[0][0]:
                heapq.heappop(heap)
            if -heap[0][0] <= n:
                continue  # the page itself is the one used furthest ahead: not cached
            del cached[heapq.heappop(heap)[1]]
        cached[item] = n
        heapq.heappush(heap, (-n, item))
    return hits


def offline_bound(prompts: list[list[int]], dram: int, disk: int, engine: Engine) -> float:
    """A lower bound on the prefill seconds of any policy, offline included, at these capacities:
    every page's first use recomputed (and every request's partial last page); of the uses after,
    at most Belady's most hits of a DRAM-sized cache load from DRAM, credited with the largest
    savings over the rest (each of which costs at least the cheaper of a disk read and its
    recompute), and at least the uses past Belady's hits of both tiers together recompute, charged
    the smallest excess over a disk read. A relaxation (no chain order, no pinning, the best
    savings picked apart): no policy can do better, and none may get near."""
    p = PAGE_TOKENS
    disk_read, dram_read = engine.page_bytes / (DISK_GBPS * 1e9), engine.page_bytes / (DRAM_GBPS * 1e9)
    seq, depths, total = [], [], 0.0
    for prompt in prompts:
        h, full = 0, len(prompt) // p
        for i in range(full):
            h = hash((h, tuple(prompt[i * p : (i + 1) * p])))
            seq.append(h)
            depths.append(i)
        total += engine.seconds(len(prompt) - full * p, full * p)
    seen: set[int] = set()
    again = []
    for item, i in zip(seq, depths):
        page_s = engine.seconds(p, i * p) - engine.fixed
        if item in seen:
            again.append(page_s)
        else:
            seen.add(item)
            total += page_s
    total += sum(min(disk_read, r) for r in again)
    saved = sorted((min(disk_read, r) - dram_read for r in again), reverse=True)[: _most_hits(seq, dram)]
    misses = max(0, len(again) - _most_hits(seq, dram + disk))
    return (
        total - sum(v for v in saved if v > 0) + sum(sorted(max(0.0, r - disk_read) for r in again)[:misses])
    )


def score_10k_ms(reps: int = 200) -> float:
    """Median ms of the `cost` policy picking one victim among 10,000 scored candidates."""
    from polarkvd.policy import CostPolicy, PolicyNode

    rng = random.Random(5)
    p = CostPolicy()
    p.SAMPLE = 10_000
    nodes = [PolicyNode(i.to_bytes(16, "big")) for i in range(10_000)]
    for node in nodes:
        p.insert(node)
        node.aux = rng.getrandbits(40)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        got = p.victims(1, lambda n: True)
        times.append(time.perf_counter() - t)
        p.insert(got[0])
        got[0].aux = rng.getrandbits(40)
    return sorted(times)[reps // 2] * 1e3


# ------------------------------------------------------------------------------------------ runs


def run(args: argparse.Namespace) -> dict[str, Any]:
    engine = ENGINES[args.engine]
    traces = build_traces(args.traces, args.requests, args.seed)
    root = Path(tempfile.mkdtemp(prefix="polarkv-policy-"))
    out: dict[str, Any] = {"engine": args.engine, "engine_label": engine.label, "pressure": args.pressure,
                           "disk_rate": args.disk_rate, "traces": {}, "sizes": {}}  # fmt: skip
    try:
        out["model_page_bytes"] = engine.page_bytes
        for name, prompts in traces.items():
            ws, dram, disk = tier_sizes(prompts, args)
            pinned = args.disk_rate == "pinned"
            if pinned:
                disk_page_s, scale = engine.page_bytes / (DISK_GBPS * 1e9), 1.0
            # calibration: the daemon's own measure of its disk reads (FetchCosts), on this trace's
            # first quarter under `lru`, in the conditions of the runs (demotions writing meanwhile)
            else:
                warm = asyncio.run(replay(prompts[: len(prompts) // 4], "lru", (dram, disk), engine, 1.0, root / name / "calibrate"))  # fmt: skip
                disk_page_s = warm["disk_fetch_fast_us"] / 1e6  # the estimate the daemon decides by
                scale = disk_page_s / (engine.page_bytes / (DISK_GBPS * 1e9))
            print(f"[bench policy] {name}: a bench page's disk read {disk_page_s * 1e6:.0f} us: engine time x {scale:.4f}",
                  file=sys.stderr)  # fmt: skip
            out["sizes"][name] = {"working_set_pages": ws, "dram_pages": dram, "disk_pages": disk,
                                  "bench_disk_page_us": disk_page_s * 1e6, "time_scale": scale,
                                  "offline_bound_s": offline_bound(prompts, dram, disk, engine)}  # fmt: skip
            out["traces"][name] = {}
            runs = [(policy, False) for policy in args.policies]
            if name == "mixed" and "cost" in args.policies and not args.no_demote_check:
                runs.append(("cost", True))
            for policy, always in runs:
                label = "cost_demote_always" if always else policy
                print(f"[bench policy] {name}: {label} ({len(prompts)} requests, working set {ws} pages, "
                      f"DRAM {dram}, disk {disk})", file=sys.stderr)  # fmt: skip
                out["traces"][name][label] = asyncio.run(
                    replay(prompts, policy, (dram, disk), engine, scale, root / name / label, always, pinned)
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["score_10k_ms"] = score_10k_ms()
    t = out["traces"]

    def secs(trace: str, policy: str, what: str = "prefill_s") -> float | None:
        return t.get(trace, {}).get(policy, {}).get(what)

    for what, suffix in (("prefill_s", ""), ("recompute_s", "_recompute")):
        out[f"mixed_cost_vs_lru{suffix}"] = ratio(secs("mixed", "cost", what), secs("mixed", "lru", what))
        out[f"mixed_cost_vs_s3fifo{suffix}"] = ratio(
            secs("mixed", "cost", what), secs("mixed", "s3fifo", what)
        )
        worst = [
            ratio(secs(k, "cost", what), min(v for v in (secs(k, "lru", what), secs(k, "s3fifo", what)) if v))
            for k in ("chat", "rag", "qa")
            if secs(k, "cost", what) is not None and (secs(k, "lru", what) or secs(k, "s3fifo", what))
        ]
        out[f"worst_cost_vs_best_other{suffix}"] = max((w for w in worst if w is not None), default=None)
    mixed_bound = out["sizes"].get("mixed", {}).get("offline_bound_s")
    out["mixed_bound_vs_lru"] = ratio(mixed_bound, secs("mixed", "lru"))
    always = t.get("mixed", {}).get("cost_demote_always")
    cost = t.get("mixed", {}).get("cost")
    out["disk_bytes_drop_vs_demote"] = ratio(
        cost and cost["demoted_bytes"], always and always["demoted_bytes"]
    )
    out["recompute_drop_vs_demote"] = ratio(cost and cost["recompute_s"], always and always["recompute_s"])
    out["prefill_drop_vs_demote"] = ratio(cost and cost["prefill_s"], always and always["prefill_s"])
    return out


def render(res: dict[str, Any]) -> str:
    rows = []
    for trace, by_policy in res["traces"].items():
        for policy, r in by_policy.items():
            rows.append([
                trace, policy, f"{r['recomputed_tokens'] / r['prompt_tokens']:.3f}", fmt(r["recompute_s"], 1),
                fmt(r["load_s"], 1), fmt(r["prefill_s"], 1), f"{r['hit_rate_dram']:.3f}", f"{r['hit_rate_disk']:.3f}",
                f"{r['demoted_bytes'] / 2**20:,.0f}", f"{r['fetched_bytes'] / 2**20:,.0f}", str(r["dropped_pages"]),
                str(r["recompute_instead_pages"]),
            ])  # fmt: skip
    head = ["trace", "policy", "recomputed", "recompute s", "load s", "prefill s", "DRAM hits", "disk hits",
            "MiB demoted", "MiB read back", "dropped", "cut"]  # fmt: skip
    sizes = ", ".join(
        f"{k} {v['working_set_pages']}/{v['dram_pages']}/{v['disk_pages']}" for k, v in res["sizes"].items()
    )
    return (
        f"bench policy: {res['engine_label']}; pages: working set/DRAM/disk {sizes}\n"
        f"a bench page's disk read (us) stands for the model page's {res['model_page_bytes'] / 2**20:.1f} MiB at "
        f"{DISK_GBPS} GB/s: "
        + ", ".join(f"{k} {v['bench_disk_page_us']:.0f}" for k, v in res["sizes"].items())
        + "\n"
        + table(rows, head)
        + f"\nmixed: cost/lru {fmt(res['mixed_cost_vs_lru'])} (recompute alone {fmt(res['mixed_cost_vs_lru_recompute'])}),"
        f" cost/s3fifo {fmt(res['mixed_cost_vs_s3fifo'])} ({fmt(res['mixed_cost_vs_s3fifo_recompute'])});"
        f" worst of chat, rag, qa: cost/best other {fmt(res['worst_cost_vs_best_other'])}"
        f" ({fmt(res['worst_cost_vs_best_other_recompute'])})\n"
        f"mixed: the offline bound (no policy does better) / lru {fmt(res['mixed_bound_vs_lru'])}\n"
        f"drop-or-demote vs always demoting (mixed): disk bytes {fmt(res['disk_bytes_drop_vs_demote'])}, "
        f"recompute {fmt(res['recompute_drop_vs_demote'])}, prefill {fmt(res['prefill_drop_vs_demote'])}; "
        f"scoring 10,000 candidates {fmt(res['score_10k_ms'])} ms\n"
    )


def main(args: argparse.Namespace) -> int:
    if args.real and not args.plot_from:
        from polarkvd.bench import policy_real

        real = policy_real.run(args)
        print(json.dumps(real, indent=2) if args.json else policy_real.render(real))
        return 0
    return bench_main("policy", args, run, render)
