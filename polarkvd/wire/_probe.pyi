"""Types of the compiled probe (_probe.c): see TableReader.probe in lookup_table.py."""

from collections.abc import Sequence
from typing import Any

HEADER_BYTES: int
ENTRY_BYTES: int
SLOT_BYTES: int
RING_AT: int

class Prober:
    def __init__(self, buf: Any, capacity: int, ns: int, slot_at: int, final_miss: bool) -> None: ...
    def probe(self, keys: Sequence[bytes]) -> tuple[int, bool, bytes | None]: ...
    def usable(self, stale_ns: int) -> bool: ...
    def close(self) -> None: ...
