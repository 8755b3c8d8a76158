"""Several daemons as separate processes on loopback, forming one cluster.

What a user of three hosts would notice: the members see each other; a prefix stored through one
daemon is a hit through another, with the same bytes; a daemon whose DRAM is full demotes pages to
a peer's lent DRAM and gets them back on a hit; a member killed with SIGKILL is declared dead and the
others keep serving (misses, not errors); a process without the cluster key is kept out.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from polarkvd.cluster.auth import generate, write_key_file
from polarkvd.seed import load_seed_file
from polarkvd.types import Tier
from tests.conftest import TEST_NS, bad_pages, chain_tokens, store_chain, wait_for

pytestmark = pytest.mark.cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    write_key_file(path, generate())
    return path


class Cluster:
    def __init__(self, factory, key_file: Path) -> None:
        self.factory = factory
        self.key_file = key_file
        self.seed = ""
        self.daemons: dict[str, object] = {}

    @classmethod
    def keyed(cls, factory, tmp_path: Path) -> Cluster:
        """A cluster of `factory`'s daemons sharing a fresh key in `tmp_path`."""
        path = tmp_path / "cluster.key"
        write_key_file(path, generate())
        return cls(factory, path)

    def add(self, name: str, key_file: Path | None = None, **sets: str):
        gossip = _free_port()
        cfg = {
            "cluster.enabled": "true",
            "cluster.node_id": name,
            "cluster.key_file": str(key_file or self.key_file),
            "cluster.gossip_address": f"127.0.0.1:{gossip}",
            "cluster.data_address": "127.0.0.1:0",
            "cluster.seeds": self.seed or f"127.0.0.1:{gossip}",
            "cluster.probe_interval": "200ms",
            "cluster.probe_timeout": "100ms",
            "cluster.lookup_timeout": "1s",
        }
        cfg.update({k.replace("__", "."): v for k, v in sets.items()})
        d = self.factory(cfg, name=name)
        self.seed = self.seed or f"127.0.0.1:{gossip}"
        self.daemons[name] = d
        return d

    def view(self, name: str) -> dict[str, str]:
        with self.daemons[name].control() as c:
            rep = c.cluster()
        return {m["node"]: m["state"] for m in rep["members"]}

    def wait_converged(self, names: list[str], timeout: float = 20.0) -> None:
        def ok() -> bool:
            for n in names:
                v = self.view(n)
                if any(v.get(o) != "alive" for o in names):
                    return False
            return True

        wait_for(ok, timeout, f"members {names} to see each other alive")


@pytest.fixture
def cluster(daemon_factory, key_file) -> Cluster:
    return Cluster(daemon_factory, key_file)


