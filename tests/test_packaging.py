"""Packaging: `python -m build` makes a wheel that installs into a fresh virtual environment and runs;
the extras resolve; scripts/install.sh installs the service into a prefix or a staging DESTDIR.

Slow (about a minute): it builds, creates virtual environments and installs dependencies through pip
(from its cache or the package index).
"""

from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, clean_env

pytestmark = pytest.mark.slow
ETC = REPO_ROOT / "etc" / "polarkv.toml"


def run(*args: str | Path, timeout: float = 600, **kw: object) -> subprocess.CompletedProcess[str]:
    env = kw.pop("env", None) or clean_env()
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env, **kw)  # type: ignore[call-overload]
    assert r.returncode == 0, f"{args} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def build_wheel(tmp_path_factory: pytest.TempPathFactory, **env: str) -> Path:
    # from a copy: setuptools leaves build/ and *.egg-info/ next to the sources it builds
    src = tmp_path_factory.mktemp("src") / "polarkvd"
    junk = shutil.ignore_patterns(
        ".*", "__pycache__", "build", "dist", "*.egg-info", "*.so", "models", "tests"
    )
    shutil.copytree(REPO_ROOT, src, ignore=junk)
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--wheel", "--outdir", out, src, cwd=src, env=clean_env(**env))
    (found,) = out.glob("polarkvd-*.whl")
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory)


def compiler() -> str | None:
    """The C compiler setuptools would use here, if there is one (and Python's headers with it)."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"], "Python.h").exists()
    return shutil.which(cc) if headers else None


def probe_check(py: Path | str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Which probe the installed polarkvd uses, after a probe of a small table answered right."""
    code = (
        "import mmap, polarkvd.wire.lookup_table as lt\n"
        "m = mmap.mmap(-1, lt.table_bytes(64, 1)); t = lt.LookupTable(memoryview(m), 64, 1)\n"
        "keys = [bytes([i]) * 16 for i in range(1, 4)]; [t.put(k, 7) for k in keys[:2]]\n"
        "r = lt.TableReader(m, 7, t.claim_slot(1), True)\n"
        "assert r.probe(keys) == (2, True) and t.tally(0) == (1, 3, 2)\n"
        "print(lt.__file__, 'compiled' if r.compiled else 'python')\n"
    )
    return run(py, "-c", code, cwd=cwd, env=env).stdout.strip()


def metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(z.read(name))


def test_wheel_installs_in_a_fresh_venv_and_runs(wheel: Path, tmp_path: Path) -> None:
    meta = metadata(wheel)
    assert {"vllm", "tui", "rdma"} <= set(meta.get_all("Provides-Extra") or [])
    requires = meta.get_all("Requires-Dist") or []
    assert any(r.startswith("prometheus-client") for r in requires), requires
    assert any(r.startswith("vllm") and 'extra == "vllm"' in r for r in requires), requires
    assert any(r.startswith("textual") and 'extra == "tui"' in r for r in requires), requires

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py, exe = env_dir / "bin" / "python", env_dir / "bin" / "polarkvd"
    run(py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel, cwd=tmp_path)
    # out of the repository, so nothing is imported from the source tree
    where = run(py, "-c", "import polarkvd; print(polarkvd.__file__)", cwd=tmp_path).stdout.strip()
    assert where.startswith(str(env_dir)), where
    assert "serve" in run(exe, "--help", cwd=tmp_path).stdout
    # the shared table's probe was compiled where a compiler is at hand (setup.py), else Python's
    compiled = any(
        n.startswith("polarkvd/wire/_probe.") and n.endswith(".so") for n in zipfile.ZipFile(wheel).namelist()
    )
    assert compiled == (compiler() is not None)
    assert probe_check(py, tmp_path).endswith("compiled" if compiled else "python")
    assert run(exe, "--version", cwd=tmp_path).stdout.startswith("polarkvd ")
    state = tmp_path / "state"
    check_env = clean_env(
        POLARKV_DAEMON_STATE_DIR=str(state), POLARKV_DAEMON_RUNTIME_DIR=str(tmp_path / "run")
    )
    r = run(exe, "check-config", ETC, cwd=tmp_path, env=check_env)
    assert r.stdout.strip() == f"{ETC}: ok"

    # the light extras resolve against the index; [vllm] (gigabytes, CUDA builds) by metadata above
    spec = f"polarkvd[tui,rdma] @ {wheel.as_uri()}"
    r = run(py, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check", "--report", "-", spec,
            cwd=tmp_path)  # fmt: skip
    resolved = {item["metadata"]["name"].lower() for item in json.loads(r.stdout)["install"]}
    assert "textual" in resolved, resolved  # what the installed wheel lacked for [tui,rdma]


