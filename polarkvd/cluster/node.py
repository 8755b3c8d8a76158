"""This daemon as a cluster member: gossip on the event loop, peers' view, and the daemon's report.

Owns running `Membership` over a `ZmqTransport` on the daemon's asyncio loop (woken by the socket or
by the protocol's next deadline), the metadata this daemon publishes (endpoints, tier space, `rdma: 1`
while peers may READ pages from us, the page-key seed's fingerprint), admission (a member with another
seed is refused: its page keys never match ours), the reactions to membership events (forget sockets
of dead members, tell the rest of the cluster code who is alive) and the `cluster` control report
behind `polarkvd status --cluster`. Protocol decisions stay in `membership`; where pages live stays in the
manager and the meta map.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Callable
from typing import Any

from polarkvd import __version__
from polarkvd.cluster.auth import CurveKeys, read_key_file
from polarkvd.cluster.gossip import ZmqTransport
from polarkvd.cluster.membership import ClusterConfig, Event, EventKind, Member, Membership, State
from polarkvd.config import ClusterSection
from polarkvd.config.values import split_address

log = logging.getLogger(__name__)

META_REFRESH_SECONDS = 5.0  # at most this often, and only when what we publish changed noticeably
LEAVE_SECONDS = 0.5  # at shutdown, keep gossiping the leave this long before closing


def tcp_url(host: str, port: int | str) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def advertised_host(bind_host: str, advertise: str) -> str:
    """The host peers should dial: the configured one, the bind host, or this host's address."""
    if advertise:
        return advertise
    if bind_host not in ("0.0.0.0", "::", "*", ""):
        return bind_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def load_keys(cfg: ClusterSection) -> CurveKeys | None:
    """The cluster key pair, or None in insecure mode (warned about: anyone may join)."""
    if cfg.key_file:
        return read_key_file(cfg.key_file)
    log.warning(
        "cluster.insecure = true: peers are NOT authenticated; anyone who can reach the gossip and data "
        "ports can join the cluster, read pages and inject membership. Use only on a trusted, isolated network."
    )
    return None


def membership_config(cfg: ClusterSection) -> ClusterConfig:
    return ClusterConfig(
        probe_interval=cfg.probe_interval,
        probe_timeout=cfg.probe_timeout,
        suspicion_mult=cfg.suspicion_mult,
        gossip_interval=min(0.2, cfg.probe_interval),
    )


