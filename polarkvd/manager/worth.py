"""What each page of the memory tiers is worth keeping, for the `cost` eviction policy: per namespace
the engines' prefill cost (cost_model.RecomputeModel), per tier what fetching a page back costs
(cost_model.FetchCosts), and the valuer the policy calls (docs/DESIGN-NOTES.md, "Cost-aware
retention").

A page's worth is what losing it from its tier would cost the next request that needs it, per byte:
the cheaper of recomputing it (its namespace's fit at its depth in the chain) and fetching it back
from the tier it would be demoted to (the disk tier when there is one); with nowhere to go, its whole
recompute cost. Under `cost`, a page that is cheaper to recompute than to read back from disk is
dropped when it leaves DRAM rather than demoted (`cheaper_to_recompute`), as is one that a full
disk should not take (used fewer times lately, by a count-min sketch of every page's uses, than
the page it would displace, each weighed by its recompute cost: `_admit`), and a hit is cut where
the rest is cheaper to recompute than to fetch (`worth_fetching`): those two only when recomputing wins
by `MARGIN` even against the fast end of the fetch measurements, so that a noisy rate errs towards
keeping.

A part of the manager (polarkvd/manager/__init__.py): the models are its own state; the pages and
namespaces are the manager's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from polarkvd.cost_model import FetchCosts, RecomputeModel, default_for
from polarkvd.index import Page, depth_of
from polarkvd.policy import CostPolicy, EvictionPolicy, FrequencySketch, PolicyNode
from polarkvd.tiers.disk_index import DiskEntry
from polarkvd.types import Namespace, Tier

#: what a disk page of a namespace not attached since start is taken to cost to recompute: a
#: 128-token page at 3 ms a token (the default's scale for a 30-layer model)
_UNKNOWN_PAGE_SECONDS = 0.4

#: drop-or-demote demotes one in this many of the pages it would drop (see cheaper_to_recompute)
EXPLORE = 16
#: a page is dropped, or a hit cut, only where fetching costs this much more than recomputing, the
#: fetch taken at the fast end of its measurements (FetchCosts.fast_seconds): the measured rates
#: move with the machine's load, and a close call is not worth a wrong drop
MARGIN = 1.25

#: the sketch's window, in pages the tiers hold: a page's uses are counted over about this many
#: turnovers of the tiers (TinyLFU's sample, ten times the cache)
ADMIT_WINDOW = 10

#: parents of demoted pages remembered until their own eviction (cheaper_to_recompute): a bound, far
#: above the pages one eviction batch takes
_PARENTS_KEPT = 16384

if TYPE_CHECKING:
    from polarkvd.manager import Manager


class Worth:
    """Recompute and fetch costs, and the `cost` policy's valuer."""

    def __init__(self, m: Manager) -> None:
        self.m = m
        #: prefill cost per model and shard: namespaces that differ only in their cache salt or TP
        #: rank compute alike, so they share one fit (a tenant's engine reports for all)
        self.models: dict[tuple[object, ...], RecomputeModel] = {}
        self.fetch = FetchCosts()
        self._drops = 0  # pages drop-or-demote found cheaper to recompute (see cheaper_to_recompute)
        #: parents of the pages drop-or-demote sent to disk lately, oldest first: their writes may
        #: still be queued (the disk does not count them as children yet), and a DRAM eviction takes
        #: a chain leaf first in one batch, so the parent's turn comes while they are
        self._parents_of_demoted: dict[bytes, None] = {}
        #: uses of every page lately (the `cost` policies count them): admission to disk
        self.sketch = FrequencySketch()
        self._admissions = 0  # drop-or-demote decisions since the sketch was last sized
        #: the disk's next victim as last found: (the disk's eviction count then, its uses)
        self._victim: tuple[int, float] | None = None

    def model(self, ns_id: int) -> RecomputeModel:
        """The fit of a namespace's model and shard, made on first use (event loop only)."""
        ns = self.m._ns_by_id[ns_id].ns
        model = self.models.get(_model_key(ns))
        if model is None:
            model = self.models[_model_key(ns)] = RecomputeModel(ns)
        return model

    def observe_prefill(self, ns_id: int, tokens: int, depth: int, seconds: float) -> None:
        """An engine of namespace `ns_id` computed `tokens` tokens after `depth` in `seconds`."""
        self.model(ns_id).observe(tokens, depth, seconds)

    def value(self, node: PolicyNode) -> float:
        """Seconds a request saves per byte of the page by finding it in its tier (see the module
        docstring)."""
        assert isinstance(node, Page)  # the memory tiers' policies hold pages
        info = self.m._ns_by_id[node.ns]
        recompute = self.model(node.ns).cost.page_seconds(info.ns.page_tokens, depth_of(node.depth))
        if self.m.disk is not None:
            # the fast end, as for the decisions: a priority is fixed when the page is touched, and
            # pages touched on either side of a slow spell must stay comparable
            recompute = min(recompute, self.fetch.fast_seconds(Tier.DISK, node.size))
        return recompute / node.size if node.size else 0.0

    def disk_value(self, node: PolicyNode) -> float:
        """What a page on disk is worth keeping, per stored byte: its whole recompute cost (the disk
        is the last tier) times the requests that used it lately (`sketch`: a popularity that
        outlives the page's stays in DRAM, which the disk's own count of its reads does not see).
        Called by the disk tier's `cost` policy on its I/O threads: reads only."""
        return self._disk_worth(node) * max(1, self.sketch.estimate(node.key))

    def _disk_worth(self, node: PolicyNode) -> float:
        """A disk page's recompute seconds per stored byte. A page of a namespace no engine attached
        since the daemon started is taken to cost `_UNKNOWN_PAGE_SECONDS`, so it is not the first
        to go for being unknown. Any thread: reads only."""
        assert isinstance(node, DiskEntry)  # the disk policy holds only entries
        if not node.stored_bytes:
            return 0.0
        info = self.m.namespaces.get(node.ns)
        if info is None:
            return _UNKNOWN_PAGE_SECONDS / node.stored_bytes
        model = self.models.get(_model_key(info.ns))  # never made here: this is not the loop's thread
        cost = model.cost if model is not None else default_for(info.ns)
        return cost.page_seconds(info.ns.page_tokens, depth_of(node.depth)) / node.stored_bytes

    def cheaper_to_recompute(self, page: Page) -> bool:
        """Whether `page`, leaving DRAM, is dropped rather than demoted (the `cost` policy's
        drop-or-demote): when an engine would recompute it faster than the daemon reads it back
        from disk, or, the disk being full, when it is worth less than the page the disk would
        evict for it (`_admit`). A page with children on disk is always demoted: they are
        reachable only through it."""
        assert self.m.disk is not None
        if self._drop(page):
            return True
        if page.parent is not None:  # demoted: its parent must follow it (leaf-first on disk too)
            self._parents_of_demoted[page.parent] = None
            if len(self._parents_of_demoted) > _PARENTS_KEPT:
                del self._parents_of_demoted[next(iter(self._parents_of_demoted))]
        return False

    def _drop(self, page: Page) -> bool:
        if page.key in self._parents_of_demoted:  # a child went to disk: reachable only through it
            del self._parents_of_demoted[page.key]
            return False
        if self.m.disk.children_of(page.key):  # type: ignore[union-attr]
            return False
        if not self.fetch.trusted(Tier.DISK):
            return False  # demoted until reads are measured: a default must not starve the disk of reads
        info = self.m._ns_by_id[page.ns]
        recompute = self.model(page.ns).cost.page_seconds(info.ns.page_tokens, depth_of(page.depth))
        if recompute * MARGIN < self.fetch.fast_seconds(Tier.DISK, page.size):
            self._drops += 1
            # one in EXPLORE is demoted all the same, so that reads keep measuring the disk: a rate
            # measured on a slow moment would otherwise drop every page, and never be measured again
            return self._drops % EXPLORE != 0
        return not self._admit(page, recompute)

    def _admit(self, page: Page, recompute: float) -> bool:
        """TinyLFU admission to disk, weighed by cost: with the disk full, a page goes there only
        if it is worth more than the page the disk would evict for it, each its uses lately
        (`sketch`) x its recompute seconds per byte (the disk's own valuation, `disk_value`). Most
        pages written to a full disk are evicted unread (bench policy's mixed trace: 7 in 10):
        what the disk keeps instead is what requests come back for. Counted: `dropped_pages_rare`
        (of `dropped_pages_cheap`). The disk's next victim is found again only when it has
        evicted since."""
        disk = self.m.disk
        assert disk is not None
        self._admissions += 1
        if self._admissions >= 1024:  # the sketch remembers ~ten times the pages the tiers hold
            self._admissions = 0
            self.sketch.fit(ADMIT_WINDOW * (len(self.m.policy) + len(disk)))
        if disk.has_room(self.m.pending_bytes + page.size):
            return True
        evictions = disk.evictions
        victim_worth = self._victim
        if victim_worth is None or victim_worth[0] != evictions:
            victim = disk.next_victim(_is_leaf)
            if victim is None:
                return True
            victim_worth = (evictions, self.sketch.estimate(victim.key) * self._disk_worth(victim))
            self._victim = victim_worth
        if self.sketch.estimate(page.key) * recompute / page.size > victim_worth[1]:
            return True
        self.m.counters["dropped_pages_rare"] += 1
        return False

    def worth_fetching(self, ns_id: int, keys: list[bytes], tiers: list[Tier]) -> int:
        """Fetch or recompute: how many of the hit's pages (`tiers[i]` says where `keys[i]` is) an
        engine should load; it recomputes the rest. The cut k makes fetching pages 0..k plus
        recomputing k..end (x MARGIN) the cheapest: a page whose fetch costs more than its recompute ends the
        hit there unless deeper pages, dearer to recompute, pay for fetching it. Only under the
        `cost` policy and once the namespace's prefill is measured (the default over-estimates);
        a hit of DRAM pages alone is never cut. Pure reads: safe on an engine connection thread."""
        if self.m.policy.name != "cost" or all(t is Tier.DRAM or t is Tier.VRAM for t in tiers):
            return len(tiers)
        info = self.m._ns_by_id.get(ns_id)
        model = self.models.get(_model_key(info.ns)) if info is not None else None
        if info is None or model is None or model.cost.observations == 0:
            return len(tiers)
        if any(not self.fetch.trusted(t) for t in set(tiers) if t is Tier.DISK or t is Tier.DMP):
            return len(tiers)  # a tier's rate is not measured enough: fetch, and measure it
        cost, page_tokens, size = model.cost, info.ns.page_tokens, info.ns.page_bytes
        base = self._depth(keys[0], info.digest)
        fetch = {t: self.fetch.fast_seconds(t, size) for t in set(tiers)}
        # the cut minimizing fetch(0..k) + recompute(k..n) = the deepest k whose suffix gains least
        gain = best = 0.0  # recompute - fetch of pages k..n-1, walking k down from n
        cut = len(tiers)
        for i in range(len(tiers) - 1, -1, -1):
            gain += cost.page_seconds(page_tokens, base + i) * MARGIN - fetch[tiers[i]]
            if gain < best:
                best, cut = gain, i
        return cut

    def _depth(self, key: bytes, digest: bytes) -> int:
        """The depth of a hit's first page, from its depth code in DRAM or on disk (0 when unknown)."""
        page = self.m.index.get(key)
        if page is not None:
            return depth_of(page.depth)
        pending = self.m.pending.get(key)
        if pending is not None:
            return depth_of(pending.depth)
        entry = self.m.disk.entry(key) if self.m.disk is not None else None
        return depth_of(entry.depth) if entry is not None and entry.ns == digest else 0

    def attach(self, policy: EvictionPolicy | None) -> None:
        """Give `policy` this valuer if it is the `cost` policy (after it was made or switched); the
        disk's rate pinned if the operator set one (disk.read_gbps)."""
        self.fetch.pin(Tier.DISK, self.m.cfg.disk.read_gbps)
        if isinstance(policy, CostPolicy):
            policy.valuer = self.value
            policy.sketch = self.sketch

    def report(self) -> dict[str, Any]:
        """For `status`: each model's prefill fit, and the fetch rates."""
        out: dict[str, Any] = {"models": [], "fetch_gbps": {}}
        for key, model in self.models.items():
            c = model.cost
            out["models"].append(
                {
                    "model": key[0],
                    "page_tokens": key[6],
                    "observations": model.observations,
                    "fitted": c.observations > 0,
                    "fixed_ms": c.fixed * 1e3,
                    "per_token_us": c.per_token * 1e6,
                    "per_token_depth_ns": c.per_token_depth * 1e9,
                }
            )
        for tier in (Tier.DRAM, Tier.DMP, Tier.DISK):
            out["fetch_gbps"][tier.name.lower()] = {
                "gbps": self.fetch.gbps(tier),
                "measured": self.fetch.measured(tier),
            }
        out["fetch_gbps_peers"] = {
            peer: {"gbps": gbps, "measured": n} for peer, (gbps, n) in sorted(self.fetch.peers().items())
        }
        counters = self.m.counters
        out["dropped_pages_cheap"] = counters.get("dropped_pages_cheap", 0)
        out["dropped_pages_rare"] = counters.get("dropped_pages_rare", 0)  # of those, not worth a full disk
        out["recompute_instead_pages"] = counters.get("recompute_instead_pages", 0)
        # DRAM admission by worth: pages that came in below the last victim's worth, at the lowest priority
        out["admitted_low_pages"] = getattr(self.m.policy, "admitted_low", 0)
        return out


def _is_leaf(node: PolicyNode) -> bool:
    return not node.children  # type: ignore[attr-defined]  # a DiskEntry


def _model_key(ns: Namespace) -> tuple[object, ...]:
    """What a prefill fit is shared by: the model and its shard, not the cache salt or TP rank."""
    return (ns.model, ns.dtype, ns.layout, ns.num_layers, ns.num_kv_heads, ns.head_dim, ns.page_tokens,
            ns.tp_size, ns.kv_parts)  # fmt: skip
