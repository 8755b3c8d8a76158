"""L1: the daemon-owned VRAM page pool, the CUDA binding it runs on, and the engine side of its IPC.

Owns:
- finding and loading a CUDA library (`library_candidates`, `open_library`, `load_api`), lazily:
  nothing CUDA is loaded at import time, and a host without CUDA pays nothing;
- `CudaApi`: the handful of CUDA calls L1 needs, every return code checked and turned into a
  `CudaError` that names the call and carries CUDA's own error name and text. Two implementations
  of the same methods: `DriverApi` (libcuda) and `RuntimeApi` (libcudart);
- the start-up decision (`probe` -> `VramChoice`, `describe_choice` -> the one `vram: ...` log line);
- `VramPool`: one device allocation of `vram.capacity` bytes cut into page slots (`PageSlots`, the
  DRAM tier's slab allocator), the region's CUDA IPC handle for engines (`RegionHandle`), and batched
  copies on one stream with one synchronisation per batch: device->device inside the pool,
  device->pinned host (demotion into a DRAM arena slot) and host->device (promotion);
- `HostRegion`: a host buffer (the DRAM arena's mmap) page-locked for the device;
- the engine side (`AttachedRegion`): open the daemon's IPC handle in the engine process, close it,
  and expose the region to torch through `__cuda_array_interface__` (torch imported only there).

It must not know keys, sessions, namespaces or policy: the manager decides what lives in which slot
(docs/VRAM.md says how); here are only offsets, lengths and bytes. Pure parts (library search,
slots, copy planning, the wire form of a handle, the probe's decisions) take no CUDA call and are
tested on machines without a GPU; everything that calls CUDA is tested on a GPU (`-m gpu`,
scripts/gpu-check.sh, docs/HARDWARE.md).

Why the driver API (libcuda.so.1) is the primary binding and the runtime (libcudart) the fallback:
- libcuda is installed by the NVIDIA driver itself: wherever a GPU can be used, it is there. libcudart
  comes with a CUDA toolkit or a pip wheel (`nvidia-cuda-runtime-*`, pulled in by CUDA torch); a
  daemon venv without CUDA torch, or a bare GPU host, has none. And libcudart cannot work without
  libcuda anyway: it is a layer over it;
- a libcudart must not be newer than the driver (`cudaErrorInsufficientDriver`); the driver API has no
  such pairing: its versioned symbols (`cuMemAlloc_v2`, ...) stay exported by every later driver;
- the probe can ask everything it needs (device count, name, PCI bus id, UUID, memory size) without
  creating a context, which costs hundreds of MiB of VRAM: the runtime creates one on first use;
- we bind to the device's *primary* context (`cuDevicePrimaryCtxRetain`), the very context the runtime
  and so torch use: pointers opened here are valid in an engine's torch tensors, and vice versa;
- CUDA IPC handles are the same 64 opaque bytes in both APIs (`CUipcMemHandle` is
  `cudaIpcMemHandle_t`): an engine may open the daemon's handle with either.
`vram.cuda_api = "runtime"` forces libcudart (for a host whose libcuda sits where the loader cannot
see it but a toolkit's libcudart can); `"auto"` tries the driver first.

Threads: every operation first makes the pool's device current in the calling thread (the driver's
current context is per thread), so the pool may be used from the event loop and from I/O threads;
ctypes releases the GIL during each call, so a thread waiting on a stream blocks nobody else. Do not
fork a process that has used CUDA (spawn or exec instead): CUDA does not survive fork.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import dataclasses
import enum
import importlib.util
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from polarkvd.errors import PolarKVError, ProtocolError
from polarkvd.tiers.dram import SlabAllocator, slot_size

if TYPE_CHECKING:
    from polarkvd.config import VramConfig

IPC_HANDLE_BYTES = 64  # CU_IPC_HANDLE_SIZE: CUipcMemHandle == cudaIpcMemHandle_t
WIRE_VERSION = 1
API_SETTINGS = ("auto", "driver", "runtime")

DRIVER_NAMES = ("libcuda.so.1", "libcuda.so")
RUNTIME_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")

_GiB = 1 << 30


class CudaError(PolarKVError):
    """A CUDA call failed. `call` is the function, `status` CUDA's numeric code, `name` its symbol."""

    def __init__(self, call: str, status: int = -1, name: str = "", text: str = "") -> None:
        self.call, self.status, self.name, self.text = call, status, name, text
        detail = f"{name} ({text})" if name and text else name or text or f"error {status}"
        super().__init__(f"{call} failed: {detail}")


class CudaUnavailable(CudaError):
    """No CUDA library could be loaded (or it lacks a function L1 needs)."""

    def __init__(self, message: str) -> None:
        PolarKVError.__init__(self, message)
        self.call, self.status, self.name, self.text = "", -1, "", message


# ------------------------------------------------------------------------------------ finding the library


class LibKind(str, enum.Enum):
    DRIVER = "driver"
    RUNTIME = "runtime"


def wheel_lib_dirs() -> list[str]:
    """The `lib` directories of installed `nvidia-cuda-runtime-*` wheels (what CUDA torch ships with).

    Found through the import system's spec of `nvidia.cuda_runtime` only: nothing is imported but the
    `nvidia` namespace package itself (no torch)."""
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    out = []
    for base in spec.submodule_search_locations or []:
        lib = os.path.join(base, "lib")
        if os.path.isdir(lib):
            out.append(lib)
    return out


def library_candidates(
    kind: LibKind,
    *,
    find_library: Callable[[str], str | None] = ctypes.util.find_library,
    wheel_dirs: Iterable[str] | None = None,
) -> list[str]:
    """What to hand to dlopen, best first, without duplicates.

    Driver: the sonames the driver installs (`libcuda.so.1` first: the unversioned name exists only
    with development packages), then what `ctypes.util.find_library("cuda")` finds. Runtime: the
    sonames of CUDA 13 and 12, `find_library("cudart")`, then every `libcudart.so*` in the lib directory
    of an nvidia-cuda-runtime wheel (`wheel_lib_dirs`)."""
    if kind is LibKind.DRIVER:
        found = find_library("cuda")
        return list(dict.fromkeys([*DRIVER_NAMES, *([found] if found else [])]))
    names = list(RUNTIME_NAMES)
    found = find_library("cudart")
    if found:
        names.append(found)
    for d in wheel_lib_dirs() if wheel_dirs is None else wheel_dirs:
        try:
            files = sorted(os.listdir(d), reverse=True)  # libcudart.so.13 before libcudart.so.12
        except OSError:
            continue
        names += [os.path.join(d, f) for f in files if f.startswith("libcudart.so")]
    return list(dict.fromkeys(names))


