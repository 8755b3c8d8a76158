"""The shipped etc/polarkv.toml documents every option and is accepted as it is."""

from __future__ import annotations

import re
from pathlib import Path

from polarkvd.config import Config, load_config, option_fields

ETC = Path(__file__).resolve().parents[1] / "etc" / "polarkv.toml"


def test_shipped_config_loads_to_the_defaults() -> None:
    assert load_config(ETC) == Config()


def test_shipped_config_shows_every_option() -> None:
    text = ETC.read_text()
    section = None
    shown = set()
    for line in text.splitlines():
        if m := re.match(r"^\[(\w+)\]", line):
            section = m.group(1)
        elif m := re.match(r"^(\w+)\s*=", line):
            shown.add(f"{section}.{m.group(1)}")
    assert shown == set(option_fields())
