"""Which Hugging Face models selective recompute can drive, and the parts of one it uses.

Blending reads the model's own modules (embedding, decoder layers, their projections, norms and MLP,
the rotary embedding, the final norm and the head) and runs them in its own layer loop: this module
owns checking that a model has exactly those parts, with a position encoding that moving a cached
chunk can undo exactly (a pure rotation), and refusing any other model with the reason. It imports
no torch itself: it only reads attributes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from polarkvd.errors import PolarKVError

#: `config.model_type`s whose decoder layers are the Llama layer: pre-norm, q/k/v/o projections,
#: rotary embeddings on q and k, grouped-query attention, a gated MLP. Only "llama" is tested
#: (SmolLM2); others are refused rather than guessed at.
ARCHITECTURES = ("llama",)

#: Rotary types for which the angle is linear in the position, so moving a key by p positions is
#: one more rotation by p times the same frequencies (re-rotation is exact).
ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModel(PolarKVError):
    """The model cannot be blended; the message says why."""


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """The modules and shapes of a supported model that blending uses."""

    embed: Any
    layers: Any
    norm: Any
    lm_head: Any
    inv_freq: Any  # the rotary embedding's frequencies (torch tensor, head_dim / 2)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_type: str


def model_parts(model: Any) -> ModelParts:
    """The parts of `model` (a `transformers` causal LM) that blending uses, or `UnsupportedModel`
    naming what is missing or different."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModel(f"{type(model).__name__} has no `config`: not a transformers model")
    mtype = getattr(config, "model_type", None)
    if mtype not in ARCHITECTURES:
        rotary = _rope_params(config) is not None or getattr(config, "rope_theta", None) is not None
        why = "it has no rotary position embedding" if not rotary else "its architecture is not known here"
        raise UnsupportedModel(
            f"cannot blend a {mtype!r} model ({type(model).__name__}): {why}; "
            f"selective recompute supports {', '.join(ARCHITECTURES)}"
        )
    inner = getattr(model, "model", None)
    rotary_emb = getattr(inner, "rotary_emb", None)
    inv_freq = getattr(rotary_emb, "inv_freq", None)
    if inner is None or inv_freq is None:
        raise UnsupportedModel(f"cannot blend {type(model).__name__}: it has no rotary embedding module")
    rope_type = str(getattr(rotary_emb, "rope_type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModel(
            f"cannot blend a model with rope type {rope_type!r}: a cached key moves to a new position "
            f"by one rotation only for {', '.join(ROPE_TYPES)}"
        )
    if float(getattr(rotary_emb, "attention_scaling", 1.0)) != 1.0:
        raise UnsupportedModel("cannot blend a model whose rotary embedding scales attention")
    if getattr(config, "sliding_window", None):
        raise UnsupportedModel("cannot blend a model with sliding-window attention")
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return ModelParts(
        embed=inner.embed_tokens,
        layers=inner.layers,
        norm=inner.norm,
        lm_head=model.lm_head,
        inv_freq=inv_freq,
        num_layers=int(config.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        rope_type=rope_type,
    )


def _rope_params(config: Any) -> Any:
    return getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
