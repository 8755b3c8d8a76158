"""Configuration: units, precedence, every problem at once, `check-config`, resource checks at start."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from polarkvd.config import load_config, option_fields, parse_option
from polarkvd.config.machine import resolve
from polarkvd.config.values import GiB, KiB, MiB, TiB, parse_duration, parse_size
from polarkvd.errors import EXIT_CONFIG, ConfigError
from polarkvd.resources import check_resources
from tests.conftest import REPO_ROOT, clean_env


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 * GiB),
        ("1.5G", 1_500_000_000),
        ("512MB", 512_000_000),
        ("512MiB", 512 * MiB),
        ("4 KiB", 4 * KiB),
        ("2tib", 2 * TiB),
        ("4096", 4096),
        (4096, 4096),
        (0, 0),
    ],
)
def test_sizes(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["8 parsecs", "GiB", "1.5.5G", "-1GiB", -1, True, None, 1.5, "auto"])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_auto_size_only_where_allowed() -> None:
    assert parse_size("auto", allow_auto=True) < 0
    assert load_config(env={}).dram.capacity < 0  # default "auto", resolved per machine
    assert resolve(load_config(env={}, overrides=_paths_nowhere())).dram.capacity > 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", 30.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("7", 7.0),
        (5, 5.0),
        (0.25, 0.25),
    ],
)
def test_durations(text: object, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["5 days", "s", "-1s", -3, False, "1.5.5s", None])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def _paths_nowhere() -> dict[str, str]:
    return {"daemon.runtime_dir": "/nonexistent/run", "daemon.state_dir": "/nonexistent/state"}


def test_precedence_defaults_file_env_overrides(tmp_path: Path) -> None:
    f = tmp_path / "polarkv.toml"
    f.write_text(
        "[daemon]\nlease_seconds = '10s'\nmax_sessions = 7\n"
        "[dram]\ncapacity = '128MiB'\npolicy = 's3fifo'\n"
        "[disk]\nio_threads = 3\n"
    )
    env = {
        "POLARKV_DRAM_CAPACITY": "256MiB",
        "POLARKV_DAEMON_LEASE_SECONDS": "20s",
        "POLARKV_DISK_ENABLED": "false",
        "UNRELATED": "x",
    }
    cfg = load_config(f, env=env, overrides={"daemon.lease_seconds": "40s"})
    assert cfg.dram.slab_bytes == 64 * MiB  # default: nobody set it
    assert cfg.dram.policy == "s3fifo" and cfg.disk.io_threads == 3 and cfg.daemon.max_sessions == 7  # file
    assert cfg.dram.capacity == 256 * MiB and cfg.disk.enabled is False  # env beats file
    assert cfg.daemon.lease_seconds == 40.0  # overrides beat env and file

    only_file = load_config(f, env={})
    assert only_file.dram.capacity == 128 * MiB and only_file.daemon.lease_seconds == 10.0
    defaults = load_config(env={})
    assert defaults.dram.policy == "lru" and defaults.daemon.lease_seconds == 30.0 and defaults.disk.enabled


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(
        "[daemon]\nlease_seconds = 'forever'\n"
        "[dram]\ncapacity = 'lots'\npolicy = 'mru'\ncolour = 'blue'\n"
        "[bogus]\nx = 1\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(f, env={"POLARKV_DISK_IO_THREADS": "many"}, overrides={"disk.compression_level": "99"})
    problems = {key: (value, why) for key, value, why in info.value.problems}
    assert set(problems) == {
        "daemon.lease_seconds",
        "dram.capacity",
        "dram.policy",
        "dram.colour",
        "bogus",
        "disk.io_threads",
        "disk.compression_level",
    }
    assert problems["dram.capacity"][0] == "lots" and "size" in problems["dram.capacity"][1]
    assert problems["dram.policy"][0] == "mru" and "lru" in problems["dram.policy"][1]
    assert problems["disk.io_threads"][0] == "many"
    assert "unknown" in problems["dram.colour"][1] and "unknown section" in problems["bogus"][1]
    assert "1..22" in problems["disk.compression_level"][1]
    text = str(info.value)
    for key in problems:
        assert key in text


def test_cross_checks_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"dram.capacity": "1MiB", "dram.slab_bytes": "4MiB"})
    assert info.value.problems[0][0] == "dram.slab_bytes" and "dram.capacity" in info.value.problems[0][2]
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml", env={})
    (tmp_path / "broken.toml").write_text("[dram\ncapacity=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "broken.toml", env={})


def _cli(
    *args: str, env_extra: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polarkvd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env=clean_env(**(env_extra or {})),
    )


def test_check_config_bad_file_exits_78_listing_every_problem(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[dram]\ncapacity = 'lots'\npolicy = 'mru'\n[daemon]\nlease_seconds = 'forever'\n")
    r = _cli("check-config", str(f))
    assert r.returncode == EXIT_CONFIG
    assert "3 problem(s)" in r.stderr
    for needle in ("dram.capacity = 'lots'", "dram.policy = 'mru'", "daemon.lease_seconds = 'forever'"):
        assert needle in r.stderr
    assert r.stdout == ""


def test_check_config_minimal_good_file(tmp_path: Path) -> None:
    f = tmp_path / "good.toml"
    f.write_text(
        f"[daemon]\nruntime_dir = '{tmp_path / 'run'}'\nstate_dir = '{tmp_path / 'state'}'\n[dram]\ncapacity = '64MiB'\n"
    )
    r = _cli("check-config", "-v", str(f))
    assert r.returncode == 0, r.stderr
    assert f"{f}: ok" in r.stdout
    assert "capacity = 67108864" in r.stdout
    assert not (tmp_path / "run").exists()  # checking creates nothing


def test_check_config_shipped_example(tmp_path: Path) -> None:
    example = REPO_ROOT / "etc" / "polarkv.toml"
    if not example.exists():
        pytest.skip("etc/polarkv.toml is not written yet")
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "XDG_STATE_HOME": str(tmp_path / "state")}
    r = _cli("check-config", str(example), env_extra=env)
    assert r.returncode == 0, r.stderr


def _absurd(tmp_path: Path) -> dict[str, str]:
    return {
        "daemon.runtime_dir": str(tmp_path / "run"),
        "daemon.state_dir": str(tmp_path / "state"),
        "dram.shm_dir": str(tmp_path / "shm"),
        "dram.capacity": "100TiB",
    }


def test_resource_check_refuses_absurd_dram_with_numbers(tmp_path: Path) -> None:
    (tmp_path / "shm").mkdir()
    cfg = resolve(load_config(env={}, overrides=_absurd(tmp_path)))
    problems = check_resources(cfg)
    dram = [why for key, value, why in problems if key == "dram.capacity"]
    assert dram, problems
    assert any("102400.00 GiB" in why and "available" in why for why in dram)
    # the same check passes for a capacity that fits
    ok = resolve(
        load_config(
            env={}, overrides={**_absurd(tmp_path), "dram.capacity": "64MiB", "disk.capacity": "64MiB"}
        )
    )
    assert check_resources(ok) == []


@pytest.mark.parametrize("cmd", ["serve", "check-config"])
def test_absurd_dram_exits_78_and_creates_nothing(tmp_path: Path, cmd: str) -> None:
    (tmp_path / "shm").mkdir()
    sets = [a for k, v in _absurd(tmp_path).items() for a in ("--set", f"{k}={v}")]
    if cmd == "serve":
        r = _cli("serve", *sets)
    else:
        f = tmp_path / "c.toml"
        f.write_text("")
        r = _cli("check-config", str(f), *sets)
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert "dram.capacity" in r.stderr and "102400.00 GiB" in r.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    assert not any((tmp_path / "shm").iterdir())  # no arena file either


def test_serve_with_bad_config_exits_78(tmp_path: Path) -> None:
    r = _cli("serve", "--set", "dram.policy=mru", "--set", f"daemon.runtime_dir={tmp_path / 'run'}")
    assert r.returncode == EXIT_CONFIG
    assert "dram.policy = 'mru'" in r.stderr
    assert not (tmp_path / "run").exists()
    r = _cli("serve", "--set", "no-equals-sign")
    assert r.returncode == EXIT_CONFIG and "KEY=VALUE" in r.stderr


@pytest.mark.parametrize(
    "option", ["daemon.max_sessions", "daemon.max_keys_per_request", "dram.min_prefix_pages"]
)
@pytest.mark.parametrize("value", ["-1", "0"])
def test_counts_must_be_positive(option: str, value: str) -> None:
    """-1 is how "auto" sizes are stored internally; it must never slip through as a count."""
    with pytest.raises(ConfigError) as info:
        load_config(overrides={option: value})
    assert info.value.problems[0][0] == option


@pytest.mark.parametrize("bad", ["0.5", "lots", "17", True])
def test_min_compression_ratio_is_a_factor_from_1_to_16(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"disk.min_compression_ratio": bad})  # type: ignore[dict-item]
    assert info.value.problems[0][0] == "disk.min_compression_ratio"
    assert (
        load_config(env={}, overrides={"disk.min_compression_ratio": "1"}).disk.min_compression_ratio == 1.0
    )
    assert load_config(env={}).disk.min_compression_ratio == 1.25


def _number_options() -> list[str]:
    """Every option that takes a float (durations, fractions, factors): where NaN and inf could hide."""
    return [name for name, f in option_fields().items() if isinstance(f.default, float)]


@pytest.mark.parametrize("option", _number_options())
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1.0, "nan", "inf", "-1"])
def test_no_number_option_takes_nan_inf_or_a_negative(option: str, bad: object) -> None:
    """`daemon.lease_seconds = NaN` was accepted, and a lease taken under it never expired. Every
    source refuses it with the key named: the file, the environment, --set and the live knobs'
    parser (set_knobs goes through `parse_option`)."""
    with pytest.raises(ConfigError) as info:
        parse_option(option, bad)
    assert info.value.problems[0][0] == option
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={option: bad})  # type: ignore[dict-item]
    assert info.value.problems[0][0] == option


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "-5.0"])
def test_a_toml_file_and_the_environment_cannot_set_nan(tmp_path: Path, text: str) -> None:
    f = tmp_path / "polarkv.toml"
    f.write_text(f"[daemon]\nlease_seconds = {text}\n[cluster]\nsuspicion_mult = {text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(f, env={})
    assert {p[0] for p in info.value.problems} == {"daemon.lease_seconds", "cluster.suspicion_mult"}
    with pytest.raises(ConfigError) as info:
        load_config(env={"POLARKV_DAEMON_LEASE_SECONDS": text})
    assert info.value.problems[0][0] == "daemon.lease_seconds"


def test_numbers_too_large_for_a_float_are_refused_not_a_crash() -> None:
    """A 400-digit duration or size parses to inf: a ConfigError, not an OverflowError at start."""
    with pytest.raises(ValueError):
        parse_duration("9" * 400)
    with pytest.raises(ValueError):
        parse_size("9" * 400 + ".5GiB")
    with pytest.raises(ValueError, match="at most a year"):
        parse_duration("9000h")
    assert parse_duration("8760h") == 365 * 24 * 3600
