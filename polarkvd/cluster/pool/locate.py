"""The meta map's client side: our pages' changes drained from the manager's events into the
meta map, announcements to each key's owner, membership, and `locate`: who holds a prefix.

A part of the cluster pool (polarkvd/cluster/pool/__init__.py): the shared state is the pool's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

from polarkvd.cluster.membership import Event, EventKind, Member, State
from polarkvd.cluster.metamap import MetaMap, leading_run
from polarkvd.cluster.metamap_wire import encode_batches
from polarkvd.cluster.pool.common import (
    ANNOUNCE_BATCH,
    HINT_LIMIT,
    data_addr,
)
from polarkvd.errors import PolarKVError
from polarkvd.manager.events import NamespaceKnown, PageRemoved, PageStored
from polarkvd.types import Tier

if TYPE_CHECKING:
    from polarkvd.cluster.pool import ClusterPool

log = logging.getLogger(__name__)


class MetaMapClient:
    """The meta map's client side: our pages' changes drained from the manager's events into the"""

    def __init__(self, pool: ClusterPool) -> None:
        self.pool = pool

    def announce_disk_pages(self, ns_digest: bytes) -> None:
        """Announce the pages of one namespace on our disk tier (held on disk). Called when the
        namespace becomes known here (an engine attached): before that, a peer's `get` could not be
        served from disk (the page geometry comes with the namespace), so they are not announced.
        Pages written to disk later are announced as they are written. The disk index is scanned on
        a worker thread (it can hold millions of pages); the meta map is updated on the loop."""
        pages = self.pool.pages
        if not pages.has_disk:
            return

        def scan() -> list[bytes]:
            return pages.disk_keys(ns_digest)

        def announce(f: asyncio.Future[list[bytes]]) -> None:
            if f.cancelled() or f.exception() is not None or self.pool._closing:
                return
            now = time.monotonic()
            for key in f.result():
                if pages.on_disk(key):  # still there
                    self.pool.metamap.local_stored(key, int(Tier.DISK), now)

        self.pool.loop.run_in_executor(None, scan).add_done_callback(announce)

    def drain_events(self) -> None:
        """Bring the meta map up to date with what happened to our pages since the last drain, in
        order (loop only): before the meta map answers, plans or announces anything."""
        events = self.pool._events.take()
        if not events or self.pool._closing:
            return
        now, mm = time.monotonic(), self.pool.metamap
        for ev in events:
            if isinstance(ev, PageStored):
                mm.local_stored(ev.key, int(ev.tier), now)
            elif isinstance(ev, PageRemoved):
                mm.local_removed(ev.key, now, tier=int(ev.tier))
            elif isinstance(ev, NamespaceKnown):
                self.announce_disk_pages(ev.digest)
            else:  # DiskPagesRemoved: their disk copies are no longer ours to offer
                for key in ev.keys:
                    mm.local_removed(key, now, tier=int(Tier.DISK))

    def page_added(self, key: bytes, tier: Tier) -> None:
        self.pool.metamap.local_stored(key, int(tier), time.monotonic())

    def page_removed(self, key: bytes, tier: Tier) -> None:
        """A copy left `tier`; the meta map keeps us as a holder while another tier here has it."""
        self.pool.metamap.local_removed(key, time.monotonic(), tier=int(tier))

    async def flush_loop(self) -> None:
        """Send due announcements; one round at a time, so each owner gets them in order."""
        while True:
            try:
                self.drain_events()
                sends = []
                for dest, msgs in self.pool.metamap.take_outgoing(time.monotonic()).items():
                    member = self.pool.members.get(dest)
                    addr = data_addr(member) if member else None
                    if addr is not None:
                        sends.append(self._announce(dest, addr, msgs))
                if sends:
                    await asyncio.gather(*sends)
            except Exception:
                log.exception("cluster: meta map flush failed (continuing)")
            delay = min(max(self.pool.metamap.next_deadline() - time.monotonic(), 0.001), 0.05)
            await asyncio.sleep(delay)

    async def _announce(self, dest: str, addr: str, msgs: list[Any]) -> None:
        """Send one owner its batches in order; what a failed send carried is queued again (as it
        stands then), so a lost announcement costs a delay, not a permanently unknown page."""
        sent = 0
        for batch in encode_batches(msgs, ANNOUNCE_BATCH):
            try:
                await self.call(
                    addr, "announce", {"from": self.pool.node_id, "batch": batch}, self.pool.c.fetch_timeout
                )
            except (PolarKVError, OSError, asyncio.TimeoutError) as e:
                self.pool.counters["cluster_announce_failures"] += 1
                log.debug("cluster: announcement to %s failed (queued again): %r", dest, e)
                self.pool.metamap.requeue(dest, msgs[sent:], time.monotonic())
                return
            sent += ANNOUNCE_BATCH

    async def locate(self, keys: Sequence[bytes]) -> list[tuple[str, ...]]:
        """Holders (other members) of the longest prefix of `keys` the cluster has; [] when none."""
        if not keys or not self.pool.members:
            return []
        keys = list(keys)
        answers = await self.holders(keys)
        found = MetaMap.longest_prefix(len(keys), answers, exclude=self.pool.node_id)
        return self._held(keys, found)

    async def holders(self, keys: list[bytes]) -> dict[int, tuple[str, ...]]:
        """Holders per index of `keys` as their owners' records say (ourselves included), read
        from the meta map only: our own records, one `where` per other owner; an owner that is
        suspect or does not answer leaves its keys out."""
        self.drain_events()
        plan = self.pool.metamap.plan(keys)
        answers: dict[int, tuple[str, ...]] = {}
        calls = []
        for owner, idx in plan.items():
            if owner == self.pool.node_id:
                for i, holders in zip(idx, self.pool.metamap.locate([keys[i] for i in idx])):
                    answers[i] = holders
                continue
            member = self.pool.members.get(owner)
            addr = data_addr(member) if member else None
            if addr is None or owner in self.pool.suspects:
                continue
            calls.append(
                (idx, self.call(addr, "where", {"keys": [keys[i] for i in idx]}, self.pool.c.lookup_timeout))
            )
        if calls:
            results = await asyncio.gather(*(c for _, c in calls), return_exceptions=True)
            for (idx, _), res in zip(calls, results):
                if isinstance(res, BaseException):
                    self.pool.counters["cluster_where_failures"] += 1
                    continue
                got = res[0].get("holders")
                if isinstance(got, list) and len(got) == len(idx):
                    for i, h in zip(idx, got):
                        if isinstance(h, list):
                            answers[i] = tuple(x for x in h if isinstance(x, str))
        return answers

    def leading(self, keys: list[bytes]) -> Awaitable[dict[str, int]]:
        """Per member (ourselves included), how many of keys 0, 1, ... the owners' records say it
        holds without a gap: each owner asked once for a summary of its part (`MetaMap.leading`),
        not for every key's holders. A suspect or silent owner ends every prefix at its first key.
        The owners are asked before this returns (the caller can do its own work meanwhile); await
        the result for their answers."""
        self.drain_events()
        mm, me = self.pool.metamap, self.pool.node_id
        plan = mm.plan(keys) if keys else {}
        calls: list[tuple[str, int, asyncio.Future[tuple[dict[str, Any], list[bool]]]]] = []
        timeout = self.pool.c.lookup_timeout
        for owner, idx in plan.items():
            member = self.pool.members.get(owner) if owner != me else None
            addr = data_addr(member) if member else None
            if addr is None or owner in self.pool.suspects:
                continue
            args = {"keys": [keys[i] for i in idx], "leading": True}
            calls.append((owner, len(idx), self._submit(addr, "where", args, timeout)))
        replies: dict[str, dict[str, int]] = {}
        if me in plan:  # our own part while the owners answer
            replies[me] = mm.leading([keys[i] for i in plan[me]])

        async def merge() -> dict[str, int]:
            if calls:
                futs = [asyncio.wait_for(f, timeout + 0.5) for _, _, f in calls]
                results = await asyncio.gather(*futs, return_exceptions=True)
                for (owner, n, _), res in zip(calls, results):
                    if isinstance(res, BaseException):
                        self.pool.counters["cluster_where_failures"] += 1
                        continue
                    got = _leading_reply(res[0], n)
                    if got is not None:
                        replies[owner] = got
            return MetaMap.merge_leading(len(keys), plan, replies)

        return merge()

    def _held(self, keys: list[bytes], found: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        found = [
            tuple(h for h in hs if h in self.pool.members and h not in self.pool.suspects) for hs in found
        ]
        n = 0
        while n < len(found) and found[n]:
            n += 1
        found = found[:n]
        if len(self.pool.hints) + n > HINT_LIMIT:
            self.pool.hints.clear()
        for k, hs in zip(keys, found):
            self.pool.hints[k] = hs
        return found

    def on_members(self, alive: list[Member], events: list[Event]) -> None:
        self.pool.members = {m.node: m for m in alive if m.node != self.pool.node_id and data_addr(m)}
        # a suspect may be gone: lookups do not wait for it (its keys are misses until it is
        # alive again or dead and its keys re-owned); it stays an owner, so nothing moves meanwhile
        self.pool.suspects = {m.node for m in alive if m.state == State.SUSPECT}
        self.pool.metamap.set_members([self.pool.node_id, *self.pool.members], time.monotonic())
        for ev in events:
            if ev.kind is EventKind.RIVAL_GONE and ev.node == self.pool.node_id:
                self.pool.metamap.regreet(time.monotonic())
            if ev.kind in (EventKind.DEAD, EventKind.LEFT):
                addr = ev.meta.get("data") if isinstance(ev.meta, dict) else None
                if isinstance(addr, str) and addr:
                    self.pool.net.submit(self.pool.client.forget, addr)
                gone = ev.node
                self.pool.rdma_reads.forget_rdma(gone)
                for k in [k for k, h in self.pool.hints.items() if gone in h]:
                    del self.pool.hints[k]

    async def call(
        self, addr: str, op: str, args: dict[str, Any], timeout: float, **kw: Any
    ) -> tuple[dict[str, Any], list[bool]]:
        return await asyncio.wait_for(self._submit(addr, op, args, timeout, **kw), timeout + 0.5)

    def _submit(
        self, addr: str, op: str, args: dict[str, Any], timeout: float, **kw: Any
    ) -> asyncio.Future[tuple[dict[str, Any], list[bool]]]:
        """A peer call started now on a network thread."""
        return self.pool.loop.run_in_executor(
            self.pool.net, lambda: self.pool.client.call(addr, op, args, timeout=timeout, **kw)
        )


def _leading_reply(reply: dict[str, Any], n: int) -> dict[str, int] | None:
    """An owner's `where` reply to a `leading` query as counts per holder: the summary, or (from a
    member that predates it) every key's holders; None when it is neither."""
    lead = reply.get("leading")
    if isinstance(lead, dict):
        return {h: c for h, c in lead.items() if isinstance(h, str) and type(c) is int and 0 < c <= n}
    got = reply.get("holders")
    if isinstance(got, list) and len(got) == n:
        return leading_run(
            [tuple(x for x in h if isinstance(x, str)) if isinstance(h, list) else () for h in got]
        )
    return None
