"""L1 bandwidth on a real GPU: page copies inside the VRAM pool (device to device), demotion into a
pinned DRAM-arena-like mapping (device to host) and promotion from it (host to device), against the
same copies through pageable memory and a host memcpy of the same bytes.

    python -m polarkvd.bench.vram [--pool 2GiB] [--host 1GiB] [--page 8MiB] [--repeat 5] [--json]
    python -m polarkvd.bench.vram --probe      # only the `vram: ...` line and the device

Standard library only (plus polarkvd.tiers.vram), so it runs on a bare GPU host with this checkout on
PYTHONPATH; scripts/gpu-check.sh runs it. Pages go to scattered slots (a fixed permutation), so
every page is its own copy, as in the daemon: nothing merges into one large memcpy. Each batch is
timed with CUDA events around the stream and by the wall clock around enqueue + one sync; the table
shows the wall clock (what a caller waits for) and the median of the repeats.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from polarkvd.config import VramConfig
from polarkvd.config.values import format_size, parse_size
from polarkvd.cuda import CopyKind, load_api
from polarkvd.tiers.vram import HostRegion, VramPool, describe_choice, probe


def host_mapping(size: int) -> tuple[mmap.mmap, str]:
    """A MAP_SHARED mapping of a tmpfs file, as the DRAM arena is (polarkvd/wire/arena.py), or an
    anonymous shared mapping where /dev/shm is too small (containers often give it 64 MB); and which."""
    if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 2 * size:
        fd, path = tempfile.mkstemp(prefix="polarkv-vram-", dir="/dev/shm")
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
            return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE), "a /dev/shm file"
        finally:
            os.close(fd)
            os.unlink(path)
    return mmap.mmap(-1, size, mmap.MAP_SHARED), "anonymous shared memory (/dev/shm too small)"


def _scatter(n: int) -> list[int]:
    """A fixed permutation of range(n) with no two neighbours adjacent (so no copies merge)."""
    step = next(s for s in (7, 11, 13, 17, 19, 23, 29, 31) if n % s)
    return [(i * step) % n for i in range(n)] if n > 2 else list(range(n))[::-1]


def _measure(pool: VramPool, kind: CopyKind, run: Any, repeat: int) -> tuple[float, float]:
    """(median wall seconds, median event seconds) of `run()` over `repeat` runs after one warm-up."""
    api = pool.api
    start, end = api.event_create(), api.event_create()
    walls, gpu = [], []
    try:
        run()
        for _ in range(repeat):
            api.event_record(start, pool.stream)
            t0 = time.perf_counter()
            run()  # enqueues every copy, then one stream sync
            walls.append(time.perf_counter() - t0)
            api.event_record(end, pool.stream)
            api.event_sync(end)
            gpu.append(api.event_elapsed_ms(start, end) / 1000)
    finally:
        api.event_destroy(start)
        api.event_destroy(end)
    return statistics.median(walls), statistics.median(gpu)


def run_bench(pool_bytes: int, host_bytes: int, page: int, repeat: int, cuda_api: str) -> dict[str, Any]:
    choice = probe(VramConfig(enabled=True, capacity=pool_bytes, slab_bytes=page, cuda_api=cuda_api))
    if not choice.enabled or choice.device is None:
        raise SystemExit(describe_choice(choice))
    api = load_api(cuda_api)
    pool = VramPool(api, choice.device.index, pool_bytes, page)
    mm, host_kind = host_mapping(host_bytes)
    rows: list[dict[str, Any]] = []
    try:
        n = min(pool_bytes // page // 2, host_bytes // page)
        if n < 2:
            raise SystemExit(
                f"pool {pool_bytes} and host {host_bytes} must each hold at least 2 pages of {page}"
            )
        slots = [s for s in (pool.alloc(page) for _ in range(2 * n)) if s is not None]
        if len(slots) < 2 * n:
            raise SystemExit(f"the pool has no room for {2 * n} pages of {page} bytes")
        src, dst = slots[:n], slots[n:]
        perm = _scatter(n)
        moved = n * page
        seed = os.urandom(page)
        for i in range(n):  # every page distinct (its index in front), to check where each one lands
            mm[i * page : (i + 1) * page] = i.to_bytes(8, "little") + seed[8:]
        host_pinned = HostRegion(api, mm, pin=True)
        host_pageable = HostRegion(api, mm, pin=False)
        try:
            h2d = [(perm[i] * page, src[i], page) for i in range(n)]
            d2d = [(src[i], dst[perm[i]], page) for i in range(n)]
            d2h = [(dst[i], perm[i] * page, page) for i in range(n)]
            cases = [
                (
                    "H2D pinned arena -> pool (promotion)",
                    CopyKind.H2D,
                    lambda: pool.from_host(host_pinned, h2d),
                ),
                ("D2D inside the pool", CopyKind.D2D, lambda: pool.copy_within(d2d)),
                ("D2H pool -> pinned arena (demotion)", CopyKind.D2H, lambda: pool.to_host(host_pinned, d2h)),
                ("H2D pageable -> pool", CopyKind.H2D, lambda: pool.from_host(host_pageable, h2d)),
                ("D2H pool -> pageable", CopyKind.D2H, lambda: pool.to_host(host_pageable, d2h)),
            ]
            for label, kind, fn in cases:
                wall, gpu = _measure(pool, kind, fn, repeat)
                rows.append({"path": label, "bytes": moved, "pages": n, "wall_s": wall, "gpu_s": gpu})
                if kind is CopyKind.D2H and not rows[-1].get("checked"):
                    # host page j went H2D to src[perm^-1 j], D2D to dst[j], D2H to host page perm[j]
                    bad = [
                        j for j in range(n)
                        if mm[perm[j] * page : (perm[j] + 1) * page] != j.to_bytes(8, "little") + seed[8:]
                    ]  # fmt: skip
                    if bad:
                        raise SystemExit(f"{label}: pages {bad[:10]} differ after H2D, D2D, D2H")
                    rows[-1]["checked"] = True
                    for i in range(n):  # back to the starting layout for the pageable round
                        mm[i * page : (i + 1) * page] = i.to_bytes(8, "little") + seed[8:]
        finally:
            host_pinned.close()
            host_pageable.close()
        buf = (ctypes.c_char * host_bytes).from_buffer(mm)
        base = ctypes.addressof(buf)
        half = host_bytes // 2 // page * page
        k = min(n, half // page)
        order = _scatter(k)
        walls = []
        for _ in range(repeat + 1):
            t0 = time.perf_counter()
            for i in range(k):
                ctypes.memmove(base + half + order[i] * page, base + i * page, page)
            walls.append(time.perf_counter() - t0)
        del buf
        wall = statistics.median(walls[1:])
        rows.append(
            {"path": "host memcpy (one thread)", "bytes": k * page, "pages": k, "wall_s": wall, "gpu_s": None}
        )
    finally:
        pool.close()
        mm.close()
    return {
        "device": choice.as_dict(),
        "host_memory": host_kind,
        "page_bytes": page,
        "repeat": repeat,
        "rows": rows,
    }


def render(result: dict[str, Any]) -> str:
    d = result["device"]
    lines = [
        d["line"] + f" [{d['api']} api: {d['library']}, {d['version']}]",
        f"pages of {format_size(result['page_bytes'])}, median of {result['repeat']}; host memory: {result['host_memory']}",
        "",
        f"{'path':<40}{'batch':>10}{'pages':>7}{'wall ms':>10}{'GB/s':>9}{'GPU GB/s':>10}",
    ]
    for r in result["rows"]:
        gbs = r["bytes"] / r["wall_s"] / 1e9
        gpu = f"{r['bytes'] / r['gpu_s'] / 1e9:>10.1f}" if r["gpu_s"] else f"{'-':>10}"
        lines.append(
            f"{r['path']:<40}{format_size(r['bytes']):>10}{r['pages']:>7}{r['wall_s'] * 1000:>10.2f}{gbs:>9.1f}{gpu}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m polarkvd.bench.vram", description=__doc__.splitlines()[0])
    ap.add_argument("--pool", default="2GiB", help="VRAM pool size (default 2GiB)")
    ap.add_argument("--host", default="1GiB", help="pinned host mapping size (default 1GiB)")
    ap.add_argument("--page", default="8MiB", help="page size (default 8MiB)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cuda-api", default="auto", choices=("auto", "driver", "runtime"))
    ap.add_argument("--probe", action="store_true", help="only print the probe's line and device")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.probe:
        choice = probe(VramConfig(enabled=True, capacity=parse_size(args.pool), cuda_api=args.cuda_api))
        print(json.dumps(choice.as_dict(), indent=2) if args.json else describe_choice(choice))
        if choice.device is not None:
            print(f"  uuid {choice.device.uuid}, compute capability {choice.device.compute_capability}, "
                  f"{format_size(choice.device.total_bytes)}, {choice.api} api: {choice.library} ({choice.version})")  # fmt: skip
        return 0 if choice.enabled else 1
    result = run_bench(
        parse_size(args.pool), parse_size(args.host), parse_size(args.page), args.repeat, args.cuda_api
    )
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
