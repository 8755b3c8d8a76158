"""What each page of the memory tiers is worth keeping, for the `cost` eviction policy: per namespace
the engines' prefill cost (cost_model.RecomputeModel), per tier what fetching a page back costs
(cost_model.FetchCosts), and the valuer the policy calls (docs/DESIGN-NOTES.md, "Cost-aware
retention").

A page's worth is what losing it from its tier would cost the next request that needs it, per byte:
the cheaper of recomputing it (its namespace's fit at its depth in the chain) and fetching it back
from the tier it would be demoted to (the disk tier when there is one); with nowhere to go, its whole
recompute cost. Under `cost`, a page that is cheaper to recompute than to read back from disk is
dropped when it leaves DRAM rather than demoted (`cheaper_to_recompute`).

A part of the manager (polarkvd/manager/__init__.py): the models are its own state; the pages and
namespaces are the manager's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from polarkvd.cost_model import FetchCosts, RecomputeModel, default_for
from polarkvd.index import Page, depth_of
from polarkvd.policy import CostPolicy, EvictionPolicy, PolicyNode
from polarkvd.tiers.disk_index import DiskEntry
from polarkvd.types import Namespace, Tier

#: what a disk page of a namespace not attached since start is taken to cost to recompute: a
#: 128-token page at 3 ms a token (the default's scale for a 30-layer model)
_UNKNOWN_PAGE_SECONDS = 0.4

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
            recompute = min(recompute, self.fetch.seconds(Tier.DISK, node.size))
        return recompute / node.size if node.size else 0.0

    def disk_value(self, node: PolicyNode) -> float:
        """What a page on disk is worth keeping, per stored byte: its whole recompute cost (the disk
        is the last tier). Called by the disk tier's `cost` policy on its I/O threads: reads only.
        A page of a namespace no engine attached since the daemon started is taken to cost
        `_UNKNOWN_PAGE_SECONDS`, so it is not the first to go for being unknown."""
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
        """Whether an engine would recompute `page` faster than the daemon reads it back from disk:
        then it is dropped when it leaves DRAM, not demoted (the `cost` policy's drop-or-demote). A
        page with children on disk is always demoted: they are reachable only through it."""
        assert self.m.disk is not None
        info = self.m._ns_by_id[page.ns]
        recompute = self.model(page.ns).cost.page_seconds(info.ns.page_tokens, depth_of(page.depth))
        if recompute >= self.fetch.seconds(Tier.DISK, page.size):
            return False
        return self.m.disk.children_of(page.key) == 0

    def attach(self, policy: EvictionPolicy | None) -> None:
        """Give `policy` this valuer if it is the `cost` policy (after it was made or switched)."""
        if isinstance(policy, CostPolicy):
            policy.valuer = self.value

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
        return out


def _model_key(ns: Namespace) -> tuple[object, ...]:
    """What a prefill fit is shared by: the model and its shard, not the cache salt or TP rank."""
    return (ns.model, ns.dtype, ns.layout, ns.num_layers, ns.num_kv_heads, ns.head_dim, ns.page_tokens,
            ns.tp_size, ns.kv_parts)  # fmt: skip
