"""The `polarkvd` command against a real daemon: status, evict, drain/resume, tune, --help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from polarkvd import cli
from polarkvd.errors import ErrorCode, PolarKVError
from tests.conftest import REPO_ROOT, TEST_NS, chain_tokens, clean_env, store_chain


def polarkvd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polarkvd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env=clean_env(),
    )


def test_operator_commands_against_a_real_daemon(daemon) -> None:
    sock = str(daemon.control_socket)
    assert TEST_NS.page_bytes == 32 * 1024  # the eviction arithmetic below depends on it
    with daemon.engine(engine_id="cli-test") as kv:
        chains = [store_chain(kv, chain_tokens(i, 8)) for i in range(5)]  # 40 pages
        assert kv.lookup(chains[0]).hits == 8

        r = polarkvd("status", "--socket", sock)
        assert r.returncode == 0, r.stderr
        assert "L2 dram" in r.stdout and "L4 disk" in r.stdout
        assert "stored 40 pages" in r.stdout and "cli-test" in r.stdout
        assert "8 hit (100.0%)" in r.stdout

        r = polarkvd("status", "--json", "--socket", sock)
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["counters"]["stored_pages"] == 40 and st["tiers"]["dram"]["pages"] == 40
        assert st["sessions"][0]["engine_id"] == "cli-test"

        # 1M = 1,000,000 bytes: 31 pages of 32 KiB are the fewest that free that much
        r = polarkvd("evict", "--tier", "dram", "--bytes", "1M", "--socket", sock)
        assert r.returncode == 0, r.stderr
        assert "evicted 992.0 KiB from dram" in r.stdout
        assert daemon.stats()["tiers"]["dram"]["pages"] == 40 - 31

        r = polarkvd("drain", "--socket", sock)
        assert r.returncode == 0, r.stderr
        assert "drained: 9 pages written to disk" in r.stdout
        assert "DRAINING" in polarkvd("status", "--socket", sock).stdout
        new = kv.page_keys(chain_tokens(99, 2))
        with pytest.raises(PolarKVError) as info:
            kv.store(new, [bytes(kv.page_bytes)] * 2)
        assert info.value.code is ErrorCode.DRAINING
        assert kv.lookup(new).hits == 0
        assert kv.lookup(chains[0]).hits == 8  # reads still work while draining

        r = polarkvd("resume", "--socket", sock)
        assert r.returncode == 0 and "accepting stores again" in r.stdout
        assert kv.store(new, [bytes(kv.page_bytes)] * 2).stored == 2

        r = polarkvd("tune", "dram.policy=s3fifo", "--socket", sock)
        assert r.returncode == 0, r.stderr
        assert "dram.policy = 's3fifo'" in r.stdout
        assert daemon.stats()["tiers"]["dram"]["policy"] == "s3fifo"
        r = polarkvd("tune", "--socket", sock)  # no assignment: show the knobs
        assert (
            r.returncode == 0 and "dram.policy = 's3fifo'" in r.stdout and "daemon.lease_seconds" in r.stdout
        )

        r = polarkvd("tune", "dram.policy=mru", "--socket", sock)
        assert r.returncode == 1 and "mru" in r.stderr
        r = polarkvd("evict", "--tier", "dram", "--bytes", "lots", "--socket", sock)
        assert r.returncode == 2 and "lots" in r.stderr
        assert daemon.stats()["tiers"]["dram"]["policy"] == "s3fifo"


def test_commands_without_a_daemon_fail_clearly(tmp_path) -> None:
    r = polarkvd("status", "--socket", str(tmp_path / "nobody.sock"))
    assert r.returncode == 1
    assert "cannot reach polarkvd" in r.stderr and "nobody.sock" in r.stderr


def test_help_exits_zero() -> None:
    r = polarkvd("--help")
    assert r.returncode == 0 and "serve" in r.stdout and "status" in r.stdout
    r = polarkvd("--version")
    assert r.returncode == 0 and "polarkvd" in r.stdout


def _subcommands() -> list[str]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return sorted(sub.choices)  # type: ignore[union-attr]


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: polarkvd " + command)


def test_expected_subcommands_exist() -> None:
    assert {"serve", "check-config", "status", "evict", "drain", "resume", "tune", "bench", "keygen"} <= set(
        _subcommands()
    )
