"""Per-tenant quotas (issue 13): a tenant (a cache_salt) over its DRAM or disk quota gives back its own
pages, never another tenant's; quotas are live knobs, validated like the config file, and shown per
tenant in `status`."""

from __future__ import annotations

import dataclasses
import json
import signal

import pytest

from polarkvd.cli import render_status
from polarkvd.config import ConfigError, load_config
from polarkvd.errors import PolarKVError
from polarkvd.metrics import Snapshot, families
from polarkvd.types import Tier
from tests.conftest import TEST_NS, bad_pages, chain_tokens, store_chain, wait_for

A_NS = dataclasses.replace(TEST_NS, cache_salt="salt-of-a")
B_NS = dataclasses.replace(TEST_NS, cache_salt="salt-of-b")
PAGE = TEST_NS.page_bytes  # 32 KiB


def _tenant(stats: dict, name: str) -> dict:
    rows = [t for t in stats["quotas"]["tenants"] if t["tenant"] == name]
    assert rows, (name, stats["quotas"])
    return rows[0]


def _tiers(kv, chains: list[list[bytes]]) -> list[int]:
    out: list[int] = []
    for keys in chains:
        r = kv.lookup(keys)
        out += [int(t) for t in r.tiers] + [0] * (len(keys) - r.hits)
    return out


def test_a_tenant_storing_ten_times_its_dram_quota_never_evicts_another_tenants_pages(daemon_factory) -> None:
    # 128 pages of arena; tenant a may hold 32 (1 MiB), tenant b holds 64: a's 320 pages would
    # push b's out of a full arena without the quota
    quotas = json.dumps({"salt-of-a": {"name": "acme", "dram": "1MiB"}})
    d = daemon_factory({"dram.capacity": "4MiB", "disk.enabled": "false", "quotas.tenants": quotas})
    with d.engine(B_NS, "b") as b, d.engine(A_NS, "a") as a:
        b_chains = [store_chain(b, chain_tokens(1000 + c, 4)) for c in range(16)]
        assert _tiers(b, b_chains) == [int(Tier.DRAM)] * 64
        a_chains = [store_chain(a, chain_tokens(c, 4)) for c in range(80)]  # 10x its quota

        assert _tiers(b, b_chains) == [int(Tier.DRAM)] * 64  # every page of b is still in DRAM
        for keys in b_chains:
            r = b.load(keys)
            assert r.loaded == 4 and not bad_pages(b, keys, r.views)
            del r.views
            b.release(r.lease)
        held = sum(1 for t in _tiers(a, a_chains) if t == Tier.DRAM)
        assert 0 < held <= 32  # a holds its quota's worth: its latest pages
        assert _tiers(a, a_chains[-2:]) == [int(Tier.DRAM)] * 8
        st = d.stats()
        acme = _tenant(st, "acme")
        assert acme["dram_bytes"] <= 1 << 20 and acme["dram_quota"] == 1 << 20
        assert acme["evicted_pages_dram"] == 320 - held
        other = [t for t in st["quotas"]["tenants"] if t["tenant"] != "acme"]
        assert len(other) == 1 and other[0]["evicted_pages_dram"] == 0 and other[0]["dram_bytes"] == 64 * PAGE
        assert "salt-of-b" not in json.dumps(st)  # salts are secrets: shown by a digest
        assert st["counters"]["evicted_pages_dram_quota"] == 320 - held

        # what an operator reads: `polarkvd status` and the metrics
        text = render_status({**st, "uptime_s": 1.0})
        assert "acme             DRAM 1.0 MiB of 1.0 MiB" in text
        assert f"evicted by its quota {320 - held} DRAM + 0 disk pages" in text
        assert "salt-of" not in text
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in families(Snapshot(stats=st, timings={}, ready=True))
            for s in f.samples
        }
        assert samples[("polarkv_tenant_quota_bytes", (("tenant", "acme"), ("tier", "dram")))] == 1 << 20
        assert (
            samples[("polarkv_tenant_bytes", (("tenant", other[0]["tenant"]), ("tier", "dram")))] == 64 * PAGE
        )
        assert (
            samples[("polarkv_tenant_evicted_pages_total", (("tenant", "acme"), ("tier", "dram")))]
            == 320 - held
        )


def test_disk_quota_evicts_only_the_tenants_own_disk_pages(daemon_factory) -> None:
    # DRAM of 32 pages: almost everything goes to disk; a may keep 40 pages' worth there
    quotas = json.dumps({"salt-of-a": {"name": "acme", "disk": str(40 * (PAGE + 4096))}})
    d = daemon_factory({"dram.capacity": "1MiB", "quotas.tenants": quotas})
    with d.engine(B_NS, "b") as b, d.engine(A_NS, "a") as a:
        b_chains = [store_chain(b, chain_tokens(1000 + c, 4)) for c in range(16)]
        wait_for(lambda: d.stats()["tiers"]["disk"]["pages"] >= 64 - 32, what="b's pages on disk")
        for c in range(100):  # 400 pages: 10x its disk quota
            store_chain(a, chain_tokens(c, 4))
            if c % 10 == 9:  # let the disk writes keep up (else demotions are dropped, not quota'd)
                wait_for(lambda: d.stats()["tiers"]["disk"]["pending_pages"] == 0, what="disk writes")
        wait_for(lambda: d.stats()["tiers"]["disk"]["pending_pages"] == 0, what="disk writes")
        # every page of b is still cached (in DRAM or on disk) and whole
        for keys in b_chains:
            r = b.load(keys)
            assert r.loaded == 4 and not bad_pages(b, keys, r.views)
            del r.views
            b.release(r.lease)
        st = d.stats()
        acme = _tenant(st, "acme")
        assert acme["disk_bytes"] <= acme["disk_quota"]
        assert acme["evicted_pages_disk"] > 0
        other = [t for t in st["quotas"]["tenants"] if t["tenant"] != "acme"]
        assert other[0]["evicted_pages_disk"] == 0


