"""SWIM state machine on the simulated network: every transition a user of the cluster would notice."""

from __future__ import annotations

import math
import random

import msgpack
import pytest

from polarkvd.cluster.membership import (
    RIVAL_QUIET_PROBES,
    ClusterConfig,
    EventKind,
    Membership,
    State,
    _Suspicion,
)
from polarkvd.cluster.messages import Alive, Ping, Suspect, decode, encode
from polarkvd.cluster.simnet import SimNetwork
from polarkvd.errors import ConfigError, ProtocolError


def test_members_converge_through_seeds(cluster):
    c = cluster().start(6)
    assert all(len(m.alive_members()) == 6 for m in c.m.values())
    assert c.deaths() == []


def test_suspect_is_refuted_by_the_member_itself(cluster):
    c = cluster().start(4)
    inc = c.m["n2"].incarnation
    # n0 hears (falsely) that n2 is suspect: n2 must learn of it and out-vote it
    c.m["n0"].on_message("n1", [Suspect("n2", inc, "n1")])
    assert c.m["n0"].state_of("n2") is State.SUSPECT
    c.run(2.0)
    assert c.m["n2"].incarnation > inc
    assert c.m["n2"].stats["refutes"] >= 1
    assert c.all_see("n2", State.ALIVE)
    n0 = c.kinds("n0", "n2")
    assert n0[n0.index(EventKind.SUSPECT) :][:2] == [EventKind.SUSPECT, EventKind.ALIVE]
    assert c.deaths() == []


def test_failed_member_is_suspected_then_dead_for_all(cluster):
    c = cluster().start(5)
    c.net.kill("n3")
    c.run(30.0)
    assert c.all_see("n3", State.DEAD), c.views()
    for name in ("n0", "n1", "n2", "n4"):
        assert c.kinds(name, "n3")[-1] is EventKind.DEAD
    assert [d for d in c.deaths() if d[1] != "n3"] == []


def test_suspicion_timeout_shrinks_with_independent_confirmations():
    s = _Suspicion(start=100.0, lo=2.0, hi=12.0, k=2, first="a")
    assert s.deadline == 112.0
    assert not s.confirm("a")  # the member that started it is not a confirmation
    assert s.confirm("b")
    first = s.deadline
    assert 102.0 < first < 112.0
    assert not s.confirm("b")  # nor is the same member twice
    assert s.deadline == first
    assert s.confirm("c")
    assert s.deadline == pytest.approx(102.0)
    assert not s.confirm("d")  # at the minimum already
    # no confirmations expected (tiny cluster): straight to the minimum
    assert _Suspicion(start=0.0, lo=2.0, hi=12.0, k=0, first="a").deadline == 2.0


def test_confirmed_suspicion_expires_before_the_maximum(cluster):
    cfg = ClusterConfig()
    c = cluster(cfg).start(8)
    c.net.kill("n5")
    t0 = c.net.clock.now
    c.run(30.0)
    lo = cfg.suspicion_mult * math.log10(8) * cfg.probe_interval
    lo = max(lo, cfg.suspicion_mult * cfg.probe_interval)
    hi = cfg.suspicion_max_timeout_mult * lo
    # the first member to suspect gets confirmations from the others' probes: dead well before `hi`
    dead_at = [e.at for evs in c.events.values() for e in evs if e.node == "n5" and e.kind is EventKind.DEAD]
    suspect_at = [
        e.at for evs in c.events.values() for e in evs if e.node == "n5" and e.kind is EventKind.SUSPECT
    ]
    assert dead_at and suspect_at
    assert min(dead_at) - min(suspect_at) >= lo - 1e-9
    assert min(dead_at) - min(suspect_at) < hi / 2
    assert max(dead_at) - t0 < 10.0


def test_restarted_member_rejoins_with_a_higher_incarnation(cluster):
    c = cluster().start(4)
    c.net.kill("n1")
    c.run(30.0)
    assert c.all_see("n1", State.DEAD)
    dead_inc = c.m["n0"].members["n1"].incarnation
    # same node id and address, fresh process: incarnation 0
    reborn = c.add("n1", ["n0"])
    assert reborn.incarnation == 0
    c.run(3.0)
    assert reborn.incarnation > dead_inc
    assert c.all_see("n1", State.ALIVE), c.views()
    assert c.kinds("n2", "n1")[-1] is EventKind.JOINED


