"""The command line with bad arguments: one clear line naming what is wrong, a non-zero exit, never
a traceback (subcommands that bind or listen included)."""

from __future__ import annotations

import socket
import subprocess
import sys

from tests.conftest import REPO_ROOT, clean_env


def test_route_with_an_address_it_cannot_listen_on_says_so() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        engine = "http://127.0.0.1:1"  # nobody there: round-robin starts anyway
        cases = {
            "--port must be from 0 to 65535": ["--port", "99999"],
            "--poll-interval must be a positive number": ["--poll-interval", "nan"],
            "cannot listen on nonexistent.invalid:8000": ["--host", "nonexistent.invalid"],
            f"cannot listen on 127.0.0.1:{port}": ["--port", str(port)],
        }
        runs = {
            says: subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "polarkvd",
                    "route",
                    "--engine",
                    engine,
                    "--policy",
                    "round-robin",
                    "--log-level",
                    "error",
                    *args,
                ],
                cwd=REPO_ROOT,
                env=clean_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for says, args in cases.items()
        }
        for says, p in runs.items():
            try:
                _, err = p.communicate(timeout=60)
            finally:
                p.kill()
            assert p.returncode == 2 and "Traceback" not in err, err
            assert err.strip().splitlines()[-1].startswith(f"polarkvd route: {says}"), err


def test_where_with_bad_keys_or_a_nested_tokens_file_says_what_is_wrong(daemon, tmp_path) -> None:
    nested = tmp_path / "tokens.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    for args, says in (
        (["--keys", "zz"], "'zz' is not a page key (32 hex digits)"),
        (["--keys", "ab" * 8], "is not a page key"),  # hex, but 8 bytes
        (["--tokens-file", str(nested)], "nested too deeply"),
    ):
        p = subprocess.run(
            [sys.executable, "-m", "polarkvd", "where", "--socket", str(daemon.control_socket), "--model", "m", *args],
            cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip() == f"polarkvd where: {says}" or says in p.stderr.strip().splitlines()[-1], (
            p.stderr
        )
