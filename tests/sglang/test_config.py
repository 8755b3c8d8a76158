"""Bad configuration stops SGLang's start (the controller's attach raises) with an error that names
the option; a daemon that is merely down does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from polarkvd.connectors.sglang.options import Options
from polarkvd.errors import ConfigError
from tests.sglang.conftest import Rig, RigError, unique

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(600)]


def _refused(rig: Rig, socket: Path | str, **spec: object) -> str:
    with pytest.raises(RigError) as err:
        rig.stack(unique("bad"), socket, **spec)
    return str(err.value.reply["message"])


def test_bad_configuration_is_refused_at_start_naming_the_option(
    daemon_factory, tmp_path: Path, a: Rig
) -> None:
    d = daemon_factory()
    sock = d.engine_socket

    msg = _refused(a, sock, layout="page_head")
    assert "hicache-mem-layout" in msg and "page_head" in msg

    msg = _refused(a, "run/engine.sock")
    assert "extra-config.socket" in msg and "absolute" in msg

    not_a_socket = tmp_path / "engine.sock"
    not_a_socket.write_text("")
    msg = _refused(a, not_a_socket)
    assert "extra-config.socket" in msg and "regular file" in msg
    msg = _refused(a, tmp_path)
    assert "extra-config.socket" in msg and "directory" in msg

    msg = _refused(a, sock, extra={"timeout": "soon"})
    assert "extra-config.timeout" in msg
    msg = _refused(a, sock, extra={"retry_seconds": 0})
    assert "extra-config.retry_seconds" in msg

    # A model shape polarkvd does not store: K and V heads of different sizes.
    msg = _refused(a, sock, v_head_dim=32)
    assert "model" in msg and "K and V head sizes differ" in msg

    # Unknown keys are SGLang's business as much as ours: a warning, not a refusal.
    since = len(a.log)
    ok = unique("ok")
    a.stack(ok, sock, extra={"prefetch_threshold": 64, "sockett": "/x"})
    assert any("sockett" in line for line in a.lines("not polarkvd options", since))
    a.send("close", name=ok)


def test_options_without_sglang() -> None:
    opts, unknown = Options.from_extra(
        {"backend_name": "polarkv", "interface_v1": 1, "timeout": 2, "engine_id": "e", "colour": "red"}
    )
    assert opts.timeout == 2.0 and opts.engine_id == "e" and unknown == ["colour"]
    with pytest.raises(ConfigError) as err:
        Options.from_extra({"model_fingerprint": 5, "commit_timeout": -1})
    assert "extra-config.model_fingerprint" in str(err.value)
    assert "extra-config.commit_timeout" in str(err.value)
