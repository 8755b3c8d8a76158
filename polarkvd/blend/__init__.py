"""CacheBlend's selective recompute for decoder-only models with rotary position embeddings.

Reuse a chunk's KV wherever the chunk lands in a prompt, not only as a prefix: each chunk's KV is
computed on its own (`compute_chunk`), then `blend` places the chunks at their positions, computes the
question in full and recomputes only the fraction `r` of reused tokens whose KV deviates most,
restoring most of the cross-attention between chunks. Written against torch and the model's own
modules (Llama family: blend/model.py says which models and why others are refused); torch is
imported inside the functions only. Storing chunks in the daemon and generating with the result is
`polarkvd.connectors.hf`. See docs/BLEND.md.
"""

from __future__ import annotations

from polarkvd.blend.model import ModelParts, UnsupportedModel, model_parts
from polarkvd.blend.recompute import (
    DEFAULT_CHECK_LAYERS,
    DEFAULT_KEEP_FIRST,
    DEFAULT_KEEP_LAST,
    DEFAULT_R,
    Blended,
    ChunkKV,
    Segment,
    blend,
    compute_chunk,
    rotate,
)

__all__ = [
    "DEFAULT_CHECK_LAYERS",
    "DEFAULT_KEEP_FIRST",
    "DEFAULT_KEEP_LAST",
    "DEFAULT_R",
    "Blended",
    "ChunkKV",
    "ModelParts",
    "Segment",
    "UnsupportedModel",
    "blend",
    "compute_chunk",
    "model_parts",
    "rotate",
]
