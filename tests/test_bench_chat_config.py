"""`polarkvd bench chat` without vLLM: `--block-size` validation, the accounting at block 32 (KV
sizing, hits, loaded tokens), the peers' ratios and bars, and a missing peer reported with its reason."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from polarkvd.bench import chat
from polarkvd.bench.harness import PeerUnavailable, lmcache_server, mooncake_store
from polarkvd.cli import build_parser


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", "chat", *argv])


def test_block_size_defaults_to_128_and_takes_multiples_of_32() -> None:
    assert parse().block_size == 128
    for n in (32, 64, 96, 256):
        assert parse("--block-size", str(n)).block_size == n


@pytest.mark.parametrize(
    ("value", "why"),
    [("48", "not a positive multiple of 32"), ("0", "not a positive multiple of 32"),
     ("-32", "not a positive multiple of 32"), ("16", "not a positive multiple of 32"),
     ("abc", "not a whole number")],
)  # fmt: skip
def test_bad_block_size_is_an_argparse_error(
    value: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        parse("--block-size", value)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--block-size" in err and why in err, err


def test_help_says_the_units(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--help")
    out = " ".join(capsys.readouterr().out.split())
    assert "each of --block-size tokens" in out  # --kv-blocks
    assert "a multiple of 32 (default 128)" in out
    for name in chat.CONFIGS:
        assert name in out
    assert parse().configs == list(chat.CONFIGS)  # the peers run by default


def test_lmcache_chunk_must_be_a_multiple_of_the_block() -> None:
    args = parse("--block-size", "64", "--lmcache-chunk", "96")
    with pytest.raises(SystemExit, match="--lmcache-chunk 96 is not a multiple of --block-size 64"):
        chat.run(args)


def test_kv_blocks_must_hold_one_conversation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat, "build_workload", lambda args, model_dir: workload(200, 300, [64, 64, 64, 64]))
    args = parse("--block-size", "32", "--users", "2", "--rounds", "2", "--answer", "16", "--hot-users", "1",
                 "--kv-blocks", "28", "--model", "unused")  # fmt: skip
    # longest prompt 852 + 16 answer: max_model_len 896 = 28 blocks, plus vLLM's null block
    with pytest.raises(
        SystemExit, match="--kv-blocks 28 cannot hold the longest conversation: at least 29 blocks"
    ):
        chat.run(args)


def workload(system: int, doc: int, turns: list[int], users: int = 2) -> dict[str, Any]:
    """A synthetic workload with the same shape build_workload makes (no tokenizer needed)."""
    return {"system": [1] * system, "user_open": [2] * 5, "doc_sep": [3] * 2, "assistant_open": [4] * 6,
            "docs": [[5] * doc for _ in range(users)], "turns": [[[6] * n for n in turns] for _ in range(users)]}  # fmt: skip


def test_engine_sizing_follows_the_block_size() -> None:
    args = parse("--block-size", "32", "--users", "2", "--rounds", "2", "--answer", "16", "--hot-users", "0")
    wl = workload(200, 300, [64, 64, 64, 64])
    size = chat.engine_sizing(args, wl)
    longest = chat.prompt_tokens(wl, 16, 1)  # 200+5+300+2 +64+6 +16+5+64+6 = 668
    assert size["longest_prompt_tokens"] == longest == 668
    assert size["block_size"] == 32
    assert size["max_model_len"] == 704  # 668 + 16 answer = 684, up to a multiple of 32
    assert size["kv_tokens"] == size["kv_blocks"] * 32
    final = longest + 16
    all_tokens = 200 + 2 * (final - 200)
    assert size["all_histories_tokens"] == all_tokens
    one = 704 // 32
    assert size["kv_blocks"] == max(one + 2, one + (-(-all_tokens // 32) - one) // 2)
    at128 = chat.engine_sizing(
        parse("--users", "2", "--rounds", "2", "--answer", "16", "--hot-users", "0"), wl
    )
    assert at128["max_model_len"] == 768 and at128["kv_tokens"] == at128["kv_blocks"] * 128
    pinned = chat.engine_sizing(parse("--block-size", "32", "--kv-blocks", "7"), wl)
    assert pinned["kv_blocks"] == 7 and pinned["kv_tokens"] == 7 * 32


def test_loaded_tokens_count_blocks_of_the_chosen_size() -> None:
    rec = chat.connector_record({"load_blocks": 38, "load_copy_seconds": 0.01, "saved_pages": 3}, 32)
    assert rec["loaded_tokens"] == 38 * 32
    assert rec["saved_pages"] == 3 and rec["load_failed_blocks"] == 0
    assert chat.connector_record({"load_blocks": 9}, 128)["loaded_tokens"] == 9 * 128


def request(rnd: int, user: int, prompt: int, cached: int, ttft: float, external: int | None = None,
            phase: str = "rounds", out: tuple[int, ...] = (7, 8)) -> dict[str, Any]:  # fmt: skip
    q = {"phase": phase, "round": rnd, "user": user, "prompt_tokens": prompt, "cached_tokens": cached,
         "ttft_s": ttft, "latency_s": ttft + 0.5, "output_ids": list(out)}  # fmt: skip
    if external is not None:
        q["external_tokens"] = external
    return q


def test_a_hit_is_counted_against_the_block_size() -> None:
    # turn 64 + answer 16 + two partial blocks: 144 tokens may be computed at block 32, 336 at 128
    reqs = [
        request(1, 0, 600, 0, 2.0, 0),
        request(2, 0, 700, 540, 0.3, 500),
        request(2, 1, 700, 600, 0.2, 560),
    ]
    raw = {"requests": reqs, "wall_s": 10.0}
    at32 = chat.summarize(raw, parse("--block-size", "32", "--rounds", "2", "--answer", "16"))
    assert chat.hit_slack(parse("--block-size", "32", "--answer", "16")) == 144
    assert at32["hit_requests"] == 1  # 160 computed is no hit at block 32; 100 is
    assert at32["hit_ttft_s"]["mean"] == pytest.approx(0.2)
    at128 = chat.summarize(raw, parse("--rounds", "2", "--answer", "16"))
    assert at128["hit_requests"] == 2
    assert at32["rounds"][1]["external_tokens_total"] == 1060
    assert at32["ttft_rounds2plus_s"]["mean"] == pytest.approx(0.25)


def summary(name: str, ttft2: float, wall: float, out: tuple[int, ...] = (7, 8)) -> dict[str, Any]:
    reqs = [request(1, 0, 600, 0, 2.0, 0, out=out), request(2, 0, 700, 640, ttft2, 600, out=out)]
    return chat.summarize({"requests": reqs, "wall_s": wall}, parse("--rounds", "2"))


def test_peers_ratios_bars_and_identical_outputs() -> None:
    configs = {"polarkvd": summary("polarkvd", 0.1, 4.0), "lmcache": summary("lmcache", 0.5, 8.0),
               "mooncake": summary("mooncake", 0.125, 4.0)}  # fmt: skip
    outputs = {
        n: {(q["phase"], q["round"], q["user"]): [7, 8] for q in c["per_request"]} for n, c in configs.items()
    }
    res = chat.compare(configs, outputs)
    assert res["ttft_ratio_vs_lmcache"] == pytest.approx(0.2)
    assert res["ttft_ratio_vs_mooncake"] == pytest.approx(0.8)
    assert res["throughput_ratio_vs_lmcache"] == pytest.approx(2.0)
    assert res["throughput_ratio_vs_mooncake"] == pytest.approx(1.0)
    bars = res["bars"]
    assert bars["ttft_ratio_vs_lmcache"]["pass"] is True and bars["ttft_ratio_vs_lmcache"]["bar"] == "<= 0.4"
    assert (
        bars["ttft_ratio_vs_mooncake"]["pass"] is False and bars["ttft_ratio_vs_mooncake"]["bar"] == "<= 0.7"
    )
    assert (
        bars["throughput_ratio_vs_lmcache"]["pass"] is True and bars["throughput_ratio_vs_mooncake"]["pass"]
    )
    assert res["outputs_identical"] is True
    assert res["outputs_compared"]["configs"] == ["polarkvd", "lmcache", "mooncake"]
    outputs["mooncake"][("rounds", 2, 0)] = [7, 9]  # a peer that answers differently is caught
    res = chat.compare(configs, outputs)
    assert res["outputs_identical"] is False
    assert res["outputs_compared"]["mismatches"][0]["config"] == "mooncake"
    missing = chat.compare({"polarkvd": configs["polarkvd"]}, {"polarkvd": outputs["polarkvd"]})
    assert (
        missing["ttft_ratio_vs_lmcache"] is None and missing["bars"]["ttft_ratio_vs_lmcache"]["pass"] is None
    )


def test_a_peer_not_installed_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLARKV_BENCH_PEERS", str(tmp_path / "nowhere"))
    with pytest.raises(PeerUnavailable, match="lmcache is not installed .*setup-bench-peers.sh"):
        with lmcache_server(tmp_path, 32, 1 << 30, {}):
            pass
    with pytest.raises(PeerUnavailable, match="mooncake-transfer-engine-non-cuda is not installed"):
        with mooncake_store(tmp_path, 1 << 30, {}):
            pass


def test_a_peer_server_and_its_children_are_stopped_on_an_error(tmp_path: Path) -> None:
    """What the bench does with a peer's server when anything goes wrong inside: its whole process
    group is gone (here a shell and the child it left running)."""
    import os
    import sys

    from polarkvd.bench.harness import server_group

    argv = ["sh", "-c", "sleep 300 & echo started; wait"]
    with pytest.raises(RuntimeError, match="the run failed"):
        with server_group(argv, tmp_path / "srv.log", dict(os.environ), lambda: True, "test server") as proc:
            pgid = proc.pid
            raise RuntimeError("the run failed")
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # no process of the group is left
    with pytest.raises(PeerUnavailable, match=r"test server exited with 3: boom \(log "):
        with server_group([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "bad.log",
                          dict(os.environ), lambda: False, "test server"):  # fmt: skip
            pass


def test_a_worker_that_only_logs_is_killed_for_no_progress(tmp_path: Path) -> None:
    """A vLLM worker that retries a failing connector forever keeps logging; only progress events
    count, so it is killed and the peer reported, instead of the bench hanging."""
    import os
    import sys

    from polarkvd.bench.harness import relay_worker

    script = "import sys, time\nprint('@@t {\"event\": \"ready\"}', flush=True)\nwhile True:\n    print('E retry', flush=True)\n    time.sleep(0.05)\n"
    events: list[dict[str, Any]] = []
    code, tail, stalled = relay_worker([sys.executable, "-c", script], dict(os.environ), tmp_path, tmp_path / "w.log",
                                       "@@t ", events.append, silence_s=2)  # fmt: skip
    assert stalled and code != 0
    assert events == [{"event": "ready"}]
    assert tail[-1].strip() == "E retry"
