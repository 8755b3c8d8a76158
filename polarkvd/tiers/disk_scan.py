"""The disk tier's directory read at open: the index snapshot reconciled with the page files.

Owns the scan: which files are trusted (listed in the snapshot, with its size), recovered (unlisted,
header verified) or deleted (temp files, bad headers, every page when the seed is refused). It does
not admit pages to the index or lock the directory (`DiskTier.open` does).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from polarkvd.tiers.disk_format import (
    INDEX_NAME,
    PAGE_RE,
    SUBDIR_RE,
    TMP_SUFFIX,
    Row,
    delete_leftover,
    header_row,
    load_snapshot,
    stored_size,
)

log = logging.getLogger("polarkvd.tiers.disk")


def reconcile(
    path: Path, made_dirs: set[str], refuse: bool = False
) -> tuple[dict[bytes, Row] | None, int, list[Row], list[Row]]:
    """Match the snapshot against the files: (snapshot, dropped, trusted rows, recovered rows).
    `made_dirs` gets the subdirectories found.
    `refuse`: delete every page file instead (counted in `dropped`) and ignore the snapshot."""
    if refuse:
        return None, delete_pages(path, made_dirs), [], []
    snapshot = load_snapshot(path)
    rows = snapshot or {}
    dropped = 0
    trusted_keys: set[bytes] = set()
    unlisted: list[tuple[float, str]] = []  # files the snapshot does not vouch for
    for sub in os.scandir(path):
        if sub.name.startswith(INDEX_NAME) and sub.name.endswith(TMP_SUFFIX):
            dropped += delete_leftover(sub.path)  # a snapshot write cut short
        if not (sub.is_dir(follow_symlinks=False) and SUBDIR_RE.fullmatch(sub.name)):
            continue
        made_dirs.add(sub.name)
        for f in os.scandir(sub.path):
            if f.name.endswith(TMP_SUFFIX):
                dropped += delete_leftover(f.path)  # a write cut short by a crash
            elif PAGE_RE.fullmatch(f.name) and f.name.startswith(sub.name):
                key = bytes.fromhex(f.name[:32])
                st = f.stat(follow_symlinks=False)
                row = rows.get(key)
                if row is not None and row[4] == stored_size(st.st_size):
                    trusted_keys.add(key)
                else:
                    unlisted.append((st.st_mtime, f.path))
            else:
                log.warning("disk tier: ignoring unknown file %s", f.path)
    unlisted_keys = {bytes.fromhex(os.path.basename(p)[:32]) for _, p in unlisted}
    dropped += sum(1 for key in rows if key not in trusted_keys and key not in unlisted_keys)
    recovered: list[Row] = []
    for _, file in sorted(unlisted):  # oldest first: recency order for the policy
        row = header_row(file)
        if row is None:
            dropped += delete_leftover(file)
        else:
            recovered.append(row)
    trusted = [row for key, row in rows.items() if key in trusted_keys]  # snapshot = eviction order
    return snapshot, dropped, trusted, recovered


def delete_pages(path: Path, made_dirs: set[str]) -> int:
    """Delete every page file, temp file and the snapshot, quietly (the caller logs once);
    returns how many pages went."""

    def unlink(path: str | Path) -> int:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return 0
        return 1

    deleted = 0
    unlink(path / INDEX_NAME)
    for sub in os.scandir(path):
        if sub.name.startswith(INDEX_NAME) and sub.name.endswith(TMP_SUFFIX):
            unlink(sub.path)
        if not (sub.is_dir(follow_symlinks=False) and SUBDIR_RE.fullmatch(sub.name)):
            continue
        made_dirs.add(sub.name)
        for f in os.scandir(sub.path):
            if f.name.endswith(TMP_SUFFIX):
                unlink(f.path)
            elif PAGE_RE.fullmatch(f.name):
                deleted += unlink(f.path)
    return deleted
