"""`polarkvd bench chat`: a multi-round chat against real vLLM, six configurations, one run.

Workload (deterministic from `--seed`; token ids are words of the model's own vocabulary, framed in
SmolLM2's ChatML template): `--users` users share a `--system`-token system prompt; each starts with a
private `--history`-token document plus a `--turn`-token question, then for `--rounds` rounds adds a new
`--turn`-token message; the model answers `--answer` tokens (greedy, ignore_eos, so lengths are fixed).
Every request resends the whole history (previous turns and the model's previous answers). Users are
interleaved (round r: user 0, 1, ..., U-1), one request in flight at a time, and vLLM's KV cache is
sized (`num_gpu_blocks_override`) to hold one conversation and a half of the others, never all of
them: by the time a user comes back, vLLM's own prefix cache has evicted that user's history.

Each configuration runs in its own fresh vLLM process (offline `LLMEngine`, eager, in-process engine
core, private TMPDIR, own process group, the same `VLLM_CPU_OMP_THREADS_BIND` for all):
  nocache            vLLM, `enable_prefix_caching=False`
  prefix_cache       vLLM with its own prefix caching
  example_connector  vLLM's reference `ExampleConnector` (KV on disk, safetensors) + prefix caching;
                     `max_num_batched_tokens` >= the longest prompt, because it breaks on chunked prefill
  polarkvd           `PolarKVConnector` + a private polarkvd daemon (DRAM holds the working set) +
                     prefix caching, as a deployment runs it
  lmcache            `LMCacheMPConnector` + a private LMCache multiprocess server + prefix caching
  mooncake           `MooncakeStoreConnector` + a private Mooncake Store (master + standalone client
                     owning the segment) + prefix caching
The real peers' servers (harness.py) are fresh per run; a peer not installed
(scripts/setup-bench-peers.sh) or failing is reported "not available: <reason>" and the rest go on.
`--block-size` is vLLM's block_size everywhere (polarkvd's page, LMCache's default chunk).

TTFT: wall time from `LLMEngine.add_request()` to the `engine.step()` that returns the request's first
output token, streamed through the engine's step loop, the same code for every configuration (offline
vLLM disables per-request stats, so `RequestOutput.metrics` is empty). After the rounds, a "hot" phase
gives `--hot-users` users two turns back to back: in prefix_cache the second is a hit on a history vLLM
still holds; in polarkvd vLLM's prefix cache is reset before it (`reset_prefix_cache()`), so the same
request is served from the daemon (lmcache, mooncake: from their store). That pair is the bar "<= 1.5x of vLLM's own prefix-cache hit when
vLLM still holds the prefix"; the ExampleConnector bar compares the requests it served from disk with
the same requests in polarkvd.

The engine runs with `python -m polarkvd.bench.chat --worker SPEC`; the parent never imports vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from polarkvd.bench import plots
from polarkvd.bench.harness import (
    Steps,
    bench_main,
    busy_cpu_s,
    count_cpus,
    cpu_bind,
    event_writer,
    fmt,
    lmcache_server,
    mean_percentiles,
    model_kv_bytes_per_token,
    mooncake_store,
    observe_external_tokens,
    own_cpu_s,
    private_daemon,
    ratio,
    relay_worker,
    reset_prefix_cache,
    run_request,
    table,
    vllm_env,
    vllm_tolerates_numba,
)

CONFIGS = ("nocache", "prefix_cache", "example_connector", "polarkvd", "lmcache", "mooncake")
CONFIG_HELP = {
    "nocache": "vLLM without prefix caching",
    "prefix_cache": "vLLM with its own prefix caching",
    "example_connector": "vLLM ExampleConnector (disk) + prefix caching",
    "polarkvd": "PolarKVConnector + private daemon + prefix caching",
    "lmcache": "LMCacheMPConnector + private LMCache MP server + prefix caching",
    "mooncake": "MooncakeStoreConnector + private Mooncake Store (standalone) + prefix caching",
}
PEERS = ("lmcache", "mooncake")  # real peers: reported as not available when missing, the run goes on
# Configurations whose hot-phase hit comes from the connector's store (vLLM's prefix cache reset first).
STORE_HITS = ("polarkvd", *PEERS)
DEFAULT_BLOCK = 128  # vLLM's CPU block size by default (and the polarkvd connector's page, page_blocks 1)
MARK = "@@chat "
# Targets: ratios of polarkvd to the other configuration, one run (docs/BENCHMARKS.md).
BARS = {
    "ttft_ratio_vs_nocache": ("<=", 1 / 27),
    "hit_ttft_ratio_vs_prefix_cache_hot": ("<=", 1.5),
    "hit_ttft_ratio_vs_example_connector": ("<=", 0.5),
    "throughput_ratio_vs_prefix_cache": (">=", 1.62),
    "ttft_ratio_vs_mooncake": ("<=", 0.7),
    "ttft_ratio_vs_lmcache": ("<=", 0.4),
    "throughput_ratio_vs_mooncake": (">=", 1.0),
    "throughput_ratio_vs_lmcache": (">=", 1.0),
}


def block_size(text: str) -> int:
    """`--block-size`: vLLM's CPU attention takes any multiple of 32 tokens."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens") from None
    if n < 32 or n % 32:
        raise argparse.ArgumentTypeError(f"{n} is not a positive multiple of 32 (vLLM's CPU block sizes)")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.add_argument("--users", type=int, default=4, help="users, interleaved in every round (default 4)")
    p.add_argument("--rounds", type=int, default=10, help="rounds of one turn per user (default 10)")
    p.add_argument("--history", type=int, default=2000, metavar="TOKENS",
                   help="each user's private document, sent with the first turn (default 2000)")  # fmt: skip
    p.add_argument("--system", type=int, default=1000, metavar="TOKENS",
                   help="the system prompt all users share (default 1000)")  # fmt: skip
    p.add_argument("--turn", type=int, default=64, metavar="TOKENS", help="a user's new message (default 64)")
    p.add_argument("--answer", type=int, default=32, metavar="TOKENS",
                   help="tokens the model answers, greedy, ignore_eos (default 32)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), metavar="CONFIG",
                   help="configurations to run, in this order (default: all): " + ", ".join(CONFIGS))  # fmt: skip
    p.add_argument("--hot-users", type=int, default=4,
                   help="users given two back-to-back turns after the rounds, to time a hit on what vLLM "
                   "still holds (not in nocache; default 4, 0 = skip)")  # fmt: skip
    p.add_argument("--block-size", type=block_size, default=DEFAULT_BLOCK, metavar="TOKENS",
                   help="vLLM's block_size in every configuration, a multiple of 32 (default 128); also "
                   "polarkvd's page and the LMCache chunk")  # fmt: skip
    p.add_argument("--kv-blocks", type=int, default=0,
                   help="vLLM KV blocks, each of --block-size tokens; default: one conversation + half of "
                   "the others")  # fmt: skip
    p.add_argument("--lmcache-chunk", type=int, default=0, metavar="TOKENS",
                   help="LMCache server's --chunk-size, a multiple of --block-size (default: the block size; "
                   "LMCache hits come in whole chunks)")  # fmt: skip
    p.add_argument("--cpus", default="", help="VLLM_CPU_OMP_THREADS_BIND for every configuration "
                   "(default: every CPU this process may use)")  # fmt: skip
    p.add_argument("--model", default="", help="model directory (default: the converted SmolLM2-135M)")
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs, specs, results)")
    plots.add_plot_arguments(p)