def open_library(candidates: Sequence[str], loader: Callable[[str], Any] = ctypes.CDLL) -> tuple[Any, str]:
    """The first candidate that loads, and its name; CudaUnavailable listing why each one failed."""
    why = []
    for name in candidates:
        try:
            return loader(name), name
        except OSError as err:
            text = str(err)
            # dlopen's "cannot open shared object file" says "not found"; anything else is worth showing
            why.append(f"{name}: not found" if "No such file" in text else f"{name}: {text}")
    raise CudaUnavailable("; ".join(why) or "no candidates")


# ---------------------------------------------------------------------------------------- the bindings


class CopyKind(enum.Enum):
    D2D = "d2d"  # inside the pool
    D2H = "d2h"  # demotion: pool -> host (a DRAM arena slot)
    H2D = "h2d"  # promotion: host -> pool


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    index: int  # as this process numbers devices (CUDA_VISIBLE_DEVICES applies)
    name: str
    pci_bus_id: str  # "0000:19:00.0": the same in every process, whatever it numbers the device
    uuid: str  # "GPU-8c1e...": likewise; what an engine matches to find "the same GPU"
    total_bytes: int
    compute_capability: tuple[int, int]


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


class _Uuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


def format_uuid(raw: bytes) -> str:
    """16 UUID bytes -> "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", as nvidia-smi -L prints it."""
    h = bytes(raw).hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


_P = ctypes.POINTER
_i, _u, _sz, _vp, _u64, _cp = (
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_uint64,
    ctypes.c_char_p,
)


class CudaApi:
    """The CUDA calls L1 needs, with checked return codes. Pointers and handles are plain ints.

    Subclasses bind one library; `SIGNATURES` maps each function to (symbols to try, argtypes); a
    function missing from the library raises CudaUnavailable when first called."""

    kind: LibKind
    SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[Any, ...]]] = {}

    def __init__(self, lib: Any, name: str) -> None:
        self.lib = lib
        self.library = name
        self.skipped = ""  # why `load_api("auto")` did not take the driver, when it fell back to this
        self._fns: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _fn(self, name: str) -> Any:
        fn = self._fns.get(name)
        if fn is None:
            symbols, argtypes = self.SIGNATURES[name]
            for symbol in symbols:
                fn = getattr(self.lib, symbol, None)
                if fn is not None:
                    break
            else:
                raise CudaUnavailable(f"{self.library} has no {' or '.join(symbols)}")
            fn.argtypes = list(argtypes)
            fn.restype = ctypes.c_int
            self._fns[name] = fn
        return fn

    def _call(self, name: str, *args: Any) -> None:
        status = self._fn(name)(*args)
        if status != 0:
            err_name, text = self.error_text(status)
            raise CudaError(name, status, err_name, text)

    def error_text(self, status: int) -> tuple[str, str]:
        raise NotImplementedError

    # The methods every binding provides (documented once, here).
    def version(self) -> str:
        """e.g. "driver 12.8" or "runtime 12.4, driver 12.8"."""
        raise NotImplementedError

    def device_count(self) -> int:
        raise NotImplementedError

    def device_info(self, index: int) -> DeviceInfo:
        """Without creating a context (the probe's questions)."""
        raise NotImplementedError

    def use_device(self, index: int) -> None:
        """Make `index`'s primary context current in this thread (retained once per process)."""
        raise NotImplementedError

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes of the current device."""
        raise NotImplementedError

    def malloc(self, nbytes: int) -> int:
        raise NotImplementedError

    def free(self, ptr: int) -> None:
        raise NotImplementedError

    def memset(self, ptr: int, value: int, nbytes: int, stream: int) -> None:
        raise NotImplementedError

    def ipc_get(self, ptr: int) -> bytes:
        """The 64-byte IPC handle of the allocation that starts at `ptr`."""
        raise NotImplementedError

    def ipc_open(self, handle: bytes) -> int:
        """Another process's allocation mapped into this one (never the exporting process itself)."""
        raise NotImplementedError

    def ipc_close(self, ptr: int) -> None:
        raise NotImplementedError

    def copy_async(self, kind: CopyKind, dst: int, src: int, nbytes: int, stream: int) -> None:
        raise NotImplementedError

    def stream_create(self) -> int:
        """A non-blocking stream (does not wait for the legacy default stream)."""
        raise NotImplementedError

    def stream_sync(self, stream: int) -> None:
        raise NotImplementedError

    def stream_destroy(self, stream: int) -> None:
        raise NotImplementedError

    def host_register(self, addr: int, nbytes: int) -> None:
        """Page-lock host memory that exists already (portable: valid in every context)."""
        raise NotImplementedError

    def host_unregister(self, addr: int) -> None:
        raise NotImplementedError

    def event_create(self) -> int:
        raise NotImplementedError

    def event_record(self, event: int, stream: int) -> None:
        raise NotImplementedError

    def event_sync(self, event: int) -> None:
        raise NotImplementedError

    def event_elapsed_ms(self, start: int, end: int) -> float:
        raise NotImplementedError

    def event_destroy(self, event: int) -> None:
        raise NotImplementedError

    def dmabuf_supported(self, index: int) -> bool:
        """Whether device `index` can export memory as a dma-buf (CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED)."""
        raise NotImplementedError

    def sync_memops(self, ptr: int) -> None:
        """CU_POINTER_ATTRIBUTE_SYNC_MEMOPS on the allocation at `ptr`: CUDA's own copies into it are
        finished when they return, so a NIC reading or writing it by DMA never races them."""
        raise NotImplementedError

    def export_dmabuf(self, ptr: int, nbytes: int) -> int:
        """A dma-buf file descriptor for [ptr, ptr + nbytes) of device memory (the caller closes it)."""
        raise NotImplementedError


