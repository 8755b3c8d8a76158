"""Selective recompute (CacheBlend): a prompt's KV from chunks whose KV was computed on their own.

Owns the layer loop that blends: cached chunks are placed at their positions in the prompt (their
keys re-rotated by the offset), the other tokens (the question, uncached chunks) are computed in
full, and at the check layers the reused tokens whose fresh keys deviate most from the cached ones
(the fraction `r`) are chosen; only those and the fresh tokens are carried through the later layers,
their fresh KV written over the cached KV. It runs the model's own modules (blend/model.py), in
torch, one sequence at a time; it knows nothing of the daemon or of pages.

Shapes: a chunk's or a prompt's KV is two tensors `[layers, kv_heads, tokens, head_dim]`, keys
after rotary embedding, as `transformers`' cache holds them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from polarkvd.blend.model import ModelParts, model_parts

#: The default fraction of reused tokens recomputed (CacheBlend's ~15%).
DEFAULT_R = 0.15
#: The default check layers: layer 0's KV depends on nothing but the token and its position, so a
#: re-rotated cached key is already exact there; layer 1 is the first whose KV deviates.
DEFAULT_CHECK_LAYERS = (1,)
#: Tokens always recomputed at the start of every cached chunk: its first token, computed as the
#: first of a sequence (an attention sink) or right after the context, deviates most.
DEFAULT_KEEP_FIRST = 1
#: Reused tokens always recomputed right before the question: the next token attends to them most.
DEFAULT_KEEP_LAST = 64


@dataclasses.dataclass
class ChunkKV:
    """A chunk's KV computed on its own: `keys`, `values` are `[layers, kv_heads, tokens, head_dim]`;
    `start` is the position of its first token when computed (0, or the length of the context it
    was computed behind)."""

    keys: Any
    values: Any
    start: int = 0

    @property
    def tokens(self) -> int:
        return int(self.keys.shape[2])


@dataclasses.dataclass
class Segment:
    """A piece of a prompt: its token ids and, when it is a cached chunk, its KV."""

    token_ids: Sequence[int]
    kv: ChunkKV | None = None


@dataclasses.dataclass
class Blended:
    """A blended prompt: its KV (`[layers, kv_heads, tokens, head_dim]`), the logits of its last
    token, how many tokens were reused, recomputed and computed fresh, and the positions of the
    reused tokens recomputed through every layer (`selected`)."""

    keys: Any
    values: Any
    logits: Any
    reused: int
    recomputed: int
    fresh: int
    selected: list[int] = dataclasses.field(default_factory=list)


def rotate(keys: Any, offset: int, inv_freq: Any) -> Any:
    """Keys computed at positions t move to t + `offset`: one more rotary rotation by `offset`
    (rotations compose by adding angles). `keys` is `[..., tokens, head_dim]` in the rotate-half
    layout of `transformers`' Llama."""
    import torch

    if offset == 0:
        return keys
    angles = offset * inv_freq.to(device=keys.device, dtype=torch.float64)
    emb = torch.cat((angles, angles))
    cos, sin = emb.cos().to(keys.dtype), emb.sin().to(keys.dtype)
    half = keys.shape[-1] // 2
    rotated_half = torch.cat((-keys[..., half:], keys[..., :half]), dim=-1)
    return keys * cos + rotated_half * sin


def compute_chunk(model: Any, token_ids: Sequence[int], context: Sequence[int] = ()) -> ChunkKV:
    """A chunk's KV on its own (what a chunk page stores): from position 0, or behind `context`
    (the prompts' shared header, e.g. a system prompt), whose KV is left out."""
    import torch

    model_parts(model)  # refuse what cannot be blended before spending a prefill on it
    before = len(context)
    with torch.inference_mode():
        ids = torch.as_tensor([*context, *token_ids], dtype=torch.long, device=model.device)[None]
        cache = model(ids, use_cache=True).past_key_values
        keys = torch.stack([layer.keys[0, :, before:] for layer in cache.layers])
        values = torch.stack([layer.values[0, :, before:] for layer in cache.layers])
    return ChunkKV(keys, values, before)


def _keep_fractions(r: float, checks: int) -> list[float]:
    """Fraction of the reused tokens kept after each check layer: the last one keeps `r`, earlier
    ones more (gradual filtering): r·m, r·m/2, ... r for m check layers, at most 1."""
    return [min(1.0, r * checks / (j + 1)) for j in range(checks)]


