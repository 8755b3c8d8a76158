"""The Prometheus endpoint of a real daemon: every documented series is there, and after real traffic
its values are the ones `polarkvd status` (ControlClient.stats) shows."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

from polarkvd.metrics import BUCKETS_NS, LatencyHistogram, Snapshot, families
from tests.conftest import REPO_ROOT, chain_tokens, clean_env, store_chain, wait_for

METRICS_DOC = REPO_ROOT / "docs" / "METRICS.md"


def metrics_url(d: Any) -> str:
    m = re.search(r"metrics_url=(\S+)", d.log())
    assert m is not None, d.log()
    return m.group(1)


def scrape(url: str) -> tuple[dict[str, Any], dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """(families by name, {(sample name, sorted labels): value})."""
    with urlopen(url, timeout=30) as r:
        assert r.status == 200
        text = r.read().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    return fams, samples


def documented() -> dict[str, str]:
    """Series named in docs/METRICS.md's tables: name -> type."""
    out = {}
    for line in METRICS_DOC.read_text().splitlines():
        m = re.match(r"^\| `(polarkv_\w+)` \| (counter|gauge|histogram|info) \|", line)
        if m:
            out[m.group(1)] = m.group(2)
    assert len(out) > 20, "docs/METRICS.md lost its series tables"
    return out


def _family_name(series: str, kind: str) -> str:
    # the text format's parser names a counter family without _total
    return series.removesuffix("_total") if kind == "counter" else series


def _wire_type(kind: str) -> str:
    # the Prometheus text format has no info type: an info metric is a gauge with value 1
    return "gauge" if kind == "info" else kind


