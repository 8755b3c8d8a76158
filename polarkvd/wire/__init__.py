"""The engine↔daemon contract: everything both sides of the engine socket must agree on.

- `frames`: the socket's framing, ops, argument encodings and reply sentinels (docs/PROTOCOL.md);
- `arena`: the shared-memory arena file the daemon creates and every engine maps;
- `lookup_table`: the lookup table in the arena file (the daemon writes it, engines read it);
- `shared_words`: whole 64-bit loads and stores on shared memory, which both sides use;
- `signals`: the readiness words of pipelined loads;
- `region`: the daemon's L1 pool as the engine opens it (CUDA IPC handle, `AttachedRegion`);
- `_recvhash` (C, optional): the peer data path's receive-and-hash, which the daemon's transport
  (polarkvd/transport/peer_wire.py) uses where it is built.

The engine side (`polarkvd/client.py`, `polarkvd/connectors/`) imports this package and the leaves
(`types`, `keys`, `errors`, `cuda`), never the daemon's internals; the import contracts in
pyproject.toml check that.
"""
