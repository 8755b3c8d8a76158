"""The control API: what the CLI (and later the TUI) call over the control socket.

Owns validation of operator requests (evict amounts, tiers, knob values) and their mapping onto the
manager. Live knobs are the options marked live in config/; every value is validated with the same
parser as the config file, and a request with any bad value changes nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from polarkvd.config import LIVE_KNOBS, parse_option, write_tuning
from polarkvd.errors import ConfigError, ErrorCode, PolarKVError, ProtocolError
from polarkvd.manager import Manager
from polarkvd.manager.knobs import apply_knobs
from polarkvd.server.connection import Connection, Handler, only_args
from polarkvd.server.engine_events import EngineEvents
from polarkvd.server.where import Leading, where_handler
from polarkvd.types import Tier
from polarkvd.wire import frames as P

log = logging.getLogger(__name__)

_TIERS = {"vram": Tier.VRAM, "dram": Tier.DRAM, "disk": Tier.DISK}
_MAX_TOP = 1000


def control_handlers(
    manager: Manager,
    cluster_report: Callable[[], dict[str, Any]] | None = None,
    vram_report: Callable[[], dict[str, Any] | None] | None = None,
    where_cluster: Callable[[], tuple[str, Leading] | None] | None = None,
    engine_events: EngineEvents | None = None,
) -> dict[str, Handler]:
    """`vram_report`: the L1 choice made at start (docs/VRAM.md), shown by `stats` under `vram`;
    `where_cluster`: this member's id and the meta map's query, for `where` (server/where.py)."""

    def stats(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args)
        out = manager.stats()
        # engine connections cost a thread each: the count is bounded by configuration (daemon.
        # max_sessions + daemon.max_unattached_connections, plus a few of the daemon's own)
        out["process"] = {"pid": os.getpid(), "threads": threading.active_count()}
        vram = vram_report() if vram_report is not None else None
        if vram is not None:
            out["vram"] = vram
        return out

    def cluster(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args)
        return cluster_report() if cluster_report is not None else {"enabled": False}

    async def evict(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args, "tier", "bytes")
        name = args.get("tier")
        tier = _TIERS.get(name) if isinstance(name, str) else None
        if tier is None:
            raise ProtocolError(f"tier must be one of {sorted(_TIERS)}")
        nbytes = args.get("bytes")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise ProtocolError("bytes must be a non-negative integer")
        if tier is Tier.DRAM:
            freed = manager.evict_bytes(tier, nbytes)
        elif tier is Tier.VRAM:
            freed = await manager.evict_vram(nbytes)
        else:
            freed = await manager.evict_disk(nbytes)
        return {"freed_bytes": freed}

    async def drain(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args)
        return await manager.drain()

    def resume(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args)
        manager.resume()
        return {}

    def get_knobs(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args)
        return {"knobs": {name: manager.cfg.get(name) for name in LIVE_KNOBS}}

    def set_knobs(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args, "knobs")
        knobs = args.get("knobs")
        if not isinstance(knobs, dict) or not knobs:
            raise ProtocolError("knobs must be a non-empty map of option name to value")
        parsed: dict[str, Any] = {}
        problems: list[str] = []
        for name, value in knobs.items():
            if name not in LIVE_KNOBS:
                problems.append(f"{name!s:.60}: not a live knob (live: {', '.join(LIVE_KNOBS)})")
                continue
            try:
                parsed[name] = parse_option(name, value)
            except ConfigError as e:
                problems.extend(f"{k} = {v!r:.80}: {why}" for k, v, why in e.problems)
        if problems:  # client text is clipped, and at most 8 problems are spelled out
            more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
            raise PolarKVError("; ".join(problems[:8]) + more, code=ErrorCode.BAD_VALUE)
        apply_knobs(manager, parsed)  # the one path of every change (manager/knobs.py)
        return {"knobs": {name: manager.cfg.get(name) for name in LIVE_KNOBS}}

    def save_tuning(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args, "names")
        names = args.get("names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ProtocolError("names must be a non-empty array of live knob names")
        unknown = [n for n in names if n not in LIVE_KNOBS]
        if unknown:
            raise PolarKVError(
                f"not live knobs: {', '.join(f'{n:.60}' for n in unknown[:8])}"
                f"{f' and {len(unknown) - 8} more' if len(unknown) > 8 else ''} (live: {', '.join(LIVE_KNOBS)})",
                code=ErrorCode.BAD_VALUE,
            )
        path = manager.cfg.daemon.tuning_file
        if not path:
            raise PolarKVError("daemon.tuning_file is not set", code=ErrorCode.BAD_VALUE)
        try:
            saved = write_tuning(path, {n: manager.cfg.get(n) for n in names})
        except (OSError, ConfigError) as e:
            raise PolarKVError(
                f"cannot write the tuning overlay {path}: {e}", code=ErrorCode.INTERNAL
            ) from None
        log.info("saved live knobs %s to %s", ", ".join(names), path)
        return {"path": str(path), "saved": saved}

    def _keys(args: dict[str, Any]) -> list[bytes]:
        if "keys" not in args:
            raise ProtocolError("missing keys")
        keys = P.unpack_keys(args["keys"], manager.cfg.daemon.max_keys_per_request)
        if not keys:
            raise ProtocolError("keys must name at least one prefix")
        return keys

    async def top(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args, "limit")
        limit = args.get("limit", 20)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= _MAX_TOP:
            raise ProtocolError(f"limit must be an integer from 1 to {_MAX_TOP}")
        return await manager.top(limit)

    def pin(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args, "keys")
        return manager.pin(_keys(args))

    def unpin(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args, "keys")
        return {"unpinned_pages": manager.unpin(_keys(args))}

    def evict_keys(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args, "keys")
        return manager.evict_prefixes(_keys(args))

    def ping(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args)
        return {}

    return {
        P.Op.STATS.value: stats,
        P.Op.EVICT.value: evict,
        P.Op.DRAIN.value: drain,
        P.Op.RESUME.value: resume,
        P.Op.GET_KNOBS.value: get_knobs,
        P.Op.SET_KNOBS.value: set_knobs,
        P.Op.SAVE_TUNING.value: save_tuning,
        P.Op.TOP.value: top,
        P.Op.PIN.value: pin,
        P.Op.UNPIN.value: unpin,
        P.Op.EVICT_KEYS.value: evict_keys,
        P.Op.PING.value: ping,
        P.Op.CLUSTER.value: cluster,
        P.Op.WHERE.value: where_handler(manager, where_cluster, engine_events),
    }
