"""Types of the compiled receive-and-hash (_recvhash.c): see recv_payload in transport/peer_wire.py."""

from typing import Any

OK: int
CLOSED: int
TIMEOUT: int

def bind(path: str) -> None: ...
def hash(buf: Any) -> int: ...
def recv_hash(fd: int, dst: Any, trailer: Any, chunk: int, deadline: float) -> tuple[int, int, int, int]: ...
