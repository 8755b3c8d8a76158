"""`polarkvd bench cluster`'s Mooncake side: run with Mooncake's venv's Python as a script
(`cluster_mooncake.py --mooncake-driver CFG`), it starts Mooncake's master and a holder process and
measures `batch_get_into` on command, one JSON line per answer. It imports only the standard library,
the rig (polarkvd.bench.cluster_rig) and Mooncake: that venv has no polarkvd dependencies."""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from polarkvd.bench.cluster_rig import (
    Cursor,
    DataFile,
    Sample,
    cpu_meter,
    die_with_parent,
    free_ports,
    map_file,
    read_json_line,
    run_parallel,
    wait_port,
)

MOONCAKE_PKG = "mooncake-transfer-engine-non-cuda"


def _mooncake_holder(cfg: dict[str, Any]) -> int:
    """`--mooncake-holder`: lends its DRAM segment to the store until its stdin closes."""
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    rc = store.setup(cfg["host"], cfg["metadata"], cfg["holder_bytes"], 64 << 20, "tcp", "", cfg["master"])
    print(json.dumps({"ready": rc == 0, "rc": rc}), flush=True)
    if rc == 0:
        sys.stdin.read()
    return 0 if rc == 0 else 1


def _mooncake_driver(cfg: dict[str, Any]) -> int:
    """`--mooncake-driver`: master + holder (children of this process, in its process group) and a
    client here that measures `batch_get_into` on command. One JSON line per answer."""

    def say(obj: dict[str, Any]) -> None:
        print(json.dumps(obj), flush=True)

    try:
        from importlib.metadata import version

        from mooncake.store import MooncakeDistributedStore
    except Exception as e:  # a missing shared library shows here
        say({"error": f"import mooncake.store: {e}"})
        return 1
    data = DataFile.from_layout(cfg["data"], cfg["layout"])
    venv, work = Path(cfg["venv"]), Path(cfg["workdir"])
    rpc, http, holder_port, client_port = free_ports(4)
    procs: list[subprocess.Popen[Any]] = []
    logs = []
    try:
        mlog = open(work / "mooncake-master.log", "w")  # noqa: SIM115
        logs.append(mlog)
        procs.append(subprocess.Popen(
            [str(venv / "bin" / "mooncake_master"), "--rpc_address=127.0.0.1", f"--rpc_port={rpc}",
             "--enable_http_metadata_server=true", "--http_metadata_server_host=127.0.0.1",
             f"--http_metadata_server_port={http}"], stdin=subprocess.DEVNULL, stdout=mlog, stderr=mlog,
            preexec_fn=die_with_parent))  # fmt: skip
        wait_port(rpc, procs[0], 60, "mooncake_master")
        wait_port(http, procs[0], 60, "mooncake_master metadata server")
        common = {"metadata": f"http://127.0.0.1:{http}/metadata", "master": f"127.0.0.1:{rpc}"}
        hcfg = dict(common, host=f"127.0.0.1:{holder_port}", holder_bytes=cfg["holder_bytes"])
        hlog = open(work / "mooncake-holder.log", "w")  # noqa: SIM115
        logs.append(hlog)
        holder = subprocess.Popen([sys.executable, __file__, "--mooncake-holder", json.dumps(hcfg)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=hlog, text=True,
                                  preexec_fn=die_with_parent)  # fmt: skip
        procs.append(holder)
        if not read_json_line(holder, 120, "mooncake holder", work / "mooncake-holder.log").get("ready"):
            raise RuntimeError("mooncake holder: setup failed")
        store = MooncakeDistributedStore()
        rc = store.setup(
            f"127.0.0.1:{client_port}", common["metadata"], 0, 64 << 20, "tcp", "", common["master"]
        )
        if rc != 0:
            raise RuntimeError(f"mooncake client setup returned {rc}")
        src = map_file(data.path)
        for ps in data.sets:
            for i in range(ps.npages):
                off, n = ps.span(i, 1)
                rc = store.put(f"p{ps.size}-{i}", src[off : off + n])
                if rc != 0:
                    raise RuntimeError(f"mooncake put returned {rc}")
        biggest = max(ps.size for ps in data.sets)
        # Destination: page-aligned anonymous memory registered with the transfer engine (its zero-copy path).
        dest = mmap.mmap(-1, biggest * int(cfg["pages_in_flight"]))
        addr = ctypes.addressof(ctypes.c_char.from_buffer(dest))
        if store.register_buffer(addr, len(dest)) != 0:
            raise RuntimeError("mooncake register_buffer failed")
        meter = cpu_meter([p.pid for p in procs])  # this client + holder + master
        say({"ready": True, "version": version(MOONCAKE_PKG)})
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                say({"bye": True})
                break
            try:
                gbps, cpu_per_gb = _mooncake_measure(store, data, src, dest, addr, cmd, meter)
                say({"gbps": gbps, "cpu_s_per_gb": cpu_per_gb})
            except Exception as e:
                say({"error": f"{type(e).__name__}: {e}"})
        store.unregister_buffer(addr)
        store.close()
        return 0
    except Exception as e:
        say({"error": f"{type(e).__name__}: {e}"})
        return 1
    finally:
        for p in reversed(procs):
            with contextlib.suppress(Exception):
                p.kill()
                p.wait(5)
        for f in logs:
            f.close()


def _mooncake_measure(
    store: Any, data: DataFile, src: mmap.mmap, dest: mmap.mmap, addr: int, cmd: dict[str, Any],
    cpu: Callable[[], float] | None,
) -> Sample:  # fmt: skip
    ps = next(p for p in data.sets if p.size == cmd["size"])
    threads, batch = int(cmd["threads"]), int(cmd["batch"])
    if threads * batch * ps.size > len(dest):
        raise ValueError("destination buffer too small for threads x batch pages")
    keys = [f"p{ps.size}-{i}" for i in range(ps.npages)]
    cur = Cursor(ps, batch, threads)
    per = batch * ps.size

    def work(t: int) -> int:
        first = cur.next(t)
        base = addr + t * per
        got = store.batch_get_into(
            keys[first : first + batch], [base + j * ps.size for j in range(batch)], [ps.size] * batch
        )
        if any(g != ps.size for g in got):
            raise RuntimeError(f"batch_get_into returned {got}")
        return per

    work(0)
    sample = run_parallel(threads, float(cmd["seconds"]), work, cpu)
    first = cur.next(0)
    store.batch_get_into(
        keys[first : first + batch], [addr + j * ps.size for j in range(batch)], [ps.size] * batch
    )
    off, n = ps.span(first, batch)
    if dest[:n] != src[off : off + n]:
        raise RuntimeError("mooncake: received bytes differ from the pages stored")
    return sample


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--mooncake-driver":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally that kills master + holder
        sys.exit(_mooncake_driver(json.loads(sys.argv[2])))
    if len(sys.argv) >= 2 and sys.argv[1] == "--mooncake-holder":
        sys.exit(_mooncake_holder(json.loads(sys.argv[2])))
