"""What the connector knows of vLLM's KV cache: the model's fingerprint, the page geometry and the
namespace it implies (layout string, kernel tag); refuses what it cannot store, with the reason."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from polarkvd.connectors.fingerprint import sample_file
from polarkvd.connectors.vllm.options import PAGE_FORMAT, Options
from polarkvd.types import DTYPE_BYTES, Namespace

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


def _json_default(o: object) -> str:
    return str(o)


def model_fingerprint(model_config: Any) -> str:
    """`name@digest`: the digest covers the model's config, compute dtype, quantization and revision,
    and, for a local directory, every weight file's size plus 16 sampled 64 KiB chunks of it.

    Sampling (about 1 MiB per file) keeps start-up cheap for large models yet tells fine-tunes of the
    same base apart (their tensors differ everywhere). Engines that load the same files from different
    paths get the same fingerprint. For hub ids the weights are not read: pin `revision`, or set
    `model_fingerprint` in the extra config.
    """
    h = xxhash.xxh3_128()
    try:
        cfg = model_config.hf_config.to_dict()
    except Exception:  # noqa: BLE001 - a config object without to_dict: fall back to its repr
        cfg = {"repr": repr(model_config.hf_config)}
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "transformers_version"}
    h.update(json.dumps(cfg, sort_keys=True, default=_json_default).encode())
    for attr in ("dtype", "quantization", "revision", "hf_overrides"):
        h.update(f"|{attr}={getattr(model_config, attr, None)!r}".encode())
    model = str(model_config.model)
    path = Path(model)
    if path.is_dir():
        name = path.resolve().name
        for f in sorted(path.iterdir()):
            if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf"):
                sample_file(h, f)
    else:
        name = model.rstrip("/").split("/")[-1] or model
    return f"{name}@{h.hexdigest()}"


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What both connector sides derive, identically, from vLLM's configs: namespaces and page shape."""

    model: str
    dtype: str
    layout: str
    layer_names: tuple[str, ...]
    num_kv_heads: int
    head_dim: int
    kv_parts: int
    block_size: int
    page_blocks: int
    block_bytes: int  # one layer's bytes of one vLLM block
    num_blocks: int
    tp_size: int

    @property
    def page_tokens(self) -> int:
        return self.block_size * self.page_blocks

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def namespace(self, salt: str, tp_rank: int) -> Namespace:
        return Namespace(
            model=self.model,
            dtype=self.dtype,
            layout=self.layout,
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            page_tokens=self.page_tokens,
            tp_rank=tp_rank,
            tp_size=self.tp_size,
            kv_parts=self.kv_parts,
            cache_salt=salt,
        )


def _kernel_tag(vllm_config: VllmConfig, spec: Any) -> tuple[str, str]:
    """(device, kernel): what decides how the bytes inside a block are arranged."""
    from vllm.platforms import current_platform

    device = str(getattr(current_platform, "device_type", "") or "unknown")
    if current_platform.is_cpu():
        try:
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            dtype: Any = vllm_config.model_config.dtype  # a torch.dtype once the config is built
            isa = _get_attn_isa(
                dtype,
                spec.block_size,
                spec.head_size,
                vllm_config.cache_config.cache_dtype,
            )
        except Exception:  # noqa: BLE001 - private helper moved: pages then never mix ISAs by accident
            isa = "unknown"
        return "cpu", str(isa)
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    name = getattr(backend, "name", None) or (str(backend) if backend else "auto")
    return device, name.lower()


def build_geometry(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, opts: Options) -> Geometry:
    """The page geometry for this engine; ValueError (with the reason) for what the connector cannot do."""
    from vllm.v1.kv_cache_interface import AttentionSpec, MLAAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(
            f"PolarKVConnector supports models with one KV cache group; this one has {len(groups)} "
            "(hybrid attention or Mamba layers)"
        )
    spec = groups[0].kv_cache_spec
    if not isinstance(spec, AttentionSpec):
        raise ValueError(f"PolarKVConnector supports attention KV caches only, not {type(spec).__name__}")
    pc = vllm_config.parallel_config
    if getattr(pc, "pipeline_parallel_size", 1) != 1:
        raise ValueError("PolarKVConnector does not support pipeline parallelism")
    if getattr(pc, "decode_context_parallel_size", 1) != 1:
        raise ValueError("PolarKVConnector does not support decode context parallelism")
    dtype = str(spec.dtype).removeprefix("torch.")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"PolarKVConnector does not support KV dtype {dtype}")
    kv_parts = 1 if isinstance(spec, MLAAttentionSpec) else 2
    if spec.head_size_v != spec.head_size:
        raise ValueError("PolarKVConnector does not support different K and V head sizes")
    block_bytes = int(spec.page_size_bytes)
    dense = kv_parts * spec.num_kv_heads * spec.head_size * spec.block_size * DTYPE_BYTES[dtype]
    if block_bytes != dense:
        raise ValueError(
            f"PolarKVConnector needs dense K/V blocks: vLLM's block is {block_bytes} bytes per layer, "
            f"K and V are {dense} (padded or quantized KV pages are not supported)"
        )
    device, kernel = _kernel_tag(vllm_config, spec)
    physical = str(getattr(kv_cache_config, "kv_cache_layout", None) or "LBHNC").lower()
    layout = f"vllm-{device}-{physical}-{kernel}/{PAGE_FORMAT}"
    return Geometry(
        model=opts.model_fingerprint or model_fingerprint(vllm_config.model_config),
        dtype=dtype,
        layout=layout,
        layer_names=tuple(groups[0].layer_names),
        num_kv_heads=int(spec.num_kv_heads),
        head_dim=int(spec.head_size),
        kv_parts=kv_parts,
        block_size=int(spec.block_size),
        page_blocks=opts.page_blocks,
        block_bytes=block_bytes,
        num_blocks=int(kv_cache_config.num_blocks),
        tp_size=int(getattr(pc, "tensor_parallel_size", 1)),
    )
