"""`polarkvd route`: its command line, and starting the router from it.

Owns the options (engines, policy, weights, model, daemon, discovery), their checks (a bad one exits
2 with what is wrong) and finding the model from the engines when `--model` is not given (the
daemon's side is `route/daemon.py`). Imports aiohttp only to run the router, so `polarkvd --help`
works without the `[route]` extra.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

from polarkvd.route.cost import Policy, Weights
from polarkvd.route.daemon import DaemonWhere
from polarkvd.route.prefixes import PAGE_TOKENS, RouteKeys

if TYPE_CHECKING:
    from polarkvd.route.server import Router

log = logging.getLogger(__name__)

EXAMPLES = """\
examples:
  # two vLLM servers, affinity from what the router sent each one
  polarkvd route --engine http://127.0.0.1:8001 --engine http://127.0.0.1:8002

  # the engines found from the cluster: each vLLM runs polarkvd's connector with its
  # kv_connector_extra_config {"engine_url": "http://HOST:PORT"}; this host's daemon lists them all
  polarkvd route --daemon /run/polarkv/control.sock

  # the same, following each engine's own prefix cache through its KV events (vLLM started with
  # --kv-events-config '{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557",
  # "replay_endpoint":"tcp://*:5558"}'), and the host's DRAM and disk through the daemon
  polarkvd route --port 8000 \\
      --engine http://127.0.0.1:8001 events=tcp://127.0.0.1:5557 replay=tcp://127.0.0.1:5558 \\
      --engine http://127.0.0.1:8002 events=tcp://127.0.0.1:5567 replay=tcp://127.0.0.1:5568 \\
      --daemon /run/polarkv/control.sock

Clients talk to it as to one OpenAI server (POST /v1/completions, /v1/chat/completions; GET
/v1/models, /health, /metrics). docs/ROUTING.md, "polarkvd route".
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine", "--decode", dest="engine", action="append", nargs="+", default=[], metavar="ENGINE",
        help="URL [events=EP] [replay=EP] [topic=T]: an engine's OpenAI server (repeat --engine per "
        "engine); optionally its vLLM KV event publisher "
        "(`events=`, `replay=`, `topic=` as in its --kv-events-config; `tcp://*:PORT` means this host) "
        "so the router follows its own prefix cache. Without events, the router remembers what it sent where.",
    )  # fmt: skip
    p.add_argument(
        "--prefill", action="append", nargs="+", default=[], metavar="ENGINE",
        help="prefill/decode split: an engine (as --engine) that only prefills: each prompt is computed "
        "there first (one token generated, its KV stored through polarkvd), then answered by an "
        "--engine (alias --decode), which loads it. Both kinds must run polarkvd's connector on one daemon.",
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument(
        "--policy", choices=[x.value for x in Policy], default=Policy.AFFINITY.value,
        help="affinity (default): the lowest prefill cost plus queued work; round-robin; least-loaded",
    )  # fmt: skip
    p.add_argument(
        "--model", help="the model's folder or hub name, for its tokenizer and chat template "
        "(default: what the engines' /v1/models names)",
    )  # fmt: skip
    p.add_argument(
        "--daemon", metavar="SOCKET",
        help="a polarkvd daemon's control socket: also count what its DRAM, disk and cluster pool hold (`where`)",
    )  # fmt: skip
    p.add_argument(
        "--daemon-model", metavar="NAME",
        help="the model name the engines attach to the daemon with (default: the one its status lists)",
    )  # fmt: skip
    p.add_argument("--salt", default="", help="cache salt of the daemon's namespace (default none)")
    p.add_argument(
        "--discover", action="store_true",
        help="with --daemon: also route to every engine of the model that a daemon of the cluster reports "
        "with its URL (the connector's engine_url), as they come and go (the default without --engine)",
    )  # fmt: skip
    p.add_argument(
        "--discover-interval", type=float, default=2.0, metavar="S",
        help="seconds between asking the daemon which engines there are (default 2)",
    )  # fmt: skip
    w = Weights()
    g = p.add_argument_group("cost weights (prefill-token equivalents per token)")
    for name, what in (
        ("gpu", "a token in the engine's own cache"),
        ("dram", "a token in the host's DRAM"),
        ("disk", "a token on the host's disk"),
        ("pool", "a token in the cluster pool"),
        ("queued", "a prompt token queued on the engine"),
        ("request", "a request running or waiting on the engine"),
        ("evict", "a token of other conversations this prompt crowds out of the engine's cache"),
        ("redundant", "a token the engine would compute that another engine has cached"),
    ):
        default = getattr(w, name)
        g.add_argument(
            f"--weight-{name}", type=float, metavar="W", default=default, help=f"{what} (default {default})"
        )
    g.add_argument("--imbalance", type=int, default=w.imbalance_abs, metavar="N",
                   help=f"past N requests between the busiest and idlest engine (and {w.imbalance_rel}x), "
                   f"send to the least loaded (default {w.imbalance_abs})")  # fmt: skip
    p.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between engine /metrics polls (default 1)",
    )
    p.add_argument(
        "--read-timeout", type=float, default=300.0, metavar="S",
        help="seconds an engine may stay silent while answering (before its first byte, or between two "
        "bytes of a stream) before the router gives up on it: a request it has not started answering goes "
        "to another engine, a stream it stops ends with an error; 0 waits forever (default 300)",
    )  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.epilog = EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def engine_model(urls: list[str], timeout: float = 5.0) -> str | None:
    """The model the first answering engine serves (its `root`, a local folder, else its `id`)."""
    for url in urls:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=timeout) as r:
                data = json.loads(r.read())["data"]
            return str(data[0].get("root") or data[0]["id"])
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError):
            continue
    return None