def test_indirect_ping_saves_a_member_behind_a_broken_direct_link(cluster):
    c = cluster().start(5)
    c.net.set_link_loss("n0", "n1", 1.0)
    c.run(30.0)
    assert c.m["n0"].stats["indirect_probes"] > 0
    assert EventKind.SUSPECT not in c.kinds("n0", "n1")
    assert c.all_see("n1", State.ALIVE)

    # control: without helpers the same broken link makes n0 suspect n1 (n1 then refutes)
    c2 = cluster(ClusterConfig(indirect_checks=0)).start(5)
    c2.net.set_link_loss("n0", "n1", 1.0)
    c2.run(30.0)
    assert EventKind.SUSPECT in c2.kinds("n0", "n1")


def test_push_pull_heals_a_partition(cluster):
    c = cluster(ClusterConfig(push_pull_interval=3.0)).start(6)
    a, b = ["n0", "n1", "n2"], ["n3", "n4", "n5"]
    c.net.partition(a, b)
    c.run(60.0)  # longer than gossip_to_dead: only push-pull can bring the sides back
    assert all(c.m[x].state_of(y) is State.DEAD for x in a for y in b)
    assert all(c.m[y].state_of(x) is State.DEAD for x in a for y in b)
    c.net.heal()
    c.run(30.0)
    assert c.converged(), c.views()
    assert sum(m.stats["refutes"] for m in c.m.values()) >= 6


def test_graceful_leave_is_not_a_death(cluster):
    c = cluster().start(5)
    c.m["n4"].leave()
    c.net.wake("n4")
    c.run(1.0)
    c.net.kill("n4")
    c.run(30.0)
    assert c.all_see("n4", State.LEFT), c.views()
    assert c.deaths() == []
    assert EventKind.LEFT in c.kinds("n0", "n4")


def test_metadata_updates_reach_every_member(cluster):
    c = cluster().start(6)
    meta = {
        "endpoints": {"pages": "tcp://10.0.0.5:7700"},
        "free": {"dram": 1 << 30, "dmp": 1 << 32},
        "load": 0.25,
    }
    c.m["n3"].update_meta(meta)
    c.net.wake("n3")
    c.run(3.0)
    assert all(m.members["n3"].meta == meta for m in c.m.values())
    assert EventKind.UPDATED in c.kinds("n0", "n3")


def test_delegate_sees_every_event():
    net = SimNetwork(random.Random(1))
    seen = []
    ms = []
    for i in range(3):
        m = Membership(f"d{i}", {}, ClusterConfig(), net.clock, net.transport(f"d{i}"), random.Random(i),
                       delegate=seen.append)  # fmt: skip
        net.add(f"d{i}", m)
        m.join(["d0"])
        ms.append(m)
    net.run_for(3.0)
    assert {(e.kind, e.node) for e in seen} >= {(EventKind.JOINED, "d1"), (EventKind.JOINED, "d2")}


def _seeded(net: SimNetwork, name: str, seed: str, seeds: list[str]) -> Membership:
    """A member that publishes `seed` and admits only members publishing the same (as node.py)."""

    def admit(node: str, meta: dict) -> str | None:
        return None if meta.get("seed") == seed else f"seed {meta.get('seed')!r} is not {seed!r}"

    m = Membership(name, {"seed": seed}, ClusterConfig(), net.clock, net.transport(name),
                   random.Random(len(name) + len(seed)), admit=admit)  # fmt: skip
    net.add(name, m)
    m.join(seeds)
    net.wake(name)
    return m


def test_a_member_the_admit_hook_refuses_is_kept_out_on_both_sides():
    net = SimNetwork(random.Random(3))
    ms = {n: _seeded(net, n, "s1", ["a"]) for n in ("a", "b", "c")}
    net.run_for(5.0)
    assert all(len(m.alive_members()) == 3 for m in ms.values())
    x = _seeded(net, "x", "s2", ["a", "b"])
    net.run_for(10.0)
    for m in ms.values():  # c hears of x from nobody: a and b do not pass its news on
        assert "x" not in m.members
        assert not [e for e in m.take_events() if e.node == "x"]
    assert ms["a"].stats["refused"] >= 1 and ms["b"].stats["refused"] >= 1
    assert set(x.members) == {"x"} and x.stats["refused"] >= 1  # x admits none of them either


