"""Operator tuning on the daemon side: watermarks, admission, write-through, the tuning overlay, and
the `top` / `pin` / `unpin` / `evict_keys` control ops (what `polarkvd tui` drives)."""

from __future__ import annotations

import asyncio
import os

import pytest

from polarkvd.config import load_config, option_fields, read_tuning, write_tuning
from polarkvd.errors import ConfigError, ErrorCode, NoSpaceError, PolarKVError, ProtocolError
from polarkvd.keys import page_keys
from polarkvd.types import Tier
from polarkvd.wire import frames as P
from tests.conftest import (
    TEST_NS,
    chain_tokens,
    make_manager,
    manager_store,
    page_bytes_for,
    store_chain,
    wait_for,
)

# several daemons at once: keep them off the one default metrics port
NO_METRICS = {"metrics.enabled": "false"} if "metrics.enabled" in option_fields() else {}
CAP = "4MiB"  # 128 pages of TEST_NS
CAP_BYTES = 4 << 20
PAGE = TEST_NS.page_bytes


def _keys(m, session, seed: int, pages: int) -> list[bytes]:  # type: ignore[no-untyped-def]
    return page_keys(session.ns.digest, chain_tokens(seed, pages), TEST_NS.page_tokens)


@pytest.fixture(scope="module")
def shared_daemon(module_daemon_factory):  # type: ignore[no-untyped-def]
    """One daemon for the many cheap bad-input cases."""
    return module_daemon_factory(NO_METRICS, name="shared")


# ---------------------------------------------------------------------------------------- watermarks


def test_watermarks_demote_down_to_low_and_spare_pinned_pages() -> None:
    m, _ = make_manager(128, **{"dram.high_watermark": "0.5", "dram.low_watermark": "25%"})
    s = m.attach(TEST_NS, "e")
    chains = [_keys(m, s, i, 8) for i in range(12)]  # 96 pages = 75% of the arena
    for keys in chains:
        manager_store(m, s, keys)
    assert m.allocator.used_bytes == 96 * PAGE
    pinned = m.pin([chains[0][0]])
    assert pinned["pinned_pages"] == 8

    evicted = m.enforce_watermarks()

    assert m.allocator.used_bytes <= 0.25 * m.allocator.capacity
    assert evicted == 96 - 32 and m.counters["evicted_pages_dram_watermark"] == evicted
    tiers, _ = m.lookup(s, chains[0])
    assert tiers == [Tier.DRAM] * 8  # the pinned prefix stayed
    assert m.enforce_watermarks() == 0  # below the high mark: nothing to do


def test_watermark_at_one_means_only_on_demand() -> None:
    m, _ = make_manager(128)  # defaults: high 1.0
    s = m.attach(TEST_NS, "e")
    for i in range(16):
        manager_store(m, s, _keys(m, s, i, 8))
    assert m.index.ready_pages == 128
    assert m.enforce_watermarks() == 0 and m.index.ready_pages == 128


def test_watermarks_live_through_the_control_api(daemon_factory) -> None:
    d = daemon_factory({**NO_METRICS, "dram.capacity": CAP})
    with d.engine() as kv, d.control() as c:
        for i in range(12):  # 96 of 128 pages
            store_chain(kv, chain_tokens(i, 8))
        assert d.stats()["tiers"]["dram"]["pages"] == 96
        knobs = c.set_knobs({"dram.high_watermark": "60%", "dram.low_watermark": 0.5})
        assert knobs["dram.high_watermark"] == 0.6 and knobs["dram.low_watermark"] == 0.5
        st = c.stats()  # enforced at once by set_knobs
        assert st["tiers"]["dram"]["slot_bytes_used"] <= 0.5 * CAP_BYTES
        assert st["counters"]["evicted_pages_dram_watermark"] == 96 - 64
        wait_for(lambda: c.stats()["counters"].get("demoted_pages", 0) >= 32, what="demotions written")
        # more stores cross the high mark again: the background chore brings DRAM back to low
        for i in range(12, 16):
            store_chain(kv, chain_tokens(i, 8))
        wait_for(
            lambda: c.stats()["tiers"]["dram"]["slot_bytes_used"] <= 0.5 * CAP_BYTES,
            what="background demotion down to the low watermark",
        )
        assert kv.lookup(kv.page_keys(chain_tokens(0, 8))).hits == 8  # demoted, still a (disk) hit


