"""Hugging Face `transformers` generation with polarkvd: prefix pages around `generate`, and chunks
blended with selective recompute (polarkvd/blend).

    with PolarKVGenerator(model, tokenizer) as g:
        out = g.generate("What is the capital of France?", max_new_tokens=20)     # prefix pages
        out = g.generate(chunks=[doc1, doc2, doc3], question="Which ...?", r=0.15)  # CacheBlend

Owns the page format of a `transformers` KV cache (a page: `[layers][K, V][kv_heads][tokens][head_dim]`
of `page_tokens` tokens, the model's dtype), the namespace a model gets (its weights' fingerprint,
dtype, layout, geometry, the cache salt), and moving pages between the daemon and `transformers`'
cache. Prefix pages are keyed as every engine's are (`EngineClient.page_keys`); a chunk's pages,
computed on their own (from position 0, or behind the prompts' shared header), are a key family of
their own (`keys.chunk_keys`), stored whole (the last page zero-padded) and looked up as a chain
from the chunk root (the header's, `keys.chunk_root`). One sequence at a
time. Talks to the daemon only through the client library; torch and transformers are imported
inside the functions only.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import xxhash

from polarkvd.blend import (
    DEFAULT_CHECK_LAYERS,
    DEFAULT_KEEP_LAST,
    DEFAULT_R,
    ChunkKV,
    Segment,
    blend,
    compute_chunk,
    model_parts,
)
from polarkvd.client import EngineClient
from polarkvd.connectors.fingerprint import sample_file
from polarkvd.errors import PolarKVError
from polarkvd.keys import chunk_keys
from polarkvd.types import DTYPE_BYTES, Namespace, PageKey

#: The page layout of this integration; part of the namespace, so another layout never mixes with it.
LAYOUT = "hf-transformers/v1"
#: Tokens per page. Prefix pages: a prompt's last partial page is never stored.
DEFAULT_PAGE_TOKENS = 32
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_fingerprint(model: Any) -> str:
    """`name@digest` of a loaded model: its config and, when it was loaded from a local directory,
    every weight file's size and 16 sampled chunks (connectors/fingerprint.py). A model without a
    local directory (built in memory) is named by its config only."""
    config = model.config
    h = xxhash.xxh3_128(b"polarkv-hf-model-v1")
    cfg = config.to_dict()
    for k in ("transformers_version", "_name_or_path", "name_or_path", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    source = str(getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")
    path = Path(source) if source else None
    if path is not None and path.is_dir():
        for f in sorted(path.iterdir()):
            if f.is_file() and f.suffix in _WEIGHTS:
                sample_file(h, f)
        label = path.resolve().name
    else:
        label = source.rstrip("/").split("/")[-1] or str(getattr(config, "model_type", "model"))
    return f"{label[:200]}@{h.hexdigest()}"


@dataclasses.dataclass
class Prefill:
    """A prompt's KV (`[layers, kv_heads, tokens, head_dim]`) and its last token's logits, with how
    it was made: tokens loaded from prefix pages, or reused / recomputed / fresh in a blend."""

    input_ids: list[int]
    keys: Any
    values: Any
    logits: Any
    loaded_tokens: int = 0
    reused: int = 0
    recomputed: int = 0
    fresh: int = 0
    seconds: float = 0.0

    def cache(self, model: Any, tokens: int | None = None) -> Any:
        """A `transformers` DynamicCache holding the first `tokens` tokens (default: all)."""
        from transformers import DynamicCache

        n = len(self.input_ids) if tokens is None else tokens
        cache = DynamicCache(config=model.config)
        for i in range(self.keys.shape[0]):
            cache.update(self.keys[i, :, :n][None].clone(), self.values[i, :, :n][None].clone(), i)
        return cache


class PolarKVGenerator:
    """A model and its tokenizer attached to a polarkvd daemon (one namespace, one session).

    `salt`: the cache salt (tenants that must never share KV use different salts). `store`: write
    what was computed (prefix pages after a prefill, chunks computed on their own) to the daemon.
    Models blending cannot handle are refused here, with the reason (`blend.UnsupportedModel`).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        socket_path: str | Path | None = None,
        page_tokens: int = DEFAULT_PAGE_TOKENS,
        salt: str = "",
        engine_id: str = "",
        fingerprint: str = "",
        store: bool = True,
        client: EngineClient | None = None,
    ) -> None:
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.parts = model_parts(model)
        self.dtype = next(model.parameters()).dtype
        dtype_name = str(self.dtype).removeprefix("torch.")
        if dtype_name not in DTYPE_BYTES:
            raise PolarKVError(f"cannot store KV of dtype {dtype_name}")
        self.store = store
        self.namespace = Namespace(
            model=fingerprint or model_fingerprint(model),
            dtype=dtype_name,
            layout=LAYOUT,
            num_layers=self.parts.num_layers,
            num_kv_heads=self.parts.num_kv_heads,
            head_dim=self.parts.head_dim,
            page_tokens=page_tokens,
            cache_salt=salt,
        )
        self._own_client = client is None
        self.client = client or EngineClient(self.namespace, engine_id or "hf", socket_path)
        self._page_shape = (
            self.parts.num_layers,
            2,
            self.parts.num_kv_heads,
            page_tokens,
            self.parts.head_dim,
        )
        self._torch = torch

    # -- pages <-> tensors -------------------------------------------------------------------------

    def _page_writer(self, keys: Any, values: Any, first_page: int) -> Any:
        pt = self.namespace.page_tokens
        total = keys.shape[2]

        def write(i: int, view: memoryview) -> None:
            page = self._torch.frombuffer(view, dtype=self.dtype).view(self._page_shape)
            s = (first_page + i) * pt
            m = min(pt, total - s)
            page[:, 0, :, :m] = keys[:, :, s : s + m]
            page[:, 1, :, :m] = values[:, :, s : s + m]
            if m < pt:
                page[:, :, :, m:] = 0

        return write

    def _load(self, keys: Sequence[bytes], tokens: int) -> tuple[Any, Any] | None:
        """The KV of the first `tokens` tokens from the pages `keys` (all of them must load), or None."""
        torch = self._torch
        r = self.client.load(keys)
        try:
            if r.loaded < len(keys):
                return None
            shape = (self.parts.num_layers, self.parts.num_kv_heads, len(keys) * self.namespace.page_tokens)
            k = torch.empty((*shape, self.parts.head_dim), dtype=self.dtype, device=self.model.device)
            v = torch.empty_like(k)
            pt = self.namespace.page_tokens
            for n, view in enumerate(r.views):
                page = torch.frombuffer(view, dtype=self.dtype).view(self._page_shape)
                k[:, :, n * pt : (n + 1) * pt] = page[:, 0]
                v[:, :, n * pt : (n + 1) * pt] = page[:, 1]
        finally:
            if r.lease is not None:
                self.client.release(r.lease)
        return k[:, :, :tokens], v[:, :, :tokens]

    # -- prefix pages ------------------------------------------------------------------------------

    def prefill(self, input_ids: Sequence[int]) -> Prefill:
        """A full prefill of `input_ids` that starts from the longest cached prefix (whole pages,
        never the last token), then stores the prompt's new full pages."""
        torch = self._torch
        ids = [int(t) for t in input_ids]
        if not ids:
            raise ValueError("empty prompt")
        t0 = time.perf_counter()
        keys = self.client.page_keys(ids[:-1])
        hits = self.client.lookup(keys).hits if keys else 0
        loaded = self._load(keys[:hits], hits * self.namespace.page_tokens) if hits else None
        with torch.inference_mode():
            if loaded is None:
                hits = 0
                out = self.model(torch.tensor([ids], device=self.model.device), use_cache=True)
            else:
                past = Prefill(ids, loaded[0], loaded[1], None).cache(self.model)
                start = hits * self.namespace.page_tokens
                rest = torch.tensor([ids[start:]], device=self.model.device)
                out = self.model(rest, past_key_values=past, use_cache=True)
            cache = out.past_key_values
            k = torch.stack([layer.keys[0] for layer in cache.layers])
            v = torch.stack([layer.values[0] for layer in cache.layers])
        p = Prefill(ids, k, v, out.logits[0, -1], loaded_tokens=hits * self.namespace.page_tokens)
        p.fresh = len(ids) - p.loaded_tokens
        p.seconds = time.perf_counter() - t0
        if self.store:
            all_keys = self.client.page_keys(ids)
            if len(all_keys) > hits:
                parent = all_keys[hits - 1] if hits else None
                self.client.store(all_keys[hits:], self._page_writer(k, v, hits), parent=parent)
        return p

    # -- chunks ------------------------------------------------------------------------------------

    def chunk_keys(self, token_ids: Sequence[int], context: Sequence[int] = ()) -> list[PageKey]:
        """The chunk-page keys of a chunk's tokens in this namespace, computed behind `context`
        (keys.chunk_keys)."""
        return chunk_keys(self.client.ns_digest, token_ids, self.namespace.page_tokens, context)

    def lookup_chunks(self, chunks: Sequence[Sequence[int]], context: Sequence[int] = ()) -> list[bool]:
        """Whether each chunk (computed behind `context`) is cached whole, every one of its pages."""
        out = []
        for tokens in chunks:
            keys = self.chunk_keys(tokens, context)
            out.append(bool(keys) and self.client.lookup(keys).hits == len(keys))
        return out

    def chunk(
        self, token_ids: Sequence[int], compute: bool = True, context: Sequence[int] = ()
    ) -> ChunkKV | None:
        """A chunk's KV from its pages, else computed on its own behind `context` (the prompts'
        shared header; none: from position 0) and stored, with `store`; None when it is not cached
        and `compute` is False."""
        tokens = [int(t) for t in token_ids]
        ctx = [int(t) for t in context]
        keys = self.chunk_keys(tokens, ctx)
        if keys and self.client.lookup(keys).hits == len(keys):
            pages = self._load(keys, len(tokens))
            if pages is not None:
                return ChunkKV(*pages, start=len(ctx))
        if not compute:
            return None
        kv = compute_chunk(self.model, tokens, ctx)
        if self.store:
            self.client.store(keys, self._page_writer(kv.keys, kv.values, 0))
        return kv

    def blend(
        self,
        chunks: Sequence[Sequence[int] | str],
        question: Sequence[int] | str,
        r: float = DEFAULT_R,
        check_layers: Sequence[int] = DEFAULT_CHECK_LAYERS,
        prefix: Sequence[int] | str = (),
        compute_missing: bool = False,
        behind_prefix: bool = True,
        keep_last: int = DEFAULT_KEEP_LAST,
    ) -> Prefill:
        """The KV of `prefix + chunks + question` with cached chunks reused and the fraction `r` of
        their tokens recomputed (blend.blend). A chunk not in the daemon is computed with the rest of
        the prompt, in full (or, with `compute_missing`, on its own first and stored, so that the
        next prompt reuses it). `prefix` (e.g. a system prompt) is computed in full, like the question;
        with `behind_prefix` the chunks are those computed behind it (keyed with it: closer to the
        full prefill, reused only behind the same prefix), else those computed from position 0."""
        t0 = time.perf_counter()
        segments = []
        pre = self._tokens(prefix)
        if pre:
            segments.append(Segment(pre))
        context = pre if behind_prefix else []
        for c in chunks:
            tokens = self._tokens(c)
            if tokens:
                segments.append(Segment(tokens, self.chunk(tokens, compute=compute_missing, context=context)))
        q = self._tokens(question)
        if not q:
            raise ValueError("empty question: blending needs at least one token computed after the chunks")
        segments.append(Segment(q))
        b = blend(self.model, segments, r=r, check_layers=check_layers, keep_last=keep_last)
        ids = [t for s in segments for t in s.token_ids]
        return Prefill(
            ids,
            b.keys,
            b.values,
            b.logits,
            reused=b.reused,
            recomputed=b.recomputed,
            fresh=b.fresh,
            seconds=time.perf_counter() - t0,
        )

    def split(self, prompt: str, separator: str) -> tuple[list[str], str]:
        """A prompt split into chunks at `separator` (kept at the end of each chunk) and the question
        (the last piece)."""
        pieces = prompt.split(separator)
        return [p + separator for p in pieces[:-1]], pieces[-1]

    # -- generation --------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        chunks: Sequence[Sequence[int] | str] | None = None,
        question: Sequence[int] | str | None = None,
        prefix: Sequence[int] | str = (),
        separator: str | None = None,
        r: float = DEFAULT_R,
        check_layers: Sequence[int] = DEFAULT_CHECK_LAYERS,
        **generate_kwargs: Any,
    ) -> Any:
        """`model.generate` over a prompt prefilled with polarkvd: returns what it returns (token
        ids `[1, prompt + new]`).

        A plain `prompt` (text or token ids) uses prefix pages. `chunks` and `question`, or a text
        `prompt` with a `separator` that splits it into chunks (the last piece is the question), are
        blended (`r`, `check_layers`), behind `prefix` (a system prompt or chat template head shared
        by the prompts: the chunks are computed and cached behind it).
        """
        if chunks is not None or separator is not None:
            if separator is not None:
                if not isinstance(prompt, str):
                    raise ValueError("a separator splits a text prompt; pass chunks= for token ids")
                chunks, question = self.split(prompt, separator)
            if question is None:
                raise ValueError("blending needs a question after the chunks")
            p = self.blend(chunks or [], question, r=r, check_layers=check_layers, prefix=prefix)
        elif prompt is not None:
            p = self.prefill(self._tokens(prompt))
        else:
            raise ValueError("nothing to generate from: pass a prompt, or chunks and a question")
        return self.generate_from(p, **generate_kwargs)

    def generate_from(self, p: Prefill, **generate_kwargs: Any) -> Any:
        """`model.generate` continuing a prefilled prompt: the cache holds all but its last token,
        which `generate` computes (its KV and logits are those of the prefill: it attends only to
        what came before)."""
        torch = self._torch
        ids = torch.tensor([p.input_ids], device=self.model.device)
        cache = p.cache(self.model, len(p.input_ids) - 1)
        with torch.inference_mode():
            return self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, **generate_kwargs
            )

    def _tokens(self, x: Sequence[int] | str) -> list[int]:
        if isinstance(x, str):
            if self.tokenizer is None:
                raise ValueError("text given but no tokenizer: pass token ids, or a tokenizer")
            return list(self.tokenizer(x, add_special_tokens=False)["input_ids"])
        return [int(t) for t in x]

    # -- lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        if self._own_client:
            self.client.close()

    def __enter__(self) -> PolarKVGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
