"""The simulator runs the real membership code and meets its join and detection targets at 64 members, 5% loss."""

from __future__ import annotations

import json

import pytest

from polarkvd.bench.gossip_sim import BAR_DETECT_S, BAR_JOIN_S, GossipSim, run
from polarkvd.cli import main
from polarkvd.cluster.membership import ClusterConfig


@pytest.mark.parametrize("seed", [1, 2])
def test_64_members_with_5pct_loss_meet_the_bars(seed):
    r = run(64, 0.05, seed, steady=30.0, quiet=True)
    assert r["false_deaths"] == 0
    assert r["join_s"] is not None and r["join_s"] <= BAR_JOIN_S
    assert r["detect_s"] is not None and r["detect_s"] <= BAR_DETECT_S
    assert r["dropped"] > 0  # the loss was real
    assert r["bad_packets"] == 0


def test_cli_json_has_the_documented_keys(capsys):
    rc = main(["sim", "gossip", "--nodes", "16", "--loss", "0.05", "--steady", "5", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert {"join_s", "detect_s", "false_deaths"} <= out.keys()
    assert out["nodes"] == 16


def test_cli_rejects_bad_arguments(capsys):
    assert main(["sim", "gossip", "--nodes", "2"]) == 2
    assert "--nodes" in capsys.readouterr().err


def test_false_deaths_are_counted_when_the_protocol_is_too_hasty():
    # no helpers, the shortest suspicion and heavy loss: live members do get declared dead, and the
    # simulator must see it (so its "0" under the defaults means something)
    hasty = ClusterConfig(indirect_checks=0, suspicion_mult=1, suspicion_max_timeout_mult=1)
    sim = GossipSim(16, 0.4, seed=3, config=hasty)
    sim.bootstrap()
    sim.step(30.0)
    assert sim.false_deaths > 0
