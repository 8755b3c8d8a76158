"""The backend's options: keys of SGLang's `--hicache-storage-backend-extra-config`, validated.

The extra config is one JSON object shared with SGLang's own keys (`backend_name`, `module_path`,
`class_name`, `interface_v1`, the prefetch knobs, ...), so keys that are neither polarkvd's nor
SGLang's known ones are reported in one warning instead of refusing to start. A polarkvd key with a
bad value refuses to start, naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import Any

from polarkvd.errors import ConfigError

#: Prefix of every problem's key: where the user wrote it.
WHERE = "hicache-storage-backend-extra-config"

#: Keys SGLang 0.5.23 itself reads from the same object (factory, controller, prefetch policy).
SGLANG_KEYS = frozenset(
    {
        "backend_name",
        "module_path",
        "class_name",
        "interface_v1",
        "tp_lcm_size",
        "prefetch_threshold",
        "prefetch_timeout_base",
        "prefetch_timeout_per_ki_token",
        "hicache_storage_pass_prefix_keys",
    }
)

#: Longest path of a Unix socket (sun_path holds 108 bytes with its terminating NUL).
SOCKET_PATH_MAX = 107


@dataclasses.dataclass(frozen=True)
class Options:
    """polarkvd's keys in the extra config."""

    #: The daemon's engine socket; empty = $POLARKV_SOCKET, else the daemon's default runtime dir.
    socket: str = ""
    #: Seconds one daemon call may take before the daemon counts as down.
    timeout: float = 5.0
    #: Seconds a commit may take (with the daemon's disk.write_through it waits for the disk).
    commit_timeout: float = 60.0
    #: Longest wait between reconnection attempts while the daemon is down (backoff from 0.5 s).
    retry_seconds: float = 5.0
    #: Overrides the model part of the namespace (default: SGLang's model name plus a digest of the
    #: model directory's config and sampled weights, when the name is a local directory).
    model_fingerprint: str = ""
    #: Engine id shown by `polarkvd status`; empty = sglang-<host>-<pid>-tp<rank>.
    engine_id: str = ""

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> tuple[Options, list[str]]:
        """The options and the keys that are neither polarkvd's nor SGLang's (to warn about)."""
        extra = dict(extra or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        problems: list[tuple[str, object, str]] = []
        values: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in extra.items():
            f = fields.get(key)
            if f is None:
                if key not in SGLANG_KEYS:
                    unknown.append(str(key))
                continue
            default = f.default
            try:
                if isinstance(default, float):
                    if isinstance(value, bool) or not isinstance(value, (int, float)):
                        raise ValueError("must be a number")
                    value = float(value)
                elif not isinstance(value, str):
                    raise ValueError("must be a string")
            except ValueError as e:
                problems.append((key, value, str(e)))
                continue
            values[key] = value
        opts = cls(**values)
        for key in ("timeout", "commit_timeout", "retry_seconds"):
            value = getattr(opts, key)
            if not value > 0 or value == float("inf"):
                problems.append((key, value, "must be a positive number of seconds"))
        problems += _socket_problems(opts.socket)
        if problems:
            raise ConfigError([(f"{WHERE}.{k}", v, why) for k, v, why in problems])
        return opts, sorted(unknown)


def _socket_problems(path: str) -> list[tuple[str, object, str]]:
    """What is wrong with a `socket` setting that retrying cannot cure. A socket that is not there
    yet is not a problem: the daemon is down (or not started yet), which costs hits, not the start."""
    if not path:
        return []
    if not os.path.isabs(path):
        return [("socket", path, "must be an absolute path (SGLang's working directory is not ours)")]
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        return [("socket", path, f"is longer than a Unix socket path can be ({SOCKET_PATH_MAX} bytes)")]
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return []
    except OSError as e:
        return [("socket", path, f"cannot be examined: {e.strerror or e}")]
    if not stat.S_ISSOCK(mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(mode)
            else "a regular file"
            if stat.S_ISREG(mode)
            else "not a socket"
        )
        return [
            ("socket", path, f"is {kind}, not the daemon's engine socket (e.g. /run/polarkv/engine.sock)")
        ]
    return []
