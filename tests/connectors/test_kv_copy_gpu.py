"""The CUDA mover (polarkvd/connectors/kv_copy.py) with CUDA KV tensors against a real daemon with
`[vram] enabled = true`, without vLLM: the arena page-locked in this process and copies going by DMA
straight between it and the device, L1 pages stored and loaded device to device, a layer-pipelined
load whose per-layer events the compute stream waits on, and the staging path when page-locking is
refused. Every round trip is checked byte for byte.

Skipped with the reason where no CUDA device answers (these build machines) or the Python has no
CUDA torch. Run by scripts/gpu-check.sh (docs/HARDWARE.md):

    python -m pytest -m gpu tests/connectors/test_kv_copy_gpu.py
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import pytest

from polarkvd.client import EngineClient
from polarkvd.types import Tier
from tests.conftest import TEST_NS, chain_tokens, skip_without_cuda_torch

pytestmark = pytest.mark.gpu
LAYERS, HEADS, TOKENS, HEAD = TEST_NS.num_layers, TEST_NS.num_kv_heads, TEST_NS.page_tokens, TEST_NS.head_dim
BLOCK_BYTES = HEADS * TOKENS * 2 * HEAD * 2  # one layer of one 16-token block, K and V, bf16
NUM_BLOCKS = 16


@pytest.fixture(autouse=True)
def need_gpu() -> None:
    skip_without_cuda_torch("the CUDA mover needs CUDA torch")


@pytest.fixture
def l1(daemon_factory: Any) -> Any:
    # No disk tier: the daemon then needs neither zstandard nor pyzmq, which GPU machines may lack.
    d = daemon_factory(
        {"vram.enabled": "true", "vram.capacity": "64MiB", "vram.slab_bytes": "1MiB", "disk.enabled": "false"}
    )
    assert "L1 pool allocated" in d.log()
    return d


def kv_cache(seed: int, strided: bool = False) -> list[Any]:
    """A CUDA KV cache, `[B, H, N, C]` per layer (random; "strided": H outermost in memory)."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(LAYERS):
        t = torch.randn(NUM_BLOCKS, HEADS, TOKENS, 2 * HEAD, generator=g, device="cuda").to(torch.bfloat16)
        out.append(t.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3) if strided else t)
    return out


def mover_for(layers: list[Any], **kw: Any) -> Any:
    from polarkvd.connectors.kv_copy import CudaMover

    return CudaMover(layers, NUM_BLOCKS, BLOCK_BYTES, **kw)


def pages_of(kv: EngineClient, offsets: Sequence[int], tiers: Sequence[int]) -> list[Any]:
    """Page tensors [layers, 1, block bytes] as the connector builds them: L1 pages are slices of
    the pool (CUDA), the others arena pages (host)."""
    import torch

    pool = kv.pool_tensor()
    out = []
    for off, tier in zip(offsets, tiers):
        if tier == Tier.VRAM:
            flat = pool[off : off + kv.page_bytes]
        else:
            flat = torch.frombuffer(kv.page(off), dtype=torch.uint8)
        out.append(flat.view(LAYERS, 1, BLOCK_BYTES))
    return out


def store(
    kv: EngineClient,
    mover: Any,
    keys: Sequence[bytes],
    blocks: Sequence[int],
    l1: bool,
    parent: bytes | None = None,
) -> list[int]:
    """Reserve (L1 first when `l1`), copy layer by layer, wait for the copies, commit: the tiers."""
    if l1:
        offsets, tiers = kv.reserve_tiers(keys, parent, Tier.VRAM)
        tiers = list(tiers)
    else:
        offsets = kv.reserve(keys, parent)
        tiers = [int(Tier.DRAM)] * len(keys)
    assert all(off >= 0 for off in offsets)
    pages = pages_of(kv, offsets, tiers)
    for layer in range(LAYERS):
        mover.save_layer(layer, [(p[layer, 0], b) for p, b in zip(pages, blocks)])
    mover.finish_saves()
    del pages
    assert kv.commit(keys) == len(keys)
    return tiers


