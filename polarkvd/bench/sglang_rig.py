"""SGLang's own HiCache classes, driven without a model or a GPU: what `polarkvd bench sglang` and
tests/sglang use as "an SGLang process".

A stack is what SGLang's KV-only cache builds for a model (`build_kv_only_stack`): a device KV pool
(`MHATokenToKVPool` or `MLATokenToKVPool`, on CPU), its host pool (`MHATokenToKVPoolHost` /
`MLATokenToKVPoolHost`) in a `HostPoolGroup`, and a `HybridCacheController` with `io_backend="direct"`
and a storage backend built by SGLang's `StorageBackendFactory` (polarkvd through the `dynamic`
factory, or SGLang's `file` / `mooncake`). Writing pages goes through the controller's backup thread
(`write_storage`); reading through its prefetch threads (`prefetch`, the hit query, the transfer), with
this module standing in for the scheduler's part (allocating host pages for a hit). Page content is
derived from (seed, page), so another process can check it byte for byte.

Run as `python -m polarkvd.bench.sglang_rig` (SGLang importable: scripts/setup-sglang.sh's folder on
PYTHONPATH): JSON commands on stdin, one per line, each answered by one `@@sglang {...}` line on
stdout (`serve`). The parent never imports SGLang.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

import numpy as np

MARK = "@@sglang "
STORAGE_BATCH = 128  # SGLang's STORAGE_BATCH_SIZE: pages per backend call
log = logging.getLogger("polarkvd.bench.sglang_rig")
_dist_ready = False


def _init_dist() -> Any:
    """One gloo process group of size 1 (SGLang's controller wants a TP group) and the parallel
    state a real server would publish: TP, PP and decode-context parallelism of one."""
    global _dist_ready
    import torch.distributed as dist
    from sglang.srt.runtime_context import get_parallel

    if not _dist_ready:
        store = tempfile.mktemp(prefix="polarkv-sglang-gloo-")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        get_parallel().override_permanently(
            tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_dcp_size=1, attn_dcp_rank=0
        )
        _dist_ready = True
    return dist.group.WORLD


def tokens_of(seed: int, pages: int, page: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 50_000, pages * page)]


def page_content(seed: int, i: int, nbytes: int) -> np.ndarray:
    return np.random.default_rng([seed, i, 7]).integers(0, 256, nbytes, dtype=np.uint8)


class Stack:
    """One "SGLang instance": device pool, host pool, controller, storage backend."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch
        from sglang.srt.mem_cache.hicache_storage import PoolName
        from sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller import HybridCacheController
        from sglang.srt.mem_cache.hybrid_cache.hybrid_pool_assembler import build_pool_entry
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
        from sglang.srt.mem_cache.pool_host import HostPoolGroup
        from sglang.srt.mem_cache.pool_host import base as host_base
        from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
        from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
        from sglang.srt.runtime_context import get_parallel

        # SGLang keeps 10 GiB of host RAM free when sizing host pools; these pools are small and
        # sized explicitly, and a shared test machine may not have 10 GiB free.
        host_base.HICACHE_HOST_MEMORY_RESERVE_BYTES = 0
        group = _init_dist()
        self.spec = spec
        page = self.page = int(spec.get("page", 16))
        layers = int(spec.get("layers", 4))
        dtype = getattr(torch, spec.get("dtype", "bfloat16"))
        device_tokens = int(spec.get("device_tokens", 1024))
        host_tokens = int(spec.get("host_tokens", 4096))
        layout = spec.get("layout", "page_first")
        mla = bool(spec.get("mla", False))
        if mla:
            rank, rope = int(spec.get("kv_lora_rank", 64)), int(spec.get("rope_dim", 16))
            self.device = MLATokenToKVPool(
                size=device_tokens, page_size=page, dtype=dtype, kv_lora_rank=rank,
                qk_rope_head_dim=rope, layer_num=layers, device="cpu", enable_memory_saver=False,
            )  # fmt: skip
            info = self.device.get_device_pool_infos()[0].buffer_info
            self.host = MLATokenToKVPoolHost(
                info, 0, 0, page, layout, pin_memory=False, device="cpu",
                override_kv_cache_dim=self.device.kv_cache_dim, device_capacity_tokens=device_tokens,
                start_layer=0, end_layer=layers, target_layer_num=layers, host_token_capacity=host_tokens,
            )  # fmt: skip
        else:
            self.device = MHATokenToKVPool(
                size=device_tokens, page_size=page, dtype=dtype, head_num=int(spec.get("heads", 2)),
                head_dim=int(spec.get("head_dim", 64)), layer_num=layers, device="cpu",
                enable_memory_saver=False, v_head_dim=spec.get("v_head_dim"),
            )  # fmt: skip
            info = self.device.get_device_pool_infos()[0].buffer_info
            self.host = MHATokenToKVPoolHost(
                info, 0, 0, page, layout, pin_memory=False, device="cpu",
                device_capacity_tokens=device_tokens, start_layer=0, end_layer=layers,
                host_token_capacity=host_tokens,
            )  # fmt: skip
        # SGLang pins its host pool on GPU hosts (page-locked: faulted in at start); touch it here
        # too, so that no backend pays first-touch page faults inside its timed copies.
        buffer = self.host.kv_buffer
        for part in buffer if isinstance(buffer, (list, tuple)) else [buffer]:
            part.view(-1).view(torch.uint8).fill_(0)
        self.mamba: Any = None
        mamba = spec.get("mamba")  # a hybrid model: Mamba state layers beside the attention layers
        transfer_layers = layers + (int(mamba.get("layers", 2)) if mamba is not None else 0)
        entries = [
            build_pool_entry(
                name=PoolName.KV,
                host_pool=self.host,
                device_pool=self.device,
                layer_mapping={i: i for i in range(layers)},
                transfer_layer_id_max=transfer_layers,
                is_anchor=True,
            )
        ]
        if mamba is not None:
            entries.append(self._mamba_entry(mamba, layers, transfer_layers))
        pools = HostPoolGroup(entries)
        device = self.device

        class _Allocator:  # what the controller asks of SGLang's token allocator
            def get_kvcache(self) -> Any:
                return device

        backend = self.kind = spec.get("backend", "polarkv")
        if backend == "polarkv":
            name = "dynamic"
            extra = {
                "backend_name": "polarkv",
                "module_path": "polarkvd.connectors.sglang",
                "class_name": "PolarKVStorage",
                "interface_v1": int(spec.get("interface_v1", 1)),
            }
        elif backend == "file":
            name, extra = "file", {"file_storage_path": spec["path"]}
        elif backend == "mooncake":
            name, extra = "mooncake", {}
        else:
            raise ValueError(f"unknown backend {backend!r}")
        extra.update(spec.get("extra", {}))
        tp = {"tp_rank": int(spec.get("tp_rank", 0)), "tp_size": int(spec.get("tp_size", 1))}
        with get_parallel().override(**tp):  # what SGLang's storage config reads at attach
            self.controller = HybridCacheController(
                _Allocator(), pools, page, group, threading.Event(), io_backend="direct",
                storage_backend=name, model_name=spec.get("model", "test-model"),
                storage_backend_extra_config=extra, transfer_layer_id_max=transfer_layers,
                prefetch_threshold=page,
            )  # fmt: skip
        self.backend = self.controller.storage_backend
        self.page_bytes = int(self.host.get_data_page(0, flat=True).numel() * self.host.dtype.itemsize)
        self.lock = threading.Lock()
        self.requests = 0

    def _mamba_entry(self, spec: dict[str, Any], first: int, transfer_layers: int) -> Any:
        """SGLang's Mamba2 state pool on CPU and its host pool (page_first: one state slot a page)."""
        from sglang.srt.configs.mamba_utils import Mamba2CacheParams, Mamba2StateShape
        from sglang.srt.mem_cache.hicache_storage import PoolName
        from sglang.srt.mem_cache.hybrid_cache.hybrid_pool_assembler import build_pool_entry
        from sglang.srt.mem_cache.memory_pool import MambaPool
        from sglang.srt.mem_cache.pool_host.mamba import MambaPoolHost

        n = int(spec.get("layers", 2))
        ids = list(range(first, first + n))
        shape = Mamba2StateShape.create(
            tp_world_size=1, intermediate_size=int(spec.get("intermediate", 256)), n_groups=1,
            num_heads=int(spec.get("heads", 8)), head_dim=int(spec.get("head_dim", 32)),
            state_size=int(spec.get("state", 16)), conv_kernel=int(spec.get("conv_kernel", 4)),
        )  # fmt: skip
        slots = int(spec.get("slots", 64))
        device = MambaPool(
            size=slots, spec_state_size=0, cache_params=Mamba2CacheParams(shape=shape, layers=ids),
            mamba_layer_ids=ids, device="cpu",
        )  # fmt: skip
        (info,) = device.get_device_pool_infos()
        self.mamba = MambaPoolHost(
            info.buffer_info, 2.0, 0, device_capacity=slots, pin_memory=False, layout="page_first"
        )
        self.mamba_bytes = int(self.mamba.get_data_page(0).numel())
        return build_pool_entry(
            name=PoolName.MAMBA, host_pool=self.mamba, device_pool=device,
            layer_mapping={layer: i for i, layer in enumerate(ids)}, transfer_layer_id_max=transfer_layers,
        )  # fmt: skip

    def _state_content(self, seed: int, i: int) -> Any:
        import torch

        return torch.from_numpy(page_content(seed + 7919, i, self.mamba_bytes))

    def hybrid(
        self, fn: str, seed: int, pages: int, states: list[int] | None = None, policy: str = "trailing_pages",
        trailing: int = 1,
    ) -> dict[str, Any]:  # fmt: skip
        """A hybrid model's storage calls, as SGLang's hybrid controller makes them: "set" stores the
        KV pages of (seed, pages) (v1) and the Mamba states taken at the pages `states` (v2);
        "exists" asks batch_exists_v2 with a Mamba transfer of `trailing` keys under `policy`;
        "get" loads the states at the pages `states` (v2) into fresh slots and checks their bytes."""
        from sglang.srt.mem_cache.hicache_storage import (
            HiCacheStorageExtraInfo,
            PoolHitPolicy,
            PoolName,
            PoolTransfer,
        )

        keys = self.hashes(self.key(seed, pages))
        info = HiCacheStorageExtraInfo(prefix_keys=[])
        states = list(states or [])
        if fn == "exists":
            transfer = PoolTransfer(
                name=PoolName.MAMBA, keys=keys[-trailing:], hit_policy=PoolHitPolicy(policy)
            )
            r = self.backend.batch_exists_v2(keys, [transfer], info)
            return {
                "type": type(r).__name__,
                "kv_hit_pages": r.kv_hit_pages,
                "pool_hits": {str(getattr(k, "value", k)): v for k, v in r.extra_pool_hit_pages.items()},
                "restorable": r.restorable_prefix_pages,
            }
        slots: Any = self.mamba.alloc(len(states)) if states else None
        try:
            if fn == "set":
                res = self.raw("batch_set" if self.kind == "file" else "batch_set_v1", seed, pages)
                for j, i in enumerate(states):
                    self.mamba.set_from_flat_data_page(int(slots[j]), self._state_content(seed, i))
                transfer = PoolTransfer(
                    name=PoolName.MAMBA, host_indices=slots, keys=[keys[i] for i in states]
                )
                out = self.backend.batch_set_v2([transfer], info) if states else {}
                return {"kv": res["result"], "states": [list(v) for v in out.values()]}
            if fn == "get":
                transfer = PoolTransfer(
                    name=PoolName.MAMBA, host_indices=slots, keys=[keys[i] for i in states]
                )
                out = self.backend.batch_get_v2([transfer], info)
                got = list(next(iter(out.values())))
                match = all(
                    bytes(self.mamba.get_data_page(int(slots[j])).numpy())
                    == bytes(self._state_content(seed, i).numpy())
                    for j, i in enumerate(states)
                    if got[j]
                )
                return {"states": got, "type": type(out).__name__, "match": match}
            raise ValueError(f"unknown hybrid call {fn}")
        finally:
            if slots is not None:
                self.mamba.free(slots)

    # -- pages -------------------------------------------------------------------------------------

    def key(self, seed: int, pages: int, salt: str | None = None, extra_key: str | None = None) -> Any:
        from sglang.srt.mem_cache.radix_cache import RadixKey

        tokens = tokens_of(seed, pages, self.page)
        if salt is None and extra_key is None:
            return tokens
        return RadixKey(tokens, extra_key=extra_key, cache_salt=salt)

    def hashes(self, key: Any) -> list[str]:
        from sglang.srt.mem_cache.utils import get_storage_hash_str

        return list(get_storage_hash_str(key, None, page_size=self.page))

    def fill(self, indices: Any, seed: int, pages: int) -> None:
        import torch

        for i in range(pages):
            data = torch.from_numpy(page_content(seed, i, self.page_bytes)).view(self.host.dtype)
            self.host.set_from_flat_data_page(int(indices[i * self.page]), data)

    def digests(self, indices: Any, pages: int) -> list[str]:
        import torch

        out = []
        for i in range(pages):
            flat = self.host.get_data_page(int(indices[i * self.page]), flat=True).contiguous()
            out.append(hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()[:16])
        return out

    def expected(self, seed: int, pages: int) -> list[str]:
        return [
            hashlib.sha256(page_content(seed, i, self.page_bytes).tobytes()).hexdigest()[:16]
            for i in range(pages)
        ]

    def alloc(self, tokens: int) -> Any:
        indices = self.host.alloc(tokens)
        if indices is None:
            raise RuntimeError(f"host pool full: {tokens} tokens wanted")
        return indices

    # -- through the controller -------------------------------------------------------------------

    def write(
        self, seed: int, pages: int, salt: str | None = None, extra_key: str | None = None
    ) -> dict[str, Any]:
        """Fill `pages` host pages and back them up through the controller's backup thread."""
        key = self.key(seed, pages, salt, extra_key)
        indices = self.alloc(pages * self.page)
        try:
            self.fill(indices, seed, pages)
            tokens = list(getattr(key, "token_ids", key))
            hashes = self.hashes(key)
            cpu0, t0 = time.process_time(), time.perf_counter()
            op_id = self.controller.write_storage(indices, tokens, hashes, [])
            while True:
                op = self.controller.ack_backup_queue.get(timeout=120)
                if op.id == op_id:
                    break
            took, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        finally:
            self.host.free(indices)
        return {"stored_tokens": op.completed_tokens, "seconds": took, "cpu_seconds": cpu}

    def read(
        self, seed: int, pages: int, salt: str | None = None, extra_key: str | None = None
    ) -> dict[str, Any]:
        """Prefetch `pages` pages through the controller: the hit query, then (as the scheduler
        would) host pages for the hit, then the transfer; compares what arrived with the content."""
        from sglang.srt.mem_cache.base_prefix_cache import CacheRequestHandle

        self.requests += 1
        key = self.key(seed, pages, salt, extra_key)
        cpu0, t0 = time.process_time(), time.perf_counter()
        op = self.controller.prefetch(CacheRequestHandle(f"r{self.requests}", 0), key, None, [])
        hit = self.controller.prefetch_hit_queue.get(timeout=120)
        assert hit is op, "another prefetch answered"
        t_query = time.perf_counter() - t0
        hit_tokens = int(hit.storage_hit_count)
        loaded = 0
        digests: list[str] = []
        indices = None
        t_transfer = time.perf_counter()
        if hit_tokens:  # a miss is revoked by the scheduler: no transfer, no acks
            indices = self.alloc(hit_tokens)
            t_transfer = time.perf_counter()
            hit.host_indices = indices
            self.controller.prefetch_buffer.put(hit)
        while hit_tokens:
            ack = self.controller.ack_prefetch_queue.get(timeout=120)
            if ack.completed_tokens is not None:
                loaded = max(loaded, int(ack.completed_tokens))
            if ack.completed_req:
                break
        end = time.perf_counter()
        took, cpu = end - t0, time.process_time() - cpu0
        if indices is not None:
            digests = self.digests(indices, loaded // self.page)
            self.host.free(indices)
        want = self.expected(seed, pages)[: len(digests)]
        return {
            "hit_tokens": hit_tokens,
            "loaded_tokens": loaded,
            "match": digests == want,
            "query_seconds": t_query,
            "transfer_seconds": end - t_transfer,
            "seconds": took,
            "cpu_seconds": cpu,
        }

    # -- straight to the backend ------------------------------------------------------------------

    def raw(
        self, fn: str, seed: int, pages: int, salt: str | None = None, keys: list[str] | None = None
    ) -> dict[str, Any]:
        """One backend call as SGLang's threads make it, with what it returned (type included).
        `keys`: SGLang keys to use instead of the hash chain of (seed, pages, salt)."""
        from sglang.srt.mem_cache.hicache_storage import HiCacheStorageExtraInfo

        keys = keys or self.hashes(self.key(seed, pages, salt))
        info = HiCacheStorageExtraInfo(prefix_keys=[])
        t0 = time.perf_counter()
        if fn == "batch_exists":
            result: Any = self.backend.batch_exists(keys, info)
            return {"result": result, "type": type(result).__name__, "seconds": time.perf_counter() - t0}
        indices = self.alloc(pages * self.page)
        try:
            if fn == "batch_set_v1":
                self.fill(indices, seed, pages)
                t0 = time.perf_counter()
                result = self.backend.batch_set_v1(keys, indices, info)
            elif fn == "batch_get_v1":
                t0 = time.perf_counter()
                result = self.backend.batch_get_v1(keys, indices, info)
            elif fn == "batch_set":  # generic: flat page tensors
                self.fill(indices, seed, pages)
                values = [
                    self.host.get_data_page(int(indices[i * self.page]), flat=True) for i in range(pages)
                ]
                t0 = time.perf_counter()
                result = self.backend.batch_set(keys, values)
            elif fn == "batch_get":
                targets = [self.host.get_dummy_flat_data_page() for _ in range(pages)]
                t0 = time.perf_counter()
                got = self.backend.batch_get(keys, targets)
                result = [g is not None for g in (got or [])]
                for i, g in enumerate(got or []):
                    if g is not None:
                        self.host.set_from_flat_data_page(int(indices[i * self.page]), g)
            else:
                raise ValueError(f"unknown call {fn}")
            took = time.perf_counter() - t0
            ok = sum(1 for _ in _leading_true(result)) if isinstance(result, list) else None
            match = None
            if fn in ("batch_get_v1", "batch_get") and isinstance(result, list):
                match = self.digests(indices, ok or 0) == self.expected(seed, pages)[: ok or 0]
        finally:
            self.host.free(indices)
        return {
            "result": result,
            "type": type(result).__name__,
            "ok": ok,
            "match": match,
            "seconds": took,
        }

    def exists_timing(self, seed: int, pages: int, keys: int = 64, repeat: int = 200) -> dict[str, Any]:
        """p50 of `batch_exists` over the first `keys` keys of a stored chain (all hits), and, for
        polarkvd, of one socket round trip (`ping`) in the same thread, interleaved."""
        from sglang.srt.mem_cache.hicache_storage import HiCacheStorageExtraInfo

        chain = self.hashes(self.key(seed, pages))[:keys]
        info = HiCacheStorageExtraInfo(prefix_keys=[])
        link = getattr(self.backend, "link", None)
        session = link.session() if link is not None else None
        exists, pings, hits = [], [], 0
        for _ in range(repeat):
            t0 = time.perf_counter()
            hits = self.backend.batch_exists(chain, info)
            exists.append(time.perf_counter() - t0)
            if session is not None:
                t0 = time.perf_counter()
                session.client.ping()
                pings.append(time.perf_counter() - t0)
        return {
            "keys": len(chain),
            "hits": hits,
            "exists_p50_s": float(np.median(exists)),
            "ping_p50_s": float(np.median(pings)) if pings else None,
        }

    def metrics(self) -> dict[str, Any]:
        """What SGLang's metrics collector gets from `get_stats()`."""
        m = self.backend.get_stats()
        return {
            "type": type(m).__name__,
            **{k: list(getattr(m, k, [])) for k in ("prefetch_pgs", "backup_pgs", "prefetch_bandwidth")},
            "polarkv": getattr(m, "polarkv", None),
        }

    def stats(self) -> dict[str, Any]:
        counters = getattr(self.backend, "counters", None)
        return dict(counters) if counters is not None else {}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.controller.detach_storage_backend()


def _leading_true(values: list[Any]) -> Any:
    for v in values:
        if v is not True:
            return
        yield v


def serve() -> None:
    """The command loop: {"op": "stack", "name": ..., "spec": {...}} builds a stack; "write", "read",
    "raw", "stats", "close" act on one; "quit" ends. Errors are answered, never fatal."""
    logging.basicConfig(
        level=os.environ.get("POLARKV_RIG_LOG", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    stacks: dict[str, Stack] = {}

    def say(**kw: Any) -> None:
        sys.stdout.write(MARK + json.dumps(kw, default=str) + "\n")
        sys.stdout.flush()

    say(event="ready", pid=os.getpid())
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "quit":
                break
            if op == "stack":
                name = cmd["name"]
                if name in stacks:
                    stacks.pop(name).close()
                stacks[name] = Stack(cmd["spec"])
                say(event="ok", page_bytes=stacks[name].page_bytes)
            elif op == "close":
                stacks.pop(cmd["name"]).close()
                say(event="ok")
            else:
                stack = stacks[cmd.pop("name")]
                out = getattr(stack, op)(**cmd)
                say(event="ok", **out)
        except Exception as e:  # noqa: BLE001 - answered to the parent
            say(event="error", type=type(e).__name__, message=str(e), trace=traceback.format_exc()[-3000:])
    for stack in stacks.values():
        stack.close()
    say(event="bye")


if __name__ == "__main__":
    serve()
