"""`PolarKVConnector`, the class vLLM instantiates: the scheduler side or the worker side by role."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from polarkvd.connectors.vllm.geometry import build_geometry
from polarkvd.connectors.vllm.kv_events import kv_events_spec
from polarkvd.connectors.vllm.metadata import PolarKVMetadata
from polarkvd.connectors.vllm.options import Options
from polarkvd.connectors.vllm.scheduler import SchedulerSide
from polarkvd.connectors.vllm.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


# Under "vllm." so vLLM's logging config (format, VLLM_LOGGING_LEVEL) applies to our lines too.
logger = init_logger("vllm.polarkvd.connector")


class PolarKVConnector(KVConnectorBase_V1):
    """vLLM v1 KV connector backed by the polarkvd daemon (see the module docstring)."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.options = Options.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        self.geometry = build_geometry(vllm_config, kv_cache_config, self.options)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(self.geometry, self.options, kv_events_spec(vllm_config))
            policy = getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute")
            if policy != "recompute":
                logger.warning(
                    'PolarKVConnector: kv_load_failure_policy is %r; set it to "recompute" in '
                    "--kv-transfer-config, or a page evicted between lookup and load fails the request",
                    policy,
                )
        else:
            self._worker = WorkerSide(self.geometry, self.options)

    @property
    def requires_kv_delivery(self) -> bool:
        # A best-effort cache: a store lost to a preemption is a future miss, not a wrong answer.
        return False

    @property
    def stats(self) -> dict[str, float]:
        """Counters of this side (tests and debugging): pages loaded, failed, stored, bytes, seconds."""
        side = self._worker or self._scheduler
        out: dict[str, float] = dict(side.stats) if side else {}
        if self._worker is not None:
            out.update({f"{k}_seconds": v for k, v in self._worker.stats_seconds.items()})
            background = self._worker.background
            if background is not None:  # loads vLLM ran asynchronously: counted in the totals too
                for k, v in background.stats.items():
                    out[k] = out.get(k, 0) + v
                    out[f"async_{k}"] = v
                out.update({f"async_{k}_seconds": v for k, v in background.stats_seconds.items()})
            mover = self._worker.mover
            if mover is not None:  # bytes by copy path (CUDA): load_vram, load_direct, load_staged, save_...
                out.update({f"copied_{k}_bytes": v for k, v in mover.copied.items()})
        return out

    @property
    def worker(self) -> WorkerSide | None:
        return self._worker

    # ==============================
    # Worker-side methods
    # ==============================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if self._worker is not None and isinstance(meta, PolarKVMetadata):
            self._worker.start_load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._worker is not None:
            self._worker.wait_layer(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        meta = self._connector_metadata
        if self._worker is not None and isinstance(meta, PolarKVMetadata):
            self._worker.save_layer(layer_name, meta)

    def wait_for_save(self) -> None:
        if self._worker is not None:
            meta = self._connector_metadata
            self._worker.wait_save(meta if isinstance(meta, PolarKVMetadata) else None)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        # (stores: none pending at a request's end; loads: the asynchronous ones that ended)
        if self._worker is None:
            return None, None
        return None, self._worker.take_finished_loads() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_errors() if self._worker is not None else set()

    def shutdown(self) -> None:
        for side in (self._worker, self._scheduler):
            if side is not None:
                side.close()

    # ==============================
    # Scheduler-side methods
    # ==============================

    def on_new_request(self, request: Request) -> None:
        if self._scheduler is not None:
            self._scheduler.on_new_request(request)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self._scheduler is not None:
            self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Stores happen during the steps that complete each page; nothing is pending at the end.
        if self._scheduler is not None:
            self._scheduler.request_finished(request)
        return False, None
