"""Hosts in network namespaces: one bridge namespace, N host namespaces on veth pairs, a daemon per host.

Everything lives inside namespaces this fixture creates (links, addresses, nftables rules); nothing is
added to the namespace the tests run in, and everything is torn down at the end, on failure and on
Ctrl-C too (daemons first, then the namespaces). Names carry the test process's pid, so parallel runs
never collide, and namespaces left behind by a run that was SIGKILLed are deleted at the next start.

Unix sockets and /dev/shm are shared across network namespaces, so the test process talks to every
daemon through its engine and control sockets as the loopback tests do.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from polarkvd.client import ControlClient
from polarkvd.cluster.auth import generate, write_key_file
from polarkvd.errors import DaemonUnavailable
from tests.conftest import DaemonProc, clean_env, daemon_sets, wait_for

#: Every namespace this harness creates starts with this, then the pid of the test process.
PREFIX = "pkvt"
_NAME = re.compile(rf"^{PREFIX}(\d+)n\d+-")
_seq = itertools.count(1)

GOSSIP_PORT = 7946
DATA_PORT = 7947


def _ip(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, input=input, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _netns_list() -> list[str]:
    r = _ip("netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _arena_of(pid: int) -> Path | None:
    """The arena file of a daemon process started by this harness (from its --set arguments)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if "polarkvd" not in argv or "serve" not in argv:
        return None
    sets = dict(a.split("=", 1) for a, prev in zip(argv[1:], argv) if prev == "--set" and "=" in a)
    try:
        return DaemonProc(Path("."), sets).arena_path
    except Exception:  # a config this code no longer understands: leave the file
        return None


def _kill_pids_in(ns: str) -> None:
    """SIGKILL what still runs in a namespace of ours (daemons of a run that died before its teardown)."""
    r = _ip("netns", "pids", ns, check=False)
    for pid in (int(p) for p in r.stdout.split() if p.isdigit()):
        arena = _arena_of(pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        if arena is not None:
            arena.unlink(missing_ok=True)  # a killed daemon cannot unlink its arena (64 MiB of /dev/shm)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def delete_stale_namespaces() -> None:
    """Delete namespaces with our prefix whose test process is gone (left by a killed run)."""
    for ns in _netns_list():
        m = _NAME.match(ns)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _kill_pids_in(ns)
            _ip("netns", "del", ns, check=False)


def netns_unavailable() -> str | None:
    """Why namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns add, veth pairs, a bridge)"
    if shutil.which("ip") is None:
        return "network namespace tests need the `ip` command (iproute2)"
    probe = f"{PREFIX}{os.getpid()}n0-probe"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace here: {r.stderr.strip()}"
    try:
        r = _ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        if r.returncode != 0:
            return f"cannot create a bridge in a network namespace here: {r.stderr.strip()}"
        r = _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1", check=False)
        if r.returncode != 0:
            return f"cannot create a veth pair in a network namespace here: {r.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def nft_unavailable(ns: str) -> str | None:
    """Why nftables rules cannot be applied inside `ns`, or None."""
    if shutil.which("nft") is None:
        return (
            "packet-loss tests need the `nft` command (nftables; `tc netem` is not available on this kernel)"
        )
    r = _ip("netns", "exec", ns, "nft", "-f", "-", check=False, input="table inet pkvprobe { }\n")
    if r.returncode != 0:
        return f"nftables does not work in a network namespace here: {r.stderr.strip()}"
    _ip("netns", "exec", ns, "nft", "delete", "table", "inet", "pkvprobe", check=False)
    return None


@dataclasses.dataclass
class NetnsDaemon(DaemonProc):
    """A daemon started inside a host's network namespace (`ip netns exec NS python -m polarkvd serve`)."""

    netns: str = ""

    def start(self, timeout: float = 30.0) -> NetnsDaemon:
        args = ["ip", "netns", "exec", self.netns, sys.executable, "-m", "polarkvd", "serve"]
        for key, value in self.sets.items():
            args += ["--set", f"{key}={value}"]
        log = open(self.log_path, "ab")
        # `ip netns exec` execs the daemon: same pid, and its own process group to kill at the end
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=clean_env()
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"daemon in {self.netns} exited with {self.proc.returncode}:\n{self.log()}"
                )
            try:
                with ControlClient(self.control_socket, timeout=2) as c:
                    c.ping()
                return self
            except DaemonUnavailable:
                time.sleep(0.05)
        raise RuntimeError(f"daemon in {self.netns} did not come up in {timeout}s:\n{self.log()}")


@dataclasses.dataclass
class Host:
    name: str  # h1, h2, ... (also the daemon's cluster.node_id)
    netns: str
    address: str
    daemon: NetnsDaemon | None = None