class ClusterNode:
    """Gossip membership of this daemon, driven by the asyncio loop it is started on."""

    def __init__(
        self,
        cfg: ClusterSection,
        keys: CurveKeys | None,
        *,
        data_address: str = "",
        meta_source: Callable[[], dict[str, Any]] | None = None,
        on_members: Callable[[list[Member], list[Event]], None] | None = None,
        extra_meta: Callable[[], dict[str, Any]] | None = None,
        seed_fingerprint: str = "",
    ) -> None:
        """`meta_source`: tier space as {tier: (used, capacity)}-derived lists; `extra_meta`: other
        published flags (the pool's `gossip_meta`: `rdma: 1` while peers may READ from us);
        `seed_fingerprint`: our page-key seed's (keys.seed_fingerprint), published and required of
        every member (empty: no check)."""
        self.cfg = cfg
        self.seed_fingerprint = seed_fingerprint
        self.refused: dict[str, str] = {}  # node -> why it was refused (the latest reason)
        self.keys = keys
        self.node_id = cfg.node_id
        self._meta_source = meta_source or dict
        self._extra_meta = extra_meta or dict
        self._on_members = on_members
        host, port = split_address(cfg.gossip_address)
        self.transport = ZmqTransport(
            tcp_url(host, port), advertise_host=advertised_host(host, cfg.advertise_host), curve=keys
        )
        self.gossip_address = self.transport.address
        self.data_address = data_address
        self._published: dict[str, Any] = {}
        self.membership = Membership(
            self.node_id,
            self._meta(),
            membership_config(cfg),
            time.monotonic,
            self.transport,
            random.Random(),
            delegate=None,
            admit=self._admit if seed_fingerprint else None,
        )
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._fd: int | None = None
        self._next_meta = 0.0
        self.started = time.time()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        import zmq

        loop = asyncio.get_running_loop()
        fd = self.transport.router.getsockopt(zmq.FD)
        assert isinstance(fd, int)
        self._fd = fd
        loop.add_reader(fd, self._wake.set)
        seeds = [tcp_url(*split_address(s)) for s in self.cfg.seeds]
        self.membership.join(seeds)
        self._task = asyncio.create_task(self._run(), name="cluster-gossip")
        log.info(
            "cluster: member %r, gossip %s, data %s, %s; joining through %s",
            self.node_id,
            self.gossip_address,
            self.data_address or "-",
            "CURVE" if self.keys else "INSECURE",
            ", ".join(seeds) or "nobody (first member)",
        )

    async def stop(self) -> None:
        """Leave gracefully (others record LEFT, not DEAD), then close the sockets."""
        if self._task is None:
            return
        self.membership.leave()
        self._wake.set()
        await asyncio.sleep(LEAVE_SECONDS)  # the gossip task keeps spreading the news meanwhile
        self.membership.stop()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
        self.transport.close()
        log.info("cluster: left")

    # ------------------------------------------------------------------ the gossip loop

    async def _run(self) -> None:
        import zmq

        m, t = self.membership, self.transport
        while True:
            try:
                for src, data in t.recv(0):
                    m.on_message(src, data)
                now = time.monotonic()
                m.tick(now)
                if now >= self._next_meta:
                    self._next_meta = now + META_REFRESH_SECONDS
                    self._refresh_meta()
                events = m.take_events()
                if events:
                    self._handle(events)
            except Exception:
                log.exception("cluster: gossip step failed (continuing)")
            # ZeroMQ's FD is edge-triggered: sleep only when nothing is waiting.
            if int(t.router.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                await asyncio.sleep(0)
                continue
            self._wake.clear()
            delay = min(max(0.0, m.next_deadline() - time.monotonic()), 0.25)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _handle(self, events: list[Event]) -> None:
        for ev in events:
            if ev.kind in (EventKind.DEAD, EventKind.LEFT):
                member = self.membership.members.get(ev.node)
                if member is not None:
                    self.transport.forget(member.addr)
            level = logging.WARNING if ev.kind in (EventKind.DEAD, EventKind.SUSPECT) else logging.INFO
            log.log(level, "cluster: member %r %s (incarnation %d)", ev.node, ev.kind.value, ev.incarnation)
        if self._on_members is not None:
            self._on_members(self.membership.alive_members(), events)

    # ------------------------------------------------------------------ metadata

    def _admit(self, node: str, meta: dict[str, Any]) -> str | None:
        """Refuse a member whose page-key seed differs from ours (logged once per node and seed)."""
        theirs = meta.get("seed")
        if theirs == self.seed_fingerprint:
            self.refused.pop(node, None)
            return None
        if theirs:
            why = f"its page-key seed {theirs} differs from ours ({self.seed_fingerprint})"
        else:
            why = "it publishes no page-key seed (a polarkvd from before keyed page hashing?)"
        if self.refused.get(node) != why:
            self.refused[node] = why
            log.error(
                "cluster: refusing member %r: %s; every member must share the seed (the same cluster "
                "key file or, in an insecure cluster, the same daemon.seed_file; docs/CLUSTER.md)",
                node,
                why,
            )
        return why

    def _compose_meta(self) -> dict[str, Any]:
        seed = {"seed": self.seed_fingerprint} if self.seed_fingerprint else {}
        return {
            "v": __version__,
            "data": self.data_address,
            **seed,
            **self._meta_source(),
            **self._extra_meta(),
        }

    def _meta(self) -> dict[str, Any]:
        meta = self._compose_meta()
        self._published = meta
        return meta

    def _refresh_meta(self) -> None:
        """Republish when space changed by more than 1/16 of a tier, or a flag changed (each update
        costs a broadcast)."""
        fresh = self._compose_meta()
        if _changed(self._published, fresh):
            self._published = fresh
            self.membership.update_meta(fresh)

    def set_data_address(self, address: str) -> None:
        self.data_address = address
        self._next_meta = 0.0
        self._published = {}
        self._wake.set()

    # ------------------------------------------------------------------ views

    def member_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.membership.members.values():
            name = m.state.name.lower()
            out[name] = out.get(name, 0) + 1
        return out

    def alive(self) -> list[Member]:
        return self.membership.alive_members()

    def report(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """What `polarkvd status --cluster` shows."""
        m = self.membership
        now = time.monotonic()
        return {
            **(extra or {}),
            "enabled": True,
            "node_id": self.node_id,
            "gossip_address": self.gossip_address,
            "data_address": self.data_address,
            "authenticated": self.keys is not None,
            "incarnation": m.incarnation,
            "members": [
                {
                    "node": x.node,
                    "addr": x.addr,
                    "state": x.state.name.lower(),
                    "incarnation": x.incarnation,
                    "for_s": round(now - x.since, 3),
                    "meta": x.meta,
                    "self": x.node == self.node_id,
                }
                for x in sorted(m.members.values(), key=lambda x: x.node)
            ],
            "alive": sum(1 for x in m.members.values() if x.state in (State.ALIVE, State.SUSPECT)),
            "page_seed": self.seed_fingerprint,
            "refused": dict(self.refused),  # members kept out, and why
            "gossip": {**m.stats, "peer_sockets": self.transport.peer_sockets},
        }


def _changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    if old.keys() != new.keys():
        return True
    for k, v in new.items():
        o = old[k]
        if isinstance(v, list) and isinstance(o, list) and len(v) == 2 == len(o):
            used, cap = v
            if cap != o[1] or abs(used - o[0]) > max(cap, 1) / 16:
                return True
        elif v != o:
            return True
    return False
