"""Partitions that cut one direction only, and a link that flaps, between hosts in network namespaces.

What a user would notice: while h2 hears nothing from h1 (h1 still hears h2), loads across the cut
end in time with exact bytes or misses, h3 (which hears both) keeps serving both, and once the rule
goes the three see each other alive and find each other's pages again. A link taken down and up
every half second for a while leaves nobody dead once it stays up.

Runs as root only, with nftables; elsewhere the tests skip with the reason.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import bad_pages, chain_tokens, store_chain, wait_for
from tests.netns.conftest import NetnsCluster, _ip, nft_unavailable

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def _load_checked(kv, keys: list[bytes]) -> int:  # type: ignore[no-untyped-def]
    res = kv.load(keys)
    try:
        assert bad_pages(kv, keys[: res.loaded], res.views[: res.loaded]) == [], "wrong bytes"
        return res.loaded
    finally:
        del res.views
        if res.lease is not None:
            kv.release(res.lease)


def _deafen(c: NetnsCluster, host: str, to: str) -> None:
    """`host` drops every packet from `to` (one direction: `to` still hears `host`)."""
    rules = (
        "table inet pkvdeaf {\n"
        "  chain input {\n"
        "    type filter hook input priority 0;\n"
        f"    ip saddr {c.hosts[to].address} drop\n"
        "  }\n"
        "}\n"
    )
    _ip("netns", "exec", c.hosts[host].netns, "nft", "-f", "-", input=rules)


def _hear(c: NetnsCluster, host: str) -> None:
    _ip("netns", "exec", c.hosts[host].netns, "nft", "delete", "table", "inet", "pkvdeaf", check=False)


def test_one_way_partition_costs_hits_never_bytes_and_heals(netns_cluster) -> None:
    c: NetnsCluster = netns_cluster(3)
    reason = nft_unavailable(c.hosts["h1"].netns)
    if reason:
        pytest.skip(reason)
    c.start_all(cluster__fetch_timeout="1s")
    c.wait_converged()
    pages = {}
    for i, name in enumerate(("h1", "h2", "h3")):
        with c.daemon(name).engine() as kv:
            pages[name] = store_chain(kv, chain_tokens(900 + i, 8))
    _deafen(c, "h2", to="h1")
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for reader, holder in (("h2", "h1"), ("h1", "h2"), ("h3", "h1"), ("h3", "h2")):
                with c.daemon(reader).engine() as kv:
                    t0 = time.monotonic()
                    _load_checked(kv, pages[holder])
                    took = time.monotonic() - t0
                    assert took < 10, f"{reader} loading {holder}'s pages took {took:.1f}s"
                    with c.daemon(reader).control() as ctl:
                        ctl.evict("dram", 1 << 40)  # fetch again next round
        # h3 hears both: it keeps finding both sides' pages
        with c.daemon("h3").engine() as kv:
            for holder in ("h1", "h2"):
                wait_for(lambda h=holder: kv.lookup(pages[h]).hits == 8, 20, f"h3 to find {holder}'s pages")
                assert _load_checked(kv, pages[holder]) == 8
    finally:
        _hear(c, "h2")
    c.wait_converged(timeout=40)
    for reader, holder in (("h1", "h2"), ("h2", "h1"), ("h2", "h3")):
        with c.daemon(reader).engine() as kv:
            wait_for(lambda h=holder: kv.lookup(pages[h]).hits == 8, 30, f"{reader} to find {holder}'s pages")
            assert _load_checked(kv, pages[holder]) == 8


def test_a_flapping_link_leaves_nobody_dead_once_it_stays_up(netns_cluster) -> None:
    c: NetnsCluster = netns_cluster(3)
    c.start_all(cluster__fetch_timeout="1s")
    c.wait_converged()
    with c.daemon("h3").engine() as kv:
        keys = store_chain(kv, chain_tokens(950, 8))
    with c.daemon("h1").engine() as kv:
        for i in range(16):  # 8 s of a link that is up half the time
            c.link("h3", up=i % 2 == 1)
            _load_checked(kv, keys)
            time.sleep(0.5)
        c.link("h3", up=True)
        c.wait_converged(timeout=40)
        with c.daemon("h1").control() as ctl:
            ctl.evict("dram", 1 << 40)
        wait_for(lambda: kv.lookup(keys).hits == 8, 30, "h1 to find h3's pages after the flapping")
        assert _load_checked(kv, keys) == 8
