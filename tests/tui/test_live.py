"""The dashboard against a real daemon process: numbers, live tuning, pages actions, disconnects.

Each test starts a daemon (conftest `daemon_factory`), drives it with EngineClient / ControlClient,
and runs the app headless (`app.run_test()`), reading the screen as a person would.
"""

from __future__ import annotations

import asyncio

from polarkvd.config import option_fields, read_tuning
from polarkvd.tui.app import PolarKVApp
from polarkvd.tui.model import human_count
from tests.conftest import chain_tokens, store_chain
from tests.tui.conftest import screen_text, until

SIZE = (100, 32)
# several daemons at once: keep them off the one default metrics port
NO_METRICS = {"metrics.enabled": "false"} if "metrics.enabled" in option_fields() else {}


def _run(coro) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(coro, 120))


def test_overview_shows_what_the_daemon_reports(daemon_factory) -> None:
    d = daemon_factory(NO_METRICS)
    with d.engine(engine_id="engine-a") as kv:
        chains = [store_chain(kv, chain_tokens(i, 8)) for i in range(5)]
        for keys in chains[:3]:
            assert kv.lookup(keys + kv.page_keys(chain_tokens(99, 2))).hits == 8  # 8 hit, 2 miss
            assert kv.load_into(keys, [bytearray(kv.page_bytes) for _ in keys]) == 8
        st = d.stats()

        async def scenario() -> None:
            app = PolarKVApp(d.control_socket, interval=0.2)
            async with app.run_test(size=SIZE) as pilot:
                c = st["counters"]
                await until(
                    pilot,
                    lambda: (
                        app.view.stats and app.view.stats["counters"].get("loaded_pages") == c["loaded_pages"]
                    ),
                    what="a snapshot with the loads",
                )
                text = screen_text(app)
                dram = st["tiers"]["dram"]
                assert f"{dram['pages']} pg" in text  # 40 pages
                assert "L2 DRAM" in text and "L4 disk" in text
                hit = (c["hit_pages_dram"] + c["hit_pages_disk"]) / c["lookup_pages"] * 100
                assert f"hit rate {hit:.1f}%" in text  # 24 of 30 pages: 80.0%
                assert f"({human_count(c['lookup_pages'])} asked)" in text
                assert "engine-a" in text and "test-model@0" in text
                tokens = c["loaded_pages"] * 16
                assert f"{tokens} tokens loaded from cache × 0.5 ms/token" in text
                assert "● connected" in text

        _run(scenario())


def test_tuning_screen_changes_the_daemon(daemon_factory) -> None:
    d = daemon_factory({**NO_METRICS, "dram.capacity": "4MiB"})  # 128 pages
    with d.engine() as kv, d.control() as c:
        for i in range(12):  # 96 pages: 75% of DRAM
            store_chain(kv, chain_tokens(i, 8))
        start = c.knobs()

        async def scenario() -> None:
            app = PolarKVApp(d.control_socket, interval=0.2)
            async with app.run_test(size=SIZE) as pilot:
                await until(pilot, lambda: app.view.knobs, what="knobs")
                await pilot.press("2")
                await until(pilot, lambda: app.screen.query("#knob-dram-low_watermark"), what="knob rows")

                # low first (high is 1.0 now), then high: the daemon demotes down to low at once
                for knob, value in (("low_watermark", "0.5"), ("high_watermark", "60%")):
                    await pilot.click(f"#knob-dram-{knob}")
                    app.screen.query_one(f"#knob-dram-{knob}").value = ""
                    await pilot.press(*value, "enter")
                    await until(pilot, lambda k=knob: c.knobs()[f"dram.{k}"] != start[f"dram.{k}"], what=knob)
                st = c.stats()
                assert st["tiers"]["dram"]["slot_bytes_used"] <= 0.5 * (4 << 20)
                assert st["counters"]["evicted_pages_dram_watermark"] == 32
                await until(pilot, lambda: "  64 pg" in screen_text(app), what="the bar to drop to 64 pages")
                assert "│" in screen_text(app)  # the high watermark mark on the DRAM bar

                # the policy select, by keyboard
                await pilot.click("#knob-dram-policy")
                await pilot.press("down", "enter")
                await until(pilot, lambda: c.knobs()["dram.policy"] == "s3fifo", what="policy change")
                assert c.stats()["tiers"]["dram"]["policy"] == "s3fifo"

                # save writes the knobs changed here to the overlay the daemon reads at start
                await pilot.click("#save")
                overlay = d.root / "state" / "tuning.toml"
                await until(pilot, overlay.exists, what="the overlay file")
                assert read_tuning(overlay) == {
                    "dram.policy": "s3fifo",
                    "dram.high_watermark": 0.6,
                    "dram.low_watermark": 0.5,
                }
                # revert puts the daemon back to the values at dashboard start
                await pilot.click("#revert")
                await until(pilot, lambda: c.knobs() == start, what="revert")

        _run(scenario())


