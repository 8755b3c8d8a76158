"""Gossip transports: the seam between `Membership` (pure logic) and the network.

Owns moving encoded packets between member addresses: `ZmqTransport` over real ZeroMQ sockets with
optional CURVE authentication (the in-process stand-in for tests is `simnet.SimNetwork`). Delivery is best effort, UDP-like:
a packet to a dead or slow peer is dropped, never queued without bound and never blocking.
Must not interpret messages beyond encode/decode: protocol decisions live in `membership`.
"""

from __future__ import annotations

import abc
import collections
import logging
from typing import Any

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
        max_peers: int = 512,
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
        endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        if advertise_host and not advertise:  # keep the port actually bound (port 0 = ephemeral)
            port = endpoint.rsplit(":", 1)[1]
            host = f"[{advertise_host}]" if ":" in advertise_host else advertise_host
            advertise = f"tcp://{host}:{port}"
        self._address = advertise or endpoint
        # one DEALER per destination, least recently used first: a sender address is whatever a packet
        # claims, so the count is bounded (each socket is a descriptor and reconnects forever)
        self._peers: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.max_peers = max_peers
        self.dropped = 0

    @property
    def address(self) -> str:
        return self._address

    @property
    def peer_sockets(self) -> int:
        """Sockets open to destinations now: at most `max_peers`, whatever addresses packets claim."""
        return len(self._peers)

    def _peer(self, dst: str) -> Any:
        sock = self._peers.get(dst)
        if sock is not None:
            self._peers.move_to_end(dst)
        else:
            while len(self._peers) >= self.max_peers:
                self._peers.popitem(last=False)[1].close(linger=0)
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
