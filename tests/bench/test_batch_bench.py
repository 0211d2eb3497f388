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


def _records_line(groups: list[dict]) -> str:
    """A Spec-Bench run's records.jsonl from batch-1 groups: one line per question."""
    by_q: dict[int, list[dict]] = {}
    for g in groups:
        by_q.setdefault(g["question_ids"][0], []).append(
            {"question_id": g["question_ids"][0], "method": g["method"], "repeat": 0,
             "tokens": g["tokens"][0]}
        )  # fmt: skip
    return "".join(json.dumps(v) + "\n" for v in by_q.values())


def test_journal_resume_and_reference(tmp_path, monkeypatch):
    """Every group goes to the journal with its token ids; --resume runs only the groups the
    journal lacks; a reference's batch-1 ids replace batch 1, a changed one is reported with
    the target's margin there, and a reference of another plan is refused."""
    target = tiny_model(tmp_path, "qwen2", seed=0, num_hidden_layers=4)
    draft = tiny_model(tmp_path, "qwen2", seed=1, num_hidden_layers=2)
    prompts = [[5, 3, 9], [1, 4], [7, 7, 2, 8, 4], [6, 1], [2, 2, 3]]
    ids = [11, 12, 13, 14, 15]
    journal = tmp_path / "batch_records.jsonl"
    with make_plan(target, draft, mode="speculative", num_draft_tokens=3) as plan:
        calls = []
        real = plan.generate
        monkeypatch.setattr(
            plan, "generate", lambda p, *a, **k: calls.append(p) or real(p, *a, **k)
        )
        rows = batch_bench.run(plan, prompts, [2], 8, ["speculative"], ids=ids, journal=journal)
        groups = [json.loads(line) for line in journal.read_text().splitlines()]
        # batch 1 of ar and speculative (5 + 5), then 3 groups of speculative at B=2
        assert len(groups) == len(calls) == 13
        assert [g["question_ids"] for g in groups[-3:]] == [[11, 12], [13, 14], [15]]
        assert all(len(t) == 8 for g in groups for t in g["tokens"])
        assert set(groups[0]["sources"]) == {"target"} and groups[-1]["sources"]["draft"] > 0
        assert rows[0].identical_to_ar == 5 and rows[0].differ_from_ar == ()

        journal.write_text("".join(json.dumps(g) + "\n" for g in groups[:-1]))
        calls.clear()
        again = batch_bench.run(plan, prompts, [2], 8, ["speculative"], ids=ids,
                                journal=journal, resume=True)  # fmt: skip
        assert calls == [[[2, 2, 3]]] and again[0].identical_to_ar == 5  # only the missing group

        run_dir = tmp_path / "ref"
        run_dir.mkdir()
        single = [g for g in groups if g["batch"] == 1 and g["question_ids"] != [14]]
        changed = json.loads(json.dumps(single))
        for g in changed:
            if g["method"] == "ar" and g["question_ids"] == [12]:
                g["tokens"][0][5] += 1
        (run_dir / "records.jsonl").write_text(_records_line(changed))
        reference = batch_bench.load_reference(run_dir)
        calls.clear()
        rows = batch_bench.run(plan, prompts, [2], 8, ["speculative"], ids=ids,
                               reference=reference)  # fmt: skip
        # ar once on the first question (the plan check), then the groups without question 14
        assert calls == [[5, 3, 9], [[5, 3, 9], [1, 4]], [[2, 2, 3]]]
        (row,) = rows
        assert row.sequences == 3 and row.identical_to_ar == 2 and row.identical_to_batch1 == 3
        (d,) = row.differ_from_ar
        assert d["question_id"] == 12 and d["first_difference"] == 5
        assert d["margin"] >= 0 and len(d["target_top2"]) == 2
        assert "question 12 parts from `ar` at new token 5" in batch_bench.markdown(rows)

        wrong = json.loads(json.dumps(single))
        wrong[0]["tokens"][0][0] += 1  # question 11's ar: the plan check's question
        (run_dir / "records.jsonl").write_text(_records_line(wrong))
        with pytest.raises(ValueError, match="another plan"):
            batch_bench.run(plan, prompts, [2], 8, ["speculative"], ids=ids,
                            reference=batch_bench.load_reference(run_dir))  # fmt: skip
        with pytest.raises(ValueError, match="no mirror records"):
            batch_bench.run(plan, prompts, [2], 8, ["mirror"], ids=ids, reference=reference)
        calls.clear()
        with pytest.raises(ValueError, match="which one batch shares"):  # before any group runs
            batch_bench.run(plan, [*prompts[:2], [3] * 300, [4] * 300, prompts[4]], [1, 2], 8, ["speculative"],
                            ids=ids, reference=reference)  # fmt: skip
        assert calls == []
        with pytest.raises(ValueError, match="--stop-at-eos"):
            batch_bench.run(plan, prompts, [2], 8, ["speculative"], [0], ids=ids,
                            reference=reference)  # fmt: skip
    with pytest.raises(ValueError, match="no records.jsonl"):
        batch_bench.load_reference(tmp_path / "nowhere")


def test_cli_batch_against_a_spec_bench_run(tmp_path, monkeypatch):
    """`--batch 3 --reference RUN`: batch 1 comes from the run's records; the groups and their
    token ids are journaled, and the run is recorded (machine, command, question ids)."""
    monkeypatch.setenv("MIRROR_SD_CACHE", str(tmp_path / "cache"))
    t = save_tiny_with_tokenizer(make_tiny("qwen2", seed=0, num_hidden_layers=4), tmp_path / "t")
    d = save_tiny_with_tokenizer(make_tiny("qwen2", seed=1, num_hidden_layers=2), tmp_path / "d")
    q = _write_questions(tmp_path / "q.jsonl", per_task=1)
    common = ["--target", str(t), "--draft", str(d), "--device-map", FP32_MAP, "--questions",
              str(q), "--max-new-tokens", "6", "--exit-layer", "2", "--branch-budget", "4",
              "--max-len", "512", "--quiet"]  # fmt: skip
    run = tmp_path / "run"
    assert bench_cli.main([*common, "--methods", "ar,speculative", "--out", str(run)]) == 0
    out = tmp_path / "out"
    argv = [*common, "--batch", "3", "--methods", "speculative", "--reference", str(run),
            "--out", str(out)]  # fmt: skip
    assert bench_cli.main(argv) == 0
    (row,) = json.loads((out / "batch.json").read_text())
    assert (row["batch"], row["sequences"], row["identical_to_ar"]) == (3, 6, 6)
    groups = [json.loads(line) for line in (out / "batch_records.jsonl").read_text().splitlines()]
    assert [(g["method"], g["batch"]) for g in groups] == [("ar", 1), ("speculative", 3),
                                                           ("speculative", 3)]  # fmt: skip
    meta = json.loads((out / "batch_run.json").read_text())
    assert meta["reference"] == str(run) and len(meta["question_ids"]) == 6
    assert meta["machine"]["cpu"] and meta["command"] and meta["versions"]["onnxruntime"]
    with pytest.raises(SystemExit, match="no records.jsonl"):
        bench_cli.main([*argv[:-4], "--reference", str(tmp_path), "--out", str(out)])
    with pytest.raises(SystemExit, match="add --batch"):
        bench_cli.main([*common, "--reference", str(run), "--out", str(out)])
