"""Transports move page bytes between daemons; they know nothing of tiers, keys or policy.

The peer data path is plain TCP: `peer_wire.py` (handshake, framing, checksums), `peer_server.py`,
`peer_client.py`; `rdma.py` adds one-sided READs; `pipeline.py` tells engines how far a load got.

The peer data path owns the wire format between daemons (docs/PROTOCOL.md, "Peer data protocol"),
the authenticated handshake, connection pooling and the per-payload checksums. It moves opaque bytes for named ops; it
must not know what a page, a tier or a key is, and never allocates a page: the caller hands in the
buffers to send and the views to receive into.

Why not ZeroMQ here (the first design said "TCP over ZeroMQ"): the bar is a remote fetch at >= 0.7-0.8x of
raw TCP on the same link. ZeroMQ copies every received frame into a buffer of its own (and we would
copy it again into the arena), runs its I/O on a background thread that competes for the cores, and
CURVE encrypts every byte. So the data path is plain blocking TCP sockets:
- gather sends: `socket.sendmsg([prefix+header, page, sum, page, sum, ...])`, the page buffers are
  never joined or copied in user space;
- receives go straight into the caller's destination view, with `MSG_WAITALL` (the kernel wakes the
  receiver once per call, not once per arriving segment), no intermediate bytes objects; where the
  optional C extension is built (polarkvd/wire/_recvhash.c), 256 KiB at a time, each chunk hashed
  while it is still in cache, the GIL released; else one `recv_into` per payload, then its hash;
- an authenticated handshake on each new connection (BLAKE2b keyed with a key derived from the
  cluster's CURVE secret, both directions, fresh nonces), or an explicit insecure mode on both sides;
- an xxh3_64 checksum trailing every payload, computed by the sender over the buffer it sends (or
  stored with the page: `Reply.sums`) and checked by the receiver over the bytes that landed. A
  corrupt payload is reported per payload; the connection stays framed and usable.
ZeroMQ stays for gossip and control, where messages are small.

What the handshake does not give: the payload bytes are neither encrypted nor MACed after the
handshake (the checksum is not a MAC), so an attacker on the path could read or inject. Cluster
networks that are not trusted need an encrypted link underneath (WireGuard, IPsec).

Threads, not asyncio: a server thread per connection (bounded by `max_connections`) runs handlers
that may block (on the arena, on disk); send and recv release the GIL, so several connections use
both cores. Measured costs and what did not help: docs/BENCHMARKS.md, "bench cluster".
"""

from polarkvd.transport.peer_client import PeerClient
from polarkvd.transport.peer_server import Handler, PayloadReader, PeerServer, Reply
from polarkvd.transport.peer_wire import data_key

__all__ = ["Handler", "PayloadReader", "PeerClient", "PeerServer", "Reply", "data_key"]