def test_bad_watermarks_are_refused_and_change_nothing(daemon_factory) -> None:
    with daemon_factory(NO_METRICS).control() as c:
        before = c.knobs()
        for bad in (
            {"dram.high_watermark": "150%"},
            {"dram.high_watermark": "lots"},
            {"dram.low_watermark": -0.1},
            {"dram.high_watermark": 0.5, "dram.low_watermark": 0.8},
            {"dram.high_watermark": 0.5},  # below the current low (0.9)
            {"dram.min_prefix_pages": 0},
            {"dram.min_prefix_pages": -1},
            {"disk.write_through": "maybe"},
            {"dram.policy": "s3fifo", "dram.low_watermark": "x"},  # one bad value: nothing changes
        ):
            with pytest.raises(PolarKVError) as e:
                c.set_knobs(bad)
            assert e.value.code == ErrorCode.BAD_VALUE, bad
        assert c.knobs() == before


def test_config_file_refuses_low_above_high() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(env={}, overrides={"dram.high_watermark": "0.5", "dram.low_watermark": "0.6"})
    assert e.value.problems[0][0] == "dram.low_watermark"


# ---------------------------------------------------------------------------------------- admission


def test_min_prefix_pages_refuses_short_sequences() -> None:
    m, _ = make_manager(128, **{"dram.min_prefix_pages": "4"})
    s = m.attach(TEST_NS, "e")
    short = _keys(m, s, 1, 3)
    assert m.reserve(s, short, None) == [P.Reserved.NO_SPACE] * 3
    assert m.counters["not_admitted_pages"] == 3 and m.index.ready_pages == 0 and not s.reserved

    long = _keys(m, s, 2, 6)
    manager_store(m, s, long[:4])  # 4 pages from the root: admitted
    # a continuation is as long as its chain: 4 cached + 2 new
    assert all(off >= 0 for off in manager_store(m, s, long[4:], parent=long[3]))
    assert m.index.ready_pages == 6
    # a continuation of a parent the daemon does not hold counts that parent: 1 + 2 < 4
    other = _keys(m, s, 3, 3)
    assert m.reserve(s, other[1:], other[0]) == [P.Reserved.NO_SPACE] * 2


def test_min_prefix_pages_live(daemon_factory) -> None:
    daemon = daemon_factory(NO_METRICS)
    with daemon.engine() as kv, daemon.control() as c:
        c.set_knobs({"dram.min_prefix_pages": 4})
        keys = kv.page_keys(chain_tokens(5, 3))
        r = kv.store(keys, [page_bytes_for(k, kv.page_bytes) for k in keys])
        assert (r.stored, r.no_space) == (0, 3)
        assert kv.lookup(keys).hits == 0
        assert c.stats()["counters"]["not_admitted_pages"] == 3
        c.set_knobs({"dram.min_prefix_pages": 1})
        r = kv.store(keys, [page_bytes_for(k, kv.page_bytes) for k in keys])
        assert r.stored == 3


# ---------------------------------------------------------------------------------------- write-through


def test_write_through_puts_committed_pages_on_disk(daemon_factory) -> None:
    d = daemon_factory({**NO_METRICS, "dram.capacity": CAP})
    with d.engine() as kv, d.control() as c:
        store_chain(kv, chain_tokens(1, 8))
        assert c.stats()["tiers"]["disk"]["pages"] == 0  # write-back: nothing written yet
        assert c.set_knobs({"disk.write_through": "on"})["disk.write_through"] is True
        store_chain(kv, chain_tokens(2, 8))
        wait_for(
            lambda: c.stats()["counters"].get("written_through_pages") == 8, what="write-through of 8 pages"
        )
        st = c.stats()
        assert st["tiers"]["disk"]["pages"] == 8 and st["tiers"]["disk"]["write_through"] is True
        # evicting them later costs no second write
        assert c.evict_keys([kv.page_keys(chain_tokens(2, 8))[0]])["evicted_pages"] == 8
        assert c.stats()["counters"].get("demoted_pages", 0) == 0
        assert kv.lookup(kv.page_keys(chain_tokens(2, 8))).tiers == [Tier.DISK] * 8


