"""The worker-side byte movers (polarkvd/connectors/kv_copy.py) on CPU, without vLLM: real torch
tensors shaped like vLLM's per-layer KV cache view `[num_blocks, kv_heads, block_size, 2 * head_size]`,
pages reserved, committed and loaded through a real daemon, checked byte for byte.

The CUDA mover's copies need a GPU: tests/connectors/test_kv_copy_gpu.py (scripts/gpu-check.sh).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import pytest
import torch

from polarkvd.client import EngineClient
from polarkvd.connectors.kv_copy import ArenaRegistry, HostMover
from tests.conftest import TEST_NS, chain_tokens

# TEST_NS: 4 layers x 2 KV heads x 64 dims x 16 tokens, bf16: one 16-token vLLM block per page.
LAYERS, HEADS, TOKENS, HEAD = TEST_NS.num_layers, TEST_NS.num_kv_heads, TEST_NS.page_tokens, TEST_NS.head_dim
BLOCK_BYTES = HEADS * TOKENS * 2 * HEAD * 2  # K and V, bf16
NUM_BLOCKS = 12


def kv_cache(layout: str = "contiguous", seed: int = 0) -> list[torch.Tensor]:
    """One engine's KV cache: a `[B, H, N, C]` view per layer, random content, in a physical layout:
    "contiguous" (vLLM CPU, LBHNC), "strided" (H outermost in memory, the same logical view) or
    "split" (kernel block splitting: `[B * 2, H, N / 2, C]`)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(LAYERS):
        logical = torch.randn(NUM_BLOCKS, HEADS, TOKENS, 2 * HEAD, generator=g).to(torch.bfloat16)
        if layout == "strided":
            t = logical.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
            assert not t[0].is_contiguous()
        elif layout == "split":
            t = logical.reshape(NUM_BLOCKS * 2, HEADS, TOKENS // 2, 2 * HEAD)
        else:
            t = logical
        out.append(t)
    return out


def page_tensor(kv: EngineClient, offset: int) -> torch.Tensor:
    """An arena page as the connector sees it: [layers, blocks in page, block bytes]."""
    return torch.frombuffer(kv.page(offset), dtype=torch.uint8).view(LAYERS, 1, BLOCK_BYTES)


def store_blocks(kv: EngineClient, mover: HostMover, keys: Sequence[bytes], blocks: Sequence[int]) -> int:
    """What the connector does at wait_for_save: reserve, copy layer by layer, finish, commit."""
    offsets = kv.reserve(keys)
    assert all(off >= 0 for off in offsets)
    pages = [page_tensor(kv, off) for off in offsets]
    for layer in range(LAYERS):
        mover.save_layer(layer, [(page[layer, 0], block) for page, block in zip(pages, blocks)])
    mover.finish_saves()
    return kv.commit(keys)


def load_blocks(kv: EngineClient, mover: HostMover, keys: Sequence[bytes], blocks: Sequence[int]) -> int:
    """What the connector does in start_load_kv: load (pins), copy layer by layer, end, release."""
    r = kv.load(keys)
    pages = [torch.frombuffer(v, dtype=torch.uint8).view(LAYERS, 1, BLOCK_BYTES) for v in r.views]
    mover.begin_load()
    for layer in range(LAYERS):
        mover.load_layer(layer, [(page[layer, 0], block) for page, block in zip(pages, blocks)])
    mover.end_load()
    del pages, r.views
    if r.lease is not None:
        kv.release(r.lease)
    return r.loaded


def block_bytes(layers: list[torch.Tensor], block: int, split: int = 1) -> bytes:
    """One block's bytes across layers, in logical order (what a page holds, layer-major)."""
    return b"".join(
        bytes(t[block * split : (block + 1) * split].contiguous().view(torch.uint8).flatten().numpy())
        for t in layers
    )


def test_a_page_holds_the_blocks_layer_major_in_logical_order(daemon) -> None:
    kv = daemon.engine()
    assert kv.page_bytes == LAYERS * BLOCK_BYTES
    src = kv_cache(seed=1)
    keys = kv.page_keys(chain_tokens(1, 3))
    assert store_blocks(kv, HostMover(src, NUM_BLOCKS, BLOCK_BYTES), keys, [7, 2, 9]) == 3
    r = kv.load(keys)
    assert [bytes(v) for v in r.views] == [block_bytes(src, b) for b in (7, 2, 9)]
    del r.views
    kv.release(r.lease)
    kv.close()


@pytest.mark.parametrize("writer,reader", [("contiguous", "strided"), ("strided", "contiguous")])
def test_engines_with_different_physical_layouts_read_each_others_pages(daemon, writer, reader) -> None:
    """The page holds the logical order, so a strided (GPU-style) cache and a contiguous one agree."""
    src, dst = kv_cache(writer, seed=2), kv_cache(reader, seed=3)
    a, b = daemon.engine(engine_id="writer"), daemon.engine(engine_id="reader")
    keys = a.page_keys(chain_tokens(2, 4))
    assert store_blocks(a, HostMover(src, NUM_BLOCKS, BLOCK_BYTES), keys, [0, 5, 6, 11]) == 4
    assert load_blocks(b, HostMover(dst, NUM_BLOCKS, BLOCK_BYTES), keys, [3, 1, 10, 4]) == 4
    for s, d in zip(src, dst):
        for sb, db in ((0, 3), (5, 1), (6, 10), (11, 4)):
            assert torch.equal(s[sb], d[db])
    untouched = kv_cache(reader, seed=3)
    assert all(torch.equal(d[2], u[2]) for d, u in zip(dst, untouched))  # no other block written
    a.close()
    b.close()


def test_kernel_block_splitting_round_trips_byte_exact(daemon) -> None:
    src, dst = kv_cache("split", seed=4), kv_cache("split", seed=5)
    kv = daemon.engine()
    keys = kv.page_keys(chain_tokens(4, 2))
    assert store_blocks(kv, HostMover(src, NUM_BLOCKS, BLOCK_BYTES), keys, [1, 8]) == 2
    assert load_blocks(kv, HostMover(dst, NUM_BLOCKS, BLOCK_BYTES), keys, [9, 0]) == 2
    assert block_bytes(dst, 9, 2) == block_bytes(src, 1, 2) and block_bytes(dst, 0, 2) == block_bytes(
        src, 8, 2
    )
    kv.close()


def test_pages_hold_blocks_in_logical_order_whatever_the_physical_layout() -> None:
    """A contiguous LBHNC layer (vLLM CPU) and an H-outer strided one (an LHBNC-style GPU layout) give
    the same page bytes for the same logical KV, and a load puts them back where they came from."""
    blocks, heads, tokens, content = 6, 3, 8, 16
    logical = torch.randn(blocks, heads, tokens, content)
    contiguous = logical.clone()
    strided = logical.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)  # same values, H outermost
    assert not strided[0].is_contiguous()
    nbytes = heads * tokens * content * 4
    pages = {}
    for name, layer in (("contiguous", contiguous), ("strided", strided)):
        mover = HostMover([layer], blocks, nbytes)
        page = torch.zeros(2, nbytes, dtype=torch.uint8)
        mover.save_layer(0, [(page[0], 4), (page[1], 1)])
        pages[name] = page
        layer.zero_()
        mover.load_layer(0, [(page[0], 2), (page[1], 5)])
        assert torch.equal(layer[2], logical[4]) and torch.equal(layer[5], logical[1])
    assert torch.equal(pages["contiguous"], pages["strided"])