# ---------------------------------------------------------------------------------------- workload


def _vocab_words(tok: Any) -> list[int]:
    """Ids of plain lower-case word tokens with a leading space ('Ġword'): valid ids, natural-ish text."""
    return sorted(i for t, i in tok.get_vocab().items() if re.fullmatch(r"Ġ[a-z]{3,12}", t))


def chat_tokens(model_dir: str, seed: int) -> tuple[Callable[[str], list[int]], Callable[[int], list[int]]]:
    """(enc, text): the model's tokenizer for template strings, and `n` random vocabulary words
    (deterministic from `seed`) for prompt bodies. Shared by the chat and pipeline benchmarks."""
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))

    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    words = np.array(_vocab_words(tok))
    rng = np.random.default_rng(seed)

    def text(n: int) -> list[int]:
        return [int(x) for x in rng.choice(words, n)]

    return enc, text


def build_workload(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    """Every token id of the run (except the model's answers), from the seed and the tokenizer."""
    enc, text = chat_tokens(model_dir, args.seed)
    system = enc("<|im_start|>system\n") + text(args.system)
    user_open, doc_sep = enc("<|im_end|>\n<|im_start|>user\n"), enc("\n\n")
    assistant_open = enc("<|im_end|>\n<|im_start|>assistant\n")
    # Turn lengths: `--turn`, one more where a prompt would be 1 token past a block boundary. There
    # ExampleConnector's lookup key (aligned len-2) is one block shorter than its load key (aligned
    # len-1): it finds a stored prefix, then fails to open the other one and vLLM dies. The same
    # lengths are used in every configuration.
    block = args.block_size
    lens: list[int] = []
    length = len(system) + len(user_open) + args.history + len(doc_sep)
    for i in range(args.rounds + 2):  # two more for the hot phase
        if i:
            length += args.answer + len(user_open)
        n = args.turn + (1 if (length + args.turn + len(assistant_open)) % block == 1 else 0)
        lens.append(n)
        length += n + len(assistant_open)
    return {
        "system": system,
        "user_open": user_open,
        "doc_sep": doc_sep,
        "assistant_open": assistant_open,
        "docs": [text(args.history) for _ in range(args.users)],
        "turns": [[text(n) for n in lens] for _ in range(args.users)],
        "warmup": enc("<|im_start|>system\n") + text(args.system + args.history + args.turn + 64),
    }


def prompt_tokens(wl: dict[str, Any], answer: int, turn_index: int) -> int:
    """Length of a user's prompt at turn `turn_index` (0-based): fixed, since answers are fixed."""
    total = len(wl["system"]) + len(wl["user_open"]) + len(wl["docs"][0]) + len(wl["doc_sep"])
    for i, turn in enumerate(wl["turns"][0][: turn_index + 1]):
        total += (answer + len(wl["user_open"]) if i else 0) + len(turn) + len(wl["assistant_open"])
    return total


def next_prompt(wl: dict[str, Any], history: list[int] | None, user: int, turn_index: int) -> list[int]:
    """The prompt of `user`'s turn `turn_index`: the whole history, the new message, the answer header."""
    turn = wl["turns"][user][turn_index]
    if history is None:
        head = wl["system"] + wl["user_open"] + wl["docs"][user] + wl["doc_sep"]
    else:
        head = history + wl["user_open"]
    return head + turn + wl["assistant_open"]


def engine_sizing(args: argparse.Namespace, wl: dict[str, Any]) -> dict[str, Any]:
    """max_model_len, batch budget (no prompt chunked) and vLLM's KV blocks (cannot hold everyone)."""
    block = args.block_size
    last_turn = args.rounds - 1 + (2 if args.hot_users else 0)
    longest = prompt_tokens(wl, args.answer, last_turn)
    max_model_len = -(-(longest + args.answer) // block) * block
    shared = len(wl["system"])
    final = prompt_tokens(wl, args.answer, args.rounds - 1) + args.answer
    all_tokens = shared + args.users * (final - shared)  # every user's history at the end of the rounds
    all_blocks = -(-all_tokens // block)
    one_blocks = max_model_len // block
    blocks = args.kv_blocks or max(one_blocks + 2, one_blocks + (all_blocks - one_blocks) // 2)
    return {
        "max_model_len": max_model_len,
        "max_num_batched_tokens": max(max_model_len, 2048),
        "kv_blocks": blocks,
        "block_size": block,
        "kv_tokens": blocks * block,
        "all_histories_tokens": all_tokens,
        "kv_holds_everyone": blocks - 1 >= all_blocks,  # one block is vLLM's null block
        "longest_prompt_tokens": longest,
    }


# ---------------------------------------------------------------------------------------- worker (vLLM)


def connector_record(delta: dict[str, float], block: int) -> dict[str, Any]:
    """One request's share of PolarKVConnector's stats (`delta`: after minus before); the connector
    loads whole vLLM blocks of `block` tokens (page_blocks 1)."""
    return {
        "loaded_tokens": int(delta.get("load_blocks", 0)) * block,
        "load_failed_blocks": int(delta.get("load_failed_blocks", 0)),
        "load_copy_s": delta.get("load_copy_seconds", 0.0),
        "load_rpc_s": delta.get("daemon_load_seconds", 0.0) + delta.get("daemon_release_seconds", 0.0),
        "save_s": delta.get("save_total_seconds", 0.0),
        "saved_pages": int(delta.get("saved_pages", 0)),
    }


def hit_slack(args: argparse.Namespace) -> int:
    """Most prompt tokens a "hit" may compute: the new turn, the last answer and the two partial
    blocks around them."""
    return int(args.turn + args.answer + 2 * args.block_size)


def worker_main(spec_path: str) -> int:
    """One configuration in this (fresh) process: build the engine, run every request, write results."""
    spec = json.loads(Path(spec_path).read_text())
    wl, cfg = spec["workload"], spec["config"]

    say = event_writer(MARK)

    t_import = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kw: dict[str, Any] = {
        "model": spec["model"],
        "enforce_eager": True,
        "dtype": "float32",
        "seed": 0,
        "max_model_len": spec["max_model_len"],
        "max_num_batched_tokens": spec["max_num_batched_tokens"],
        "num_gpu_blocks_override": spec["kv_blocks"],
        "block_size": spec["block_size"],
        "enable_prefix_caching": cfg != "nocache",
    }
    if cfg == "example_connector":
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="ExampleConnector",
            kv_role="kv_both",
            kv_connector_extra_config={"shared_storage_path": spec["example_dir"]},
        )
    elif cfg == "polarkvd":
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="PolarKVConnector",
            kv_connector_module_path="polarkvd.connectors.vllm",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={"socket": spec["socket"]},
        )
    elif cfg in PEERS:  # vLLM's own connector classes for them; the server runs beside (the parent)
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LMCacheMPConnector" if cfg == "lmcache" else "MooncakeStoreConnector",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config=spec["peer_extra"],
        )
    if cfg == "lmcache":
        vllm_tolerates_numba()  # lmcache imports numba
    t0 = time.perf_counter()
    llm = LLM(**kw)
    engine = llm.llm_engine
    connector: Any = None  # polarkvd's PolarKVConnector (its `stats`), under vLLM's base class
    if cfg == "polarkvd":
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        connector = get_kv_transfer_group()
    # what the connector itself reported per request (tokens beyond vLLM's own prefix cache)
    external = observe_external_tokens(engine)
    say("ready", import_s=t0 - t_import, start_s=time.perf_counter() - t0)
    params = SamplingParams(temperature=0.0, max_tokens=spec["answer"], ignore_eos=True)
    counter = 0

    def one(ids: list[int], max_tokens: int | None = None) -> dict[str, Any]:
        nonlocal counter
        counter += 1
        rid = f"req-{counter}"
        p = params if max_tokens is None else SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True
        )  # fmt: skip
        before = dict(connector.stats) if connector is not None else {}
        if external is not None:
            external.clear()
        cpu0, own0 = busy_cpu_s(), own_cpu_s()
        ttft, latency, final = run_request(engine, rid, ids, p)
        own = own_cpu_s() - own0
        others = max(0.0, busy_cpu_s() - cpu0 - own)
        rec: dict[str, Any] = {
            "prompt_tokens": len(ids),
            "cached_tokens": int(final.num_cached_tokens or 0),
            "ttft_s": ttft,
            "latency_s": latency,
            "output_ids": list(final.outputs[0].token_ids),
            "cpu_s": own,  # this engine process, all threads
            "others_cpu_s": others,  # every other process on the machine meanwhile (noise)
        }
        if external is not None:
            rec["external_tokens"] = external.pop("current", 0)
        if connector is not None:
            after = dict(connector.stats)
            d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            rec.update(connector_record(d, spec["block_size"]))
        return rec

    # First-request costs (allocations, kernels) out of the measurement: a prompt as long as a first
    # turn, sharing no full block with the workload, answered in full.
    one(wl["warmup"][: spec["first_prompt_tokens"]])
    say("warm")
    users, rounds, hot_users = spec["users"], spec["rounds"], spec["hot_users"]
    history: list[list[int] | None] = [None] * users
    requests: list[dict[str, Any]] = []
    t_run = time.perf_counter()
    for r in range(rounds):
        for u in range(users):
            ids = next_prompt(wl, history[u], u, r)
            rec = one(ids)
            rec.update(phase="rounds", round=r + 1, user=u)
            requests.append(rec)
            history[u] = ids + rec["output_ids"]
            say("request", **{k: v for k, v in rec.items() if k != "output_ids"})
    wall = time.perf_counter() - t_run
    if cfg != "nocache":
        for u in range(min(hot_users, users)):
            for extra in (0, 1):
                if extra and cfg in STORE_HITS:
                    # vLLM forgets everything: the same request the prefix_cache configuration serves
                    # from vLLM's own cache is served here from the connector's store.
                    reset_prefix_cache(engine)
                ids = next_prompt(wl, history[u], u, rounds + extra)
                rec = one(ids)
                rec.update(phase="hot" if extra else "hot_first", round=rounds + 1 + extra, user=u)
                requests.append(rec)
                history[u] = ids + rec["output_ids"]
                say("request", **{k: v for k, v in rec.items() if k != "output_ids"})
    out: dict[str, Any] = {"requests": requests, "wall_s": wall}
    if connector is not None:
        out["connector_stats"] = dict(connector.stats)
    Path(spec["out"]).write_text(json.dumps(out))
    say("done")
    return 0


