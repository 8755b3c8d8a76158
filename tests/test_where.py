"""`where` on one daemon: how many leading tokens of a prompt are cached here, by tier, answered
from the maps (no page touched), and a clear error for every kind of bad request."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from polarkvd.errors import PolarKVError
from tests.conftest import TEST_NS, DaemonProc, chain_tokens, store_chain

PT = TEST_NS.page_tokens


@pytest.fixture(scope="module")
def stored(module_daemon_factory) -> tuple[DaemonProc, list[int], list[bytes], str]:
    """Ten pages of a prompt's first eight stored; pages 5.. of them demoted to disk."""
    d = module_daemon_factory({"dram.high_watermark": "1.0", "metrics.address": "127.0.0.1:0"})
    tokens = chain_tokens(1, 10)
    with d.engine() as kv:
        keys = store_chain(kv, tokens[: 8 * PT])
        digest = kv.ns_digest.hex()
    with d.control() as c:
        c.evict_keys([keys[5]])
    return d, tokens, keys, digest


def test_leading_tokens_by_tier(stored) -> None:
    d, tokens, keys, digest = stored
    with d.engine(lookup_table=False) as kv:
        kv.lookup(keys)  # one engine lookup, counted: the counters below exist
    with d.control() as c:
        before = d.stats()["counters"]
        out = c.where({"namespace": digest, "tokens": tokens + [7] * (PT - 1)})  # a partial page too
        assert out["here"] == {"tokens": 8 * PT, "l1": 0, "dram": 5 * PT, "disk": 3 * PT}
        assert out["tokens"] == 10 * PT and out["page_tokens"] == PT and out["namespace"] == digest
        assert "cluster" not in out  # a daemon without a cluster
        # the same with the ids packed as uint32 little-endian bytes
        packed = np.asarray(tokens, "<u4").tobytes()
        assert c.where({"namespace": digest, "tokens": packed})["here"] == out["here"]
        # the same by model name and page keys
        by_model = c.where({"model": TEST_NS.model, "salt": "", "keys": keys[:6]})
        assert by_model["here"] == {"tokens": 6 * PT, "l1": 0, "dram": 5 * PT, "disk": PT}
        # another prompt that shares only the first page
        other = tokens[:PT] + chain_tokens(2, 3)
        assert c.where({"namespace": digest, "tokens": other})["here"]["tokens"] == PT
    after = d.stats()["counters"]
    assert "lookup_pages" in before  # the names below are the daemon's
    # answered from the maps: no lookup counted, nothing promoted from disk
    for name in (
        "lookups",
        "lookup_pages",
        "hit_pages_dram",
        "hit_pages_disk",
        "miss_pages",
        "promoted_pages",
    ):
        assert after.get(name, 0) == before.get(name, 0), name


BAD = [
    ({"tokens": [1, 2]}, "give either namespace"),
    ({"namespace": "ab" * 16, "model": "m", "tokens": [1]}, "give either namespace"),
    ({"namespace": "zz", "tokens": [1]}, "32 hex digits"),
    ({"namespace": "00" * 16, "tokens": [1]}, "not known here"),
    ({"model": "no-such-model", "tokens": [1]}, "no namespace of model"),
    ({"model": TEST_NS.model, "salt": 3, "tokens": [1]}, "salt a string"),
    ({"model": TEST_NS.model}, "give either tokens"),
    ({"model": TEST_NS.model, "tokens": "1 2 3"}, "array of token ids"),
    ({"model": TEST_NS.model, "tokens": [1, "x"]}, "integers from 0"),
    ({"model": TEST_NS.model, "tokens": [1, -5]}, "integers from 0"),
    ({"model": TEST_NS.model, "tokens": [1, 2**40]}, "integers from 0"),
    ({"model": TEST_NS.model, "tokens": [1.5, 2.5]}, "integers from 0"),
    ({"model": TEST_NS.model, "tokens": [[1], [2]]}, "integers from 0"),
    ({"model": TEST_NS.model, "keys": [b"short"]}, "16 bytes"),
    ({"model": TEST_NS.model, "tokens": b"\x01\x02\x03"}, "multiple of 4 bytes"),
    ({"model": TEST_NS.model, "tokens": [0] * (((1 << 16) + 1) * PT)}, "exceed the limit"),
    ({"model": TEST_NS.model, "tokens": [1], "page": 3}, "unknown arguments"),
]


