"""Gossip transports: the seam between `Membership` (pure logic) and the network.

Owns moving encoded packets between member addresses: `SimNetwork` in process, with a simulated
clock, latency, per-link loss and partitions (tests and `polarkvd sim gossip`), and `ZmqTransport`
over real ZeroMQ sockets with optional CURVE authentication. Delivery is best effort, UDP-like:
a packet to a dead or slow peer is dropped, never queued without bound and never blocking.
Must not interpret messages beyond encode/decode: protocol decisions live in `membership`.
"""

from __future__ import annotations

import abc
import heapq
import logging
import math
import random
from collections.abc import Iterable
from typing import Any, Protocol

from polarkvd.cluster.auth import CurveKeys
from polarkvd.cluster.messages import Message, encode

log = logging.getLogger(__name__)


class Transport(abc.ABC):
    """Best-effort packet delivery to member addresses."""

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """The address other members send to (what gossip advertises for us)."""

    @abc.abstractmethod
    def send(self, dst: str, msgs: list[Message]) -> None:
        """Encode and send one packet; drop it silently when it cannot go now."""


class Node(Protocol):
    """What the simulated network drives: a `Membership` fits."""

    def tick(self, now: float) -> None: ...
    def on_message(self, src: str, data: Any) -> None: ...
    def next_deadline(self) -> float: ...


# ------------------------------------------------------------------------------ simulated network


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


# --------------------------------------------------------------------------------- ZeroMQ


class ZmqTransport(Transport):
    """Gossip over ZeroMQ TCP: one ROUTER bound for receiving, one DEALER per peer for sending.

    Each packet is two frames: the sender's advertised address, then the encoded messages. Sends
    never block (`NOBLOCK`, small high-water mark): a full queue to a dead peer drops the packet,
    as UDP would. With `curve`, the ROUTER is a CURVE server and a ZAP handler admits only clients
    that prove they hold the cluster's secret key, so a process without it can neither join nor
    inject membership.
    """

    def __init__(
        self,
        bind: str,
        *,
        advertise: str | None = None,
        advertise_host: str | None = None,
        curve: CurveKeys | None = None,
        hwm: int = 64,
        context: Any = None,
    ) -> None:
        import zmq

        self._zmq = zmq
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self.curve = curve
        self.hwm = hwm
        self._auth = None
        if curve is not None:
            from zmq.auth.thread import ThreadAuthenticator

            allowed = curve.public

            class _OnlyClusterKey:
                def callback(self, domain: str, key: bytes) -> bool:  # key: z85, as pyzmq passes it
                    return bool(key == allowed)

            self._auth = ThreadAuthenticator(self.ctx)
            self._auth.start()
            self._auth.configure_curve_callback(domain="*", credentials_provider=_OnlyClusterKey())
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.RCVHWM, 4 * hwm)
        if curve is not None:
            self.router.curve_server = True
            self.router.curve_publickey = curve.public
            self.router.curve_secretkey = curve.secret
        self.router.bind(bind)
        endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        if advertise_host and not advertise:  # keep the port actually bound (port 0 = ephemeral)
            port = endpoint.rsplit(":", 1)[1]
            host = f"[{advertise_host}]" if ":" in advertise_host else advertise_host
            advertise = f"tcp://{host}:{port}"
        self._address = advertise or endpoint
        self._peers: dict[str, Any] = {}
        self.dropped = 0

    @property
    def address(self) -> str:
        return self._address

    def _peer(self, dst: str) -> Any:
        sock = self._peers.get(dst)
        if sock is None:
            zmq = self._zmq
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, self.hwm)
            if self.curve is not None:
                sock.curve_publickey = self.curve.public
                sock.curve_secretkey = self.curve.secret
                sock.curve_serverkey = self.curve.public
            sock.connect(dst)
            self._peers[dst] = sock
        return sock

    def send(self, dst: str, msgs: list[Message]) -> None:
        if not dst.startswith(("tcp://", "ipc://", "inproc://")):
            self.dropped += 1
            return
        try:
            self._peer(dst).send_multipart([self._address.encode(), encode(msgs)], flags=self._zmq.NOBLOCK)
        except self._zmq.Again:
            self.dropped += 1

    def forget(self, dst: str) -> None:
        """Close the socket to a peer that is gone (dead or left), so reconnects stop."""
        sock = self._peers.pop(dst, None)
        if sock is not None:
            sock.close(linger=0)

    def recv(self, timeout_ms: int = 0) -> list[tuple[str, bytes]]:
        """Every packet waiting now (or within `timeout_ms`), as (sender address, bytes).
        Malformed envelopes come back with sender "?" so the membership counts them as bad."""
        zmq = self._zmq
        out: list[tuple[str, bytes]] = []
        if not self.router.poll(timeout_ms, zmq.POLLIN):
            return out
        while True:
            try:
                frames = self.router.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return out
            if len(frames) != 3:
                out.append(("?", b""))
                continue
            try:
                src = frames[1].decode()
            except UnicodeDecodeError:
                src = "?"
            out.append((src, frames[2]))

    def close(self) -> None:
        for sock in self._peers.values():
            sock.close(linger=0)
        self._peers.clear()
        self.router.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        if self._own_ctx:
            self.ctx.term()
