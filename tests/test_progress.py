"""polarkvd.progress: plain lines where the output is not a terminal (what logs, CI and the tests that
read benchmark output see), a live rich bar on a terminal; `polarkvd drain` on a real terminal."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from polarkvd.progress import Progress, live_terminal
from tests.conftest import REPO_ROOT, chain_tokens, clean_env, store_chain


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    assert not live_terminal(out)
    with Progress(3, stream=out) as p:
        assert not p.live
        p.step("first thing")
        p.note("  something: not available: why")
        p.report("second thing took 2 ms")
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"\[1/3 +\d+\.\ds\] first thing \.\.\.", lines[0]), lines
    assert lines[1] == "  something: not available: why"
    assert re.fullmatch(r"\[2/3 +\d+\.\ds\] second thing took 2 ms", lines[2]), lines


def test_plain_label_updates_are_rate_limited_and_quiet_prints_nothing() -> None:
    out = io.StringIO()
    p = Progress(100, label="drain", unit="pages", stream=out, plain_interval=3600)
    for i in range(50):
        p.update(i, what="written")
    p.close(final="done")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[drain ") and lines[0].endswith("written 0/100 pages")
    assert lines[1] == "done"
    quiet = io.StringIO()
    with Progress(2, stream=quiet, quiet=True) as q:
        q.step("x")
        q.report("y")
        q.update(1)
    assert quiet.getvalue() == ""


def test_plain_when_forced_or_dumb(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("POLARKV_PROGRESS", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert live_terminal(Tty())
    monkeypatch.setenv("POLARKV_PROGRESS", "plain")
    assert not live_terminal(Tty())
    monkeypatch.delenv("POLARKV_PROGRESS")
    monkeypatch.setenv("TERM", "dumb")
    assert not live_terminal(Tty())


def test_live_bar_leaves_finished_steps_behind() -> None:
    out = io.StringIO()
    with Progress(2, stream=out, live=True) as p:
        assert p.live
        p.step("copy [the] pages")  # rich markup in a step's text is shown as is
        p.step("second")
        p.note("a note")
    assert not p.live
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # without the terminal's escapes
    assert "✓ copy [the] pages" in text and "✓ second" in text and "a note" in text


def run_on_a_terminal(argv: list[str], timeout: float = 60) -> tuple[int, str, bytes]:
    """Run `python -m polarkvd argv` with stderr on a pseudo-terminal: (exit code, what it drew on
    the terminal, its standard output)."""
    master, slave = pty.openpty()
    env = clean_env(TERM="xterm-256color", COLUMNS="100")
    proc = subprocess.Popen([sys.executable, "-m", "polarkvd", *argv], stdout=subprocess.PIPE, stderr=slave,
                            cwd=REPO_ROOT, env=env)  # fmt: skip
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, seen.decode(errors="replace"), out


def test_drain_shows_a_live_bar_on_a_terminal(daemon_factory) -> None:
    d = daemon_factory()
    with d.engine() as kv:
        for i in range(4):
            store_chain(kv, chain_tokens(i, 8))
    code, text, out = run_on_a_terminal(["drain", "--socket", str(d.control_socket)])
    assert code == 0, text
    assert b"drained: 32 pages written to disk" in out
    assert "draining: refusing new stores" in text
    assert "\x1b[" in text, text  # a live display (terminal escapes), not plain lines
    assert "[drain " not in text  # the plain line format is not used on a terminal


# ------------------------------------------------------------------------ the benchmarks' progress


def test_bench_chat_steps_keep_their_report_lines_and_never_draw_a_bar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """harness.Steps (bench chat's request lines) is polarkvd.progress's Progress reporting what just
    happened: the same plain lines as before the fold, even on a terminal (chat never closes it)."""
    from polarkvd.bench.harness import Steps

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.delenv("POLARKV_PROGRESS", raising=False)
    prog = Steps(2)
    assert isinstance(prog, Progress) and not prog.live
    prog.step("polarkvd user 1 round 1: TTFT 0.21 s")
    prog.step("polarkvd user 2 round 1: TTFT 0.19 s")
    lines = tty.getvalue().splitlines()
    assert re.fullmatch(r"\[1/2 +\d+\.\ds\] polarkvd user 1 round 1: TTFT 0\.21 s", lines[0]), lines
    assert re.fullmatch(r"\[2/2 +\d+\.\ds\] polarkvd user 2 round 1: TTFT 0\.19 s", lines[1]), lines
    assert Steps(1, quiet=True).quiet


def test_a_benchmark_from_harness_shows_the_live_bar_on_a_terminal_and_lines_elsewhere() -> None:
    """`polarkvd sim gossip` printed harness's hand-written lines on a terminal too; it now goes
    through polarkvd.progress: finished steps left above a live bar there, plain lines in a pipe."""
    argv = ["sim", "gossip", "--nodes", "8", "--steady", "5"]
    code, text, _ = run_on_a_terminal(argv)
    assert code == 0, text
    assert "\x1b[" in text, text  # a live display (terminal escapes)
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert "✓ bootstrap 8 members" in shown and "✓ kill one member" in shown, shown
    assert "[1/4" not in shown  # not the plain line format
    r = subprocess.run([sys.executable, "-m", "polarkvd", *argv], cwd=REPO_ROOT, env=clean_env(),
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 4 and "\x1b[" not in r.stderr, lines
    assert re.fullmatch(r"\[1/4 +\d+\.\ds\] bootstrap 8 members through seeds \(loss 0%\) \.\.\.", lines[0])
    assert re.fullmatch(r"\[4/4 +\d+\.\ds\] watch 5 s for false deaths \.\.\.", lines[3])