# ---------------------------------------------------------------------------------------- pages: top, pin, evict


def test_top_pin_unpin_and_evict_keys_in_process() -> None:
    m, _ = make_manager(128)
    s = m.attach(TEST_NS, "e")
    grown = _keys(m, s, 1, 20)
    big = grown[:16]
    small = _keys(m, s, 2, 4)
    manager_store(m, s, big)
    manager_store(m, s, small)
    manager_store(m, s, grown[16:], parent=big[-1])  # the big chain grows: same prefix

    top = asyncio.run(m.top(10))
    assert [(p["key"], p["pages"]) for p in top["prefixes"]] == [(big[0], 20), (small[0], 4)]
    assert top["namespaces"][0]["dram_pages"] == 24 and top["namespaces"][0]["model"] == TEST_NS.model

    assert m.pin([small[0]]) == {"pinned_pages": 4, "pinned_bytes": 4 * PAGE}
    assert m.pin([small[0]])["pinned_pages"] == 0  # already pinned: counted once
    assert m.evict_bytes(Tier.DRAM, 1 << 30) == 20 * PAGE  # everything but the pinned prefix
    assert m.lookup(s, small)[0] == [Tier.DRAM] * 4
    assert m.evict_prefixes([small[0]]) == {"evicted_pages": 0, "freed_bytes": 0, "kept_pages": 4}
    assert m.unpin([small[2]]) == 2  # from the third page on
    assert m.evict_prefixes([small[0]]) == {"evicted_pages": 2, "freed_bytes": 2 * PAGE, "kept_pages": 2}
    assert m.lookup(s, small)[0] == [Tier.DRAM] * 2
    assert m.unpin([small[0]]) == 2 and not m.operator_pins


def test_pins_may_hold_at_most_half_of_dram() -> None:
    m, _ = make_manager(128)
    s = m.attach(TEST_NS, "e")
    a, b = _keys(m, s, 1, 60), _keys(m, s, 2, 8)
    manager_store(m, s, a)
    manager_store(m, s, b)
    m.pin([a[0]])
    with pytest.raises(NoSpaceError, match="at most half"):
        m.pin([b[0]])
    assert len(m.operator_pins) == 60


def test_pages_ops_through_the_daemon(daemon_factory) -> None:
    daemon = daemon_factory(NO_METRICS)
    with daemon.engine() as kv, daemon.control() as c:
        hot = store_chain(kv, chain_tokens(1, 4))
        cold = store_chain(kv, chain_tokens(2, 10))
        for _ in range(3):
            assert kv.load_into(hot, [bytearray(kv.page_bytes) for _ in hot]) == 4
        top = c.top(5)
        by_key = {p["key"]: p for p in top["prefixes"]}
        assert by_key[hot[0]]["hits"] == 12 and by_key[hot[0]]["pages"] == 4
        assert by_key[cold[0]]["bytes"] == 10 * kv.page_bytes and by_key[cold[0]]["hits"] == 0
        ns = top["namespaces"][0]
        assert (ns["model"], ns["dram_pages"], ns["loaded_pages"], ns["sessions"]) == (
            TEST_NS.model,
            14,
            12,
            1,
        )

        assert c.pin([hot[0]])["pinned_pages"] == 4
        assert c.stats()["tiers"]["dram"]["operator_pinned_pages"] == 4
        assert c.evict_keys([hot[0], cold[0]]) == {
            "evicted_pages": 10,
            "freed_bytes": 10 * kv.page_bytes,
            "kept_pages": 4,
        }
        assert kv.lookup(hot).tiers == [Tier.DRAM] * 4
        wait_for(lambda: kv.lookup(cold).tiers == [Tier.DISK] * 10, what="cold prefix demoted")
        assert c.unpin([hot[0]]) == 4
        assert c.evict_keys([hot[0]])["evicted_pages"] == 4
        assert c.top(5)["namespaces"][0]["dram_pages"] == 0


