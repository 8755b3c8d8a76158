"""What the engine connectors fingerprint a model's weight files with: their size and a few sampled
chunks, so copies of the same files at other paths name the same model and fine-tunes do not,
without reading gigabytes at start."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def sample_file(h: Any, path: Path, samples: int = 16, chunk: int = 64 * 1024) -> None:
    """Feed a file's size and `samples` evenly spaced chunks (first and last included) into `h`."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        if size <= samples * chunk:
            h.update(f.read())
            return
        step = (size - chunk) // (samples - 1)
        for i in range(samples):
            f.seek(i * step)
            h.update(f.read(chunk))
