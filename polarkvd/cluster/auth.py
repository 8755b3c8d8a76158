"""The cluster's key pair: how it is written (`polarkvd keygen`), read, and checked.

Every member holds the same CURVE key pair. Gossip runs CURVE with it (encrypted, and only a key
holder can connect); the page transport derives its handshake key from the secret half
(`polarkvd.transport.peer_wire.data_key`). The file is small TOML with z85 text:

    # polarkvd cluster key pair ...
    public = "..."
    secret = "..."

A file that others can read is refused: anyone who reads it can join the cluster and read pages.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from polarkvd.errors import ConfigError
from polarkvd.private_toml import read_private_toml

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover
    pass

Z85_KEY_LEN = 40  # a 32-byte CURVE key in z85 text


@dataclasses.dataclass(frozen=True)
class CurveKeys:
    """The cluster's shared CURVE key pair (z85 text, as `zmq.curve_keypair()` returns)."""

    public: bytes
    secret: bytes


def generate() -> CurveKeys:
    import zmq

    public, secret = zmq.curve_keypair()
    return CurveKeys(public, secret)


def write_key_file(path: str | Path, keys: CurveKeys, *, force: bool = False) -> None:
    """Write the pair with mode 0600 (created that way: never readable by others, not even briefly)."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    text = (
        "# polarkvd cluster key pair (polarkvd keygen). Copy this file to every member of the cluster\n"
        "# and point [cluster] key_file at it. Keep it secret: whoever holds it can join the cluster.\n"
        f'public = "{keys.public.decode()}"\n'
        f'secret = "{keys.secret.decode()}"\n'
    )
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def read_key_file(path: str | Path) -> CurveKeys:
    """The pair in `path`; ConfigError (naming cluster.key_file) for every way it can be wrong."""
    path = Path(path)

    def bad(reason: str) -> ConfigError:
        return ConfigError([("cluster.key_file", str(path), reason)])

    doc = read_private_toml(
        path,
        "cluster.key_file",
        "key",
        "the cluster secret",
        "no such file (write one with `polarkvd keygen --out FILE`)",
    )
    out = []
    for name in ("public", "secret"):
        value = doc.get(name)
        if not isinstance(value, str) or len(value) != Z85_KEY_LEN:
            raise bad(f"{name!r} must be a {Z85_KEY_LEN}-character z85 key")
        out.append(value.encode())
    keys = CurveKeys(out[0], out[1])
    _check_pair(keys, bad)
    return keys


def _check_pair(keys: CurveKeys, bad: object) -> None:
    import zmq

    try:
        derived = zmq.curve_public(keys.secret)
    except (ValueError, zmq.ZMQError) as e:
        raise bad(f"the secret is not a valid z85 key: {e}") from None  # type: ignore[operator]
    if derived != keys.public:
        raise bad("the public key does not belong to the secret key")  # type: ignore[operator]
