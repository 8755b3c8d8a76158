"""`polarkvd bench blend`: CacheBlend's selective recompute against full prefill and prefix caching,
TTFT and quality side by side, on retrieval-style prompts, SmolLM2 on CPU through `transformers`.

The text is Python's own help topics (`pydoc_data.topics`, shipped with every CPython): a pool of
chunks of 256–512 tokens cut from them, each followed in its topic by a real continuation. A prompt
is a short chat header, 4–8 chunks drawn from the pool in a shuffled order, and a short instruction
or question (one of `INSTRUCTIONS`). The chunks are computed on their own behind the header and
stored in a private daemon first (what a RAG deployment does once per document), then every prompt
runs under every setting:

- `full`: a full prefill (`transformers`, no cache);
- `prefix`: prefix pages (polarkvd, `PolarKVGenerator.prefill`): hits only where a prompt starts as
  an earlier one did;
- `r0`: naive chunk reuse (cached chunks re-rotated, nothing recomputed);
- `r05`, `r15`, `r30`: CacheBlend with r = 0.05, 0.15, 0.30 (the generator's defaults otherwise).

TTFT is the time from the prompt's tokens to its first token's logits (chunk and page loads
included). Quality against the full prefill: first-token agreement, the KL divergence of the next-token
distribution from the full prefill's, greedy answer agreement (the fraction of the first
`--answer-tokens` positions with the same token) and the log-likelihood of the last chunk's real
continuation (teacher-forced), as a mean relative difference.

`--prompt-range A:B` runs a piece of the same prompts (a long run in turns of a shared machine);
`--merge` makes one result of the pieces' `--json`, as the whole run would have printed it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Any

from polarkvd.bench import plots
from polarkvd.bench.harness import bench_main, fmt, private_daemon, table
from polarkvd.blend import DEFAULT_KEEP_LAST
from polarkvd.progress import Progress

SETTINGS = ("full", "prefix", "r0", "r05", "r15", "r30")
RATIOS = {"r0": 0.0, "r05": 0.05, "r15": 0.15, "r30": 0.30}
LABELS = {
    "full": "full prefill",
    "prefix": "prefix caching",
    "r0": "naive reuse (r=0)",
    "r05": "CacheBlend r=0.05",
    "r15": "CacheBlend r=0.15",
    "r30": "CacheBlend r=0.30",
}
HEADER = "<|im_start|>system\nYou answer from the documents the user gives.<|im_end|>\n<|im_start|>user\n"
#: The short instruction or question after the chunks, one drawn per prompt; per-instruction
#: figures are in the JSON (`by_instruction`).
INSTRUCTIONS = (
    "Continue the last document.",
    "What is the last document about?",
    "Which of these documents explains the topic best?",
)
TURN = "\n{}<|im_end|>\n<|im_start|>assistant\n"
BAR_TTFT_RATIO = 1 / 2.2
BAR_FIRST_TOKEN = 0.9
BAR_LOGLIK = 0.03


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--prompts", type=int, default=100, help="prompts (default 100)")
    p.add_argument("--pool", type=int, default=40, help="chunks to draw prompts from (default 40)")
    p.add_argument("--min-chunks", type=int, default=4)
    p.add_argument("--max-chunks", type=int, default=8)
    p.add_argument("--min-tokens", type=int, default=256, help="shortest chunk (tokens)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest chunk (tokens)")
    p.add_argument("--answer-tokens", type=int, default=32, help="greedy answer and continuation length")
    p.add_argument("--page-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="", help="model directory (default: the converted SmolLM2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--keep-last", type=int, default=None,
                   help="reused tokens before the question always recomputed (default: the generator's, 64)")  # fmt: skip
    p.add_argument("--chunks-from-zero", action="store_true",
                   help="chunks computed from position 0, not behind the header (with --keep-last 0: "
                   "the method before chunks were kept behind the header)")  # fmt: skip
    p.add_argument("--prompt-range", metavar="A:B", default="",
                   help="run only prompts A..B-1 of the --prompts (the same prompts as a whole run); "
                   "--merge the pieces' --json into one result")  # fmt: skip
    p.add_argument("--merge", metavar="JSON", nargs="+", default=None,
                   help="do not run: merge the --json outputs of --prompt-range pieces into one result")  # fmt: skip
    plots.add_plot_arguments(p)


def _range(spec: str, prompts: int) -> tuple[int, int]:
    if not spec:
        return 0, prompts
    try:
        a, b = (int(x) for x in spec.split(":"))
    except ValueError:
        raise SystemExit(f"bench blend: --prompt-range wants A:B (two integers), not {spec!r}") from None
    if not 0 <= a < b <= prompts:
        raise SystemExit(f"bench blend: --prompt-range {spec} is not a range inside 0:{prompts}")
    return a, b


def _pool(tok: Any, args: argparse.Namespace, rng: random.Random) -> list[tuple[list[int], list[int]]]:
    """(chunk tokens, continuation tokens) cut from Python's help topics, longest topics first."""
    from pydoc_data.topics import topics

    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    need = args.max_tokens + args.answer_tokens
    texts = sorted(topics.values(), key=len, reverse=True)
    pool: list[tuple[list[int], list[int]]] = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        at = 0
        while at + need <= len(ids) and len(pool) < args.pool:
            n = rng.randint(args.min_tokens, args.max_tokens)
            pool.append((ids[at : at + n] + sep, ids[at + n : at + n + args.answer_tokens]))
            at += n + args.answer_tokens
        if len(pool) >= args.pool:
            break
    if len(pool) < args.max_chunks:
        raise SystemExit(f"bench blend: only {len(pool)} chunks of text; ask for fewer or shorter chunks")
    return pool


