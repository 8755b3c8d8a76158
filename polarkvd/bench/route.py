"""`polarkvd bench route`: `polarkvd route` in front of two real vLLM OpenAI servers, by policy.

Two `python -m vllm.entrypoints.openai.api_server` processes (SmolLM2, fp32, eager, one core each,
vLLM's own prefix cache on, each publishing its KV events) behind the router, run in this process.
Workload (deterministic): `--users` users, each opening with a private `--first`-word message, then
`--turns - 1` follow-ups of a short question; every turn resends the whole history with the model's
previous answers (greedy, `--answer` tokens, ignore_eos). The users' turns interleave, `--in-flight`
requests at a time, the users arriving `--arrival` seconds apart. Each engine's KV cache is `--kv-blocks` blocks (`--num-gpu-blocks-override`),
about half of what every conversation needs at its longest: an engine that sees every user (round
robin) must evict histories that one seeing half of them (affinity) keeps. Per policy (`round-robin`, `least-loaded`, `affinity`), in one run, on the same
engines with their prefix caches reset between policies:

  nopool   vLLM's own prefix cache alone; the router follows each engine's cache from its events
  pool     the engines also run `PolarKVConnector` to one private daemon (DRAM, no disk), and the
           router asks its `where` (`--settings nopool,pool`); then the prefill/decode split
           (`pool/pd`: engine 0 prefills, engine 1 loads the KV from polarkvd and answers), whose
           greedy answers must equal the others' (`pd_outputs_identical`)

Reported per run: TTFT (request sent to the first content token, streamed) mean and p99, prompt
tokens computed (`usage.prompt_tokens - prompt_tokens_details.cached_tokens`, cached counting vLLM's
prefix cache and what the connector loaded), per engine requests and tokens computed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from polarkvd.bench import plots
from polarkvd.bench.harness import (
    bench_main,
    free_port,
    mean_percentiles,
    private_daemon,
    ratio,
    server_group,
    table,
)

POLICIES = ("round-robin", "least-loaded", "affinity")
SETTINGS = ("nopool", "pool")
KV_TRANSFER = {
    "kv_connector": "PolarKVConnector", "kv_connector_module_path": "polarkvd.connectors.vllm",
    "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
}  # fmt: skip
_SENTENCE = (
    "Harbour {u} on coast {c} kept {n} lighthouses; its archive in hall {h} records the salt and wool "
    "that passed gate {g} in year {y}, and the ships that sailed for island {i}. "
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", type=int, default=5, help="conversations, interleaved (default 5)")
    p.add_argument("--turns", type=int, default=12, help="turns per user (default 12)")
    p.add_argument(
        "--first",
        type=int,
        default=12,
        help="sentences in a user's first message (~45 tokens each; default 12)",
    )
    p.add_argument("--answer", type=int, default=16, help="tokens of each answer (default 16)")
    p.add_argument(
        "--arrival", type=float, default=1.0, help="seconds between users' first turns (default 1)"
    )
    p.add_argument("--in-flight", type=int, default=3, help="requests in flight at once (default 3)")
    p.add_argument(
        "--policies", default=",".join(POLICIES), help=f"comma-separated, of {', '.join(POLICIES)}"
    )
    p.add_argument(
        "--settings", default="nopool,pool", help=f"comma-separated, of {', '.join(SETTINGS)} (default both)"
    )
    p.add_argument(
        "--kv-blocks", type=int, default=28,
        help="vLLM KV cache blocks of 128 tokens per engine (default 28: 3,584 tokens, about 60%% of the "
        "users' conversations at their longest, so an engine holding every user's history must evict)",
    )  # fmt: skip
    p.add_argument("--no-pd", action="store_true", help="skip the prefill/decode split run (pool setting)")
    p.add_argument(
        "--repeat", type=int, default=1, metavar="N",
        help="run the policies N times on the same engines (every other time in reverse order); the "
        "first under `runs` as `SETTING/POLICY`, the others as `SETTING/POLICY/2`...; the ratios of each "
        "under `by_repeat` (default 1)",
    )  # fmt: skip
    p.add_argument("--model", help="the model folder (default: SmolLM2, converted on first use)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    plots.add_plot_arguments(p)


def _names(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise SystemExit(f"bench route: {what} must be some of {', '.join(allowed)}, got {value!r}")
    return names


def _up(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).read()
        return True
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def engines(
    model: str, root: Path, engine_socket: Path | None, kv_blocks: int
) -> Iterator[list[dict[str, Any]]]:
    """Two vLLM OpenAI servers, cores 0 and 1, with KV events; through polarkvd when `engine_socket`."""
    with contextlib.ExitStack() as stack:
        out = []
        for core in (0, 1):
            port, ev, replay = free_port(), free_port(), free_port()
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="pkv-"))  # short: vLLM's ipc paths
            env = {k: v for k, v in os.environ.items() if not k.startswith("POLARKV_")} | {  # fmt: skip
                "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": str(core), "OMP_NUM_THREADS": "1",
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_SERVER_DEV_MODE": "1", "TMPDIR": tmp,
                "TOKENIZERS_PARALLELISM": "false",
            }  # fmt: skip
            events = {"enable_kv_cache_events": True, "publisher": "zmq",
                      "endpoint": f"tcp://*:{ev}", "replay_endpoint": f"tcp://*:{replay}"}  # fmt: skip
            argv = [
                sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--enforce-eager",
                "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
                "--max-num-batched-tokens", "512", "--enable-prompt-tokens-details", "--seed", "0",
                "--enable-prefix-caching", "--kv-events-config", json.dumps(events), "--served-model-name", "smollm2",
                "--num-gpu-blocks-override", str(kv_blocks),
            ]  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            if engine_socket is not None:  # the connector reports the engine's load with its URL
                env["POLARKV_SOCKET"] = str(engine_socket)
                argv += [
                    "--kv-transfer-config",
                    json.dumps({**KV_TRANSFER, "kv_connector_extra_config": {"engine_url": url}}),
                ]
            ready = functools.partial(_up, url + "/v1/models")
            log = root / f"vllm-{core}.log"
            stack.enter_context(
                server_group(argv, log, env, ready, f"vLLM server on core {core}", timeout=600)
            )
            out.append({"url": url, "events": ev, "replay": replay})
        yield out


def conversations(users: int, first: int) -> list[list[dict[str, str]]]:
    return [
        [
            {
                "role": "user",
                "content": "".join(
                    _SENTENCE.format(
                        u=u, c=u * 7 + i, n=i % 5 + 2, h=i * 11 + u, g=u * 3 + i, y=1700 + 13 * u + i, i=i * u
                    )
                    for i in range(first)
                )
                + f"Summarise what harbour {u} traded.",
            }
        ]  # fmt: skip
        for u in range(users)
    ]


async def _request(http: Any, url: str, messages: list[dict[str, str]], answer: int) -> dict[str, Any]:
    body = {"model": "smollm2", "messages": messages, "max_tokens": answer, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.monotonic()
    ttft = None
    text: list[str] = []
    usage: dict[str, Any] = {}
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"router answered {r.status}: {(await r.text())[:300]}")
        engine = r.headers.get("X-PolarKV-Engine", "")
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                data = ev.removeprefix(b"data: ")
                if data == b"[DONE]":
                    continue
                msg = json.loads(data)
                if "error" in msg:
                    raise RuntimeError(f"stream failed: {msg['error']}")
                for c in msg.get("choices", []):
                    piece = c.get("delta", {}).get("content") or ""
                    if piece and ttft is None:
                        ttft = time.monotonic() - t0
                    text.append(piece)
                usage = msg.get("usage") or usage
    prompt = int(usage.get("prompt_tokens", 0))
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {"engine": engine, "ttft_s": ttft if ttft is not None else time.monotonic() - t0,
            "prompt_tokens": prompt, "cached_tokens": cached, "text": "".join(text)}  # fmt: skip


async def _workload(url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    import aiohttp

    convs = conversations(args.users, args.first)
    gate = asyncio.Semaphore(args.in_flight)
    records: list[dict[str, Any]] = []

    async def user(u: int, http: Any) -> None:
        await asyncio.sleep(u * args.arrival)  # users arrive one by one, not all at once
        msgs = convs[u]
        for turn in range(args.turns):
            async with gate:
                rec = await _request(http, url, msgs, args.answer)
            records.append({"user": u, "turn": turn, **rec})
            msgs += [{"role": "assistant", "content": rec["text"]},
                     {"role": "user", "content": f"And what did harbour {u} trade in year {1800 + turn}?"}]  # fmt: skip
            await asyncio.sleep(0)  # let the other users' turns in: interleaved, not back to back

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as http:
        await asyncio.gather(*(user(u, http) for u in range(args.users)))
    return records


def _reset(urls: list[str], control: Path | None) -> None:
    """Every engine's prefix cache emptied (and the daemon's DRAM): each policy starts cold."""
    for u in urls:
        req = urllib.request.Request(u + "/reset_prefix_cache", data=b"", method="POST")
        urllib.request.urlopen(req, timeout=60).read()
    if control is not None:
        from polarkvd.client import ControlClient

        with ControlClient(control, timeout=30) as c:
            c.evict("dram", 1 << 50)


async def _serve_router(router: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from aiohttp import web

    runner = web.AppRunner(router.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.sleep(0.3)  # the first poll of each engine
        return await _workload(f"http://127.0.0.1:{port}", args)
    finally:
        await runner.cleanup()


def one_run(
    eng: list[dict[str, Any]], policy: str, model: str, control: Path | None, args: argparse.Namespace
) -> dict[str, Any]:
    from polarkvd.route.cost import Policy
    from polarkvd.route.daemon import DaemonWhere
    from polarkvd.route.engines import Engine, EngineSpec
    from polarkvd.route.prefixes import RouteKeys
    from polarkvd.route.requests import Tokenizer
    from polarkvd.route.server import Router

    _reset([e["url"] for e in eng], control)
    keys = RouteKeys(model)
    specs = [
        EngineSpec.parse(
            [e["url"], f"events=tcp://127.0.0.1:{e['events']}", f"replay=tcp://127.0.0.1:{e['replay']}"]
        )
        for e in eng
    ]
    where = DaemonWhere(str(control), None, "") if control is not None else None
    answer, prefill = [Engine(s, keys) for s in specs], []
    if policy == "pd":  # engine0 prefills, engine1 decodes (loading the prompt's KV from polarkvd)
        prefill, answer = answer[:1], answer[1:]
    router = Router(
        answer,
        Tokenizer(model),
        keys,
        Policy("affinity" if policy == "pd" else policy),
        where=where,
        poll_interval=0.5,
        prefill=prefill,
    )
    t0 = time.monotonic()
    records = asyncio.run(_serve_router(router, args))
    wall = time.monotonic() - t0
    ttft = mean_percentiles([r["ttft_s"] for r in records])
    urls = [e["url"] for e in eng]
    per_engine: dict[str, dict[str, int]] = {}
    for i, e in enumerate(eng):
        mine = [r for r in records if r["engine"] == e["url"]]
        per_engine[f"engine{i}"] = {
            "requests": len(mine),
            "computed_tokens": sum(r["prompt_tokens"] - r["cached_tokens"] for r in mine),
        }
    split: dict[str, Any] = {}
    if prefill:  # the split's TTFT in two: the prefill engine's answer, then the decode engine's first token
        reg, label = router.metrics.registry, {"engine": prefill[0].url}
        n = reg.get_sample_value("polarkv_route_prefill_seconds_count", label) or 0
        mean = (reg.get_sample_value("polarkv_route_prefill_seconds_sum", label) or 0) / max(n, 1)
        split = {"prefill_phase_mean_s": round(mean, 4), "decode_phase_mean_s": round(ttft["mean"] - mean, 4)}
    return {
        **split,
        "ttft_mean_s": round(ttft["mean"], 4),
        "ttft_p99_s": round(ttft["p99"], 4),
        # the users' first turns (a private prompt nothing holds: the same work under every policy)
        # apart from their follow-ups (where the routing decides what is cached)
        "first_turns_ttft_s": [
            round(r["ttft_s"], 3) for r in sorted(records, key=lambda r: r["user"]) if r["turn"] == 0
        ],
        "follow_ups_ttft_p99_s": round(
            mean_percentiles([r["ttft_s"] for r in records if r["turn"] > 0])["p99"], 4
        ),
        "prompt_tokens": sum(r["prompt_tokens"] for r in records),
        "computed_tokens": sum(r["prompt_tokens"] - r["cached_tokens"] for r in records),
        "requests": len(records),
        # follow-up turns sent to another engine than the user's previous turn (its history elsewhere)
        "follow_ups_moved": sum(
            1
            for r in records
            if r["turn"] > 0
            and r["engine"]
            != next(q["engine"] for q in records if q["user"] == r["user"] and q["turn"] == r["turn"] - 1)
        ),
        "wall_s": round(wall, 2),
        "per_engine": per_engine,
        # each user's turns by engine index, in order ("0011..."), and the engine's prefix-cache
        # blocks evicted during the run (its KV events' removals since the reset before the run)
        "placement": {
            str(u): "".join(
                str(urls.index(r["engine"])) if r["engine"] in urls else "?"
                for r in sorted((r for r in records if r["user"] == u), key=lambda r: r["turn"])
            )
            for u in sorted({r["user"] for r in records})
        },
        "evicted_blocks": {
            f"engine{urls.index(e.url)}": e.gpu.removed_since_clear if e.gpu is not None else None
            for e in answer + prefill
        },
        # the slowest first tokens: which turn, where, how much of its prompt was computed
        "slowest": [
            {
                "user": r["user"],
                "turn": r["turn"],
                "engine": f"engine{urls.index(r['engine'])}" if r["engine"] in urls else r["engine"],
                "ttft_s": round(r["ttft_s"], 3),
                "prompt_tokens": r["prompt_tokens"],
                "computed_tokens": r["prompt_tokens"] - r["cached_tokens"],
            }
            for r in sorted(records, key=lambda r: -r["ttft_s"])[:3]
        ],  # fmt: skip
        "outputs": {f"{r['user']}/{r['turn']}": r["text"] for r in records},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from polarkvd.models import ensure_smollm2

    policies = _names(args.policies, POLICIES, "--policies")
    settings = _names(args.settings, SETTINGS, "--settings")
    if (
        min(args.users, args.turns, args.first, args.answer, args.in_flight) < 1
        or args.kv_blocks < 16
        or args.arrival < 0
        or args.repeat < 1
    ):
        raise SystemExit(
            "bench route: --users, --turns, --first, --answer, --in-flight and --repeat must be positive, "
            "--kv-blocks >= 16, --arrival >= 0"
        )
    model = args.model or str(ensure_smollm2())
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="polarkv-bench-route-") as tmp:
        root = Path(tmp)
        for setting in settings:
            say(f"{setting}: starting two vLLM servers")
            with contextlib.ExitStack() as stack:
                control = sock = None
                if setting == "pool":
                    sets = {"dram.capacity": "2GiB", "dram.slab_bytes": "64MiB", "disk.enabled": "false",
                            "daemon.log_level": "warning"}  # fmt: skip
                    sock, control = stack.enter_context(private_daemon(sets))
                eng = stack.enter_context(engines(model, root, sock, args.kv_blocks))
                for r in range(args.repeat):
                    order = policies if r % 2 == 0 else policies[::-1]
                    for policy in order + (["pd"] if setting == "pool" and not args.no_pd and r == 0 else []):
                        name = f"{setting}/{policy}" + (f"/{r + 1}" if r else "")
                        say(name)
                        runs[name] = one_run(eng, policy, model, control, args)
    return summarise(runs, args)


BARS = ("nopool_affinity_vs_rr_tokens", "nopool_affinity_vs_rr_ttft", "pool_affinity_vs_rr_ttft",
        "pool_affinity_p99_lowest")  # fmt: skip


def bars(runs: dict[str, dict[str, Any]], suffix: str = "") -> dict[str, Any]:
    """Issue 19's ratios over one repetition's runs (`suffix` "" for the first, "/2" for the second...);
    None where a run was not made."""

    def get(setting: str, policy: str, key: str) -> float | None:
        r = runs.get(f"{setting}/{policy}{suffix}")
        return None if r is None else float(r[key])

    def r3(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    def vs_rr(setting: str, key: str) -> float | None:
        return r3(ratio(get(setting, "affinity", key), get(setting, "round-robin", key)))

    p99 = {p: get("pool", p, "ttft_p99_s") for p in POLICIES}
    return {
        "nopool_affinity_vs_rr_tokens": vs_rr("nopool", "computed_tokens"),
        "nopool_affinity_vs_rr_ttft": vs_rr("nopool", "ttft_mean_s"),
        "pool_affinity_vs_rr_ttft": vs_rr("pool", "ttft_mean_s"),
        "pool_affinity_p99_lowest": (
            None if None in p99.values() else p99["affinity"] == min(v for v in p99.values() if v is not None)
        ),  # fmt: skip
    }


def summarise(runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    # greedy answers of the split against the same conversations answered whole by one engine each
    pd = runs.get("pool/pd", {}).get("outputs")
    whole = next(
        (
            runs[k].get("outputs")
            for k in ("pool/round-robin", "pool/affinity", "pool/least-loaded")
            if k in runs
        ),
        None,
    )
    for r in runs.values():
        r.pop("outputs", None)
    repeats = getattr(args, "repeat", 1)  # a Namespace from an older recording lacks it
    each = [bars(runs, f"/{i + 1}" if i else "") for i in range(repeats)]
    return {
        "workload": {
            "users": args.users,
            "turns": args.turns,
            "first_sentences": args.first,
            "answer": args.answer,
            "in_flight": args.in_flight,
            "engines": 2,
            "cores_per_engine": 1,
        },  # fmt: skip
        "runs": runs,
        **each[0],
        "pd_outputs_identical": None if pd is None or whole is None else pd == whole,
        "where_p50_ms": None,  # measured by `polarkvd bench where`
        **({"by_repeat": {k: [b[k] for b in each] for k in BARS}} if repeats > 1 else {}),
    }


def say(msg: str) -> None:
    print(f"bench route: {msg}", file=sys.stderr, flush=True)


def render(res: dict[str, Any]) -> str:
    rows = [[name, r["requests"], f"{r['ttft_mean_s']:.3f}", f"{r['ttft_p99_s']:.3f}", r["computed_tokens"],
             r["prompt_tokens"], " / ".join(str(e["requests"]) for e in r["per_engine"].values())]
            for name, r in res["runs"].items()]  # fmt: skip
    lines = [table(rows, ["setting/policy", "requests", "TTFT mean s", "TTFT p99 s", "computed tokens",
                          "prompt tokens", "requests per engine"])]  # fmt: skip
    for k in BARS:
        each = f" (each repetition: {res['by_repeat'][k]})" if "by_repeat" in res else ""
        lines.append(f"{k} = {res[k]}{each}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    return bench_main("route", args, run, render)
