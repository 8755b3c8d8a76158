"""The vLLM connector: prefix KV pages shared across requests, sessions and engines through polarkvd.

Start vLLM with

    --kv-transfer-config '{"kv_connector":"PolarKVConnector",
                           "kv_connector_module_path":"polarkvd.connectors.vllm",
                           "kv_role":"kv_both","kv_load_failure_policy":"recompute"}'

(options go in "kv_connector_extra_config"; see `Options` and docs/VLLM.md).

What it owns: turning vLLM's scheduler and worker callbacks into daemon calls. The scheduler side asks
the daemon for the longest cached prefix of each new request and plans, per step, which vLLM blocks to
fill from which pages and which newly completed blocks to store; the plan travels to the worker in
`PolarKVMetadata`. The worker side asks the daemon for pages (`EngineClient.load` / `reserve` +
`commit`) and has `kv_copy.py`'s movers copy bytes between vLLM's KV tensors and the pages, layer by
layer: pages in the daemon's shared-memory arena (L2) on every worker, and, on CUDA workers, pages in
its GPU page pool (L1, option `vram`).

What it must not do: raise into vLLM or fail a request because of the daemon (a daemon problem costs
hits, never answers: lookups then report no hit, stores are skipped, a load that comes back short is
reported through `get_block_ids_with_load_errors` so vLLM recomputes), store KV that was computed on
top of a failed load, or share pages between namespaces (model fingerprint, KV dtype, layout, geometry,
TP shard, cache_salt and LoRA adapter all go into the namespace, hence into every key). It talks to the
daemon only through `polarkvd.client`.

Copies. By default (`load_mode`/`save_mode` = "auto") CUDA workers copy layer by layer (a layer's
copies run on a side stream while the GPU computes another), and CPU workers once per step (loads in
`start_load_kv`, stores at `wait_for_save`): on CPU the layer-by-layer modes only compete with the
model's own threads and measured slower (docs/VLLM.md has the numbers); both modes work on both.

Pages. One page is `page_tokens = page_blocks * block_size` tokens (default: one vLLM block). Its bytes
are layer-major: for each KV layer (in the order of the KV cache group's layer names), for each of the
page's blocks, that block's slice of the layer tensor, `kv_layer[block]`, as raw bytes in logical order.

Supported layouts. vLLM 0.32 hands every connector a standardized per-layer view `[B, H, N, C]` with
blocks on dim 0 (kernel block splitting gives `[B * r, H, N, C]`, handled as r sub-blocks):
  * CPU (the `CPU_ATTN` backend, LBHNC, exercised by tests/vllm): each block is one contiguous
    `[num_kv_heads, block_size, 2 * head_size]` run (K stored transposed inside a (block, head) tile,
    V not; we never look inside), copied as opaque bytes with one `copy_` per (layer, block).
  * CUDA (FlashAttention, FlashInfer, ... in any physical layout): the same logical slice, copied with
    non-blocking copies on a side stream: device to device for L1 pages, by DMA straight to and from
    the arena (page-locked in this process) for L2 pages, through pinned staging buffers where the
    arena cannot be page-locked (kv_copy.py; its tests run with CUDA tensors on a GPU machine).
The layout string in the namespace names device, physical layout and kernel (CPU: the attention ISA,
e.g. "vllm-cpu-lbhnc-vec/v1"), because the bytes inside a block are the kernel's business: two engines
share pages only when they would read them the same way. Not supported (refused at start, with the
reason): several KV cache groups (hybrid models), non-attention caches (Mamba), padded or quantized
pages (`page_size_bytes` != K + V bytes), pipeline or decode-context parallelism. Requests with prompt
embeddings or multimodal inputs are served but never cached (token ids do not name their content).

Modules: `options` (the options, copy modes), `geometry` (model fingerprint, page geometry, the
namespace), `link` (sessions with the daemon, outages), `metadata` (the step's plan), `scheduler` and
`worker` (the two sides), `connector` (`PolarKVConnector`, which picks a side by role).
"""

from polarkvd.connectors.vllm.connector import PolarKVConnector
from polarkvd.connectors.vllm.geometry import Geometry, build_geometry, model_fingerprint
from polarkvd.connectors.vllm.metadata import LoadSpec, PolarKVMetadata, SaveSpec
from polarkvd.connectors.vllm.options import Options, copy_mode
from polarkvd.connectors.vllm.scheduler import SchedulerSide

__all__ = [
    "Geometry",
    "LoadSpec",
    "Options",
    "PolarKVConnector",
    "PolarKVMetadata",
    "SaveSpec",
    "SchedulerSide",
    "build_geometry",
    "copy_mode",
    "model_fingerprint",
]
