"""What the cluster pool's parts share: limits, the records of pinned pages, leases and fetch
destinations, and argument checks of the peer protocol."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from polarkvd.cluster.membership import Member
from polarkvd.errors import ProtocolError
from polarkvd.types import KEY_BYTES

if TYPE_CHECKING:
    pass

T = TypeVar("T")

MAX_KEYS_PER_CALL = 4096
FETCH_BATCH_PAGES = 8  # pages per `get` call; several calls run in parallel
NET_THREADS = 8
HINT_LIMIT = 65536
#: layer-slice checksums kept (per page object and slice): a pipelined fetch asks for the same slices
#: of the same pages every time, and hashing them is most of what sending them costs the holder
SLICE_SUM_LIMIT = 65536
ANNOUNCE_BATCH = 64  # meta map messages per `announce` request
MAX_ACCEPTED_QPS = 64  # queue pairs this holder keeps for requesters (one per requesting member)
MAX_RDMA_LEASES = 4096  # open pin leases; a pin beyond this is refused (`too_large`)
MAX_NODE_ID = 255


def rdma_lease_seconds(fetch_timeout: float) -> float:
    """How long a `pin` lease lives at most: a fetcher gives up on its READs within fetch_timeout
    (and destroys its queue pair, so nothing is read later), so twice that plus a margin is safe."""
    return 2 * fetch_timeout + 1.0


@dataclasses.dataclass
class Pinned:
    """One page pinned for a peer: where it is here, and how to let it go."""

    key: bytes
    region: str  # "dram" (the arena), "dmp" (the region we lend) or "vram" (the L1 pool, GPUDirect)
    offset: int  # of the whole page in that region
    size: int  # of the whole page
    parent: bytes | None
    holder: Any  # the Page or DmpEntry (keeps the page's checksum)
    release: Callable[[], None]
    view: memoryview | None  # the whole page, or the layer slice asked for (None in L1: no host view)
    span: tuple[int, int] = (0, 0)  # in L1: (pool offset, length) of what is sent

    @property
    def nbytes(self) -> int:
        return len(self.view) if self.view is not None else self.span[1]


def release_all(pinned: Sequence[Pinned]) -> None:
    for p in pinned:
        p.release()


@dataclasses.dataclass
class Dest:
    """Where a fetch over RDMA lands: a local registered region, each page's slot start in it,
    the bytes each page receives, and how to hash what landed (first n pages)."""

    region: str
    slots: list[int]
    lengths: list[int]
    digest: Callable[[int], list[int]]


@dataclasses.dataclass
class Lease:
    pages: list[Pinned]
    timer: asyncio.TimerHandle


class Fallback(Exception):
    """The RDMA attempt did not deliver; fetch the same pages over TCP. `failure` says whether it
    counts against the peer's RDMA (back-off) or was only not applicable (our views not in the arena)."""

    def __init__(self, why: str, failure: bool = True) -> None:
        super().__init__(why)
        self.failure = failure


def layers_arg(layers: Any) -> list[int] | None:
    if layers is None:
        return None
    if (
        not isinstance(layers, list)
        or len(layers) != 3
        or not all(type(x) is int for x in layers)
        or not 0 <= layers[0] < layers[1]
        or layers[2] <= 0
    ):
        raise ProtocolError("layers must be [first, end, layer_bytes] with 0 <= first < end")
    return layers


def keys_arg(value: Any) -> list[bytes]:
    if not isinstance(value, list) or len(value) > MAX_KEYS_PER_CALL:
        raise ProtocolError(f"keys must be a list of at most {MAX_KEYS_PER_CALL} 16-byte keys")
    for k in value:
        if not isinstance(k, bytes) or len(k) != KEY_BYTES:
            raise ProtocolError("every key must be 16 bytes")
    return value


def data_addr(m: Member) -> str | None:
    """A member's page transport address from its gossip metadata, if it has a valid one."""
    addr = m.meta.get("data") if isinstance(m.meta, dict) else None
    return addr if isinstance(addr, str) and addr.startswith("tcp://") else None