# ------------------------------------------------------------------------------------------ registration


class Registrar:
    """Stands in for cuMemHostRegister: records calls, refuses when told to."""

    def __init__(self, refuse: str = "") -> None:
        self.refuse = refuse
        self.calls: list[tuple[str, int, int]] = []

    def register(self, addr: int, nbytes: int) -> None:
        self.calls.append(("register", addr, nbytes))
        if self.refuse:
            raise RuntimeError(self.refuse)

    def unregister(self, addr: int) -> None:
        self.calls.append(("unregister", addr, 0))


def test_the_arena_mapping_is_registered_once_and_unregistered_before_it_is_unmapped(daemon) -> None:
    reg = Registrar()
    waited: list[int] = []
    arenas = ArenaRegistry(reg.register, reg.unregister, lambda: waited.append(len(reg.calls)))
    a = daemon.engine(engine_id="a")
    b = EngineClient(dataclasses.replace(TEST_NS, cache_salt="tenant"), "b", daemon.engine_socket)
    assert arenas.ensure(a) and arenas.ensure(b) and arenas.ensure(a)
    assert [c[0] for c in reg.calls] == ["register"]  # both sessions share this process's mapping
    _, addr, nbytes = reg.calls[0]
    assert nbytes == a.arena.nbytes
    page = torch.frombuffer(b.page(b.reserve(b.page_keys(chain_tokens(6, 1)))[0]), dtype=torch.uint8)
    assert arenas.covers(page.data_ptr()) and arenas.registered == 1
    assert not arenas.covers(torch.zeros(8, dtype=torch.uint8).data_ptr())
    del page
    a.close()
    assert [c[0] for c in reg.calls] == ["register"]  # b still maps the arena
    b.close()
    # The mover's wait for copies in flight ran first, then the unregistration, with the same address.
    assert waited == [1] and reg.calls[1] == ("unregister", addr, 0)
    assert arenas.registered == 0 and not arenas.covers(addr)


def test_a_refused_registration_is_said_once_and_not_asked_again(daemon, kv_copy_log) -> None:
    reg = Registrar(refuse="CUDA_ERROR_NOT_PERMITTED (operation not permitted)")
    arenas = ArenaRegistry(reg.register, reg.unregister, lambda: None)
    kv = daemon.engine()
    assert not arenas.ensure(kv)
    assert not arenas.ensure(kv)
    warnings = [r for r in kv_copy_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "CUDA_ERROR_NOT_PERMITTED" in warnings[0].getMessage()
    assert "staging" in warnings[0].getMessage() and arenas.refused.startswith("CUDA_ERROR_NOT_PERMITTED")
    assert len(reg.calls) == 1
    kv.close()
    assert [c[0] for c in reg.calls] == ["register"]  # nothing registered, nothing to unregister


def test_closing_the_registry_unregisters_what_is_still_mapped(daemon) -> None:
    reg = Registrar()
    arenas = ArenaRegistry(reg.register, reg.unregister, lambda: None)
    kv = daemon.engine()
    assert arenas.ensure(kv)
    arenas.close()
    assert [c[0] for c in reg.calls] == ["register", "unregister"] and arenas.registered == 0
    kv.close()  # the unmap hook finds nothing left to do
    assert len(reg.calls) == 2
