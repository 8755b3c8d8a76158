"""L1 VRAM tier, everything that runs without a GPU: finding the CUDA library, the probe's decisions
and its one-line reasons, page slots, copy planning, the IPC handle's wire form, the
`__cuda_array_interface__` an engine hands torch, the `[vram]` options, and a real daemon started
with `vram.enabled = true` on a host without CUDA (it says why and serves as usual).

Where a test needs CUDA to answer in a way this host cannot (devices, failures, a pool), it uses
`FakeCuda` below: a stand-in for the ctypes layer, clearly not CUDA, used only to test the logic
above it (choices, address arithmetic, one synchronisation per batch). Nothing here passes because
a fake said CUDA works: the real calls are tested in tests/tiers/test_vram_gpu.py on a GPU
(scripts/gpu-check.sh), and against this host's real libraries where it has any (below).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from polarkvd import cli, cuda
from polarkvd.config import VramConfig, load_config
from polarkvd.cuda import (
    CopyKind,
    CudaApi,
    CudaError,
    CudaUnavailable,
    DeviceInfo,
    LibKind,
    format_uuid,
    library_candidates,
    open_library,
)
from polarkvd.errors import ConfigError, ProtocolError
from polarkvd.tiers.vram import PageSlots, Staging, VramPool, describe_choice, plan_copies, probe
from polarkvd.wire.region import RegionHandle, cuda_array_interface
from tests.conftest import REPO_ROOT, bad_pages, chain_tokens, clean_env, store_chain

GiB, MiB = 1 << 30, 1 << 20
H200 = DeviceInfo(0, "NVIDIA H200", "0000:19:00.0", format_uuid(bytes(range(16))), 141 * GiB, (9, 0))


# ----------------------------------------------------------------------------------- FakeCuda (NOT CUDA)


class FakeCuda(CudaApi):
    """NOT CUDA. Answers the CudaApi methods from Python objects: "device memory" is ordinary host
    memory (ctypes buffers, so "device pointers" are real addresses and copies are memmove), streams
    and events only record what was asked. For testing the logic above the ctypes calls; it proves
    nothing about CUDA itself."""

    kind = LibKind.DRIVER

    def __init__(self, devices: list[DeviceInfo] | None = None, count_error: CudaError | None = None) -> None:
        super().__init__(lib=None, name="fake")
        self.devices = [H200] if devices is None else devices
        self.count_error = count_error
        self.mem: dict[int, ctypes.Array] = {}  # "device pointer" -> its buffer
        self.calls: list[str] = []
        self.free_bytes = 100 * GiB
        # dma-buf export (GPUDirect): the device attribute, and what makes the "fd" (None: the
        # export fails as on a driver without dma-buf support); tests/transport/fakeverbs.py's
        # `fake_dmabuf` gives one its fake DmaBufMR maps back to this host memory
        self.dmabuf_attr = True
        self.dmabuf_export: Any = None

    def version(self) -> str:
        return "driver 12.8"

    def device_count(self) -> int:
        if self.count_error is not None:
            raise self.count_error
        return len(self.devices)

    def device_info(self, index: int) -> DeviceInfo:
        return self.devices[index]

    def use_device(self, index: int) -> None:
        self.calls.append(f"use {index}")

    def mem_info(self) -> tuple[int, int]:
        return self.free_bytes, self.devices[0].total_bytes

    def malloc(self, nbytes: int) -> int:
        if nbytes > self.free_bytes:
            raise CudaError("cuMemAlloc", 2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory")
        # page-aligned, as cuMemAlloc's allocations of this size are (and dma-buf export needs)
        page = os.sysconf("SC_PAGE_SIZE")
        buf = ctypes.create_string_buffer(nbytes + page)
        ptr = -ctypes.addressof(buf) % page + ctypes.addressof(buf)
        self.mem[ptr] = buf
        self.calls.append("malloc")
        return ptr

    def free(self, ptr: int) -> None:
        del self.mem[ptr]
        self.calls.append("free")

    def ipc_get(self, ptr: int) -> bytes:
        return ptr.to_bytes(8, "little") * 8

    def stream_create(self) -> int:
        return 7

    def stream_sync(self, stream: int) -> None:
        self.calls.append("sync")

    def stream_destroy(self, stream: int) -> None:
        self.calls.append("stream_destroy")

    def host_register(self, addr: int, nbytes: int) -> None:
        self.calls.append("host_register")

    def host_unregister(self, addr: int) -> None:
        self.calls.append("host_unregister")

    def copy_async(self, kind: CopyKind, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.calls.append(kind.value)
        ctypes.memmove(dst, src, nbytes)

    def memset(self, ptr: int, value: int, nbytes: int, stream: int) -> None:
        ctypes.memset(ptr, value, nbytes)

    def event_create(self) -> int:
        return 1

    def event_record(self, event: int, stream: int) -> None:
        pass

    def event_sync(self, event: int) -> None:
        pass

    def event_elapsed_ms(self, start: int, end: int) -> float:
        return 1.0

    def event_destroy(self, event: int) -> None:
        pass

    def dmabuf_supported(self, index: int) -> bool:
        return self.dmabuf_attr

    def sync_memops(self, ptr: int) -> None:
        self.calls.append("sync_memops")

    def export_dmabuf(self, ptr: int, nbytes: int) -> int:
        self.calls.append("export_dmabuf")
        if self.dmabuf_export is None:
            raise CudaError(
                "cuMemGetHandleForAddressRange", 801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"
            )
        return self.dmabuf_export(ptr, nbytes)


# ---------------------------------------------------------------------------------- finding the library


def test_library_candidates_in_order_without_duplicates(tmp_path: Path) -> None:
    wheel = tmp_path / "lib"
    wheel.mkdir()
    for name in ("libcudart.so.12", "libcudart.so.13", "libnvrtc.so.12"):
        (wheel / name).write_bytes(b"")
    found = {"cudart": "libcudart.so.12", "cuda": "libcuda.so.1"}
    runtime = library_candidates(LibKind.RUNTIME, find_library=found.get, wheel_dirs=[str(wheel)])
    assert runtime == [
        "libcudart.so.13",
        "libcudart.so.12",
        "libcudart.so",
        str(wheel / "libcudart.so.13"),
        str(wheel / "libcudart.so.12"),
    ]
    driver = library_candidates(LibKind.DRIVER, find_library=found.get)
    assert driver == ["libcuda.so.1", "libcuda.so"]  # libcuda.so.1 first: what the driver installs
    assert library_candidates(
        LibKind.RUNTIME, find_library=lambda _: None, wheel_dirs=[str(tmp_path / "x")]
    ) == [
        "libcudart.so.13",
        "libcudart.so.12",
        "libcudart.so",
    ]


def test_the_nvidia_runtime_wheel_is_found_without_importing_torch(tmp_path: Path, monkeypatch) -> None:
    """The layout of the nvidia-cuda-runtime wheel: site-packages/nvidia/cuda_runtime/lib/ (no
    __init__.py in nvidia/: a namespace package)."""
    lib = tmp_path / "nvidia" / "cuda_runtime" / "lib"
    lib.mkdir(parents=True)
    (tmp_path / "nvidia" / "cuda_runtime" / "__init__.py").write_text("")
    (lib / "libcudart.so.12").write_bytes(b"not a library")
    for name in [m for m in sys.modules if m == "nvidia" or m.startswith("nvidia.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert str(lib) in cuda.wheel_lib_dirs()
    assert str(lib / "libcudart.so.12") in library_candidates(LibKind.RUNTIME)


def test_open_library_says_why_each_candidate_failed(tmp_path: Path) -> None:
    """Real dlopen: a missing name, and a file that is not a shared object."""
    bogus = tmp_path / "libcudart.so.12"
    bogus.write_bytes(b"this is not an ELF file" * 10)
    with pytest.raises(CudaUnavailable) as exc:
        open_library(["libcudart-no-such.so.99", str(bogus)])
    text = str(exc.value)
    assert "libcudart-no-such.so.99: not found" in text
    assert f"{bogus}: " in text and "ELF" in text  # dlopen's own words: "invalid ELF header"
    lib, name = open_library(["libc-no-such.so", "libc.so.6"])
    assert name == "libc.so.6" and lib is not None


def _loadable(kind: LibKind) -> bool:
    try:
        open_library(library_candidates(kind))
        return True
    except CudaUnavailable:
        return False


@pytest.mark.skipif(_loadable(LibKind.DRIVER), reason="this host has a CUDA driver library")
def test_probe_on_a_host_without_the_driver_says_so() -> None:
    choice = probe(VramConfig(enabled=True, cuda_api="driver"))
    assert not choice.enabled
    assert describe_choice(choice).startswith(
        "vram: unavailable: no CUDA driver library (libcuda.so.1: not found"
    )


@pytest.mark.skipif(
    not _loadable(LibKind.RUNTIME) or _loadable(LibKind.DRIVER),
    reason="needs a CUDA runtime library without a driver (a toolkit on a host with no GPU driver)",
)
def test_real_runtime_library_without_a_driver_reports_cudas_own_error() -> None:
    """The real libcudart, the real ctypes call and error strings: cudaGetDeviceCount fails because
    there is no driver, and the error names the call and carries CUDA's name and text."""
    api = cuda.load_api("runtime")
    assert isinstance(api, cuda.RuntimeApi)
    with pytest.raises(CudaError) as exc:
        api.device_count()
    err = exc.value
    assert err.call == "cudaGetDeviceCount" and err.status != 0
    assert err.name.startswith("cudaError") and err.text
    assert str(err) == f"cudaGetDeviceCount failed: {err.name} ({err.text})"
    assert api.version().startswith("runtime ")

    line = describe_choice(probe(VramConfig(enabled=True)))  # auto: no libcuda, then libcudart
    assert line.startswith("vram: unavailable: no CUDA driver library (libcuda.so.1: not found")
    assert f"; {api.library}: cudaGetDeviceCount failed: {err.name}" in line


