"""Transports move page bytes between daemons; they know nothing of tiers, keys or policy.

`tcp` is the data path over plain TCP sockets (see its docstring for why not ZeroMQ).
"""

from polarkvd.transport.tcp import Handler, PayloadReader, PeerClient, PeerServer, Reply, data_key

__all__ = ["Handler", "PayloadReader", "PeerClient", "PeerServer", "Reply", "data_key"]
