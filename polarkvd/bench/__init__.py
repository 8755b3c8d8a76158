"""Benchmarks behind `polarkvd bench ...`; results are recorded in docs/BENCHMARKS.md.

`BENCHMARKS` is the one list of them: each name's module has `add_arguments(parser)` and
`main(args) -> int` (most through `harness.bench_main`), and the CLI builds `polarkvd bench` from it.
"""

#: `polarkvd bench NAME`: its module under polarkvd.bench, and its line in `polarkvd bench --help`.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "datapath": ("datapath", "store/load/lookup through a real daemon vs memcpy and the raw socket"),
    "chat": (
        "chat",
        "multi-round chat on real vLLM: no cache, prefix cache, ExampleConnector, polarkvd, LMCache, Mooncake",
    ),
    "cluster": ("cluster", "remote page fetch between two processes vs raw TCP, Redis and Mooncake Store"),
    "pipeline": ("pipeline", "vLLM TTFT of a prefix hit from DRAM, a peer or disk; layer pipelining on/off"),
    "connect": (
        "connect",
        "a connect flood: EngineClient constructions from several processes, daemon threads",
    ),
    "page-sizes": (
        "page_sizes",
        "a second page size in a full arena: the reserve that needs a slab, pings meanwhile",
    ),
    "policy": (
        "policy",
        "eviction policies (lru, s3fifo, cost) replayed on chat, RAG and long-document traces",
    ),
    "mixed": (
        "mixed",
        "vLLM: a hit on disk while other requests decode; their inter-token latency, async loads on/off",
    ),
    "blend": (
        "blend",
        "CacheBlend: TTFT and quality of chunk reuse with selective recompute vs full prefill (transformers)",
    ),
    "sglang": ("sglang", "SGLang HiCache write-back and prefetch: polarkvd vs HiCacheFile vs Mooncake Store"),
    "where": ("where", "the `where` query's latency for a long prompt in a cluster of daemons"),
    "route": (
        "route",
        "`polarkvd route` in front of two vLLM servers: round-robin vs least-loaded vs affinity",
    ),
}
