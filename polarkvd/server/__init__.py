"""The daemon's sockets: the wire protocol, the engine API, the control API and the shared-memory arena."""