@pytest.mark.parametrize(
    "op, args",
    [
        ("top", {"limit": 0}),
        ("top", {"limit": "10"}),
        ("top", {"limit": True}),
        ("top", {"limit": 10, "extra": 1}),
        ("pin", {}),
        ("pin", {"keys": []}),
        ("pin", {"keys": [b"short"]}),
        ("pin", {"keys": "not a list"}),
        ("unpin", {"keys": [b"\0" * 16], "all": True}),
        ("evict_keys", {"keys": [123]}),
        ("save_tuning", {}),
        ("save_tuning", {"names": []}),
        ("save_tuning", {"names": "dram.policy"}),
    ],
)
def test_bad_arguments_get_bad_request(shared_daemon, op: str, args: dict) -> None:
    with shared_daemon.control() as c:
        with pytest.raises(ProtocolError):
            c._ch.call(op, args)
        c.ping()  # the connection and the daemon are fine


def test_save_tuning_refuses_options_that_are_not_live(shared_daemon) -> None:
    with shared_daemon.control() as c, pytest.raises(PolarKVError) as e:
        c.save_tuning(["dram.capacity"])
    assert e.value.code == ErrorCode.BAD_VALUE


# ---------------------------------------------------------------------------------------- the tuning overlay


def test_overlay_precedence_file_then_overlay_then_env_then_set(tmp_path) -> None:
    conf = tmp_path / "polarkv.toml"
    conf.write_text(
        f'[daemon]\nstate_dir = "{tmp_path}"\n[dram]\npolicy = "lru"\nhigh_watermark = 0.8\nlow_watermark = 0.5\n'
    )
    write_tuning(tmp_path / "tuning.toml", {"dram.policy": "s3fifo", "dram.high_watermark": 0.95})
    assert load_config(conf, env={}).dram.policy == "lru"  # without tuning=True: the file alone
    cfg = load_config(conf, env={}, tuning=True)
    assert (cfg.dram.policy, cfg.dram.high_watermark) == ("s3fifo", 0.95)
    env = {"POLARKV_DRAM_POLICY": "lru"}
    assert load_config(conf, env=env, tuning=True).dram.policy == "lru"
    cfg = load_config(conf, env={}, overrides={"dram.high_watermark": "0.9"}, tuning=True)
    assert cfg.dram.high_watermark == 0.9
    # an explicit tuning_file wins over <state_dir>/tuning.toml
    other = tmp_path / "elsewhere.toml"
    write_tuning(other, {"dram.low_watermark": 0.2})
    cfg = load_config(conf, env={}, overrides={"daemon.tuning_file": str(other)}, tuning=True)
    assert (cfg.dram.policy, cfg.dram.low_watermark) == ("lru", 0.2)


def test_overlay_holds_only_live_knobs(tmp_path) -> None:
    (tmp_path / "tuning.toml").write_text('[dram]\ncapacity = "1GiB"\n')
    with pytest.raises(ConfigError, match="only live knobs"):
        load_config(env={}, overrides={"daemon.state_dir": str(tmp_path)}, tuning=True)
    (tmp_path / "tuning.toml").write_text("[dram\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_tuning(tmp_path / "tuning.toml")


def test_save_tuning_survives_a_restart(daemon_factory) -> None:
    d = daemon_factory(NO_METRICS)
    with d.control() as c:
        c.set_knobs({"dram.policy": "s3fifo", "dram.high_watermark": "0.97", "disk.write_through": True})
        r = c.save_tuning(["dram.policy", "dram.high_watermark"])
    overlay = d.root / "state" / "tuning.toml"
    assert r["path"] == str(overlay) and r["saved"] == {"dram.policy": "s3fifo", "dram.high_watermark": 0.97}
    assert oct(os.stat(overlay).st_mode & 0o777) in ("0o644", "0o664", "0o600", "0o640")
    d.stop()
    d.start()
    with d.control() as c:
        knobs = c.knobs()
    assert knobs["dram.policy"] == "s3fifo" and knobs["dram.high_watermark"] == 0.97
    assert knobs["disk.write_through"] is False  # changed but not saved
