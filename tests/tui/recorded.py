"""A recorded daemon state for snapshot tests: real `stats`/`get_knobs`/`top` shapes, fixed numbers."""

from __future__ import annotations

import math

from polarkvd.tui.model import View

MiB = 1 << 20
PAGE = 5_898_240  # a 256-token page of a 30-layer, 3-KV-head, 64-dim bf16 model
UPDATED = 1_764_000_000.0  # a fixed wall-clock time: the status line shows 16:00:00 UTC

STATS = {
    "uptime_s": 3723.4,
    "draining": False,
    "tiers": {
        "dram": {
            "tier": 2, "pages": 286, "bytes": 286 * PAGE, "reserved_pages": 2, "quarantined_pages": 0,
            "slot_bytes_used": 288 * PAGE, "capacity_bytes": 2048 * MiB, "policy": "s3fifo",
            "pinned_pages": 4, "operator_pinned_pages": 12, "high_watermark": 0.9, "low_watermark": 0.75,
        },
        "disk": {
            "tier": 4, "pages": 1900, "bytes": 7_654 * MiB, "raw_bytes": 1900 * PAGE,
            "capacity_bytes": 16_384 * MiB, "policy": "lru", "evictions": 310, "corrupt_dropped": 0,
            "pending_pages": 3, "pending_bytes": 3 * PAGE, "write_through": False, "write_through_bytes": 0,
            "path": "/var/lib/polarkv/pages",
        },
    },
    "counters": {
        "lookups": 48_210, "lookup_pages": 1_210_400, "hit_pages_dram": 702_300, "hit_pages_disk": 118_900,
        "miss_pages": 389_200, "stored_pages": 52_100, "stored_bytes": 52_100 * PAGE, "loaded_pages": 790_000,
        "loaded_bytes": 790_000 * PAGE, "evicted_pages_dram_capacity": 49_800,
        "evicted_pages_dram_watermark": 1_400, "demoted_pages": 50_900, "written_through_pages": 0,
        "not_admitted_pages": 2_310,
    },
    "sessions": [
        {"id": 3, "engine_id": "vllm-0", "model": "smollm2-135m@9b1c", "page_bytes": PAGE, "cache_salt": False,
         "reserved_pages": 2, "leases": 1, "lookup_pages": 800_000, "hit_pages": 560_000, "stored_pages": 30_000,
         "loaded_pages": 530_000},
        {"id": 7, "engine_id": "vllm-1", "model": "smollm2-135m@9b1c", "page_bytes": PAGE, "cache_salt": False,
         "reserved_pages": 0, "leases": 0, "lookup_pages": 400_000, "hit_pages": 255_000, "stored_pages": 20_000,
         "loaded_pages": 250_000},
        {"id": 9, "engine_id": "sglang-a", "model": "llama-3.1-8b@77aa", "page_bytes": 4 * PAGE, "cache_salt": True,
         "reserved_pages": 0, "leases": 0, "lookup_pages": 10_400, "hit_pages": 6_200, "stored_pages": 2_100,
         "loaded_pages": 10_000},
    ],
    "leases": 1,
    "namespaces": 2,
    "namespace_stats": [
        {"model": "smollm2-135m@9b1c", "page_tokens": 256, "page_bytes": PAGE, "cache_salt": False, "sessions": 2,
         "lookup_pages": 1_200_000, "hit_pages": 815_000, "stored_pages": 50_000, "loaded_pages": 780_000},
        {"model": "llama-3.1-8b@77aa", "page_tokens": 256, "page_bytes": 4 * PAGE, "cache_salt": True, "sessions": 1,
         "lookup_pages": 10_400, "hit_pages": 6_200, "stored_pages": 2_100, "loaded_pages": 10_000},
    ],
    "quotas": {
        "default_dram": 0, "default_disk": 0, "tenants_not_shown": 0,
        "tenants": [
            {"tenant": "-", "listed": False, "namespaces": 1, "dram_bytes": 250 * PAGE, "dram_quota": 0,
             "disk_bytes": 6_800 * MiB, "disk_quota": 0, "evicted_pages_dram": 0, "evicted_pages_disk": 0},
            {"tenant": "acme", "listed": True, "namespaces": 1, "dram_bytes": 36 * PAGE, "dram_quota": 36 * PAGE,
             "disk_bytes": 854 * MiB, "disk_quota": 1024 * MiB, "evicted_pages_dram": 1_210,
             "evicted_pages_disk": 0},
        ],
    },
    "tuning_file": "/var/lib/polarkv/tuning.toml",
}  # fmt: skip

KNOBS = {
    "daemon.log_level": "info",
    "daemon.lease_seconds": 30.0,
    "dram.policy": "s3fifo",
    "dram.high_watermark": 0.9,
    "dram.low_watermark": 0.75,
    "dram.min_prefix_pages": 2,
    "disk.policy": "lru",
    "disk.write_through": False,
}

TOP = {
    "namespaces": [
        {**STATS["namespace_stats"][0], "dram_pages": 250, "dram_bytes": 250 * PAGE, "disk_pages": 1700,
         "disk_bytes": 6_800 * MiB},
        {**STATS["namespace_stats"][1], "dram_pages": 36, "dram_bytes": 36 * PAGE, "disk_pages": 200,
         "disk_bytes": 854 * MiB},
    ],
    "prefixes": [
        {"key": bytes.fromhex("5f3a9c0e11d2" + "00" * 10), "model": "smollm2-135m@9b1c", "pages": 96,
         "bytes": 96 * PAGE, "pinned_pages": 12, "hits": 40_210},
        {"key": bytes.fromhex("a1b2c3d4e5f6" + "11" * 10), "model": "smollm2-135m@9b1c", "pages": 64,
         "bytes": 64 * PAGE, "pinned_pages": 0, "hits": 3_100},
        {"key": bytes.fromhex("0badcafe0042" + "22" * 10), "model": "llama-3.1-8b@77aa", "pages": 9,
         "bytes": 36 * PAGE, "pinned_pages": 0, "hits": 55_000},
        {"key": bytes.fromhex("77e0f00d1234" + "33" * 10), "model": "smollm2-135m@9b1c", "pages": 30,
         "bytes": 30 * PAGE, "pinned_pages": 0, "hits": 12},
    ],
    "prefix_count": 41,
}  # fmt: skip


def _wave(n: int, base: float, amp: float, period: float) -> tuple[float, ...]:
    return tuple(round(base + amp * math.sin(i / period), 3) for i in range(n))


SERIES = {
    "lookups": _wave(300, 14.0, 6.0, 9.0),
    "lookup_pages": _wave(300, 350.0, 120.0, 9.0),
    "hit_pages": _wave(300, 240.0, 100.0, 11.0),
    "stored_bytes": _wave(300, 60e6, 40e6, 7.0),
    "loaded_bytes": _wave(300, 1.3e9, 0.5e9, 13.0),
}

SOCKET = "/run/polarkv/control.sock"

VIEW = View(socket=SOCKET, connected=True, stats=STATS, knobs=KNOBS, top=TOP, series=SERIES, updated=UPDATED)
DISCONNECTED = View(
    socket=SOCKET,
    connected=False,
    stats=STATS,
    knobs=KNOBS,
    top=TOP,
    series={},
    updated=UPDATED,
    error=f"cannot reach polarkvd at {SOCKET}: Connection refused (is `polarkvd serve` running?)",
    retry_in=2.0,
)
