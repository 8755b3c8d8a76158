"""A simulated gossip network for tests and `polarkvd sim gossip`: never used by a running daemon.

Owns `SimNetwork`: one heap of timed deliveries and node ticks on a `ManualClock`, with latency,
per-link loss and partitions, so `Membership` (pure logic) runs thousands of members in one process.
Kept out of `gossip.py`, which holds only what a daemon runs.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable
from typing import Any, Protocol

from polarkvd.cluster.gossip import Transport
from polarkvd.cluster.messages import Message, encode


class Node(Protocol):
    """What the simulated network drives: a `Membership` fits."""

    def tick(self, now: float) -> None: ...
    def on_message(self, src: str, data: Any) -> None: ...
    def next_deadline(self) -> float: ...


class ManualClock:
    """A clock that moves only when told to: `clock()` reads it."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class SimTransport(Transport):
    def __init__(self, net: SimNetwork, addr: str) -> None:
        self._net, self._addr = net, addr

    @property
    def address(self) -> str:
        return self._addr

    def send(self, dst: str, msgs: list[Message]) -> None:
        self._net.send(self._addr, dst, msgs)


_DELIVER, _TICK = 0, 1


class SimNetwork:
    """Discrete-event network: one heap of timed deliveries and node ticks, one simulated clock.

    `encode=True` sends real msgpack bytes (exercises the codec); `False` passes the message
    objects through, which is faster and otherwise identical.
    """

    def __init__(
        self,
        rng: random.Random,
        *,
        latency: float = 0.002,
        jitter: float = 0.001,
        loss: float = 0.0,
        encode: bool = True,
        clock: ManualClock | None = None,
    ) -> None:
        self.rng = rng
        self.clock = clock or ManualClock()
        self.latency, self.jitter, self.loss, self.encode = latency, jitter, loss, encode
        self.nodes: dict[str, Node] = {}
        self.link_loss: dict[tuple[str, str], float] = {}
        self._group: dict[str, int] = {}
        self._heap: list[tuple[float, int, int, str, str, Any]] = []
        self._seq = 0
        self._tick_at: dict[str, float] = {}
        self.sent = self.dropped = self.delivered = 0

    def transport(self, addr: str) -> SimTransport:
        return SimTransport(self, addr)

    def add(self, addr: str, node: Node) -> None:
        self.nodes[addr] = node
        self._tick_at[addr] = math.inf
        self.wake(addr)

    def kill(self, addr: str) -> None:
        """The process dies: it stops ticking and packets to it vanish."""
        self.nodes.pop(addr, None)
        self._tick_at.pop(addr, None)

    # faults
    def set_link_loss(self, a: str, b: str, p: float) -> None:
        """Loss probability on the a<->b link (both directions), overriding the default."""
        self.link_loss[(a, b)] = self.link_loss[(b, a)] = p

    def partition(self, *groups: Iterable[str]) -> None:
        """Only members of the same group can talk; members in no group talk to everyone."""
        self._group = {a: i for i, g in enumerate(groups) for a in g}

    def heal(self) -> None:
        self._group = {}

    def _blocked(self, src: str, dst: str) -> bool:
        gs, gd = self._group.get(src), self._group.get(dst)
        return gs is not None and gd is not None and gs != gd

    def send(self, src: str, dst: str, msgs: list[Message]) -> None:
        self.sent += 1
        p = self.link_loss.get((src, dst), self.loss)
        if self._blocked(src, dst) or (p > 0 and self.rng.random() < p):
            self.dropped += 1
            return
        data: Any = encode(msgs) if self.encode else list(msgs)
        at = self.clock.now + self.latency + (self.rng.random() * self.jitter if self.jitter else 0.0)
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, _DELIVER, src, dst, data))

    def inject(self, src: str, dst: str, data: bytes) -> None:
        """Deliver raw bytes (garbage, foreign packets) as if `src` had sent them."""
        self._seq += 1
        heapq.heappush(self._heap, (self.clock.now, self._seq, _DELIVER, src, dst, data))

    def wake(self, addr: str) -> None:
        """Re-read a node's next deadline (after the caller poked it: join, leave, update_meta)."""
        node = self.nodes.get(addr)
        if node is None:
            return
        t = max(node.next_deadline(), self.clock.now)
        if t < self._tick_at[addr]:
            self._tick_at[addr] = t
            self._seq += 1
            heapq.heappush(self._heap, (t, self._seq, _TICK, addr, addr, None))

    def run_until(self, t_end: float) -> None:
        for addr in self.nodes:
            self.wake(addr)
        heap, clock = self._heap, self.clock
        while heap and heap[0][0] <= t_end:
            at, _, kind, src, dst, data = heapq.heappop(heap)
            clock.now = max(clock.now, at)
            node = self.nodes.get(dst)
            if node is None:
                continue
            if kind == _DELIVER:
                if self._blocked(src, dst):
                    self.dropped += 1
                    continue
                self.delivered += 1
                node.on_message(src, data)
            else:
                if self._tick_at.get(dst) != at:
                    continue  # superseded by an earlier wake-up
                self._tick_at[dst] = math.inf
                node.tick(clock.now)
            self.wake(dst)
        clock.now = max(clock.now, t_end)

    def run_for(self, dt: float) -> None:
        self.run_until(self.clock.now + dt)
