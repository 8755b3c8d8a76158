"""The plan the scheduler side hands the worker side each step: which pages to load into which
blocks, which blocks to store as which pages."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
)

if TYPE_CHECKING:
    pass


@dataclasses.dataclass
class LoadSpec:
    """Fill `block_ids` from pages `keys[rank]`; the first page's first `skip` blocks are not needed."""

    req_id: str
    salt: str
    keys: list[list[bytes]]  # per TP rank
    block_ids: list[int]
    skip: int = 0
    #: vLLM loads it asynchronously (the request waits, the step does not): `background.py`
    background: bool = False


@dataclasses.dataclass
class SaveSpec:
    """Store pages `keys[rank]` (consecutive in one chain) from `block_ids` (page_blocks per page)."""

    req_id: str
    salt: str
    keys: list[list[bytes]]  # per TP rank
    parents: list[bytes | None]  # per TP rank: the key before keys[rank][0], None at the start
    block_ids: list[int]


@dataclasses.dataclass
class PolarKVMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = dataclasses.field(default_factory=list)
    saves: list[SaveSpec] = dataclasses.field(default_factory=list)
    #: the step computes tokens (of other requests): background loads are paced (`background.py`)
    computing: bool = False


def salt_of(request: Any) -> str:
    """The namespace salt of a request: its cache_salt, plus its LoRA adapter (which changes the KV)."""
    salt = request.cache_salt or ""
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        salt += f"\x00lora:{getattr(lora, 'lora_name', '')}:{getattr(lora, 'lora_path', '')}"
    return salt


def cacheable(request: Any) -> bool:
    """Token ids name the KV only for plain token prompts (not embeddings, not multimodal inputs)."""
    return getattr(request, "prompt_embeds", None) is None and not getattr(request, "mm_features", None)
