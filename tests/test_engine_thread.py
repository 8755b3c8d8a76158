"""Engine connections served by their own threads (polarkvd/server/engine_thread.py): lookups are
answered on the connection's thread while other engines store and evict through the event loop, and
nothing an engine or an operator sees changes: hits, bytes, LRU order, status totals, shutdown.

The lookup tests run twice: `socket` (the client asks the daemon, as a client without the shared
lookup table does) and `table` (the client probes polarkvd/wire/lookup_table.py itself; the daemon folds
its counts and touches) — the same observable results either way."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from polarkvd.client import EngineClient
from polarkvd.errors import DaemonUnavailable
from polarkvd.types import Tier
from polarkvd.wire import frames as P
from tests.conftest import (
    REPO_ROOT,
    TEST_NS,
    bad_pages,
    chain_tokens,
    clean_env,
    store_chain,
    wait_for,
)

CAP = "4MiB"  # 1 MiB slabs of 32 slots: exactly 128 pages of TEST_NS
LOOKUP_CHAINS = [(900 + i, 8) for i in range(6)]  # (seed, pages) stored before the lookup engines start
ABSENT = (999, 4)  # never stored


def lookup_worker_main() -> None:
    """Body of a lookup engine process: for `seconds`, look up the stored chains (and one that was
    never stored), load every fourth hit and compare its bytes; print one JSON line of totals."""
    spec = json.loads(sys.argv[1])
    kv = EngineClient(TEST_NS, spec["engine_id"], spec["socket"], timeout=60, lookup_table=spec["table"])
    chains = [kv.page_keys(chain_tokens(seed, pages)) for seed, pages in spec["chains"]]
    absent = kv.page_keys(chain_tokens(*spec["absent"]))
    t: dict[str, Any] = dict(lookups=0, lookup_pages=0, dram=0, disk=0, loads=0, problems=[])
    deadline = time.monotonic() + spec["seconds"]
    i = 0
    while time.monotonic() < deadline or i < 8:
        keys = chains[i % len(chains)]
        hit = kv.lookup(keys)
        tiers = hit.tiers
        t["lookups"] += 1
        t["lookup_pages"] += len(keys)
        t["dram"] += tiers.count(Tier.DRAM)
        t["disk"] += tiers.count(Tier.DISK)
        # The disk tier is inclusive and large enough: a stored page is always a hit somewhere.
        if hit.hits != len(keys) or set(tiers) - {Tier.DRAM, Tier.DISK}:
            t["problems"].append(f"lookup {i}: {[int(x) for x in tiers]} of {len(keys)} stored pages")
        if i % 4 == 0:
            r = kv.load(keys[: hit.hits])
            bad = bad_pages(kv, keys[: r.loaded], r.views)
            del r.views
            if r.lease is not None:
                kv.release(r.lease)
            t["loads"] += 1
            if bad or r.loaded != hit.hits:
                t["problems"].append(f"load {i}: {r.loaded} of {hit.hits} pages, wrong bytes in {bad}")
        miss = kv.lookup(absent)
        t["lookups"] += 1
        t["lookup_pages"] += len(absent)
        if miss.hits:
            t["problems"].append(f"lookup {i}: {miss.hits} hits on pages never stored")
        i += 1
    kv.close()
    print(json.dumps(t), flush=True)


def start_lookup_worker(
    socket_path: Any, engine_id: str, seconds: float, table: bool
) -> subprocess.Popen[bytes]:
    spec = {
        "table": table,
        "socket": str(socket_path),
        "engine_id": engine_id,
        "chains": LOOKUP_CHAINS,
        "absent": ABSENT,
        "seconds": seconds,
    }
    return subprocess.Popen(
        [sys.executable, "-c", "from tests.test_engine_thread import lookup_worker_main; lookup_worker_main()", json.dumps(spec)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT, env=clean_env(),
    )  # fmt: skip


LOOKUP_PATHS = pytest.mark.parametrize("table", [False, True], ids=["socket", "table"])


@LOOKUP_PATHS
def test_lookups_on_threads_while_another_engine_stores_and_evicts(
    daemon_factory, engine_procs, table
) -> None:
    d = daemon_factory({"dram.capacity": CAP})
    with d.engine(engine_id="seeder") as kv:
        for seed, pages in LOOKUP_CHAINS:
            store_chain(kv, chain_tokens(seed, pages))
    before = d.stats()["counters"]
    # 1,600 new pages through a 128-page DRAM tier: evictions and demotions all along
    writer = engine_procs(d.engine_socket, [["stream", 5, 400, 4]], engine_id="writer")
    writer.expect("chain")
    workers = [start_lookup_worker(d.engine_socket, f"looker-{i}", 3.0, table) for i in range(3)]
    totals: dict[str, int] = dict(lookups=0, lookup_pages=0, dram=0, disk=0, loads=0)
    for w in workers:
        out, err = w.communicate(timeout=120)
        assert w.returncode == 0, err.decode()
        t = json.loads(out.decode().strip().splitlines()[-1])
        assert t["problems"] == [], t["problems"][:5]
        for k in totals:
            totals[k] += t[k]
    assert totals["loads"] >= 3 and totals["dram"] > 0
    st = d.stats()
    c = st["counters"]
    assert c["evicted_pages_dram_capacity"] > before.get("evicted_pages_dram_capacity", 0)
    assert c.get("demotions_dropped", 0) == 0
    # every lookup answered on a thread is counted, exactly
    assert c["lookups"] - before.get("lookups", 0) == totals["lookups"]
    assert c["lookup_pages"] - before.get("lookup_pages", 0) == totals["lookup_pages"]
    assert c["hit_pages_dram"] - before.get("hit_pages_dram", 0) == totals["dram"]
    assert c.get("hit_pages_disk", 0) - before.get("hit_pages_disk", 0) == totals["disk"]
    assert (
        c["miss_pages"] - before.get("miss_pages", 0)
        == totals["lookup_pages"] - totals["dram"] - totals["disk"]
    )
    log = d.log()
    assert "Traceback" not in log and "internal error" not in log, log


@LOOKUP_PATHS
def test_lru_order_follows_lookups_answered_on_threads(daemon_factory, table) -> None:
    """Lookups answered on one engine's thread decide what another engine's stores (and an operator's
    eviction) push out: a chain looked up recently survives one that was not looked up."""
    d = daemon_factory({"dram.capacity": CAP, "disk.enabled": "false"})
    with (
        d.engine(engine_id="writer") as writer,
        d.engine(engine_id="reader", lookup_table=table) as reader,
        d.control() as ctl,
    ):
        chains = [store_chain(writer, chain_tokens(500 + i, 16)) for i in range(8)]  # exactly full
        for keys in chains[:4]:  # the older half is used again
            assert reader.lookup(keys).hits == 16
        new = store_chain(writer, chain_tokens(600, 32))  # 32 evictions, by the other connection
        hits = [reader.lookup(keys).hits for keys in chains]
        assert hits == [16, 16, 16, 16, 0, 0, 16, 16]
        # Least recent first now: the new chain, chains 0..3, 6, 7. Use the new chain and chains 6
        # and 7 again; an operator eviction right after (no engine op in between) takes 0 and 1.
        for keys in (new, chains[6], chains[7]):
            assert reader.lookup(keys).hits == len(keys)
        assert ctl.evict("dram", 32 * TEST_NS.page_bytes) == 32 * TEST_NS.page_bytes
        hits = [reader.lookup(keys).hits for keys in chains]
        assert hits == [0, 0, 16, 16, 0, 0, 16, 16]
        assert reader.lookup(new).hits == 32


@LOOKUP_PATHS
def test_status_totals_equal_what_the_engines_looked_up(daemon_factory, table) -> None:
    """Lookups whose prefixes are in DRAM, in DRAM then on disk, or missing (with the table: all
    answered in the engine's process, the disk pages listed there too)."""
    d = daemon_factory()
    with d.engine(engine_id="writer") as kv, d.control() as ctl:
        chains = [store_chain(kv, chain_tokens(700 + i, 8)) for i in range(4)]
        absent = kv.page_keys(chain_tokens(799, 3))
        ctl.evict_keys([chains[2][5], chains[3][2]])  # their tails go to disk
        wait_for(lambda: d.stats()["tiers"]["disk"]["pending_pages"] == 0, what="disk writes")
    before = d.stats()["counters"]
    clients = [d.engine(engine_id=f"reader-{i}", lookup_table=table) for i in range(3)]
    expected = {c.engine_id: {"lookups": 0, "pages": 0, "hits": 0, "disk": 0} for c in clients}
    errors: list[BaseException] = []

    def run(kv: EngineClient, n: int) -> None:
        e = expected[kv.engine_id]
        try:
            for i in range(n):
                keys = chains[i % 4][: 1 + i % 8] if i % 5 else absent
                pin = i % 7 == 0  # answered on the loop: one lease each, released at once
                hit = kv.lookup(keys, pin=pin)
                if hit.lease is not None:
                    kv.release(hit.lease)
                e["lookups"] += 1
                e["pages"] += len(keys)
                e["hits"] += hit.hits
                e["disk"] += hit.tiers.count(Tier.DISK)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(kv, 300 + 50 * i)) for i, kv in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    lookups = sum(e["lookups"] for e in expected.values())
    pages = sum(e["pages"] for e in expected.values())
    hits = sum(e["hits"] for e in expected.values())
    disk = sum(e["disk"] for e in expected.values())
    assert disk > 0 and hits > disk

    def check(st: dict[str, Any]) -> None:
        c = st["counters"]
        assert c["lookups"] - before.get("lookups", 0) == lookups
        assert c["lookup_pages"] - before.get("lookup_pages", 0) == pages
        assert c["hit_pages_dram"] - before.get("hit_pages_dram", 0) == hits - disk
        assert c.get("hit_pages_disk", 0) - before.get("hit_pages_disk", 0) == disk
        assert c["miss_pages"] - before.get("miss_pages", 0) == pages - hits
        if table:  # every lookup answered in the engine's process but the pinned ones
            pinned = sum(-(-n // 7) for n in (300, 350, 400))
            assert c.get("table_lookups", 0) - before.get("table_lookups", 0) == lookups - pinned
        (ns,) = st["namespace_stats"]
        assert ns["lookup_pages"] == pages and ns["hit_pages"] == hits

    st = d.stats()
    check(st)
    for s in st["sessions"]:
        e = expected[s["engine_id"]]
        assert (s["lookup_pages"], s["hit_pages"]) == (e["pages"], e["hits"]), s
    assert st["leases"] == 0 and st["tiers"]["dram"]["pinned_pages"] == 0
    for kv in clients:
        kv.close()
    wait_for(lambda: d.stats()["sessions"] == [], what="the readers' sessions to close")
    check(d.stats())  # folded into the totals when the sessions detached, nothing lost or doubled


def test_daemon_stop_ends_idle_engine_connections_promptly(daemon_factory) -> None:
    d = daemon_factory()
    engines = [d.engine(engine_id=f"idle-{i}") for i in range(4)]  # their threads block in recv
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(str(d.engine_socket))  # connected, never says hello
    wait_for(lambda: len(d.stats()["sessions"]) == 4, what="the engines to attach")
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 10
    for kv in engines:
        with pytest.raises(DaemonUnavailable):
            kv.lookup([b"k" * 16])
        kv.close()
    raw.settimeout(5)
    assert raw.recv(1) == b""  # closed by the daemon
    raw.close()
    log = d.log()
    assert "did not end" not in log and "Traceback" not in log, log
    assert not d.engine_socket.exists()


def test_pipelined_requests_are_answered_in_order_when_the_engine_reads_late(daemon) -> None:
    """Requests sent back to back, half answered on the connection's thread (lookup) and half on the
    loop (load, ping), while the engine reads nothing for a while: the socket's buffer fills up, and
    every reply still comes, complete and in request order."""
    with daemon.engine(engine_id="writer") as kv:
        keys = store_chain(kv, chain_tokens(42, 16))
    n = 3000
    ops = [("lookup", {"keys": keys, "pin": False}), ("load", {"keys": keys}), ("ping", {})]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(str(daemon.engine_socket))
    sock.sendall(P.request(1, "hello", {"namespace": TEST_NS.to_wire(), "engine_id": "pipeliner"}))
    requests = b"".join(P.request(2 + i, *ops[i % 3]) for i in range(n))
    sender = threading.Thread(target=sock.sendall, args=(requests,))
    sender.start()
    time.sleep(1.0)  # read nothing meanwhile: replies pile up until the daemon cannot send
    reader = P.FrameReader()
    replies: list[Any] = []
    while len(replies) < n + 1:
        data = sock.recv(1 << 16)
        assert data, f"the daemon closed the connection after {len(replies)} replies"
        replies += [P.unpack(f) for f in reader.feed(data)]
    sender.join(10)
    assert [r[1] for r in replies] == list(range(1, n + 2))  # every reply, in request order
    assert all(r[2] == P.OK for r in replies), [r for r in replies if r[2] != P.OK][:3]
    for i, r in enumerate(replies[1:]):
        op = ops[i % 3][0]
        if op == "lookup":
            assert r[3]["tiers"] == bytes([int(Tier.DRAM)]) * 16
        elif op == "load":
            assert len(r[3]["offsets"]) == 16 and r[3]["lease"] is not None
    assert daemon.stats()["tiers"]["dram"]["pinned_pages"] == 16 * (n // 3)
    sock.close()  # the connection's leases go with it
    wait_for(lambda: daemon.stats()["tiers"]["dram"]["pinned_pages"] == 0, what="the leases to drop")
