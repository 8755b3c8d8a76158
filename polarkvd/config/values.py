"""Values of configuration options: sizes ("8GiB"), durations ("30s"), fractions ("90%"), booleans,
integers, file modes, addresses, and the checks every option's parser is built from. Each parser
takes what TOML, the environment or the command line gave and returns the value or raises
ValueError with a message for the operator."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


AUTO = -1  # an "auto" size, resolved by `resolve()`


_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
}  # fmt: skip


_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


_DUR_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|)\s*$")


#: The longest duration any option takes: a year. Longer is "never" in disguise (a lease that never
#: expires pins its pages until the connection closes), and thread waits overflow far beyond it.
MAX_DURATION = 365 * 24 * 3600.0


def finite(out: float, what: str) -> float:
    """NaN fails every comparison, so a range check alone lets it through: refuse it (and inf) here."""
    if not math.isfinite(out):
        raise ValueError(f"expected {what}, not {out!r}")
    return out


def parse_size(value: object, *, allow_auto: bool = False) -> int:
    """ "8GiB" -> 8589934592. Decimal units (GB) are powers of 1000, binary (GiB) of 1024; "1G" = 1 GB."""
    if allow_auto and isinstance(value, str) and value.strip().lower() == "auto":
        return AUTO
    if isinstance(value, bool):
        raise ValueError("expected a size like '8GiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            return int(finite(float(m.group(1)) * _UNITS[m.group(2).lower()], "a finite size"))
    raise ValueError(
        "expected a size like '8GiB', '512MB' or a number of bytes" + (" or 'auto'" if allow_auto else "")
    )


def format_size(n: float) -> str:
    """The inverse of `parse_size` for people: 5898240 -> "5.6 MiB" (binary units, one decimal)."""
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size * 0.999:  # "1.0 MiB" rather than "1023.9 KiB": keeps columns narrow
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def parse_duration(value: object) -> float:
    """30, "30s", "500ms", "2m", "1h" -> seconds; NaN, inf, negative and over a year are refused."""
    out: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = float(value)
    elif isinstance(value, str):
        m = _DUR_RE.match(value)
        if m:
            out = float(m.group(1)) * {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600}[m.group(2)]
    if out is None:
        raise ValueError("expected a duration like '30s', '500ms' or '2m'")
    finite(out, "a duration like '30s'")
    if out < 0:
        raise ValueError("must not be negative")
    if out > MAX_DURATION:
        raise ValueError(f"must be at most a year ({MAX_DURATION:.0f}s)")
    return out


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in (
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
    ):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise ValueError("expected true or false")


def parse_int(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+\s*", value):
        return int(value)
    raise ValueError("expected an integer")


def parse_str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def parse_path(value: object) -> str:
    """A file or directory path ("" = the option's default): the OS refuses a NUL byte in one."""
    text = parse_str(value)
    if "\x00" in text:
        raise ValueError("a path cannot contain a NUL byte")
    return text


def parse_dir(value: object) -> str:
    """A directory that must be named (no default): not empty, no NUL byte."""
    text = parse_path(value)
    if not text.strip():
        raise ValueError("must name a directory (empty would mean the current directory)")
    return text


def int_in(lo: int, hi: int, why: str = "") -> Callable[[object], int]:
    """A parser of an integer within lo..hi; `why` says what the upper bound protects."""

    def parse(value: object) -> int:
        out = parse_int(value)
        if not lo <= out <= hi:
            raise ValueError(f"must lie between {lo} and {hi}" + (f" ({why})" if why else ""))
        return out

    return parse


def parse_mode(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value.strip()):
        return int(value.strip(), 8)
    raise ValueError("expected an octal file mode like '0660'")


def choice(*options: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return str(value)

    return parse


def positive(parse: Callable[[object], Any]) -> Callable[[object], Any]:
    def check(value: object) -> Any:
        out = parse(value)
        if out <= 0:
            raise ValueError("must be greater than zero")
        return out

    return check


def number_in(lo: float, hi: float) -> Callable[[object], float]:
    """A parser of a plain number (int, float or its string) within lo..hi."""

    def parse(value: object) -> float:
        try:
            out = (
                float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
            )
        except ValueError:
            out = None
        if out is None:
            raise ValueError("expected a number")
        if not lo <= finite(out, "a number") <= hi:
            raise ValueError(f"must lie between {lo:g} and {hi:g}")
        return out

    return parse


def parse_fraction(value: object) -> float:
    """0.9, "0.9" or "90%" -> 0.9; must lie in 0..1."""
    out: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = float(value)
    elif isinstance(value, str):
        text = value.strip()
        scale = 100.0 if text.endswith("%") else 1.0
        try:
            out = float(text.rstrip("%").strip()) / scale
        except ValueError:
            out = None
    if out is None:
        raise ValueError("expected a fraction like 0.9 or '90%'")
    finite(out, "a fraction like 0.9 or '90%'")
    if not 0.0 <= out <= 1.0:
        raise ValueError("must lie between 0 and 1 (0% and 100%)")
    return out


def split_address(value: str) -> tuple[str, int]:
    """ "127.0.0.1:9808" -> ("127.0.0.1", 9808); "[::1]:9808" -> ("::1", 9808). Raises ValueError."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ValueError("expected HOST:PORT, e.g. '127.0.0.1:9808' or '[::1]:9808' (port 0 = any free port)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c in host for c in "[]/ "):
        raise ValueError("expected HOST:PORT, e.g. '127.0.0.1:9808' or '[::1]:9808'")
    return host, int(port)


def parse_listen_address(value: object) -> str:
    """HOST:PORT to listen on, or "off"."""
    if isinstance(value, str) and value.strip().lower() == "off":
        return "off"
    if not isinstance(value, str):
        raise ValueError("expected HOST:PORT (e.g. '127.0.0.1:9808') or 'off'")
    split_address(value)
    return value.strip()


def parse_address_list(value: object) -> tuple[str, ...]:
    """A list of HOST:PORT (TOML array, or comma-separated text from the environment or --set)."""
    if isinstance(value, str):
        items: list[object] = [v for v in (x.strip() for x in value.split(",")) if v]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError('expected a list of HOST:PORT, e.g. ["10.0.0.1:7946", "10.0.0.2:7946"]')
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{item!r}: expected HOST:PORT text")
        try:
            split_address(item)
        except ValueError as e:
            raise ValueError(f"{item!r}: {e}") from None
        out.append(item.strip())
    return tuple(out)