def test_without_a_c_compiler_the_wheel_builds_and_probes_in_python(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """The compiled probe is optional: a machine without a compiler (or Python's headers) builds,
    installs and runs polarkvd with the Python probe."""
    plain = build_wheel(tmp_path_factory, CC="false")
    assert not any(n.endswith(".so") for n in zipfile.ZipFile(plain).namelist())
    target = tmp_path / "site"
    run(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
        "--target", target, plain, cwd=tmp_path)  # fmt: skip
    # this environment's dependencies, the wheel's polarkvd (first on the path)
    where, which = probe_check(sys.executable, tmp_path, clean_env(PYTHONPATH=str(target))).split()
    assert where.startswith(str(target)) and which == "python"


def test_install_script_into_a_prefix_and_a_destdir(wheel: Path, tmp_path: Path) -> None:
    script = REPO_ROOT / "scripts" / "install.sh"
    prefix, etc = tmp_path / "prefix", tmp_path / "etc"
    env = clean_env(PREFIX=str(prefix), SYSCONFDIR=str(etc), PYTHON=sys.executable)
    run(script, "--wheel", wheel, env=env, cwd=REPO_ROOT)

    exe = prefix / "bin" / "polarkvd"
    assert exe.is_symlink() and not os.readlink(exe).startswith("/")  # relative: survives a DESTDIR copy
    assert run(exe, "--version").stdout.startswith("polarkvd ")
    unit = prefix / "lib" / "systemd" / "system" / "polarkvd.service"
    text = unit.read_text()
    assert f"ExecStart={exe} serve --config {etc / 'polarkv.toml'}" in text
    assert (prefix / "lib" / "sysusers.d" / "polarkvd.conf").exists()
    assert (prefix / "share" / "doc" / "polarkvd" / "OPERATIONS.md").exists()
    assert (etc / "polarkv.toml").read_text() == ETC.read_text()
    analyze = shutil.which("systemd-analyze")
    if analyze:  # the installed copy verifies as it is: its ExecStart exists
        r = subprocess.run(
            [analyze, "verify", "--recursive-errors=yes", str(unit)], capture_output=True, text=True
        )
        assert r.returncode == 0 and r.stderr == "", r.stderr

    # again: an edited config is kept, the shipped one lands next to it
    (etc / "polarkv.toml").write_text("[dram]\npolicy = 's3fifo'\n")
    run(script, "--wheel", wheel, env=env, cwd=REPO_ROOT)
    assert (etc / "polarkv.toml").read_text() == "[dram]\npolicy = 's3fifo'\n"
    assert (etc / "polarkv.toml.new").read_text() == ETC.read_text()

    # staged for a package: files under DESTDIR, every path inside them the final one
    stage = tmp_path / "stage"
    env = clean_env(DESTDIR=str(stage), PREFIX="/opt/polarkvd", PYTHON=sys.executable)
    run(script, "--wheel", wheel, env=env, cwd=REPO_ROOT)
    staged_unit = (stage / "opt/polarkvd/lib/systemd/system/polarkvd.service").read_text()
    assert "ExecStart=/opt/polarkvd/bin/polarkvd serve --config /etc/polarkv.toml" in staged_unit
    assert (stage / "etc" / "polarkv.toml").exists()
    bindir = stage / "opt/polarkvd/lib/polarkvd/bin"
    assert (bindir / "polarkvd").read_text().splitlines()[0] == "#!/opt/polarkvd/lib/polarkvd/bin/python"
    for f in [*bindir.iterdir(), stage / "opt/polarkvd/lib/polarkvd/pyvenv.cfg"]:
        if f.is_file() and not f.is_symlink():
            assert str(stage).encode() not in f.read_bytes(), f
