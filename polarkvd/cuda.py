"""CUDA through ctypes: finding a library, and the handful of calls polarkvd makes, checked.

A leaf (imports only `errors`): the daemon's L1 tier (`tiers/vram.py`), the engine side of L1 (`wire/region.py`) and the
vLLM connector's copy engines use it. Owns:
- finding and loading a CUDA library (`library_candidates`, `open_library`, `load_api`), lazily:
  nothing CUDA is loaded at import time, and a host without CUDA pays nothing;
- `CudaApi`: every return code checked and turned into a `CudaError` that names the call and carries
  CUDA's own error name and text. Two implementations of the same methods: `DriverApi` (libcuda)
  and `RuntimeApi` (libcudart).

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
`vram.cuda_api = "runtime"` forces libcudart; `"auto"` tries the driver first.

Threads: ctypes releases the GIL during each call, so a thread waiting on a stream blocks nobody
else; the driver's current context is per thread (callers make their device current first). Do not
fork a process that has used CUDA (spawn or exec instead): CUDA does not survive fork.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import enum
import importlib.util
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from polarkvd.errors import PolarKVError

IPC_HANDLE_BYTES = 64  # CU_IPC_HANDLE_SIZE: CUipcMemHandle == cudaIpcMemHandle_t
API_SETTINGS = ("auto", "driver", "runtime")

DRIVER_NAMES = ("libcuda.so.1", "libcuda.so")
RUNTIME_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")


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
        return (
            f"runtime {_cuda_version(rt.value)}, driver {_cuda_version(drv.value) if drv.value else 'none'}"
        )

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


def _cuda_version(v: int) -> str:
    """CUDA's integer version (12040) as people write it (12.4)."""
    return f"{v // 1000}.{v % 1000 // 10}"
