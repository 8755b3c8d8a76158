"""The daemon's L1 pool as an engine sees it: the region handle that travels in `hello` and the
engine's side of CUDA IPC.

Owns:
- `RegionHandle`: the pool's IPC handle, size and GPU identity, and its wire form (`to_wire`,
  `from_wire`, validated field by field);
- `AttachedRegion`: the pool opened in the engine process through that handle, closed when the
  engine detaches, exposed to torch through `__cuda_array_interface__` (torch imported only there).

The daemon's side of the pool (slots, copies) is `polarkvd/tiers/vram.py`; the CUDA calls are in
`polarkvd/cuda.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from polarkvd.cuda import IPC_HANDLE_BYTES, CudaApi, CudaError, load_api
from polarkvd.errors import ProtocolError

WIRE_VERSION = 1


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


# ------------------------------------------------------------------------------------------ the engine side


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
