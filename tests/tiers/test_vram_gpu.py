"""L1 on a real GPU: the probe against nvidia-smi, a real pool, byte-exact copies device->device,
device->host and host->device (pinned and pageable), cuMemHostRegister of a shared-memory mapping like
the DRAM arena, the IPC handle opened in a second process (with the driver API and, where a libcudart
exists, with the runtime API as torch engines do), CUDA's own error names, and a torch tensor over the
opened region where CUDA torch exists.

Every test skips with the probe's reason where no CUDA device answers (these build machines). It needs
only the standard library and polarkvd: no conftest, numpy or torch, so a bare GPU host runs it,
through scripts/gpu-check.sh (docs/HARDWARE.md), with pytest:

    python -m pytest -m gpu --noconftest tests/tiers/test_vram_gpu.py

or without pytest: `python tests/tiers/test_vram_gpu.py`. POLARKV_TEST_CUDA_API=runtime runs the
daemon side on libcudart instead of libcuda.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import pytest
except ImportError:  # the runner at the bottom
    pytest = None  # type: ignore[assignment]

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from polarkvd.bench.vram import host_mapping  # noqa: E402
from polarkvd.config import VramConfig  # noqa: E402
from polarkvd.cuda import (  # noqa: E402
    CudaApi,
    CudaError,
    CudaUnavailable,
    DeviceInfo,
    LibKind,
    library_candidates,
    load_api,
    open_library,
)
from polarkvd.tiers.vram import VramPool, probe  # noqa: E402
from polarkvd.wire.region import RegionHandle  # noqa: E402

if pytest is not None:
    pytestmark = pytest.mark.gpu

MiB = 1 << 20
API = os.environ.get("POLARKV_TEST_CUDA_API", "auto")


class _Skip(Exception):
    pass


def skip(reason: str) -> None:
    if pytest is not None and "PYTEST_CURRENT_TEST" in os.environ:
        pytest.skip(reason)
    raise _Skip(reason)


def gpu() -> tuple[CudaApi, DeviceInfo]:
    """The binding and device 0, or a skip with the probe's reason."""
    choice = probe(VramConfig(enabled=True, capacity=64 * MiB, slab_bytes=MiB, cuda_api=API))
    if not choice.enabled or choice.device is None:
        skip(f"no usable CUDA device: {choice.reason}")
    return load_api(API), choice.device  # type: ignore[union-attr]


