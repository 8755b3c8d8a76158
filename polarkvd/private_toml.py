"""Reading a small TOML file that holds a secret (the cluster key file, the page-key seed file): it
must exist, parse, and be readable by its owner only. Every problem is a ConfigError naming the
option that points at the file."""

from __future__ import annotations

import stat
import sys
from pathlib import Path
from typing import Any

from polarkvd.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_private_toml(
    path: Path, option: str, kind: str, secret: str, missing: str = "no such file"
) -> dict[str, Any]:
    """The parsed file. The messages call it a `kind` file ("key") holding `secret` ("the cluster
    secret"); `missing` is what to say when there is no file."""
    try:
        st = path.stat()
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([(option, str(path), missing)]) from None
    except OSError as e:
        raise ConfigError([(option, str(path), f"cannot read: {e.strerror or e}")]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([(option, str(path), f"not a {kind} file: {e}")]) from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        why = f"mode {stat.S_IMODE(st.st_mode):04o} lets others read {secret}; chmod 600 it"
        raise ConfigError([(option, str(path), why)])
    return doc