# ---------------------------------------------------------------------------------------- parent


def run_config(
    name: str, spec: dict[str, Any], root: Path, env: dict[str, str], say: Callable[[str], None],
    silence_s: float = 600.0,
) -> dict[str, Any]:  # fmt: skip
    """Start the worker for one configuration, relay its progress, return its results. A worker that
    reports no progress for `silence_s` seconds (a hung engine or connector) is killed: RuntimeError."""
    cdir = root / name
    (cdir / "tmp").mkdir(parents=True, exist_ok=True)
    spec = {**spec, "config": name, "out": str(cdir / "result.json")}
    (cdir / "spec.json").write_text(json.dumps(spec))
    log_path = cdir / "vllm.log"
    t0 = time.perf_counter()
    ready: dict[str, Any] = {}

    def on_event(msg: dict[str, Any]) -> None:
        if msg["event"] == "ready":
            ready.update(msg)
            say(f"{name}: vLLM ready (import {msg['import_s']:.1f} s, engine {msg['start_s']:.1f} s)")
        elif msg["event"] == "request":
            extra = f" ({msg['external_tokens']} via the connector)" if "external_tokens" in msg else ""
            others = msg["others_cpu_s"]
            say(
                f"{name}: round {msg['round']} user {msg['user']} ({msg['phase']}): "
                f"{msg['prompt_tokens']} prompt tokens, {msg['cached_tokens']} cached{extra}, "
                f"TTFT {msg['ttft_s']:.3f} s, total {msg['latency_s']:.2f} s"
                + (f" (other processes: {others:.1f} CPU s)" if others > 0.5 else "")
            )

    argv = [sys.executable, "-m", "polarkvd.bench.chat", "--worker", str(cdir / "spec.json")]
    env = {**env, "TMPDIR": str(cdir / "tmp")}
    code, tail, stalled = relay_worker(argv, env, cdir, log_path, MARK, on_event, silence_s)
    result_path = Path(spec["out"])
    if code != 0 or not result_path.exists():
        why = f"no progress for {silence_s:.0f} s, killed" if stalled else f"exit {code}"
        last = next((ln.strip() for ln in reversed(tail) if ln.strip()), "")[-300:]
        raise RuntimeError(
            f"{name}: the vLLM worker failed ({why}): {last} (log {log_path})\n" + "".join(tail)
        )
    res = json.loads(result_path.read_text())
    res["process_s"] = time.perf_counter() - t0
    res["import_s"], res["engine_start_s"] = ready.get("import_s"), ready.get("start_s")
    return res