def _greedy(model: Any, cache: Any, logits: Any, n: int) -> list[int]:
    import torch

    out = [int(logits.argmax())]
    with torch.inference_mode():
        for _ in range(n - 1):
            step = model(torch.tensor([[out[-1]]]), past_key_values=cache, use_cache=True)
            out.append(int(step.logits[0, -1].argmax()))
    return out


def _loglik(model: Any, cache: Any, logits: Any, cont: list[int]) -> float:
    import torch

    with torch.inference_mode():
        rest = model(torch.tensor([cont[:-1]]), past_key_values=cache, use_cache=True).logits[0]
        allz = torch.cat((logits[None], rest)).log_softmax(-1)
        return float(allz[torch.arange(len(cont)), torch.tensor(cont)].sum())


def run(args: argparse.Namespace) -> dict[str, Any]:
    first, end = _range(args.prompt_range, args.prompts)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    from polarkvd.client import ControlClient
    from polarkvd.connectors.hf import PolarKVGenerator, Prefill
    from polarkvd.models import ensure_smollm2

    if not 1 <= args.min_chunks <= args.max_chunks or not 1 <= args.min_tokens <= args.max_tokens:
        raise SystemExit(
            "bench blend: need 1 <= --min-chunks <= --max-chunks and --min-tokens <= --max-tokens"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    path = args.model or str(ensure_smollm2())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pool = _pool(tok, args, rng)
    header = tok(HEADER, add_special_tokens=False)["input_ids"]
    turns = [tok(TURN.format(q), add_special_tokens=False)["input_ids"] for q in INSTRUCTIONS]
    prompts = []
    for _ in range(args.prompts):
        picked = rng.sample(range(len(pool)), rng.randint(args.min_chunks, args.max_chunks))
        prompts.append((picked, rng.randrange(len(INSTRUCTIONS))))
    prompts = prompts[first:end]
    used = sorted({i for picked, _ in prompts for i in picked})
    context = [] if args.chunks_from_zero else header
    method: dict[str, Any] = {"behind_prefix": not args.chunks_from_zero}
    if args.keep_last is not None:
        method["keep_last"] = args.keep_last
    per: dict[str, list[dict[str, Any]]] = {s: [] for s in SETTINGS}
    sets = {"dram.capacity": "2GiB", "disk.enabled": "false", "daemon.log_level": "warning"}
    with (
        private_daemon(sets) as (engine_sock, control_sock),
        Progress(len(prompts) + 1, label="bench blend") as prog,
    ):
        prog.step(f"{len(used)} chunks computed on their own, stored and pinned")
        with PolarKVGenerator(model, tok, socket_path=engine_sock, page_tokens=args.page_tokens) as g:
            chunk_keys = []
            for i in used:
                g.chunk(pool[i][0], context=context)
                chunk_keys += g.chunk_keys(pool[i][0], context=context)
        # The corpus stays in DRAM, as a RAG deployment keeps its documents: the prefix setting's
        # pages (every prompt's) would otherwise evict chunks, and blends would prefill them instead.
        with ControlClient(control_sock) as c:
            pinned = c.pin(chunk_keys)
        # prefix pages and blends in sessions of their own: the prefix setting stores what it computed,
        # blends never store (their chunks are all in the daemon already)
        with PolarKVGenerator(model, tok, socket_path=engine_sock, page_tokens=args.page_tokens) as pg, \
                PolarKVGenerator(model, tok, socket_path=engine_sock, page_tokens=args.page_tokens,
                                 store=False) as bg:  # fmt: skip
            for n, (picked, which) in enumerate(prompts, start=first):
                instruction = turns[which]
                prog.step(f"prompt {n + 1} of {first + 1}-{end}: {len(picked)} chunks")
                chunks = [pool[i][0] for i in picked]
                cont = pool[picked[-1]][1]
                ids = header + [t for c in chunks for t in c] + instruction
                order = list(SETTINGS)
                # no setting always first (warm caches) or last; per prompt, so a piece runs as the whole
                random.Random(args.seed * 1_000_003 + n).shuffle(order)
                results: dict[str, tuple[Prefill, float]] = {}
                for s in order:
                    # TTFT: the prompt's tokens to its first token's logits (Prefill.seconds stops
                    # there: the prefix setting's store of new pages comes after)
                    if s == "full":
                        t0 = time.perf_counter()
                        with torch.inference_mode():
                            out = model(torch.tensor([ids]), use_cache=True)
                        ttft = time.perf_counter() - t0
                        layers = out.past_key_values.layers
                        p = Prefill(ids, torch.stack([x.keys[0] for x in layers]),
                                    torch.stack([x.values[0] for x in layers]), out.logits[0, -1])  # fmt: skip
                    elif s == "prefix":
                        p = pg.prefill(ids)
                        ttft = p.seconds
                    else:
                        p = bg.blend(chunks, instruction, r=RATIOS[s], prefix=header, **method)
                        ttft = p.seconds
                    results[s] = (p, ttft)
                full = results["full"][0]
                want = _greedy(model, full.cache(model), full.logits, args.answer_tokens)
                ll_full = _loglik(model, full.cache(model), full.logits, cont)
                logp_full = full.logits.log_softmax(-1)
                for s in SETTINGS:
                    p, ttft = results[s]
                    ans = (
                        want if s == "full" else _greedy(model, p.cache(model), p.logits, args.answer_tokens)
                    )
                    ll = ll_full if s == "full" else _loglik(model, p.cache(model), p.logits, cont)
                    per[s].append({
                        "ttft_s": ttft, "tokens": len(ids), "loaded_tokens": p.loaded_tokens,
                        "chunk_tokens": len(ids) - len(header) - len(instruction), "instruction": which,
                        "recomputed": p.recomputed, "reused": p.reused,
                        "first_token": ans[0] == want[0],
                        "answer": sum(a == b for a, b in zip(ans, want)) / len(want),
                        "loglik": ll, "loglik_rel_diff": abs(ll - ll_full) / abs(ll_full),
                        "kl": _kl(logp_full, p.logits), "prompt": n,
                    })  # fmt: skip
    res = summarize(per, _config(args, len(pool)))
    res["prompt_range"] = [first, end]
    res["chunks_pinned"] = pinned
    res["per_prompt"] = per
    return res


def _kl(logp_full: Any, logits: Any) -> float:
    """KL divergence of the setting's next-token distribution from the full prefill's (nats)."""
    logp = logits.log_softmax(-1)
    return max(0.0, float((logp_full.exp() * (logp_full - logp)).sum()))


#: What must be equal in pieces that are merged (they are pieces of one run).
_CONFIG = ("model", "prompts_total", "seed", "pool_chunks", "chunks_per_prompt", "chunk_tokens",
           "answer_tokens", "page_tokens", "chunks_behind_header", "keep_last")  # fmt: skip


def _config(args: argparse.Namespace, pool: int) -> dict[str, Any]:
    return {
        "model": "smollm2-135m" if not args.model else os.path.basename(args.model.rstrip("/")),
        "prompts_total": args.prompts,
        "seed": args.seed,
        "pool_chunks": pool,
        "chunks_per_prompt": [args.min_chunks, args.max_chunks],
        "chunk_tokens": [args.min_tokens, args.max_tokens],
        "answer_tokens": args.answer_tokens,
        "page_tokens": args.page_tokens,
        "torch_threads": _threads(),
        "chunks_behind_header": not args.chunks_from_zero,
        "keep_last": DEFAULT_KEEP_LAST if args.keep_last is None else args.keep_last,
    }


def merge(paths: list[str]) -> dict[str, Any]:
    """One result from the --json outputs of --prompt-range pieces of the same run (no prompt twice)."""
    pieces = []
    for path in paths:
        try:
            with open(path) as f:
                res = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"bench blend: cannot read {path}: {e}") from None
        if res.get("bench") != "blend" or "per_prompt" not in res:
            raise SystemExit(f"bench blend: {path} is not a bench blend --json output with per-prompt rows")
        pieces.append((path, res))
    first = pieces[0][1]
    for path, res in pieces[1:]:
        if differ := [k for k in _CONFIG if res.get(k) != first.get(k)]:
            raise SystemExit(f"bench blend: {path} is a piece of another run ({', '.join(differ)} differ)")
    pieces.sort(key=lambda p: p[1]["prompt_range"][0])
    for (pa, a), (pb, b) in zip(pieces, pieces[1:]):
        if b["prompt_range"][0] < a["prompt_range"][1]:
            raise SystemExit(
                f"bench blend: {pa} and {pb} overlap (prompts {a['prompt_range']}, {b['prompt_range']})"
            )
    per = {s: [row for _, res in pieces for row in res["per_prompt"][s]] for s in SETTINGS}
    config = {k: first.get(k) for k in (*_CONFIG, "torch_threads")}
    out = summarize(per, config)
    out["prompt_range"] = [pieces[0][1]["prompt_range"][0], pieces[-1][1]["prompt_range"][1]]
    out["pieces"] = [res["prompt_range"] for _, res in pieces]
    out["chunks_pinned"] = [res.get("chunks_pinned") for _, res in pieces]  # each piece's daemon
    out["per_prompt"] = per
    return out