class DriverApi(CudaApi):
    """libcuda (the driver API). See the module docstring for why this is the primary binding."""

    kind = LibKind.DRIVER
    SIGNATURES = {
        "cuInit": (("cuInit",), (_u,)),
        "cuDriverGetVersion": (("cuDriverGetVersion",), (_P(_i),)),
        "cuDeviceGetCount": (("cuDeviceGetCount",), (_P(_i),)),
        "cuDeviceGet": (("cuDeviceGet",), (_P(_i), _i)),
        "cuDeviceGetName": (("cuDeviceGetName",), (_cp, _i, _i)),
        "cuDeviceTotalMem": (("cuDeviceTotalMem_v2", "cuDeviceTotalMem"), (_P(_sz), _i)),
        "cuDeviceGetPCIBusId": (("cuDeviceGetPCIBusId",), (_cp, _i, _i)),
        "cuDeviceGetUuid": (("cuDeviceGetUuid_v2", "cuDeviceGetUuid"), (_P(_Uuid), _i)),
        "cuDeviceGetAttribute": (("cuDeviceGetAttribute",), (_P(_i), _i, _i)),
        "cuDevicePrimaryCtxRetain": (("cuDevicePrimaryCtxRetain",), (_P(_vp), _i)),
        "cuCtxSetCurrent": (("cuCtxSetCurrent",), (_vp,)),
        "cuMemGetInfo": (("cuMemGetInfo_v2", "cuMemGetInfo"), (_P(_sz), _P(_sz))),
        "cuMemAlloc": (("cuMemAlloc_v2",), (_P(_u64), _sz)),
        "cuMemFree": (("cuMemFree_v2",), (_u64,)),
        "cuMemsetD8Async": (("cuMemsetD8Async",), (_u64, ctypes.c_ubyte, _sz, _vp)),
        "cuIpcGetMemHandle": (("cuIpcGetMemHandle",), (_P(_IpcHandle), _u64)),
        "cuIpcOpenMemHandle": (("cuIpcOpenMemHandle_v2", "cuIpcOpenMemHandle"), (_P(_u64), _IpcHandle, _u)),
        "cuIpcCloseMemHandle": (("cuIpcCloseMemHandle",), (_u64,)),
        "cuMemcpyDtoDAsync": (("cuMemcpyDtoDAsync_v2",), (_u64, _u64, _sz, _vp)),
        "cuMemcpyDtoHAsync": (("cuMemcpyDtoHAsync_v2",), (_vp, _u64, _sz, _vp)),
        "cuMemcpyHtoDAsync": (("cuMemcpyHtoDAsync_v2",), (_u64, _vp, _sz, _vp)),
        "cuStreamCreate": (("cuStreamCreate",), (_P(_vp), _u)),
        "cuStreamSynchronize": (("cuStreamSynchronize",), (_vp,)),
        "cuStreamDestroy": (("cuStreamDestroy_v2", "cuStreamDestroy"), (_vp,)),
        "cuMemHostRegister": (("cuMemHostRegister_v2", "cuMemHostRegister"), (_vp, _sz, _u)),
        "cuMemHostUnregister": (("cuMemHostUnregister",), (_vp,)),
        "cuEventCreate": (("cuEventCreate",), (_P(_vp), _u)),
        "cuEventRecord": (("cuEventRecord",), (_vp, _vp)),
        "cuEventSynchronize": (("cuEventSynchronize",), (_vp,)),
        "cuEventElapsedTime": (
            ("cuEventElapsedTime_v2", "cuEventElapsedTime"),
            (_P(ctypes.c_float), _vp, _vp),
        ),
        "cuEventDestroy": (("cuEventDestroy_v2", "cuEventDestroy"), (_vp,)),
        # CUresult cuPointerSetAttribute(const void *value, CUpointer_attribute attribute, CUdeviceptr ptr)
        "cuPointerSetAttribute": (("cuPointerSetAttribute",), (_vp, _i, _u64)),
        # CUresult cuMemGetHandleForAddressRange(void *handle, CUdeviceptr dptr, size_t size,
        #     CUmemRangeHandleType handleType, unsigned long long flags)   (CUDA >= 11.7)
        "cuMemGetHandleForAddressRange": (
            ("cuMemGetHandleForAddressRange",),
            (_vp, _u64, _sz, _i, ctypes.c_ulonglong),
        ),
    }
    _ATTR_DMA_BUF_SUPPORTED = 124  # CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED
    _POINTER_SYNC_MEMOPS = 6  # CU_POINTER_ATTRIBUTE_SYNC_MEMOPS
    _RANGE_HANDLE_DMA_BUF_FD = 1  # CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD

    def __init__(self, lib: Any, name: str) -> None:
        super().__init__(lib, name)
        self._initialised = False
        self._contexts: dict[int, int] = {}

    def error_text(self, status: int) -> tuple[str, str]:
        out = []
        for fn_name in ("cuGetErrorName", "cuGetErrorString"):
            fn = getattr(self.lib, fn_name, None)
            text = ctypes.c_char_p()
            if fn is not None:
                fn.argtypes, fn.restype = [_i, _P(_cp)], ctypes.c_int
                if fn(status, ctypes.byref(text)) == 0 and text.value:
                    out.append(text.value.decode(errors="replace"))
                    continue
            out.append("")
        return out[0] or f"CUresult {status}", out[1]

    def init(self) -> None:
        """cuInit, once per process; raises CudaError (CUDA_ERROR_NO_DEVICE on a host without a GPU)."""
        with self._lock:
            if not self._initialised:
                self._call("cuInit", 0)
                self._initialised = True

    def version(self) -> str:
        v = ctypes.c_int()
        self._call("cuDriverGetVersion", ctypes.byref(v))
        return f"driver {v.value // 1000}.{v.value % 1000 // 10}"

    def device_count(self) -> int:
        self.init()
        n = ctypes.c_int()
        self._call("cuDeviceGetCount", ctypes.byref(n))
        return n.value

    def _device(self, index: int) -> int:
        self.init()
        dev = ctypes.c_int()
        self._call("cuDeviceGet", ctypes.byref(dev), index)
        return dev.value

    def device_info(self, index: int) -> DeviceInfo:
        dev = self._device(index)
        name = ctypes.create_string_buffer(256)
        self._call("cuDeviceGetName", name, 256, dev)
        bus = ctypes.create_string_buffer(32)
        self._call("cuDeviceGetPCIBusId", bus, 32, dev)
        uuid = _Uuid()
        self._call("cuDeviceGetUuid", ctypes.byref(uuid), dev)
        total = ctypes.c_size_t()
        self._call("cuDeviceTotalMem", ctypes.byref(total), dev)
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._call("cuDeviceGetAttribute", ctypes.byref(major), 75, dev)  # COMPUTE_CAPABILITY_MAJOR
        self._call("cuDeviceGetAttribute", ctypes.byref(minor), 76, dev)  # COMPUTE_CAPABILITY_MINOR
        return DeviceInfo(
            index,
            name.value.decode(errors="replace"),
            bus.value.decode().lower(),
            format_uuid(bytes(uuid.bytes)),
            total.value,
            (major.value, minor.value),
        )

    def use_device(self, index: int) -> None:
        ctx = self._contexts.get(index)
        if ctx is None:
            with self._lock:
                ctx = self._contexts.get(index)
                if ctx is None:
                    dev = self._device(index)
                    handle = ctypes.c_void_p()
                    # Retained for the life of the process: releasing it would destroy the context
                    # under any allocation, stream or IPC mapping still made from it.
                    self._call("cuDevicePrimaryCtxRetain", ctypes.byref(handle), dev)
                    ctx = self._contexts[index] = handle.value or 0
        self._call("cuCtxSetCurrent", ctx)

    def mem_info(self) -> tuple[int, int]:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self._call("cuMemGetInfo", ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self._call("cuMemAlloc", ctypes.byref(ptr), nbytes)
        return ptr.value

    def free(self, ptr: int) -> None:
        self._call("cuMemFree", ptr)

    def memset(self, ptr: int, value: int, nbytes: int, stream: int) -> None:
        self._call("cuMemsetD8Async", ptr, value, nbytes, stream)

    def ipc_get(self, ptr: int) -> bytes:
        h = _IpcHandle()
        self._call("cuIpcGetMemHandle", ctypes.byref(h), ptr)
        return ctypes.string_at(ctypes.addressof(h), IPC_HANDLE_BYTES)

    def ipc_open(self, handle: bytes) -> int:
        h = _IpcHandle.from_buffer_copy(handle)
        ptr = ctypes.c_uint64()
        self._call("cuIpcOpenMemHandle", ctypes.byref(ptr), h, 1)  # LAZY_ENABLE_PEER_ACCESS
        return ptr.value

    def ipc_close(self, ptr: int) -> None:
        self._call("cuIpcCloseMemHandle", ptr)

    def copy_async(self, kind: CopyKind, dst: int, src: int, nbytes: int, stream: int) -> None:
        if kind is CopyKind.D2D:
            self._call("cuMemcpyDtoDAsync", dst, src, nbytes, stream)
        elif kind is CopyKind.D2H:
            self._call("cuMemcpyDtoHAsync", dst, src, nbytes, stream)
        else:
            self._call("cuMemcpyHtoDAsync", dst, src, nbytes, stream)

    def stream_create(self) -> int:
        s = ctypes.c_void_p()
        self._call("cuStreamCreate", ctypes.byref(s), 1)  # CU_STREAM_NON_BLOCKING
        return s.value or 0

    def stream_sync(self, stream: int) -> None:
        self._call("cuStreamSynchronize", stream)

    def stream_destroy(self, stream: int) -> None:
        self._call("cuStreamDestroy", stream)

    def host_register(self, addr: int, nbytes: int) -> None:
        self._call("cuMemHostRegister", addr, nbytes, 1)  # CU_MEMHOSTREGISTER_PORTABLE

    def host_unregister(self, addr: int) -> None:
        self._call("cuMemHostUnregister", addr)

    def event_create(self) -> int:
        e = ctypes.c_void_p()
        self._call("cuEventCreate", ctypes.byref(e), 0)
        return e.value or 0

    def event_record(self, event: int, stream: int) -> None:
        self._call("cuEventRecord", event, stream)

    def event_sync(self, event: int) -> None:
        self._call("cuEventSynchronize", event)

    def event_elapsed_ms(self, start: int, end: int) -> float:
        ms = ctypes.c_float()
        self._call("cuEventElapsedTime", ctypes.byref(ms), start, end)
        return ms.value

    def event_destroy(self, event: int) -> None:
        self._call("cuEventDestroy", event)

    def dmabuf_supported(self, index: int) -> bool:
        v = ctypes.c_int()
        try:
            self._call(
                "cuDeviceGetAttribute", ctypes.byref(v), self._ATTR_DMA_BUF_SUPPORTED, self._device(index)
            )
        except CudaError as err:
            if err.name == "CUDA_ERROR_INVALID_VALUE":  # a driver older than the attribute (< 11.7)
                return False
            raise
        return bool(v.value)

    def sync_memops(self, ptr: int) -> None:
        one = ctypes.c_uint(1)
        self._call("cuPointerSetAttribute", ctypes.byref(one), self._POINTER_SYNC_MEMOPS, ptr)

    def export_dmabuf(self, ptr: int, nbytes: int) -> int:
        try:
            self._fn("cuMemGetHandleForAddressRange")
        except CudaUnavailable:
            raise CudaUnavailable(
                f"{self.library} has no cuMemGetHandleForAddressRange (dma-buf export needs a CUDA 11.7+ driver)"
            ) from None
        fd = ctypes.c_int(-1)
        self._call(
            "cuMemGetHandleForAddressRange", ctypes.byref(fd), ptr, nbytes, self._RANGE_HANDLE_DMA_BUF_FD, 0
        )
        return fd.value


class RuntimeApi(CudaApi):
    """libcudart (the runtime API): the fallback binding, and what a torch engine itself uses."""

    kind = LibKind.RUNTIME
    _PROPS_BYTES = 8192  # > sizeof(cudaDeviceProp) of every release (about 1 KiB in CUDA 12 and 13)
    SIGNATURES = {
        "cudaRuntimeGetVersion": (("cudaRuntimeGetVersion",), (_P(_i),)),
        "cudaDriverGetVersion": (("cudaDriverGetVersion",), (_P(_i),)),
        "cudaGetDeviceCount": (("cudaGetDeviceCount",), (_P(_i),)),
        "cudaSetDevice": (("cudaSetDevice",), (_i,)),
        # name[256] then the 16-byte uuid then luid[8], luidDeviceNodeMask, totalGlobalMem open the
        # struct in every release (_v2 is CUDA 12's name for the current layout; 13 dropped the suffix)
        "cudaGetDeviceProperties": (("cudaGetDeviceProperties_v2", "cudaGetDeviceProperties"), (_vp, _i)),
        "cudaDeviceGetPCIBusId": (("cudaDeviceGetPCIBusId",), (_cp, _i, _i)),
        "cudaDeviceGetAttribute": (("cudaDeviceGetAttribute",), (_P(_i), _i, _i)),
        "cudaMemGetInfo": (("cudaMemGetInfo",), (_P(_sz), _P(_sz))),
        "cudaMalloc": (("cudaMalloc",), (_P(_vp), _sz)),
        "cudaFree": (("cudaFree",), (_vp,)),
        "cudaMemsetAsync": (("cudaMemsetAsync",), (_vp, _i, _sz, _vp)),
        "cudaIpcGetMemHandle": (("cudaIpcGetMemHandle",), (_P(_IpcHandle), _vp)),
        "cudaIpcOpenMemHandle": (("cudaIpcOpenMemHandle",), (_P(_vp), _IpcHandle, _u)),
        "cudaIpcCloseMemHandle": (("cudaIpcCloseMemHandle",), (_vp,)),
        "cudaMemcpyAsync": (("cudaMemcpyAsync",), (_vp, _vp, _sz, _i, _vp)),
        "cudaStreamCreateWithFlags": (("cudaStreamCreateWithFlags",), (_P(_vp), _u)),
        "cudaStreamSynchronize": (("cudaStreamSynchronize",), (_vp,)),
        "cudaStreamDestroy": (("cudaStreamDestroy",), (_vp,)),
        "cudaHostRegister": (("cudaHostRegister",), (_vp, _sz, _u)),
        "cudaHostUnregister": (("cudaHostUnregister",), (_vp,)),
        "cudaEventCreate": (("cudaEventCreate",), (_P(_vp),)),
        "cudaEventRecord": (("cudaEventRecord",), (_vp, _vp)),
        "cudaEventSynchronize": (("cudaEventSynchronize",), (_vp,)),
        "cudaEventElapsedTime": (("cudaEventElapsedTime",), (_P(ctypes.c_float), _vp, _vp)),
        "cudaEventDestroy": (("cudaEventDestroy",), (_vp,)),
    }
    _KIND = {CopyKind.H2D: 1, CopyKind.D2H: 2, CopyKind.D2D: 3}  # cudaMemcpyKind

    def error_text(self, status: int) -> tuple[str, str]:
        out = []
        for fn_name in ("cudaGetErrorName", "cudaGetErrorString"):
            fn = getattr(self.lib, fn_name, None)
            value = b""
            if fn is not None:
                fn.argtypes, fn.restype = [_i], ctypes.c_char_p
                value = fn(status) or b""
            out.append(value.decode(errors="replace"))
        return out[0] or f"cudaError {status}", out[1]

    def version(self) -> str:
        rt, drv = ctypes.c_int(), ctypes.c_int()
        self._call("cudaRuntimeGetVersion", ctypes.byref(rt))
        self._call("cudaDriverGetVersion", ctypes.byref(drv))
        fmt = lambda v: f"{v // 1000}.{v % 1000 // 10}"  # noqa: E731
        return f"runtime {fmt(rt.value)}, driver {fmt(drv.value) if drv.value else 'none'}"

    def device_count(self) -> int:
        n = ctypes.c_int()
        self._call("cudaGetDeviceCount", ctypes.byref(n))
        return n.value

    def device_info(self, index: int) -> DeviceInfo:
        props = ctypes.create_string_buffer(self._PROPS_BYTES)
        self._call("cudaGetDeviceProperties", props, index)
        raw = props.raw
        bus = ctypes.create_string_buffer(32)
        self._call("cudaDeviceGetPCIBusId", bus, 32, index)
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._call("cudaDeviceGetAttribute", ctypes.byref(major), 75, index)
        self._call("cudaDeviceGetAttribute", ctypes.byref(minor), 76, index)
        return DeviceInfo(
            index,
            raw[:256].split(b"\0", 1)[0].decode(errors="replace"),
            bus.value.decode().lower(),
            format_uuid(raw[256:272]),
            int.from_bytes(raw[288:296], "little"),  # totalGlobalMem (after name, uuid, luid, mask)
            (major.value, minor.value),
        )

    def use_device(self, index: int) -> None:
        self._call("cudaSetDevice", index)

    def mem_info(self) -> tuple[int, int]:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self._call("cudaMemGetInfo", ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._call("cudaMalloc", ctypes.byref(ptr), nbytes)
        return ptr.value or 0

    def free(self, ptr: int) -> None:
        self._call("cudaFree", ptr)

    def memset(self, ptr: int, value: int, nbytes: int, stream: int) -> None:
        self._call("cudaMemsetAsync", ptr, value, nbytes, stream)

    def ipc_get(self, ptr: int) -> bytes:
        h = _IpcHandle()
        self._call("cudaIpcGetMemHandle", ctypes.byref(h), ptr)
        return ctypes.string_at(ctypes.addressof(h), IPC_HANDLE_BYTES)

    def ipc_open(self, handle: bytes) -> int:
        h = _IpcHandle.from_buffer_copy(handle)
        ptr = ctypes.c_void_p()
        self._call("cudaIpcOpenMemHandle", ctypes.byref(ptr), h, 1)  # cudaIpcMemLazyEnablePeerAccess
        return ptr.value or 0

    def ipc_close(self, ptr: int) -> None:
        self._call("cudaIpcCloseMemHandle", ptr)

    def copy_async(self, kind: CopyKind, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._call("cudaMemcpyAsync", dst, src, nbytes, self._KIND[kind], stream)

    def stream_create(self) -> int:
        s = ctypes.c_void_p()
        self._call("cudaStreamCreateWithFlags", ctypes.byref(s), 1)  # cudaStreamNonBlocking
        return s.value or 0

    def stream_sync(self, stream: int) -> None:
        self._call("cudaStreamSynchronize", stream)

    def stream_destroy(self, stream: int) -> None:
        self._call("cudaStreamDestroy", stream)

    def host_register(self, addr: int, nbytes: int) -> None:
        self._call("cudaHostRegister", addr, nbytes, 1)  # cudaHostRegisterPortable

    def host_unregister(self, addr: int) -> None:
        self._call("cudaHostUnregister", addr)

    def event_create(self) -> int:
        e = ctypes.c_void_p()
        self._call("cudaEventCreate", ctypes.byref(e))
        return e.value or 0

    def event_record(self, event: int, stream: int) -> None:
        self._call("cudaEventRecord", event, stream)

    def event_sync(self, event: int) -> None:
        self._call("cudaEventSynchronize", event)

    def event_elapsed_ms(self, start: int, end: int) -> float:
        ms = ctypes.c_float()
        self._call("cudaEventElapsedTime", ctypes.byref(ms), start, end)
        return ms.value

    def event_destroy(self, event: int) -> None:
        self._call("cudaEventDestroy", event)

    _NO_DMABUF = (
        "the CUDA runtime API has no dma-buf export (cuMemGetHandleForAddressRange is a driver API "
        "call with no cudart equivalent); L1 runs on libcudart here (vram.cuda_api), so GPUDirect RDMA "
        'into it is off: use the driver API (vram.cuda_api = "auto" or "driver") for it'
    )

    def dmabuf_supported(self, index: int) -> bool:
        raise CudaUnavailable(self._NO_DMABUF)

    def sync_memops(self, ptr: int) -> None:
        raise CudaUnavailable(self._NO_DMABUF)

    def export_dmabuf(self, ptr: int, nbytes: int) -> int:
        raise CudaUnavailable(self._NO_DMABUF)


_BINDINGS: dict[LibKind, type[CudaApi]] = {LibKind.DRIVER: DriverApi, LibKind.RUNTIME: RuntimeApi}
_loaded: dict[LibKind, CudaApi] = {}
_load_lock = threading.Lock()


def load_api(setting: str = "auto") -> CudaApi:
    """The process's CUDA binding (loaded once per kind). "auto": the driver, else the runtime.

    Raises CudaUnavailable saying which libraries were tried and why each failed."""
    if setting not in API_SETTINGS:
        raise ValueError(f"cuda_api must be one of {', '.join(API_SETTINGS)}, got {setting!r}")
    kinds = [LibKind.DRIVER, LibKind.RUNTIME] if setting == "auto" else [LibKind(setting)]
    why = []
    with _load_lock:
        for kind in kinds:
            api = _loaded.get(kind)
            if api is None:
                try:
                    lib, name = open_library(library_candidates(kind))
                except CudaUnavailable as err:
                    why.append(f"no CUDA {kind.value} library ({err})")
                    continue
                api = _loaded[kind] = _BINDINGS[kind](lib, name)
            api.skipped = "; ".join(why)
            return api
    raise CudaUnavailable("; ".join(why))


# ------------------------------------------------------------------------------------------ the probe


@dataclasses.dataclass(frozen=True)
class VramChoice:
    """What the daemon decided about L1 at start, and why (one line: `describe_choice`)."""

    enabled: bool
    reason: str
    capacity: int = 0
    device: DeviceInfo | None = None
    api: str = ""  # "driver" or "runtime"
    library: str = ""  # what was loaded, as dlopen was given it
    version: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["line"] = describe_choice(self)
        return out


def describe_choice(choice: VramChoice) -> str:
    if choice.enabled and choice.device is not None:
        d = choice.device
        return f"vram: {choice.capacity / _GiB:.1f} GiB on GPU {d.index} ({d.name}, {d.pci_bus_id})"
    return f"vram: {choice.reason}"


def probe(settings: VramConfig, *, load: Callable[[str], CudaApi] = load_api) -> VramChoice:
    """Decide whether L1 runs here. Never raises for a host without CUDA: the reason says why not.

    Creates no CUDA context and allocates nothing: the pool is made later (`VramPool`), where a
    failing allocation reports the device's free memory."""
    if not settings.enabled:
        return VramChoice(False, "disabled (vram.enabled = false)")

    def unavailable(why: str, api: CudaApi | None = None) -> VramChoice:
        if api is not None and api.skipped:  # e.g. no libcuda, and a toolkit's libcudart fails on that
            why = f"{api.skipped}; {api.library}: {why}"
        return VramChoice(
            False,
            f"unavailable: {why}",
            settings.capacity,
            api=api.kind.value if api else "",
            library=api.library if api else "",
        )

    try:
        api = load(settings.cuda_api)
    except CudaUnavailable as err:
        return unavailable(str(err))
    try:
        count = api.device_count()
    except CudaUnavailable as err:
        return unavailable(str(err), api)
    except CudaError as err:
        if err.status == 100:  # CUDA_ERROR_NO_DEVICE == cudaErrorNoDevice
            return unavailable(f"no CUDA device ({err})", api)
        return unavailable(str(err), api)
    if count == 0:
        return unavailable("no CUDA device", api)
    if not 0 <= settings.device < count:
        n = "1 device" if count == 1 else f"{count} devices"
        return unavailable(f"vram.device {settings.device} out of range ({n})", api)
    try:
        info = api.device_info(settings.device)
        version = api.version()
    except CudaError as err:
        return unavailable(str(err), api)
    if settings.capacity > info.total_bytes:
        return unavailable(
            f"vram.capacity {settings.capacity / _GiB:.1f} GiB is more than GPU {info.index} "
            f"({info.name}) has: {info.total_bytes / _GiB:.1f} GiB",
            api,
        )
    return VramChoice(True, "available", settings.capacity, info, api.kind.value, api.library, version)


# --------------------------------------------------------------------------- slots and copy planning (pure)


class PageSlots:
    """Which byte ranges of the pool are handed out: the DRAM tier's slab allocator, plus a record of
    every slot given out, so an offset that comes back (from the manager, later from an engine) is
    checked: freeing a slot twice, or one never handed out, is a ValueError, never a corrupt pool."""

    def __init__(self, capacity: int, slab_bytes: int) -> None:
        self.slabs = SlabAllocator(capacity, slab_bytes)
        self.capacity = capacity
        self._out: dict[int, int] = {}  # offset -> slot bytes

    @property
    def used_bytes(self) -> int:
        return self.slabs.used_bytes

    def alloc(self, page_bytes: int) -> int | None:
        """Offset of a free slot for a page of `page_bytes` (rounded up to 4 KiB), or None when full."""
        size = slot_size(page_bytes)
        off = self.slabs.alloc(size)
        if off is not None:
            self._out[off] = size
        return off

    def free(self, offset: int) -> None:
        size = self._out.pop(offset, None)
        if size is None:
            raise ValueError(f"offset {offset} is not a slot in use")
        self.slabs.free(offset, size)

    def slot_bytes(self, offset: int) -> int | None:
        return self._out.get(offset)

    def free_slots(self, page_bytes: int) -> int:
        return self.slabs.free_slots(slot_size(page_bytes))

    def __len__(self) -> int:
        return len(self._out)


def plan_copies(
    items: Iterable[tuple[int, int, int]], src_size: int, dst_size: int, *, same_region: bool = False
) -> list[tuple[int, int, int]]:
    """Validate (src_offset, dst_offset, nbytes) items and merge neighbours that are contiguous on
    both sides into one copy (a page's layers, consecutive slots). Order is kept.

    Every range must lie inside its region (`src_size`, `dst_size`); with `same_region` (device to
    device inside the pool) no item's source may overlap its destination, and no destination may
    overlap another's: CUDA does not define the result of either. ValueError names the bad item."""
    out: list[list[int]] = []
    src_ranges: list[tuple[int, int]] = []
    dst_ranges: list[tuple[int, int]] = []
    for i, item in enumerate(items):
        if len(item) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in item):
            raise ValueError(f"copy {i}: expected (src_offset, dst_offset, nbytes) integers, got {item!r}")
        src, dst, n = item
        if n <= 0 or src < 0 or dst < 0:
            raise ValueError(f"copy {i}: offsets must be >= 0 and nbytes > 0, got {item!r}")
        if src + n > src_size:
            raise ValueError(f"copy {i}: source [{src}, {src + n}) lies outside {src_size} bytes")
        if dst + n > dst_size:
            raise ValueError(f"copy {i}: destination [{dst}, {dst + n}) lies outside {dst_size} bytes")
        if same_region:
            if src < dst + n and dst < src + n:
                raise ValueError(f"copy {i}: source and destination overlap: {item!r}")
            src_ranges.append((src, src + n))
            dst_ranges.append((dst, dst + n))
        if out and out[-1][0] + out[-1][2] == src and out[-1][1] + out[-1][2] == dst:
            out[-1][2] += n
        else:
            out.append([src, dst, n])
    if same_region:
        # Within one batch no copy may read what another writes, nor two write the same bytes:
        # merged neighbours would otherwise turn a chain a->b, b->c into one overlapping copy.
        dst_ranges.sort()
        for (_, hi), (lo, _) in zip(dst_ranges, dst_ranges[1:]):
            if lo < hi:
                raise ValueError(f"two copies of the batch write the same bytes at [{lo}, {hi})")
        starts = [lo for lo, _ in dst_ranges]
        for s_lo, s_hi in src_ranges:
            j = bisect.bisect_left(starts, s_hi)  # the destinations before j start below s_hi
            if j and dst_ranges[j - 1][1] > s_lo:
                raise ValueError(f"a copy reads [{s_lo}, {s_hi}) that a copy of the same batch writes")
    return [(s, d, n) for s, d, n in out]


# ----------------------------------------------------------------------------------------- the IPC handle


@dataclasses.dataclass(frozen=True)
class RegionHandle:
    """What an engine needs to map the pool: the IPC handle, the region's size, and which GPU it is
    on, by identities that do not depend on CUDA_VISIBLE_DEVICES (UUID, PCI bus id). It travels in
    the engine `hello` reply (docs/VRAM.md) as `to_wire()`."""

    handle: bytes
    size: int
    uuid: str
    pci_bus_id: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": WIRE_VERSION,
            "handle": self.handle,
            "size": self.size,
            "uuid": self.uuid,
            "pci_bus_id": self.pci_bus_id,
        }

    @classmethod
    def from_wire(cls, data: object) -> RegionHandle:
        """Validate what the daemon sent; ProtocolError naming the field otherwise."""
        if not isinstance(data, dict):
            raise ProtocolError("vram region: expected a map")
        if data.get("v") != WIRE_VERSION:
            raise ProtocolError(f"vram region: version {data.get('v')!r}, this side speaks {WIRE_VERSION}")
        unknown = set(data) - {"v", "handle", "size", "uuid", "pci_bus_id"}
        if unknown:
            raise ProtocolError(f"vram region: unknown fields {sorted(map(str, unknown))}")
        handle, size = data.get("handle"), data.get("size")
        if not isinstance(handle, bytes) or len(handle) != IPC_HANDLE_BYTES:
            raise ProtocolError(f"vram region: handle must be {IPC_HANDLE_BYTES} bytes")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size < 1 << 48:
            raise ProtocolError("vram region: size must be a positive integer below 2^48")
        uuid, bus = data.get("uuid"), data.get("pci_bus_id")
        if not isinstance(uuid, str) or not uuid.startswith("GPU-") or len(uuid) != 40:
            raise ProtocolError("vram region: uuid must look like GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx")
        if not isinstance(bus, str) or not 0 < len(bus) <= 32:
            raise ProtocolError("vram region: pci_bus_id must be a short string")
        return cls(handle, size, uuid, bus)


# ---------------------------------------------------------------------------------------------- the pool


class HostRegion:
    """A host buffer the pool copies to and from: the DRAM arena's mmap (or any writable buffer).

    With `pin` it is page-locked for the device (cuMemHostRegister, portable), so copies run by DMA
    at full PCIe speed and truly asynchronously; pageable memory is staged by the driver at a fraction
    of that (scripts/gpu-check.sh measures both). Pinning needs RLIMIT_MEMLOCK >= the buffer's size.
    Close it before the buffer is unmapped."""

    def __init__(self, api: CudaApi, buffer: Any, *, pin: bool = True) -> None:
        view = memoryview(buffer)
        self.size = view.nbytes
        self._anchor: Any = (ctypes.c_char * self.size).from_buffer(view)  # keeps the buffer exported
        self.addr = ctypes.addressof(self._anchor)
        self.api = api
        self.pinned = False
        if pin:
            api.host_register(self.addr, self.size)
            self.pinned = True

    def close(self) -> None:
        if self.pinned:
            self.pinned = False
            self.api.host_unregister(self.addr)
        self._anchor = None


class VramPool:
    """One device allocation of `capacity` bytes, cut into page slots, exported to engines by one IPC
    handle, with batched copies on one non-blocking stream (one synchronisation per batch).

    `alloc`/`free` are the slot side (no CUDA call); `copy_within`, `to_host`, `from_host` move bytes;
    `export()` is what engines get. Offsets are relative to the start of the pool."""

    def __init__(self, api: CudaApi, device: int, capacity: int, slab_bytes: int) -> None:
        self.slots = PageSlots(capacity, slab_bytes)  # refuses a bad geometry before any CUDA call
        self.api, self.device, self.capacity = api, device, capacity
        self.info = api.device_info(device)
        api.use_device(device)
        try:
            self.base = api.malloc(capacity)
        except CudaError as err:
            free, total = api.mem_info()
            raise CudaError(
                f"allocating vram.capacity = {capacity / _GiB:.2f} GiB on GPU {device} ({self.info.name}: "
                f"{free / _GiB:.2f} of {total / _GiB:.2f} GiB free) -> cuMemAlloc",
                err.status,
                err.name,
                err.text,
            ) from None
        self.stream = 0
        try:
            self.stream = api.stream_create()
            self.handle = api.ipc_get(self.base)
        except BaseException:
            self._release()
            raise
        self._closed = False
        self.copied_bytes = {kind: 0 for kind in CopyKind}
        self.batches = 0

    # ---- slots (no CUDA)

    def alloc(self, page_bytes: int) -> int | None:
        return self.slots.alloc(page_bytes)

    def free(self, offset: int) -> None:
        self.slots.free(offset)

    def export(self) -> RegionHandle:
        return RegionHandle(self.handle, self.capacity, self.info.uuid, self.info.pci_bus_id)

    def export_dmabuf(self) -> int:
        """The whole pool as a dma-buf file descriptor, for an RDMA NIC to register (GPUDirect RDMA:
        `RdmaDevice.register_dmabuf`); the caller closes it once registered (the registration holds
        its own reference). CudaError / CudaUnavailable with the reason when this host cannot:
        the runtime API (no such call), a driver before CUDA 11.7, a GPU or kernel module without
        dma-buf support (`CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED` = 0: the proprietary kernel modules
        do not export dma-bufs; the open ones, 515+, on a kernel with CONFIG_DMABUF_MOVE_NOTIFY and
        PCI P2PDMA, do), or a pool not aligned to the host page size, which the call requires of
        both the address and the length."""
        self._check_open()
        page = os.sysconf("SC_PAGE_SIZE")
        if self.base % page or self.capacity % page:
            raise CudaError(
                "cuMemGetHandleForAddressRange",
                name="CUDA_ERROR_INVALID_VALUE",
                text=f"the pool ({self.capacity} bytes at {self.base:#x}) is not aligned to the "
                f"host page size ({page} bytes)",
            )
        self.api.use_device(self.device)
        if not self.api.dmabuf_supported(self.device):
            raise CudaError(
                "cuMemGetHandleForAddressRange",
                name="CUDA_ERROR_NOT_SUPPORTED",
                text=f"GPU {self.device} ({self.info.name}) cannot export dma-bufs "
                "(CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED = 0: needs the open NVIDIA kernel modules and "
                "a kernel with dma-buf peer-to-peer support)",
            )
        self.api.sync_memops(self.base)
        return self.api.export_dmabuf(self.base, self.capacity)

    # ---- bytes

    def register_host(self, buffer: Any, *, pin: bool = True) -> HostRegion:
        self.api.use_device(self.device)
        return HostRegion(self.api, buffer, pin=pin)

    def copy_within(self, items: Iterable[tuple[int, int, int]]) -> int:
        """Device to device inside the pool: (src_offset, dst_offset, nbytes). Returns bytes copied."""
        plan = plan_copies(items, self.capacity, self.capacity, same_region=True)
        return self._run(CopyKind.D2D, [(self.base + d, self.base + s, n) for s, d, n in plan])

    def to_host(self, host: HostRegion, items: Iterable[tuple[int, int, int]]) -> int:
        """Demotion: (pool_offset, host_offset, nbytes) from the pool into `host`."""
        plan = plan_copies(items, self.capacity, host.size)
        return self._run(CopyKind.D2H, [(host.addr + d, self.base + s, n) for s, d, n in plan])

    def from_host(self, host: HostRegion, items: Iterable[tuple[int, int, int]]) -> int:
        """Promotion: (host_offset, pool_offset, nbytes) from `host` into the pool."""
        plan = plan_copies(items, host.size, self.capacity)
        return self._run(CopyKind.H2D, [(self.base + d, host.addr + s, n) for s, d, n in plan])

    def fill(self, offset: int, nbytes: int, value: int = 0) -> None:
        plan_copies([(offset, offset, nbytes)], self.capacity, self.capacity)
        self._check_open()
        self.api.use_device(self.device)
        self.api.memset(self.base + offset, value, nbytes, self.stream)
        self.api.stream_sync(self.stream)

    def _run(self, kind: CopyKind, copies: Sequence[tuple[int, int, int]]) -> int:
        """Enqueue (dst_address, src_address, nbytes) copies, then wait once. On an error the stream
        is still synchronised before it is raised, so no copy of this batch lands later."""
        self._check_open()
        self.api.use_device(self.device)
        total = 0
        try:
            for dst, src, n in copies:
                self.api.copy_async(kind, dst, src, n, self.stream)
                total += n
        finally:
            self.api.stream_sync(self.stream)
        self.copied_bytes[kind] += total
        self.batches += 1
        return total

    def _check_open(self) -> None:
        if self._closed:
            raise CudaError("vram pool", name="closed")

    def close(self) -> None:
        if not getattr(self, "_closed", True):
            self._closed = True
            self._release()

    def _release(self) -> None:
        self.api.use_device(self.device)
        try:
            if self.stream:
                self.api.stream_sync(self.stream)
                self.api.stream_destroy(self.stream)
        finally:
            self.stream = 0
            self.api.free(self.base)

    def stats(self) -> dict[str, Any]:
        return {
            "capacity_bytes": self.capacity,
            "slot_bytes_used": self.slots.used_bytes,
            "slots": len(self.slots),
            "copied_bytes": {k.value: v for k, v in self.copied_bytes.items()},
            "batches": self.batches,
        }


class Staging:
    """A bounded host buffer through which bytes of the pool are looked at on the host: the
    checksums of L1 pages sent to peers over RDMA, and of pages a peer wrote into L1 by RDMA READ
    (GPUDirect), which never pass through host memory otherwise. Copies go D2H in chunks of at most
    `nbytes` (one batch, one stream synchronisation per chunk); one user at a time (a lock), so its
    memory is bounded whatever the traffic. Page-locked when RLIMIT_MEMLOCK allows (DMA at full
    speed), else pageable (the driver stages it). Close it before the pool."""

    def __init__(self, pool: VramPool, nbytes: int = 8 << 20) -> None:
        self.pool = pool
        self.buf = bytearray(max(4096, nbytes))
        try:
            self.host = pool.register_host(self.buf, pin=True)
        except CudaError:
            self.host = pool.register_host(self.buf, pin=False)
        self._lock = threading.Lock()
        self.bytes = 0  # copied through it so far (what verifying L1 pages costs in PCIe traffic)

    def checksums(self, ranges: Sequence[tuple[int, int]]) -> list[int]:
        """xxh3_64 of each (pool_offset, length) range of the pool, as `xxhash.xxh3_64_intdigest` of
        those bytes would be."""
        import xxhash

        hashers = [xxhash.xxh3_64() for _ in ranges]
        cap = len(self.buf)
        view = memoryview(self.buf)
        with self._lock:
            pieces: list[tuple[int, int, int, int]] = []  # (range index, pool offset, buffer offset, n)
            used = 0

            def flush() -> None:
                nonlocal used
                if pieces:
                    self.pool.to_host(self.host, [(src, at, n) for _, src, at, n in pieces])
                    for i, _, at, n in pieces:
                        hashers[i].update(view[at : at + n])
                    self.bytes += used
                    pieces.clear()
                used = 0

            for i, (offset, length) in enumerate(ranges):
                done = 0
                while done < length:
                    if used == cap:
                        flush()
                    n = min(length - done, cap - used)
                    pieces.append((i, offset + done, used, n))
                    used += n
                    done += n
            flush()
        return [h.intdigest() for h in hashers]

    def close(self) -> None:
        with self._lock:
            self.host.close()


# ------------------------------------------------------------------------------------------ engine side


def find_device(api: CudaApi, uuid: str) -> int:
    """This process's index of the GPU with `uuid`; CudaError naming what it can see otherwise."""
    seen = []
    for i in range(api.device_count()):
        info = api.device_info(i)
        if info.uuid == uuid:
            return i
        seen.append(f"{i}: {info.uuid}")
    raise CudaError(
        "finding the daemon's GPU",
        name="not visible",
        text=f"{uuid} is not among this process's devices ({', '.join(seen) or 'none'}; "
        "check CUDA_VISIBLE_DEVICES): copies through the DRAM arena still work",
    )


def cuda_array_interface(
    ptr: int, nbytes: int, *, offset: int = 0, length: int | None = None
) -> dict[str, Any]:
    """`__cuda_array_interface__` (version 3) of bytes [offset, offset+length) of a device region, as
    one flat uint8 array. No stream: the daemon has synchronised its copies before it answers."""
    length = nbytes - offset if length is None else length
    if offset < 0 or length < 0 or offset + length > nbytes:
        raise ValueError(f"[{offset}, {offset + length}) lies outside the {nbytes}-byte region")
    return {
        "shape": (length,),
        "typestr": "|u1",
        "data": (ptr + offset, False),
        "version": 3,
        "strides": None,
        "stream": None,
    }


class _CudaArray:
    """The object torch reads `__cuda_array_interface__` from; torch keeps it (and so the region)
    alive as long as the tensor lives."""

    def __init__(self, owner: AttachedRegion, interface: dict[str, Any]) -> None:
        self.owner = owner
        self.__cuda_array_interface__ = interface


class AttachedRegion:
    """The engine's side: the daemon's pool opened in this process through its IPC handle.

    `ptr` is a device pointer valid in this process's primary context of `device` (the context torch
    uses). Close it when the engine detaches; tensors made by `tensor()` must be dropped before."""

    def __init__(self, region: RegionHandle, api: CudaApi | None = None) -> None:
        self.api = api if api is not None else load_api()
        self.region = region
        self.device = find_device(self.api, region.uuid)
        self.api.use_device(self.device)
        self.ptr = self.api.ipc_open(region.handle)
        self.size = region.size

    def interface(self, offset: int = 0, length: int | None = None) -> dict[str, Any]:
        if not self.ptr:
            raise CudaError("vram region", name="closed")
        return cuda_array_interface(self.ptr, self.size, offset=offset, length=length)

    def tensor(self, offset: int = 0, length: int | None = None) -> Any:
        """A torch uint8 tensor over the region (no copy); `.view(dtype)` / `.view(shape)` it as needed."""
        import torch  # lazily: only engines that use L1 pay for it

        return torch.as_tensor(_CudaArray(self, self.interface(offset, length)), device=f"cuda:{self.device}")

    def close(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            self.api.use_device(self.device)
            self.api.ipc_close(ptr)

    def __enter__(self) -> AttachedRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