@pytest.mark.parametrize(("args", "why"), BAD, ids=[w for _, w in BAD])
def test_bad_requests_get_a_clear_error(stored, args, why) -> None:
    d, tokens, _, digest = stored
    with d.control() as c:
        with pytest.raises(PolarKVError, match=why):
            c.where(args)
        assert c.where({"namespace": digest, "tokens": tokens[:PT]})["here"]["tokens"] == PT  # still serving


def test_cli_prints_tokens_by_tier(stored) -> None:
    d, tokens, _, digest = stored
    out = subprocess.run(
        [sys.executable, "-m", "polarkvd", "where", "--socket", str(d.control_socket), "--namespace", digest,
         "--tokens", ",".join(map(str, tokens))],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert f"{8 * PT} of {10 * PT} tokens here" in out.stdout
    assert f"DRAM {5 * PT}" in out.stdout and f"disk {3 * PT}" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "polarkvd", "where", "--socket", str(d.control_socket), "--model", "nope", "--tokens", "1,2"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode != 0 and "no namespace of model" in bad.stderr
    typo = subprocess.run(
        [sys.executable, "-m", "polarkvd", "where", "--socket", str(d.control_socket), "--model", "m", "--tokens", "1,2a"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert typo.returncode == 2 and "'2a' is not a token id" in typo.stderr


def test_each_engines_last_load_report_is_in_the_answer(stored) -> None:
    d, tokens, _, digest = stored
    query = {"namespace": digest, "tokens": tokens[:PT]}
    with d.engine(engine_id="vllm-a") as a, d.control() as c:
        assert "vllm-a" not in c.where(query)["engine_load"]  # attached, nothing reported yet
        a.report_load(2, 3, 4096, url="http://10.0.0.5:8000")
        load = c.where(query)["engine_load"]["vllm-a"]
        assert load["age_s"] < 30
        del load["age_s"]
        assert load == {
            "running": 2,
            "waiting": 3,
            "queued_prefill_tokens": 4096,
            "stale": False,
            "url": "http://10.0.0.5:8000",
        }
        shown = subprocess.run(
            [sys.executable, "-m", "polarkvd", "where", "--socket", str(d.control_socket), "--namespace", digest,
             "--tokens", ",".join(map(str, tokens[:PT]))],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "engine vllm-a: 0 tokens in its own cache; 2 running, 3 waiting, 4096 prefill tokens" in shown
        assert "at http://10.0.0.5:8000" in shown
        a.report_load(0, 0, 0)  # the last report counts
        load = c.where(query)["engine_load"]["vllm-a"]
        assert (load["running"], load["waiting"], load["queued_prefill_tokens"]) == (0, 0, 0)
        assert "url" not in load
        for args, why in (
            ((-1, 0, 0), "running must be an integer"),
            ((0, 2**21, 0), "waiting must be an integer"),
            ((0, 0, 1.5), "queued_prefill_tokens must be an integer"),
            ((0, 0, 0, "x" * 600), "url must be a string"),
        ):
            with pytest.raises(PolarKVError, match=why):
                a.report_load(*args)
        assert c.where(query)["engine_load"]["vllm-a"]["running"] == 0  # a bad report changes nothing
    with d.control() as c:  # the engine detached: its load is gone with it
        assert "vllm-a" not in c.where(query)["engine_load"]


def test_a_busy_engines_old_report_is_marked_stale() -> None:
    from polarkvd.server.engine_events import LOAD_STALE_SECONDS, EngineEvents, EngineLoad

    class Session:  # what EngineEvents reads of a manager session
        def __init__(self, sid: int, engine_id: str) -> None:
            self.id, self.engine_id = sid, engine_id
            self.ns = type("Info", (), {"digest": b"n" * 16})()

    now = [100.0]
    ev = EngineEvents(clock=lambda: now[0])
    busy, idle = Session(1, "busy"), Session(2, "idle")
    ev.report_load(busy, EngineLoad(1, 0, 100))
    ev.report_load(idle, EngineLoad(0, 0, 0))
    now[0] += LOAD_STALE_SECONDS + 1
    loads = ev.loads(b"n" * 16)
    assert loads["busy"]["stale"] and loads["busy"]["age_s"] == LOAD_STALE_SECONDS + 1
    assert not loads["idle"]["stale"]  # an idle engine is silent, and its zero still holds
    assert ev.loads(b"m" * 16) == {}  # another namespace's engines
    ev.detach(busy)
    assert list(ev.loads(b"n" * 16)) == ["idle"]


def http(d: DaemonProc, method: str, query: str = "", body: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of /where on the daemon's metrics endpoint."""
    m = re.search(r"metrics_url=(\S+)", d.log())
    assert m is not None, d.log()
    url = m.group(1).replace("/metrics", "/where") + (f"?{query}" if query else "")
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        assert e.headers["Content-Type"] == "application/json"
        return e.code, json.loads(e.read())


def test_where_over_http_answers_as_the_control_op(stored) -> None:
    d, tokens, keys, digest = stored
    with d.control() as c:
        want = c.where({"namespace": digest, "tokens": tokens})
    ids = ",".join(map(str, tokens))
    assert http(d, "GET", f"namespace={digest}&tokens={ids}") == (200, want)
    body = json.dumps({"model": TEST_NS.model, "salt": "", "tokens": tokens}).encode()
    assert http(d, "POST", body=body) == (200, want)
    by_keys = http(d, "GET", f"namespace={digest}&keys=" + ",".join(k.hex() for k in keys[:6]))
    assert by_keys[0] == 200 and by_keys[1]["here"]["tokens"] == 6 * PT


HTTP_BAD = [
    ("GET", "tokens=1,2", None, 400, "give either namespace"),
    ("GET", "namespace=zz&tokens=1", None, 400, "32 hex digits"),
    ("GET", "namespace=" + "00" * 16 + "&tokens=1", None, 404, "not known here"),
    ("GET", "model=x&model=y&tokens=1", None, 400, "given twice"),
    ("GET", f"model={TEST_NS.model}&tokens=1,x", None, 400, "tokens must be integers"),
    ("GET", f"model={TEST_NS.model}&tokens=1,-5", None, 400, "integers from 0"),
    ("GET", f"model={TEST_NS.model}&keys=abc", None, 400, "32 hex digits each"),
    ("GET", f"model={TEST_NS.model}&keys=abcd", None, 400, "16 bytes"),
    ("GET", f"model={TEST_NS.model}&tokens=1&page=3", None, 400, "unknown arguments"),
    ("POST", "", b"{not json", 400, "must be a JSON object"),
    ("POST", "", b"[1, 2]", 400, "must be a JSON object"),
    ("POST", "", json.dumps({"model": TEST_NS.model, "tokens": "1 2"}).encode(), 400, "array of token ids"),
    ("POST", "", json.dumps({"model": TEST_NS.model, "keys": [1]}).encode(), 400, "32 hex digits each"),
    ("DELETE", "", None, 405, "not allowed"),
]


@pytest.mark.parametrize(
    ("method", "query", "body", "status", "why"), HTTP_BAD, ids=[b[4] + " " + b[0] for b in HTTP_BAD]
)
def test_bad_http_requests_get_a_json_error(stored, method, query, body, status, why) -> None:
    d, tokens, _, digest = stored
    got, out = http(d, method, query, body)
    assert got == status and why in out["error"], out
    assert (
        http(d, "GET", f"namespace={digest}&tokens=" + ",".join(map(str, tokens[:PT])))[0] == 200
    )  # still serving