def test_metrics_after_traffic_match_status(daemon_factory) -> None:
    # 2 slabs of 1 MiB = 64 pages of 32 KiB: 90 stored pages overflow DRAM and are demoted to disk
    d = daemon_factory({"metrics.address": "127.0.0.1:0", "dram.capacity": "2MiB"})
    url = metrics_url(d)
    with d.engine(engine_id="metrics") as kv, d.control() as c:
        chains = [store_chain(kv, chain_tokens(i, 30)) for i in range(3)]
        assert kv.lookup(chains[2]).hits == 30
        assert kv.lookup(kv.page_keys(chain_tokens(77, 3))).hits == 0
        wait_for(lambda: c.stats()["tiers"]["disk"]["pending_pages"] == 0, what="demotions to finish")
        r = kv.load(chains[0][:10])  # the oldest chain: on disk by now, promoted back
        assert r.loaded == 10
        del r.views
        kv.release(r.lease)
        assert c.evict("dram", 200_000) > 0  # operator eviction: another reason label
        wait_for(lambda: c.stats()["tiers"]["disk"]["pending_pages"] == 0, what="demotions to finish")
        pinned = kv.lookup(chains[2][:5], pin=True)  # a lease held open during the scrape
        assert pinned.lease is not None

        before = c.stats()
        fams, samples = scrape(url)
        after = c.stats()
        for s in (before, after):
            s.pop("uptime_s")
        assert before == after  # nothing moved while scraping: the two views must agree exactly
        st = after
        cnt = st["counters"]

        def v(name: str, **labels: str) -> float:
            return samples[(name, tuple(sorted(labels.items())))]

        # every documented series is served, with its type; every served polarkv_ family is documented
        docs = documented()
        for series, kind in docs.items():
            if series.startswith("polarkv_cluster_"):
                continue  # served only by cluster members (tests/cluster/test_cluster_ops.py)
            fam = fams.get(_family_name(series, kind))
            assert fam is not None, f"{series} is documented but not served"
            assert fam.type == _wire_type(kind), (series, fam.type)
        served = {name for name in fams if name.startswith("polarkv_")}
        assert served <= {_family_name(s, k) for s, k in docs.items()}, served

        for tier, t in st["tiers"].items():
            assert v("polarkv_tier_pages", tier=tier) == t["pages"]
            assert v("polarkv_tier_bytes", tier=tier) == t["bytes"]
            assert v("polarkv_tier_capacity_bytes", tier=tier) == t["capacity_bytes"]
        assert st["tiers"]["disk"]["pages"] > 0 and cnt["promoted_pages"] > 0  # both paths were taken
        assert v("polarkv_dram_pinned_pages") == st["tiers"]["dram"]["pinned_pages"] == 5
        assert v("polarkv_dram_reserved_pages") == st["tiers"]["dram"]["reserved_pages"]
        assert v("polarkv_dram_slot_bytes_used") == st["tiers"]["dram"]["slot_bytes_used"]
        assert v("polarkv_disk_raw_bytes") == st["tiers"]["disk"]["raw_bytes"]
        assert v("polarkv_disk_pending_pages") == 0

        assert v("polarkv_lookups_total") == cnt["lookups"] == 3
        assert v("polarkv_lookup_pages_total") == cnt["lookup_pages"]
        assert v("polarkv_hit_pages_total", tier="dram") == cnt["hit_pages_dram"]
        assert v("polarkv_hit_pages_total", tier="disk") == cnt.get("hit_pages_disk", 0)
        assert v("polarkv_miss_pages_total") == cnt["miss_pages"]
        assert v("polarkv_loads_total") == cnt["loads"] == 1
        assert v("polarkv_loaded_pages_total", tier="disk") == cnt["loaded_pages_disk"]
        assert v("polarkv_loaded_pages_total", tier="dram") == cnt["loaded_pages"] - cnt["loaded_pages_disk"]

        assert v("polarkv_transfer_bytes_total", path="engine_to_dram") == cnt["stored_bytes"]
        assert v("polarkv_transfer_bytes_total", path="dram_to_engine") == cnt["loaded_bytes"]
        assert v("polarkv_transfer_pages_total", path="engine_to_dram") == cnt["stored_pages"] == 90
        assert v("polarkv_transfer_pages_total", path="dram_to_engine") == cnt["loaded_pages"]
        assert v("polarkv_transfer_pages_total", path="disk_to_dram") == cnt["promoted_pages"]
        assert v("polarkv_transfer_pages_total", path="dram_to_disk") == cnt["demoted_pages"] + cnt.get(
            "written_through_pages", 0
        )
        for path, key in (("disk_to_dram", "promoted_bytes"), ("dram_to_disk", "demoted_bytes")):
            if key in cnt:  # byte counts of these paths come with the manager's counters
                assert v("polarkv_transfer_bytes_total", path=path) >= cnt[key]

        evicted = {
            k.removeprefix("evicted_pages_dram_"): n
            for k, n in cnt.items()
            if k.startswith("evicted_pages_dram_")
        }
        assert set(evicted) >= {"capacity", "operator"}
        for reason, n in evicted.items():
            assert v("polarkv_evicted_pages_total", tier="dram", reason=reason) == n
        assert v("polarkv_evicted_pages_total", tier="disk", reason="any") == st["tiers"]["disk"]["evictions"]
        assert v("polarkv_evicted_bytes_total", tier="dram") == cnt["evicted_bytes_dram"]
        assert v("polarkv_sessions") == len(st["sessions"]) == 1
        assert v("polarkv_leases") == st["leases"] == 1
        assert v("polarkv_sessions_attached_total") == cnt["sessions_attached"]

        # histograms: one observation per successful request of each op
        # lookups the client answered from the shared table never reach the daemon: not timed there
        assert cnt.get("table_lookups", 0) > 0
        assert v("polarkv_table_lookups_total") == cnt["table_lookups"]
        assert (
            v("polarkv_engine_op_duration_seconds_count", op="lookup")
            == cnt["lookups"] - cnt["table_lookups"]
        )
        assert v("polarkv_engine_op_duration_seconds_count", op="load") == cnt["loads"]
        assert v("polarkv_engine_op_duration_seconds_count", op="reserve") == 3  # one per store call
        assert v("polarkv_engine_op_duration_seconds_count", op="commit") == 3
        assert (
            v("polarkv_engine_op_duration_seconds_bucket", op="lookup", le="+Inf")
            == cnt["lookups"] - cnt["table_lookups"]
        )
        assert 0 < v("polarkv_engine_op_duration_seconds_sum", op="load") < 60

        assert v("polarkv_ready") == 1 and v("polarkv_draining") == 0
        assert v("polarkv_build_info", version=__import__("polarkvd").__version__) == 1
        assert ("process_resident_memory_bytes", ()) in samples  # the standard process collector
        kv.release(pinned.lease)