@pytest.mark.skipif(not _loadable(LibKind.RUNTIME), reason="no CUDA runtime library on this host")
def test_every_runtime_function_exists_in_the_real_library() -> None:
    """A misspelt symbol would otherwise surface only on a GPU host, at its first use."""
    api = cuda.load_api("runtime")
    for name in cuda.RuntimeApi.SIGNATURES:
        assert api._fn(name) is not None, name


def test_load_api_refuses_an_unknown_setting() -> None:
    with pytest.raises(ValueError, match="cuda_api"):
        cuda.load_api("opencl")


# -------------------------------------------------------------------------------------------- the probe


def line(cfg: VramConfig, api: CudaApi | Exception) -> str:
    def load(setting: str) -> CudaApi:
        if isinstance(api, Exception):
            raise api
        return api

    return describe_choice(probe(cfg, load=load))


ON = VramConfig(enabled=True, capacity=8 * GiB)


def test_probe_reasons() -> None:
    """Each way L1 can be off, as the one line the daemon logs (FakeCuda stands in for the devices)."""
    assert line(VramConfig(), FakeCuda()) == "vram: disabled (vram.enabled = false)"
    assert (
        line(ON, CudaUnavailable("no CUDA driver library (libcuda.so.1: not found)"))
        == "vram: unavailable: no CUDA driver library (libcuda.so.1: not found)"
    )
    no_device = CudaError("cuInit", 100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected")
    assert (
        line(ON, FakeCuda(count_error=no_device))
        == "vram: unavailable: no CUDA device (cuInit failed: CUDA_ERROR_NO_DEVICE (no CUDA-capable device is detected))"
    )
    old = CudaError("cudaGetDeviceCount", 35, "cudaErrorInsufficientDriver", "driver too old")
    assert (
        line(ON, FakeCuda(count_error=old))
        == "vram: unavailable: cudaGetDeviceCount failed: cudaErrorInsufficientDriver (driver too old)"
    )
    assert line(ON, FakeCuda(devices=[])) == "vram: unavailable: no CUDA device"
    two = [H200, dataclasses_replace(H200, index=1)]
    assert (
        line(VramConfig(enabled=True, device=3), FakeCuda(devices=two))
        == "vram: unavailable: vram.device 3 out of range (2 devices)"
    )
    assert (
        line(VramConfig(enabled=True, capacity=200 * GiB), FakeCuda())
        == "vram: unavailable: vram.capacity 200.0 GiB is more than GPU 0 (NVIDIA H200) has: 141.0 GiB"
    )
    assert line(ON, FakeCuda()) == "vram: 8.0 GiB on GPU 0 (NVIDIA H200, 0000:19:00.0)"


def test_a_fallback_says_why_the_driver_was_skipped() -> None:
    api = FakeCuda(count_error=CudaError("cudaGetDeviceCount", 35, "cudaErrorInsufficientDriver", "old"))
    api.skipped, api.library = "no CUDA driver library (libcuda.so.1: not found)", "libcudart.so.12"
    assert line(ON, api) == (
        "vram: unavailable: no CUDA driver library (libcuda.so.1: not found); libcudart.so.12: "
        "cudaGetDeviceCount failed: cudaErrorInsufficientDriver (old)"
    )


def test_choice_as_status_shows_it() -> None:
    choice = probe(ON, load=lambda _: FakeCuda())
    d = json.loads(json.dumps(choice.as_dict()))  # what `status --json` prints
    assert (
        d["enabled"] and d["capacity"] == 8 * GiB and d["api"] == "driver" and d["version"] == "driver 12.8"
    )
    assert d["device"]["uuid"] == "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert d["line"] == "vram: 8.0 GiB on GPU 0 (NVIDIA H200, 0000:19:00.0)"
    st = {
        "uptime_s": 1.0,
        "draining": False,
        "tiers": {},
        "counters": {},
        "sessions": [],
        "leases": 0,
        "namespaces": 0,
        "vram": d,
    }
    assert d["line"] in cli.render_status(st).splitlines()


def dataclasses_replace(info: DeviceInfo, **kw: object) -> DeviceInfo:
    import dataclasses

    return dataclasses.replace(info, **kw)


# ---------------------------------------------------------------------------------------- slots (pure)


def test_page_slots_round_up_reuse_and_refuse_bad_frees() -> None:
    slots = PageSlots(4 * MiB, 1 * MiB)
    a = slots.alloc(5000)  # -> an 8 KiB slot
    assert a == 0 and slots.slot_bytes(a) == 8192 and slots.used_bytes == 8192
    b = slots.alloc(5000)
    assert b == 8192
    slots.free(a)
    assert slots.alloc(5000) == a  # LIFO: the slot just freed (warm) is used again
    with pytest.raises(ValueError, match="not a slot in use"):
        slots.free(12345)
    slots.free(b)
    with pytest.raises(ValueError, match="not a slot in use"):
        slots.free(b)  # twice
    # full: 4 slabs of 1 MiB hold 4 slots of 1 MiB; another size must wait for a slab to empty
    slots = PageSlots(4 * MiB, 1 * MiB)
    big = [slots.alloc(MiB) for _ in range(4)]
    assert None not in big and slots.alloc(MiB) is None and slots.alloc(4096) is None
    slots.free(big[0])
    assert slots.alloc(4096) == big[0]  # the empty slab now serves the other size
    with pytest.raises(ValueError):
        slots.alloc(2 * MiB)  # larger than a slab: a configuration error, not "full"


# ---------------------------------------------------------------------------------- copy planning (pure)


def test_plan_copies_merges_contiguous_neighbours_and_keeps_order() -> None:
    layers = [(i * 100, 5000 + i * 100, 100) for i in range(4)]  # one page's four layer slices
    assert plan_copies(layers, 10_000, 10_000) == [(0, 5000, 400)]
    items = [(0, 900, 10), (10, 910, 10), (50, 0, 10), (60, 20, 10)]  # the last is not contiguous on dst
    assert plan_copies(items, 1000, 1000) == [(0, 900, 20), (50, 0, 10), (60, 20, 10)]
    assert plan_copies([], 10, 10) == []


@pytest.mark.parametrize(
    "items, same, match",
    [
        ([(0, 0, 0)], False, "nbytes > 0"),
        ([(-1, 0, 1)], False, ">= 0"),
        ([(95, 0, 10)], False, r"source \[95, 105\) lies outside 100"),
        ([(0, 95, 10)], False, r"destination \[95, 105\) lies outside 100"),
        ([(0, 0, 1.5)], False, "integers"),
        ([(0, 1, True)], False, "integers"),
        ([(0, 1)], False, "expected"),
        ([(0, 5, 10)], True, "overlap"),
        ([(0, 50, 10), (20, 55, 10)], True, "write the same bytes"),
        ([(0, 10, 10), (10, 20, 10)], True, "reads \\[10, 20\\) that a copy of the same batch writes"),
        ([(30, 10, 10), (0, 30, 5)], True, "reads \\[30, 40\\)"),
    ],
)
def test_plan_copies_refuses_bad_batches(items: list, same: bool, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_copies(items, 100, 100, same_region=same)


def test_plan_copies_between_regions_allows_equal_offsets() -> None:
    assert plan_copies([(0, 0, 10), (10, 10, 10)], 100, 100) == [(0, 0, 20)]


# ------------------------------------------------------------------------------ the IPC handle on the wire


def test_region_handle_round_trips_through_msgpack() -> None:
    h = RegionHandle(bytes(range(64)), 8 * GiB, H200.uuid, H200.pci_bus_id)
    wire = msgpack.unpackb(msgpack.packb(h.to_wire()), raw=False)
    assert RegionHandle.from_wire(wire) == h


@pytest.mark.parametrize(
    "change, match",
    [
        ({"v": 2}, "version 2"),
        ({"handle": b"x" * 63}, "64 bytes"),
        ({"handle": "x" * 64}, "64 bytes"),
        ({"size": 0}, "size"),
        ({"size": True}, "size"),
        ({"size": 1 << 60}, "size"),
        ({"uuid": "0000"}, "uuid"),
        ({"pci_bus_id": ""}, "pci_bus_id"),
        ({"extra": 1}, "unknown fields"),
    ],
)
def test_region_handle_from_wire_refuses_bad_fields(change: dict, match: str) -> None:
    wire = {**RegionHandle(b"\0" * 64, GiB, H200.uuid, H200.pci_bus_id).to_wire(), **change}
    with pytest.raises(ProtocolError, match=match):
        RegionHandle.from_wire(wire)
    with pytest.raises(ProtocolError):
        RegionHandle.from_wire([1, 2])


def test_format_uuid_as_nvidia_smi_prints_it() -> None:
    raw = bytes.fromhex("8c1e4f2a9b7d4e3f8a6b5c4d3e2f1a0b")
    assert format_uuid(raw) == "GPU-8c1e4f2a-9b7d-4e3f-8a6b-5c4d3e2f1a0b"


def test_cuda_array_interface_of_a_slice() -> None:
    cai = cuda_array_interface(0x7F00_0000_0000, 1 << 20, offset=4096, length=8192)
    assert cai == {
        "shape": (8192,),
        "typestr": "|u1",
        "data": (0x7F00_0000_0000 + 4096, False),
        "version": 3,
        "strides": None,
        "stream": None,
    }
    assert cuda_array_interface(0x1000, 100)["shape"] == (100,)
    with pytest.raises(ValueError, match="outside"):
        cuda_array_interface(0x1000, 100, offset=90, length=20)


# ----------------------------------------------------------- the pool's logic (over FakeCuda, NOT CUDA)


def test_pool_logic_addresses_batches_and_close() -> None:
    """Offsets become the right addresses on both sides, a batch is merged, enqueued and waited for
    once, and close frees the allocation. (FakeCuda moves bytes between Python buffers.)"""
    api = FakeCuda()
    pool = VramPool(api, 0, 4 * MiB, 1 * MiB)
    host_view = bytearray(MiB)
    host = pool.register_host(host_view)
    page = 64 * 1024
    data = np.random.default_rng(1).integers(0, 256, 2 * page, dtype=np.uint8).tobytes()
    host_view[: 2 * page] = data
    a, b = pool.alloc(page), pool.alloc(page)
    assert (a, b) == (0, page)
    api.calls.clear()
    assert pool.from_host(host, [(0, a, page), (page, b, page)]) == 2 * page  # contiguous: one copy
    assert api.calls == ["use 0", "h2d", "sync"]
    c, d = pool.alloc(page), pool.alloc(page)
    api.calls.clear()
    pool.copy_within([(a, c, page), (b, d, page)])
    assert api.calls == ["use 0", "d2d", "sync"]
    pool.to_host(host, [(d, 3 * page, page), (c, 5 * page, page)])  # swapped order: two copies, one sync
    assert api.calls[-3:] == ["d2h", "d2h", "sync"]
    assert bytes(host_view[3 * page : 4 * page]) == data[page:]
    assert bytes(host_view[5 * page : 6 * page]) == data[:page]
    assert pool.stats()["copied_bytes"] == {"d2d": 2 * page, "d2h": 2 * page, "h2d": 2 * page}
    with pytest.raises(ValueError, match="outside"):
        pool.to_host(host, [(0, MiB - 10, page)])
    exported = pool.export()
    assert exported.size == 4 * MiB and exported.uuid == H200.uuid and len(exported.handle) == 64
    host.close()
    pool.close()
    pool.close()  # twice is harmless
    assert api.mem == {} and "stream_destroy" in api.calls and "host_unregister" in api.calls
    with pytest.raises(CudaError, match="closed"):
        pool.copy_within([(0, page, page)])


def test_pool_failure_mid_batch_still_waits_for_what_was_queued() -> None:
    api = FakeCuda()
    pool = VramPool(api, 0, 2 * MiB, 1 * MiB)

    def broken(*args: object) -> None:
        api.calls.append("copy")
        if api.calls.count("copy") == 2:
            raise CudaError("cuMemcpyDtoDAsync", 1, "CUDA_ERROR_INVALID_VALUE", "invalid argument")

    api.copy_async = broken  # type: ignore[method-assign]
    api.calls.clear()
    with pytest.raises(CudaError, match="CUDA_ERROR_INVALID_VALUE"):
        pool.copy_within([(0, MiB, 100), (200, MiB + 400, 100), (600, MiB + 800, 100)])
    assert api.calls == ["use 0", "copy", "copy", "sync"]  # the first copy is waited for before raising


def test_the_pool_exports_a_dmabuf_or_says_why_not() -> None:
    """GPUDirect needs the pool as a dma-buf fd. Over FakeCuda (NOT CUDA): the driver calls are made in
    order (attribute, SYNC_MEMOPS, export); each way it cannot be done is a CudaError naming why."""
    api = FakeCuda()
    pool = VramPool(api, 0, 2 * MiB, MiB)
    api.dmabuf_export = lambda ptr, n: 42 if (ptr, n) == (pool.base, 2 * MiB) else -1
    assert pool.export_dmabuf() == 42
    assert api.calls[-2:] == ["sync_memops", "export_dmabuf"]
    api.dmabuf_export = None  # a driver that refuses
    with pytest.raises(CudaError, match="CUDA_ERROR_NOT_SUPPORTED"):
        pool.export_dmabuf()
    api.dmabuf_attr = False  # a GPU or kernel module without dma-buf
    with pytest.raises(
        CudaError, match=r"cannot export dma-bufs \(CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED = 0"
    ):
        pool.export_dmabuf()
    base = pool.base
    pool.base = base + 256  # what cuMemAlloc may return for small sizes: not page-aligned
    with pytest.raises(CudaError, match="not aligned to the host page size"):
        pool.export_dmabuf()
    pool.base = base
    pool.close()
    with pytest.raises(CudaError, match="closed"):
        pool.export_dmabuf()


def test_dmabuf_export_on_bindings_that_cannot() -> None:
    """The runtime API has no equivalent of cuMemGetHandleForAddressRange; a driver older than CUDA
    11.7 lacks the symbol. Both say so (real DriverApi / RuntimeApi code, over a library stand-in)."""
    with pytest.raises(CudaUnavailable, match="runtime API has no dma-buf export"):
        cuda.RuntimeApi(None, "libcudart.so.12").export_dmabuf(1 << 21, MiB)
    with pytest.raises(CudaUnavailable, match="runtime API has no dma-buf export"):
        cuda.RuntimeApi(None, "libcudart.so.12").dmabuf_supported(0)
    old_driver = cuda.DriverApi(object(), "libcuda.so.1")  # an object with no CUDA symbols at all
    with pytest.raises(CudaUnavailable, match="no cuMemGetHandleForAddressRange .*CUDA 11.7"):
        old_driver.export_dmabuf(1 << 21, MiB)


def test_staging_hashes_pool_bytes_in_bounded_chunks() -> None:
    """L1 pages are verified on the host through a small buffer: ranges larger than it, and several
    ranges per chunk, give exactly xxh3_64 of the bytes (FakeCuda: NOT CUDA)."""
    import xxhash

    api = FakeCuda()
    pool = VramPool(api, 0, 2 * MiB, MiB)
    data = np.random.default_rng(7).integers(0, 256, 2 * MiB, dtype=np.uint8).tobytes()
    ctypes.memmove(pool.base, data, len(data))
    staging = Staging(pool, 4096)
    assert "host_register" in api.calls
    ranges = [(0, 10000), (10000, 100), (MiB + 3, 4096), (2 * MiB - 5, 5), (500, 0)]
    api.calls.clear()
    got = staging.checksums(ranges)
    assert got == [xxhash.xxh3_64_intdigest(data[o : o + n]) for o, n in ranges]
    assert api.calls.count("sync") == -(-sum(n for _, n in ranges) // 4096)  # one batch per full buffer
    assert staging.bytes == sum(n for _, n in ranges)
    staging.close()
    pool.close()


def test_pool_allocation_failure_reports_the_numbers() -> None:
    api = FakeCuda()
    api.free_bytes = 3 * GiB
    with pytest.raises(CudaError) as exc:
        VramPool(api, 0, 8 * GiB, 64 * MiB)
    assert "vram.capacity = 8.00 GiB on GPU 0 (NVIDIA H200: 3.00 of 141.00 GiB free)" in str(exc.value)
    assert "CUDA_ERROR_OUT_OF_MEMORY" in str(exc.value)
    with pytest.raises(ValueError, match="at least one slab"):
        VramPool(api, 0, 1 * MiB, 64 * MiB)  # refused before any CUDA call
    assert "malloc" not in api.calls


def test_bench_logic_scatters_pages_and_checks_where_they_land(monkeypatch) -> None:
    """`python -m polarkvd.bench.vram` over FakeCuda (NOT CUDA; no bandwidth here): every page is
    its own copy, the round trip's byte check passes, the table renders. So the one run on a GPU host
    does not fail on the benchmark's own arithmetic."""
    from polarkvd.bench import vram as bench

    api = FakeCuda()
    monkeypatch.setattr(bench, "load_api", lambda _: api)
    monkeypatch.setattr(bench, "probe", lambda cfg: probe(cfg, load=lambda _: api))
    result = bench.run_bench(16 * MiB, 8 * MiB, MiB, 2, "auto")
    paths = [r["path"] for r in result["rows"]]
    assert len(paths) == 6 and paths[-1] == "host memcpy (one thread)"
    assert all(r["pages"] == 8 and r["bytes"] == 8 * MiB for r in result["rows"][:5])
    assert [r.get("checked") for r in result["rows"][:5]] == [None, None, True, None, True]
    assert api.calls.count("h2d") == 2 * 3 * 8  # two H2D cases x (warm-up + 2 repeats) x 8 pages, unmerged
    text = bench.render(result)
    assert "D2D inside the pool" in text and "GB/s" in text and api.mem == {}


# --------------------------------------------------------------------------------------------- config


def test_vram_options_parse_and_refuse_bad_values(tmp_path: Path) -> None:
    cfg = load_config(
        env={"POLARKV_VRAM_ENABLED": "yes"},
        overrides={"vram.capacity": "8GiB", "vram.device": "1", "vram.cuda_api": "driver"},
    )
    assert cfg.vram == VramConfig(enabled=True, capacity=8 * GiB, device=1, cuda_api="driver")
    assert load_config(env={}).vram == VramConfig(enabled=False, capacity=4 * GiB, device=0)
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[vram]\nenabled = "maybe"\ncapacity = 0\ndevice = -1\ncuda_api = "opencl"\nslab_bytes = "2x"\nsize = 1\n'
    )
    with pytest.raises(ConfigError) as exc:
        load_config(bad, env={})
    keys = {k for k, _, _ in exc.value.problems}
    assert keys == {
        "vram.enabled",
        "vram.capacity",
        "vram.device",
        "vram.cuda_api",
        "vram.slab_bytes",
        "vram.size",
    }
    with pytest.raises(ConfigError, match="vram.slab_bytes .* larger than vram.capacity"):
        load_config(env={}, overrides={"vram.capacity": "32MiB"})


# -------------------------------------------------------------------- a real daemon on a host without CUDA


def test_daemon_with_vram_enabled_says_why_and_serves(daemon_factory) -> None:
    """The daemon logs the same line this process's own probe gives (on a GPU host: the pool's line),
    shows it in `polarkvd status` (text and JSON), and stores and loads pages as usual."""
    expected = describe_choice(probe(VramConfig(enabled=True, capacity=64 * MiB, slab_bytes=MiB)))
    d = daemon_factory({"vram.enabled": "true", "vram.capacity": "64MiB", "vram.slab_bytes": "1MiB"})
    logged = [x for x in d.log().splitlines() if "vram: " in x]
    assert len(logged) == 1 and expected.replace('"', '\\"') in logged[0], logged
    if not expected.startswith("vram: unavailable"):  # a GPU host: the pool is allocated and used
        assert "L1 pool allocated" in d.log() and d.stats()["tiers"]["vram"]["capacity_bytes"] == 64 * MiB
    else:
        assert "level=warning" in logged[0]

    with d.engine() as kv:
        keys = store_chain(kv, chain_tokens(7, 4))
        outs = [memoryview(bytearray(kv.page_bytes)) for _ in keys]
        assert kv.load_into(keys, outs) == 4 and bad_pages(kv, keys, outs) == []

    st = d.stats()
    assert st["vram"]["line"] == expected and st["counters"]["stored_pages"] == 4
    assert ("vram" in st["tiers"]) == (not expected.startswith("vram: unavailable"))
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "polarkvd", "status", *a, "--socket", str(d.control_socket)],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=clean_env(),
    )  # fmt: skip
    r = run()
    assert r.returncode == 0 and expected in r.stdout.splitlines(), r.stdout + r.stderr
    assert json.loads(run("--json").stdout)["vram"]["line"] == expected


def test_daemon_default_logs_vram_disabled(daemon) -> None:
    assert "vram: disabled (vram.enabled = false)" in daemon.log()
    assert daemon.stats()["vram"]["enabled"] is False
    assert os.path.exists(daemon.control_socket)