def load(kv: EngineClient, mover: Any, keys: Sequence[bytes], blocks: Sequence[int]) -> list[int]:
    import torch

    r = kv.load(keys)
    assert r.loaded == len(keys)
    pages = pages_of(kv, r.offsets, [int(t) for t in r.tiers])
    mover.begin_load()
    for layer in range(LAYERS):
        mover.load_layer(layer, [(p[layer, 0], b) for p, b in zip(pages, blocks)])
    for layer in range(LAYERS):
        mover.layer_ready(layer)
    mover.end_load()
    torch.cuda.synchronize()
    del pages, r.views
    kv.release(r.lease)
    return [int(t) for t in r.tiers]


def same_blocks(src: list[Any], s: Sequence[int], dst: list[Any], d: Sequence[int]) -> bool:
    import torch

    return all(torch.equal(a[i], b[j]) for a, b in zip(src, dst) for i, j in zip(s, d))


def test_arena_pages_go_by_dma_straight_between_the_arena_and_the_device(l1) -> None:
    """One mover per process owns the registration (CUDA refuses a second one of the same range), so
    the round trip goes from blocks of one cache back into other blocks of the same cache."""
    import torch

    kv = l1.engine()  # no vram=True: every page in the DRAM arena
    cache = kv_cache(1, strided=True)
    before = [t.clone() for t in cache]
    mover = mover_for(cache)
    assert mover.use_arena(kv), f"page-locking the arena was refused: {mover.arenas.refused}"
    assert torch.frombuffer(kv.arena, dtype=torch.uint8).is_pinned()  # CUDA sees it page-locked
    keys = kv.page_keys(chain_tokens(1, 4))
    assert store(kv, mover, keys, [3, 0, 15, 7], l1=False) == [Tier.DRAM] * 4
    assert mover.copied["save_direct"] == 4 * LAYERS * BLOCK_BYTES and not mover.copied["save_staged"]
    # The page holds the blocks in logical order, whatever the layout (this cache is strided).
    r = kv.load(keys)
    page = torch.frombuffer(r.views[2], dtype=torch.uint8).view(LAYERS, BLOCK_BYTES)
    for i in range(LAYERS):
        assert torch.equal(page[i].cuda(), before[i][15].contiguous().view(torch.uint8).flatten())
    del page, r.views
    kv.release(r.lease)
    assert load(kv, mover, keys, [1, 2, 4, 8]) == [Tier.DRAM] * 4
    assert same_blocks(before, [3, 0, 15, 7], cache, [1, 2, 4, 8])
    assert same_blocks(before, [5, 6], cache, [5, 6])  # blocks not loaded into are untouched
    assert mover.copied["load_direct"] == 4 * LAYERS * BLOCK_BYTES and not mover.copied["load_staged"]
    mover.close()
    assert not torch.frombuffer(kv.arena, dtype=torch.uint8).is_pinned()  # unregistered at close
    kv.close()


def test_l1_pages_are_stored_and_loaded_device_to_device(l1) -> None:
    src, dst = kv_cache(3), kv_cache(4, strided=True)
    writer = EngineClient(TEST_NS, "writer", l1.engine_socket, vram=True)
    reader = EngineClient(TEST_NS, "reader", l1.engine_socket, vram=True)
    assert writer.vram and reader.vram
    keys = writer.page_keys(chain_tokens(3, 6))
    mover = mover_for(src)
    assert store(writer, mover, keys, [0, 1, 2, 9, 10, 11], l1=True) == [Tier.VRAM] * 6
    assert mover.copied["save_vram"] == 6 * LAYERS * BLOCK_BYTES and not mover.copied["save_direct"]
    assert list(reader.lookup(keys).tier_codes) == [Tier.VRAM] * 6
    back = mover_for(dst)
    assert load(reader, back, keys, [15, 14, 13, 5, 4, 3]) == [Tier.VRAM] * 6
    assert same_blocks(src, [0, 1, 2, 9, 10, 11], dst, [15, 14, 13, 5, 4, 3])
    assert back.copied["load_vram"] == 6 * LAYERS * BLOCK_BYTES
    assert not back.copied["load_direct"] and not back.copied["load_staged"]
    counters = l1.stats()["counters"]
    assert counters["stored_pages_vram"] == 6 and counters["loaded_pages_vram"] == 6
    for m in (mover, back):
        m.close()
    writer.close()
    reader.close()


