"""SWIM membership with Lifeguard-style suspicion, as a pure state machine.

Owns the member table (state, incarnation, address, metadata), probing, suspicion, dissemination
(piggybacked deltas with a retransmit limit, plus periodic full-state push-pull), join, leave and
refutation, and admission (an `admit` hook may refuse a member by its metadata, as memberlist's
AliveDelegate). Driven only by `tick(now)` and `on_message(src, data)`; time comes from the injected
clock and randomness from the injected `rng`, so a run is reproducible and tests never sleep.
Must not open sockets, spawn threads or read the wall clock: the transport moves bytes, the caller
(daemon or simulator) owns the loop. Changes reach the caller as `Event`s drained by `take_events()`.

The algorithm follows SWIM (Das et al., 2002) with Lifeguard's suspicion (Dadgar et al., 2018), as
in hashicorp/memberlist: a member that is not acked, directly or through `indirect_checks` helpers,
within a probe interval is *suspected*; the suspicion times out after a period that starts at
`suspicion_max_timeout_mult` x the minimum and shrinks toward the minimum with each independent
confirmation; a suspected member that hears of it refutes by gossiping `alive` with a higher
incarnation. Another process with our node id (a rival) is logged and counted; once it has been
quiet a while, a `RIVAL_GONE` event about ourselves lets the caller repair what it disturbed.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from polarkvd.cluster.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    Message,
    NodeState,
    Ping,
    PushPull,
    State,
    Suspect,
    decode,
    encode,
)
from polarkvd.errors import ConfigError, ProtocolError

if TYPE_CHECKING:
    from polarkvd.cluster.gossip import Transport

log = logging.getLogger(__name__)

__all__ = ["RIVAL_QUIET_PROBES", "ClusterConfig", "Event", "EventKind", "Member", "Membership", "State"]

#: probe intervals without news of a rival (another process with our node id) to call it gone
RIVAL_QUIET_PROBES = 8


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Protocol knobs (seconds). Defaults are tuned for a LAN of up to a few hundred members: with
    256 members a failure is declared by all in ~7 s and a join is known to all in ~2 s (see
    docs/BENCHMARKS.md, "sim gossip"). The `[cluster]` config section will map onto these."""

    probe_interval: float = 0.5  # one probe per interval, round-robin over a shuffled member list
    probe_timeout: float = 0.2  # direct-ack wait before asking helpers (must be < probe_interval)
    indirect_checks: int = 3  # helpers asked to ping a member that missed its direct ack
    suspicion_mult: float = 4.0  # min suspicion = mult * max(1, log10(n)) * probe_interval
    suspicion_max_timeout_mult: float = 6.0  # max suspicion = this * min suspicion
    retransmit_mult: int = 4  # each delta is sent retransmit_mult * ceil(log10(n + 1)) times
    gossip_interval: float = 0.2
    gossip_nodes: int = 3  # fan-out per gossip round
    gossip_to_dead: float = 30.0  # keep gossiping to dead members this long (lets them refute)
    push_pull_interval: float = 30.0  # scaled up with log2(n/32) above 32 members, as memberlist
    max_piggyback: int = 8  # deltas piggybacked on each ping and ack
    max_gossip_msgs: int = 32  # deltas per gossip packet
    max_meta_bytes: int = 1024
    dead_reclaim: float = 0.0  # >0: forget dead/left members after this long; 0 keeps them

    def validate(self) -> None:
        problems: list[tuple[str, object, str]] = []
        for name in ("probe_interval", "probe_timeout", "gossip_interval", "push_pull_interval"):
            if getattr(self, name) <= 0:
                problems.append((f"cluster.{name}", getattr(self, name), "must be > 0"))
        if self.probe_timeout >= self.probe_interval:
            problems.append(("cluster.probe_timeout", self.probe_timeout, "must be < probe_interval"))
        for name in ("indirect_checks", "retransmit_mult", "gossip_nodes", "max_piggyback"):
            if getattr(self, name) < 0 or int(getattr(self, name)) != getattr(self, name):
                problems.append((f"cluster.{name}", getattr(self, name), "must be an integer >= 0"))
        if self.suspicion_mult < 1:
            problems.append(("cluster.suspicion_mult", self.suspicion_mult, "must be >= 1"))
        if self.suspicion_max_timeout_mult < 1:
            problems.append(
                ("cluster.suspicion_max_timeout_mult", self.suspicion_max_timeout_mult, "must be >= 1")
            )
        if problems:
            raise ConfigError(problems)