def test_invalid_values_are_refused_and_never_sent(daemon_factory) -> None:
    d = daemon_factory(NO_METRICS)
    with d.control() as c:
        start = c.knobs()

    async def scenario() -> None:
        app = PolarKVApp(d.control_socket, interval=0.2)
        sent: list[str] = []
        real_control = app.control
        app.control = lambda what, call: (sent.append(what), real_control(what, call))  # type: ignore[method-assign]
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.view.knobs, what="knobs")
            await pilot.press("2")
            await until(pilot, lambda: app.screen.query("#knob-dram-high_watermark"), what="knob rows")
            for knob, typed, why in (
                ("dram-high_watermark", "1.5", "must lie between 0 and 1"),
                ("dram-high_watermark", "0.5", "above dram.high_watermark"),  # below low (0.9)
                ("dram-low_watermark", "lots", "expected a fraction"),
                ("dram-min_prefix_pages", "-1", "must be greater than zero"),
                ("dram-min_prefix_pages", "", "empty"),
                ("daemon-lease_seconds", "soon", "expected a duration"),
            ):
                field = app.screen.query_one(f"#knob-{knob}")
                await pilot.click(f"#knob-{knob}")
                field.value = ""
                await pilot.press(*typed, "enter")
                await pilot.pause()
                text = screen_text(app)
                assert "refused, not sent" in text and why in text, text
                assert field.has_class("-invalid")
            await pilot.press("escape")  # puts the field back and leaves it: keys are commands again
            assert field.value == "30"
            await pilot.press("1")
            await until(pilot, lambda: "polarkvd · overview" in screen_text(app), what="overview")
            await pilot.pause(0.5)
            assert sent == []
        with d.control() as c:
            assert c.knobs() == start

    _run(scenario())


def test_pages_screen_pins_unpins_and_evicts(daemon_factory) -> None:
    d = daemon_factory(NO_METRICS)
    with d.engine() as kv, d.control() as c:
        big = store_chain(kv, chain_tokens(1, 12))
        small = store_chain(kv, chain_tokens(2, 4))

        async def scenario() -> None:
            app = PolarKVApp(d.control_socket, interval=0.2)
            async with app.run_test(size=SIZE) as pilot:
                await pilot.press("3")
                await until(pilot, lambda: big[0].hex()[:12] in screen_text(app), what="the prefixes table")
                text = screen_text(app)
                assert text.index(big[0].hex()[:12]) < text.index(small[0].hex()[:12])  # largest first
                await pilot.press("p")
                await until(
                    pilot, lambda: c.stats()["tiers"]["dram"]["operator_pinned_pages"] == 12, what="pin"
                )
                await pilot.press("e")
                await until(pilot, lambda: "12 pinned pages kept" in screen_text(app), what="evict refused")
                assert kv.lookup(big).hits == 12 and c.stats()["tiers"]["dram"]["pages"] == 16
                await pilot.press("u")
                await until(
                    pilot, lambda: c.stats()["tiers"]["dram"]["operator_pinned_pages"] == 0, what="unpin"
                )
                await pilot.press("e")
                await until(pilot, lambda: c.stats()["tiers"]["dram"]["pages"] == 4, what="evict")

        _run(scenario())


def test_disconnected_while_the_daemon_is_gone_and_back_after_restart(daemon_factory) -> None:
    d = daemon_factory(NO_METRICS)

    async def scenario() -> None:
        app = PolarKVApp(d.control_socket, interval=0.2)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: "● connected" in screen_text(app), what="connected")
            d.kill()
            await until(pilot, lambda: "○ disconnected" in screen_text(app), what="disconnected state")
            text = screen_text(app)
            assert "Daemon not reachable" in text and "Retrying in" in text
            assert "L2 DRAM" in text  # the last numbers stay on screen
            d.start()
            await until(pilot, lambda: "● connected" in screen_text(app), timeout=20, what="reconnect")
            assert "Daemon not reachable" not in screen_text(app)

    _run(scenario())
