"""Group commit (write-through): durable writes batched per window over a real disk tier; a page's
future is True only once its file, its name and its directory are synced (or its file system)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from polarkvd.tiers.disk import DiskTier
from polarkvd.tiers.group_commit import GroupCommit
from tests.tiers.test_disk import NS, PAGE, key, open_tier, page_bytes, page_file, read


def submit_all(gc: GroupCommit, keys: list[bytes]) -> list[asyncio.Future[bool]]:
    return [gc.submit(k, None, NS, page_bytes(k), 2) for k in keys]


def run(coro_fn: Any) -> Any:
    return asyncio.run(coro_fn())


@pytest.mark.parametrize("sync", ["files", "filesystem"])
def test_pages_of_one_window_are_written_and_synced_as_one_batch(tmp_path: Path, sync: str) -> None:
    tier = open_tier(tmp_path)
    gc = GroupCommit(tier, threads=2, window=lambda: 0.05, sync=lambda: sync)
    keys = [key(i) for i in range(12)]

    async def go() -> list[bool]:
        futs = submit_all(gc, keys[:6])
        await asyncio.sleep(0)  # other commits join while the window is open
        futs += submit_all(gc, keys[6:])
        out = list(await asyncio.gather(*futs))
        await gc.close()
        return out

    try:
        assert run(go) == [True] * 12
        assert gc.stats.batches == 1 and gc.stats.pages == 12 and gc.stats.failed_pages == 0
        # a file sync per page and one per directory (not per page), or one for everything
        assert gc.stats.syncs == (12 + len({k[:1] for k in keys}) if sync == "files" else 1)
        assert all(read(tier, k) == page_bytes(k) for k in keys)
    finally:
        gc.shutdown()
        tier.close()


def test_a_full_batch_is_written_without_waiting_for_its_window(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    gc = GroupCommit(tier, threads=2, window=lambda: 3600.0, max_batch_bytes=2 * PAGE)

    async def go() -> None:
        futs = submit_all(gc, [key(1), key(2)])
        assert await asyncio.wait_for(asyncio.gather(*futs), 30) == [True, True]
        late = submit_all(gc, [key(3)])[0]
        await asyncio.sleep(0.05)
        assert not late.done()  # alone in its window
        await gc.close()  # the daemon stopping writes the open batch at once
        assert late.result() is True

    try:
        run(go)
        assert gc.stats.batches == 2
    finally:
        gc.shutdown()
        tier.close()


def test_file_then_directory_are_synced_before_the_page_counts_as_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order a power loss needs (it cannot be produced here, so the real calls are watched)."""
    tier = open_tier(tmp_path)
    events: list[tuple[str, str]] = []
    real_fdatasync, real_fsync, real_replace = os.fdatasync, os.fsync, os.replace

    def fdatasync(fd: int) -> None:
        real_fdatasync(fd)
        events.append(("data synced", os.readlink(f"/proc/self/fd/{fd}")))

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("fsynced", os.readlink(f"/proc/self/fd/{fd}")))

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        events.append(("renamed", f"{src} -> {dst}"))

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    gc = GroupCommit(tier, threads=2, window=lambda: 0.0)
    k = key(7)

    async def go() -> None:
        fut = gc.submit(k, None, NS, page_bytes(k), 2)
        fut.add_done_callback(lambda f: events.append(("durable", str(f.result()))))
        await fut

    try:
        run(go)
    finally:
        gc.shutdown()
        tier.close()
    final = str(page_file(tmp_path, k))
    mine = [e for e in events if k.hex() in e[1] or e[1] == os.path.dirname(final) or e[0] == "durable"]
    assert [e[0] for e in mine] == ["renamed", "data synced", "fsynced", "durable"], events
    assert mine[0][1].endswith(f" -> {final}") and mine[1][1] == final
    assert mine[2][1] == os.path.dirname(final) and mine[3][1] == "True"
    # the directory was new: its own name in the tier's root is synced too
    assert events.index(("fsynced", str(tmp_path))) < events.index(mine[3])


def test_a_page_the_disk_cannot_take_is_not_durable(tmp_path: Path) -> None:
    tier = open_tier(tmp_path, capacity=PAGE // 2)  # smaller than one (compressed) page
    gc = GroupCommit(tier, threads=1, window=lambda: 0.0)

    async def go() -> list[bool]:
        return list(await asyncio.gather(*submit_all(gc, [key(1), key(2)])))

    try:
        assert run(go) == [False, False]
        assert gc.stats.failed_pages == 2 and len(tier) == 0
    finally:
        gc.shutdown()
        tier.close()


def test_a_page_already_written_back_is_synced_not_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier: DiskTier = open_tier(tmp_path)
    gc = GroupCommit(tier, threads=1, window=lambda: 0.0)
    k = key(3)
    try:
        assert tier.put(k, None, NS, page_bytes(k), 2)  # a demotion: written, not synced
        synced: list[str] = []
        real = os.fdatasync

        def fdatasync(fd: int) -> None:
            real(fd)
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))

        monkeypatch.setattr(os, "fdatasync", fdatasync)

        async def go() -> bool:
            return await gc.submit(k, None, NS, page_bytes(k), 2)

        assert run(go) is True
        assert synced == [str(page_file(tmp_path, k))]
        assert tier.stats().puts == 1  # not written twice
    finally:
        gc.shutdown()
        tier.close()
