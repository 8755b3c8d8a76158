"""What an operator does to set up a cluster, and what a misbehaving peer gets back.

keygen writes a private key file; a daemon refuses a key file others can read, a broken one or
none at all (unless insecure is chosen explicitly, which it warns about); `status --cluster` says
when a daemon is not in a cluster; garbage sent to the peer service gets error replies and the
daemon keeps serving.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from polarkvd.cluster.auth import generate, read_key_file, write_key_file
from polarkvd.errors import ConfigError, PolarKVError
from polarkvd.transport.peer_client import PeerClient
from polarkvd.transport.peer_wire import data_key
from tests.conftest import TEST_NS, bad_pages, chain_tokens, store_chain

pytestmark = pytest.mark.cluster


def polarkvd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polarkvd", *args], capture_output=True, text=True, timeout=60
    )


def test_keygen_writes_a_private_pair_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    r = polarkvd("keygen", "--out", str(path))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keys = read_key_file(path)
    r = polarkvd("keygen", "--out", str(path))
    assert r.returncode == 1 and "--force" in r.stderr
    assert read_key_file(path) == keys  # untouched
    r = polarkvd("keygen", "--out", str(path), "--force")
    assert r.returncode == 0 and read_key_file(path) != keys


@pytest.mark.parametrize(
    "content, mode, reason",
    [
        (None, 0o600, "no such file"),
        ("public = 'x'\nsecret = 'y'\n", 0o600, "40-character"),
        ("not toml [", 0o600, "not a key file"),
        ("GOOD", 0o644, "chmod 600"),
        ("MISMATCH", 0o600, "does not belong"),
    ],
)
def test_bad_key_files_are_refused_with_the_reason(
    tmp_path: Path, content: str | None, mode: int, reason: str
) -> None:
    path = tmp_path / "k"
    if content == "GOOD":
        write_key_file(path, generate())
    elif content == "MISMATCH":
        a, b = generate(), generate()
        path.write_text(f'public = "{a.public.decode()}"\nsecret = "{b.secret.decode()}"\n')
    elif content is not None:
        path.write_text(content)
    if path.exists():
        os.chmod(path, mode)
    with pytest.raises(ConfigError) as info:
        read_key_file(path)
    assert reason in str(info.value) and "cluster.key_file" in str(info.value)


def test_a_daemon_refuses_to_start_a_cluster_without_a_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[cluster]\nenabled = true\n")
    r = polarkvd("check-config", str(cfg))
    assert r.returncode == 78 and "polarkvd keygen" in r.stderr and "insecure" in r.stderr
    loose = tmp_path / "loose.key"
    write_key_file(loose, generate())
    os.chmod(loose, 0o644)
    r = polarkvd(
        "serve", "--set", "cluster.enabled=true", "--set", f"cluster.key_file={loose}",
        "--set", f"daemon.runtime_dir={tmp_path / 'run'}", "--set", f"daemon.state_dir={tmp_path / 'state'}",
        "--set", "dram.capacity=64MiB", "--set", "dram.slab_bytes=1MiB", "--set", "metrics.address=off",
    )  # fmt: skip
    assert r.returncode == 78 and "chmod 600" in r.stderr


def test_insecure_mode_works_and_warns(daemon_factory) -> None:
    d = daemon_factory(
        {
            "cluster.enabled": "true",
            "cluster.insecure": "true",
            "cluster.node_id": "solo",
            "cluster.gossip_address": "127.0.0.1:0",
            "cluster.data_address": "127.0.0.1:0",
        }
    )
    assert "peers are NOT authenticated" in d.log()
    with d.control() as c:
        rep = c.cluster()
    assert rep["enabled"] and rep["authenticated"] is False and rep["alive"] == 1
    r = polarkvd("status", "--cluster", "--socket", str(d.control_socket))
    assert r.returncode == 0 and "INSECURE" in r.stdout and "solo *" in r.stdout
    url = next(
        line.split("metrics_url=")[1].split()[0] for line in d.log().splitlines() if "metrics_url=" in line
    )
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    assert 'polarkv_cluster_members{state="alive"} 1.0' in text
    assert 'polarkv_cluster_members{state="dead"} 0.0' in text


def test_status_cluster_on_a_single_host_daemon(daemon) -> None:
    r = polarkvd("status", "--cluster", "--socket", str(daemon.control_socket))
    assert r.returncode == 0 and "not in a cluster" in r.stdout


# ---------------------------------------------------------------------- bad input to the peer service


@pytest.fixture
def peer(daemon_factory, tmp_path: Path):
    key = tmp_path / "k"
    write_key_file(key, generate())
    d = daemon_factory(
        {
            "cluster.enabled": "true",
            "cluster.key_file": str(key),
            "cluster.node_id": "p",
            "cluster.gossip_address": "127.0.0.1:0",
            "cluster.data_address": "127.0.0.1:0",
            "cluster.dmp_bytes": "4MiB",
        }
    )
    with d.control() as c:
        addr = c.cluster()["data_address"]
    client = PeerClient(key=data_key(read_key_file(key).secret), timeout=5)
    yield d, addr, client
    client.close()


def _error(client: PeerClient, addr: str, op: str, args: dict, **kw) -> str:
    with pytest.raises(PolarKVError) as info:
        client.call(addr, op, args, **kw)
    return info.value.code.value


def test_garbage_to_the_peer_service_gets_errors_and_changes_nothing(peer) -> None:
    d, addr, client = peer
    with d.engine() as kv:
        keys = store_chain(kv, chain_tokens(11, 4))
    with d.engine() as kv:
        ns_digest = kv.ns_digest
    assert _error(client, addr, "get", {"keys": "nope", "ns": ns_digest}) == "bad_request"
    assert _error(client, addr, "get", {"keys": [b"short"], "ns": ns_digest}) == "bad_request"
    assert _error(client, addr, "get", {"keys": keys}) == "bad_request"  # no namespace
    assert _error(client, addr, "where", {"keys": [1, 2]}) == "bad_request"
    assert _error(client, addr, "announce", {"from": "x", "batch": b"\x93garbage"}) == "bad_request"
    assert _error(client, addr, "announce", {"batch": 3}) == "bad_request"
    assert _error(client, addr, "frobnicate", {}) == "unknown_op"
    # put: payload count must match keys; parents must be keys or nil
    page = b"\x01" * TEST_NS.page_bytes
    assert (
        _error(client, addr, "put", {"ns": ns_digest, "keys": [b"k" * 16], "parents": [None]})
        == "bad_request"
    )
    assert (
        _error(client, addr, "put", {"ns": ns_digest, "keys": [b"k" * 16], "parents": ["x"]}, payloads=[page])
        == "bad_request"
    )
    # a page for a foreign namespace is not served as ours
    header, ok = client.call(addr, "get", {"ns": b"\x00" * 16, "keys": keys}, into=lambda h: [])
    assert header["sizes"] == [] and ok == []
    # raw garbage on a fresh TCP connection: dropped, server keeps serving
    host, port = addr.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(struct.pack("!I", 0xFFFFFFFF) + os.urandom(64))
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    # still serving: the real pages, byte-exact, to a peer and to the engine
    views = [memoryview(bytearray(TEST_NS.page_bytes)) for _ in keys]
    header, ok = client.call(
        addr, "get", {"ns": ns_digest, "keys": keys}, into=lambda h: views[: len(h["sizes"])]
    )
    assert ok == [True] * len(keys)
    with d.engine() as kv:
        assert bad_pages(kv, keys, views) == []
        assert kv.lookup(keys).hits == len(keys)
    assert d.proc.poll() is None


def test_a_page_lent_to_the_pool_is_served_back_byte_exact(peer) -> None:
    d, addr, client = peer
    with d.engine() as kv:
        ns_digest = kv.ns_digest
    good = os.urandom(TEST_NS.page_bytes)
    header, _ = client.call(
        addr, "put", {"ns": ns_digest, "keys": [b"g" * 16], "parents": [None]}, payloads=[good]
    )
    assert header["stored"] == 1
    st = d.stats()["tiers"]["dmp"]
    assert st["pages"] == 1
    view = memoryview(bytearray(TEST_NS.page_bytes))
    header, ok = client.call(addr, "get", {"ns": ns_digest, "keys": [b"g" * 16]}, into=lambda h: [view])
    assert ok == [True] and bytes(view) == good