def blend(
    model: Any,
    segments: Sequence[Segment],
    r: float = DEFAULT_R,
    check_layers: Sequence[int] = DEFAULT_CHECK_LAYERS,
    keep_first: int = DEFAULT_KEEP_FIRST,
    keep_last: int = DEFAULT_KEEP_LAST,
) -> Blended:
    """The KV of the prompt `segments` make (concatenated in order) and its last token's logits.

    `r`: fraction of the reused tokens recomputed (0: plain reuse of the cached KV; 1: every token,
    which equals a full prefill). `check_layers`: layers where the tokens to carry are chosen, by the
    squared distance between their fresh and their cached keys; the layers before the first check
    layer are computed for every token. Whatever the distances, the selection holds the first
    `keep_first` tokens of every cached chunk (right after a chunk boundary) and the last `keep_last`
    reused tokens before the question (those it attends to most); they count in `r`'s budget, which
    grows only when they outnumber it. The last segment must be computed fresh (not a cached
    chunk): its last token's logits are the answer's first.
    """
    import torch

    parts = model_parts(model)
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"r must be between 0 and 1, not {r}")
    checks = sorted(set(int(c) for c in check_layers))
    if not checks or checks[0] < 0 or checks[-1] >= parts.num_layers:
        raise ValueError(
            f"check layers must be layer indices in [0, {parts.num_layers}), not {list(check_layers)}"
        )
    if not segments or segments[-1].kv is not None:
        raise ValueError("the last segment (the question) must be computed, not a cached chunk")
    for s in segments:
        if s.kv is not None and s.kv.tokens != len(s.token_ids):
            raise ValueError(f"a chunk of {len(s.token_ids)} tokens came with KV for {s.kv.tokens}")
    if any(len(s.token_ids) == 0 for s in segments):
        raise ValueError("empty segment")
    if keep_first < 0 or keep_last < 0:
        raise ValueError(f"keep_first and keep_last are token counts, not {keep_first}, {keep_last}")

    with torch.inference_mode():
        return _blend(parts, segments, r, checks, keep_first, keep_last)


def _blend(
    parts: ModelParts,
    segments: Sequence[Segment],
    r: float,
    checks: list[int],
    keep_first: int,
    keep_last: int,
) -> Blended:
    import torch
    import torch.nn.functional as F

    ids = torch.as_tensor([t for s in segments for t in s.token_ids], dtype=torch.long)
    total = int(ids.numel())
    weight = parts.embed.weight
    dtype, device = weight.dtype, weight.device
    shape = (parts.num_layers, parts.num_kv_heads, total, parts.head_dim)
    keys = torch.empty(shape, dtype=dtype, device=device)
    values = torch.empty(shape, dtype=dtype, device=device)
    reused = torch.zeros(total, dtype=torch.bool)
    forced = torch.zeros(total, dtype=torch.bool)  # always selected (keep_first, keep_last)
    at = last_reused = 0
    for s in segments:
        n = len(s.token_ids)
        if s.kv is not None:
            keys[:, :, at : at + n] = rotate(s.kv.keys.to(device, dtype), at - s.kv.start, parts.inv_freq)
            values[:, :, at : at + n] = s.kv.values.to(device, dtype)
            reused[at : at + n] = True
            forced[at : at + min(n, keep_first)] = True
            last_reused = at + n
        at += n
    if keep_last:
        forced[max(0, last_reused - keep_last) : last_reused] = True
    n_reused = int(reused.sum())
    fresh_idx = torch.nonzero(~reused).flatten()

    positions = torch.arange(total, device=device)
    freqs = positions[:, None].double() * parts.inv_freq.to(device, torch.float64)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos_all, sin_all = emb.cos().to(dtype), emb.sin().to(dtype)

    # Tokens whose hidden state is carried; all of them up to the first check layer. With r = 0
    # nothing reused is ever recomputed: only the fresh tokens run (plain chunk reuse).
    active = positions if r > 0 and n_reused else fresh_idx.to(device)
    keep = dict(zip(checks, _keep_fractions(r, len(checks))))
    hidden = parts.embed(ids.to(device)[active])[None]
    groups = parts.num_heads // parts.num_kv_heads
    hd = parts.head_dim

    for i, layer in enumerate(parts.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        n = x.shape[1]
        q = attn.q_proj(x).view(1, n, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
        v = attn.v_proj(x).view(1, n, -1, hd).transpose(1, 2)
        cos, sin = cos_all[active], sin_all[active]
        q = q * cos + torch.cat((-q[..., hd // 2 :], q[..., : hd // 2]), dim=-1) * sin
        k = k * cos + torch.cat((-k[..., hd // 2 :], k[..., : hd // 2]), dim=-1) * sin
        if i in keep and n > len(fresh_idx):
            # Choose among the carried reused tokens those whose fresh key is farthest from the cached
            # one; the cached KV stays for the others, from this layer on.
            is_reused = reused.to(device)[active]
            cand = torch.nonzero(is_reused).flatten()
            dev = ((k[0][:, cand] - keys[i][:, active[cand]]) ** 2).sum(dim=(0, 2))
            must = forced.to(device)[active[cand]]
            dev[must] = math.inf
            n_keep = min(len(cand), max(math.ceil(keep[i] * n_reused), int(must.sum())))
            chosen = cand[torch.topk(dev, n_keep).indices] if n_keep < len(cand) else cand
            sel = torch.sort(torch.cat((chosen, torch.nonzero(~is_reused).flatten()))).values
            active, hidden, q, k, v = active[sel], hidden[:, sel], q[:, :, sel], k[:, :, sel], v[:, :, sel]
            n = len(sel)
        keys[i][:, active] = k[0]
        values[i][:, active] = v[0]
        kk, vv = keys[i][None], values[i][None]
        if groups > 1:
            kk, vv = kk.repeat_interleave(groups, dim=1), vv.repeat_interleave(groups, dim=1)
        if n == total:
            out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=attn.scaling)
        else:
            mask = positions[None, :] <= active[:, None]
            out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=attn.scaling)
        hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(1, n, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    logits = parts.lm_head(parts.norm(hidden[:, -1:]))[0, -1]
    selected = active[reused.to(device)[active]] if r > 0 and n_reused else active[:0]
    return Blended(keys, values, logits, n_reused, len(selected), len(fresh_idx), selected.tolist())
