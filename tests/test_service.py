"""polarkvd as a systemd service, with real daemon processes: sd_notify (READY, STATUS, WATCHDOG,
STOPPING, RELOADING), the bounded SIGTERM drain, SIGHUP reload, structured logs.

A real AF_UNIX datagram socket in the abstract namespace plays systemd's notify socket; the daemon
finds it through $NOTIFY_SOCKET exactly as under systemd (FACTS.md: `@` = abstract namespace).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from polarkvd.client import ControlClient, EngineClient
from polarkvd.errors import DaemonUnavailable
from polarkvd.logging_setup import JsonFormatter, LogfmtFormatter
from polarkvd.types import Tier
from tests.conftest import TEST_NS, bad_pages, chain_tokens, clean_env, store_chain, wait_for

Fields = dict[str, str]


class NotifyListener:
    """systemd's side of sd_notify: receives datagrams, keeps each with its arrival time.

    `on_ready` runs in the receiving thread the moment the first READY=1 arrives, before anything
    else is read: it probes the daemon's sockets at exactly that instant.
    """

    def __init__(self, on_ready: Callable[[], str] | None = None) -> None:
        self.name = f"polarkv-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(0.2)
        self.on_ready = on_ready
        self.ready_probe: str | None = None
        self.messages: list[tuple[float, Fields]] = []
        self._queue: queue.Queue[tuple[float, Fields]] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return "@" + self.name

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            t = time.monotonic()
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            if "READY" in fields and self.on_ready is not None and self.ready_probe is None:
                self.ready_probe = self.on_ready()
            self.messages.append((t, fields))
            self._queue.put((t, fields))

    def expect(self, key: str, contains: str = "", timeout: float = 30.0) -> tuple[float, Fields]:
        """The next datagram carrying `key` (whose value contains `contains`); others are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                t, fields = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no {key} datagram{f' with {contains!r}' if contains else ''} in {timeout}s; got {self.messages}"
                ) from None
            if key in fields and contains in fields[key]:
                return t, fields

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self.sock.close()


class Service:
    """`polarkvd serve --config FILE --set ...` as systemd would run it (env, signals, exit code)."""

    def __init__(self, root: Path, *, config: dict[str, dict[str, Any]] | None, sets: dict[str, str]) -> None:
        self.root = root
        self.config_path = root / "polarkv.toml" if config is not None else None
        if config is not None:
            self.write_config(config)
        self.sets = sets
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "daemon.log"

    @property
    def engine_socket(self) -> Path:
        return self.root / "run" / "engine.sock"

    @property
    def control_socket(self) -> Path:
        return self.root / "run" / "control.sock"

    def write_config(self, config: dict[str, dict[str, Any]] | str) -> None:
        assert self.config_path is not None
        if isinstance(config, str):
            self.config_path.write_text(config)
            return
        lines = []
        for section, values in config.items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, env: dict[str, str] | None = None, wait: bool = True, stderr: Any = None) -> Service:
        args = [sys.executable, "-m", "polarkvd", "serve"]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        for key, value in self.sets.items():
            args += ["--set", f"{key}={value}"]
        out = stderr or open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=clean_env(**(env or {})), start_new_session=True
        )
        if wait:
            wait_for(self._answers, timeout=60, what="the daemon's control socket")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with ControlClient(self.control_socket, timeout=2) as c:
                c.ping()
            return True
        except DaemonUnavailable:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def control(self) -> ControlClient:
        return ControlClient(self.control_socket, timeout=60)

    def engine(self, engine_id: str = "test") -> EngineClient:
        return EngineClient(TEST_NS, engine_id, self.engine_socket, timeout=60)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)


BASE_SETS = {
    "dram.capacity": "64MiB",
    "dram.slab_bytes": "1MiB",
    "disk.capacity": "256MiB",
    "disk.index_flush_seconds": "1s",
    "daemon.log_level": "debug",
    "metrics.address": "127.0.0.1:0",  # never the fixed default port: tests run side by side
}


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    made: list[Service] = []

    def make(name: str = "svc", config: dict[str, dict[str, Any]] | None = None, **sets: str) -> Service:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        paths = {"daemon.runtime_dir": str(root / "run"), "daemon.state_dir": str(root / "state")}
        s = Service(root, config=config, sets={**paths, **(BASE_SETS if config is None else {}), **sets})
        made.append(s)
        return s

    yield make
    for s in made:
        if s.proc is not None and s.proc.poll() is None:
            os.killpg(s.proc.pid, signal.SIGKILL)
            s.proc.wait()


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    n = NotifyListener()
    yield n
    n.close()