def summarize(per: dict[str, list[dict[str, Any]]], config: dict[str, Any]) -> dict[str, Any]:
    full_ttft = statistics.mean(r["ttft_s"] for r in per["full"])
    settings: dict[str, Any] = {}
    for s in SETTINGS:
        rows = per[s]
        ttft = statistics.mean(r["ttft_s"] for r in rows)
        reused = sum(r["reused"] for r in rows)
        settings[s] = {
            "label": LABELS[s],
            "r": RATIOS.get(s),
            "ttft_mean_s": ttft,
            "ttft_median_s": statistics.median(r["ttft_s"] for r in rows),
            "ttft_ratio": ttft / full_ttft,
            "first_token_agreement": statistics.mean(float(r["first_token"]) for r in rows),
            "answer_agreement": statistics.mean(r["answer"] for r in rows),
            "loglik_mean": statistics.mean(r["loglik"] for r in rows),
            "loglik_rel_diff": statistics.mean(r["loglik_rel_diff"] for r in rows),
            "kl_mean": statistics.mean(r["kl"] for r in rows),
            "loaded_tokens_fraction": sum(r["loaded_tokens"] for r in rows) / sum(r["tokens"] for r in rows),
            "recomputed_fraction": (sum(r["recomputed"] for r in rows) / reused) if reused else None,
            # blends: the chunk tokens whose KV came from the daemon (below 1: chunks were evicted)
            "reused_fraction": reused / sum(r["chunk_tokens"] for r in rows),
            "by_instruction": {
                q: {
                    "prompts": len(sub),
                    "first_token_agreement": statistics.mean(float(r["first_token"]) for r in sub),
                    "loglik_rel_diff": statistics.mean(r["loglik_rel_diff"] for r in sub),
                    "kl_mean": statistics.mean(r["kl"] for r in sub),
                }
                for i, q in enumerate(INSTRUCTIONS)
                if (sub := [r for r in rows if r["instruction"] == i])
            },
        }
    r15, r0 = settings["r15"], settings["r0"]
    tokens = [r["tokens"] for r in per["full"]]
    return {
        "bench": "blend",
        **config,
        "dtype": "float32",
        "engine": "transformers (CPU)",
        "prompts": len(tokens),
        "prompt_tokens_mean": statistics.mean(tokens),
        "settings": settings,
        "ttft_ratio_r15": r15["ttft_ratio"],
        "first_token_agreement_r15": r15["first_token_agreement"],
        "loglik_rel_diff_r15": r15["loglik_rel_diff"],
        "kl_r15": r15["kl_mean"],
        "kl_r0": r0["kl_mean"],
        "first_token_agreement_r0": r0["first_token_agreement"],
        "loglik_rel_diff_r0": r0["loglik_rel_diff"],
        "bars": {
            "ttft_ratio_r15_at_most": BAR_TTFT_RATIO,
            "first_token_agreement_r15_at_least": BAR_FIRST_TOKEN,
            "loglik_rel_diff_r15_at_most": BAR_LOGLIK,
        },
        "bars_met": {
            "ttft": r15["ttft_ratio"] <= BAR_TTFT_RATIO,
            "first_token": r15["first_token_agreement"] >= BAR_FIRST_TOKEN,
            "loglik": r15["loglik_rel_diff"] <= BAR_LOGLIK,
            "naive_worse": r0["first_token_agreement"] < r15["first_token_agreement"]
            and r0["loglik_rel_diff"] > r15["loglik_rel_diff"],
        },
    }


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


