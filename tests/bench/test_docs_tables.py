"""docs/benchmarks.md's tables are rebuilt from the results folders they name
(`mirror-sd bench --docs FILE [--check]`, bench/docs_tables.py)."""

import json
import shutil
from pathlib import Path

import pytest

from mirror_sd.bench import docs_tables
from mirror_sd.cli import main

ROOT = Path(__file__).parents[2]
RUN = "benchmarks/results/qwen1.5b-s2d-18"


def test_the_committed_docs_match_their_results():
    new, changed = docs_tables.regenerate(ROOT / "docs" / "benchmarks.md")
    assert changed == [], f"run `mirror-sd bench --docs docs/benchmarks.md`: {changed}"
    assert len(docs_tables.BLOCK.findall(new)) >= 6


def _repo(tmp_path: Path) -> Path:
    """A tiny repository: docs/x.md with one table of a copied results folder."""
    shutil.copytree(ROOT / RUN, tmp_path / RUN, ignore=shutil.ignore_patterns("*.png"))
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "x.md"
    doc.write_text(
        f"Prose.\n\n<!-- results: {RUN} methods=ar,jacobi -->\n<!-- /results -->\n\nEnd.\n"
    )
    return doc


def test_rebuild_then_check_then_a_changed_result_is_caught(tmp_path, capsys):
    doc = _repo(tmp_path)
    assert main(["bench", "--docs", str(doc), "--check"]) == 1  # the block is still empty
    assert main(["bench", "--docs", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("Prose.\n\n") and text.endswith("<!-- /results -->\n\nEnd.\n")
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [r.split(" | ")[0] for r in rows] == ["| `ar`", "| `jacobi`"]
    assert "| 9.30 |" in rows[0] and "0.70×" in rows[1] and "18/18" in rows[1]
    assert main(["bench", "--docs", str(doc), "--check"]) == 0

    # one generation's time changes in the results: the table no longer matches
    res = tmp_path / RUN / "results.json"
    doc_json = json.loads(res.read_text())
    next(r for r in doc_json["records"] if r["method"] == "jacobi")["wall_time"] *= 3
    res.write_text(json.dumps(doc_json))
    capsys.readouterr()
    assert main(["bench", "--docs", str(doc), "--check"]) == 1
    assert RUN in capsys.readouterr().out


def test_table_counts_outputs_and_labels_peers_as_another_model():
    def rec(method, q, tps, same):
        return {"question_id": q, "task": "qa", "method": method, "new_tokens": 10,
                "wall_time": 10 / tps, "tokens_per_s": tps, "accept_lengths": [5, 5],
                "drafted": [4, 4], "identical_to_ar": same, "draft_s": 0.5}  # fmt: skip

    records = [rec("ar", 1, 2.0, None), rec("ar", 2, 2.0, None),
               rec("speculative", 1, 4.0, True), rec("speculative", 2, 1.0, False),
               rec("ov-ar", 1, 1.0, False), rec("ov-ar", 2, 1.0, False)]  # fmt: skip
    text = docs_tables.table(records, ["ar", "speculative", "ov-ar"])
    spec = next(line for line in text.splitlines() if line.startswith("| `speculative`"))
    # total 20 tokens in 12.5 s = 1.60 tok/s; vs ov-ar (the fastest peer, 1.0): 1.60×, median
    # of 4.0 and 1.0 = 2.50×, won 1 of 2 (a tie is not a win); one output of two identical
    assert "| 1.60 |" in spec and "1.60× · 2.50× · 1/2" in spec and spec.endswith("| 1/2 |")
    assert "| 3125 (250) |" in spec  # 12.5 s over 4 rounds, 1 s of drafting over 4
    assert "another model (0/2)" in text


@pytest.mark.parametrize("marker, error", [
    ("benchmarks/results/nope", "no results.json or records.jsonl"),
    (f"{RUN} colour=red", "'colour=red' is not ref=METHOD"),
    (f"{RUN} ref=ov-ar", "ref=ov-ar: not a method of this run"),
    (f"{RUN} methods=ar,mirror", "methods=mirror: not in this run"),
])  # fmt: skip
def test_bad_markers_are_user_errors(tmp_path, capsys, marker, error):
    doc = _repo(tmp_path)
    doc.write_text(f"<!-- results: {marker} -->\n<!-- /results -->\n")
    assert main(["bench", "--docs", str(doc)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mirror-sd: error: bench --docs: ") and error in err, err


def test_missing_docs_file_is_a_user_error(tmp_path, capsys):
    assert main(["bench", "--docs", str(tmp_path / "none.md")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_identity_table_counts_token_ids_of_runs_and_batches(tmp_path, capsys):
    """`<!-- identity: RUN BATCH=RUN -->`: questions, generations and the non-`ar` ones equal to
    `ar`, from records.jsonl and a batch run's batch_records.jsonl; a changed id is caught."""
    run, batch = tmp_path / "runs" / "a", tmp_path / "runs" / "b4"
    run.mkdir(parents=True)
    batch.mkdir()
    rec = lambda q, m, t: {"question_id": q, "method": m, "tokens": t, "repeat": 0}  # noqa: E731
    groups = [
        [rec(1, "ar", [1, 2, 3]), rec(1, "speculative", [1, 2, 3]), rec(1, "pld", [1, 2, 4])],
        [rec(2, "ar", [5, 6, 7]), rec(2, "speculative", [5, 6, 7]), rec(2, "pld", [5, 6, 7])],
    ]
    (run / "records.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups) + '[{"cut')
    jobs = [
        {"method": "ar", "batch": 1, "question_ids": [1], "tokens": [[1, 2, 3]]},
        {"method": "mirror", "batch": 2, "question_ids": [1, 2], "tokens": [[1, 2], [5, 6]]},
    ]
    (batch / "batch_records.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "x.md"
    served = tmp_path / "runs" / "srv"
    served.mkdir()
    answers = [{"question_id": 1, "client": 0, "identical": True},
               {"question_id": 2, "client": 1, "identical": False}]  # fmt: skip
    (served / "replay_records.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    doc.write_text("<!-- identity: runs/a runs/b4=runs/a runs/srv -->\n<!-- /identity -->\n")
    assert main(["bench", "--docs", str(doc)]) == 0
    rows = doc.read_text().splitlines()[3:6]
    assert rows[0] == "| `runs/a` | 2 | ar, speculative, pld | 6 | 3 of 4 |"
    assert rows[1] == "| `runs/b4` (B = 2; against `runs/a`) | 2 | mirror | 2 | 2 of 2 |"
    assert rows[2].startswith("| `runs/srv` (through the server, 2 clients) | 2 |")
    assert rows[2].endswith("| 1 of 2 (ids and text) |")
    assert main(["bench", "--docs", str(doc), "--check"]) == 0
    jobs[1]["tokens"][1] = [5, 9]
    (batch / "batch_records.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    capsys.readouterr()
    assert main(["bench", "--docs", str(doc), "--check"]) == 1
    assert "runs/b4=runs/a" in capsys.readouterr().out
