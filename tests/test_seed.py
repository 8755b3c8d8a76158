"""The page-key seed: the seed file's life (created once, 0600, never overwritten, refused when
others can read it or it is broken), the cluster's derived seed, and what a daemon does with both."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from polarkvd.cluster.auth import generate
from polarkvd.errors import EXIT_CONFIG, ConfigError
from polarkvd.keys import SEED_BYTES, namespace_digest, seed_fingerprint
from polarkvd.seed import load_seed_file, page_seed, seed_from_cluster_secret
from polarkvd.transport.peer_wire import data_key
from tests.conftest import TEST_NS, chain_tokens, clean_env, store_chain, wait_for


def test_the_seed_file_is_created_once_with_mode_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "state" / "page-seed"  # its directory does not exist yet either
    seed = load_seed_file(path)
    assert len(seed) == SEED_BYTES and seed != bytes(SEED_BYTES)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert load_seed_file(path) == seed and path.read_text() == text  # read back, not replaced
    assert load_seed_file(tmp_path / "elsewhere") != seed  # random per file


def test_a_seed_file_others_can_read_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "page-seed"
    load_seed_file(path)
    before = path.read_text()
    path.chmod(0o644)
    with pytest.raises(ConfigError) as e:
        load_seed_file(path)
    assert "daemon.seed_file" in str(e.value) and "chmod 600" in str(e.value)
    assert path.read_text() == before  # refused, never regenerated


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('seed = "abc"\n', "64 hex"),
        (f'seed = "{"zz" * 32}"\n', "64 hex"),
        ("seed = 5\n", "64 hex"),
        ("nothing = 1\n", "64 hex"),
        ("this is not toml =\n", "not a seed file"),
        ("", "64 hex"),
    ],
    ids=["short", "not-hex", "not-a-string", "missing", "not-toml", "empty"],
)
def test_a_broken_seed_file_is_refused_not_replaced(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "page-seed"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content.encode())
    os.close(fd)
    with pytest.raises(ConfigError, match=reason):
        load_seed_file(path)
    assert path.read_text() == content


def test_an_unreadable_seed_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "page-seed").mkdir()  # a directory where the file should be
    with pytest.raises(ConfigError, match="cannot read"):
        load_seed_file(tmp_path / "page-seed")
    with pytest.raises(ConfigError, match="no such file"):
        load_seed_file(tmp_path / "absent", create=False)


def test_the_cluster_seed_comes_from_the_key_and_is_neither_the_key_nor_the_data_key() -> None:
    a, b = generate(), generate()
    seed = seed_from_cluster_secret(a.secret)
    assert seed == seed_from_cluster_secret(a.secret) and len(seed) == SEED_BYTES  # every member
    assert seed != seed_from_cluster_secret(b.secret)
    assert seed != data_key(a.secret) and a.secret not in seed
    chosen = page_seed("/nonexistent/page-seed", a.secret)  # the seed file is not used, not created
    assert chosen.seed == seed and chosen.source == "cluster key file"
    assert chosen.fingerprint == seed_fingerprint(seed)
    assert "seed=" not in repr(chosen)  # never in a log line by accident


# ------------------------------------------------------------------------ a daemon and its seed


def test_a_daemon_with_a_world_readable_seed_file_refuses_to_start(tmp_path: Path) -> None:
    seed_file = tmp_path / "page-seed"
    load_seed_file(seed_file)
    seed_file.chmod(0o604)
    proc = subprocess.run(
        [sys.executable, "-m", "polarkvd", "serve",
         "--set", f"daemon.runtime_dir={tmp_path / 'run'}", "--set", f"daemon.state_dir={tmp_path / 'state'}",
         "--set", f"daemon.seed_file={seed_file}", "--set", "dram.capacity=16MiB", "--set", "dram.slab_bytes=1MiB",
         "--set", "metrics.enabled=false", "--set", "disk.enabled=false"],
        capture_output=True, text=True, env=clean_env(), timeout=60,
    )  # fmt: skip
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert "daemon.seed_file" in proc.stderr and "chmod 600" in proc.stderr


def test_check_config_checks_an_existing_seed_file_and_creates_none(tmp_path: Path) -> None:
    conf = tmp_path / "polarkv.toml"
    conf.write_text("[dram]\ncapacity = '16MiB'\nslab_bytes = '1MiB'\n")
    seed_file = tmp_path / "page-seed"

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "polarkvd", "check-config", str(conf), "--set", f"daemon.seed_file={seed_file}",
             "--set", f"daemon.state_dir={tmp_path / 'state'}", "--set", f"daemon.runtime_dir={tmp_path / 'run'}"],
            capture_output=True, text=True, env=clean_env(), timeout=60,
        )  # fmt: skip

    assert check().returncode == 0 and not seed_file.exists()  # created by `serve`, not here
    load_seed_file(seed_file)
    assert check().returncode == 0
    seed_file.chmod(0o640)
    r = check()
    assert r.returncode == EXIT_CONFIG and "daemon.seed_file" in r.stderr and "chmod 600" in r.stderr


def test_keys_survive_a_restart_and_a_new_seed_refuses_the_old_disk_pages(daemon_factory) -> None:
    """What an operator sees: the same seed file keeps every page reachable across restarts; a new
    seed makes the engines' keys new, and the disk pages of the old one are dropped, never served."""
    d = daemon_factory()
    seed_file = d.root / "state" / "page-seed"
    seed = load_seed_file(seed_file, create=False)
    with d.engine() as kv:
        assert kv.ns_digest == namespace_digest(TEST_NS, seed)
        keys = store_chain(kv, chain_tokens(5, 6))
    d.stop()  # disk.save_on_shutdown: the pages go to disk
    d.start()
    with d.engine() as kv:
        assert kv.page_keys(chain_tokens(5, 6)) == keys
        wait_for(lambda: kv.lookup(keys).hits == 6, 10, "the disk pages after a restart")
    assert d.stats()["tiers"]["disk"]["seed_refused"] == 0

    d.stop()
    seed_file.unlink()  # the operator replaces the seed: a new one is created at start
    d.start()
    st = d.stats()
    assert st["tiers"]["disk"]["seed_refused"] == 6 and st["tiers"]["disk"]["pages"] == 0
    assert st["page_seed"] == seed_fingerprint(load_seed_file(seed_file, create=False))
    assert st["page_seed"] != seed_fingerprint(seed)
    with d.engine() as kv:
        new_keys = kv.page_keys(chain_tokens(5, 6))
        assert not set(new_keys) & set(keys)
        assert kv.lookup(new_keys).hits == 0
        assert kv.lookup(keys).hits == 0  # an engine that kept old keys finds nothing either
    refusals = [line for line in d.log().splitlines() if "keyed with" in line]
    assert len(refusals) == 1 and "6 pages" in refusals[0]
    status = subprocess.run(
        [sys.executable, "-m", "polarkvd", "status", "--socket", str(d.control_socket)],
        capture_output=True, text=True, check=True, env=clean_env(),
    )  # fmt: skip
    assert f"page-key seed {st['page_seed']}" in status.stdout
