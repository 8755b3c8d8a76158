"""The page-key seed: where a daemon's seed comes from, and the seed file's checks.

A standalone daemon (or an insecure cluster member) keeps its seed in `daemon.seed_file`, created
at first start with mode 0600 and never overwritten; a cluster member with a key file derives it
from the cluster secret, so every member shares it. Must not compute keys (keys.py does) or decide
what a changed seed means for cached pages (the disk tier and the cluster do).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import secrets
import sys
from pathlib import Path

from polarkvd.errors import ConfigError
from polarkvd.keys import SEED_BYTES, seed_fingerprint
from polarkvd.private_toml import read_private_toml

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover
    pass

log = logging.getLogger(__name__)

__all__ = ["PageSeed", "load_seed_file", "page_seed", "seed_from_cluster_secret"]

_OPTION = "daemon.seed_file"


@dataclasses.dataclass(frozen=True)
class PageSeed:
    """The seed, where it came from (for `status` and logs), and its public fingerprint."""

    seed: bytes = dataclasses.field(repr=False)
    source: str

    @property
    def fingerprint(self) -> str:
        return seed_fingerprint(self.seed)


def seed_from_cluster_secret(secret: bytes) -> bytes:
    """The cluster's seed, from its CURVE secret (z85 text bytes) with keyed BLAKE2b and a
    personalization of its own: not the secret, and unrelated to the page transport's key."""
    if not secret or len(secret) > 64:
        raise ValueError("the cluster secret must be 1..64 bytes")
    return hashlib.blake2b(
        b"polarkv page-key seed", digest_size=SEED_BYTES, key=bytes(secret), person=b"polarkv-pgseed1"
    ).digest()


def load_seed_file(path: str | Path, *, create: bool = True) -> bytes:
    """The seed in `path`; created (mode 0600, O_EXCL: never over an existing file) when missing and
    `create`. ConfigError naming daemon.seed_file for every way the file can be wrong."""
    path = Path(path)

    def bad(reason: str) -> ConfigError:
        return ConfigError([(_OPTION, str(path), reason)])

    if create and not os.path.lexists(path):
        _create(path, bad)
    doc = read_private_toml(path, _OPTION, "seed", "the page-key seed")
    value = doc.get("seed")
    try:
        seed = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        seed = b""
    if len(seed) != SEED_BYTES:
        raise bad(f"'seed' must be {2 * SEED_BYTES} hex characters")
    return seed


def _create(path: Path, bad: object) -> None:
    text = (
        "# polarkvd page-key seed: every page key is derived with it (docs/OPERATIONS.md). Keep it\n"
        "# secret. Replacing it makes every cached page unreachable; the disk tier drops them.\n"
        f'seed = "{secrets.token_hex(SEED_BYTES)}"\n'
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process created it meanwhile: read theirs
    except OSError as e:
        raise bad(f"cannot create: {e.strerror or e}") from None  # type: ignore[operator]
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())  # a seed lost to a power cut would orphan every page on disk
    log.info("created the page-key seed file %s (mode 0600)", path)


def page_seed(seed_file: str | Path, cluster_secret: bytes | None) -> PageSeed:
    """The daemon's seed: from the cluster secret when it has one, else from `seed_file`."""
    if cluster_secret is not None:
        return PageSeed(seed_from_cluster_secret(cluster_secret), "cluster key file")
    return PageSeed(load_seed_file(seed_file), str(seed_file))