def summarize(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Per-round TTFT and hits, TTFT over rounds >= 2, hit-only TTFT, hot-hit TTFT, throughput."""
    reqs = raw["requests"]
    main = [q for q in reqs if q["phase"] == "rounds"]
    slack = hit_slack(args)
    rounds = []
    for r in range(1, args.rounds + 1):
        rq = [q for q in main if q["round"] == r]
        row = {
            "round": r,
            "ttft_s": mean_percentiles([q["ttft_s"] for q in rq]),
            "prompt_tokens_mean": sum(q["prompt_tokens"] for q in rq) / len(rq),
            "hit_tokens_mean": sum(q["cached_tokens"] for q in rq) / len(rq),
            "hit_tokens_total": sum(q["cached_tokens"] for q in rq),
        }
        if rq and "external_tokens" in rq[0]:
            row["external_tokens_total"] = sum(q["external_tokens"] for q in rq)
        if rq and "loaded_tokens" in rq[0]:
            row["loaded_tokens_total"] = sum(q["loaded_tokens"] for q in rq)
        rounds.append(row)
    later = [q for q in main if q["round"] >= 2]
    # With a connector, a hit must also come (at least partly) from the connector, not only from vLLM.
    hits = [
        q
        for q in later
        if q["prompt_tokens"] - q["cached_tokens"] <= slack and q.get("external_tokens", 1) > 0
    ]
    hot = [q for q in reqs if q["phase"] == "hot"]
    wall = raw["wall_s"]
    prompt = sum(q["prompt_tokens"] for q in main)
    out_tok = sum(len(q["output_ids"]) for q in main)
    computed = sum(q["prompt_tokens"] - q["cached_tokens"] for q in main)
    res: dict[str, Any] = {
        "rounds": rounds,
        "ttft_rounds2plus_s": mean_percentiles([q["ttft_s"] for q in later]),
        "hit_ttft_s": mean_percentiles([q["ttft_s"] for q in hits]),
        "hit_requests": len(hits),
        "hot_hit_ttft_s": mean_percentiles([q["ttft_s"] for q in hot]),
        "hot_hit_tokens_mean": sum(q["cached_tokens"] for q in hot) / len(hot) if hot else None,
        "wall_s": wall,
        "requests": len(main),
        "requests_per_s": len(main) / wall,
        "tokens_per_s": (prompt + out_tok) / wall,
        "output_tokens_per_s": out_tok / wall,
        "prompt_tokens": prompt,
        "output_tokens": out_tok,
        "hit_tokens": sum(q["cached_tokens"] for q in main),
        "external_hit_tokens": sum(q.get("external_tokens", 0) for q in main)
        if "external_tokens" in main[0]
        else None,
        "computed_prompt_tokens": computed,
        "decode_s_per_token": mean_percentiles(
            [(q["latency_s"] - q["ttft_s"]) / max(1, len(q["output_ids"]) - 1) for q in main]
        )["p50"],
        "others_cpu_s": sum(q.get("others_cpu_s", 0.0) for q in main),
        "engine_cpu_s": sum(q.get("cpu_s", 0.0) for q in main),
        "engine_start_s": raw.get("engine_start_s"),
        "import_s": raw.get("import_s"),
        "process_s": raw.get("process_s"),
        "per_request": [{k: v for k, v in q.items() if k != "output_ids"} for q in reqs],
    }
    if "connector_stats" in raw:
        res["connector_stats"] = raw["connector_stats"]
        res["loaded_tokens"] = sum(q.get("loaded_tokens", 0) for q in main)
        lat = [q for q in later if q.get("loaded_tokens")]
        res["load_copy_s_mean"] = sum(q["load_copy_s"] for q in lat) / len(lat) if lat else None
        res["load_rpc_s_mean"] = sum(q["load_rpc_s"] for q in lat) / len(lat) if lat else None
        res["save_s_total"] = sum(q.get("save_s", 0.0) for q in main)
    return res


def compare(
    configs: dict[str, dict[str, Any]], outputs: dict[str, dict[tuple[str, int, int], list[int]]]
) -> dict[str, Any]:
    """Headline ratios (polarkvd over the others), the bars, and whether greedy outputs agree."""
    pk = configs.get("polarkvd")

    def r2(name: str) -> float | None:
        c = configs.get(name)
        return c["ttft_rounds2plus_s"]["mean"] if c else None

    res: dict[str, Any] = {}
    mine = r2("polarkvd")
    res["ttft_ratio_vs_nocache"] = ratio(mine, r2("nocache"))
    res["ttft_ratio_vs_prefix_cache"] = ratio(mine, r2("prefix_cache"))
    res["ttft_ratio_vs_example_connector"] = ratio(mine, r2("example_connector"))
    pc, ex = configs.get("prefix_cache"), configs.get("example_connector")

    def rps(name: str) -> float | None:
        c = configs.get(name)
        return c["requests_per_s"] if c else None

    res["throughput_ratio_vs_prefix_cache"] = ratio(rps("polarkvd"), rps("prefix_cache"))
    for peer in PEERS:  # the real peers: rounds >= 2 TTFT and throughput
        res[f"ttft_ratio_vs_{peer}"] = ratio(mine, r2(peer))
        res[f"throughput_ratio_vs_{peer}"] = ratio(rps("polarkvd"), rps(peer))
    # Hits against hits, on the same requests: the hot phase's second turn (vLLM holds the history in
    # prefix_cache; polarkvd's vLLM was reset, so it comes from the daemon) ...
    res["hit_ttft_ratio_vs_prefix_cache_hot"] = ratio(
        pk["hot_hit_ttft_s"]["mean"] if pk else None, pc["hot_hit_ttft_s"]["mean"] if pc else None
    )
    # ... and the requests ExampleConnector served from its disk store (rounds >= 2 and hot first turns).
    same: list[tuple[float, float]] = []
    if pk and ex:
        mine_by_key = {(q["phase"], q["round"], q["user"]): q for q in pk["per_request"]}
        for q in ex["per_request"]:
            key = (q["phase"], q["round"], q["user"])
            if (
                q["phase"] != "hot"
                and q["round"] >= 2
                and q.get("external_tokens", 0) > 0
                and key in mine_by_key
            ):
                same.append((mine_by_key[key]["ttft_s"], q["ttft_s"]))
    res["example_connector_hit_requests"] = len(same)
    res["hit_ttft_ratio_vs_example_connector"] = (
        ratio(sum(a for a, _ in same) / len(same), sum(b for _, b in same) / len(same)) if same else None
    )
    # Greedy token ids of every request, compared across the configurations that ran it (all of them
    # for the rounds; the hot phase is not run without prefix caching).
    names = list(outputs)
    keys = sorted(set().union(*(set(o) for o in outputs.values()))) if outputs else []
    mismatches, compared = [], 0
    for key in keys:
        have = [n for n in names if key in outputs[n]]
        if len(have) < 2:
            continue
        compared += 1
        ref = outputs[have[0]][key]
        for n in have[1:]:
            if outputs[n][key] != ref:
                mismatches.append(
                    {"config": n, "vs": have[0], "phase": key[0], "round": key[1], "user": key[2]}
                )
    res["outputs_identical"] = compared > 0 and not mismatches
    res["outputs_compared"] = {"configs": names, "requests": compared, "mismatches": mismatches[:10]}
    res["bars"] = {}
    for name, (op, bar) in BARS.items():
        v = res.get(name)
        ok = None if v is None else (v <= bar if op == "<=" else v >= bar)
        res["bars"][name] = {"value": v, "bar": f"{op} {bar:.4g}", "pass": ok}
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    from polarkvd.models import ensure_smollm2

    if args.users < 1 or args.rounds < 1 or min(args.system, args.history, args.turn, args.answer) < 1:
        raise SystemExit("polarkvd bench chat: --users, --rounds and the token counts must be >= 1")
    configs = list(dict.fromkeys(args.configs))
    block = args.block_size
    chunk = args.lmcache_chunk or block
    if chunk < block or chunk % block:
        raise SystemExit(
            f"polarkvd bench chat: --lmcache-chunk {chunk} is not a multiple of --block-size {block}"
        )
    model_dir = args.model or str(ensure_smollm2())
    wl = build_workload(args, model_dir)
    size = engine_sizing(args, wl)
    if size["kv_blocks"] <= size["max_model_len"] // block:  # one block is vLLM's null block
        raise SystemExit(f"polarkvd bench chat: --kv-blocks {size['kv_blocks']} cannot hold the longest "
                         f"conversation: at least {size['max_model_len'] // block + 1} blocks of {block} tokens")  # fmt: skip
    bind = args.cpus or cpu_bind()
    ncpu = len(os.sched_getaffinity(0)) if not args.cpus else max(1, count_cpus(args.cpus))
    kv_token_bytes = model_kv_bytes_per_token(model_dir)
    page_bytes = kv_token_bytes * block
    hot = 2 * min(args.hot_users, args.users)
    prog = Steps(sum(args.rounds * args.users + (hot if c != "nocache" else 0) + 2 for c in configs) + 1)
    root = Path(tempfile.mkdtemp(prefix="polarkv-chat-"))
    env = vllm_env(bind, ncpu)
    spec: dict[str, Any] = {
        "model": model_dir,
        "workload": wl,
        "users": args.users,
        "rounds": args.rounds,
        "answer": args.answer,
        "hot_users": args.hot_users,
        "first_prompt_tokens": prompt_tokens(wl, args.answer, 0),
        **size,
    }
    working_set_pages = size["all_histories_tokens"] // block + 4 * args.users + 8
    dram = max(512 << 20, int(working_set_pages * page_bytes * 1.5))
    dram = -(-dram // (64 << 20)) * (64 << 20)
    store = max(1 << 30, 2 * working_set_pages * page_bytes)  # LMCache's L1, Mooncake's segment
    workload = {
        "users": args.users,
        "rounds": args.rounds,
        "system_tokens": args.system,
        "history_tokens": args.history,
        "turn_tokens": args.turn,
        "answer_tokens": args.answer,
        "seed": args.seed,
        "hot_users": min(args.hot_users, args.users),
        "first_prompt_tokens": prompt_tokens(wl, args.answer, 0),
        "last_prompt_tokens": prompt_tokens(wl, args.answer, args.rounds - 1),
        "shared_prefix_tokens": len(wl["system"]),
        "model": Path(model_dir).name,
        "dtype": "float32",
        "block_tokens": block,
        "kv_bytes_per_token": kv_token_bytes,
        "vllm_cpu_omp_threads_bind": bind,
        "daemon_dram_bytes": dram,
        "lmcache_chunk_tokens": chunk,
        "peer_store_bytes": store,
        "ttft_method": "wall time from LLMEngine.add_request() to the engine.step() returning the first "
        "output token; one request in flight; same code for every configuration",
        "concurrency": 1,
        **size,
    }
    say = prog.step
    raws: dict[str, dict[str, Any]] = {}
    not_available: dict[str, str] = {}
    servers: dict[str, str] = {}
    try:
        for name in configs:
            say(f"{name}: starting vLLM ({CONFIG_HELP[name]})")
            cspec = dict(spec)
            if name == "example_connector":
                cspec["example_dir"] = str(root / "example-kv")
                (root / "example-kv").mkdir()
            if name == "polarkvd":
                sets = {
                    "dram.capacity": str(dram),
                    "dram.slab_bytes": "64MiB",
                    "disk.enabled": "false",
                    "daemon.log_level": "warning",
                }
                with private_daemon(sets, keep=args.keep) as (engine_sock, _control):
                    cspec["socket"] = str(engine_sock)
                    raws[name] = run_config(name, cspec, root, env, say)
            elif name in PEERS:
                (root / name).mkdir(parents=True, exist_ok=True)
                try:
                    server = (lmcache_server(root / name, chunk, store, env) if name == "lmcache"
                              else mooncake_store(root / name, store, env))  # fmt: skip
                    with server as peer:
                        cspec["peer_extra"], servers[name] = peer["extra_config"], peer["server"]
                        raws[name] = run_config(name, cspec, root, peer["env"], say)
                except RuntimeError as e:  # PeerUnavailable, or vLLM failing with it: the others go on
                    not_available[name] = str(e).splitlines()[0]
                    say(f"{name}: not available: {e}")
            else:
                raws[name] = run_config(name, cspec, root, env, say)
            if name == "example_connector":
                shutil.rmtree(root / "example-kv", ignore_errors=True)  # GBs of safetensors
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    say("done")
    configs_out = {n: summarize(raw, args) for n, raw in raws.items()}
    outputs = {
        n: {(q["phase"], q["round"], q["user"]): q["output_ids"] for q in raw["requests"]}
        for n, raw in raws.items()
    }
    head = compare(configs_out, outputs)
    res: dict[str, Any] = {k: head[k] for k in (
        "ttft_ratio_vs_nocache", "ttft_ratio_vs_prefix_cache", "ttft_ratio_vs_example_connector",
        "ttft_ratio_vs_lmcache", "ttft_ratio_vs_mooncake", "throughput_ratio_vs_prefix_cache",
        "throughput_ratio_vs_lmcache", "throughput_ratio_vs_mooncake", "outputs_identical",
    )}  # fmt: skip
    res.update({k: v for k, v in head.items() if k not in res})
    res["not_available"] = not_available
    res["workload"] = {**workload, "peer_servers": servers}
    res["configs"] = configs_out
    res["notes"] = [
        "ExampleConnector breaks on chunked prefill: max_num_batched_tokens "
        f"({size['max_num_batched_tokens']}) >= the longest prompt ({size['longest_prompt_tokens']}) in "
        "every configuration, so no prompt is chunked",
        f"vLLM KV cache: {size['kv_blocks']} blocks = {size['kv_tokens']} tokens "
        f"(num_gpu_blocks_override); all users' histories: {size['all_histories_tokens']} tokens"
        + (" (it holds everyone: use more users or --kv-blocks)" if size["kv_holds_everyone"] else ""),
        "polarkvd daemon: private, DRAM only (disk tier off), "
        f"{dram >> 20} MiB; vLLM prefix caching on in every configuration but nocache",
        f"peers: private servers, fresh per run, {store >> 20} MiB each (LMCache L1, Mooncake segment); "
        f"LMCache chunk {chunk} tokens (its hits come in whole chunks)",
        "hot hit: the second of two back-to-back turns; vLLM holds the history in prefix_cache and "
        "example_connector; polarkvd, lmcache and mooncake reset vLLM's prefix cache first (from the store)",
        "ExampleConnector hits only when a prompt's block-aligned prefix equals an earlier prompt's "
        "(it keys whole prompts, not pages); its hit ratio is over exactly those requests",
    ]
    if root.exists():
        res["run_dir"] = str(root)
    return res


def render(res: dict[str, Any]) -> str:
    wl, cfgs = res["workload"], res["configs"]
    lines = [
        f"workload: {wl['users']} users x {wl['rounds']} rounds, system {wl['system_tokens']} + history "
        f"{wl['history_tokens']} tokens, turn {wl['turn_tokens']}, answer {wl['answer_tokens']} "
        f"(prompts {wl['first_prompt_tokens']}..{wl['last_prompt_tokens']} tokens), seed {wl['seed']}, "
        f"{wl['model']} {wl['dtype']}, VLLM_CPU_OMP_THREADS_BIND={wl['vllm_cpu_omp_threads_bind']}",
        *("note: " + n for n in res["notes"]),
        *(f"{n}: not available: {why}" for n, why in res.get("not_available", {}).items()),
        "",
    ]
    rows: list[tuple[object, ...]] = []
    for name, c in cfgs.items():
        for row in c["rounds"]:
            t = row["ttft_s"]
            rows.append((
                name, str(row["round"]), fmt(t["mean"]), fmt(t["p50"]), fmt(t["p99"]),
                f"{row['prompt_tokens_mean']:.0f}", f"{row['hit_tokens_mean']:.0f}",
                str(row.get("external_tokens_total", "-")),
            ))  # fmt: skip
    lines.append(table(rows, ("config", "round", "TTFT mean s", "p50 s", "p99 s", "prompt tok",
                              "hit tok", "via connector")))  # fmt: skip
    lines.append("")
    rows = []
    for name, c in cfgs.items():
        t, h, hot = c["ttft_rounds2plus_s"], c["hit_ttft_s"], c["hot_hit_ttft_s"]
        rows.append((
            name, fmt(t["mean"]), fmt(t["p50"]), fmt(t["p99"]), f"{fmt(h['mean'])} ({h['n']})",
            fmt(hot["mean"]) if hot["n"] else "-", fmt(c["tokens_per_s"], 1),
            fmt(c["output_tokens_per_s"], 2), fmt(c["requests_per_s"], 4), fmt(c["wall_s"], 1),
            str(c["hit_tokens"]), fmt(c["others_cpu_s"], 1),
        ))  # fmt: skip
    lines.append(table(rows, ("config", "TTFT r>=2 mean s", "p50 s", "p99 s", "hit TTFT s (n)",
                              "hot hit TTFT s", "tok/s", "out tok/s", "req/s", "wall s",
                              "hit tokens", "others CPU s")))  # fmt: skip
    lines.append("")
    rows = []
    for key, b in res["bars"].items():
        verdict = "-" if b["pass"] is None else ("pass" if b["pass"] else "FAIL")
        rows.append((key, fmt(b["value"], 4), b["bar"], verdict))
    rows.append(("ttft_ratio_vs_prefix_cache", fmt(res["ttft_ratio_vs_prefix_cache"], 4), "", ""))
    rows.append(("ttft_ratio_vs_example_connector", fmt(res["ttft_ratio_vs_example_connector"], 4), "", ""))
    rows += [(n, "not available", "", "") for n in res.get("not_available", {})]
    rows.append(("outputs_identical", str(res["outputs_identical"]),
                 f"{res['outputs_compared']['requests']} requests", ""))  # fmt: skip
    lines.append(table(rows, ("polarkvd vs", "ratio", "bar", "")))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    return bench_main("chat", args, run, render)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2]))
    parser = argparse.ArgumentParser(prog="polarkvd bench chat")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
