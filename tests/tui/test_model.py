"""The dashboard's pure parts: rates from counter deltas, knob checks, bars, and the CLI entry."""

from __future__ import annotations

import sys

import pytest

from polarkvd import cli
from polarkvd.tui import panels
from polarkvd.tui.messages import ActionDone, SnapshotReady
from polarkvd.tui.model import (
    RateHistory,
    TierInfo,
    View,
    changed_knobs,
    check_knob,
    human_bytes,
    knob_text,
    tiers,
)
from tests.tui.recorded import KNOBS, STATS, VIEW


def test_rates_are_counter_deltas_per_second_and_restart_with_the_daemon() -> None:
    h = RateHistory(seconds=10)
    h.add(100.0, {"lookups": 10, "hit_pages_dram": 5, "hit_pages_disk": 1, "stored_bytes": 0})
    assert h.series()["lookups"] == ()
    h.add(102.0, {"lookups": 30, "hit_pages_dram": 15, "hit_pages_disk": 3, "stored_bytes": 4000})
    s = h.series()
    assert s["lookups"] == (10.0,) and s["hit_pages"] == (6.0,) and s["stored_bytes"] == (2000.0,)
    h.add(103.0, {"lookups": 2})  # counters went down: a restarted daemon, not a negative rate
    assert h.series()["lookups"] == ()
    for t in range(104, 120):
        h.add(float(t), {"lookups": 2 + (t - 103) * 3})
    assert h.series()["lookups"] == (3.0,) * 10  # only the last 10 seconds are kept


def test_check_knob_refuses_what_the_daemon_would_refuse() -> None:
    assert check_knob("dram.high_watermark", "95%", KNOBS) == 0.95
    assert check_knob("dram.min_prefix_pages", " 3 ", KNOBS) == 3
    assert check_knob("daemon.lease_seconds", "2m", KNOBS) == 120.0
    for name, text, why in (
        ("dram.high_watermark", "1.01", "between 0 and 1"),
        ("dram.high_watermark", "0.5", "above dram.high_watermark"),  # low is 0.75
        ("dram.low_watermark", "0.95", "above dram.high_watermark"),  # high is 0.9
        ("dram.low_watermark", "nan", "expected a fraction"),
        ("dram.min_prefix_pages", "-1", "greater than zero"),
        ("dram.min_prefix_pages", "0", "greater than zero"),
        ("dram.policy", "fifo", "expected one of"),
        ("dram.policy", "  ", "empty"),
    ):
        with pytest.raises(ValueError, match=why):
            check_knob(name, text, KNOBS)


def test_the_tenant_table_knob_is_shown_as_it_is_typed_back() -> None:
    value = {"salt-of-acme": {"name": "acme", "dram": 1 << 30}}
    assert check_knob("quotas.tenants", knob_text(value), KNOBS) == value
    with pytest.raises(ValueError, match=r"quotas.tenants.salt-of-acme.dram = 'lots'"):
        check_knob("quotas.tenants", '{"salt-of-acme": {"dram": "lots"}}', KNOBS)


def test_changed_knobs_lists_start_values() -> None:
    assert changed_knobs(KNOBS, {**KNOBS, "dram.policy": "lru"}) == {"dram.policy": "s3fifo"}
    assert changed_knobs(None, KNOBS) == {}


def test_tier_bar_fits_the_width_and_marks_watermarks() -> None:
    dram = tiers(STATS)[0]
    for width in (60, 80, 132):
        text = panels.tier_bar(dram, width).plain
        assert len(text) == width - 1 or len(text) == width, (width, text)
        assert "│" in text and "╎" in text and "286 pg" in text
    plain = TierInfo("dram", 2, 0, 100, 0, "lru", 0, high=1.0, low=0.9)
    assert "│" not in panels.tier_bar(plain, 80).plain  # high = 1.0: background demotion off
    assert [t.label for t in tiers(STATS)] == ["L2 DRAM", "L4 disk"]


def test_human_bytes_switches_unit_before_four_digits() -> None:
    assert human_bytes(1023 * 1024) == "1.0 MiB"
    assert human_bytes(512) == "512 B"


def test_snapshots_coalesce_and_actions_do_not() -> None:
    assert SnapshotReady(VIEW).can_replace(SnapshotReady(View(socket="x")))
    assert not SnapshotReady(VIEW).can_replace(ActionDone("done"))
    assert not ActionDone("a").can_replace(ActionDone("b"))


def test_tui_without_textual_says_how_to_install(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "textual", None)  # import textual -> ImportError
    assert cli.main(["tui", "--socket", "/nonexistent.sock"]) == 1
    assert "pip install 'polarkvd[tui]'" in capsys.readouterr().err


def test_tui_refuses_a_bad_interval(capsys) -> None:
    assert cli.main(["tui", "--interval", "0"]) == 2
    assert "--interval" in capsys.readouterr().err


def test_tier_summary_says_when_the_lookup_table_is_full() -> None:
    dram = {
        **STATS["tiers"]["dram"],
        "lookup_table": {"entries": 4096, "used": 3072, "deleted": 0, "full": False},
    }
    view = View(
        socket=VIEW.socket, connected=True, stats={**STATS, "tiers": {**STATS["tiers"], "dram": dram}}
    )
    assert "lookup table 3,072/4,096" in panels.tier_summary(view).plain
    assert "FULL" not in panels.tier_summary(view).plain
    dram["lookup_table"] = {**dram["lookup_table"], "full": True}
    assert "FULL: raise dram.lookup_table_entries" in panels.tier_summary(view).plain