def test_a_known_member_back_with_refused_metadata_has_left():
    net = SimNetwork(random.Random(4))
    ms = {n: _seeded(net, n, "s1", ["a"]) for n in ("a", "b", "c")}
    net.run_for(5.0)
    for m in ms.values():
        m.take_events()
    # c restarts with another seed (same id, same address): its new life refutes the old one
    ms["c"].update_meta({"seed": "s2"})
    net.wake("c")
    net.run_for(5.0)
    for name in ("a", "b"):
        assert ms[name].state_of("c") is State.LEFT
        assert EventKind.LEFT in [e.kind for e in ms[name].take_events() if e.node == "c"]
        assert {m.node for m in ms[name].alive_members()} == {"a", "b"}


def test_a_twin_with_our_node_id_is_called_gone_once_it_has_been_quiet(cluster):
    """Two processes with one node id out-vote each other for as long as both run (and the twin's
    meta-map greeting may have made the owners drop our records). Not while the twin speaks, but
    once it crashed (no leave) and nothing of it was heard for RIVAL_QUIET_PROBES probe intervals,
    the member gets a RIVAL_GONE event about itself: its cue to greet the members again. (The twin
    peers do not reach hears of the other only at push-pulls: every 2 s here.)"""
    c = cluster(ClusterConfig(push_pull_interval=2.0)).start(3)
    twin = Membership("n1", {"endpoints": {"gossip": "n1-twin"}}, c.config, c.net.clock,
                      c.net.transport("n1-twin"), random.Random(5))  # fmt: skip
    c.net.add("n1-twin", twin)
    twin.join(["n0"])
    c.run(20.0)  # 40 probe intervals of conflict
    assert c.m["n1"].stats["id_conflicts"] + twin.stats["id_conflicts"] >= 2
    assert EventKind.RIVAL_GONE not in c.kinds("n1", "n1")
    c.net.kill("n1-twin")
    killed = c.net.clock()
    c.run(RIVAL_QUIET_PROBES * c.config.probe_interval + 10.0)
    gone = [e for e in c.events["n1"] if e.kind is EventKind.RIVAL_GONE]
    assert gone and all(e.node == "n1" for e in gone)
    assert gone[0].at - killed < RIVAL_QUIET_PROBES * c.config.probe_interval + 2.0
    assert all(m.members["n1"].addr == "n1" for m in c.m.values())  # the survivor is the member
    assert c.converged(), c.views()
    # nobody else is told anything
    assert all(EventKind.RIVAL_GONE not in [e.kind for e in c.events[n]] for n in ("n0", "n2"))


def test_garbage_and_foreign_packets_are_counted_and_dropped(cluster):
    c = cluster().start(3)
    m = c.m["n0"]
    bad = [
        b"",
        b"\x00\xff garbage",
        msgpack.packb({"jsonrpc": "2.0"}),
        msgpack.packb(["pkg1", [[99, 1]]]),  # unknown type
        msgpack.packb(["pkg1", [[1, "not-a-seq", "n0"]]]),  # wrong field type
        msgpack.packb(["pkg1", [[4, "x", -1, "addr", {}]]]),  # negative incarnation
        msgpack.packb(["pkg1", [[7, [["x", "a", 0, 42, {}]], False, False]]]),  # bad state
        msgpack.packb(["other", []]),
        b"\xc1" * 100,
    ]
    for data in bad:
        c.net.inject("evil", "n0", data)
    m.on_message("evil", "not bytes")  # type: ignore[arg-type]
    c.run(2.0)
    assert m.stats["bad_packets"] == len(bad) + 1
    assert c.converged()
    for data in bad:
        with pytest.raises(ProtocolError):
            decode(data)


def test_codec_round_trips_every_message():
    msgs = [Ping(1, "a"), Alive("a", 3, "tcp://h:1", {"free": {"dram": 5}}), Suspect("b", 2, "a")]
    assert decode(encode(msgs)) == msgs


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="probe_timeout"):
        ClusterConfig(probe_interval=0.5, probe_timeout=0.6).validate()
    with pytest.raises(ConfigError, match="cluster.meta"):
        Membership("x", {"blob": "y" * 5000}, ClusterConfig(), lambda: 0.0,
                   SimNetwork(random.Random(0)).transport("x"), random.Random(0))  # fmt: skip


def test_dead_members_are_forgotten_after_dead_reclaim(cluster):
    c = cluster(ClusterConfig(dead_reclaim=5.0)).start(5)
    c.net.kill("n2")
    c.run(40.0)
    assert all("n2" not in m.members for name, m in c.m.items() if name != "n2")
    assert all(len(m.alive_members()) == 4 for name, m in c.m.items() if name != "n2")
