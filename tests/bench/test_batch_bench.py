"""`mirror-sd bench --batch`: batched ar / speculative / mirror on tiny models, identical-output
counts."""

from __future__ import annotations

import json

import pytest

from mirror_sd.bench import batch_bench
from mirror_sd.bench import cli as bench_cli
from tests.bench.test_bench import FP32_MAP, _write_questions
from tests.conftest import make_tiny, save_tiny_with_tokenizer
from tests.runtime.conftest import make_plan, tiny_model


def test_rows_per_method_and_size_with_identical_counts(tmp_path):
    target = tiny_model(tmp_path, "qwen2", seed=0, num_hidden_layers=4)
    draft = tiny_model(tmp_path, "qwen2", seed=1, num_hidden_layers=2)
    prompts = [[5, 3, 9], [1], [7, 7, 2, 8, 4], [6, 1]]
    with make_plan(target, draft, mode="speculative", num_draft_tokens=3) as plan:
        rows = batch_bench.run(plan, prompts, [1, 2, 4], 10)
    assert [(r.method, r.batch) for r in rows] == [
        (m, b) for m in ("ar", "speculative", "mirror") for b in (1, 2, 4)
    ]
    for r in rows:
        assert r.sequences == 4 and r.new_tokens == 40
        assert r.identical_to_batch1 == r.identical_to_ar == 4
        assert r.max_latency_s >= r.mean_latency_s > 0
    table = batch_bench.markdown(rows)
    assert "| speculative | 4 |" in table and "4/4 | 4/4 |" in table


def test_every_plan_method_runs_in_batches(tmp_path):
    """Retrieval sources, the SAM hybrid and sibling trees in batches: each sequence's tokens
    are its batch-1 run's and the target's."""
    target = tiny_model(tmp_path, "qwen2", seed=0, num_hidden_layers=4)
    draft = tiny_model(tmp_path, "qwen2", seed=1, num_hidden_layers=2)
    prompts = [[5, 3, 9, 5, 3], [1, 2, 1, 2, 1], [7, 7, 2, 8, 4]]
    methods = ["speculative+conf+sam", "pld", "speculative+tree"]
    with make_plan(target, draft, mode="speculative", num_draft_tokens=3) as plan:
        rows = batch_bench.run(plan, prompts, [1, 3], 12, methods=methods)
    assert [(r.method, r.batch) for r in rows] == [(m, b) for m in methods for b in (1, 3)]
    assert all(r.identical_to_batch1 == r.identical_to_ar == 3 for r in rows)


def test_bad_sizes_and_methods_are_named():
    assert batch_bench.parse_sizes("1, 2,4") == [1, 2, 4]
    for bad in ("", "0,2", "a"):
        with pytest.raises(ValueError, match="--batch"):
            batch_bench.parse_sizes(bad)
    with pytest.raises(ValueError, match="hf-ar"):
        batch_bench.run(None, [[1]], [1], 4, methods=["hf-ar"])


def test_cli_batch_writes_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIRROR_SD_CACHE", str(tmp_path / "cache"))
    t = save_tiny_with_tokenizer(make_tiny("qwen2", seed=0, num_hidden_layers=4), tmp_path / "t")
    d = save_tiny_with_tokenizer(make_tiny("qwen2", seed=1, num_hidden_layers=2), tmp_path / "d")
    q = _write_questions(tmp_path / "q.jsonl", per_task=1)
    out = tmp_path / "out"
    argv = ["--target", str(t), "--draft", str(d), "--device-map", FP32_MAP, "--batch", "1,3",
            "--questions", str(q), "--out", str(out), "--max-new-tokens", "6",
            "--exit-layer", "2", "--branch-budget", "4", "--max-len", "512", "--quiet"]  # fmt: skip
    assert bench_cli.main(argv) == 0
    rows = json.loads((out / "batch.json").read_text())
    assert {(r["method"], r["batch"]) for r in rows} == {
        (m, b) for m in ("ar", "speculative", "mirror") for b in (1, 3)
    }
    assert all(r["identical_to_batch1"] == r["sequences"] == 6 for r in rows)
    assert "identical to ar" in (out / "batch.md").read_text()
