"""`bench blend --prompt-range` pieces merged with `--merge`: one result, as the whole run prints it;
pieces of other runs, overlapping pieces and files that are not pieces are refused with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from polarkvd.bench.blend import _CONFIG, SETTINGS, merge, render, summarize
from tests.conftest import REPO_ROOT, clean_env

CONFIG = {
    "model": "smollm2-135m", "prompts_total": 6, "seed": 0, "pool_chunks": 40, "chunks_per_prompt": [4, 8],
    "chunk_tokens": [256, 512], "answer_tokens": 32, "page_tokens": 32, "torch_threads": 2,
    "chunks_behind_header": True, "keep_last": 64,
}  # fmt: skip


def _row(setting: str, n: int) -> dict[str, Any]:
    good = setting in ("full", "prefix") or n % 3 != 0  # every third prompt missed by the blends
    return {
        "ttft_s": 5.0 if setting in ("full", "prefix") else 0.2 + n / 100, "tokens": 2000 + n,
        "loaded_tokens": 0, "chunk_tokens": 1900, "instruction": n % 3, "recomputed": 0, "reused": 1900,
        "first_token": good, "answer": 1.0 if good else 0.5, "loglik": -100.0 - n,
        "loglik_rel_diff": 0.0 if setting == "full" else 0.01 * n, "kl": 0.0 if setting == "full" else 0.1,
        "prompt": n,
    }  # fmt: skip


def _piece(tmp_path: Path, a: int, b: int, **config: Any) -> Path:
    per = {s: [_row(s, n) for n in range(a, b)] for s in SETTINGS}
    res = {**summarize(per, {**CONFIG, **config}), "prompt_range": [a, b], "per_prompt": per,
           "chunks_pinned": {"pinned_pages": b - a, "pinned_bytes": 1000 * (b - a)}}  # fmt: skip
    path = tmp_path / f"piece-{a}-{b}.json"
    path.write_text(json.dumps(res))
    return path


def test_pieces_merge_into_what_the_whole_run_gives(tmp_path: Path) -> None:
    whole = summarize({s: [_row(s, n) for n in range(6)] for s in SETTINGS}, CONFIG)
    merged = merge([str(_piece(tmp_path, 4, 6)), str(_piece(tmp_path, 0, 2)), str(_piece(tmp_path, 2, 4))])
    assert merged["prompts"] == 6 and merged["prompt_range"] == [0, 6]
    assert merged["pieces"] == [[0, 2], [2, 4], [4, 6]]
    assert [p["pinned_pages"] for p in merged["chunks_pinned"]] == [2, 2, 2]
    assert merged["settings"] == whole["settings"]
    assert merged["first_token_agreement_r15"] == pytest.approx(4 / 6)
    assert render(merged) == render(whole)


def test_pieces_of_other_runs_or_overlapping_pieces_are_refused(tmp_path: Path) -> None:
    a = str(_piece(tmp_path, 0, 3))
    with pytest.raises(SystemExit, match="overlap"):
        merge([a, str(_piece(tmp_path, 2, 5))])
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(SystemExit, match="another run.*seed"):
        merge([a, str(_piece(other, 3, 6, seed=1))])
    with pytest.raises(SystemExit, match="another run.*keep_last"):  # another method
        merge([a, str(_piece(other, 3, 6, keep_last=0))])
    not_piece = tmp_path / "x.json"
    not_piece.write_text(json.dumps({"bench": "datapath"}))
    with pytest.raises(SystemExit, match="not a bench blend"):
        merge([a, str(not_piece)])
    with pytest.raises(SystemExit, match="cannot read"):
        merge([a, str(tmp_path / "missing.json")])
    assert "seed" in _CONFIG and "prompts_total" in _CONFIG


def test_a_bad_prompt_range_is_refused_before_anything_is_loaded() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "polarkvd", "bench", "blend", "--prompts", "10", "--prompt-range", "5:20"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=clean_env(), timeout=60,
    )  # fmt: skip
    assert out.returncode != 0 and "--prompt-range 5:20 is not a range inside 0:10" in out.stderr
