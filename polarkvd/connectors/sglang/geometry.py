"""What the backend knows of SGLang's host pool: the page's bytes, the namespace they belong to, and
the model shapes it refuses (with the reason, at start).

A page is one SGLang storage page (`page_size` tokens) of the host pool, as the bytes of the buffers
`get_page_buffer_meta` names for it, put in the order of the pool's own flat page
(`get_data_page(i, flat=True)`): the zero-copy (v1) and the generic interface then store the very
same bytes, and a page written through one reads back through the other. Checked at start against
the pool's tensor strides, so a layout whose buffers do not line up that way is refused, never
stored scrambled.

No SGLang import: the host pool and the storage config are read by their attributes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import xxhash

from polarkvd.connectors.fingerprint import sample_file
from polarkvd.errors import ConfigError
from polarkvd.types import DTYPE_BYTES, STRING_LIMITS, Namespace

#: Version of the page format below; part of the layout string, so a change never mixes with old pages.
PAGE_FORMAT = "v1"

#: Host pool layouts (`--hicache-mem-layout`) whose pages are stored. `page_head` and
#: `page_unified` interleave heads or K and V inside a page in ways not checked here.
LAYOUTS = ("page_first", "page_first_direct", "layer_first")

#: Host pool classes whose pages are stored, and the kind of KV they hold.
POOLS = {"MHATokenToKVPoolHost": "mha", "MLATokenToKVPoolHost": "mla"}

_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _refuse(key: str, value: object, why: str) -> ConfigError:
    return ConfigError([(key, value, why)])


def check_storage_config(config: Any) -> None:
    """What the storage config alone rules out (at construction, before the host pool is known)."""
    if getattr(config, "should_split_heads", False):
        raise _refuse(
            "hicache-storage-backend-extra-config.tp_lcm_size",
            getattr(config, "tp_lcm_size", None),
            "heterogeneous tensor parallelism (pages split by heads across ranks of different TP "
            "sizes) is not supported by polarkvd; remove tp_lcm_size",
        )
    if getattr(config, "dcp_size", 1) > 1:
        raise _refuse(
            "decode-context-parallel-size",
            config.dcp_size,
            "decode context parallelism (each rank holds a slice of every MLA page) is not supported "
            "by polarkvd yet",
        )


def model_fingerprint(model_name: str) -> str:
    """`name@digest`. For a local model directory (SGLang passes the served model name, which is the
    model path unless `--served-model-name` is set) the digest covers its config.json and every
    weight file's size plus 16 sampled 64 KiB chunks: copies of the same files at other paths share
    pages, fine-tunes of one base do not. For any other name (a hub id, a served name) it covers the
    name only: set `model_fingerprint` when one name may stand for different weights."""
    h = xxhash.xxh3_128(b"polarkv-sglang-model-v1")
    path = Path(model_name)
    if path.is_dir():
        label = path.resolve().name
        config = path / "config.json"
        if config.is_file():
            try:
                cfg = json.loads(config.read_text())
                cfg.pop("transformers_version", None)
                h.update(json.dumps(cfg, sort_keys=True).encode())
            except (OSError, ValueError):
                h.update(config.read_bytes())
        for f in sorted(path.iterdir()):
            if f.is_file() and f.suffix in _WEIGHTS:
                sample_file(h, f)
    else:
        label = model_name.rstrip("/").split("/")[-1] or model_name
        h.update(model_name.encode())
    return f"{label[:200]}@{h.hexdigest()}"


@dataclasses.dataclass(frozen=True)
class PagePlan:
    """How one page of the host pool becomes one polarkvd page."""

    namespace: Namespace
    #: Buffers `get_page_buffer_meta` gives per page.
    buffers_per_page: int
    #: A page's buffers, reordered into the pool's flat page order (indices into its meta list).
    order: tuple[int, ...]
    #: Bytes of each buffer, in `order`.
    sizes: tuple[int, ...]
    #: Whether this rank writes pages (MLA: one rank of the replicas; MHA: every rank).
    writer: bool
    #: Host pool indices (token slots) per page: SGLang's page size, 1 for Mamba states.
    host_page: int

    @property
    def page_bytes(self) -> int:
        return self.namespace.page_bytes


def _flat_offsets(page: Any, pointers: list[int]) -> list[int] | None:
    """The flat (row-major) element index of each pointer inside the tensor view `page`, or None
    when one does not point at an element of it."""
    base = page.data_ptr()
    item = page.element_size()
    shape, strides = list(page.shape), list(page.stride())
    out = []
    for ptr in pointers:
        delta, rem = divmod(ptr - base, item)
        if rem or delta < 0:
            return None
        # The strides here are positive and decreasing along the dims SGLang's views keep, so a
        # greedy division recovers the multi-index; anything else fails the bounds check below.
        order = sorted(range(len(shape)), key=lambda d: -strides[d])
        index = [0] * len(shape)
        for d in order:
            if strides[d] > 0:
                index[d], delta = divmod(delta, strides[d])
        if delta or any(i >= n for i, n in zip(index, shape)):
            return None
        flat = 0
        for i, n in zip(index, shape):
            flat = flat * n + i
        out.append(flat)
    return out


def plan_pages(config: Any, pool: Any, opts_fingerprint: str = "") -> PagePlan:
    """The page plan and namespace of `pool` (the host pool SGLang registers) under `config` (its
    HiCacheStorageConfig); ConfigError with the reason for a pool or layout polarkvd does not store."""
    import torch

    kind = POOLS.get(type(pool).__name__)
    if kind is None:
        raise _refuse(
            "model",
            type(pool).__name__,
            f"polarkvd stores the KV of {', '.join(POOLS)} host pools only; this model's KV pool "
            "(hybrid, sparse, quantized with scales or compressed) is not supported",
        )
    layout = getattr(pool, "layout", None)
    if layout not in LAYOUTS:
        raise _refuse(
            "hicache-mem-layout", layout, f"polarkvd stores pages of the {', '.join(LAYOUTS)} layouts only"
        )
    if getattr(pool, "kv_buffer", None) is None:
        raise _refuse("model", type(pool).__name__, "the host pool holds no KV buffer of its own")
    dtype = str(pool.dtype).removeprefix("torch.")
    if dtype not in DTYPE_BYTES:
        raise _refuse("kv-cache-dtype", dtype, f"polarkvd stores KV of the dtypes {sorted(DTYPE_BYTES)}")
    page_tokens = int(pool.page_size)
    if kind == "mha":
        head_dim, v_head_dim = int(pool.head_dim), int(getattr(pool, "v_head_dim", pool.head_dim))
        if head_dim != v_head_dim:
            raise _refuse(
                "model",
                f"head_dim={head_dim}, v_head_dim={v_head_dim}",
                "K and V head sizes differ; polarkvd stores models whose K and V heads are equal",
            )
        heads, parts, tp_rank = int(pool.head_num), 2, int(config.tp_rank)
    else:  # MLA: one latent per token, the same on every TP rank; one rank writes it
        head_dim, heads, parts, tp_rank = int(pool.kv_cache_dim), 1, 1, 0
    writer = bool(getattr(config, "is_storage_writer", True))

    # One page's buffers, as SGLang's own zero-copy backends see them (pointer arithmetic only).
    pointers, sizes = pool.get_page_buffer_meta(torch.arange(page_tokens, dtype=torch.int64))
    pointers = [int(p) for p in pointers]
    sizes = [int(s) for s in sizes]
    flat = pool.get_data_page(0, flat=False)
    item = flat.element_size()
    starts = _flat_offsets(flat, pointers)
    order = None
    if starts is not None:
        ranked = sorted(range(len(pointers)), key=lambda i: starts[i])
        at = 0
        for i in ranked:  # the buffers must tile the flat page, in flat order, without gaps
            if starts[i] != at // item or sizes[i] % item:
                break
            at += sizes[i]
        else:
            if at == flat.numel() * item:
                order = tuple(ranked)
    if order is None:
        raise _refuse(
            "hicache-mem-layout",
            layout,
            f"the {type(pool).__name__} page buffers do not tile its flat page; not supported",
        )

    model = opts_fingerprint or model_fingerprint(str(config.model_name or ""))
    if not config.model_name and not opts_fingerprint:
        raise _refuse(
            "hicache-storage-backend-extra-config.model_fingerprint",
            "",
            "SGLang passed no model name: set model_fingerprint (a name and a digest of the weights)",
        )
    tags = [f"sglang-{layout}-{kind}", *_shard_tags(config)]
    if kind == "mla":
        tags.append("one-writer")  # replicated across TP ranks: rank 0 writes, every rank reads
    ns = Namespace(
        model=model[: STRING_LIMITS["model"]],
        dtype=dtype,
        layout=f"{'/'.join(tags)}/{PAGE_FORMAT}"[: STRING_LIMITS["layout"]],
        num_layers=int(pool.layer_num),
        num_kv_heads=heads,
        head_dim=head_dim,
        page_tokens=page_tokens,
        tp_rank=tp_rank,
        tp_size=int(config.tp_size),
        kv_parts=parts,
    )
    problems = ns.problems()
    if problems:
        raise _refuse("model", ns, "; ".join(problems))
    if ns.page_bytes != sum(sizes):
        raise _refuse(
            "model",
            f"{sum(sizes)} bytes per page",
            f"the host pool's page ({sum(sizes)} bytes) is not the {ns.page_bytes} bytes its geometry "
            "implies (padding or scales in the page?); not supported",
        )
    return PagePlan(
        namespace=ns,
        buffers_per_page=len(pointers),
        order=order,
        sizes=tuple(sizes[i] for i in order),
        writer=writer,
        host_page=page_tokens,
    )


def _shard_tags(config: Any) -> list[str]:
    return [
        f"pp{config.pp_rank}.{config.pp_size}",
        f"cp{config.attn_cp_rank}.{config.attn_cp_size}",
        f"dp{getattr(config, 'dp_rank', 0)}",
    ]


def plan_sidecar(config: Any, pool: Any, name: str, opts_fingerprint: str = "") -> PagePlan:
    """The page plan of a hybrid model's extra host pool (Mamba states, sliding-window KV, an indexer):
    a page is the bytes of the buffers `get_page_buffer_meta` names for one of its pages, in that
    order, stored as opaque bytes in a namespace of its own: the model, the pool's name, class,
    layout and buffer sizes, the shard (TP rank included: such state is sharded by rank even where
    the KV is replicated). ConfigError when the pool gives no usable metadata."""
    import torch

    page = int(getattr(pool, "page_size", 1) or 1)
    what = f"host pool {name} ({type(pool).__name__})"
    try:
        _, sizes = pool.get_page_buffer_meta(torch.arange(page, dtype=torch.int64))
        sizes = [int(x) for x in sizes]
    except Exception as e:  # noqa: BLE001 - SGLang says why (a layout, side states): refused with it
        raise _refuse("model", what, f"its pages cannot be copied by pointer: {e}") from None
    total = sum(sizes)
    if not sizes or total <= 0:
        raise _refuse("model", what, "its pages have no bytes to store")
    # The namespace only has to give the page's size: layers x head size, each at most 2^20.
    limit = 1 << 20
    layers = next((a for a in range(1, limit + 1) if total % a == 0 and total // a <= limit), 0)
    if not layers:
        raise _refuse("model", what, f"pages of {total} bytes are too large")
    shape = xxhash.xxh3_64_hexdigest(
        json.dumps(
            [type(pool).__name__, getattr(pool, "layout", None), page, sizes, str(getattr(pool, "dtype", ""))]
        ).encode()
    )
    model = opts_fingerprint or model_fingerprint(str(config.model_name or ""))
    ns = Namespace(
        model=model[: STRING_LIMITS["model"]],
        dtype="uint8",
        layout="/".join(
            [f"sglang-{name}-{getattr(pool, 'layout', '')}", *_shard_tags(config), shape, PAGE_FORMAT]
        )[: STRING_LIMITS["layout"]],
        num_layers=layers,
        num_kv_heads=1,
        head_dim=total // layers,
        page_tokens=1,
        tp_rank=int(config.tp_rank),
        tp_size=int(config.tp_size),
        kv_parts=1,
    )
    return PagePlan(
        namespace=ns,
        buffers_per_page=len(sizes),
        order=tuple(range(len(sizes))),
        sizes=tuple(sizes),
        writer=True,
        host_page=page,
    )
