"""`polarkvd sim gossip`: the real membership code on a simulated network with a fake clock.

Owns the scenario (bootstrap N members through seeds, add one, kill one, watch) and its report:
`join_s` (a new member known alive to every member), `detect_s` (a killed member declared dead by
every live member) and `false_deaths` (DEAD declarations about members that never died), all in
simulated seconds. Must not change protocol behaviour: it only drives `Membership` through
`SimNetwork`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

from polarkvd.bench.harness import table
from polarkvd.cluster.membership import ClusterConfig, EventKind, Membership, State
from polarkvd.cluster.simnet import SimNetwork
from polarkvd.progress import Progress

#: Targets for a 64-member cluster at 5% loss, in simulated seconds (docs/CLUSTER.md).
BAR_JOIN_S = 10.0
BAR_DETECT_S = 10.0


class GossipSim:
    def __init__(self, nodes: int, loss: float, seed: int, config: ClusterConfig | None = None) -> None:
        self.rng = random.Random(seed)
        self.net = SimNetwork(self.rng, loss=loss)
        self.config = config or ClusterConfig()
        self.members: dict[str, Membership] = {}
        self.killed: set[str] = set()
        self.false_deaths = 0
        self.n = nodes

    def add(self, name: str, seeds: list[str]) -> Membership:
        m = Membership(
            name,
            {"endpoints": {"gossip": name}, "dmp_free": 1 << 30, "load": 0.0},
            self.config,
            self.net.clock,
            self.net.transport(name),
            random.Random(self.rng.getrandbits(64)),
        )
        self.members[name] = m
        self.net.add(name, m)
        m.join(seeds)
        self.net.wake(name)
        return m

    def kill(self, name: str) -> None:
        self.killed.add(name)
        self.net.kill(name)

    def live(self) -> list[Membership]:
        return [m for n, m in self.members.items() if n not in self.killed]

    def step(self, dt: float) -> None:
        self.net.run_for(dt)
        for m in self.live():
            for ev in m.take_events():
                if ev.kind is EventKind.DEAD and ev.node not in self.killed:
                    self.false_deaths += 1

    def wait(self, cond: Any, limit: float, dt: float = 0.05) -> float | None:
        """Simulated seconds until `cond()` holds (checked every `dt`), or None after `limit`."""
        t0 = self.net.clock.now
        while self.net.clock.now - t0 <= limit:
            if cond():
                return round(self.net.clock.now - t0, 3)
            self.step(dt)
        return None

    def all_know(self, node: str, state: State) -> bool:
        return all(
            m.state_of(node) is state for n, m in self.members.items() if n not in self.killed and n != node
        )

    def converged(self) -> bool:
        live = self.live()
        want = len(live)
        return all(len(m.alive_members()) == want for m in live)

    def bootstrap(self, spread: float = 2.0) -> float | None:
        names = [f"n{i}" for i in range(self.n)]
        self.add(names[0], [])
        for i, name in enumerate(names[1:], 1):
            self.step(spread / self.n)
            seeds = [names[0], names[self.rng.randrange(i)]]
            self.add(name, seeds)
        return self.wait(self.converged, 60.0, 0.25)


def run(nodes: int, loss: float, seed: int, steady: float, quiet: bool) -> dict[str, Any]:
    t_wall = time.perf_counter()
    prog = Progress(4, quiet=quiet)  # a live bar on a terminal, plain lines on stderr otherwise
    sim = GossipSim(nodes, loss, seed)
    prog.step(f"bootstrap {nodes} members through seeds (loss {loss:.0%})")
    boot = sim.bootstrap()
    sim.step(5.0)
    prog.step("join one new member")
    seed_name = sim.rng.choice(list(sim.members))
    sim.add("new", [seed_name])
    join_s = sim.wait(lambda: sim.all_know("new", State.ALIVE), 60.0)
    sim.step(2.0)
    prog.step("kill one member")
    victim = sim.rng.choice([n for n in sim.members if n != "new"])
    sim.kill(victim)
    detect_s = sim.wait(lambda: sim.all_know(victim, State.DEAD), 60.0)
    prog.step(f"watch {steady:.0f} s for false deaths")
    sim.step(steady)
    prog.close()
    stats = {
        k: sum(m.stats[k] for m in sim.members.values()) for k in ("refutes", "suspicions", "bad_packets")
    }
    return {
        "nodes": nodes,
        "loss": loss,
        "seed": seed,
        "bootstrap_s": boot,
        "join_s": join_s,
        "detect_s": detect_s,
        "false_deaths": sim.false_deaths,
        "sim_s": round(sim.net.clock.now, 3),
        "wall_s": round(time.perf_counter() - t_wall, 2),
        "packets": sim.net.sent,
        "dropped": sim.net.dropped,
        **stats,
        "config": {k: v for k, v in vars(sim.config).items()},
        "bars": {
            "join_ok": join_s is not None and join_s <= BAR_JOIN_S,
            "detect_ok": detect_s is not None and detect_s <= BAR_DETECT_S,
            "no_false_deaths": sim.false_deaths == 0,
        },
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=256, help="members to simulate (default 256)")
    p.add_argument("--loss", type=float, default=0.0, help="message loss probability, e.g. 0.05")
    p.add_argument("--seed", type=int, default=1, help="random seed (runs are reproducible)")
    p.add_argument("--steady", type=float, default=30.0, help="simulated seconds to watch for false deaths")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _fmt(v: float | None) -> str:
    return "never" if v is None else f"{v:.2f} s"


def main(args: argparse.Namespace) -> int:
    if args.nodes < 3 or not 0.0 <= args.loss < 1.0 or args.steady < 0:
        print("polarkvd sim gossip: need --nodes >= 3, 0 <= --loss < 1, --steady >= 0", file=sys.stderr)
        return 2
    r = run(args.nodes, args.loss, args.seed, args.steady, quiet=args.json)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        bars = r["bars"]
        rows = [
            ("new member known alive to all", _fmt(r["join_s"]), f"<= {BAR_JOIN_S:.0f} s", "ok" if bars["join_ok"] else "MISS"),
            ("killed member dead for all", _fmt(r["detect_s"]), f"<= {BAR_DETECT_S:.0f} s", "ok" if bars["detect_ok"] else "MISS"),
            ("false deaths", str(r["false_deaths"]), "0", "ok" if bars["no_false_deaths"] else "MISS"),
        ]  # fmt: skip
        print(f"{r['nodes']} members, loss {r['loss']:.0%}, seed {r['seed']}: {r['sim_s']:.0f} simulated s "
              f"in {r['wall_s']:.1f} s wall, {r['packets']} packets ({r['dropped']} dropped)")  # fmt: skip
        print(table(rows, ("simulated", "measured", "bar", "")))
    return 0 if all(r["bars"].values()) else 1