def test_three_daemons_share_a_prefix_with_identical_bytes(cluster: Cluster) -> None:
    a, b, c = (cluster.add(n) for n in "abc")
    cluster.wait_converged(["a", "b", "c"])
    out = subprocess.run(
        [sys.executable, "-m", "polarkvd", "status", "--cluster", "--socket", str(b.control_socket)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "3 of 3 known members alive" in out.stdout
    for name in "abc":
        assert name in out.stdout

    with a.engine() as kv:
        keys = store_chain(kv, chain_tokens(1, 12))
    with c.engine() as kv:
        # the meta map learns of A's pages within a few flush intervals
        wait_for(lambda: kv.lookup(keys).hits == len(keys), 10, "C to find A's prefix")
        assert set(kv.lookup(keys).tiers) == {Tier.DMP}
        res = kv.load(keys)
        assert res.loaded == len(keys)
        assert set(res.tiers) == {Tier.DMP}
        assert bad_pages(kv, keys, res.views) == []
        kv.release(res.lease)
        # now a local hit on C
        assert set(kv.lookup(keys).tiers) == {Tier.DRAM}
    st = c.stats()["counters"]
    assert st["fetched_pages_remote"] == len(keys)
    assert a.stats()["counters"]["cluster_served_pages"] >= len(keys)
    out = subprocess.run(
        [sys.executable, "-m", "polarkvd", "status", "--cluster", "--socket", str(c.control_socket)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    # what C fetched, and over what: no RDMA device here, so TCP, and the reason
    assert f"tcp {len(keys)} pages" in out.stdout and "rdma: off: " in out.stdout
    assert "GPUDirect" not in out.stdout  # no L1 pool: nothing to say about it


def test_a_partial_local_prefix_continues_on_a_peer(cluster: Cluster) -> None:
    a, b = cluster.add("a"), cluster.add("b")
    cluster.wait_converged(["a", "b"])
    tokens = chain_tokens(2, 10)
    with a.engine() as kv:
        keys = store_chain(kv, tokens)
    with b.engine() as kv:
        store_chain(kv, tokens[: 4 * TEST_NS.page_tokens])  # B has the first 4 pages itself
        wait_for(lambda: kv.lookup(keys).hits == 10, 10, "B to see the rest on A")
        tiers = kv.lookup(keys).tiers
        assert tiers[:4] == [Tier.DRAM] * 4 and tiers[4:] == [Tier.DMP] * 6
        res = kv.load(keys)
        assert res.loaded == 10 and bad_pages(kv, keys, res.views) == []
        kv.release(res.lease)


def test_full_dram_demotes_to_a_peers_pool_and_promotes_back(cluster: Cluster) -> None:
    # A: 2 MiB of DRAM (64 pages of 32 KiB) and no disk: evicted pages can only go to the pool.
    a = cluster.add("a", dram__capacity="2MiB", disk__enabled="false")
    b = cluster.add("b", cluster__dmp_bytes="16MiB")
    cluster.wait_converged(["a", "b"])
    wait_for(lambda: _dmp_meta(cluster, "a", "b"), 15, "A to learn B's pool size")
    with a.engine() as kv:
        keys = store_chain(kv, chain_tokens(3, 40))
        keys += store_chain(kv, chain_tokens(4, 40))  # 80 pages > 64: the oldest leave A's DRAM
        wait_for(lambda: a.stats()["counters"].get("demoted_pages_dmp", 0) >= 16, 10, "demotions to B")
        st = b.stats()
        assert st["tiers"]["dmp"]["pages"] >= 16
        first = keys[:40]
        wait_for(lambda: kv.lookup(first).hits == 40, 10, "A to find its demoted pages on B")
        res = kv.load(first)
        assert res.loaded == 40
        assert Tier.DMP in res.tiers
        assert bad_pages(kv, first, res.views) == []
        kv.release(res.lease)


def _dmp_meta(cluster: Cluster, viewer: str, lender: str) -> bool:
    with cluster.daemons[viewer].control() as c:
        rep = c.cluster()
    for m in rep["members"]:
        if m["node"] == lender:
            dmp = m["meta"].get("dmp")
            return isinstance(dmp, list) and dmp[1] > 0
    return False


def test_killed_member_is_declared_dead_and_the_rest_keep_serving(cluster: Cluster) -> None:
    a, b, c = (cluster.add(n) for n in "abc")
    cluster.wait_converged(["a", "b", "c"])
    with a.engine() as kv:
        on_a = store_chain(kv, chain_tokens(5, 6))
    with b.engine() as kv:
        on_b = store_chain(kv, chain_tokens(6, 6))
    with c.engine() as kv:
        wait_for(lambda: kv.lookup(on_a).hits == 6 and kv.lookup(on_b).hits == 6, 10, "C to see both")
    a.kill()
    wait_for(
        lambda: cluster.view("c").get("a") == "dead" and cluster.view("b").get("a") == "dead", 15, "a dead"
    )
    with c.engine() as kv:
        assert kv.lookup(on_a).hits == 0  # a miss, not an error
        res = kv.load(on_a)
        assert res.loaded == 0
        res = kv.load(on_b)  # B still serves
        assert res.loaded == 6 and bad_pages(kv, on_b, res.views) == []
        kv.release(res.lease)


def test_a_daemon_without_the_cluster_key_cannot_join_or_read(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.add("a")
    with a.engine() as kv:
        keys = store_chain(kv, chain_tokens(7, 4))
    other_key = tmp_path / "other.key"
    write_key_file(other_key, generate())
    x = cluster.add("x", key_file=other_key)
    # x keeps trying through the seed; a never admits it and x never sees a
    with x.engine() as kv:
        for _ in range(20):
            assert kv.lookup(keys).hits == 0
    assert "x" not in cluster.view("a")
    assert cluster.view("x") == {"x": "alive"}

    # a raw page request with a wrong key is refused at the handshake
    from polarkvd.errors import TransportError
    from polarkvd.transport.peer_client import PeerClient
    from polarkvd.transport.peer_wire import data_key

    with a.control() as c:
        data = c.cluster()["data_address"]
    client = PeerClient(key=data_key(generate().secret), timeout=2)
    try:
        with pytest.raises(TransportError):
            client.call(data, "get", {"ns": b"x" * 16, "keys": keys})
    finally:
        client.close()
    # ... and without any key too
    client = PeerClient(key=None, timeout=2)
    try:
        with pytest.raises(TransportError):
            client.call(data, "get", {"ns": b"x" * 16, "keys": keys})
    finally:
        client.close()


def _refused(d, node: str) -> str:
    with d.control() as c:
        return c.cluster().get("refused", {}).get(node, "")


def test_members_with_another_page_key_seed_refuse_each_other(cluster: Cluster, tmp_path: Path) -> None:
    """Insecure members share a seed only through the same seed file: one with its own seed would
    compute other keys for every prefix, so it is kept out, with the reason logged on both sides."""
    shared = tmp_path / "shared-page-seed"
    load_seed_file(shared)
    insecure = {"cluster__key_file": "", "cluster__insecure": "true"}
    a = cluster.add("a", daemon__seed_file=str(shared), **insecure)
    b = cluster.add("b", daemon__seed_file=str(shared), **insecure)
    cluster.wait_converged(["a", "b"])
    with a.engine() as kv:
        keys = store_chain(kv, chain_tokens(9, 4))
    with b.engine() as kv:  # the same seed: the same keys, found through the cluster
        assert kv.page_keys(chain_tokens(9, 4)) == keys
        wait_for(lambda: kv.lookup(keys).hits == 4, 10, "B to find A's prefix")

    x = cluster.add("x", **insecure)  # its own seed file, created in its state directory
    wait_for(lambda: _refused(a, "x") and _refused(x, "a"), 15, "a and x to refuse each other")
    assert "page-key seed" in _refused(a, "x") and "page-key seed" in _refused(x, "a")
    assert "x" not in cluster.view("a") and "x" not in cluster.view("b")
    assert cluster.view("x") == {"x": "alive"}
    for d, other in ((a, "x"), (x, "a")):
        lines = [line for line in d.log().splitlines() if f"refusing member '{other}'" in line]
        assert len(lines) == 1 and "error" in lines[0].lower(), lines  # logged once, not per packet
    with x.engine() as kv:
        assert kv.lookup(kv.page_keys(chain_tokens(9, 4))).hits == 0
    out = subprocess.run(
        [sys.executable, "-m", "polarkvd", "status", "--cluster", "--socket", str(x.control_socket)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "REFUSED 'a'" in out.stdout

    # b comes back with a seed of its own (its seed file replaced): a keeps it out from then on
    b.stop()
    b.sets["daemon.seed_file"] = str(b.root / "state" / "page-seed")
    b.start()
    wait_for(lambda: _refused(a, "b") and _refused(b, "a"), 15, "a and b to refuse each other")
    assert cluster.view("a").get("b") != "alive" and cluster.view("b") == {"b": "alive"}
    with b.engine() as kv:
        assert kv.lookup(keys).hits == 0 and kv.lookup(kv.page_keys(chain_tokens(9, 4))).hits == 0


def test_bytes_are_verified_end_to_end_after_a_restart_of_the_holder(cluster: Cluster) -> None:
    """A stale record after the holder restarted empty is a miss, never wrong bytes."""
    a, b = cluster.add("a", disk__enabled="false"), cluster.add("b")
    cluster.wait_converged(["a", "b"])
    with a.engine() as kv:
        keys = store_chain(kv, chain_tokens(8, 5))
    with b.engine() as kv:
        wait_for(lambda: kv.lookup(keys).hits == 5, 10, "B to see A's pages")
    a.stop()
    a.start()
    cluster.wait_converged(["a", "b"])
    with b.engine() as kv:
        res = kv.load(keys)
        assert res.loaded == 0 or bad_pages(kv, keys[: res.loaded], res.views) == []
        if res.lease is not None:
            kv.release(res.lease)


def test_pipelined_load_from_a_peer_and_from_disk(cluster: Cluster) -> None:
    """The engine gets offsets at once and reads layer by layer as they arrive; bytes are exact."""
    a, b = cluster.add("a"), cluster.add("b")
    cluster.wait_converged(["a", "b"])
    with a.engine() as kv:
        remote = store_chain(kv, chain_tokens(21, 8))
    with b.engine() as kv:
        on_disk = store_chain(kv, chain_tokens(22, 8))
        with b.control() as c:
            c.evict("dram", 1 << 30)  # B's own pages go to its disk
        wait_for(lambda: kv.lookup(remote).hits == 8, 10, "B to find A's pages")
        for keys, tier in ((remote, Tier.DMP), (on_disk, Tier.DISK)):
            res = kv.load(keys, pipelined=True)
            assert res.loaded == 8 and set(res.tiers) == {tier}
            for layer in range(TEST_NS.num_layers):
                assert res.wait_layers(layer + 1, timeout=30) == 8  # every page usable
            assert res.ready() == (TEST_NS.num_layers, 8)
            assert bad_pages(kv, keys, res.views) == []
            kv.release(res.lease)
            assert set(kv.lookup(keys).tiers) == {Tier.DRAM}  # local now
        # pages already in DRAM: a pipelined load is complete at once
        res = kv.load(remote, pipelined=True)
        assert res.signal is None and res.ready() == (TEST_NS.num_layers, 8)
        kv.release(res.lease)
    assert b.stats()["counters"]["pipelined_loads"] == 2


def test_a_peer_serves_a_prefix_from_its_disk(cluster: Cluster) -> None:
    """A page that left A's DRAM for A's disk is still a hit for B: A announces its disk copies,
    promotes them when B asks, and sends them; once A's disk drops them, B stops finding them."""
    a, b = cluster.add("a"), cluster.add("b")
    cluster.wait_converged(["a", "b"])
    chains = []
    with a.engine() as kv, a.control() as ctl:
        for seed in (31, 32, 33):
            chains.append(store_chain(kv, chain_tokens(seed, 6)))
            ctl.evict_keys([chains[-1][0]])  # to A's disk, out of A's DRAM
        wait_for(lambda: a.stats()["tiers"]["disk"]["pending_pages"] == 0, 15, "A's disk writes")
        for keys in chains:
            assert kv.lookup(keys).tiers == [Tier.DISK] * 6
    with b.engine() as kv:
        for keys in chains:
            wait_for(lambda k=keys: kv.lookup(k).hits == 6, 10, "B to find A's disk pages")
            assert set(kv.lookup(keys).tiers) == {Tier.DMP}
        whole = kv.load(chains[0])
        assert whole.loaded == 6 and bad_pages(kv, chains[0], whole.views) == []
        kv.release(whole.lease)
        layered = kv.load(chains[1], pipelined=True)
        assert layered.loaded == 6
        assert layered.wait_layers(TEST_NS.num_layers, timeout=30) == 6
        assert bad_pages(kv, chains[1], layered.views) == []
        kv.release(layered.lease)
        assert a.stats()["counters"]["promoted_pages_for_peers"] == 12
        with a.control() as ctl:
            ctl.evict("disk", 1 << 40)  # A drops its disk tier: the third chain is nowhere now
        wait_for(lambda: kv.lookup(chains[2]).hits == 0, 10, "B to learn the pages are gone")
        assert kv.lookup(chains[0]).tiers == [Tier.DRAM] * 6  # loaded: local on B now


def test_a_page_stored_again_with_other_bytes_is_sent_with_its_own_checksums(cluster: Cluster) -> None:
    """The holder keeps the checksums of layer slices it sent (pipelined fetches ask for the same
    slices again), per stored page: when a key is stored again with other bytes (another engine's
    float rounding), peers get the new bytes, verified, not a mismatch against the old sums."""
    a = cluster.add("a", disk__enabled="false")
    b = cluster.add("b", disk__enabled="false")
    cluster.wait_converged(["a", "b"])
    tokens = chain_tokens(51, 4)
    with a.engine() as kv:
        keys = kv.page_keys(tokens)
        first = [np.full(kv.page_bytes, i + 1, np.uint8) for i in range(4)]
        kv.store(keys, first)
    for version, pages in (
        (1, first),
        (2, [np.full(TEST_NS.page_bytes, 200 - i, np.uint8) for i in range(4)]),
    ):
        if version == 2:
            with a.engine() as kv, a.control() as ctl:
                ctl.evict("dram", 1 << 40)  # gone from A (no disk) ...
                kv.store(keys, pages)  # ... and stored again, other bytes
        with b.engine() as kv, b.control() as ctl:
            wait_for(lambda: kv.lookup(keys).tiers == [Tier.DMP] * 4, 10, "B to find A's pages")
            for _ in range(2):  # twice: the second time A sends with the sums it kept
                res = kv.load(keys, pipelined=True)
                assert res.wait_layers(TEST_NS.num_layers, timeout=30) == 4
                assert [bytes(v) for v in res.views] == [p.tobytes() for p in pages]
                kv.release(res.lease)
                ctl.evict("dram", 1 << 40)  # B drops its copy: the next load fetches again
    assert b.stats()["counters"].get("cluster_corrupt_pages", 0) == 0


def test_disk_pages_found_at_start_are_offered_once_their_namespace_is_known(cluster: Cluster) -> None:
    """After a restart the holder's disk still has the pages, but it can promote them for a peer only
    once it knows their namespace (an engine attached): offered then, not before."""
    a, b = cluster.add("a"), cluster.add("b")
    cluster.wait_converged(["a", "b"])
    with a.engine() as kv:
        keys = store_chain(kv, chain_tokens(61, 5))
    a.stop()  # saves its DRAM pages to its disk tier
    a.start()
    cluster.wait_converged(["a", "b"])
    with b.engine() as kv:
        assert kv.lookup(keys).hits == 0  # A knows no namespace yet: nothing offered
        with a.engine(engine_id="comes-back"):
            wait_for(lambda: kv.lookup(keys).hits == 5, 10, "B to find A's disk pages")
            res = kv.load(keys)
            assert res.loaded == 5 and bad_pages(kv, keys, res.views) == []
            kv.release(res.lease)