def test_scrapes_during_traffic_are_consistent(daemon_factory) -> None:
    """The endpoint's threads read the manager through the event loop: scraping while engines store
    and look up neither fails nor sees a half-done state (stored pages never run backwards)."""
    d = daemon_factory({"metrics.address": "127.0.0.1:0"})
    url = metrics_url(d)
    stop = threading.Event()
    errors: list[BaseException] = []

    def traffic() -> None:
        try:
            with d.engine(engine_id="busy") as kv:
                i = 0
                while not stop.is_set():
                    keys = store_chain(kv, chain_tokens(1000 + i, 4))
                    kv.lookup(keys)
                    i += 1
        except BaseException as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        seen = []
        for _ in range(15):
            _, samples = scrape(url)
            seen.append(samples[("polarkv_transfer_pages_total", (("path", "engine_to_dram"),))])
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    assert seen == sorted(seen) and seen[-1] > 0


def test_port_in_use_stops_the_start_with_exit_78_naming_the_option(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        r = subprocess.run(
            [sys.executable, "-m", "polarkvd", "serve",
             "--set", f"daemon.runtime_dir={tmp_path / 'run'}", "--set", f"daemon.state_dir={tmp_path / 'state'}",
             "--set", "dram.capacity=8MiB", "--set", "dram.slab_bytes=1MiB", "--set", "disk.capacity=64MiB",
             "--set", f"metrics.address=127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60, env=clean_env(), cwd=REPO_ROOT,
        )  # fmt: skip
    finally:
        holder.close()
    assert r.returncode == 78, r.stderr
    assert f"metrics.address = '127.0.0.1:{port}': cannot listen: address already in use" in r.stderr
    assert not (tmp_path / "run" / "engine.sock").exists()


def test_metrics_off(daemon_factory) -> None:
    for i, sets in enumerate(({"metrics.address": "off"}, {"metrics.enabled": "false"})):
        d = daemon_factory(sets, name=f"off{i}")
        assert "metrics disabled" in d.log()
        assert "metrics_url=" not in d.log()


@pytest.mark.parametrize("bad", ["9808", "localhost", "127.0.0.1:99999", "[::1]", ":9808"])
def test_bad_metrics_address_is_a_config_error(bad: str) -> None:
    from polarkvd.config import load_config
    from polarkvd.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(overrides={"metrics.address": bad}, env={})
    assert info.value.problems[0][0] == "metrics.address"


def test_histogram_buckets_follow_prometheus_le_semantics() -> None:
    h = LatencyHistogram()
    for ns in (1, BUCKETS_NS[0], BUCKETS_NS[0] + 1, BUCKETS_NS[-1], BUCKETS_NS[-1] + 1):
        h.observe_ns(ns)
    counts, total = h.snapshot()
    assert counts[0] == 2 and counts[1] == 1 and counts[-2] == 1 and counts[-1] == 1
    assert total == 1 + BUCKETS_NS[0] * 2 + 1 + BUCKETS_NS[-1] * 2 + 1
    fam = next(f for f in families(Snapshot(stats=None, timings={"lookup": h.snapshot()}, ready=False))
               if f.name == "polarkv_engine_op_duration_seconds")  # fmt: skip
    buckets = [s for s in fam.samples if s.name.endswith("_bucket")]
    assert buckets[0].labels["le"] == "5e-06" and buckets[0].value == 2  # cumulative, <= le
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 5


def test_endpoint_survives_bad_requests(daemon_factory) -> None:
    d = daemon_factory({"metrics.address": "127.0.0.1:0"})
    url = metrics_url(d)
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    for junk in (b"\x00\xff garbage\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b""):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            s.recv(65536)
    try:
        urlopen(url.replace("/metrics", "/nothing-here"), timeout=10)
    except HTTPError:
        pass
    scrape(url)  # still serving
    assert d.proc.poll() is None