class EventKind(enum.Enum):
    JOINED = "joined"  # first seen alive, or alive again after dead/left
    UPDATED = "updated"  # metadata or address changed
    SUSPECT = "suspect"
    ALIVE = "alive"  # a suspect refuted
    DEAD = "dead"
    LEFT = "left"  # graceful leave: not a failure
    # about ourselves: another process that spoke for our node id has been quiet for
    # `RIVAL_QUIET_PROBES` probe intervals; what peers hold from "us" may be its (greet them again)
    RIVAL_GONE = "rival_gone"


@dataclasses.dataclass(frozen=True)
class Event:
    kind: EventKind
    node: str
    incarnation: int
    meta: dict[str, Any]
    at: float


@dataclasses.dataclass
class Member:
    node: str
    addr: str
    incarnation: int
    state: State
    meta: dict[str, Any]
    since: float  # when `state` was entered

    def snapshot(self) -> NodeState:
        return NodeState(self.node, self.addr, self.incarnation, self.state, self.meta)


class _Suspicion:
    """Lifeguard's timer: max timeout at start, shrinking on a log scale to the min as `k` distinct
    members confirm. Confirmations from the member that started it, or repeated ones, do not count."""

    def __init__(self, start: float, lo: float, hi: float, k: int, first: str) -> None:
        self.start, self.lo, self.hi, self.k = start, lo, hi, k
        self.seen = {first}
        self.n = 0
        self.deadline = start + (lo if k < 1 else hi)

    def confirm(self, source: str) -> bool:
        if self.k < 1 or self.n >= self.k or source in self.seen:
            return False
        self.seen.add(source)
        self.n += 1
        frac = math.log(self.n + 1) / math.log(self.k + 1)
        self.deadline = self.start + max(self.lo, self.hi - (self.hi - self.lo) * frac)
        return True


@dataclasses.dataclass
class _Probe:
    target: str
    started: float
    indirect_at: float  # when to ask helpers
    fail_at: float
    indirect_sent: bool = False


@dataclasses.dataclass
class _Relay:
    """We ping `target` for a member that asked us (`requester`) and forward the ack."""

    requester_addr: str
    requester_seq: int
    deadline: float


class _Broadcasts:
    """Deltas waiting to be disseminated: one per member (a newer one about the same member
    replaces the older), least-transmitted first, each dropped after `limit` transmissions."""

    def __init__(self) -> None:
        self.items: dict[str, list[Any]] = {}  # node -> [message, transmits, order]
        self._order = 0

    def queue(self, node: str, msg: Message) -> None:
        self._order += 1
        self.items[node] = [msg, 0, self._order]

    def take(self, n: int, limit: int) -> list[Message]:
        if not self.items or n <= 0:
            return []
        # fewest transmissions first, then newest: fresh news spreads fastest
        picked = sorted(self.items.items(), key=lambda kv: (kv[1][1], -kv[1][2]))[:n]
        out = []
        for node, item in picked:
            out.append(item[0])
            item[1] += 1
            if item[1] >= limit:
                del self.items[node]
        return out

    def __len__(self) -> int:
        return len(self.items)