def build(args: argparse.Namespace) -> Router:
    """The router the options describe; raises ValueError with what is wrong."""
    from polarkvd.route.engines import Engine, EngineSpec  # aiohttp: only where the router runs
    from polarkvd.route.server import Router

    if not 0 <= args.read_timeout < float("inf"):  # NaN too
        raise ValueError("--read-timeout must be a number of seconds >= 0 (0: wait forever)")
    specs = [EngineSpec.parse(words) for words in args.engine]
    prefill_specs = [EngineSpec.parse(words) for words in args.prefill]
    urls = [s.url for s in specs + prefill_specs]
    if len(set(urls)) != len(urls):
        raise ValueError("an engine is listed twice")
    discover = args.discover or not specs
    if discover and not args.daemon:
        raise ValueError("give the engines (--engine URL), or --daemon SOCKET to find them from the cluster")
    if not args.discover_interval > 0:
        raise ValueError("--discover-interval must be positive")
    where = DaemonWhere(args.daemon, args.daemon_model, args.salt) if args.daemon else None
    if discover and where is not None:
        try:
            urls += [f.url for f in where.discover() if f.url not in urls]
        except Exception as e:  # the daemon down: the model must come from --model; engines later
            log.warning("cannot ask the daemon for its engines yet: %s", e)
    policy = Policy(args.policy)
    weights = Weights(
        gpu=args.weight_gpu, dram=args.weight_dram, disk=args.weight_disk, pool=args.weight_pool,
        queued=args.weight_queued, request=args.weight_request, evict=args.weight_evict,
        redundant=args.weight_redundant,
        imbalance_abs=args.imbalance,
    )  # fmt: skip
    if not 0 < args.poll_interval < float("inf"):  # NaN too
        raise ValueError("--poll-interval must be a positive number of seconds")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535, got {args.port}")
    model = args.model or engine_model(urls)
    tokenizer = None
    if model is None:
        if policy is Policy.AFFINITY:
            raise ValueError("no engine answers /v1/models, so the model is unknown: give --model PATH")
        log.warning("model unknown (no engine answers): routing without token counts")
    else:
        from polarkvd.route.requests import Tokenizer

        try:
            tokenizer = Tokenizer(model)
        except Exception as e:
            raise ValueError(f"cannot load the tokenizer of {model!r}: {e}") from None
    keys = RouteKeys(model or "", PAGE_TOKENS)
    engines = [Engine(s, keys) for s in specs]
    prefill = [Engine(s, keys) for s in prefill_specs]
    return Router(
        engines, tokenizer, keys, policy, weights, where, args.poll_interval, prefill,
        discover=discover, discover_interval=args.discover_interval, read_timeout=args.read_timeout or None,
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    from aiohttp import web

    from polarkvd.logging_setup import setup_logging

    setup_logging(args.log_level, "text", sys.stderr)
    try:
        router = build(args)
    except ValueError as e:
        print(f"polarkvd route: {e}", file=sys.stderr)
        return 2
    log.info(
        "routing %s over %s on http://%s:%d",
        args.policy, ", ".join(e.url + (" (events)" if e.events else "") for e in router.engines) or "no engine yet",
        args.host, args.port,
    )  # fmt: skip
    # handler_cancellation: a client that leaves cancels its request, which closes the engine's
    # connection, so the engine stops generating for nobody (else it waits for the engine's next byte)
    try:
        web.run_app(
            router.app(),
            host=args.host,
            port=args.port,
            print=None,
            handle_signals=True,
            handler_cancellation=True,
        )
    except OSError as e:  # the address does not resolve, is taken or is not ours
        print(f"polarkvd route: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0
