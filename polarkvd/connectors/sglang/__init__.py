"""SGLang HiCache storage backend: SGLang's L3 pages kept by polarkvd, shared across processes and hosts.

Start SGLang with

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name":"polarkv",
        "module_path":"polarkvd.connectors.sglang","class_name":"PolarKVStorage","interface_v1":1}'

(polarkvd's options go in the same object: `Options`, docs/SGLANG.md).

What it owns: turning SGLang's storage calls into daemon calls. `batch_exists` is the daemon's lookup
(answered from the lookup table in shared memory, asking the daemon only about pages on peers);
`batch_get_v1` loads pages (promoting disk pages, fetching peers' pages) and copies them into SGLang's
host pool; `batch_set_v1` reserves, copies in and commits. Bytes move by memmove between the host
pool's buffers (`get_page_buffer_meta`) and the daemon's shared-memory arena. Hybrid models' extra
pools (Mamba states, ...) go through the v2 calls, each pool in a namespace of its own.

What it must not do: raise into SGLang's storage threads or return None from the v1 calls (a daemon
problem is a miss, and the link reconnects by itself); store pages of one model, shard, layout or
page size where another can read them (all of that is in the namespace, hence in every key; SGLang's
own key chain carries `cache_salt` and the extra key); import the daemon (only `polarkvd.client`,
`polarkvd.wire` and the leaves).

Modules: `options` (the extra-config keys), `geometry` (namespace, page plan, refused shapes), `link`
(sessions per thread, outages), `storage` (`PolarKVStorage`). Only `PolarKVStorage` imports SGLang,
when first asked for (SGLang's factory does `getattr(module, class_name)`).
"""

from __future__ import annotations

from typing import Any

from polarkvd.connectors.sglang.geometry import PagePlan, model_fingerprint, plan_pages
from polarkvd.connectors.sglang.options import Options

__all__ = ["Options", "PagePlan", "PolarKVStorage", "model_fingerprint", "plan_pages"]


def __getattr__(name: str) -> Any:
    if name == "PolarKVStorage":
        from polarkvd.connectors.sglang.storage import PolarKVStorage

        return PolarKVStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
