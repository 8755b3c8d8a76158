"""Per-tenant quotas: how much DRAM and disk each tenant (a namespace's cache_salt) may hold.

Owns the limits as configured (the live `quotas.*` knobs, read at each use), which namespaces
belong to which tenant, each tenant's usage, and which of a tenant's own DRAM pages go when it is
over its quota. The manager asks it at reserve (`make_room`); the disk tier asks `disk_quota`
before a write and evicts that tenant's pages itself. It never picks another tenant's page, and
costs nothing for tenants without a quota. A tenant is shown by its configured `name`, else by a
digest of its salt (`t-` and 8 hex digits): salts are secrets that open a tenant's cache, so they
never appear in status, metrics or logs.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import TYPE_CHECKING, Any

import xxhash

from polarkvd.config import QuotasConfig
from polarkvd.index import READY, VRAM, Page
from polarkvd.policy import PolicyNode

if TYPE_CHECKING:
    from polarkvd.manager import Manager, NamespaceInfo

#: Entries of a tenant's list of DRAM pages looked at for one victim before the policy is searched.
VICTIM_SCAN = 4096
#: Pages of a tenant far over its DRAM quota (one just lowered) evicted at most per reserve: the
#: rest goes at its next reserves, so no single reserve holds the event loop for long.
TRIM_PER_RESERVE = 64
#: Tenants shown in `status` and metrics at most (the largest DRAM users first).
SHOWN_TENANTS = 100
NO_SALT = "-"  # how engines without a cache_salt are shown


def tenant_label(salt: str, cfg: QuotasConfig) -> str:
    listed = cfg.tenants.get(salt)
    if listed and listed.get("name"):
        return str(listed["name"])
    if not salt:
        return NO_SALT
    return "t-" + xxhash.xxh3_64_hexdigest(salt.encode())[:8]


@dataclasses.dataclass
class Tenant:
    salt: str
    ns_ids: set[int] = dataclasses.field(default_factory=set)
    digests: frozenset[bytes] = frozenset()  # replaced whole: read by the disk tier's threads
    # keys of DRAM pages reserved while the tenant had a DRAM quota, oldest first (stale keys are
    # dropped when met): its victims, without walking other tenants' pages in the policy
    fifo: collections.deque[bytes] = dataclasses.field(default_factory=collections.deque)
    page_bytes: int = 1 << 30  # its smallest page size: bounds the list's stale entries
    evicted_pages_dram: int = 0  # by its DRAM quota


class Quotas:
    def __init__(self, cfg: QuotasConfig) -> None:
        self.cfg = cfg  # the live knobs change this object in place
        self.tenants: dict[str, Tenant] = {}
        self._by_ns: dict[int, Tenant] = {}
        self._by_digest: dict[bytes, Tenant] = {}

    # ------------------------------------------------------------------ limits

    def dram_limit(self, t: Tenant) -> int:
        listed = self.cfg.tenants.get(t.salt)
        if listed is not None and "dram" in listed:
            return int(listed["dram"])
        return self.cfg.default_dram

    def disk_limit(self, t: Tenant) -> int:
        listed = self.cfg.tenants.get(t.salt)
        if listed is not None and "disk" in listed:
            return int(listed["disk"])
        return self.cfg.default_disk

    # ------------------------------------------------------------------ tenants

    def join(self, info: NamespaceInfo) -> Tenant:
        """The tenant of a namespace (known from its first reserve on)."""
        t = self._by_ns.get(info.id)
        if t is not None:
            return t
        salt = info.ns.cache_salt or ""
        t = self.tenants.get(salt)
        if t is None:
            t = self.tenants[salt] = Tenant(salt)
        t.ns_ids.add(info.id)
        t.digests = t.digests | {info.digest}
        t.page_bytes = min(t.page_bytes, max(1, info.ns.page_bytes))
        self._by_ns[info.id] = t
        self._by_digest[info.digest] = t
        return t

    def disk_quota(self, ns_digest: bytes) -> tuple[int, frozenset[bytes]] | None:
        """(limit, the tenant's namespace digests) for a page of `ns_digest` going to disk, or None:
        no quota. Called by the disk tier's I/O threads: reads only."""
        t = self._by_digest.get(ns_digest)
        if t is None:
            return None
        limit = self.disk_limit(t)
        return (limit, t.digests) if limit else None

    def dram_used(self, t: Tenant, m: Manager) -> int:
        by_ns = m.index.dram_bytes_ns
        return sum(by_ns.get(i, 0) for i in t.ns_ids)

    # ------------------------------------------------------------------ enforcement (event loop)

    def make_room(self, t: Tenant, key: bytes, size: int, m: Manager) -> bool:
        """Before `t` reserves page `key` of `size` bytes in DRAM: evict its own pages until the
        page fits its quota. False: it cannot (its other pages are pinned, being written, or the
        page alone is over the quota); nothing of another tenant is touched either way. A tenant
        far over its quota gives back TRIM_PER_RESERVE pages per reserve and may reserve while it
        is still over, as long as it does not grow."""
        limit = self.dram_limit(t)
        if not limit:
            return True
        if size > limit:
            return False
        used = self.dram_used(t, m)
        freed = evicted = 0
        while used + size > limit:
            if evicted == TRIM_PER_RESERVE:  # far over (a lowered quota): trim over several reserves
                if freed >= size:  # it does not grow meanwhile
                    break
                return False
            page = self._victim(t, m)
            if page is None:
                return False
            used -= page.size
            freed += page.size
            evicted += 1
            t.evicted_pages_dram += 1
            m.space.evict_page(page, "quota")
        fifo = t.fifo
        fifo.append(key)
        if len(fifo) > VICTIM_SCAN and len(fifo) > 2 * (limit // t.page_bytes + 1):
            get = m.index.get
            t.fifo = collections.deque(k for k in fifo if (p := get(k)) is not None and p.ns in t.ns_ids)
        return True

    def _victim(self, t: Tenant, m: Manager) -> Page | None:
        """The oldest of `t`'s DRAM pages that can go now (READY, unpinned, a leaf), out of the
        policy; None if it has none."""
        get, ns_ids = m.index.get, t.ns_ids
        for refill in (False, True):
            fifo = t.fifo
            if refill:
                # pages it did not reserve under a quota (promoted from disk, or from before the
                # quota): one walk of the policy, coldest first, puts up to VICTIM_SCAN of them in
                # front, rather than a walk per victim
                mine = (n.key for n in m.policy.coldest_first() if n.ns in ns_ids)  # type: ignore[attr-defined]
                fifo.extendleft(reversed(list(itertools.islice(mine, VICTIM_SCAN))))
            for _ in range(min(len(fifo), VICTIM_SCAN)):
                key = fifo.popleft()
                page = get(key)
                if page is None or page.ns not in ns_ids or page.state & VRAM:
                    continue  # gone, or in L1: not in DRAM
                if page.state == READY and not page.pins and not page.children:
                    m.policy.remove(page)
                    return page
                fifo.append(key)  # being written, pinned, or its children go first: later

        def evictable(n: PolicyNode) -> bool:
            return (
                isinstance(n, Page) and n.ns in ns_ids and not n.pins and not n.children and n.state == READY
            )

        found = m.policy.victims(1, evictable)  # the last resort: its first evictable page in policy order
        if not found:
            return None
        assert isinstance(found[0], Page)
        return found[0]

    # ------------------------------------------------------------------ reporting

    def report(self, m: Manager, disk_by_ns: dict[bytes, int] | None) -> dict[str, Any]:
        """Per tenant: usage and quota of DRAM and disk, pages evicted by its quotas; the largest
        DRAM users first, at most SHOWN_TENANTS of them."""
        quota_evicted = m.disk.quota_evicted_by_ns() if m.disk is not None else {}
        rows: list[dict[str, Any]] = []
        for t in self.tenants.values():
            disk = sum(disk_by_ns.get(d, 0) for d in t.digests) if disk_by_ns is not None else None
            rows.append(
                {
                    "tenant": tenant_label(t.salt, self.cfg),
                    "listed": t.salt in self.cfg.tenants,
                    "namespaces": len(t.ns_ids),
                    "dram_bytes": self.dram_used(t, m),
                    "dram_quota": self.dram_limit(t),
                    "disk_bytes": disk,
                    "disk_quota": self.disk_limit(t),
                    "evicted_pages_dram": t.evicted_pages_dram,
                    "evicted_pages_disk": sum(quota_evicted.get(d, 0) for d in t.digests),
                }
            )
        rows.sort(key=lambda r: (-r["dram_bytes"], r["tenant"]))
        return {
            "default_dram": self.cfg.default_dram,
            "default_disk": self.cfg.default_disk,
            "tenants": rows[:SHOWN_TENANTS],
            "tenants_not_shown": max(0, len(rows) - SHOWN_TENANTS),
        }
