"""`polarkvd serve` with configurations an operator gets wrong: a path that is a file, a socket path
too long for a Unix socket, a NUL byte in a path, an empty shm_dir, connection counts and lent memory
beyond what the machine can give, a file-size limit below the arena, a second daemon on the first's
sockets or disk directory. Each exits 78 with a line naming the key and why, never a traceback, and
leaves nothing half-started behind (no arena, no socket); a first daemon serves on, its disk whole."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from polarkvd.config import load_config
from polarkvd.config.machine import resolve
from polarkvd.daemon import Daemon
from polarkvd.errors import EXIT_CONFIG
from tests.conftest import bad_pages, chain_tokens, clean_env, store_chain, wait_for


def base_sets(root: Path) -> dict[str, str]:
    return {
        "daemon.runtime_dir": str(root / "run"),
        "daemon.state_dir": str(root / "state"),
        "dram.capacity": "64MiB",
        "dram.slab_bytes": "1MiB",
        "disk.capacity": "256MiB",
        "metrics.address": "127.0.0.1:0",
    }


def serve(root: Path, sets: dict[str, str], toml: str = "", fsize: int = 0) -> tuple[int, str]:
    """Run `polarkvd serve` to its exit (a start that gets as far as serving is stopped: rc 0)."""
    args = [sys.executable, "-m", "polarkvd", "serve"]
    if toml:
        (root / "polarkv.toml").write_text(toml)
        args += ["--config", str(root / "polarkv.toml")]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]

    def limit() -> None:  # the file-size limit of a daemon whose unit sets LimitFSIZE
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    proc = subprocess.Popen(
        args,
        cwd=root,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=limit if fsize else None,
    )
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        return 0, out.decode(errors="replace")
    return proc.returncode, out.decode(errors="replace")


def refused(root: Path, sets: dict[str, str], key: str, why: str, **kw: object) -> None:
    rc, out = serve(root, sets, **kw)  # type: ignore[arg-type]
    assert rc == EXIT_CONFIG, out
    assert "Traceback" not in out and "polarkvd failed" not in out, out
    assert any(key in line and why in line for line in out.splitlines()), out
    assert not (root / "run" / "engine.sock").exists() and not (root / "run" / "control.sock").exists()
    assert not list(root.glob("*.arena")), "an arena in the working directory"


@pytest.mark.parametrize(
    "case",
    ["disk path is a file", "disk path under a file", "runtime dir is a file", "socket path too long"],
)
def test_a_path_the_daemon_cannot_use_is_named(tmp_path: Path, case: str) -> None:
    (tmp_path / "afile").write_text("not a directory")
    sets = base_sets(tmp_path)
    key, why = {
        "disk path is a file": ("disk.path", "exists and is not a directory"),
        "disk path under a file": ("disk.path", "exists and is not a directory"),
        "runtime dir is a file": ("daemon.engine_socket", "exists and is not a directory"),
        "socket path too long": ("daemon.engine_socket", "a Unix socket path is at most 107"),
    }[case]
    sets.update(
        {
            "disk path is a file": {"disk.path": str(tmp_path / "afile")},
            "disk path under a file": {"disk.path": str(tmp_path / "afile" / "pages")},
            "runtime dir is a file": {"daemon.runtime_dir": str(tmp_path / "afile")},
            "socket path too long": {"daemon.engine_socket": str(tmp_path / ("e" * 120 + ".sock"))},
        }[case]
    )
    refused(tmp_path, sets, key, why)
    assert (tmp_path / "afile").read_text() == "not a directory"


@pytest.mark.parametrize(
    "key, value, why",
    [
        ("daemon.max_sessions", "100000000000000000000000", "must lie between 1 and 65536"),
        ("disk.io_threads", "100000000", "must lie between 1 and 256"),
        ("dram.shm_dir", "", "must name a directory"),
    ],
)
def test_a_value_out_of_range_is_named(tmp_path: Path, key: str, value: str, why: str) -> None:
    refused(tmp_path, {**base_sets(tmp_path), key: value}, key, why)


def test_a_nul_byte_in_a_path_is_named(tmp_path: Path) -> None:
    refused(tmp_path, base_sets(tmp_path), "disk.path", "NUL byte", toml='[disk]\npath = "pages\\u0000x"\n')


def test_memory_lent_to_the_cluster_beyond_ram_is_named(tmp_path: Path) -> None:
    sets = {
        **base_sets(tmp_path),
        "cluster.enabled": "true",
        "cluster.insecure": "true",
        "cluster.gossip_address": "127.0.0.1:0",
        "cluster.data_address": "127.0.0.1:0",
        "cluster.dmp_bytes": "100TiB",
    }
    refused(tmp_path, sets, "cluster.dmp_bytes", "of RAM available")


def test_a_file_size_limit_below_the_arena_leaves_no_empty_arena(tmp_path: Path) -> None:
    """LimitFSIZE below dram.capacity: the arena cannot be sized; the start fails and removes it."""
    sets = base_sets(tmp_path)
    arena = Daemon(resolve(load_config(env={}, overrides=sets))).arena_path()
    try:
        refused(tmp_path, sets, "arena", "File too large", fsize=1 << 20)
        assert not arena.exists(), f"{arena} left behind"
    finally:
        arena.unlink(missing_ok=True)


def test_a_second_daemon_on_the_same_sockets_is_refused_and_the_first_serves_on(
    daemon_factory, tmp_path: Path
) -> None:
    first = daemon_factory()
    with first.engine() as kv:
        keys = store_chain(kv, chain_tokens(1, 4))
        rc, out = serve(tmp_path, {**first.sets, "daemon.state_dir": str(tmp_path / "other-state")})
        assert rc == EXIT_CONFIG and "Traceback" not in out, out
        assert "another polarkvd is already serving on" in out, out
        assert len(kv.lookup(keys).tiers) == 4  # its arena and sockets untouched
    assert first.arena_path.exists()


def test_a_second_daemon_on_the_same_disk_directory_is_refused_and_leaves_it_whole(
    daemon_factory, tmp_path: Path
) -> None:
    first = daemon_factory({"dram.capacity": "2MiB"})  # 64 pages of 32 KiB: the rest go to disk
    pages = first.root / "state" / "pages"
    with first.engine() as kv:
        chains = [store_chain(kv, chain_tokens(seed, 20)) for seed in range(8)]
        wait_for(lambda: first.stats()["tiers"]["disk"]["pages"] >= 80, what="pages on disk")
        before = sorted((p.relative_to(pages), p.stat().st_size) for p in pages.rglob("*.pkv"))
        sets = {**base_sets(tmp_path), "disk.path": str(pages)}
        rc, out = serve(tmp_path, sets)
        assert rc == EXIT_CONFIG and "Traceback" not in out, out
        assert "in use by another" in out and str(pages) in out, out
        second_arena = Daemon(resolve(load_config(env={}, overrides=sets))).arena_path()
        assert not second_arena.exists(), "the refused daemon left its arena"
        after = sorted((p.relative_to(pages), p.stat().st_size) for p in pages.rglob("*.pkv"))
        assert set(before) <= set(after)  # nothing of the first's deleted or rewritten
        r = kv.load(chains[0])  # the coldest chain: from the first daemon's disk
        try:
            assert r.loaded == 20 and bad_pages(kv, chains[0], r.views) == []
        finally:
            if r.lease is not None:
                kv.release(r.lease)
