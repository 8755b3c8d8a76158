"""The control API: what the CLI (and later the TUI) call over the control socket.

Owns validation of operator requests (evict amounts, tiers, knob values) and their mapping onto the
manager. Live knobs are the options marked live in config.py; every value is validated with the same
parser as the config file, and a request with any bad value changes nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from polarkvd.config import LIVE_KNOBS, parse_option
from polarkvd.errors import ConfigError, ErrorCode, PolarKVError, ProtocolError
from polarkvd.manager import Manager
from polarkvd.server import protocol as P
from polarkvd.server.connection import Connection, Handler
from polarkvd.types import Tier

_TIERS = {"dram": Tier.DRAM, "disk": Tier.DISK}


def control_handlers(manager: Manager) -> dict[str, Handler]:
    def stats(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        return manager.stats()

    async def evict(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        tier = _TIERS.get(args.get("tier"))  # type: ignore[arg-type]
        if tier is None:
            raise ProtocolError(f"tier must be one of {sorted(_TIERS)}")
        nbytes = args.get("bytes")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise ProtocolError("bytes must be a non-negative integer")
        if tier is Tier.DRAM:
            freed = manager.evict_bytes(tier, nbytes)
        else:
            freed = await manager.evict_disk(nbytes)
        return {"freed_bytes": freed}

    async def drain(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        return await manager.drain()

    def resume(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        manager.resume()
        return {}

    def get_knobs(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        return {"knobs": {name: manager.cfg.get(name) for name in LIVE_KNOBS}}

    def set_knobs(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        knobs = args.get("knobs")
        if not isinstance(knobs, dict) or not knobs:
            raise ProtocolError("knobs must be a non-empty map of option name to value")
        parsed: dict[str, Any] = {}
        problems: list[str] = []
        for name, value in knobs.items():
            if name not in LIVE_KNOBS:
                problems.append(f"{name}: not a live knob (live: {', '.join(LIVE_KNOBS)})")
                continue
            try:
                parsed[name] = parse_option(name, value)
            except ConfigError as e:
                problems.extend(f"{k} = {v!r}: {why}" for k, v, why in e.problems)
        if problems:
            raise PolarKVError("; ".join(problems), code=ErrorCode.BAD_VALUE)
        for name, value in parsed.items():
            apply_knob(manager, name, value)
        return {"knobs": {name: manager.cfg.get(name) for name in LIVE_KNOBS}}

    def ping(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        return {}

    return {
        P.Op.STATS.value: stats,
        P.Op.EVICT.value: evict,
        P.Op.DRAIN.value: drain,
        P.Op.RESUME.value: resume,
        P.Op.GET_KNOBS.value: get_knobs,
        P.Op.SET_KNOBS.value: set_knobs,
        P.Op.PING.value: ping,
    }


def apply_knob(manager: Manager, name: str, value: Any) -> None:
    """Change one live knob (already parsed and validated)."""
    if name == "dram.policy":
        manager.set_policy(Tier.DRAM, value)
    elif name == "disk.policy":
        manager.set_policy(Tier.DISK, value)
    elif name == "daemon.log_level":
        manager.cfg.daemon.log_level = value
        logging.getLogger("polarkvd").setLevel(value.upper())
    elif name == "daemon.lease_seconds":
        manager.cfg.daemon.lease_seconds = value
    else:  # pragma: no cover - LIVE_KNOBS and this function change together
        raise PolarKVError(f"{name} is marked live but has no setter", code=ErrorCode.INTERNAL)
