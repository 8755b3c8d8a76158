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
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import socket as _socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import xxhash
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from polarkvd.client import EngineClient
from polarkvd.connectors.kv_copy import CudaMover, HostMover
from polarkvd.errors import ConfigError, DaemonUnavailable, ErrorCode, PolarKVError
from polarkvd.keys import ROOT_KEY, page_keys
from polarkvd.types import DTYPE_BYTES, Namespace, Tier

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["LoadSpec", "Options", "PolarKVConnector", "PolarKVMetadata", "SaveSpec", "model_fingerprint"]

# Under "vllm." so vLLM's logging config (format, VLLM_LOGGING_LEVEL) applies to our lines too.
logger = init_logger("vllm.polarkvd.connector")

#: Version of the page format below; part of the layout string, so a change never mixes with old pages.
PAGE_FORMAT = "v1"

#: `load_mode` / `save_mode` values.
COPY_MODES = ("auto", "layer", "step")


def copy_mode(setting: str, cuda: bool) -> str:
    """The copy mode a worker uses: "auto" is layer by layer where the KV caches are on a GPU (its
    copies overlap the GPU's compute), per step on CPU (they would compete with the model's threads)."""
    if setting == "auto":
        return "layer" if cuda else "step"
    return setting


# ------------------------------------------------------------------------------------------ options