class NetnsCluster:
    """N hosts on one bridge, each in its own network namespace, each with a daemon in one cluster."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.tag = f"{PREFIX}{os.getpid()}n{next(_seq)}"
        self.subnet = f"10.77.{os.getpid() % 250 + 1}"
        self.bridge = f"{self.tag}-br"
        self.hosts: dict[str, Host] = {}
        self.namespaces: list[str] = []
        self.key_file = base / "cluster.key"
        write_key_file(self.key_file, generate())
        self._closed = False

    # ---------------------------------------------------------------- network

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def build(self, n: int) -> NetnsCluster:
        self._add_ns(self.bridge)
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge, "link", "set", "br0", "up")
        for i in range(1, n + 1):
            name = f"h{i}"
            ns = f"{self.tag}-{name}"
            self._add_ns(ns)
            # both ends are created inside our namespaces: nothing appears in the caller's namespace
            _ip(
                "-n", self.bridge, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns
            )
            _ip("-n", self.bridge, "link", "set", f"v{i}", "master", "br0")
            _ip("-n", self.bridge, "link", "set", f"v{i}", "up")
            address = f"{self.subnet}.{i}"
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            self.hosts[name] = Host(name, ns, address)
        return self

    def link(self, name: str, up: bool) -> None:
        """Take a host's only link down (a partition: it can reach nobody, nobody can reach it) or up."""
        _ip("-n", self.hosts[name].netns, "link", "set", "eth0", "up" if up else "down")

    def set_loss(self, name: str, percent: int) -> None:
        """Drop `percent`% of the packets a host receives (nftables numgen; replaces an earlier rule)."""
        self.clear_loss(name)
        rules = (
            "table inet pkvchaos {\n"
            "  chain input {\n"
            "    type filter hook input priority 0;\n"
            f"    numgen random mod 100 < {percent} drop\n"
            "  }\n"
            "}\n"
        )
        _ip("netns", "exec", self.hosts[name].netns, "nft", "-f", "-", input=rules)

    def clear_loss(self, name: str) -> None:
        _ip(
            "netns", "exec", self.hosts[name].netns, "nft", "delete", "table", "inet", "pkvchaos", check=False
        )

    # ---------------------------------------------------------------- daemons

    def start(self, name: str, **sets: str) -> NetnsDaemon:
        host = self.hosts[name]
        root = self.base / name
        root.mkdir(exist_ok=True)
        seed = self.hosts["h1"].address
        cfg = {
            **daemon_sets(root),
            "cluster.enabled": "true",
            "cluster.node_id": name,
            "cluster.key_file": str(self.key_file),
            "cluster.gossip_address": f"{host.address}:{GOSSIP_PORT}",
            "cluster.data_address": f"{host.address}:{DATA_PORT}",
            "cluster.seeds": f"{seed}:{GOSSIP_PORT}",
            "cluster.probe_interval": "200ms",
            "cluster.probe_timeout": "100ms",
            "cluster.lookup_timeout": "1s",
        }
        cfg.update({k.replace("__", "."): v for k, v in sets.items()})
        host.daemon = NetnsDaemon(root, cfg, netns=host.netns)
        host.daemon.start()
        return host.daemon

    def start_all(self, **sets: str) -> list[NetnsDaemon]:
        return [self.start(name, **sets) for name in self.hosts]

    def daemon(self, name: str) -> NetnsDaemon:
        d = self.hosts[name].daemon
        assert d is not None, f"no daemon on {name}"
        return d

    def view(self, name: str) -> dict[str, str]:
        """Member -> state, as the daemon on host `name` sees it."""
        with self.daemon(name).control() as c:
            rep = c.cluster()
        return {m["node"]: m["state"] for m in rep["members"]}

    def views(self) -> dict[str, dict[str, str]]:
        return {name: self.view(name) for name in self.hosts if self.hosts[name].daemon is not None}

    def wait_states(self, observers: list[str], states: dict[str, str], timeout: float, what: str) -> None:
        def ok() -> bool:
            for o in observers:
                v = self.view(o)
                if any(v.get(member) != state for member, state in states.items()):
                    return False
            return True

        try:
            wait_for(ok, timeout, what)
        except AssertionError as e:
            raise AssertionError(f"{e}; views now: {self.views()}") from None

    def wait_converged(self, names: list[str] | None = None, timeout: float = 20.0) -> None:
        names = names or list(self.hosts)
        self.wait_states(
            names, {n: "alive" for n in names}, timeout, f"members {names} to see each other alive"
        )

    # ---------------------------------------------------------------- teardown

    def log_tails(self, lines: int = 60) -> str:
        out = []
        for host in self.hosts.values():
            if host.daemon is not None:
                tail = host.daemon.log().splitlines()[-lines:]
                out.append(f"----- {host.name} ({host.daemon.log_path}) -----\n" + "\n".join(tail))
        return "\n".join(out)

    def close(self) -> None:
        """Kill the daemons' process groups, remove their arenas, delete every namespace. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts.values():
            d = host.daemon
            if d is not None and d.proc is not None:
                if d.proc.poll() is None:
                    try:
                        os.killpg(d.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    d.proc.wait()
                d.arena_path.unlink(missing_ok=True)
        for ns in reversed(self.namespaces):
            _kill_pids_in(ns)  # anything else a test started in there
            _ip("netns", "del", ns, check=False)
        self.namespaces.clear()


@pytest.fixture
def netns_cluster(tmp_path: Path) -> Iterator[Callable[[int], NetnsCluster]]:
    """netns_cluster(n) builds n hosts h1..hn on one bridge (no daemons yet); all torn down afterwards."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    delete_stale_namespaces()
    made: list[NetnsCluster] = []

    def make(n: int) -> NetnsCluster:
        c = NetnsCluster(tmp_path)
        made.append(c)
        atexit.register(c.close)  # even if pytest never gets to the teardown below
        return c.build(n)

    try:
        yield make
    finally:
        for c in made:
            # shown with the test's report when it failed: what the daemons were saying at the end
            print(c.log_tails())
            c.close()
            atexit.unregister(c.close)
