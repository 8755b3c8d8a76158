"""The control socket of a daemon at its open-files limit: a new control connection (`polarkvd
status`) is refused with the reason at once, in one line and a non-zero exit, instead of being reset
or left waiting; the connections already open are served, and once descriptors free up `status`
works again."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

from polarkvd.client import ControlClient
from polarkvd.errors import PolarKVError
from tests.conftest import clean_env


def status(sock: os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polarkvd", "status", "--socket", os.fspath(sock)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,  # a client left waiting fails here instead of hanging the suite
    )


def test_out_of_file_descriptors_refuses_control_clients_with_the_reason(daemon) -> None:
    pid = daemon.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 4, hard))
    held: list[ControlClient] = []
    refusals: list[str] = []
    try:
        for _ in range(8):
            c = ControlClient(daemon.control_socket, timeout=10)
            try:
                c.ping()
                held.append(c)
            except PolarKVError as e:
                refusals.append(str(e))
                c.close()
        assert held, "no control connection was served"
        assert refusals, "every control client was served: the limit was not reached"
        assert all("out of file descriptors" in r for r in refusals), refusals
        said = status(daemon.control_socket)  # what an operator sees
        assert said.returncode != 0
        lines = said.stderr.strip().splitlines()
        assert len(lines) == 1 and "out of file descriptors" in lines[0], said.stderr
        assert held[0].stats()["sessions"] == []  # the connections already open go on
    finally:
        for c in held:
            c.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    again = status(daemon.control_socket)
    assert again.returncode == 0, again.stderr
    assert daemon.proc.poll() is None
