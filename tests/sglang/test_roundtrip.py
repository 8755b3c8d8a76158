"""Pages written back by one "SGLang process" come back byte-identical through another, through
SGLang's own HiCacheController (backup thread, prefetch hit query, prefetch transfer): one daemon,
every supported layout, both of SGLang's storage interfaces, MLA (one rank writes, others read), and
a daemon on another member of a cluster."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from polarkvd.cluster.auth import generate, write_key_file
from tests.conftest import wait_for
from tests.sglang.conftest import Rig, unique

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(600)]

PAGE = 16


@pytest.mark.parametrize("layout", ["page_first", "layer_first", "page_first_direct"])
def test_pages_come_back_byte_identical_in_another_process(
    daemon_factory, a: Rig, b: Rig, layout: str
) -> None:
    d = daemon_factory()
    w, r = unique("w"), unique("r")
    a.stack(w, d.engine_socket, layout=layout)
    b.stack(r, d.engine_socket, layout=layout)

    stored = a.send("write", name=w, seed=11, pages=10)
    assert stored["stored_tokens"] == 10 * PAGE

    got = b.send("read", name=r, seed=11, pages=10)
    assert got["hit_tokens"] == 10 * PAGE and got["loaded_tokens"] == 10 * PAGE
    assert got["match"], "the pages read differ from the pages written"
    # A longer prompt with the same beginning: the stored prefix hits, the rest does not.
    longer = b.send("read", name=r, seed=11, pages=14)
    assert longer["hit_tokens"] == 10 * PAGE and longer["match"]
    assert b.send("read", name=r, seed=12, pages=4)["hit_tokens"] == 0

    stats = b.send("stats", name=r)
    assert stats["get_hits"] >= 20 and stats["errors"] == 0
    metrics = b.send("metrics", name=r)  # what SGLang's storage metrics collector reads
    assert metrics["type"] == "StorageMetrics" and metrics["prefetch_pgs"] == [10, 10]
    assert metrics["polarkv"]["get_hits"] == 20 and metrics["polarkv"]["exists_misses"] >= 4
    assert a.send("metrics", name=w)["backup_pgs"] == [10]
    with d.control() as c:
        sessions = c.stats()
    assert "sglang-" in str(sessions), "polarkvd status should list SGLang's sessions"
    a.send("close", name=w)
    b.send("close", name=r)


def test_generic_and_zero_copy_interfaces_store_the_same_bytes(daemon_factory, a: Rig, b: Rig) -> None:
    """A process without `interface_v1` (SGLang's generic batch_set/batch_get of flat page tensors)
    and one with it share pages both ways, in both layouts that reorder buffers differently."""
    d = daemon_factory()
    for layout in ("page_first", "layer_first"):
        generic, v1 = unique("g"), unique("v")
        a.stack(generic, d.engine_socket, layout=layout, interface_v1=0)
        b.stack(v1, d.engine_socket, layout=layout)
        seed = 21 if layout == "page_first" else 22
        assert a.send("write", name=generic, seed=seed, pages=6)["stored_tokens"] == 6 * PAGE
        got = b.send("read", name=v1, seed=seed, pages=6)
        assert got["loaded_tokens"] == 6 * PAGE and got["match"]
        assert b.send("write", name=v1, seed=seed + 100, pages=5)["stored_tokens"] == 5 * PAGE
        back = a.send("read", name=generic, seed=seed + 100, pages=5)
        assert back["loaded_tokens"] == 5 * PAGE and back["match"]
        # The generic calls straight, as SGLang's controller makes them.
        assert a.send("raw", name=generic, fn="batch_get", seed=seed, pages=6)["match"]
        a.send("close", name=generic)
        b.send("close", name=v1)


def test_mla_one_rank_writes_every_rank_reads(daemon_factory, a: Rig, b: Rig) -> None:
    """MLA KV is the same on every TP rank: SGLang lets one rank write (`is_storage_writer`), and a
    page it stored is read by the other ranks; a non-writer's write stores nothing."""
    d = daemon_factory()
    w, r = unique("mla0"), unique("mla1")
    a.stack(w, d.engine_socket, mla=True, tp_rank=0, tp_size=2)
    b.stack(r, d.engine_socket, mla=True, tp_rank=1, tp_size=2)
    assert a.send("write", name=w, seed=31, pages=6)["stored_tokens"] == 6 * PAGE
    got = b.send("read", name=r, seed=31, pages=6)
    assert got["loaded_tokens"] == 6 * PAGE and got["match"]
    # rank 1 is not a writer: SGLang skips its backups; the backend's own calls store nothing either
    res = b.send("raw", name=r, fn="batch_set_v1", seed=32, pages=3)
    assert res["result"] == [True, True, True]
    assert a.send("raw", name=w, fn="batch_exists", seed=32, pages=3)["result"] == 0
    assert b.send("stats", name=r)["set_skipped"] == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.cluster
def test_pages_written_on_one_host_are_prefetched_on_another(
    daemon_factory, tmp_path: Path, a: Rig, b: Rig
) -> None:
    """Process A writes through daemon "a"; process B, attached to daemon "b" of the same cluster,
    finds the pages with batch_exists (they are on a peer) and prefetches them over the network."""
    key = tmp_path / "cluster.key"
    write_key_file(key, generate())
    seed_port = _free_port()
    common = {
        "cluster.enabled": "true",
        "cluster.key_file": str(key),
        "cluster.data_address": "127.0.0.1:0",
        "cluster.seeds": f"127.0.0.1:{seed_port}",
        "cluster.probe_interval": "200ms",
        "cluster.probe_timeout": "100ms",
        "cluster.lookup_timeout": "1s",
    }
    da = daemon_factory(
        {**common, "cluster.node_id": "a", "cluster.gossip_address": f"127.0.0.1:{seed_port}"}, name="a"
    )
    db = daemon_factory(
        {**common, "cluster.node_id": "b", "cluster.gossip_address": f"127.0.0.1:{_free_port()}"}, name="b"
    )
    wait_for(lambda: db.control().cluster()["alive"] == 2, 30, "the daemons to see each other")
    w, r = unique("ca"), unique("cb")
    a.stack(w, da.engine_socket)
    b.stack(r, db.engine_socket)
    assert a.send("write", name=w, seed=41, pages=8)["stored_tokens"] == 8 * PAGE

    # The meta map learns where the pages are shortly after they are stored.
    wait_for(
        lambda: b.send("raw", name=r, fn="batch_exists", seed=41, pages=8)["result"] == 8,
        20,
        "the peer's pages",
    )
    got = b.send("read", name=r, seed=41, pages=8)
    assert got["hit_tokens"] == 8 * PAGE and got["loaded_tokens"] == 8 * PAGE and got["match"]
    fetched = {k: v for k, v in db.stats()["counters"].items() if "fetch" in k and v}
    assert fetched, "daemon b should have fetched the pages from its peer"
