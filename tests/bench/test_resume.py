"""`mirror-sd bench --resume`: a run that stopped keeps the questions it finished (records.jsonl)
and runs only the rest; a journal of other methods is refused."""

from __future__ import annotations

import json

import pytest

import mirror_sd.bench.runner as runner
from mirror_sd.bench.runner import JOURNAL_FILE, BenchConfig, run_bench
from tests.bench.test_bench import SPEC, _write_questions
from tests.conftest import TORCH_DRAFT_MAP, tiny_pair


@pytest.fixture
def cfg(tmp_path):
    target, draft, _ = tiny_pair(tmp_path / "models")
    return BenchConfig(
        target=str(target), draft=str(draft), device_map=TORCH_DRAFT_MAP, per_category=2,
        max_new_tokens=6, tasks=("mt_bench", "qa"), out=tmp_path / "out",
        questions=str(_write_questions(tmp_path / "q.jsonl")), speculation=SPEC,
        progress=False, command="test", hf_threads=1, methods=("ar", "speculative"),
    )  # fmt: skip


def test_a_resumed_run_runs_only_the_unfinished_questions(cfg, monkeypatch):
    first = run_bench(cfg)
    journal = cfg.out / JOURNAL_FILE
    lines = journal.read_text().splitlines()
    assert len(lines) == 4  # one per question, both methods in each
    journal.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])  # stopped mid-write
    ran = []
    record = runner._record
    monkeypatch.setattr(runner, "_record", lambda q, name, *a: ran.append((q.question_id, name))
                        or record(q, name, *a))  # fmt: skip
    again = run_bench(BenchConfig(**{**cfg.__dict__, "resume": True}))
    assert sorted({q for q, _ in ran}) == sorted({r["question_id"] for r in first["records"][4:]})
    assert len(ran) == 4 and again["settings"]["resumed_questions"] == 2
    assert [r["tokens"] for r in again["records"]] == [r["tokens"] for r in first["records"]]
    assert [bool(r.get("resumed")) for r in again["records"]] == [True] * 4 + [False] * 4
    assert len(journal.read_text().splitlines()) == 4  # the cut line dropped, two appended


def test_resuming_with_other_methods_is_refused(cfg):
    cfg.out.mkdir(parents=True)
    (cfg.out / JOURNAL_FILE).write_text(json.dumps([{"method": "mirror", "repeat": 0,
                                                     "question_id": 0}]) + "\n")  # fmt: skip
    with pytest.raises(ValueError, match=r"--resume: .* holds methods \['mirror'\]"):
        run_bench(BenchConfig(**{**cfg.__dict__, "resume": True}))


def test_every_process_of_a_resumed_run_is_recorded_and_a_changed_machine_warned(cfg):
    """sessions.jsonl: one line per process with its machine and plan; each record names its
    session; resuming on another machine (faked: the first line's CPU edited) warns, and
    results.json / results.md say which questions ran where."""
    import warnings

    from mirror_sd.bench.sessions import SESSIONS_FILE

    run_bench(cfg)
    journal, sessions = cfg.out / JOURNAL_FILE, cfg.out / SESSIONS_FILE
    journal.write_text("\n".join(journal.read_text().splitlines()[:2]) + "\n")
    resumed = BenchConfig(**{**cfg.__dict__, "resume": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # same machine, same plan: no warning
        again = run_bench(resumed)
    assert [json.loads(line)["session"] for line in sessions.read_text().splitlines()] == [0, 1]
    assert [r["session"] for r in again["records"]] == [0] * 4 + [1] * 4
    assert [s["questions"] for s in again["sessions"]] == [2, 2]
    assert "made by 2 processes" in (cfg.out / "results.md").read_text()

    first = json.loads(sessions.read_text().splitlines()[0])
    first["machine"]["cpu"] = "Another CPU"
    sessions.write_text(json.dumps(first) + "\n")
    journal.write_text("\n".join(journal.read_text().splitlines()[:2]) + "\n")
    with pytest.warns(RuntimeWarning, match=r"session 0 .* another machine or plan .*Another CPU"):
        run_bench(resumed)
    sessions.unlink()
    with pytest.warns(RuntimeWarning, match=r"4 finished questions but no sessions.jsonl"):
        run_bench(resumed)
    run_bench(cfg)  # a fresh run starts the file afresh
    assert len(sessions.read_text().splitlines()) == 1
