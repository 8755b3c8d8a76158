"""What an option is: a dataclass field carrying its parser, its help text and, for a live knob, how
the dashboard shows it. Every section (`config/__init__.py`, `kv_events.py`, `quotas.py`) declares its
options with `option`; `config.option_fields` reads the metadata back."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Knob:
    """What makes an option a live knob: how the dashboard names it (`label`) and a hint short
    enough for its row (`note`). What a change does is declared once too, beside the state it
    changes (polarkvd/manager/knobs.py); every way of changing it (`polarkvd tune`, the TUI, a
    SIGHUP reload) goes through there."""

    label: str
    note: str


def option(default: Any, parse: Callable[[object], Any], doc: str, *, live: Knob | None = None) -> Any:
    """A section's field: `default`, parsed from TOML/environment/--set text by `parse`, described by
    `doc`; `live` makes it a knob that changes without a restart."""
    meta = {"parse": parse, "doc": doc, "live": live is not None, "knob": live}
    if isinstance(default, dict):  # a table: each Config gets its own
        return dataclasses.field(default_factory=lambda: dict(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class OptionProblems(ValueError):
    """Several problems inside one option's value (a table): (key below the option, value, why)."""

    def __init__(self, problems: list[tuple[str, object, str]]) -> None:
        super().__init__("; ".join(f"{k} = {v!r}: {why}" for k, v, why in problems))
        self.problems = problems
