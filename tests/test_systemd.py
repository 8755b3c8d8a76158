"""The systemd unit: it verifies cleanly, its hardening score is the documented one, and it keeps what
the daemon relies on (notify, watchdog, exit 78, the shared /dev/shm, the socket directory).

`systemd-analyze verify` needs the unit's ExecStart binary to exist, so the unit is checked as a copy
whose ExecStart names this environment's `polarkvd` (tests/test_packaging.py also verifies the copy
scripts/install.sh installs). systemd does not need to run: `verify` and `security --offline=yes`
read files only (systemd is not PID 1 on the test machines). Debian/Ubuntu package: `systemd`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from polarkvd.config import Config
from polarkvd.config.values import parse_duration as duration
from tests.conftest import REPO_ROOT

UNIT = REPO_ROOT / "systemd" / "polarkvd.service"
SYSUSERS = REPO_ROOT / "systemd" / "polarkvd.sysusers.conf"
OPERATIONS = REPO_ROOT / "docs" / "OPERATIONS.md"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian/Ubuntu package: systemd)"
)


def polarkvd_binary() -> Path:
    for candidate in (Path(sys.executable).parent / "polarkvd", shutil.which("polarkvd")):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    pytest.skip("no installed `polarkvd` command to point ExecStart at (pip install -e .)")


def unit_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The shipped unit with ExecStart naming an existing polarkvd (what install.sh does)."""
    text = UNIT.read_text() if text is None else text
    out = tmp_path / "polarkvd.service"
    out.write_text(text.replace("/usr/local/bin/polarkvd", str(polarkvd_binary())))
    return out


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=120)


def unit_settings(text: str) -> dict[str, list[str]]:
    """ "Section.Key" -> every value given (DeviceAllow= and friends repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def documented_threshold() -> int:
    m = re.search(r"`systemd-analyze security --offline=yes --threshold=(\d+)`", OPERATIONS.read_text())
    assert m is not None, "docs/OPERATIONS.md must state the unit's security threshold"
    return int(m.group(1))


@needs_analyze
def test_unit_verifies_without_a_warning(tmp_path: Path) -> None:
    r = analyze("verify", "--recursive-errors=yes", str(unit_copy(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""


@needs_analyze
def test_verify_as_run_here_catches_a_misspelled_key(tmp_path: Path) -> None:
    # The check above is only worth something if it fails on a typo (FACTS.md: without
    # --recursive-errors=yes and the stderr check, a misspelled key passes).
    broken = UNIT.read_text().replace("WatchdogSec=", "WatchdogSecs=")
    r = analyze("verify", "--recursive-errors=yes", str(unit_copy(tmp_path, broken)))
    assert r.returncode != 0 or r.stderr != ""
    assert "WatchdogSecs" in r.stderr


@needs_analyze
def test_security_exposure_is_the_documented_lowest(tmp_path: Path) -> None:
    n = documented_threshold()
    unit = unit_copy(tmp_path)
    r = analyze("security", "--offline=yes", f"--threshold={n}", str(unit))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    m = re.search(r"Overall exposure level for polarkvd.service: ([0-9.]+)", r.stdout)
    assert m is not None, r.stdout[-2000:]
    assert round(float(m.group(1)) * 10) <= n
    version = analyze("--version").stdout.split()[1]
    if version == "252":  # where N was measured: N is the lowest threshold the unit passes
        assert analyze("security", "--offline=yes", f"--threshold={n - 1}", str(unit)).returncode != 0


def test_unit_keeps_what_the_daemon_relies_on() -> None:
    s = unit_settings(UNIT.read_text())

    def one(key: str) -> str:
        assert len(s.get(key, [])) == 1, (key, s.get(key))
        return s[key][0]

    assert one("Service.Type") == "notify" and one("Service.NotifyAccess") == "main"
    assert duration(one("Service.WatchdogSec")) > 0
    assert one("Service.ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Service.Restart") == "on-failure"
    assert "78" in one("Service.RestartPreventExitStatus").split()  # errors.EXIT_CONFIG
    assert one("Service.ExecStart").startswith("/usr/local/bin/polarkvd serve --config /etc/polarkv.toml")
    # the shutdown drain must end before systemd's SIGKILL
    assert duration(one("Service.TimeoutStopSec")) > Config().daemon.shutdown_timeout
    # sockets: /run/polarkv reachable by the group (engines), private to everyone else
    assert one("Service.RuntimeDirectory") == "polarkv" and one("Service.RuntimeDirectoryMode") == "0750"
    assert one("Service.StateDirectory") == "polarkv"
    assert one("Service.LimitMEMLOCK") == "infinity"
    assert one("Service.User") == one("Service.Group") == "polarkv"
    assert f"u {one('Service.User')} " in SYSUSERS.read_text()
    # the arena lives in the host's /dev/shm, shared with engines
    for forbidden in ("PrivateDevices", "PrivateIPC", "TemporaryFileSystem", "InaccessiblePaths"):
        assert f"Service.{forbidden}" not in s, forbidden
    assert "/dev/shm" in one("Service.ReadWritePaths").split()
    assert one("Service.DevicePolicy") == "closed"
    allowed = " ".join(s["Service.DeviceAllow"])
    assert (
        "char-nvidia*" in allowed and "char-infiniband*" in allowed and "/dev/infiniband/rdma_cm" in allowed
    )
    assert one("Service.ProtectSystem") == "strict" and one("Service.NoNewPrivileges") == "yes"
    assert one("Install.WantedBy") == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_sysusers_creates_the_user_and_group(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    r = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    group = (tmp_path / "etc" / "group").read_text()
    assert re.search(r"^polarkv:x:\d+:\d+:polarkvd KV-cache daemon:/var/lib/polarkv:", passwd, re.M), passwd
    assert re.search(r"^polarkv:x:\d+:", group, re.M), group
