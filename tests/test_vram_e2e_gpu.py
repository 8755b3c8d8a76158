"""L1 end to end on a GPU: a real daemon with `[vram] enabled = true` and engine processes with CUDA
torch. One engine stores pages with `store_cuda` (GPU to GPU into the daemon's pool), another loads
them with `load_into_cuda`, byte-exact; a small pool under pressure demotes to DRAM and every page
still loads byte-exact; an engine SIGKILLed with L1 reservations and a lease leaks nothing.

Skipped with the reason where no CUDA device answers (these build machines) or the Python has no
CUDA torch (the engine side needs it). Run by scripts/gpu-check.sh (docs/HARDWARE.md):

    python -m pytest -m gpu tests/test_vram_e2e_gpu.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, clean_env, skip_without_cuda_torch, wait_for

pytestmark = pytest.mark.gpu

# An engine process: attaches with vram=True, then runs one op on the pages of chain `seed`
# (content: page_bytes_for, so every process can check what it reads) and reports JSON lines.
ENGINE = r"""
import json, sys, torch
from polarkvd.client import EngineClient
from tests.conftest import TEST_NS, chain_tokens, page_bytes_for

spec = json.loads(sys.argv[1])
out = lambda **kw: print(json.dumps(kw), flush=True)
kv = EngineClient(TEST_NS, spec["id"], spec["socket"], vram=True)
out(event="attached", vram=kv.vram)
dev = torch.device("cuda")
for seed in spec["seeds"]:
    keys = kv.page_keys(chain_tokens(seed, spec["pages"]))
    pages = [torch.from_numpy(page_bytes_for(k, kv.page_bytes)).to(dev) for k in keys]
    if spec["op"] == "store":
        r = kv.store_cuda(keys, pages)
        out(event="stored", stored=r.stored, tiers=list(kv.lookup(keys).tier_codes))
    elif spec["op"] == "load":
        outs = [torch.zeros(kv.page_bytes, dtype=torch.uint8, device=dev) for _ in keys]
        n = kv.load_into_cuda(keys, outs)
        out(event="loaded", n=n, bad=[i for i, (a, b) in enumerate(zip(outs, pages)) if not torch.equal(a, b)])
    elif spec["op"] == "hold":  # reserve in L1 without committing, pin the pages, wait to be killed
        kv.store_cuda(keys[: len(keys) // 2], pages[: len(keys) // 2])
        offsets, tiers = kv.reserve_tiers(keys[len(keys) // 2 :], keys[len(keys) // 2 - 1])
        lease = kv.lookup(keys[: len(keys) // 2], pin=True).lease
        out(event="holding", tiers=list(tiers), lease=lease)
        sys.stdin.read()
"""


@pytest.fixture(autouse=True)
def need_gpu() -> None:
    skip_without_cuda_torch("engines need CUDA torch for store_cuda/load_into_cuda")


def engine(
    d: Any, op: str, seeds: list[int], pages: int = 8, engine_id: str = "gpu"
) -> subprocess.Popen[str]:
    spec = {"id": engine_id, "socket": str(d.engine_socket), "op": op, "seeds": seeds, "pages": pages}
    return subprocess.Popen(
        [sys.executable, "-c", ENGINE, json.dumps(spec)],
        cwd=REPO_ROOT, env=clean_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def run(p: subprocess.Popen[str]) -> list[dict[str, Any]]:
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    return [json.loads(line) for line in out.splitlines()]


def l1_daemon(daemon_factory: Any, capacity: str = "64MiB") -> Any:
    return daemon_factory({"vram.enabled": "true", "vram.capacity": capacity, "vram.slab_bytes": "1MiB"})


def test_one_engine_stores_in_l1_another_loads_gpu_to_gpu(daemon_factory) -> None:
    d = l1_daemon(daemon_factory)
    assert "L1 pool allocated" in d.log()
    stored = run(engine(d, "store", [1], engine_id="writer"))
    assert stored[0] == {"event": "attached", "vram": True}
    assert stored[1]["stored"] == 8 and stored[1]["tiers"] == [1] * 8  # in L1, seen from the table
    loaded = run(engine(d, "load", [1], engine_id="reader"))
    assert loaded[1] == {"event": "loaded", "n": 8, "bad": []}
    st = d.stats()
    assert st["tiers"]["vram"]["pages"] == 8 and st["counters"]["loaded_pages_vram"] == 8
    assert st["counters"]["stored_pages_vram"] == 8


def test_a_small_pool_demotes_to_dram_and_every_page_stays_exact(daemon_factory) -> None:
    d = l1_daemon(daemon_factory, "1MiB")  # 32 pages of 32 KiB
    run(engine(d, "store", [1, 2, 3, 4], pages=20))
    wait_for(lambda: d.stats()["counters"].get("demoted_pages_vram", 0) > 0, what="a demotion to DRAM")
    st = d.stats()
    assert st["tiers"]["vram"]["pages"] <= 32 and st["tiers"]["dram"]["pages"] > 0
    assert st["tiers"]["vram"]["pages"] + st["tiers"]["dram"]["pages"] == 80
    loaded = run(engine(d, "load", [1, 2, 3, 4], pages=20, engine_id="reader"))
    assert [x["n"] for x in loaded[1:]] == [20] * 4 and all(x["bad"] == [] for x in loaded[1:])


def test_a_sigkilled_engine_leaks_no_l1_slot_or_pin(daemon_factory) -> None:
    d = l1_daemon(daemon_factory)
    p = engine(d, "hold", [5])
    assert p.stdout is not None
    assert json.loads(p.stdout.readline())["event"] == "attached"
    held = json.loads(p.stdout.readline())
    assert held["tiers"] == [1] * 4 and held["lease"] is not None
    st = d.stats()["tiers"]["vram"]
    assert st["reserved_pages"] == 4 and st["pinned_pages"] == 4
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    wait_for(lambda: d.stats()["tiers"]["vram"]["reserved_pages"] == 0, what="the session to be dropped")
    st = d.stats()["tiers"]["vram"]
    assert st["pinned_pages"] == 0 and st["pages"] == 4 and st["slot_bytes_used"] == 4 * 32 * 1024
    loaded = run(engine(d, "load", [5], pages=4, engine_id="after"))
    assert loaded[1] == {"event": "loaded", "n": 4, "bad": []}
