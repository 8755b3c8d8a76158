"""The shipped etc/polarkv.toml documents every option and is accepted as it is."""

from __future__ import annotations

import re
from pathlib import Path

from polarkvd.config import LIVE_KNOBS, Config, load_config, option_fields
from polarkvd.manager.knobs import EFFECTS

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


def test_shipped_config_marks_exactly_the_live_options() -> None:
    """An option's comment says `[live]` exactly when the option is a live knob (config/ declares it)."""
    section, comment, marked, after_option = None, [], set(), False
    for line in ETC.read_text().splitlines():
        if m := re.match(r"^\[([\w.]+)\]", line):
            section, comment, after_option = m.group(1), [], False
        elif line.startswith("#"):
            comment = [line] if after_option else [*comment, line]  # a new block after an option
            after_option = False
        elif m := re.match(r"^(\w+)\s*=", line):  # options right below each other share a comment
            if "[live]" in " ".join(comment) + line:
                marked.add(f"{section}.{m.group(1)}")
            after_option = True
        else:
            comment, after_option = [], False
    assert marked == set(LIVE_KNOBS)


def test_every_live_knob_has_one_effect_and_a_label() -> None:
    assert set(EFFECTS) == set(LIVE_KNOBS)
    for name in LIVE_KNOBS:
        knob = option_fields()[name].metadata["knob"]
        assert knob.label and knob.note, name