def child(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter (CUDA does not survive fork), importing this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


# ------------------------------------------------------------------------------------------------ tests


def test_probe_names_the_gpu_as_nvidia_smi_does() -> None:
    api, info = gpu()
    assert info.name and info.total_bytes > 1 << 30 and info.compute_capability[0] >= 3
    assert info.uuid.startswith("GPU-") and len(info.uuid) == 40
    assert re.fullmatch(r"[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]", info.pci_bus_id), info.pci_bus_id
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return
    out = subprocess.run(
        [smi, "--query-gpu=uuid,pci.bus_id,name", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    rows = {r.split(",")[0].strip(): [x.strip() for x in r.split(",")] for r in out.splitlines() if r.strip()}
    assert info.uuid in rows, (info, out)
    _, bus, name = rows[info.uuid]
    # nvidia-smi prints an 8-digit PCI domain ("00000000:19:00.0"), CUDA a 4-digit one
    assert bus.lower().split(":", 1)[1] == info.pci_bus_id.split(":", 1)[1], (bus, info.pci_bus_id)
    assert name == info.name


def test_copies_are_byte_exact_pinned_and_pageable() -> None:
    api, info = gpu()
    pool = VramPool(api, info.index, 64 * MiB, 4 * MiB)
    try:
        for pin in (True, False):
            mm, what = host_mapping(32 * MiB)
            host = pool.register_host(mm, pin=pin)
            try:
                sizes = [MiB, 3 * MiB + 12345, 4096, 777]  # odd sizes: not multiples of anything
                src = [os.urandom(n) for n in sizes]
                at = [0, 2 * MiB, 7 * MiB, 9 * MiB + 1]  # host offsets
                for off, data in zip(at, src):
                    mm[off : off + len(data)] = data
                slots = [pool.alloc(n) for n in sizes]
                assert None not in slots
                pool.from_host(host, [(o, s, len(d)) for o, s, d in zip(at, slots, src)])
                moved = [pool.alloc(n) for n in sizes]
                pool.copy_within([(s, m, len(d)) for s, m, d in zip(slots, moved, src)])
                back = [16 * MiB + o for o in at]
                pool.to_host(host, [(m, b, len(d)) for m, b, d in zip(moved, back, src)])
                for b, data in zip(back, src):
                    assert mm[b : b + len(data)] == data, f"pin={pin} ({what}): bytes differ"
                pool.fill(moved[0], sizes[0], 0xAB)
                pool.to_host(host, [(moved[0], 0, sizes[0])])
                assert mm[: sizes[0]] == b"\xab" * sizes[0]
                for s in slots + moved:
                    pool.free(s)  # type: ignore[arg-type]
            finally:
                host.close()
                mm.close()
    finally:
        pool.close()


def test_the_pool_exports_a_dmabuf_and_staging_hashes_it() -> None:
    """GPUDirect's first half: the pool as a dma-buf fd (cuMemGetHandleForAddressRange), which an
    RDMA NIC registers; and L1 bytes hashed through the bounded staging buffer, as peers verify them.
    Skips with CUDA's reason where the driver or kernel modules cannot export dma-bufs."""
    from polarkvd.tiers.vram import Staging

    api, info = gpu()
    pool = VramPool(api, info.index, 64 * MiB, 4 * MiB)
    try:
        if api.kind is LibKind.RUNTIME:
            try:
                pool.export_dmabuf()
            except CudaUnavailable as e:
                assert "runtime API has no dma-buf export" in str(e)
            else:
                raise AssertionError("the runtime API exported a dma-buf")
        else:
            try:
                fd = pool.export_dmabuf()
            except CudaError as e:
                if e.name in ("CUDA_ERROR_NOT_SUPPORTED", "CUDA_ERROR_INVALID_VALUE") or isinstance(
                    e, CudaUnavailable
                ):
                    skip(f"this host cannot export dma-bufs: {e}")
                raise
            try:
                assert fd >= 0
                assert "dmabuf" in os.readlink(f"/proc/self/fd/{fd}"), os.readlink(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
        try:
            import xxhash
        except ImportError:
            return  # the staging check needs polarkvd's xxhash dependency
        mm, _ = host_mapping(8 * MiB)
        host = pool.register_host(mm, pin=False)
        staging = Staging(pool, MiB)  # smaller than a page below: chunks
        try:
            data = [os.urandom(3 * MiB + 5), os.urandom(4096)]
            slots = [pool.alloc(len(d)) for d in data]
            mm[: len(data[0])] = data[0]
            mm[4 * MiB : 4 * MiB + len(data[1])] = data[1]
            pool.from_host(host, [(0, slots[0], len(data[0])), (4 * MiB, slots[1], len(data[1]))])
            got = staging.checksums([(s, len(d)) for s, d in zip(slots, data)])
            assert got == [xxhash.xxh3_64_intdigest(d) for d in data]
        finally:
            staging.close()
            host.close()
            mm.close()
    finally:
        pool.close()


def test_host_register_of_a_shared_mapping_and_cudas_own_errors() -> None:
    api, info = gpu()
    mm, _ = host_mapping(8 * MiB)
    api.use_device(info.index)
    pool = VramPool(api, info.index, 8 * MiB, MiB)
    host = pool.register_host(mm)
    try:
        assert host.pinned
        try:
            api.host_register(host.addr, host.size)
        except CudaError as err:
            assert "ALREADY" in err.name.upper(), err  # CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED
        else:
            raise AssertionError("registering the same memory twice was accepted")
    finally:
        host.close()
        pool.close()
        mm.close()
    try:
        VramPool(api, info.index, info.total_bytes + (1 << 30), 64 * MiB)
    except CudaError as err:
        assert "OUT_OF_MEMORY" in str(err).upper() or "MEMORY" in str(err).upper(), err
        assert "GiB free" in str(err)
    else:
        raise AssertionError("allocating more than the GPU has succeeded")


_CHILD = r"""
import ctypes, hashlib, json, sys
from polarkvd.cuda import CopyKind, load_api
from polarkvd.wire.region import AttachedRegion, RegionHandle
wire, kind, read_at, n, write_at = json.loads(sys.argv[1])
api = load_api(kind)
region = RegionHandle(bytes.fromhex(wire["handle"]), wire["size"], wire["uuid"], wire["pci_bus_id"])
with AttachedRegion(region, api) as r:
    stream = api.stream_create()
    buf = ctypes.create_string_buffer(n)
    api.copy_async(CopyKind.D2H, ctypes.addressof(buf), r.ptr + read_at, n, stream)
    mine = bytes([kind == "runtime"]) * 4096 + b"written by the engine"
    src = ctypes.create_string_buffer(mine, len(mine))
    api.copy_async(CopyKind.H2D, r.ptr + write_at, ctypes.addressof(src), len(mine), stream)
    api.stream_sync(stream)
    api.stream_destroy(stream)
    print(json.dumps({"sha": hashlib.sha256(buf.raw).hexdigest(), "device": r.device, "api": api.library}))
"""


def _apis() -> list[str]:
    out = ["driver"]
    try:
        open_library(library_candidates(LibKind.RUNTIME))
        out.append("runtime")
    except CudaUnavailable:
        pass
    return out


def test_ipc_handle_opens_in_another_process() -> None:
    """The engine's side in a separate process: it reads what the daemon put in the pool and writes
    into it, GPU memory shared by handle only. With libcudart present, the same handle is opened by
    the runtime API too, as a torch engine would."""
    api, info = gpu()
    pool = VramPool(api, info.index, 16 * MiB, MiB)
    mm, _ = host_mapping(4 * MiB)
    host = pool.register_host(mm)
    try:
        data = os.urandom(3 * MiB)
        mm[: len(data)] = data
        pool.from_host(host, [(0, MiB, len(data))])
        h = pool.export()
        assert len(h.handle) == 64 and RegionHandle.from_wire(h.to_wire()) == h
        wire = {"handle": h.handle.hex(), "size": h.size, "uuid": h.uuid, "pci_bus_id": h.pci_bus_id}
        for kind in _apis():
            write_at = 8 * MiB if kind == "driver" else 10 * MiB
            r = child(_CHILD, json.dumps([wire, kind, MiB, len(data), write_at]))
            assert r.returncode == 0, f"{kind}: {r.stderr}"
            got = json.loads(r.stdout.strip().splitlines()[-1])
            assert got["sha"] == hashlib.sha256(data).hexdigest(), kind
            mine = bytes([kind == "runtime"]) * 4096 + b"written by the engine"
            pool.to_host(host, [(write_at, 0, len(mine))])
            assert mm[: len(mine)] == mine, f"{kind}: the engine's write is not in the pool"
    finally:
        host.close()
        pool.close()
        mm.close()


_TORCH_CHILD = r"""
import json, sys
import torch
from polarkvd.wire.region import AttachedRegion, RegionHandle
wire = json.loads(sys.argv[1])
region = RegionHandle(bytes.fromhex(wire["handle"]), wire["size"], wire["uuid"], wire["pci_bus_id"])
r = AttachedRegion(region)
t = r.tensor(0, 4096)
print(json.dumps({"device": str(t.device), "sum": int(t.to(torch.int64).sum()), "n": t.numel()}))
del t
r.close()
"""


def test_torch_tensor_over_the_opened_region() -> None:
    api, info = gpu()
    probe_torch = child("import torch; print(torch.cuda.is_available())")
    if probe_torch.returncode != 0 or probe_torch.stdout.strip() != "True":
        skip("no CUDA torch in this Python (the daemon's venv has none: expected)")
    pool = VramPool(api, info.index, 4 * MiB, MiB)
    mm, _ = host_mapping(MiB)
    host = pool.register_host(mm)
    try:
        mm[:4096] = bytes(range(256)) * 16
        pool.from_host(host, [(0, 0, 4096)])
        h = pool.export()
        wire = {"handle": h.handle.hex(), "size": h.size, "uuid": h.uuid, "pci_bus_id": h.pci_bus_id}
        r = child(_TORCH_CHILD, json.dumps(wire))
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert got["n"] == 4096 and got["sum"] == sum(range(256)) * 16 and got["device"].startswith("cuda")
    finally:
        host.close()
        pool.close()
        mm.close()


# ---------------------------------------------------------------------------------- without pytest


def _main() -> int:
    failed = 0
    for name, fn in list(globals().items()):
        if not name.startswith("test_") or not callable(fn):
            continue
        try:
            fn()
        except _Skip as s:
            print(f"SKIP {name}: {s}")
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
        else:
            print(f"PASS {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