def test_a_layer_pipelined_load_makes_the_compute_stream_wait_for_each_layer(l1) -> None:
    """The host never blocks in `layer_ready`; the compute stream does: work queued on it before
    `layer_ready(l)` sees the old blocks, work queued after sees the loaded ones."""
    import torch

    src, dst = kv_cache(5), kv_cache(6)
    kv = EngineClient(TEST_NS, "pipe", l1.engine_socket, vram=True)
    keys = kv.page_keys(chain_tokens(5, 2))
    half = [
        store(kv, mover_for(src), keys[:1], [6], l1=True),
        store(kv, mover_for(src), keys[1:], [7], l1=False, parent=keys[0]),
    ]
    assert half == [[Tier.VRAM], [Tier.DRAM]]  # one L1 page (device to device), one arena page (DMA)
    before = [t.clone() for t in dst]
    mover = mover_for(dst)
    assert mover.use_arena(kv), f"page-locking the arena was refused: {mover.arenas.refused}"
    r = kv.load(keys)
    pages = pages_of(kv, r.offsets, [int(t) for t in r.tiers])
    mover.begin_load()
    with torch.cuda.stream(mover.stream):
        torch.cuda._sleep(2_000_000_000)  # holds the side stream (~1 s): the copies queue behind it
    t0 = time.perf_counter()
    for layer in range(LAYERS):
        mover.load_layer(layer, [(p[layer, 0], b) for p, b in zip(pages, [2, 3])])
    stale = [dst[layer][2:4].clone() for layer in range(LAYERS)]  # queued before any wait: old bytes
    fresh = []
    for layer in range(LAYERS):
        mover.layer_ready(layer)
        fresh.append(dst[layer][2:4].clone())  # queued after the wait: runs once layer `layer` is in
    queued = time.perf_counter() - t0
    assert not mover._load_events[0].query(), "the side stream should still be held by the sleep"
    mover.end_load()
    torch.cuda.synchronize()
    assert queued < 0.5, f"the host blocked for {queued:.2f}s while queueing"
    for layer in range(LAYERS):
        assert torch.equal(stale[layer], before[layer][2:4])
        assert torch.equal(fresh[layer][0], src[layer][6]) and torch.equal(fresh[layer][1], src[layer][7])
    del pages, r.views
    kv.release(r.lease)
    mover.close()
    kv.close()


def test_a_refused_page_lock_falls_back_to_staging_and_stays_exact(l1, kv_copy_log) -> None:
    import torch

    def refuse(addr: int, nbytes: int) -> None:
        raise RuntimeError("CUDA_ERROR_NOT_PERMITTED (operation not permitted)")

    src, dst = kv_cache(7), kv_cache(8, strided=True)
    kv = l1.engine()
    mover = mover_for(src, registrar=(refuse, lambda addr: None))
    assert not mover.use_arena(kv) and not mover.use_arena(kv)
    warnings = [r for r in kv_copy_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "CUDA_ERROR_NOT_PERMITTED" in warnings[0].getMessage()
    assert not torch.frombuffer(kv.arena, dtype=torch.uint8).is_pinned()
    keys = kv.page_keys(chain_tokens(7, 3))
    store(kv, mover, keys, [4, 5, 6], l1=False)
    assert mover.copied["save_staged"] == 3 * LAYERS * BLOCK_BYTES and not mover.copied["save_direct"]
    back = mover_for(dst, direct=False)
    assert not back.use_arena(kv)
    load(kv, back, keys, [0, 8, 12])
    assert same_blocks(src, [4, 5, 6], dst, [0, 8, 12])
    assert back.copied["load_staged"] == 3 * LAYERS * BLOCK_BYTES and not back.copied["load_direct"]
    mover.close()
    back.close()
    kv.close()
