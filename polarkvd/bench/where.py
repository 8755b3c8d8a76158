"""`polarkvd where` (its arguments and output) and `polarkvd bench where`: how long the query takes.

The bench starts a cluster of private daemons on loopback (insecure, one shared page-key seed), spreads
a long prompt's pages over them (the queried member holds the first eighth, the others the whole
prompt, a half and a quarter), waits until the meta map knows them all, then times the `where` query
from one member over its control socket: by token ids and by page keys, beside a `ping` (the socket's
own round trip). The query reads the maps only: the local lookup probe and one `where` per meta-map
owner (docs/ROUTING.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from polarkvd.bench.harness import free_port, percentile, private_daemon, shared_seed_file, table

# ------------------------------------------------------------------------- the `where` command


def query_arguments(p: argparse.ArgumentParser) -> None:
    ns = p.add_mutually_exclusive_group(required=True)
    ns.add_argument("--namespace", help="the namespace digest (32 hex digits; `polarkvd status` lists them)")
    ns.add_argument("--model", help="the model fingerprint engines attach with (with --salt: one namespace)")
    p.add_argument("--salt", default="", help="the tenant's cache_salt (default: none)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--tokens", help="token ids, comma- or space-separated")
    what.add_argument(
        "--tokens-file", type=Path, help="token ids in a file ('-': stdin): a JSON array or separated"
    )
    what.add_argument("--keys", nargs="+", help="page keys as 32 hex digits each, first page first")
    p.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")


def _token_list(text: str) -> list[int]:
    text = text.strip()
    if text.startswith("["):
        out = json.loads(text)
    else:
        out = []
        for t in text.replace(",", " ").split():
            try:
                out.append(int(t))
            except ValueError:
                raise ValueError(
                    f"{t!r} is not a token id (expected integers, comma- or space-separated)"
                ) from None
    if not isinstance(out, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in out):
        raise ValueError("expected token ids (integers)")
    return out


def request(args: argparse.Namespace) -> dict[str, Any]:
    """The control op's arguments from the command line; a bad value exits 2 with the reason."""
    out: dict[str, Any] = (
        {"namespace": args.namespace} if args.namespace else {"model": args.model, "salt": args.salt}
    )
    try:
        if args.keys:
            for k in args.keys:
                if len(k) != 32 or not all(c in "0123456789abcdefABCDEF" for c in k):
                    raise ValueError(f"{k!r:.80} is not a page key (32 hex digits)")
            out["keys"] = [bytes.fromhex(k) for k in args.keys]
        else:
            text = args.tokens if args.tokens is not None else (
                sys.stdin.read() if str(args.tokens_file) == "-" else args.tokens_file.read_text()
            )  # fmt: skip
            out["tokens"] = _token_list(text)
    except RecursionError:
        print(
            "polarkvd where: the token ids are nested too deeply (expected a flat JSON array)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    except (ValueError, OSError) as e:
        print(f"polarkvd where: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return out


def show(out: dict[str, Any]) -> str:
    here = out["here"]
    lines = [
        f"namespace {out['namespace']} ({out['model']}), {out['page_tokens']} tokens a page",
        f"{here['tokens']} of {out['tokens']} tokens here: L1 {here['l1']}, DRAM {here['dram']}, disk {here['disk']}",
    ]
    loads = out.get("engine_load", {})
    for engine in sorted(set(out.get("engines", {})) | set(loads)):
        line = f"engine {engine}: {out.get('engines', {}).get(engine, 0)} tokens in its own cache"
        if engine in loads:
            ld = loads[engine]
            line += (
                f"; {ld['running']} running, {ld['waiting']} waiting, {ld['queued_prefill_tokens']} prefill "
                f"tokens queued ({ld['age_s']:.1f} s ago{', stale' if ld['stale'] else ''})"
            )
            if ld.get("url"):
                line += f" at {ld['url']}"
        lines.append(line)
    if "cluster" in out:
        others = ", ".join(f"{node} {n}" for node, n in sorted(out["cluster"].items(), key=lambda kv: -kv[1]))
        lines.append(f"other members ({out['node']} is this one): {others or 'none holds its first page'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------- the benchmark


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--members", type=int, default=4, help="daemons in the cluster (default 4)")
    p.add_argument("--tokens", type=int, default=32768, help="prompt length in tokens (default 32768)")
    p.add_argument(
        "--page-tokens", type=int, default=16, help="tokens a page (default 16, vLLM's block size)"
    )
    p.add_argument("--queries", type=int, default=300, help="timed queries of each kind (default 300)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _ms(values: list[float]) -> dict[str, float]:
    return {f"p{q}_ms": round(percentile(values, q) * 1e3, 3) for q in (50, 90, 99)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from polarkvd.client import ControlClient, EngineClient
    from polarkvd.types import Namespace

    if args.members < 2 or args.tokens < args.page_tokens:
        raise SystemExit("bench where: --members must be at least 2 and --tokens at least one page")
    ns = Namespace("bench-where@0", "bfloat16", "bench/v1", num_layers=1, num_kv_heads=1, head_dim=16,
                   page_tokens=args.page_tokens)  # fmt: skip
    tokens = [int(t) for t in np.random.default_rng(7).integers(0, 50_000, args.tokens)]
    pages = args.tokens // args.page_tokens
    # what each member holds, in pages: the queried one the first eighth, the others decreasing
    held = [max(1, pages // 8)] + [max(1, pages >> i) for i in range(args.members - 1)]
    with contextlib.ExitStack() as stack:
        seed = stack.enter_context(shared_seed_file())
        ports = [free_port() for _ in range(args.members)]
        controls, engines = [], []
        for i, port in enumerate(ports):
            engine, control = stack.enter_context(private_daemon({
                "cluster.enabled": "true", "cluster.insecure": "true", "cluster.node_id": f"m{i}",
                "cluster.gossip_address": f"127.0.0.1:{port}", "cluster.data_address": "127.0.0.1:0",
                "cluster.seeds": f"127.0.0.1:{ports[0]}", "cluster.lookup_timeout": "2s",
                "daemon.seed_file": seed, "disk.enabled": "false", "dram.capacity": "64MiB",
                "dram.slab_bytes": "1MiB", "daemon.log_level": "warning",
            }))  # fmt: skip
            engines.append(engine)
            controls.append(control)
        c = stack.enter_context(ControlClient(controls[0], timeout=60))
        deadline = time.monotonic() + 60
        while c.cluster().get("alive", 0) < args.members:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {args.members} benchmark daemons did not see each other within 60 s")
            time.sleep(0.05)
        for engine, n in zip(engines, held):
            with EngineClient(ns, "bench-where", engine, timeout=120) as kv:
                keys = kv.page_keys(tokens[: n * args.page_tokens])
                page = np.zeros(kv.page_bytes, np.uint8)
                for at in range(0, len(keys), 256):
                    kv.store(keys[at : at + 256], [page] * len(keys[at : at + 256]))
                digest = kv.ns_digest.hex()
                all_keys = kv.page_keys(tokens)
        want = {f"m{i}": n * args.page_tokens for i, n in enumerate(held) if i}
        query = {"namespace": digest, "tokens": tokens}
        packed = np.asarray(tokens, "<u4").tobytes()
        deadline = time.monotonic() + 60
        while (out := c.where(query)).get("cluster") != want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the meta map did not learn every page within 60 s: {out.get('cluster')}")
            time.sleep(0.1)
        runs: dict[str, dict[str, float]] = {}
        for name, call in (
            ("ping", c.ping),
            ("where (token ids)", lambda: c.where(query)),
            ("where (token ids, packed)", lambda: c.where({"namespace": digest, "tokens": packed})),
            ("where (page keys)", lambda: c.where({"namespace": digest, "keys": all_keys})),
        ):
            for _ in range(10):
                call()
            times = []
            for _ in range(args.queries):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            runs[name] = _ms(times)
    return {
        "members": args.members,
        "prompt_tokens": args.tokens,
        "page_tokens": args.page_tokens,
        "held_tokens": {f"m{i}": n * args.page_tokens for i, n in enumerate(held)},
        "answer": out,
        "runs": runs,
        "where_p50_ms": runs["where (token ids)"]["p50_ms"],
        "where_keys_p50_ms": runs["where (page keys)"]["p50_ms"],
        "where_packed_p50_ms": runs["where (token ids, packed)"]["p50_ms"],
        "where_vs_ping_p50": round(
            runs["where (token ids)"]["p50_ms"] / max(runs["ping"]["p50_ms"], 1e-6), 1
        ),
    }


def main(args: argparse.Namespace) -> int:
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"bench where: {res['prompt_tokens']}-token prompt, {res['page_tokens']} tokens a page, "
          f"{res['members']} members on loopback; held: " + ", ".join(f"{k} {v}" for k, v in res["held_tokens"].items()))  # fmt: skip
    rows = [[name, r["p50_ms"], r["p90_ms"], r["p99_ms"]] for name, r in res["runs"].items()]
    print(table(rows, ["query from m0", "p50 ms", "p90 ms", "p99 ms"]))
    print(f"where_p50_ms = {res['where_p50_ms']} ({res['where_vs_ping_p50']}x a ping)")
    return 0
