"""Real ZeroMQ sockets on loopback: members converge; with CURVE, a process without the key is kept out.

These run on the wall clock (real sockets), but never sleep: they poll the sockets until a condition
holds or a deadline passes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest

zmq = pytest.importorskip("zmq")

from polarkvd.cluster.gossip import CurveKeys, ZmqTransport  # noqa: E402
from polarkvd.cluster.membership import ClusterConfig, Membership, State  # noqa: E402
from polarkvd.cluster.messages import NodeState, PushPull, encode  # noqa: E402

FAST = ClusterConfig(probe_interval=0.2, probe_timeout=0.1, gossip_interval=0.05, push_pull_interval=2.0)


def _node(name: str, curve: CurveKeys | None, seeds: list[str]) -> tuple[Membership, ZmqTransport]:
    t = ZmqTransport("tcp://127.0.0.1:0", curve=curve)
    m = Membership(name, {"endpoints": {"gossip": t.address}}, FAST, time.monotonic, t, random.Random(name))
    m.join(seeds)
    return m, t


def _pump(nodes: list[tuple[Membership, ZmqTransport]], until: Callable[[], bool], limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if until():
            return True
        for m, t in nodes:
            for src, data in t.recv(timeout_ms=5):
                m.on_message(src, data)
            m.tick(time.monotonic())
    return until()


def _close(nodes):
    for _, t in nodes:
        t.close()


def test_three_members_converge_over_loopback():
    a = _node("a", None, [])
    nodes = [a, _node("b", None, [a[1].address]), _node("c", None, [a[1].address])]
    try:
        ok = _pump(nodes, lambda: all(len(m.alive_members()) == 3 for m, _ in nodes), 10.0)
        assert ok, [[(x.node, x.state.name) for x in m.members.values()] for m, _ in nodes]
        assert nodes[1][0].members["c"].meta == {"endpoints": {"gossip": nodes[2][1].address}}
        # garbage on the real socket is dropped, not fatal
        raw = a[1].ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(a[1].address)
        raw.send_multipart([b"tcp://x:1", b"\x00garbage"])
        raw.send(b"one frame")
        ok = _pump(nodes, lambda: a[0].stats["bad_packets"] >= 2, 5.0)
        raw.close()
        assert ok
        assert all(m.state_of("a") is State.ALIVE for m, _ in nodes)
    finally:
        _close(nodes)


def test_curve_keeps_out_a_member_without_the_key():
    pub, sec = zmq.curve_keypair()
    keys = CurveKeys(pub, sec)
    a = _node("a", keys, [])
    nodes = [a, _node("b", keys, [a[1].address]), _node("c", keys, [a[1].address])]
    other_pub, other_sec = zmq.curve_keypair()
    # an intruder: a different key pair, and one that knows the cluster's public key but not its secret
    intruders = [
        _node("x", CurveKeys(other_pub, other_sec), [a[1].address]),
        _node("y", None, [a[1].address]),
    ]
    everyone = nodes + intruders
    try:
        ok = _pump(everyone, lambda: all(len(m.alive_members()) == 3 for m, _ in nodes), 10.0)
        assert ok
        # the subtle intruder: knows the server (cluster public) key, but proves a key of its own;
        # only the ZAP check on the client key stops it
        z = a[1].ctx.socket(zmq.DEALER)
        z.setsockopt(zmq.LINGER, 0)
        z.curve_publickey, z.curve_secretkey = other_pub, other_sec
        z.curve_serverkey = pub
        z.connect(a[1].address)
        join = encode([PushPull((NodeState("z", "tcp://127.0.0.1:1", 0, State.ALIVE, {}),), True, False)])
        for _ in range(5):
            z.send_multipart([b"tcp://127.0.0.1:1", join], flags=zmq.NOBLOCK)
        # a few more rounds: the intruders keep knocking and must stay out
        _pump(everyone, lambda: False, 1.5)
        z.close()
        for m, _ in nodes:
            assert m.state_of("x") is None and m.state_of("y") is None and m.state_of("z") is None
        for m, _ in intruders:
            assert len(m.alive_members()) == 1
    finally:
        _close(everyone)
