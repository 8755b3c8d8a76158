"""Cluster faults the other cluster tests do not make: what a user of a few hosts would notice.

A member that floods the gossip port with packets claiming ever new sender addresses, and two
daemons started with the same node id (fast, in the default suite); a holder frozen with SIGSTOP in
the middle of a fetch, a holder restarted on the same addresses with an empty memory, and garbage
from a key holder on the data port (slow). The rule everywhere: no wrong bytes, no hang, a clear
log line, and the cluster whole again once the fault is gone.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time

import msgpack
import pytest

from polarkvd.cluster.auth import read_key_file
from polarkvd.cluster.messages import MAGIC
from polarkvd.errors import PolarKVError
from polarkvd.transport.peer_client import PeerClient
from polarkvd.transport.peer_wire import data_key
from tests.cluster.test_daemons import Cluster, _free_port
from tests.conftest import TEST_NS, bad_pages, chain_tokens, store_chain, wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture
def cluster(daemon_factory, tmp_path) -> Cluster:
    return Cluster.keyed(daemon_factory, tmp_path)


def _load_checked(kv, keys: list[bytes], pipelined: bool = False) -> int:
    """Load `keys`; every page that arrived must have the bytes that were stored. Pages usable."""
    res = kv.load(keys, pipelined=pipelined)
    try:
        n = res.loaded
        if pipelined and res.signal is not None:
            n = res.wait_layers(TEST_NS.num_layers, timeout=60)
        assert bad_pages(kv, keys[:n], res.views[:n]) == [], "a page came back with wrong bytes"
        return n
    finally:
        del res.views
        if res.lease is not None:
            kv.release(res.lease)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _gossip_dealer(cluster: Cluster, target):  # type: ignore[no-untyped-def]
    """A ZeroMQ DEALER holding the cluster key, connected to `target`'s gossip port: a member's
    gossip socket, speaking whatever the test sends."""
    import zmq

    keys = read_key_file(cluster.key_file)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.curve_publickey, s.curve_secretkey, s.curve_serverkey = keys.public, keys.secret, keys.public
    s.setsockopt(zmq.LINGER, 0)
    s.connect("tcp://" + target.sets["cluster.gossip_address"])
    return ctx, s


def test_gossip_from_thousands_of_claimed_addresses_keeps_the_daemon_descriptors_bounded(
    cluster: Cluster,
) -> None:
    """Every gossip packet names its sender's address, and a ping is acked to that address: a member
    (or anyone, in an insecure cluster) naming a new address per packet made the daemon open one
    socket per address, for ever: 3,000 pings, 1,000 more descriptors, until the process ran out."""
    a, b = cluster.add("a"), cluster.add("b")
    cluster.wait_converged(["a", "b"])
    before = _open_fds(a.proc.pid)
    ctx, s = _gossip_dealer(cluster, a)
    try:
        rng = random.Random(5)
        for i in range(3000):
            src = f"tcp://127.0.{rng.randrange(1, 250)}.{rng.randrange(1, 250)}:{rng.randrange(1024, 65000)}"
            s.send_multipart([src.encode(), msgpack.packb([MAGIC, [[1, i, "a"]]])])
        for _ in range(300):  # and garbage of every shape, with and without a sender
            frames = [os.urandom(rng.randrange(0, 64))] * rng.randrange(1, 4)
            s.send_multipart(frames)
        wait_for(lambda: a.stats() and _gossip_stats(a)["packets_in"] >= 3000, 20, "a to read the flood")
    finally:
        s.close()
        ctx.term()
    assert a.proc.poll() is None
    open_to = _gossip_stats(a)["peer_sockets"]
    assert open_to <= 512, f"{open_to} gossip sockets open after 3,000 claimed sender addresses"
    # each such socket holds a descriptor, and another while it tries to connect: bounded by the cap
    grown = _open_fds(a.proc.pid) - before
    assert grown < 2 * 512 + 200, f"{grown} more open descriptors after 3,000 claimed sender addresses"
    cluster.wait_converged(["a", "b"])
    with a.engine() as kv:
        keys = store_chain(kv, chain_tokens(11, 4))
    with b.engine() as kv:
        wait_for(lambda: kv.lookup(keys).hits == 4, 10, "b to find a's pages after the flood")
        assert _load_checked(kv, keys) == 4


def _members(d) -> list[dict]:  # type: ignore[no-untyped-def]
    with d.control() as c:
        return c.cluster()["members"]


def _gossip_stats(d) -> dict:  # type: ignore[no-untyped-def]
    with d.control() as c:
        return c.cluster()["gossip"]


def test_two_daemons_with_one_node_id_say_so_and_the_survivor_serves(cluster: Cluster) -> None:
    """Two processes configured with the same cluster.node_id out-vote each other's incarnation for
    ever, and peers reach one or the other. Both said nothing of it (no warning anywhere); now the
    log names the other address once, and once one stops, the other is the member again.

    Pages stored before the conflict are found again once it ends: the twin's meta-map greeting made
    b drop its records of a's pages (a greeting means "I restarted"), and a, whose view of the
    members never changed, had no reason to announce them again; they stayed misses until the next
    membership change. Now a greets every member again once the conflict has been quiet a while."""
    a, b = cluster.add("a", disk__enabled="false"), cluster.add("b", disk__enabled="false")
    cluster.wait_converged(["a", "b"])
    with a.engine() as kv:
        keys = store_chain(kv, chain_tokens(12, 6))
    twin_sets = {k: v for k, v in a.sets.items() if k.startswith("cluster.")}
    twin_sets["cluster.gossip_address"] = f"127.0.0.1:{_free_port()}"
    twin = cluster.factory({**twin_sets, "disk.enabled": "false"}, name="a-twin")

    def said(d) -> list[str]:  # type: ignore[no-untyped-def]
        return [line for line in d.log().splitlines() if "uses our node id 'a'" in line]

    wait_for(lambda: said(a) or said(twin), 20, "one of the twins to log the conflict")
    for d in (a, twin):
        assert len(said(d)) <= 1, said(d)  # once per address, not per packet
        assert all("level=error" in line for line in said(d))
    with b.engine() as kv:
        for _ in range(5):  # whichever twin b reaches: a miss or the right bytes
            _load_checked(kv, keys)
    twin.kill()  # a crash: no leave, so no membership change reaches b's meta map
    a_addr = a.sets["cluster.gossip_address"]
    wait_for(
        lambda: any(m["node"] == "a" and m["state"] == "alive" and m["addr"].endswith(a_addr)
                    for m in _members(b)),
        20, "b to see a (at a's address) alive with the twin gone",
    )  # fmt: skip
    with a.engine() as akv:
        new = store_chain(akv, chain_tokens(17, 4))
    with b.engine() as kv:
        wait_for(lambda: kv.lookup(new).hits == 4, 20, "b to find what a stored after the twin left")
        assert _load_checked(kv, new) == 4
        t0 = time.monotonic()
        wait_for(lambda: kv.lookup(keys).hits == len(keys), 10, "b to find a's pages from before it")
        print(f"pages from before the conflict found again {time.monotonic() - t0:.1f}s after a's new ones")
        assert _load_checked(kv, keys) == len(keys)


# ------------------------------------------------------------------------------------ slow


@pytest.mark.slow
@pytest.mark.parametrize("pipelined", [False, True], ids=["whole", "pipelined"])
def test_a_holder_frozen_mid_fetch_costs_hits_not_a_hang(cluster: Cluster, pipelined: bool) -> None:
    """SIGSTOP keeps the holder's sockets open but answers nothing: the load ends within the fetch
    timeout with what arrived (exact bytes), and after SIGCONT the holder rejoins and serves again."""
    a = cluster.add("a", disk__enabled="false", cluster__fetch_timeout="1s")
    b = cluster.add("b", disk__enabled="false", cluster__fetch_timeout="1s")
    cluster.wait_converged(["a", "b"])
    with a.engine() as kv:
        keys = store_chain(kv, chain_tokens(13, 1200))  # ~38 MiB: a fetch long enough to interrupt
    with b.engine() as kv:
        wait_for(lambda: kv.lookup(keys).hits == len(keys), 20, "b to find a's pages")
        stop = threading.Timer(0.05, os.kill, (a.proc.pid, signal.SIGSTOP))
        stop.start()
        try:
            t0 = time.monotonic()
            got = _load_checked(kv, keys, pipelined=pipelined)
            took = time.monotonic() - t0
            stop.join()
            print(f"frozen holder: {got} of {len(keys)} pages in {took:.2f}s")
            assert took < 15, f"a load from a frozen holder took {took:.1f}s"
            assert got < len(keys)
            time.sleep(2)  # frozen long enough to be suspected, maybe declared dead
        finally:
            stop.cancel()
            os.kill(a.proc.pid, signal.SIGCONT)
        cluster.wait_converged(["a", "b"], timeout=30)
        with b.control() as c:
            c.evict("dram", 1 << 40)  # what arrived before the freeze is dropped: all from a again
        wait_for(lambda: kv.lookup(keys).hits == len(keys), 30, "b to find a's pages again")
        assert _load_checked(kv, keys, pipelined=pipelined) == len(keys)


@pytest.mark.slow
def test_a_holder_restarted_empty_on_the_same_addresses_is_a_miss_then_a_hit(cluster: Cluster) -> None:
    """Restarted faster than failure detection, on the same gossip and data ports, with no disk: the
    peers' records of its pages are stale. Loading them is a miss (never bytes of another page), and
    what it stores after the restart is found again."""
    ports = {"cluster__data_address": f"127.0.0.1:{_free_port()}", "disk__enabled": "false"}
    a, b = cluster.add("a", **ports), cluster.add("b", disk__enabled="false")
    cluster.wait_converged(["a", "b"])
    with a.engine() as kv:
        old = store_chain(kv, chain_tokens(14, 8))
    with b.engine() as kv:
        wait_for(lambda: kv.lookup(old).hits == 8, 10, "b to find a's pages")
        a.kill()
        a.start()
        assert _load_checked(kv, old) == 0  # stale records: a miss
        cluster.wait_converged(["a", "b"])
        with a.engine() as akv:  # a stores other pages, and the old ones again with the same bytes
            new = store_chain(akv, chain_tokens(15, 5))
            store_chain(akv, chain_tokens(14, 3))
        wait_for(lambda: kv.lookup(new).hits == 5, 15, "b to find a's new pages")
        assert _load_checked(kv, new) == 5
        assert _load_checked(kv, old) == 3
    assert b.stats()["counters"].get("cluster_corrupt_pages", 0) == 0


@pytest.mark.slow
def test_garbage_from_a_key_holder_on_the_data_port_gets_error_replies(cluster: Cluster) -> None:
    """A peer that holds the key but speaks another version of the ops (wrong types, sizes, unknown
    ops, payloads where none belong), and raw bytes from anyone: every request gets an error reply
    or a closed connection, no handler fails inside (`handler_errors`), and the daemon serves on."""
    a = cluster.add("a", cluster__dmp_bytes="4MiB")
    b = cluster.add("b")
    cluster.wait_converged(["a", "b"])
    with a.engine() as kv:
        keys = store_chain(kv, chain_tokens(16, 6))
    with a.control() as c:
        addr = c.cluster()["data_address"]
    rng = random.Random(9)

    def junk(depth: int = 0):  # type: ignore[no-untyped-def]
        kinds = [
            lambda: None, lambda: True, lambda: -1, lambda: 2**64 - 1, lambda: -(2**63), lambda: 3.5,
            lambda: "x" * rng.randrange(40), lambda: os.urandom(rng.choice([0, 15, 16, 17])),
            lambda: rng.choice(keys),
            lambda: [junk(depth + 1) for _ in range(rng.randrange(4))],
            lambda: {str(junk(depth + 1)): junk(depth + 1) for _ in range(rng.randrange(3))},
        ]  # fmt: skip
        return kinds[rng.randrange(len(kinds) if depth < 2 else len(kinds) - 2)]()

    ops = ["get", "put", "where", "announce", "pin", "unpin", "rdma_connect", "nope", ""]
    fields = ["keys", "ns", "layers", "parents", "from", "batch", "leading", "lease", "seconds", "params"]
    client = PeerClient(key=data_key(read_key_file(cluster.key_file).secret), timeout=5)
    answered = 0
    try:
        for _ in range(600):
            args = {f: junk() for f in rng.sample(fields, rng.randrange(len(fields)))}
            if rng.random() < 0.5:
                args["keys"] = [rng.choice(keys) if rng.random() < 0.7 else os.urandom(16) for _ in range(3)]
            payloads = [os.urandom(rng.choice([0, 1, TEST_NS.page_bytes])) for _ in range(rng.randrange(3))]
            try:
                client.call(addr, rng.choice(ops), args, payloads)
                answered += 1
            except PolarKVError:
                answered += 1  # an error reply, or TransportError: a closed connection
    finally:
        client.close()
    host, port = addr.removeprefix("tcp://").rsplit(":", 1)
    for n in (0, 1, 39, 40, 72, 4096):  # raw bytes from anyone: the handshake refuses them
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(os.urandom(n))
    assert answered == 600
    with a.control() as c:
        served = c.cluster()["transport"]
    assert served["handler_errors"] == 0, served
    assert a.proc.poll() is None
    with b.engine() as kv:
        wait_for(lambda: kv.lookup(keys).hits == 6, 10, "b to find a's pages after the garbage")
        assert _load_checked(kv, keys) == 6