@dataclasses.dataclass(frozen=True)
class Options:
    """`kv_connector_extra_config` keys. Unknown keys and bad values refuse to start (ConfigError)."""

    #: The daemon's engine socket; empty = $POLARKV_SOCKET, else the daemon's default runtime dir.
    socket: str = ""
    #: vLLM blocks per polarkvd page (page_tokens = page_blocks * block_size).
    page_blocks: int = 1
    #: Seconds one daemon call may take before the daemon counts as down.
    timeout: float = 5.0
    #: Seconds a commit may take (when longer than `timeout`): with the daemon's disk.write_through
    #: a commit is answered once its pages are on disk and synced, which a busy disk can make slow.
    commit_timeout: float = 60.0
    #: Longest wait between reconnection attempts while the daemon is down (backoff from 0.5 s).
    retry_seconds: float = 5.0
    #: "layer": the daemon answers a load at once and pages from disk or from peers arrive layer by
    #: layer (pipelined); a thread copies each layer as soon as it is there while the model computes
    #: the previous one (wait_for_layer_load waits for one layer). "step": everything is in DRAM
    #: before the answer, and is copied in start_load_kv. "auto": layer on CUDA workers, step on CPU.
    load_mode: str = "auto"
    #: "step": copy saved blocks at wait_for_save; "layer": copy each layer in save_kv_layer;
    #: "auto": layer on CUDA workers, step on CPU.
    save_mode: str = "auto"
    #: Also store pages completed while decoding (generated tokens), not only prompt pages: a chat's
    #: next turn then hits its whole history.
    save_decode: bool = True
    #: Overrides the model fingerprint (name@digest of config, dtype and sampled weight bytes).
    model_fingerprint: str = ""
    #: Most namespaces (cache salts) with an open daemon session per process; the oldest is closed.
    max_sessions: int = 64
    #: Engine id shown by `polarkvd status`; empty = vllm-<host>-<pid>.
    engine_id: str = ""
    #: CUDA workers: use the daemon's GPU page pool (L1) when it offers one this process can open:
    #: stores go there first (device to device), and L1 pages load device to device. False: every
    #: page goes through the DRAM arena. No effect on CPU workers or daemons without L1.
    vram: bool = True

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> Options:
        extra = dict(extra or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        problems: list[tuple[str, object, str]] = []
        values: dict[str, Any] = {}
        for key, value in extra.items():
            f = fields.get(key)
            if f is None:
                problems.append((key, value, f"unknown option; known: {', '.join(sorted(fields))}"))
                continue
            default = f.default
            try:
                if isinstance(default, bool):
                    if not isinstance(value, bool):
                        raise ValueError("must be true or false")
                elif isinstance(default, int):
                    if isinstance(value, bool) or int(value) != value:
                        raise ValueError("must be an integer")
                    value = int(value)
                elif isinstance(default, float):
                    value = float(value)
                elif not isinstance(value, str):
                    raise ValueError("must be a string")
            except (TypeError, ValueError) as e:
                problems.append((key, value, str(e)))
                continue
            values[key] = value
        opts = cls(**values)
        if opts.page_blocks < 1:
            problems.append(("page_blocks", opts.page_blocks, "must be >= 1"))
        if opts.timeout <= 0:
            problems.append(("timeout", opts.timeout, "must be > 0"))
        if not opts.commit_timeout > 0:
            problems.append(("commit_timeout", opts.commit_timeout, "must be > 0"))
        if opts.retry_seconds <= 0:
            problems.append(("retry_seconds", opts.retry_seconds, "must be > 0"))
        if opts.max_sessions < 1:
            problems.append(("max_sessions", opts.max_sessions, "must be >= 1"))
        for key in ("load_mode", "save_mode"):
            if getattr(opts, key) not in COPY_MODES:
                problems.append(
                    (f"kv_connector_extra_config.{key}", getattr(opts, key), "must be auto, layer or step")
                )
        if problems:
            raise ConfigError(
                [(k if "." in k else f"kv_connector_extra_config.{k}", v, w) for k, v, w in problems]
            )
        return opts


# ------------------------------------------------------------------------------------------ geometry


def _json_default(o: object) -> str:
    return str(o)


def _sample_file(h: Any, path: Path, samples: int = 16, chunk: int = 64 * 1024) -> None:
    """Feed a file's size and `samples` evenly spaced chunks (first and last included) into `h`."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        if size <= samples * chunk:
            h.update(f.read())
            return
        step = (size - chunk) // (samples - 1)
        for i in range(samples):
            f.seek(i * step)
            h.update(f.read(chunk))


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
                _sample_file(h, f)
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

            isa = _get_attn_isa(
                vllm_config.model_config.dtype,  # type: ignore[arg-type]  # a torch.dtype once the config is built
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


# ------------------------------------------------------------------------------------------ daemon link

_RETRY_FIRST = 0.5  # seconds before the first reconnection attempt
#: Errors to `hello` that retrying cannot cure (bad namespace, protocol mismatch).
_PERMANENT = frozenset(
    {ErrorCode.NAMESPACE, ErrorCode.BAD_REQUEST, ErrorCode.BAD_VERSION, ErrorCode.UNKNOWN_OP}
)


class _Outages:
    """One warning per outage and process, however many connector sides notice it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down: set[str] = set()

    def down(self, path: str, message: str, *args: object) -> None:
        with self._lock:
            first = path not in self._down
            self._down.add(path)
        if first:
            logger.warning(message, *args)
        else:
            logger.debug(message, *args)

    def up(self, path: str) -> None:
        with self._lock:
            was_down = path in self._down
            self._down.discard(path)
        if was_down:
            logger.info("polarkvd daemon at %s is reachable again: KV cache hits and stores resume", path)


_OUTAGES = _Outages()


class _DaemonLink:
    """This side's sessions with the daemon, one per namespace (salt, TP rank), and its reconnect backoff.

    Not thread-safe: every socket call happens on the thread vLLM calls the connector on.
    """

    def __init__(self, opts: Options, role: str, clock: Callable[[], float] = time.monotonic) -> None:
        from polarkvd.config import default_engine_socket

        self.path = str(opts.socket or default_engine_socket())
        self.role = role
        self._opts = opts
        self._clock = clock
        self._engine_id = opts.engine_id or f"vllm-{_socket.gethostname()}-{os.getpid()}-{role}"
        self._sessions: collections.OrderedDict[Namespace, EngineClient] = collections.OrderedDict()
        self._refused: set[Namespace] = set()
        self._paused: dict[Namespace, float] = {}  # namespace -> when to try attaching it again
        self._down = False
        self._retry_at = 0.0
        self._backoff = _RETRY_FIRST
        #: Attach with `vram=True` (a CUDA worker with `Options.vram`): the daemon's L1 pool is mapped.
        self.vram = False
        #: Called before sessions close: copies in flight into their L1 pool must finish first.
        self.before_close: Callable[[], None] | None = None

    def _closing(self) -> None:
        if self.before_close is not None:
            try:
                self.before_close()
            except Exception as e:  # noqa: BLE001 - a broken device: closing must still happen
                logger.warning("polarkvd: waiting for copies in flight failed: %r", e)

    @property
    def available(self) -> bool:
        """False while the daemon is down and the next reconnection attempt is not due yet."""
        return not self._down or self._clock() >= self._retry_at

    def session(self, ns: Namespace) -> EngineClient | None:
        """The session for `ns`, connecting if needed; None when the daemon is down or refused it.
        Its `ns_digest` (keyed with the daemon's secret seed) is what this side's keys chain from."""
        client = self._sessions.get(ns)
        if client is not None:
            self._sessions.move_to_end(ns)
            return client
        if ns in self._refused or not self.available or self._paused.get(ns, 0.0) > self._clock():
            return None
        try:
            # The scheduler only looks pages up: it never maps the arena (costly for a large one).
            client = EngineClient(
                ns,
                self._engine_id,
                self.path,
                timeout=self._opts.timeout,
                commit_timeout=self._opts.commit_timeout,
                map_arena=self.role != "scheduler",
                vram=self.vram,
            )
        except DaemonUnavailable as e:
            self.failed(e)
            return None
        except PolarKVError as e:
            if e.code in _PERMANENT:  # the daemon will never take this namespace from this connector
                self._refused.add(ns)
                logger.error(
                    "polarkvd refused namespace %s (%s): %s; its requests are not cached",
                    ns.model,
                    ns.layout,
                    e,
                )
            else:  # e.g. too many sessions: try this namespace again later
                self._paused[ns] = self._clock() + self._opts.retry_seconds
                logger.warning("polarkvd did not attach namespace %s: %s; retrying later", ns.model, e)
            return None
        except OSError as e:  # e.g. the arena cannot be mapped (permissions on /dev/shm)
            self.failed(e)
            return None
        if client.page_bytes != ns.page_bytes:
            self._refused.add(ns)
            client.close()
            logger.error(
                "polarkvd at %s computes page sizes differently from this connector "
                "(version skew between polarkvd packages?); requests in namespace %s are not cached",
                self.path,
                ns.model,
            )
            return None
        if self._down:
            self._down = False
            self._backoff = _RETRY_FIRST
        _OUTAGES.up(self.path)
        self._sessions[ns] = client
        while len(self._sessions) > self._opts.max_sessions:
            _, old = self._sessions.popitem(last=False)
            self._closing()
            old.close()
        return client

    def failed(self, exc: BaseException) -> None:
        """The daemon is unreachable: drop every session, serve without it, retry with backoff."""
        if self._sessions:
            self._closing()
        for client in self._sessions.values():
            client.close()
        self._sessions.clear()
        now = self._clock()
        if self._down and now < self._retry_at:
            return  # another call meeting the same outage
        if self._down:  # a reconnection attempt failed: wait longer
            self._backoff = min(self._backoff * 2, self._opts.retry_seconds)
        self._down = True
        self._retry_at = now + min(self._backoff, self._opts.retry_seconds)
        _OUTAGES.down(
            self.path,
            "polarkvd daemon unreachable (%s): vLLM keeps serving without the shared KV cache "
            "(no hits, no stores) and reconnects when it is back (retrying at most every %.0f s)",
            exc,
            self._opts.retry_seconds,
        )

    def close(self) -> None:
        if self._sessions:
            self._closing()
        for client in self._sessions.values():
            client.close()
        self._sessions.clear()


def _call(
    link: _DaemonLink,
    what: str,
    fn: Callable[[], Any],
    seconds: collections.defaultdict[str, float] | None = None,
) -> Any:
    """Run one daemon call; None (logged) instead of an exception, marking the daemon down if it is."""
    t0 = time.perf_counter()
    try:
        return fn()
    except DaemonUnavailable as e:
        link.failed(e)
    except PolarKVError as e:
        if e.code is ErrorCode.DRAINING:
            logger.debug("polarkvd is draining: %s skipped", what)
        else:
            logger.warning("polarkvd %s failed: %s", what, e)
    finally:
        if seconds is not None:
            seconds[f"daemon_{what}"] += time.perf_counter() - t0
    return None


# ------------------------------------------------------------------------------------------ metadata


@dataclasses.dataclass
class LoadSpec:
    """Fill `block_ids` from pages `keys[rank]`; the first page's first `skip` blocks are not needed."""

    req_id: str
    salt: str
    keys: list[list[bytes]]  # per TP rank
    block_ids: list[int]
    skip: int = 0


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


def _salt_of(request: Any) -> str:
    """The namespace salt of a request: its cache_salt, plus its LoRA adapter (which changes the KV)."""
    salt = request.cache_salt or ""
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        salt += f"\x00lora:{getattr(lora, 'lora_name', '')}:{getattr(lora, 'lora_path', '')}"
    return salt


def _cacheable(request: Any) -> bool:
    """Token ids name the KV only for plain token prompts (not embeddings, not multimodal inputs)."""
    return getattr(request, "prompt_embeds", None) is None and not getattr(request, "mm_features", None)


# ------------------------------------------------------------------------------------------ scheduler side


class _Req:
    """The scheduler's view of one request."""

    __slots__ = (
        "request", "salt", "cacheable", "keys", "digests", "block_ids", "saved_pages", "matched", "load",
    )  # fmt: skip

    def __init__(self, request: Request, tp_size: int) -> None:
        self.request = request
        self.salt = _salt_of(request)
        self.cacheable = _cacheable(request)
        self.keys: list[list[bytes]] = [[] for _ in range(tp_size)]  # keys of its full pages, per rank
        self.digests: tuple[bytes, ...] = ()  # the daemon's namespace digests `keys` chain from
        self.block_ids: list[int] = []  # its vLLM blocks, as the scheduler outputs tell the worker
        self.saved_pages = 0  # pages [0, saved_pages) are stored (or loaded, or planned to be)
        self.matched: tuple[int, int] | None = None  # (local tokens, loadable tokens) of the last ask
        self.load: tuple[int, list[int]] | None = None  # (first block index, block ids) to fill


class _SchedulerSide:
    def __init__(self, geo: Geometry, opts: Options) -> None:
        self.geo = geo
        self.opts = opts
        self.link = _DaemonLink(opts, "scheduler")
        self._reqs: dict[str, _Req] = {}
        self._namespaces: dict[tuple[str, int], Namespace] = {}
        self._inflight: dict[str, tuple[int, list[int]]] = {}  # req -> (first block, ids) loading this step
        self.stats: collections.Counter[str] = collections.Counter()
        # Open the unsalted sessions now: attaching maps the arena (0.1-0.8 s), which the first request
        # should not pay, and a daemon that is down gets reported at start.
        for rank in range(geo.tp_size):
            self.link.session(self._namespace("", rank))

    def _namespace(self, salt: str, rank: int) -> Namespace:
        ns = self._namespaces.get((salt, rank))
        if ns is None:
            ns = self._namespaces[(salt, rank)] = self.geo.namespace(salt, rank)
        return ns

    def _digests(self, salt: str) -> tuple[bytes, ...] | None:
        """The daemon's digest of each rank's namespace (keyed with its seed: only the daemon computes
        them), or None when a session is not available."""
        out = []
        for rank in range(self.geo.tp_size):
            client = self.link.session(self._namespace(salt, rank))
            if client is None:
                return None
            out.append(client.ns_digest)
        return tuple(out)

    def _state(self, request: Request) -> _Req:
        st = self._reqs.get(request.request_id)
        if st is None:
            st = self._reqs[request.request_id] = _Req(request, self.geo.tp_size)
        return st

    def _keys(self, st: _Req, pages: int) -> list[list[bytes]] | None:
        """Keys of the first `pages` pages of the request (computed once, extended as it grows), or
        None when the daemon cannot be asked for its digests. A daemon that came back with another
        seed gives other digests: the keys are computed again from the first page."""
        digests = self._digests(st.salt)
        if digests is None:
            return None
        if digests != st.digests:
            st.keys = [[] for _ in digests]
            st.digests = digests
        have = len(st.keys[0])
        if pages > have:
            pt = self.geo.page_tokens
            tokens = list(st.request.all_token_ids[have * pt : pages * pt])
            for digest, keys in zip(digests, st.keys):
                keys.extend(page_keys(digest, tokens, pt, keys[-1] if keys else ROOT_KEY))
        return st.keys

    # -- vLLM callbacks

    def on_new_request(self, request: Request) -> None:
        self._state(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        st = self._state(request)
        st.matched = None
        if not st.cacheable or not self.link.available:
            return 0, False
        g = self.geo
        bs, pb, pt = g.block_size, g.page_blocks, g.page_tokens
        max_blocks = (request.num_tokens - 1) // bs  # a sync load must leave one token to compute
        first_page = num_computed_tokens // pt
        last_page = min(request.num_tokens // pt, -(-max_blocks // pb))
        if max_blocks * bs <= num_computed_tokens or last_page <= first_page:
            return 0, False
        keys = self._keys(st, last_page)
        if keys is None:
            return 0, False
        hits = last_page - first_page
        for rank in range(g.tp_size):
            client = self.link.session(self._namespace(st.salt, rank))
            if client is None:
                return 0, False
            found = _call(
                self.link, "lookup", functools.partial(client.lookup, keys[rank][first_page:last_page])
            )
            if found is None:
                return 0, False
            hits = min(hits, found.hits)
            if hits == 0:
                break
        end_block = min((first_page + hits) * pb, max_blocks)
        tokens = end_block * bs - num_computed_tokens
        self.stats["lookups"] += 1
        if tokens <= 0:
            return 0, False
        st.matched = (num_computed_tokens, tokens)
        return tokens, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        if num_external_tokens <= 0 or st.matched is None:
            st.load = None
            return
        bs = self.geo.block_size
        local = st.matched[0]
        first, end = local // bs, (local + num_external_tokens) // bs
        ids = blocks.get_block_ids()[0]
        st.load = (first, list(ids[first:end]))

    def build_connector_meta(self, so: SchedulerOutput) -> PolarKVMetadata:
        meta = PolarKVMetadata()
        self._inflight.clear()
        scheduled = so.num_scheduled_tokens
        for new in so.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0]) if new.block_ids else []
            self._plan(st, new.req_id, new.num_computed_tokens, scheduled.get(new.req_id, 0), meta)
        cached = so.scheduled_cached_reqs
        resumed: set[str] = getattr(cached, "resumed_req_ids", set())
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:  # after a preemption: its whole new block list
                st.block_ids = list(new_ids[0]) if new_ids else []
                st.saved_pages = 0  # what it recomputes is stored again (the daemon may have lost pages)
                self.stats["resumed_requests"] += 1
            elif new_ids:
                st.block_ids.extend(new_ids[0])
            self._plan(st, req_id, cached.num_computed_tokens[i], scheduled.get(req_id, 0), meta)
        return meta

    def _plan(self, st: _Req, req_id: str, computed: int, scheduled: int, meta: PolarKVMetadata) -> None:
        g = self.geo
        pb, pt = g.page_blocks, g.page_tokens
        if st.load is not None:
            first, ids = st.load
            st.load = None
            first_page, end_page = first // pb, -(-(first + len(ids)) // pb)
            # keys exist: the match computed them (a daemon gone since makes the load fail: recomputed)
            load_keys = self._keys(st, end_page) or st.keys
            meta.loads.append(
                LoadSpec(
                    req_id, st.salt, [k[first_page:end_page] for k in load_keys], ids, first - first_page * pb
                )
            )
            self._inflight[req_id] = (first, ids)
            st.saved_pages = max(st.saved_pages, end_page)
            self.stats["planned_load_blocks"] += len(ids)
        if not st.cacheable or scheduled <= 0:
            return
        request = st.request
        limit = min(computed + scheduled, request.num_tokens)
        if not self.opts.save_decode:
            limit = min(limit, request.num_prompt_tokens)
        end_page = min(limit // pt, len(st.block_ids) // pb)
        start = st.saved_pages
        if end_page <= start or not self.link.available:
            return  # nothing completes this step, or the daemon is down (those pages are simply not stored)
        keys = self._keys(st, end_page)
        if keys is None:
            return  # the daemon went away: those pages are not stored
        meta.saves.append(
            SaveSpec(
                req_id,
                st.salt,
                [k[start:end_page] for k in keys],
                [k[start - 1] if start else None for k in keys],
                st.block_ids[start * pb : end_page * pb],
            )
        )
        st.saved_pages = end_page
        self.stats["planned_save_pages"] += end_page - start

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        bad = output.invalid_block_ids
        if bad:
            # vLLM recomputes from the first failed block; the worker dropped this step's saves of
            # these requests (computed on top of garbage), so plan them again from there.
            pb = self.geo.page_blocks
            for req_id, (first, ids) in self._inflight.items():
                st = self._reqs.get(req_id)
                if st is None:
                    continue
                for i, block in enumerate(ids):
                    if block in bad:
                        st.saved_pages = min(st.saved_pages, (first + i) // pb)
                        self.stats["load_failures"] += 1
                        break
        self._inflight.clear()

    def request_finished(self, request: Request) -> None:
        self._reqs.pop(request.request_id, None)
        self._inflight.pop(request.request_id, None)

    def close(self) -> None:
        self.link.close()


# ------------------------------------------------------------------------------------------ worker side


class _Load:
    """One step's loads: the pinned pages, what to copy where, and (layer mode) the copying thread.

    Items are (page [L, pb, bytes], block in page, vLLM block); `items` are arena pages (host memory),
    `device_items` L1 pages (CUDA tensors over the daemon's pool), complete when `load` answers.
    """

    def __init__(self, num_layers: int) -> None:
        self.items: list[tuple[torch.Tensor, int, int]] = []
        self.device_items: list[tuple[torch.Tensor, int, int]] = []
        # pipelined loads: the daemon's answers, and per item (answer index, page index in it)
        self.results: list[Any] = []
        self.origin: list[tuple[int, int]] = []
        self.device_origin: list[tuple[int, int]] = []
        self.usable: list[int] = []  # pages of each answer that arrive whole (shrinks on failure)
        self.leases: list[tuple[EngineClient, int]] = []
        self.l1_clients: list[EngineClient] = []  # sessions whose pool the device items are in
        self.blocks_by_req: dict[str, list[int]] = {}
        self.done = [threading.Event() for _ in range(num_layers)]
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.seconds = 0.0

    def layer_items(self, layer: int) -> list[tuple[torch.Tensor, int]]:
        if self.results:  # pipelined: wait until this layer of every usable page is there
            for r, result in enumerate(self.results):
                self.usable[r] = min(self.usable[r], result.wait_layers(layer + 1))
            return [
                (page[layer, j], block)
                for (page, j, block), (r, p) in zip(self.items, self.origin)
                if p < self.usable[r]
            ]
        return [(page[layer, j], block) for page, j, block in self.items]

    def device_layer_items(self, layer: int) -> list[tuple[torch.Tensor, int]]:
        return [(page[layer, j], block) for page, j, block in self.device_items]

    def lost_blocks(self) -> set[int]:
        """vLLM blocks of pages a pipelined load announced but could not deliver (to recompute)."""
        return {
            block
            for items, origin in ((self.items, self.origin), (self.device_items, self.device_origin))
            for (_, _, block), (r, p) in zip(items, origin)
            if p >= self.usable[r]
        }


class _Save:
    """One step's saves: reserved pages per session and what to copy into them."""

    def __init__(self) -> None:
        self.items: list[tuple[torch.Tensor, int, int, str]] = []  # (page, block in page, vLLM block, req)
        self.reserved: dict[int, tuple[EngineClient, list[tuple[bytes, str]]]] = {}  # id(client) -> keys
        self.l1_clients: list[EngineClient] = []  # sessions with pages reserved in their L1 pool
        self.layers_done: set[int] = set()
        self.error: BaseException | None = None  # a copy failed: abort everything reserved
        self.existing = 0
        self.no_space = 0
        self.l1_pages = 0


def _l1_gone(clients: Sequence[EngineClient]) -> BaseException | None:
    """An error when a session's L1 pool was unmapped since its pages were handed out (the daemon
    went away mid-step): nothing may be copied to or from those pages any more."""
    if any(not c.vram for c in clients):
        return DaemonUnavailable("the daemon's GPU page pool was unmapped mid-step (daemon unreachable)")
    return None


class _WorkerSide:
    def __init__(self, geo: Geometry, opts: Options) -> None:
        self.geo = geo
        self.opts = opts
        self.link = _DaemonLink(opts, "worker")
        self.rank = 0
        self.mover: HostMover | None = None
        # the copy modes in use: `Options` resolved ("auto") once the KV caches' device is known
        self.load_mode = copy_mode(opts.load_mode, cuda=False)
        self.save_mode = copy_mode(opts.save_mode, cuda=False)
        self._index: dict[str, int] = {name: i for i, name in enumerate(geo.layer_names)}
        self._namespaces: dict[tuple[str, int], Namespace] = {}
        self._load: _Load | None = None
        self._save: _Save | None = None
        self._errors: set[int] = set()
        self._failed_reqs: set[str] = set()
        self.disabled = ""
        self.stats: collections.Counter[str] = collections.Counter()
        self.stats_seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
        #: Fault injection for tests: called with this step's LoadSpecs before the daemon is asked.
        self.before_load: Callable[[list[LoadSpec]], None] | None = None

    def _session(self, salt: str) -> tuple[EngineClient | None, Namespace]:
        ns = self._namespaces.get((salt, self.rank))
        if ns is None:
            ns = self._namespaces[(salt, self.rank)] = self.geo.namespace(salt, self.rank)
        client = self.link.session(ns)
        if client is not None and self.mover is not None:
            self.mover.use_arena(client)  # page-locks its arena mapping once (CUDA workers)
        return client, ns

    def _page(self, view: memoryview) -> torch.Tensor:
        g = self.geo
        return torch.frombuffer(view, dtype=torch.uint8).view(g.num_layers, g.page_blocks, g.block_bytes)

    def _pool_page(self, pools: dict[int, Any], client: EngineClient, offset: int) -> torch.Tensor | None:
        """The L1 page at `offset` of `client`'s pool (a CUDA tensor), None when the pool is not mapped."""
        pool = pools.get(id(client))
        if pool is None:
            pool = pools[id(client)] = client.pool_tensor()
            if pool is None:
                return None
        g = self.geo
        return pool[offset : offset + client.page_bytes].view(g.num_layers, g.page_blocks, g.block_bytes)

    # -- registration

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self.rank = int(get_tensor_model_parallel_rank())
        except Exception:  # noqa: BLE001 - no TP group (single process): rank 0
            self.rank = 0
        g = self.geo
        missing = [n for n in g.layer_names if n not in kv_caches]
        if missing:
            self.disabled = f"vLLM registered no KV cache for layers {missing[:3]}"
        else:
            layers = [kv_caches[n] for n in g.layer_names]
            first = layers[0]
            blocks = first.shape[0]
            slice_bytes = (
                first[0].numel()
                * first.element_size()
                * (1 if blocks == g.num_blocks else blocks // g.num_blocks)
            )
            if (
                blocks % g.num_blocks
                or slice_bytes != g.block_bytes
                or str(first.dtype).removeprefix("torch.") != g.dtype
            ):
                self.disabled = (
                    f"unexpected KV cache tensor {tuple(first.shape)} {first.dtype} for {g.num_blocks} blocks "
                    f"of {g.block_bytes} bytes"
                )
            elif first.is_cuda and torch.cuda.is_available():
                self.mover = CudaMover(layers, g.num_blocks, g.block_bytes)
                self.link.vram = self.opts.vram
                self.link.before_close = self.mover.quiesce
                self.load_mode = copy_mode(self.opts.load_mode, cuda=True)
                self.save_mode = copy_mode(self.opts.save_mode, cuda=True)
            elif first.device.type == "cpu":
                self.mover = HostMover(layers, g.num_blocks, g.block_bytes)
            else:
                self.disabled = f"KV caches on {first.device.type} are not supported"
        if self.disabled:
            logger.error(
                "PolarKVConnector disabled on this worker: %s; every planned load is recomputed",
                self.disabled,
            )
        else:
            logger.info(
                "PolarKVConnector: %d layers, pages of %d tokens (%d bytes), layout %s, model %s, daemon %s, "
                "copies: loads per %s, stores per %s",
                g.num_layers, g.page_tokens, g.num_layers * g.page_blocks * g.block_bytes, g.layout, g.model, self.link.path,
                self.load_mode, self.save_mode,
            )  # fmt: skip
            # Attach now (maps the arena, page-locks it on CUDA) rather than in the first request's step.
            client, _ = self._session("")
            if client is not None and client.vram:
                logger.info("PolarKVConnector: using the daemon's GPU page pool (L1) on %s", first.device)

    # -- loads

    def start_load(self, meta: PolarKVMetadata) -> None:
        if not meta.loads:
            return
        if self.before_load is not None:
            self.before_load(meta.loads)
        load = _Load(self.geo.num_layers)
        pb = self.geo.page_blocks
        pools: dict[int, Any] = {}
        for spec in meta.loads:
            got = 0
            client = None if self.disabled or self.mover is None else self._session(spec.salt)[0]
            if client is not None:
                keys = spec.keys[self.rank] if self.rank < len(spec.keys) else []
                pipelined = self.load_mode == "layer"
                result = _call(
                    self.link,
                    "load",
                    functools.partial(client.load, keys, pipelined=pipelined),
                    self.stats_seconds,
                )
                if result is not None:
                    if result.lease is not None:
                        load.leases.append((client, result.lease))
                    pages: list[tuple[torch.Tensor, bool]] = []  # (page, in L1)
                    for off, tier, view in zip(result.offsets, result.tiers, result.views):
                        if tier is Tier.VRAM:
                            page = self._pool_page(pools, client, off)
                            if page is None:  # not mapped here (cannot happen while attached): recompute
                                break
                            if not load.l1_clients or load.l1_clients[-1] is not client:
                                load.l1_clients.append(client)
                            pages.append((page, True))
                        else:
                            pages.append((self._page(view), False))
                    r = len(load.results)
                    if pipelined:
                        load.results.append(result)
                        load.usable.append(len(pages))
                    for i, block in enumerate(spec.block_ids):
                        p, j = divmod(spec.skip + i, pb)
                        if p >= len(pages):
                            break
                        page, on_device = pages[p]
                        (load.device_items if on_device else load.items).append((page, j, block))
                        if pipelined:
                            (load.device_origin if on_device else load.origin).append((r, p))
                        if on_device:
                            self.stats["load_blocks_vram"] += 1
                        got += 1
            load.blocks_by_req[spec.req_id] = spec.block_ids[:got]
            self.stats["load_blocks"] += got
            if got < len(spec.block_ids):
                failed = spec.block_ids[got:]
                self._errors.update(failed)
                self._failed_reqs.add(spec.req_id)
                self.stats["load_failed_blocks"] += len(failed)
                logger.warning(
                    "polarkvd: request %s got %d of %d blocks from the daemon; vLLM recomputes the other %d",
                    spec.req_id, got, len(spec.block_ids), len(failed),
                )  # fmt: skip
        pools.clear()
        if not load.items and not load.device_items:
            self._release(load)
            return
        assert self.mover is not None
        self._load = load
        self.mover.begin_load()
        if load.device_items:
            # L1 pages are whole already: queued here, on the thread whose daemon calls could unmap
            # the pool (the link waits for queued copies before it closes a session), never later.
            load.error = _l1_gone(load.l1_clients)
            t0 = time.perf_counter()
            try:
                if load.error is None:
                    for layer in range(self.geo.num_layers):
                        self.mover.load_layer(layer, load.device_layer_items(layer))
            except Exception as e:  # noqa: BLE001 - reported as load errors, never raised into vLLM
                load.error = e
            load.seconds += time.perf_counter() - t0
        if not load.items:
            for done in load.done:
                done.set()
        elif self.load_mode == "layer":
            load.thread = threading.Thread(
                target=self._copy_loads, args=(load,), name="polarkv-load", daemon=True
            )
            load.thread.start()
        else:
            self._copy_loads(load)

    def _copy_loads(self, load: _Load) -> None:
        assert self.mover is not None
        t0 = time.perf_counter()
        try:
            for layer in range(self.geo.num_layers):
                try:
                    if load.error is None:
                        self.mover.load_layer(layer, load.layer_items(layer))
                except BaseException as e:  # noqa: BLE001 - reported as load errors, never raised into vLLM
                    load.error = e
                finally:
                    load.done[layer].set()
        finally:
            load.seconds += time.perf_counter() - t0

    def wait_layer(self, name: str) -> None:
        load = self._load
        if load is None:
            return
        layer = self._index.get(name)
        if layer is None:
            return
        load.done[layer].wait()
        if self.mover is not None and load.error is None:
            self.mover.layer_ready(layer)

    def _finish_load(self) -> None:
        load, self._load = self._load, None
        if load is None:
            return
        if load.thread is not None:
            load.thread.join()
        if self.mover is not None:
            try:
                self.mover.end_load()
                if load.error is not None:
                    self.mover.quiesce()  # a copy that failed half-way may have left others queued
            except Exception as e:  # noqa: BLE001 - a device error: the blocks are recomputed
                load.error = load.error or e
        lost = load.lost_blocks() if load.results else set()
        if lost and load.error is None:
            logger.warning(
                "polarkvd: %d blocks did not arrive (a peer or the disk failed mid-transfer); vLLM recomputes them",
                len(lost),
            )
            self._errors.update(lost)
            self.stats["load_failed_blocks"] += len(lost)
            for req_id, blocks in load.blocks_by_req.items():
                if lost.intersection(blocks):
                    self._failed_reqs.add(req_id)
        if load.error is not None:
            logger.warning(
                "polarkvd: copying loaded pages failed (%r); vLLM recomputes those blocks", load.error
            )
            for req_id, blocks in load.blocks_by_req.items():
                if blocks:
                    self._errors.update(blocks)
                    self._failed_reqs.add(req_id)
        else:
            n = len(load.items) + len(load.device_items)
            self.stats["load_copied_bytes"] += n * self.geo.num_layers * self.geo.block_bytes
            self.stats_seconds["load_copy"] += load.seconds
        self._release(load)

    def _release(self, load: _Load) -> None:
        load.items.clear()  # drop the tensors over the arena (and the pool) before the pins go
        load.device_items.clear()
        for client, lease in load.leases:
            _call(self.link, "release", functools.partial(client.release, lease), self.stats_seconds)

    def take_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    # -- saves

    def _reserve(self, meta: PolarKVMetadata) -> _Save:
        save = _Save()
        if self.disabled or self.mover is None:
            return save
        pb = self.geo.page_blocks
        pools: dict[int, Any] = {}
        for spec in meta.saves:
            if spec.req_id in self._failed_reqs or self.rank >= len(spec.keys):
                continue
            client, _ = self._session(spec.salt)
            if client is None:
                continue
            keys = spec.keys[self.rank]
            parent = spec.parents[self.rank]
            if client.vram:  # L1 slots first (device to device), DRAM where the pool has no room
                reply = _call(
                    self.link,
                    "reserve",
                    functools.partial(client.reserve_tiers, keys, parent, Tier.VRAM),
                    self.stats_seconds,
                )
                offsets, tiers = reply if reply is not None else (None, b"")
            else:
                offsets = _call(
                    self.link,
                    "reserve",
                    functools.partial(client.reserve, keys, parent),
                    self.stats_seconds,
                )
                tiers = b""
            if offsets is None:
                continue
            entry = save.reserved.setdefault(id(client), (client, []))
            for p, (key, off) in enumerate(zip(keys, offsets)):
                if off < 0:
                    save.existing += off == -1
                    save.no_space += off == -2
                    continue
                if tiers and tiers[p] == Tier.VRAM:
                    page = self._pool_page(pools, client, off)
                    if page is None:  # cannot happen while attached; the slot is aborted
                        save.error = save.error or DaemonUnavailable("the GPU page pool is not mapped")
                        entry[1].append((key, spec.req_id))
                        continue
                    if client not in save.l1_clients:
                        save.l1_clients.append(client)
                    save.l1_pages += 1
                else:
                    page = self._page(client.page(off))
                entry[1].append((key, spec.req_id))
                for j in range(pb):
                    save.items.append((page, j, spec.block_ids[p * pb + j], spec.req_id))
        return save

    def _copy_save_layer(self, save: _Save, layer: int) -> None:
        assert self.mover is not None
        if layer in save.layers_done or not save.items:
            return
        gone = _l1_gone(save.l1_clients)
        if gone is not None:
            raise gone
        save.layers_done.add(layer)
        self.mover.save_layer(layer, [(page[layer, j], block) for page, j, block, _ in save.items])

    def save_layer(self, name: str, meta: PolarKVMetadata) -> None:
        if self.save_mode != "layer" or not meta.saves:
            return
        layer = self._index.get(name)
        if layer is None:
            return
        if self._save is None:
            t0 = time.perf_counter()
            self._save = self._reserve(meta)
            self.stats_seconds["save_reserve"] += time.perf_counter() - t0
        if self._save.error is not None:
            return
        t0 = time.perf_counter()
        try:
            self._copy_save_layer(self._save, layer)
        except Exception as e:  # noqa: BLE001 - never raised into vLLM: the step's stores are aborted
            self._save.error = e
        self.stats_seconds["save_copy"] += time.perf_counter() - t0

    def wait_save(self, meta: PolarKVMetadata | None) -> None:
        """The end of every step: finish this step's loads, store its completed pages."""
        self._finish_load()
        try:
            if meta is not None and meta.saves:
                self._store(meta)
        finally:
            self._save = None
            self._failed_reqs = set()

    def _store(self, meta: PolarKVMetadata) -> None:
        t0 = time.perf_counter()
        save = self._save if self._save is not None else self._reserve(meta)
        self._save = None
        t1 = time.perf_counter()
        try:
            if save.error is None:
                for layer in range(self.geo.num_layers):
                    self._copy_save_layer(save, layer)
        except Exception as e:  # noqa: BLE001 - a failed copy aborts the step's stores, nothing else
            save.error = e
        if self.mover is not None:
            # Every copy into a reserved slot ends before its commit or abort: an aborted L1 slot is
            # handed to the next writer at once.
            try:
                self.mover.finish_saves()
                if save.error is not None:
                    self.mover.quiesce()
            except Exception as e:  # noqa: BLE001 - a device error: nothing is committed
                save.error = save.error or e
        ok = save.error is None
        if not ok:
            logger.warning(
                "polarkvd: copying blocks to store failed (%r); this step's pages are not stored", save.error
            )
        t2 = time.perf_counter()
        copied = len(save.items)
        save.items.clear()
        for client, entries in save.reserved.values():
            good = [k for k, req in entries if ok and req not in self._failed_reqs]
            bad = [k for k, req in entries if not ok or req in self._failed_reqs]
            if (
                bad
                and _call(self.link, "abort", functools.partial(client.abort, bad), self.stats_seconds)
                is not None
            ):
                self.stats["save_aborted_pages"] += len(bad)
            done = good and _call(
                self.link, "commit", functools.partial(client.commit_result, good), self.stats_seconds
            )
            if done:
                self.stats["saved_pages"] += done.committed
                if done.durable is not None and done.durable < done.committed:  # write-through fell short
                    self.stats["saved_pages_not_durable"] += done.committed - done.durable
        if ok and save.l1_pages:
            self.stats["saved_pages_vram"] += save.l1_pages
        self.stats["save_existing_pages"] += save.existing
        self.stats["save_no_space_pages"] += save.no_space
        self.stats["save_copied_bytes"] += copied * self.geo.block_bytes * len(save.layers_done)
        self.stats_seconds["save_copy"] += t2 - t1
        self.stats_seconds["save_total"] += time.perf_counter() - t0

    def close(self) -> None:
        self._finish_load()
        self.link.close()
        if self.mover is not None:
            self.mover.close()


# ------------------------------------------------------------------------------------------ the connector


class PolarKVConnector(KVConnectorBase_V1):
    """vLLM v1 KV connector backed by the polarkvd daemon (see the module docstring)."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.options = Options.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        self.geometry = build_geometry(vllm_config, kv_cache_config, self.options)
        self._scheduler: _SchedulerSide | None = None
        self._worker: _WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = _SchedulerSide(self.geometry, self.options)
            policy = getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute")
            if policy != "recompute":
                logger.warning(
                    'PolarKVConnector: kv_load_failure_policy is %r; set it to "recompute" in '
                    "--kv-transfer-config, or a page evicted between lookup and load fails the request",
                    policy,
                )
        else:
            self._worker = _WorkerSide(self.geometry, self.options)

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
            mover = self._worker.mover
            if mover is not None:  # bytes by copy path (CUDA): load_vram, load_direct, load_staged, save_...
                out.update({f"copied_{k}_bytes": v for k, v in mover.copied.items()})
        return out

    @property
    def worker(self) -> _WorkerSide | None:
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
