"""The daemon's numbers: `stats` (every tier, session, namespace and counter) and each tier's
used and total bytes, which cluster members publish.

A part of the manager (polarkvd/manager/__init__.py): it holds no state of its own beyond what
is named here; the shared state is the manager's.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from polarkvd.index import (
    VRAM,
)
from polarkvd.keys import seed_fingerprint
from polarkvd.types import Tier

if TYPE_CHECKING:
    from polarkvd.manager import Manager

log = logging.getLogger(__name__)


class Reports:
    """Stats."""

    def __init__(self, m: Manager) -> None:
        self.m = m

    def tier_space(self) -> dict[str, tuple[int, int]]:
        """(used, capacity) bytes per tier: what a cluster member publishes to its peers."""
        out = {"dram": (self.m.allocator.used_bytes, self.m.allocator.capacity)}
        if self.m.vram is not None:
            out["vram"] = (self.m.vram.slots.used_bytes, self.m.vram.capacity)
        if self.m.disk is not None:
            d = self.m.disk.stats()
            out["disk"] = (d.stored_bytes, d.capacity_bytes)
        return out

    def _vram_stats(self, pool: Any) -> dict[str, Any]:
        host = self.m.vram_host
        return {
            "tier": int(Tier.VRAM),
            "pages": self.m.index.vram_pages,
            "bytes": self.m.index.vram_bytes,
            "reserved_pages": sum(
                bool(p.state & VRAM) for s in self.m.sessions.values() for p in s.reserved.values()
            ),
            "slot_bytes_used": pool.slots.used_bytes,
            "capacity_bytes": pool.capacity,
            "policy": self.m.vram_policy.name,  # type: ignore[union-attr]
            "pinned_pages": sum(
                bool(p.state & VRAM)
                for s in self.m.sessions.values()
                for lease in s.leases.values()
                for p in lease.pages
            ),
            "high_watermark": self.m.cfg.vram.high_watermark,
            "low_watermark": self.m.cfg.vram.low_watermark,
            "device": pool.info.name,
            "pinned_host": bool(host is not None and host.pinned),  # demotions by DMA from page-locked DRAM
            "batches": pool.batches,
            "sessions": sum(s.vram for s in self.m.sessions.values()),
        }

    def stats(self) -> dict[str, Any]:
        self.m.lookups.fold_thread_lookups()
        dram = {
            "tier": int(Tier.DRAM),
            "pages": self.m.index.ready_pages,
            "bytes": self.m.index.ready_bytes,
            "reserved_pages": sum(
                not p.state & VRAM for s in self.m.sessions.values() for p in s.reserved.values()
            ),
            "quarantined_pages": sum(len(s.quarantined) for s in self.m.sessions.values()),
            "slot_bytes_used": self.m.allocator.used_bytes,
            "capacity_bytes": self.m.allocator.capacity,
            "policy": self.m.policy.name,
            "pinned_pages": sum(
                not p.state & VRAM
                for s in self.m.sessions.values()
                for lease in s.leases.values()
                for p in lease.pages
            ),
            "operator_pinned_pages": len(self.m.operator_pins),
            "high_watermark": self.m.cfg.dram.high_watermark,
            "low_watermark": self.m.cfg.dram.low_watermark,
        }
        if self.m.table is not None:
            t = self.m.table
            dram["lookup_table"] = {
                "entries": t.capacity,
                "used": t.used,
                "deleted": t.deleted,
                "full": t.overflow,
            }
        tiers = {"dram": dram}
        if self.m.vram is not None:
            pool = self.m.vram
            tiers = {"vram": self._vram_stats(pool), "dram": dram}  # in tier order
        if self.m.disk is not None:
            d = self.m.disk.stats()
            tiers["disk"] = {
                "tier": int(Tier.DISK),
                "pages": d.pages,
                "bytes": d.stored_bytes,
                "raw_bytes": d.raw_bytes,
                "capacity_bytes": d.capacity_bytes,
                "policy": self.m.cfg.disk.policy,
                "evictions": d.evictions,
                "corrupt_dropped": d.corrupt_dropped,
                "seed_refused": d.seed_refused,
                "write_errors": d.write_errors,
                "pending_pages": len(self.m.pending),
                "pending_bytes": self.m.pending_bytes,
                "write_through": self.m.cfg.disk.write_through,
                "write_through_bytes": self.m.write_through_bytes,
                "group_commit": dataclasses.asdict(self.m.group_commit.stats),  # type: ignore[union-attr]
                "path": str(self.m.cfg.disk.path),
            }
        dmp = self.m.cluster.dmp if self.m.cluster is not None else None
        if dmp is not None:
            tiers["dmp"] = {
                "tier": int(Tier.DMP),
                "pages": len(dmp),
                "bytes": dmp.ready_bytes,
                "capacity_bytes": dmp.capacity,
                "policy": "lru",
                **dmp.stats,
            }
        sessions = [
            {
                "id": s.id,
                "engine_id": s.engine_id,
                "model": s.ns.ns.model,
                "page_bytes": s.ns.ns.page_bytes,
                "cache_salt": bool(s.ns.ns.cache_salt),
                "reserved_pages": len(s.reserved),
                "leases": len(s.leases),
                "lookup_pages": s.lookup_pages,
                "hit_pages": s.hit_pages,
                "stored_pages": s.stored_pages,
                "loaded_pages": s.loaded_pages,
            }
            for s in self.m.sessions.values()
        ]
        return {
            "uptime_s": round(time.time() - self.m.started, 1),
            "draining": self.m.draining,
            "page_seed": seed_fingerprint(self.m.seed),  # public: tells seeds apart, reveals nothing
            "tiers": tiers,
            "counters": dict(self.m.counters),
            "sessions": sessions,
            "leases": sum(len(s.leases) for s in self.m.sessions.values()),
            "namespaces": len(self.m.namespaces),
            "namespace_stats": list(self.m.operator.namespace_totals().values()),
            "quotas": self.m.quotas.report(
                self.m, self.m.disk.stored_by_ns() if self.m.disk is not None else None
            ),
            "tuning_file": self.m.cfg.daemon.tuning_file,
            "worth": self.m.worth.report(),  # the `cost` policy's prefill fits and fetch rates
        }
