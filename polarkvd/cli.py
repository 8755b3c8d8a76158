"""`polarkvd`: one executable, one subcommand per job.

Owns argument parsing, human-readable output and exit codes (0 ok, 1 failure, 2 usage, 78 bad
config or resources). Talks to a running daemon only through `polarkvd.client`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from polarkvd import __version__
from polarkvd.config import LIVE_KNOBS, load_config, option_fields
from polarkvd.config.machine import resolve
from polarkvd.config.values import format_size, parse_size
from polarkvd.errors import EXIT_CONFIG, ConfigError, PolarKVError
from polarkvd.resources import check_resources


def _setup_logging(level: str, fmt: str = "text") -> None:
    from polarkvd.logging_setup import setup_logging

    setup_logging(level, fmt, sys.stderr)


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError([(pair, "", "--set takes KEY=VALUE, e.g. --set dram.capacity=4GiB")])
        out[key.strip()] = value.strip()
    return out


# ---------------------------------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace) -> int:
    from polarkvd.daemon import ConfigSource, serve

    overrides = _overrides(args.set)
    loaded = load_config(args.config, overrides=overrides, tuning=True)  # + the `tui` overlay
    cfg = resolve(loaded)
    _setup_logging(cfg.daemon.log_level, cfg.daemon.log_format)
    logging.getLogger("polarkvd").info(
        "polarkvd %s starting with %s", __version__, args.config or "the built-in default configuration"
    )
    # SIGHUP rebuilds the config from the same file, environment and --set overrides.
    path = args.config.resolve() if args.config is not None else None
    return serve(cfg, ConfigSource(path, overrides, loaded))


def _check_seed_file(cfg: Any) -> None:
    """The page-key seed file, checked as `serve` would read it, when it would and it exists (a
    missing one is created at start; here nothing is created)."""
    if cfg.cluster.enabled and cfg.cluster.key_file:
        return  # the seed comes from the key file
    if os.path.lexists(cfg.daemon.seed_file):
        from polarkvd.seed import load_seed_file

        load_seed_file(cfg.daemon.seed_file, create=False)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = resolve(load_config(args.file, overrides=_overrides(args.set)))
        _check_seed_file(cfg)
    except ConfigError as e:
        print(f"{args.file}: {len(e.problems)} problem(s)", file=sys.stderr)
        for key, value, why in e.problems:
            print(f"  {key} = {value!r}: {why}", file=sys.stderr)
        return EXIT_CONFIG
    problems = check_resources(cfg)
    if problems:
        print(f"{args.file}: valid, but this machine cannot give what it asks for:", file=sys.stderr)
        for key, value, why in problems:
            print(f"  {key} = {value!r}: {why}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.file}: ok")
    if args.verbose:
        for section, values in cfg.to_dict().items():
            print(f"[{section}]")
            for key, value in values.items():
                print(f"  {key} = {value!r}")
    return 0


def _control(args: argparse.Namespace) -> Any:
    from polarkvd.client import ControlClient

    return ControlClient(args.socket)


def cmd_status(args: argparse.Namespace) -> int:
    with _control(args) as c:
        st = c.cluster() if args.cluster else c.stats()
    if args.cluster and not args.json:
        print(render_cluster(st))
        return 0
    if args.json:
        print(json.dumps(st, indent=2, default=lambda b: b.hex() if isinstance(b, bytes) else str(b)))
        return 0
    print(render_status(st))
    return 0


def render_cluster(rep: dict[str, Any]) -> str:
    if not rep.get("enabled"):
        return "this daemon is not in a cluster ([cluster] enabled = false)"
    lines = [
        f"member {rep['node_id']!r} (incarnation {rep['incarnation']}), gossip {rep['gossip_address']}, "
        f"data {rep['data_address'] or '-'}, {'CURVE-authenticated' if rep['authenticated'] else 'INSECURE (no authentication)'}",
        f"{rep['alive']} of {len(rep['members'])} known members alive",
        "",
        f"{'member':<16}{'state':<9}{'inc':>5}{'since':>9}  {'gossip':<26}{'data':<26}{'dram used':>18}{'pool free':>11}",
    ]
    for m in rep["members"]:
        meta = m.get("meta") or {}

        def space(name: str, meta: dict[str, Any] = meta) -> str:
            v = meta.get(name)
            if not isinstance(v, list) or len(v) != 2:
                return "-"
            return f"{format_size(v[0])}/{format_size(v[1])}"

        dmp = meta.get("dmp")
        free = format_size(dmp[1] - dmp[0]) if isinstance(dmp, list) and len(dmp) == 2 else "-"
        name = m["node"] + (" *" if m.get("self") else "")
        lines.append(
            f"{name:<16}{m['state']:<9}{m['incarnation']:>5}{_ago(m['for_s']):>9}  {m['addr']:<26}"
            f"{str(meta.get('data') or '-'):<26}{space('dram'):>18}{free:>11}"
        )
    for node, why in sorted((rep.get("refused") or {}).items()):
        lines.append(f"REFUSED {node!r}: {why}")
    g = rep.get("gossip", {})
    lines += ["", "gossip: " + ", ".join(f"{k} {v}" for k, v in g.items())]
    lines += _render_transfers(rep)
    return "\n".join(lines)


def _render_transfers(rep: dict[str, Any]) -> list[str]:
    """Pages fetched per transport, RDMA on or off and why, and L1 (GPUDirect) traffic."""
    out: list[str] = []
    fetched = rep.get("fetched")
    if fetched:
        out.append(
            "fetched: "
            + ", ".join(f"{k} {v['pages']} pages ({format_size(v['bytes'])})" for k, v in fetched.items())
        )
    rdma = rep.get("rdma")
    if rdma:
        state = f"on ({rdma['device']})" if rdma.get("enabled") else "off"
        line = f"rdma: {state}: {rdma.get('reason', '')}"
        if rdma.get("fallbacks"):
            line += f"; {rdma['fallbacks']} fallbacks to TCP (last: {rdma.get('last_fallback') or '-'})"
        out.append(line)
    vram, reg = rep.get("vram"), (rdma or {}).get("vram")
    if vram and reg and reg.get("reason") != "no L1 pool":
        got, served = vram["fetched"]["rdma"], vram["served"]
        out.append(
            f"L1 over RDMA (GPUDirect): {reg['reason']}; READ into L1 {got['pages']} pages, "
            f"served from L1 {served['rdma']['pages']} pages by RDMA and {served['tcp']['pages']} through DRAM, "
            f"{vram['landing_fallbacks']} landings fell back to DRAM"
        )
    return out


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def cmd_keygen(args: argparse.Namespace) -> int:
    from polarkvd.cluster.auth import generate, write_key_file

    try:
        write_key_file(args.out, generate(), force=args.force)
    except FileExistsError:
        print(
            f"polarkvd: {args.out} exists; refusing to overwrite a cluster key (use --force)", file=sys.stderr
        )
        return 1
    except OSError as e:
        print(f"polarkvd: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(
        f"wrote the cluster key pair to {args.out} (mode 0600). Copy it to every member, owned by the "
        f'daemon\'s user, and set [cluster] key_file = "{args.out}".'
    )
    return 0


def render_status(st: dict[str, Any]) -> str:
    c = st["counters"]
    lines = [
        f"polarkvd up {st['uptime_s']:.0f}s{'  (DRAINING: new stores refused)' if st['draining'] else ''}"
        + (f"  page-key seed {st['page_seed']}" if st.get("page_seed") else ""),
        "",
    ]
    lines.append(
        f"{'tier':<10}{'pages':>10}{'bytes':>12}{'capacity':>12}{'used':>7}  {'policy':<8}{'hits':>10}"
    )
    hits = {
        "vram": c.get("hit_pages_vram", 0),
        "dram": c.get("hit_pages_dram", 0),
        "disk": c.get("hit_pages_disk", 0),
        "dmp": c.get("hit_pages_remote", 0),
    }
    for name, t in st["tiers"].items():
        used = t["bytes"] / t["capacity_bytes"] * 100 if t["capacity_bytes"] else 0
        label = f"L{t['tier']} {name}"
        lines.append(
            f"{label:<10}{t['pages']:>10}{format_size(t['bytes']):>12}{format_size(t['capacity_bytes']):>12}{used:>6.1f}%  {t['policy']:<8}{hits.get(name, 0):>10}"
        )
    if st.get("vram"):  # L1: whether this daemon has it, and why not (daemon start, docs/VRAM.md)
        lines.append(st["vram"].get("line", ""))
    looked = c.get("lookup_pages", 0)
    hit = sum(hits.values())
    lines.append("")
    lines.append(
        f"lookups {c.get('lookups', 0)}: {looked} pages asked, {hit} hit "
        f"({hit / looked * 100 if looked else 0:.1f}%), {c.get('miss_pages', 0)} missed"
    )
    table = st["tiers"].get("dram", {}).get("lookup_table")
    if table:  # the shared table engines probe without a round trip (docs/DESIGN-NOTES.md)
        lines.append(
            f"lookup table: {table['used']} of {table['entries']} entries, {c.get('table_lookups', 0)} lookups "
            "answered by engines themselves"
            + (
                "; FULL: raise dram.lookup_table_entries (the rest is asked over the socket)"
                if table["full"]
                else ""
            )
        )
    lines.append(
        f"stored {c.get('stored_pages', 0)} pages ({format_size(c.get('stored_bytes', 0))}), loaded {c.get('loaded_pages', 0)} "
        f"({format_size(c.get('loaded_bytes', 0))}; {c.get('loaded_pages_disk', 0)} from disk)"
    )
    if any(k.startswith(("cluster_", "fetched_", "hit_pages_remote")) for k in c):
        lines.append(
            f"cluster: {c.get('hit_pages_remote', 0)} pages found on peers, {c.get('fetched_pages_remote', 0)} fetched "
            f"({format_size(c.get('fetched_bytes_remote', 0))}), {c.get('cluster_served_pages', 0)} served to peers, "
            f"{c.get('demoted_pages_dmp', 0)} demoted to the pool, {c.get('cluster_fetch_failures', 0)} failed fetches"
        )
    if "vram" in st["tiers"]:
        v = st["tiers"]["vram"]
        lines.append(
            f"L1: stored {c.get('stored_pages_vram', 0)} pages, loaded {c.get('loaded_pages_vram', 0)}, "
            f"demoted to DRAM {c.get('demoted_pages_vram', 0)} ({c.get('demotion_failures_vram', 0)} failed), "
            f"promoted from DRAM {c.get('promoted_pages_vram', 0)}, "
            f"{v['sessions']} engines attached with L1, arena {'page-locked' if v['pinned_host'] else 'pageable'}"
        )
    evicted = sum(v for k, v in c.items() if k.startswith("evicted_pages_dram"))
    lines.append(
        f"evicted from DRAM {evicted} pages, demoted to disk {c.get('demoted_pages', 0)}, "
        f"demotions dropped {c.get('demotions_dropped', 0)}, corrupt pages dropped {c.get('corrupt_pages', 0)}"
    )
    lines += _cost_lines(st.get("worth"))
    lines.append(f"sessions {len(st['sessions'])}, leases {st['leases']}, namespaces {st['namespaces']}")
    for s in st["sessions"]:
        rate = s["hit_pages"] / s["lookup_pages"] * 100 if s["lookup_pages"] else 0
        lines.append(
            f"  #{s['id']} {s['engine_id']}: {s['model']}, hit {rate:.1f}%, stored {s['stored_pages']}, "
            f"loaded {s['loaded_pages']}, reserved {s['reserved_pages']}, leases {s['leases']}"
        )
    lines += _tenant_lines(st.get("quotas"))
    return "\n".join(lines)


def _cost_lines(w: dict[str, Any] | None) -> list[str]:
    """What recomputing and fetching a page cost (manager/worth.py: the `cost` policy's inputs), and
    its decisions: pages dropped rather than demoted, hit pages recomputed rather than fetched."""
    if not w:
        return []
    rates = ", ".join(
        f"{tier} {r['gbps']:.2f} GB/s" + ("" if r["measured"] else " (default)")
        for tier, r in w["fetch_gbps"].items()
    )
    peers = w.get("fetch_gbps_peers") or {}
    if peers:
        rates += "; peers " + ", ".join(f"{p} {r['gbps']:.2f} GB/s" for p, r in peers.items())
    lines = [f"fetch rates: {rates}"]
    for m in w["models"]:
        lines.append(
            f"prefill of {m['model']}: {m['fixed_ms']:.2f} ms + {m['per_token_us']:.2f} us/token"
            f" + {m['per_token_depth_ns']:.4f} ns/token/token of depth"
            + (f" (fitted on {m['observations']} steps)" if m["fitted"] else " (default, from the geometry)")
        )
    lines.append(
        f"cost decisions: {w.get('dropped_pages_cheap', 0)} pages dropped rather than demoted, "
        f"{w.get('recompute_instead_pages', 0)} hit pages recomputed rather than fetched, "
        f"{w.get('admitted_low_pages', 0)} pages admitted to DRAM as its next victims (worth less)"
    )
    return lines


def _tenant_lines(q: dict[str, Any] | None) -> list[str]:
    """Per-tenant usage against its quotas ([quotas]); nothing while no quota is set anywhere."""
    if not q or not (q["default_dram"] or q["default_disk"] or any(t["listed"] for t in q["tenants"])):
        return []

    def of(used: int | None, quota: int) -> str:
        shown = "-" if used is None else format_size(used)
        return f"{shown} of {format_size(quota) if quota else 'unlimited'}"

    lines = [
        "",
        f"tenants (quota for the unlisted: DRAM {format_size(q['default_dram']) if q['default_dram'] else 'unlimited'}, "
        f"disk {format_size(q['default_disk']) if q['default_disk'] else 'unlimited'})",
    ]  # fmt: skip
    for t in q["tenants"]:
        lines.append(
            f"  {t['tenant']:<16} DRAM {of(t['dram_bytes'], t['dram_quota'])}, disk {of(t['disk_bytes'], t['disk_quota'])}; "
            f"evicted by its quota {t['evicted_pages_dram']} DRAM + {t['evicted_pages_disk']} disk pages"
        )  # fmt: skip
    if q["tenants_not_shown"]:
        lines.append(f"  ... and {q['tenants_not_shown']} smaller tenants")
    return lines


def cmd_evict(args: argparse.Namespace) -> int:
    try:
        nbytes = parse_size(args.bytes)
    except ValueError as e:
        print(f"--bytes {args.bytes!r}: {e}", file=sys.stderr)
        return 2
    with _control(args) as c:
        freed = c.evict(args.tier, nbytes)
    if args.tier == "vram":
        print(f"moved {format_size(freed)} of L1 pages to DRAM")
    else:
        print(f"evicted {format_size(freed)} from {args.tier}")
    return 0


def cmd_where(args: argparse.Namespace) -> int:
    from polarkvd.bench.where import request, show

    with _control(args) as c:
        out = c.where(request(args))
    print(json.dumps(out, indent=2) if args.json else show(out))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from polarkvd.route.main import main as route_main

    return route_main(args)


def cmd_drain(args: argparse.Namespace) -> int:
    import threading

    from polarkvd.progress import Progress

    # The drain is one control call that answers when every page is written; meanwhile a second
    # connection polls the counters: pages written to disk since the start, out of the DRAM pages
    # there were (an upper bound: pages already on disk are not written again).
    with _control(args) as c:
        st = c.stats()
    written0 = st["counters"].get("demoted_pages", 0)
    result: dict[str, Any] = {}

    def drain() -> None:
        try:
            with _control(args) as dc:
                result["reply"] = dc.drain()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            result["error"] = e

    worker = threading.Thread(target=drain, name="drain", daemon=True)
    prog = Progress(st["tiers"]["dram"]["pages"], label="drain", unit="pages")
    prog.note("draining: refusing new stores, writing DRAM pages to disk ...")
    with prog, _control(args) as c:
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
            if worker.is_alive():
                now = c.stats()
                pending = now["tiers"].get("disk", {}).get("pending_pages", 0)
                written = now["counters"].get("demoted_pages", 0) - written0
                prog.update(written, what=f"written to disk ({pending} queued)")
    if "error" in result:
        raise result["error"]
    r = result["reply"]
    print(
        f"drained: {r['written_pages']} pages written to disk; run `polarkvd resume` to accept stores again"
    )
    if r.get("unwritten_pages"):  # a full or failing disk: these are in DRAM only
        print(f"{r['unwritten_pages']} pages could not be written (see the daemon's log)", file=sys.stderr)
        return 1
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    with _control(args) as c:
        c.resume()
    print("accepting stores again")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    with _control(args) as c:
        if args.assignments:
            knobs = {}
            for pair in args.assignments:
                key, sep, value = pair.partition("=")
                if not sep:
                    print(
                        f"{pair!r}: expected KEY=VALUE (live knobs: {', '.join(LIVE_KNOBS)})", file=sys.stderr
                    )
                    return 2
                knobs[key] = value
            result = c.set_knobs(knobs)
        else:
            result = c.knobs()
    fields = option_fields()
    for name, value in result.items():
        shown = json.dumps(value) if isinstance(value, dict) else repr(value)  # dict: as typed back
        print(f"{name} = {shown}    # {fields[name].metadata['doc']}")
    return 0


def cmd_tui(args: argparse.Namespace) -> int:
    try:
        import textual  # noqa: F401
    except ImportError:
        print(
            "polarkvd tui needs Textual, which is not installed: pip install 'polarkvd[tui]'",
            file=sys.stderr,
        )
        return 1
    if args.interval <= 0 or args.prefill_ms_per_token < 0:
        print("polarkvd tui: --interval must be > 0 and --prefill-ms-per-token >= 0", file=sys.stderr)
        return 2
    from polarkvd.tui.app import run

    return run(args.socket, args.interval, args.prefill_ms_per_token)


def cmd_bench(args: argparse.Namespace) -> int:
    from polarkvd.bench import BENCHMARKS

    module = importlib.import_module(f"polarkvd.bench.{BENCHMARKS[args.which][0]}")
    return int(module.main(args))


def cmd_sim(args: argparse.Namespace) -> int:
    from polarkvd.bench.gossip_sim import main as sim_main

    return sim_main(args)


# ---------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="polarkvd",
        description="polarkvd: KV-cache node agent for LLM inference. One daemon per host keeps KV pages in "
        "shared DRAM and on disk so no engine prefills the same prefix twice.",
        epilog="Start with `polarkvd serve` (built-in defaults, no file needed), then `polarkvd status`.",
    )
    p.add_argument("--version", action="version", version=f"polarkvd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def control_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--socket",
            help="control socket of the daemon (default: $POLARKV_CONTROL_SOCKET or <runtime dir>/control.sock)",
        )

    sp = sub.add_parser("serve", help="run the daemon in the foreground", description="Run the daemon until SIGTERM/SIGINT. "
                        "Precedence: defaults < --config FILE < POLARKV_<SECTION>_<KEY> environment < --set.")  # fmt: skip
    sp.add_argument("--config", "-c", type=Path, help="TOML config file (see etc/polarkv.toml)")
    sp.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one option, e.g. --set dram.capacity=4GiB (repeatable)",
    )
    sp.set_defaults(fn=cmd_serve)

    sp = sub.add_parser("check-config", help="validate a config file; exit 78 when it is bad")
    sp.add_argument("file", type=Path)
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="also apply an override")
    sp.add_argument("-v", "--verbose", action="store_true", help="print the resolved configuration")
    sp.set_defaults(fn=cmd_check_config)

    sp = sub.add_parser("status", help="tier occupancy, hit/miss counts, sessions and leases")
    sp.add_argument("--json", action="store_true", help="print the raw stats as JSON")
    sp.add_argument(
        "--cluster",
        action="store_true",
        help="the cluster instead: every member, its state, endpoints and space",
    )
    control_args(sp)
    sp.set_defaults(fn=cmd_status)

    sp = sub.add_parser(
        "keygen",
        help="write a new cluster key pair (CURVE) for [cluster] key_file",
        description="Write a new CURVE key pair shared by every member of a cluster. The file is created "
        "with mode 0600; copy it to every host. Without it a process can neither join nor read pages.",
    )
    sp.add_argument("--out", "-o", type=Path, required=True, help="key file to create")
    sp.add_argument("--force", action="store_true", help="overwrite an existing file")
    sp.set_defaults(fn=cmd_keygen)

    sp = sub.add_parser(
        "evict",
        help="evict pages from a tier now (L1 pages move to DRAM, DRAM pages are demoted to disk)",
    )
    sp.add_argument("--tier", choices=["vram", "dram", "disk"], required=True)
    sp.add_argument("--bytes", required=True, help="how much to free, e.g. 1G, 512MiB")
    control_args(sp)
    sp.set_defaults(fn=cmd_evict)

    sp = sub.add_parser(
        "drain", help="refuse new stores and write every DRAM page to disk (before a restart)"
    )
    control_args(sp)
    sp.set_defaults(fn=cmd_drain)

    sp = sub.add_parser("resume", help="accept stores again after a drain")
    control_args(sp)
    sp.set_defaults(fn=cmd_resume)

    sp = sub.add_parser("tune", help="show or change live knobs, e.g. `polarkvd tune dram.policy=s3fifo`")
    sp.add_argument("assignments", nargs="*", metavar="KEY=VALUE")
    control_args(sp)
    sp.set_defaults(fn=cmd_tune)

    sp = sub.add_parser(
        "tui",
        help="the operator dashboard: tiers, hit rates, live tuning, pages (needs polarkvd[tui])",
        description="Attach a terminal dashboard to a running daemon (it never starts one). See docs/TUI.md.",
    )
    control_args(sp)
    sp.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1)")
    sp.add_argument(
        "--prefill-ms-per-token",
        type=float,
        default=0.5,
        metavar="MS",
        help="what computing one token of prefill costs your engine, for the 'prefill saved' estimate (default 0.5)",
    )
    sp.set_defaults(fn=cmd_tui)

    sp = sub.add_parser(
        "where", help="how many leading tokens of a prompt are cached here, by tier, and on other members"
    )
    from polarkvd.bench.where import query_arguments as where_args

    where_args(sp)
    control_args(sp)
    sp.set_defaults(fn=cmd_where)

    sp = sub.add_parser(
        "route", help="an OpenAI-compatible router in front of several engines, by prefix affinity",
        description="Send each OpenAI request to the engine with the least prefill left to do (its own "
        "prefix cache, the host's polarkvd tiers) plus queued work. docs/ROUTING.md.",
    )  # fmt: skip
    from polarkvd.route.main import add_arguments as route_args

    route_args(sp)
    sp.set_defaults(fn=cmd_route)

    sp = sub.add_parser("bench", help="benchmarks (see docs/BENCHMARKS.md)")
    bsub = sp.add_subparsers(dest="which", metavar="BENCHMARK", required=True)
    from polarkvd.bench import BENCHMARKS

    for name, (module, help_line) in BENCHMARKS.items():
        bench = importlib.import_module(f"polarkvd.bench.{module}")
        bench.add_arguments(bsub.add_parser(name, help=help_line))
    sp.set_defaults(fn=cmd_bench)

    sp = sub.add_parser("sim", help="simulations of cluster protocols (see docs/CLUSTER.md)")
    ssub = sp.add_subparsers(dest="which", metavar="SIMULATION", required=True)
    from polarkvd.bench.gossip_sim import add_arguments as sim_gossip_args

    sim_gossip_args(
        ssub.add_parser(
            "gossip", help="SWIM membership on a simulated network: join, failure detection, false deaths"
        )
    )
    sp.set_defaults(fn=cmd_sim)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except ConfigError as e:
        print(f"polarkvd: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except PolarKVError as e:
        print(f"polarkvd: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
