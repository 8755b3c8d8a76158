"""Small shared types: tiers, namespaces and page geometry.

A leaf module: it imports nothing else of the package.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import NewType

#: A page key: 16 bytes naming a page and, through its parent chain, its whole prefix (see keys.py).
PageKey = NewType("PageKey", bytes)
KEY_BYTES = 16


class Tier(enum.IntEnum):
    """Where a page lives. The numbers are the tier levels of docs/ARCHITECTURE.md and travel on the wire."""

    VRAM = 1
    DRAM = 2
    DMP = 3
    DISK = 4

    @property
    def label(self) -> str:
        return f"L{int(self)} {self.name.lower()}"


#: Bytes per element of the KV dtypes engines use.
DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}


#: Longest string fields of a namespace (characters). A namespace is held in memory while engines
#: use it, and its model is logged at attach: a client must not make either unbounded. A model is a
#: `name@digest` fingerprint (a hub id or directory name and 32 hex digits); a layout a short tag
#: like "vllm-cuda-lbhnc-flash/v2"; a cache salt is the request's cache_salt (vLLM: any string, in
#: practice a short random token), plus a LoRA adapter's name and path when one is used.
STRING_LIMITS = {"model": 1024, "layout": 128, "cache_salt": 4096}


def _short(value: object, most: int = 64) -> str:
    text = repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."


@dataclasses.dataclass(frozen=True)
class Namespace:
    """Everything that changes the bytes of a page for the same tokens (docs/ARCHITECTURE.md).

    Two engines share pages only when every field is equal. `model` should carry a fingerprint of the
    weights or their config (name plus a digest), not just a name, so two fine-tunes never share KV.
    `layout` names the engine's KV layout inside a page (e.g. "vllm-cpu/v1"); `kv_parts` is 2 for
    separate K and V, 1 for MLA-style latent caches.
    """

    model: str
    dtype: str
    layout: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_tokens: int
    tp_rank: int = 0
    tp_size: int = 1
    kv_parts: int = 2
    cache_salt: str = ""

    def problems(self) -> list[str]:
        """Reasons this namespace is unusable; empty when it is valid. Messages quote a client's
        values only shortened: they are logged and sent back."""
        out = []
        for name, most in STRING_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, str):
                out.append(f"{name} must be a string, got {type(value).__name__}")
            elif len(value) > most:
                out.append(f"{name} must be at most {most} characters, got {len(value)}")
        if isinstance(self.model, str) and not self.model:
            out.append("model must be a non-empty fingerprint")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPE_BYTES:
            out.append(f"dtype {_short(self.dtype)} is not one of {sorted(DTYPE_BYTES)}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_tokens", "tp_size", "kv_parts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1 << 20:
                out.append(f"{name} must be an integer in 1..{1 << 20}, got {_short(value)}")
        tp_size = self.tp_size if isinstance(self.tp_size, int) and 1 <= self.tp_size <= 1 << 20 else 1
        if (
            not isinstance(self.tp_rank, int)
            or isinstance(self.tp_rank, bool)
            or not 0 <= self.tp_rank < tp_size
        ):
            out.append(f"tp_rank must be in 0..tp_size-1, got {_short(self.tp_rank)}")
        return out

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer slice of one page (K and V of every KV head)."""
        return self.kv_parts * self.num_kv_heads * self.head_dim * self.page_tokens * self.itemsize

    @property
    def page_bytes(self) -> int:
        return self.num_layers * self.layer_bytes

    def to_wire(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: object) -> Namespace:
        if not isinstance(data, dict):
            raise TypeError("namespace must be a map")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            shown = sorted(f"{u!s:.40}" for u in unknown)  # client text: clipped
            raise TypeError(
                f"unknown namespace fields {shown[:8]}"
                + (f" and {len(shown) - 8} more" if len(shown) > 8 else "")
            )
        return cls(**data)
