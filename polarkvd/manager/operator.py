"""What the operator sees and steers: prefixes (chains by their first page), pins that keep them
in DRAM, evicting them, and `top`, the largest namespaces and prefixes.

A part of the manager (polarkvd/manager/__init__.py): it holds no state of its own beyond what
is named here; the shared state is the manager's.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Any

from polarkvd.errors import (
    NoSpaceError,
)
from polarkvd.index import (
    READY,
    Page,
)
from polarkvd.tiers.dram import slot_size

if TYPE_CHECKING:
    from polarkvd.manager import Manager

log = logging.getLogger(__name__)


class Operator:
    """Operator actions on prefixes."""

    def __init__(self, m: Manager) -> None:
        self.m = m

    def count_prefix_hit(self, first_key: bytes, pages: int) -> None:
        hits = self.m.prefix_hits
        hits[first_key] += pages
        if len(hits) > 4096:  # bounded: keep the hottest half
            self.m.prefix_hits = collections.Counter(dict(hits.most_common(2048)))

    def _roots(self) -> dict[bytes, bytes]:
        """key -> key of the first DRAM page of its chain, for every READY page in DRAM."""
        root_of: dict[bytes, bytes] = {}
        get = self.m.index.get
        for page in self.m.index:
            if page.state != READY or page.key in root_of:
                continue
            path = [page.key]
            on_path = {page.key}
            node = page
            while True:
                parent = get(node.parent) if node.parent is not None else None
                # parents that loop back (an engine may reserve a key under its own descendant) end it
                if parent is None or parent.state != READY or parent.key in on_path:
                    root = node.key
                    break
                if parent.key in root_of:
                    root = root_of[parent.key]
                    break
                path.append(parent.key)
                on_path.add(parent.key)
                node = parent
            for key in path:
                root_of[key] = root
        return root_of

    def _subtree(self, roots: list[bytes]) -> list[Page]:
        """READY DRAM pages that are one of `roots` or descend from one; parents before children."""
        children: dict[bytes, list[Page]] = {}
        for page in self.m.index:
            if page.state == READY and page.parent is not None:
                children.setdefault(page.parent, []).append(page)
        out: list[Page] = []
        seen: set[bytes] = set()
        queue: list[bytes] = []
        for key in roots:
            if key in seen:
                continue
            seen.add(key)
            root = self.m.index.get(key)
            if root is not None and root.state == READY:
                out.append(root)
            queue.append(key)
        while queue:
            key = queue.pop()
            for child in children.get(key, ()):
                if child.key not in seen:
                    seen.add(child.key)
                    out.append(child)
                    queue.append(child.key)
        # depth-first pops can put a child before a sibling's subtree, never before its parent
        return out

    def pin(self, roots: list[bytes]) -> dict[str, int]:
        """Keep the DRAM pages of these prefixes (each key and everything after it) from eviction.

        Pins only what is in DRAM now (load a prefix first to bring its disk pages up). Operator pins
        may hold at most half of the arena, so engines always keep room to store.
        """
        pages = [p for p in self._subtree(roots) if p.key not in self.m.operator_pins]
        held = sum(slot_size(p.size) for p in self.m.operator_pins.values())
        adding = sum(slot_size(p.size) for p in pages)
        limit = self.m.allocator.capacity // 2
        if held + adding > limit:
            raise NoSpaceError(
                f"pinning {len(pages)} more pages ({adding} bytes) would hold {held + adding} bytes of DRAM "
                f"pinned; operator pins may hold at most half the arena ({limit} bytes)"
            )
        for page in pages:
            page.pins += 1
            self.m.operator_pins[page.key] = page
        self.m.counters["operator_pins"] += len(pages)
        return {"pinned_pages": len(pages), "pinned_bytes": sum(p.size for p in pages)}

    def unpin(self, roots: list[bytes]) -> int:
        """Release operator pins on these prefixes. Returns the pages unpinned."""
        released = 0
        for page in self._subtree(roots):
            if self.m.operator_pins.pop(page.key, None) is not None:
                page.pins -= 1
                released += 1
        return released

    def evict_prefixes(self, roots: list[bytes]) -> dict[str, int]:
        """Evict these prefixes from DRAM now (demoting to disk), leaves first.

        Pages pinned (by a lease or an operator pin) stay, and so do their ancestors.
        """
        evicted = freed = kept = 0
        for page in reversed(self._subtree(roots)):
            if page.pins or page.children or page.state != READY:
                kept += 1
                continue
            self.m.policy.remove(page)
            self.m.space.demote(page)
            self.m.index.remove(page.key)
            self.m.allocator.free(page.offset, slot_size(page.size))
            self.m.counters["evicted_pages_dram_operator"] += 1
            self.m.counters["evicted_bytes_dram"] += page.size
            evicted += 1
            freed += page.size
        return {"evicted_pages": evicted, "freed_bytes": freed, "kept_pages": kept}

    def namespace_totals(self) -> dict[int, dict[str, Any]]:
        self.m.lookups.fold_thread_lookups()
        out: dict[int, dict[str, Any]] = {}
        for info in self.m.namespaces.values():
            out[info.id] = {
                "model": info.ns.model,
                "page_tokens": info.ns.page_tokens,
                "page_bytes": info.ns.page_bytes,
                "cache_salt": bool(info.ns.cache_salt),
                "sessions": 0,
                "lookup_pages": info.lookup_pages,
                "hit_pages": info.hit_pages,
                "stored_pages": info.stored_pages,
                "loaded_pages": info.loaded_pages,
            }
        for s in self.m.sessions.values():
            t = out[s.ns.id]
            t["sessions"] += 1
            t["lookup_pages"] += s.lookup_pages
            t["hit_pages"] += s.hit_pages
            t["stored_pages"] += s.stored_pages
            t["loaded_pages"] += s.loaded_pages
        return out

    async def top(self, limit: int) -> dict[str, Any]:
        """The largest namespaces, and prefixes (DRAM chains by first page) by bytes and by hits.

        `hits` of a prefix are the pages loaded by requests starting in it. The disk tier's share per
        namespace is counted in the I/O pool, off the event loop.
        """
        totals = self.namespace_totals()
        for t in totals.values():
            t.update(dram_pages=0, dram_bytes=0, disk_pages=0, disk_bytes=0)
        root_of = self._roots()
        prefixes: dict[bytes, dict[str, Any]] = {}
        for page in self.m.index:
            if page.state != READY:
                continue
            total = totals.get(page.ns)
            if total is not None:
                total["dram_pages"] += 1
                total["dram_bytes"] += page.size
            root = root_of[page.key]
            pr = prefixes.get(root)
            if pr is None:
                info = self.m._ns_by_id[page.ns]
                pr = prefixes[root] = {
                    "key": root,
                    "model": info.ns.model,
                    "pages": 0,
                    "bytes": 0,
                    "pinned_pages": 0,
                    "hits": 0,
                }
            pr["pages"] += 1
            pr["bytes"] += page.size
            if page.key in self.m.operator_pins:
                pr["pinned_pages"] += 1
        for key, n in self.m.prefix_hits.items():
            hit = prefixes.get(root_of.get(key, key))
            if hit is not None:
                hit["hits"] += n
        if self.m.disk is not None:
            by_digest = await asyncio.get_running_loop().run_in_executor(
                self.m.executor, _disk_by_namespace, self.m.disk
            )
            for digest, (pages, nbytes) in by_digest.items():
                known = self.m.namespaces.get(digest)
                if known is not None:
                    totals[known.id]["disk_pages"] += pages
                    totals[known.id]["disk_bytes"] += nbytes
        namespaces = sorted(
            totals.values(), key=lambda t: (t["dram_bytes"] + t["disk_bytes"], t["hit_pages"]), reverse=True
        )
        by_bytes = sorted(prefixes.values(), key=lambda p: (p["bytes"], p["hits"]), reverse=True)[:limit]
        by_hits = sorted(prefixes.values(), key=lambda p: (p["hits"], p["bytes"]), reverse=True)[:limit]
        chosen = {p["key"]: p for p in by_bytes + by_hits}
        return {
            "namespaces": namespaces[:limit],
            "prefixes": list(chosen.values()),
            "prefix_count": len(prefixes),
        }


def _disk_by_namespace(disk: Any) -> dict[bytes, tuple[int, int]]:
    """(pages, stored bytes) per namespace digest on the disk tier; runs in the I/O pool."""
    out: dict[bytes, list[int]] = {}
    for key in disk.keys():
        entry = disk.entry(key)
        if entry is not None:
            acc = out.setdefault(entry.ns, [0, 0])
            acc[0] += 1
            acc[1] += entry.stored_bytes
    return {k: (v[0], v[1]) for k, v in out.items()}