class Membership:
    """One member's view of the cluster. Not thread-safe: call from one loop."""

    def __init__(
        self,
        node_id: str,
        meta: dict[str, Any],
        config: ClusterConfig,
        clock: Callable[[], float],
        transport: Transport,
        rng: random.Random,
        delegate: Callable[[Event], None] | None = None,
        admit: Callable[[str, dict[str, Any]], str | None] | None = None,
    ) -> None:
        """`admit(node, meta)`: None admits a member, a reason refuses it. A refused member is never
        added (or, known already, is recorded as left) and its news is not passed on; the hook is
        asked for every `alive` of another member, so it should log a refusal once, not each time."""
        config.validate()
        self.node_id = node_id
        self.config = config
        self._clock = clock
        self.transport = transport
        self.rng = rng
        self._delegate = delegate
        self._admit = admit
        self._check_meta(meta)
        now = clock()
        self.members: dict[str, Member] = {
            node_id: Member(node_id, transport.address, 0, State.ALIVE, dict(meta), now)
        }
        self._ids: list[str] = [node_id]  # every node id in `members`, for O(1) random picks
        self._events: list[Event] = []
        self._bcast = _Broadcasts()
        self._seq = 0
        self._probes: dict[int, _Probe] = {}
        self._relays: dict[int, _Relay] = {}
        self._suspicions: dict[str, _Suspicion] = {}
        self._probe_order: list[str] = []
        self._probe_idx = 0
        self._n_alive = 1  # alive + suspect members, us included; kept up to date on transitions
        self._next_probe = now + rng.random() * config.probe_interval
        self._next_gossip = now + rng.random() * config.gossip_interval
        self._next_push_pull = now + self._push_pull_period()
        self._seeds: list[str] = []
        self._leaving = False
        self._stopped = False
        # gossip address -> the incarnation we out-voted it with (another address speaking for our id)
        self._rivals: dict[str, int] = {}
        self._rivals_logged: set[str] = set()
        # when a rival last out-voted us, or we refuted anything soon after (None: RIVAL_GONE is not due)
        self._rival_at: float | None = None
        self._rival_seen = -math.inf  # when a rival last out-voted us
        #: counters, read as deltas by metrics
        self.stats: dict[str, int] = {
            "packets_in": 0,
            "packets_out": 0,
            "bad_packets": 0,
            "probes": 0,
            "indirect_probes": 0,
            "refutes": 0,
            "suspicions": 0,
            "push_pulls": 0,
            "refused": 0,  # `alive` messages of members the admit hook refused
            "id_conflicts": 0,  # another live process gossips with our node id (from another address)
        }

    # ------------------------------------------------------------------------------ public API

    @property
    def incarnation(self) -> int:
        return self.members[self.node_id].incarnation

    @property
    def meta(self) -> dict[str, Any]:
        return self.members[self.node_id].meta

    def join(self, seeds: list[str]) -> None:
        """Full-state push-pull with every seed address; their replies fill our table. Retried
        every probe interval while we know no other live member."""
        self._seeds = [a for a in seeds if a != self.transport.address]
        self._send_join()
        self._broadcast_alive()

    def _send_join(self) -> None:
        msg = PushPull(self._snapshot(), join=True, reply=False)
        for addr in self._seeds:
            self._send(addr, [msg])

    def leave(self) -> None:
        """Announce a graceful leave: others record LEFT (not DEAD). Keep calling `tick` for a few
        gossip intervals so the news goes out, then `stop()`."""
        me = self.members[self.node_id]
        self._leaving = True
        me.state = State.LEFT
        msg = Dead(self.node_id, me.incarnation, self.node_id)
        self._bcast.queue(self.node_id, msg)
        # send it straight to a few members too: a leave should not wait for a gossip round
        for m in self._gossip_targets(self.config.gossip_nodes):
            self._send(m.addr, [msg])

    def stop(self) -> None:
        self._stopped = True

    def update_meta(self, meta: dict[str, Any]) -> None:
        """Publish new metadata: bumps our incarnation so the new `alive` supersedes the old."""
        self._check_meta(meta)
        me = self.members[self.node_id]
        me.meta = dict(meta)
        me.incarnation += 1
        self._broadcast_alive()

    def take_events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def alive_members(self) -> list[Member]:
        return [m for m in self.members.values() if m.state in (State.ALIVE, State.SUSPECT)]

    def state_of(self, node: str) -> State | None:
        m = self.members.get(node)
        return m.state if m else None

    def next_deadline(self) -> float:
        """The earliest time `tick` has work to do (the caller may sleep until then)."""
        if self._stopped:
            return math.inf
        t = min(self._next_probe, self._next_gossip, self._next_push_pull)
        for p in self._probes.values():
            t = min(t, p.fail_at if p.indirect_sent else p.indirect_at)
        for r in self._relays.values():
            t = min(t, r.deadline)
        for s in self._suspicions.values():
            t = min(t, s.deadline)
        if self._rival_at is not None:
            t = min(t, self._rival_gone_at(self._rival_at))
        return t

    # ----------------------------------------------------------------------------------- timers

    def tick(self, now: float) -> None:
        if self._stopped:
            return
        self._check_probes(now)
        for rseq in [s for s, r in self._relays.items() if r.deadline <= now]:
            del self._relays[rseq]
        for node in [n for n, s in self._suspicions.items() if s.deadline <= now]:
            self._suspicion_expired(node, now)
        if self._rival_at is not None and now >= self._rival_gone_at(self._rival_at):
            self._rival_at = None
            log.warning(
                "%s: no other process has spoken for our node id for %d probe intervals: asking the "
                "members to take our pages again",
                self.node_id,
                RIVAL_QUIET_PROBES,
            )
            self._emit(EventKind.RIVAL_GONE, self.members[self.node_id], now)
        if now >= self._next_probe:
            self._next_probe = now + self.config.probe_interval
            if not self._leaving:
                self._probe(now)
        if now >= self._next_gossip:
            self._next_gossip = now + self.config.gossip_interval
            self._gossip(now)
        if now >= self._next_push_pull:
            self._next_push_pull = now + self._push_pull_period()
            if not self._leaving:
                self._push_pull()
        if self.config.dead_reclaim > 0:
            gone = [
                m.node
                for m in self.members.values()
                if m.state in (State.DEAD, State.LEFT) and now - m.since > self.config.dead_reclaim
            ]
            if gone:
                for node in gone:
                    del self.members[node]
                self._ids = list(self.members)

    def _probe(self, now: float) -> None:
        target = self._next_probe_target()
        if target is None:
            # alone: the seeds were down or the join was lost; keep knocking, once per interval
            self._send_join()
            return
        self._seq += 1
        cfg = self.config
        self._probes[self._seq] = _Probe(target.node, now, now + cfg.probe_timeout, now + cfg.probe_interval)
        self.stats["probes"] += 1
        self._send(target.addr, [Ping(self._seq, target.node), *self._piggyback()])

    def _next_probe_target(self) -> Member | None:
        for _ in range(2):
            while self._probe_idx < len(self._probe_order):
                node = self._probe_order[self._probe_idx]
                self._probe_idx += 1
                m = self.members.get(node)
                if m is not None and m.state in (State.ALIVE, State.SUSPECT):
                    return m
            # wrapped: reshuffle, as SWIM's round-robin with random order bounds detection time
            self._probe_order = [n for n in self.members if n != self.node_id]
            self.rng.shuffle(self._probe_order)
            self._probe_idx = 0
        return None

    def _check_probes(self, now: float) -> None:
        for seq, p in list(self._probes.items()):
            if not p.indirect_sent and now >= p.indirect_at:
                p.indirect_sent = True
                self._send_indirect(seq, p)
            if now >= p.fail_at:
                del self._probes[seq]
                m = self.members.get(p.target)
                if m is not None and m.state in (State.ALIVE, State.SUSPECT):
                    log.debug("%s: probe of %s failed", self.node_id, p.target)
                    self._on_suspect(Suspect(m.node, m.incarnation, self.node_id), now)

    def _send_indirect(self, seq: int, p: _Probe) -> None:
        target = self.members.get(p.target)
        if target is None:
            return
        helpers = [
            m
            for m in self.members.values()
            if m.state is State.ALIVE and m.node not in (self.node_id, p.target)
        ]
        k = min(self.config.indirect_checks, len(helpers))
        for h in self.rng.sample(helpers, k):
            self.stats["indirect_probes"] += 1
            self._send(h.addr, [IndirectPing(seq, target.node, target.addr)])

    def _suspicion_expired(self, node: str, now: float) -> None:
        del self._suspicions[node]
        m = self.members.get(node)
        if m is None or m.state is not State.SUSPECT:
            return
        log.info("%s: suspicion of %s timed out: dead", self.node_id, node)
        self._on_dead(Dead(node, m.incarnation, self.node_id), now)

    def _gossip(self, now: float) -> None:
        if not self._bcast:
            return
        for m in self._gossip_targets(self.config.gossip_nodes, now):
            msgs = self._bcast.take(self.config.max_gossip_msgs, self._retransmit_limit())
            if not msgs:
                return
            self._send(m.addr, msgs)

    def _gossip_targets(self, k: int, now: float | None = None) -> list[Member]:
        now = self._clock() if now is None else now
        ids = self._ids
        out: list[Member] = []
        if not ids or k <= 0:
            return out

        def eligible(m: Member | None) -> bool:
            return (
                m is not None
                and m.node != self.node_id
                and m not in out
                and (
                    m.state in (State.ALIVE, State.SUSPECT)
                    or (m.state is State.DEAD and now - m.since < self.config.gossip_to_dead)
                )
            )

        # random draws first (O(k) in the common case of a mostly-alive table), then a full
        # scan only when the table is mostly ineligible
        for _ in range(4 * k):
            m = self.members.get(ids[int(self.rng.random() * len(ids))])
            if eligible(m):
                out.append(m)  # type: ignore[arg-type]
                if len(out) == k:
                    return out
        rest = [m for m in self.members.values() if eligible(m)]
        return out + self.rng.sample(rest, min(k - len(out), len(rest)))

    def _push_pull(self) -> None:
        # dead members are candidates too: after a partition heals, a push-pull to the "dead"
        # side tells each side it was declared dead, they refute, and the views merge again
        cands = [
            m
            for m in self.members.values()
            if m.node != self.node_id and m.state in (State.ALIVE, State.DEAD)
        ]
        if not cands:
            return
        peer = self.rng.choice(cands)
        self.stats["push_pulls"] += 1
        self._send(peer.addr, [PushPull(self._snapshot(), join=False, reply=False)])

    # --------------------------------------------------------------------------------- receive

    def on_message(self, src: str, data: bytes | list[Message]) -> None:
        """Handle one packet from address `src`. Bad packets are counted and dropped, never raised."""
        if self._stopped:
            return
        self.stats["packets_in"] += 1
        if isinstance(data, list):
            msgs = data
        else:
            try:
                msgs = decode(data)
            except ProtocolError as e:
                self.stats["bad_packets"] += 1
                log.debug("%s: dropped a bad packet from %s: %s", self.node_id, src, e)
                return
        now = self._clock()
        for msg in msgs:
            try:
                self._handle(src, msg, now)
            except Exception:  # a peer's message must never take the node down
                self.stats["bad_packets"] += 1
                log.exception("%s: error handling %r from %s", self.node_id, msg, src)

    def _handle(self, src: str, msg: Message, now: float) -> None:
        t = type(msg)
        if t is Ping:
            assert isinstance(msg, Ping)
            if msg.target == self.node_id and not self._leaving:
                self._send(src, [Ack(msg.seq), *self._piggyback()])
        elif t is Ack:
            assert isinstance(msg, Ack)
            if self._probes.pop(msg.seq, None) is None:
                relay = self._relays.pop(msg.seq, None)
                if relay is not None:
                    self._send(relay.requester_addr, [Ack(relay.requester_seq)])
        elif t is IndirectPing:
            assert isinstance(msg, IndirectPing)
            self._seq += 1
            self._relays[self._seq] = _Relay(src, msg.seq, now + self.config.probe_interval)
            self._send(msg.target_addr, [Ping(self._seq, msg.target)])
        elif t is Alive:
            assert isinstance(msg, Alive)
            self._on_alive(msg, now)
        elif t is Suspect:
            assert isinstance(msg, Suspect)
            self._on_suspect(msg, now)
        elif t is Dead:
            assert isinstance(msg, Dead)
            self._on_dead(msg, now)
        elif t is PushPull:
            assert isinstance(msg, PushPull)
            # merge first: a refutation it triggers (we were "dead" over there) rides on the reply
            self._merge(msg.states, now)
            if not msg.reply:
                self._send(src, [PushPull(self._snapshot(), join=False, reply=True)])

    def _merge(self, states: tuple[NodeState, ...], now: float) -> None:
        for s in states:
            if s.state is State.ALIVE:
                self._on_alive(Alive(s.node, s.incarnation, s.addr, s.meta), now)
            elif s.state is State.LEFT:
                self._on_dead(Dead(s.node, s.incarnation, s.node), now)
            else:
                # a remote "dead" becomes our suspicion: the member gets a chance to refute
                self._on_suspect(Suspect(s.node, s.incarnation, self.node_id), now)

    # -------------------------------------------------------------------------- state changes

    def _on_alive(self, msg: Alive, now: float) -> None:
        if msg.node == self.node_id:
            me = self.members[self.node_id]
            if msg.incarnation > me.incarnation or (
                msg.incarnation == me.incarnation and (msg.meta != me.meta or msg.addr != me.addr)
            ):
                # an older life of ours (we restarted), or an impostor: out-vote it
                if msg.addr != me.addr:
                    self._rival(msg.addr, msg.incarnation, now)
                self._refute(msg.incarnation)
            return
        m = self.members.get(msg.node)
        if self._admit is not None and self._admit(msg.node, msg.meta) is not None:
            self.stats["refused"] += 1
            if m is not None and msg.incarnation > m.incarnation:
                self._refused(m, msg.incarnation, now)
            return
        if m is None:
            if len(msg.meta) and not self._meta_ok(msg.meta):
                return
            m = Member(msg.node, msg.addr, msg.incarnation, State.ALIVE, msg.meta, now)
            self.members[msg.node] = m
            self._ids.append(msg.node)
            self._n_alive += 1
            self._bcast.queue(msg.node, msg)
            self._emit(EventKind.JOINED, m, now)
            return
        if msg.incarnation <= m.incarnation:
            return
        was = m.state
        changed = msg.meta != m.meta or msg.addr != m.addr
        m.incarnation, m.addr, m.meta = msg.incarnation, msg.addr, msg.meta
        self._suspicions.pop(m.node, None)
        if was is not State.ALIVE:
            m.state, m.since = State.ALIVE, now
            if was is not State.SUSPECT:
                self._n_alive += 1
        self._bcast.queue(msg.node, msg)
        if was in (State.DEAD, State.LEFT):
            self._emit(EventKind.JOINED, m, now)
        elif was is State.SUSPECT:
            self._emit(EventKind.ALIVE, m, now)
            if changed:
                self._emit(EventKind.UPDATED, m, now)
        elif changed:
            self._emit(EventKind.UPDATED, m, now)

    def _accused(self, node: str, incarnation: int) -> Member | None:
        """The member a suspect or dead message is about, when it still applies: None when the member
        is unknown, the news is older than what we know, it is gone already, or it is about us (then
        we refute it, unless we are leaving)."""
        m = self.members.get(node)
        if m is None or incarnation < m.incarnation:
            return None
        if node == self.node_id:
            if not self._leaving:
                self._refute(incarnation)
            return None
        if m.state in (State.DEAD, State.LEFT):
            return None
        return m

    def _on_suspect(self, msg: Suspect, now: float) -> None:
        m = self._accused(msg.node, msg.incarnation)
        if m is None:
            return
        if m.state is State.SUSPECT:
            m.incarnation = msg.incarnation  # >= ours: a suspicion of a newer life is the same suspicion
            s = self._suspicions.get(m.node)
            if s is not None and s.confirm(msg.source):
                self._bcast.queue(m.node, msg)  # pass the confirmation on
            return
        m.state, m.incarnation, m.since = State.SUSPECT, msg.incarnation, now
        self.stats["suspicions"] += 1
        cfg = self.config
        n = self._n_alive
        lo = cfg.suspicion_mult * max(1.0, math.log10(max(1, n))) * cfg.probe_interval
        hi = cfg.suspicion_max_timeout_mult * lo
        k = int(cfg.suspicion_mult) - 2
        if n - 2 < k:  # too few members to expect confirmations: go straight to the minimum
            k = 0
        self._suspicions[m.node] = _Suspicion(now, lo, hi, k, msg.source)
        self._bcast.queue(m.node, msg)
        self._emit(EventKind.SUSPECT, m, now)

    def _on_dead(self, msg: Dead, now: float) -> None:
        m = self._accused(msg.node, msg.incarnation)
        if m is None:
            return
        left = msg.source == msg.node
        m.state = State.LEFT if left else State.DEAD
        m.incarnation, m.since = msg.incarnation, now
        self._suspicions.pop(m.node, None)
        self._n_alive -= 1
        self._bcast.queue(m.node, msg)
        self._emit(EventKind.LEFT if left else EventKind.DEAD, m, now)

    def _refused(self, m: Member, incarnation: int, now: float) -> None:
        """A known member came back in a life we refuse (its metadata changed): it has left."""
        m.incarnation = incarnation
        if m.state in (State.DEAD, State.LEFT):
            return
        m.state, m.since = State.LEFT, now
        self._suspicions.pop(m.node, None)
        self._n_alive -= 1
        self._emit(EventKind.LEFT, m, now)

    def _rival(self, addr: str, incarnation: int, now: float) -> None:
        """Another address speaks for our node id. Once is an older life of ours (a restart on another
        address); again, above the incarnation we out-voted it with, is a live process configured with
        our `cluster.node_id`: the two out-vote each other for ever and peers reach either. Logged once
        per address, counted every time. Either way, once no rival has been heard of for
        `RIVAL_QUIET_PROBES` probe intervals (and we refuted nothing meanwhile), a `RIVAL_GONE` event
        about ourselves tells the caller that peers may have taken the rival's word for ours (its
        meta-map greeting dropped our records). While both run, a twin that peers do not reach hears
        of the other only at push-pulls: each may get RIVAL_GONE once per push-pull interval or so."""
        self._rival_at = self._rival_seen = now
        before = self._rivals.get(addr)
        if len(self._rivals) >= 64 and before is None:
            self._rivals.clear()  # bounded; only costs noticing a rival one refutation later
        self._rivals[addr] = max(incarnation, self.members[self.node_id].incarnation) + 1
        if before is None or incarnation < before:
            return
        self.stats["id_conflicts"] += 1
        if addr not in self._rivals_logged and len(self._rivals_logged) < 64:
            self._rivals_logged.add(addr)
            log.error(
                "%s: another member at %s uses our node id %r (it out-voted our incarnation %d); every "
                "member needs its own cluster.node_id, and until one of the two stops, peers reach either",
                self.node_id,
                addr,
                self.node_id,
                before,
            )

    def _rival_gone_at(self, last: float) -> float:
        return last + RIVAL_QUIET_PROBES * self.config.probe_interval

    def _refute(self, incarnation: int) -> None:
        now = self._clock()
        if now - self._rival_seen < 2 * self._push_pull_period():
            # a rival was about lately: peers that took its address for ours take ours again (they
            # suspected us there, or it out-voted us and we out-vote it back; a losing twin hears of
            # the other only at push-pulls): quiet is counted from now
            self._rival_at = now
        me = self.members[self.node_id]
        me.incarnation = max(me.incarnation, incarnation) + 1
        self.stats["refutes"] += 1
        log.info("%s: refuting, incarnation now %d", self.node_id, me.incarnation)
        self._broadcast_alive()

    # --------------------------------------------------------------------------------- helpers

    def _broadcast_alive(self) -> None:
        me = self.members[self.node_id]
        self._bcast.queue(self.node_id, Alive(self.node_id, me.incarnation, me.addr, me.meta))

    def _snapshot(self) -> tuple[NodeState, ...]:
        return tuple(m.snapshot() for m in self.members.values())

    def _piggyback(self) -> list[Message]:
        return self._bcast.take(self.config.max_piggyback, self._retransmit_limit())

    def _retransmit_limit(self) -> int:
        return self.config.retransmit_mult * max(1, math.ceil(math.log10(self._n_alive + 1)))

    def _push_pull_period(self) -> float:
        # as memberlist's pushPullScale: fewer full syncs per member as the cluster grows
        n = self._n_alive
        scale = 1.0 + max(0.0, math.ceil(math.log2(n) - math.log2(32))) if n > 32 else 1.0
        return self.config.push_pull_interval * scale

    def _send(self, addr: str, msgs: list[Message]) -> None:
        self.stats["packets_out"] += 1
        self.transport.send(addr, msgs)

    def _emit(self, kind: EventKind, m: Member, now: float) -> None:
        ev = Event(kind, m.node, m.incarnation, m.meta, now)
        self._events.append(ev)
        if self._delegate is not None:
            self._delegate(ev)

    def _check_meta(self, meta: dict[str, Any]) -> None:
        if not self._meta_ok(meta):
            raise ConfigError(
                [("cluster.meta", meta, f"must encode to <= {self.config.max_meta_bytes} bytes")]
            )

    def _meta_ok(self, meta: dict[str, Any]) -> bool:
        try:
            return len(encode([Alive("", 0, "", meta)])) <= self.config.max_meta_bytes + 32
        except Exception:
            return False