def render(res: dict[str, Any]) -> str:
    rows = []
    for s in SETTINGS:
        r = res["settings"][s]
        rows.append([
            r["label"], fmt(r["ttft_mean_s"]), fmt(r["ttft_ratio"], 3), fmt(r["first_token_agreement"], 3),
            fmt(r["answer_agreement"], 3), fmt(r["loglik_rel_diff"] * 100, 2), fmt(r["kl_mean"], 4),
            fmt(r["recomputed_fraction"], 3) if r["recomputed_fraction"] is not None else "-",
            fmt(r["reused_fraction"], 3) if s in RATIOS else "-", fmt(r["loaded_tokens_fraction"], 3),
        ])  # fmt: skip
    head = ["setting", "TTFT s", "/ full", "first token", f"answer ({res['answer_tokens']})", "loglik diff %", "KL",
            "recomputed", "chunks reused", "prefix loaded"]  # fmt: skip
    met = res["bars_met"]
    return (
        f"bench blend: {res['prompts']} prompts of {res['chunks_per_prompt'][0]}-{res['chunks_per_prompt'][1]} "
        f"chunks of {res['chunk_tokens'][0]}-{res['chunk_tokens'][1]} tokens (mean prompt "
        f"{res['prompt_tokens_mean']:.0f} tokens, pool {res['pool_chunks']}), {res['model']} "
        f"{res['dtype']}, {res['engine']}, {res['torch_threads']} threads\n"
        + table(rows, head)
        + f"\nbars at r=0.15: TTFT <= 1/2.2 of full {'met' if met['ttft'] else 'NOT met'}; first-token "
        f"agreement >= 0.9 {'met' if met['first_token'] else 'NOT met'}; loglik within 3% "
        f"{'met' if met['loglik'] else 'NOT met'}; naive reuse worse on both "
        f"{'yes' if met['naive_worse'] else 'NO'}\n"
    )


def main(args: argparse.Namespace) -> int:
    return bench_main("blend", args, lambda a: merge(a.merge) if a.merge else run(a), render)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m polarkvd.bench.blend")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
