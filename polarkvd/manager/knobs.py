"""Live knobs: what a change of each one does, declared once, and the one path every change takes.

`polarkvd tune`, the dashboard (both through the control API's `set_knobs`) and a SIGHUP reload
(daemon.py) all call `apply_knobs`: the values are checked together (the watermark pair), each is
applied by its effect below, and what must follow a change follows it whichever way it came (new
watermarks are enforced at once). The option itself (type, range, help, the dashboard's label and
note) is declared in config/__init__.py; tests check that every live option has an effect here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from polarkvd.config import watermark_problems
from polarkvd.errors import ErrorCode, PolarKVError
from polarkvd.types import Tier

if TYPE_CHECKING:
    from polarkvd.manager import Manager


def _set(section: str, key: str) -> Callable[[Manager, Any], None]:
    """The effect of a knob that the manager reads at each use: the setting itself."""

    def effect(m: Manager, value: Any) -> None:
        setattr(getattr(m.cfg, section), key, value)

    return effect


def _log_level(m: Manager, value: str) -> None:
    m.cfg.daemon.log_level = value
    logging.getLogger("polarkvd").setLevel(value.upper())


#: What changing each live knob does. The quotas are read in place at each use (a tenant now over
#: its DRAM quota gives pages back at its next reserve, over its disk quota at its next disk write).
EFFECTS: dict[str, Callable[[Manager, Any], None]] = {
    "daemon.log_level": _log_level,
    "daemon.lease_seconds": _set("daemon", "lease_seconds"),
    "dram.policy": lambda m, name: m.set_policy(Tier.DRAM, name),
    "dram.high_watermark": _set("dram", "high_watermark"),
    "dram.low_watermark": _set("dram", "low_watermark"),
    "dram.min_prefix_pages": _set("dram", "min_prefix_pages"),
    "disk.policy": lambda m, name: m.set_policy(Tier.DISK, name),
    "disk.write_through": _set("disk", "write_through"),
    "quotas.default_dram": _set("quotas", "default_dram"),
    "quotas.default_disk": _set("quotas", "default_disk"),
    "quotas.tenants": _set("quotas", "tenants"),
}


def knob_problems(m: Manager, parsed: Mapping[str, Any]) -> list[tuple[str, object, str]]:
    """What is wrong with these (parsed) values together with the running ones."""
    high = parsed.get("dram.high_watermark", m.cfg.dram.high_watermark)
    low = parsed.get("dram.low_watermark", m.cfg.dram.low_watermark)
    return watermark_problems(high, low)


def apply_knobs(m: Manager, parsed: Mapping[str, Any]) -> None:
    """Apply parsed live knobs, all or none: refused (BAD_VALUE, every problem named) when they do
    not fit together. Then what follows a change: new watermarks are enforced now, so the effect
    shows without waiting for the chore."""
    unknown = [name for name in parsed if name not in EFFECTS]
    if unknown:
        raise PolarKVError(f"not live knobs: {', '.join(unknown)}", code=ErrorCode.BAD_VALUE)
    problems = knob_problems(m, parsed)
    if problems:
        raise PolarKVError(
            "; ".join(f"{k} = {v!r}: {why}" for k, v, why in problems), code=ErrorCode.BAD_VALUE
        )
    for name, value in parsed.items():
        EFFECTS[name](m, value)
    if "dram.high_watermark" in parsed or "dram.low_watermark" in parsed:
        m.enforce_watermarks()