def probe(svc: Service) -> str:
    """Does the daemon answer on both sockets right now? "ok" or what failed."""
    try:
        with svc.engine("ready-probe") as kv:
            kv.ping()
            kv.lookup(kv.page_keys(chain_tokens(0, 1)))
        with ControlClient(svc.control_socket, timeout=5) as c:
            c.ping()
        return "ok"
    except Exception as e:  # reported, asserted by the test
        return repr(e)


# ---------------------------------------------------------------------------------------- sd_notify


def test_ready_only_when_the_sockets_answer_then_watchdog_at_half_the_timeout(services, listener) -> None:
    svc = services()
    listener.on_ready = lambda: probe(svc)
    watchdog_usec = 1_000_000  # systemd's WatchdogSec=1s: pings expected every 0.5 s
    svc.start(env={"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": str(watchdog_usec)}, wait=False)

    t_ready, ready = listener.expect("READY")
    assert ready["READY"] == "1"
    assert listener.ready_probe == "ok"  # at the instant READY arrived, both sockets answered
    before = [fields for t, fields in listener.messages if t < t_ready]
    assert before, "expected start-up STATUS/WATCHDOG datagrams before READY"
    assert all(set(f) <= {"STATUS", "WATCHDOG"} for f in before), before  # no READY before
    assert any(f.get("STATUS", "").startswith("starting") for f in before)
    assert ready["STATUS"].startswith("serving: DRAM 0 pages")

    # WATCHDOG=1 keeps coming at half the timeout, from the event loop
    times = [listener.expect("WATCHDOG")[0] for _ in range(9)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    mean = sum(gaps) / len(gaps)
    assert 0.4 <= mean <= 0.65, gaps
    assert max(gaps) < watchdog_usec / 1e6, gaps  # systemd would never have fired
    svc.signal(signal.SIGTERM)
    assert svc.wait() == 0


def test_no_notify_socket_means_no_notifications_and_watchdog_pid_is_respected(services, listener) -> None:
    # WATCHDOG_PID names another process: the watchdog is not ours to feed (sd_watchdog_enabled).
    svc = services()
    svc.start(env={"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    listener.expect("READY")
    with svc.control() as c:  # a round trip through the loop well after several would-be pings
        for _ in range(3):
            c.stats()
    assert not any("WATCHDOG" in f for _, f in listener.messages)
    svc.signal(signal.SIGTERM)
    assert svc.wait() == 0
    # and with no NOTIFY_SOCKET at all it runs and stops exactly the same
    plain = services("plain").start()
    plain.signal(signal.SIGTERM)
    assert plain.wait() == 0


def test_sigterm_stops_drains_and_a_restart_finds_every_page(services, listener) -> None:
    svc = services()
    svc.start(env={"NOTIFY_SOCKET": listener.address})
    listener.expect("READY")
    with svc.engine() as kv:
        keys = store_chain(kv, chain_tokens(1, 12))
        assert kv.lookup(keys).tiers == [Tier.DRAM] * 12
    assert svc.control().stats()["tiers"]["disk"]["pages"] == 0  # nothing evicted: all only in DRAM
    listener.expect("STATUS", contains="DRAM 12 pages")  # the periodic STATUS refresh

    svc.signal(signal.SIGTERM)
    t_stop, stopping = listener.expect("STOPPING")
    assert svc.wait() == 0
    log = svc.log()
    assert "shutdown: 12 DRAM pages written to disk" in log, log
    assert re.search(r'msg="polarkvd stopped" clean=True', log), log
    assert not svc.engine_socket.exists() and not svc.control_socket.exists()
    assert not any("READY" in f for t, f in listener.messages if t > t_stop)

    again = services().start()  # same directories
    seen = again.log()[len(log) :]
    opened = re.search(r"disk tier \S+: (\d+) pages .* (\d+) recovered, (\d+) dropped", seen)
    assert opened is not None, seen
    assert opened.groups() == ("12", "0", "0")  # the saved index lists every page: nothing to recover
    with again.engine() as kv:
        assert kv.lookup(keys).tiers == [Tier.DISK] * 12
        r = kv.load(keys)
        assert r.loaded == 12 and bad_pages(kv, keys, r.views) == []
        del r.views
        kv.release(r.lease)
    again.signal(signal.SIGTERM)
    assert again.wait() == 0


def test_shutdown_timeout_bounds_the_drain(services) -> None:
    svc = services(**{"daemon.shutdown_timeout": "0s"})  # do not wait for disk writes at all
    svc.start()
    with svc.engine() as kv:
        keys = store_chain(kv, chain_tokens(2, 400))  # 12.5 MiB to compress and write at shutdown
    started = time.monotonic()
    svc.signal(signal.SIGTERM)
    assert svc.wait() == 0
    assert time.monotonic() - started < 20
    log = svc.log()
    assert "did not finish within daemon.shutdown_timeout = 0s" in log, log
    assert "Traceback" not in log and "Exception in callback" not in log, log

    again = services().start()
    seen = again.log()[len(log) :]
    opened = re.search(r"disk tier \S+: (\d+) pages .* (\d+) recovered, (\d+) dropped", seen)
    assert opened is not None and opened.group(3) == "0", seen  # consistent: no half-written page
    saved = int(opened.group(1))
    assert saved < 400
    with again.engine() as kv:
        hits = kv.lookup(keys).hits
        r = kv.load(keys[:hits])
        assert bad_pages(kv, keys[:hits], r.views) == []
        del r.views
        if r.lease is not None:
            kv.release(r.lease)


# ---------------------------------------------------------------------------------------- SIGHUP


def _config(root: Path, **changes: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cfg: dict[str, dict[str, Any]] = {
        "daemon": {"runtime_dir": str(root / "run"), "state_dir": str(root / "state"), "log_level": "debug",
                   "lease_seconds": "30s"},
        "dram": {"capacity": "64MiB", "slab_bytes": "1MiB", "policy": "lru"},
        "disk": {"capacity": "256MiB", "policy": "lru", "index_flush_seconds": "1s"},
        "metrics": {"address": "127.0.0.1:0"},
    }  # fmt: skip
    for section, values in changes.items():
        cfg[section] = {**cfg[section], **values}
    return cfg


def _reload(svc: Service, listener: NotifyListener) -> Fields:
    svc.signal(signal.SIGHUP)
    _, reloading = listener.expect("RELOADING")
    _, ready = listener.expect("READY")
    return {**reloading, **ready}


def test_sighup_applies_changed_live_knobs_and_names_the_ones_that_need_a_restart(
    services, listener, tmp_path
) -> None:
    root = tmp_path / "svc"
    root.mkdir()
    # --set beats the file on every reload too, as at start
    svc = services(config=_config(root), **{"daemon.lease_seconds": "7s"})
    svc.start(env={"NOTIFY_SOCKET": listener.address})
    listener.expect("READY")
    pid = svc.proc.pid
    with svc.engine() as kv:
        keys = store_chain(kv, chain_tokens(3, 6))
    with svc.control() as c:
        assert c.knobs()["dram.policy"] == "lru" and c.knobs()["daemon.lease_seconds"] == 7.0

    svc.write_config(
        _config(
            root,
            dram={"policy": "s3fifo", "capacity": "32MiB"},  # capacity: only at start
            disk={"policy": "s3fifo"},
            daemon={"lease_seconds": "10s", "log_level": "info", "log_format": "json"},
        )
    )
    msg = _reload(svc, listener)
    assert abs(int(msg["MONOTONIC_USEC"]) - time.monotonic_ns() // 1000) < 60e6  # CLOCK_MONOTONIC µs
    assert msg["READY"] == "1"

    with svc.control() as c:
        knobs = c.knobs()
        st = c.stats()
    assert {
        k: knobs[k] for k in ("daemon.log_level", "daemon.lease_seconds", "dram.policy", "disk.policy")
    } == {
        "daemon.log_level": "info",
        "daemon.lease_seconds": 7.0,  # the --set override still wins
        "dram.policy": "s3fifo",
        "disk.policy": "s3fifo",
    }
    assert st["tiers"]["dram"]["policy"] == "s3fifo" and st["tiers"]["disk"]["policy"] == "s3fifo"
    assert st["tiers"]["dram"]["capacity_bytes"] == 64 << 20  # unchanged until a restart
    assert svc.proc.poll() is None and svc.proc.pid == pid
    with svc.engine() as kv:
        assert kv.lookup(keys).hits == 6  # nothing lost
    log = svc.log()
    assert re.search(r"reloaded \S+polarkv.toml: .*dram.policy 'lru' -> 's3fifo'", log), log
    m = re.search(r"reload: (.*) changed in \S+ but only take\(s\) effect after a restart", log)
    assert m is not None, log
    assert m.group(1) == "daemon.log_format, dram.capacity"
    svc.signal(signal.SIGTERM)
    assert svc.wait() == 0


def test_sighup_with_an_invalid_file_keeps_the_running_config(services, listener, tmp_path) -> None:
    root = tmp_path / "svc"
    root.mkdir()
    svc = services(config=_config(root))
    svc.start(env={"NOTIFY_SOCKET": listener.address})
    listener.expect("READY")
    url = re.search(r"metrics_url=(\S+)", svc.log()).group(1)  # type: ignore[union-attr]

    svc.write_config(_config(root, dram={"policy": "fifo"}, disk={"policy": "s3fifo"}))
    _reload(svc, listener)
    svc.write_config("[dram\npolicy = 's3fifo'\n")
    _reload(svc, listener)
    with svc.control() as c:
        assert c.knobs()["dram.policy"] == "lru" and c.knobs()["disk.policy"] == "lru"  # nothing applied
    log = svc.log()
    assert "reload refused, still running the previous configuration" in log
    assert "dram.policy = 'fifo': expected one of lru, s3fifo" in log, log
    assert "not valid TOML" in log, log
    metrics = _scrape(url)
    assert metrics['polarkv_config_reloads_total{result="failed"}'] == 2.0
    assert metrics["polarkv_config_last_reload_successful"] == 0.0

    svc.write_config(_config(root, dram={"policy": "s3fifo"}))  # fixed: the next reload applies it
    _reload(svc, listener)
    with svc.control() as c:
        assert c.knobs()["dram.policy"] == "s3fifo"
    metrics = _scrape(url)
    assert metrics['polarkv_config_reloads_total{result="ok"}'] == 1.0
    assert metrics["polarkv_config_last_reload_successful"] == 1.0
    svc.signal(signal.SIGTERM)
    assert svc.wait() == 0


def _scrape(url: str) -> dict[str, float]:
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url, timeout=30) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


# ---------------------------------------------------------------------------------------- logs

LOGFMT_LINE = re.compile(
    r'^ts=\S+Z level=(debug|info|warning|error|critical) logger=[\w.]+ msg=("([^"\\]|\\.)*"|\S+)( |$)'
)


def test_text_logs_are_one_logfmt_line_per_event(services) -> None:
    svc = services().start()
    with svc.engine() as kv:
        store_chain(kv, chain_tokens(4, 2))
    svc.signal(signal.SIGTERM)
    assert svc.wait() == 0
    lines = svc.log().splitlines()
    assert len(lines) > 5
    for line in lines:
        assert LOGFMT_LINE.match(line), line
    assert any(
        'msg="polarkvd ready (pid' in line and "metrics_url=http://127.0.0.1:" in line for line in lines
    )


def test_json_logs_and_journald_priorities(services, tmp_path) -> None:
    svc = services(**{"daemon.log_format": "json"}).start()
    with svc.engine() as kv:
        store_chain(kv, chain_tokens(5, 2))
    svc.signal(signal.SIGTERM)
    assert svc.wait() == 0
    records = [json.loads(line) for line in svc.log().splitlines()]
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records), records
    assert any(r["msg"].startswith("polarkvd ready") and r["metrics_url"] for r in records)

    # stderr is the journal stream systemd names in $JOURNAL_STREAM: no timestamp (journald keeps
    # its own), a <priority> prefix per line (journald strips and stores it)
    journal = tmp_path / "journal.txt"
    with open(journal, "wb") as out:
        st = os.fstat(out.fileno())
        j = services("journal")
        j.start(env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stderr=out)
        j.signal(signal.SIGTERM)
        assert j.wait() == 0
    lines = journal.read_text().splitlines()
    assert lines and all(re.match(r"^<[2-7]>level=\w+ logger=", line) for line in lines), lines
    assert any(line.startswith('<6>level=info logger=polarkvd.daemon msg="polarkvd ready') for line in lines)


def test_formatters_keep_multi_line_messages_and_tracebacks_on_one_line() -> None:
    log = logging.getLogger("polarkvd.test")
    try:
        raise ValueError("boom")
    except ValueError:
        record = log.makeRecord(
            log.name, logging.ERROR, __file__, 1, "bad config:\n  %s", ('x = "y"',), sys.exc_info(),
            extra={"key": "a b", "n": 3},
        )  # fmt: skip
    text = LogfmtFormatter(timestamps=False).format(record)
    assert "\n" not in text
    assert text.startswith(
        'level=error logger=polarkvd.test msg="bad config:\\n  x = \\"y\\"" key="a b" n=3 exc='
    )
    assert "Traceback" in text and "ValueError: boom" in text
    data = json.loads(JsonFormatter().format(record))
    assert data["msg"] == 'bad config:\n  x = "y"' and data["n"] == 3 and "ValueError: boom" in data["exc"]
    journal = LogfmtFormatter(timestamps=False, priority_prefix=True).format(record)
    assert journal.startswith("<3>level=error")