def test_quotas_are_live_knobs_and_bad_values_change_nothing(daemon_factory) -> None:
    d = daemon_factory({"dram.capacity": "4MiB", "disk.enabled": "false"})
    with d.engine(A_NS, "a") as a, d.control() as ctl:
        chains = [store_chain(a, chain_tokens(c, 4)) for c in range(16)]  # 64 pages, 2 MiB
        with pytest.raises(PolarKVError) as e:
            ctl.set_knobs(
                {"quotas.tenants": {"salt-of-a": {"dram": "lots", "ram": 1}}, "quotas.default_disk": "x"}
            )
        msg = str(e.value)
        assert "quotas.tenants.salt-of-a.dram" in msg and "quotas.tenants.salt-of-a.ram" in msg
        assert "quotas.default_disk" in msg
        assert ctl.knobs()["quotas.tenants"] == {}

        got = ctl.set_knobs({"quotas.default_dram": "512KiB"})
        assert got["quotas.default_dram"] == 512 << 10
        store_chain(a, chain_tokens(99, 1))  # the next reserve brings a within its new quota
        st = d.stats()
        row = st["quotas"]["tenants"][0]
        assert row["dram_quota"] == 512 << 10 and row["dram_bytes"] <= 512 << 10
        assert sum(1 for t in _tiers(a, chains) if t == Tier.DRAM) <= 15
        # a tenant listed with 0 is unlimited whatever the default
        ctl.set_knobs({"quotas.tenants": json.dumps({"salt-of-a": {"dram": 0, "name": "acme"}})})
        store_chain(a, chain_tokens(100, 8))
        assert _tenant(d.stats(), "acme")["dram_bytes"] > 512 << 10


def test_sighup_reloads_quotas_from_the_config_file(tmp_path) -> None:
    from tests.test_service import Service

    paths = {"daemon.runtime_dir": str(tmp_path / "run"), "daemon.state_dir": str(tmp_path / "state")}
    sets = {
        **paths,
        "dram.capacity": "4MiB",
        "dram.slab_bytes": "1MiB",
        "disk.enabled": "false",
        "metrics.enabled": "false",
    }
    svc = Service(tmp_path, config='[quotas]\ndefault_dram = "0"\n', sets=sets)
    try:
        svc.start()
        svc.write_config(
            '[quotas]\ndefault_dram = "256KiB"\n\n[quotas.tenants.salt-of-a]\nname = "acme"\ndisk = "1MiB"\n'
        )
        svc.signal(signal.SIGHUP)
        wait_for(lambda: svc.control().knobs()["quotas.default_dram"] == 256 << 10, what="the reload")
        assert svc.control().knobs()["quotas.tenants"] == {"salt-of-a": {"name": "acme", "disk": 1 << 20}}
        assert "salt-of-a" not in svc.log()  # the reload's log line names no salt
    finally:
        if svc.proc is not None:
            svc.proc.kill()
            svc.proc.wait()


def test_config_reports_every_problem_of_the_tenant_table() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(
            env={},
            overrides={
                "quotas.tenants": {
                    "a": {"dram": "1GiB", "name": "x"},
                    "b": {"dram": -1, "name": "x"},
                    "c": "2GiB",
                    "d": {"disk": "1GiB", "colour": "red"},
                }
            },
        )
    keys = [k for k, _v, _why in e.value.problems]
    assert keys == [
        "quotas.tenants.b.dram",
        "quotas.tenants.b.name",
        "quotas.tenants.c",
        "quotas.tenants.d.colour",
    ]
    cfg = load_config(env={"POLARKV_QUOTAS_TENANTS": '{"acme-salt": {"dram": "1GiB"}}'})
    assert cfg.quotas.tenants == {"acme-salt": {"dram": 1 << 30}}


def test_a_lowered_quota_trims_the_tenant_over_its_next_reserves(daemon_factory) -> None:
    d = daemon_factory({"dram.capacity": "8MiB", "disk.enabled": "false"})
    with d.engine(A_NS, "a") as a, d.engine(B_NS, "b") as b, d.control() as ctl:
        b_chains = [store_chain(b, chain_tokens(1000 + c, 4)) for c in range(8)]
        for c in range(32):  # 128 pages, 4 MiB
            store_chain(a, chain_tokens(c, 4))
        ctl.set_knobs({"quotas.tenants": json.dumps({"salt-of-a": {"name": "acme", "dram": "1MiB"}})})
        store_chain(a, chain_tokens(100, 1))  # 64 of its pages go for this one: it does not grow
        assert _tenant(d.stats(), "acme")["dram_bytes"] == (128 - 64 + 1) * PAGE
        store_chain(a, chain_tokens(101, 1))  # the rest of the way
        acme = _tenant(d.stats(), "acme")
        assert acme["dram_bytes"] <= 1 << 20 and acme["evicted_pages_dram"] == 128 + 2 - 32
        assert _tiers(b, b_chains) == [int(Tier.DRAM)] * 32
