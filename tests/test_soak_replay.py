"""`scripts/soak.py replay` on tiny random models: a small Spec-Bench reference run (`ar` only,
EOS off, as the bench runs) replayed through the server from several clients gives every
answer identical to the reference's `ar` (cut at EOS), resumes from its journal, reports an
altered reference as changed, and refuses a reference the plan did not make."""

import json
import shutil
from pathlib import Path

import pytest

from mirror_sd.bench import cli as bench_cli
from mirror_sd.soak.cli import main
from mirror_sd.soak.replay import JOURNAL, Question, expected_answer, judge
from tests.bench.test_bench import _write_questions
from tests.conftest import (
    TORCH_DRAFT_MAP,
    make_tiny,
    make_tokenizer,
    save_tiny_with_tokenizer,
    tiny_pair,
)

NEW_TOKENS = 16
CUT = 1  # the question (index in the reference) whose answer an extra EOS id cuts short


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A reference run of six questions (16 new tokens, `ar` only), the replay flags, and one
    replay of it (3 clients, half the requests streamed). After the reference ran, a token of
    question CUT's `ar` output becomes an EOS id of the target's generation_config, so that the
    server stops there: the bench ran with EOS off, and its tokens do not change."""
    root = tmp_path_factory.mktemp("replay")
    target, draft, _ = tiny_pair(root)
    device_map = root / "map.yaml"
    device_map.write_text(TORCH_DRAFT_MAP)
    questions = _write_questions(root / "q.jsonl", per_task=1)
    plan_flags = ["--device-map", str(device_map), "--exit-layer", "3", "--branch-budget", "4",
                  "--max-len", "256", "--quiet"]  # fmt: skip
    ref = root / "ref"
    bench = ["--target", str(target), "--draft", str(draft), "--questions", str(questions),
             "--per-category", "1", "--max-new-tokens", str(NEW_TOKENS), "--methods", "ar",
             "--out", str(ref), *plan_flags]  # fmt: skip
    assert bench_cli.main(bench) == 0
    ar = [g[0] for g in map(json.loads, (ref / "records.jsonl").read_text().splitlines())]
    eos = ar[CUT]["tokens"][NEW_TOKENS // 2]
    config = target / "generation_config.json"
    gen = json.loads(config.read_text()) if config.is_file() else {}
    gen["eos_token_id"] = [1, eos]  # 1: the tokenizer's own <|end|>
    config.write_text(json.dumps(gen))
    argv = ["replay", "--target", str(target), "--draft", str(draft), "--questions",
            str(questions), "--reference", str(ref), *plan_flags]  # fmt: skip
    out = root / "out"
    code = main([*argv, "--out", str(out), "--clients", "3", "--stream-rate", "0.5"])
    return {"argv": argv, "ref": ref, "ar": ar, "eos": eos, "out": out, "code": code}


def _doc(out: Path) -> dict:
    return json.loads((out / "replay.json").read_text())


def _journal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()]


def test_replay_through_the_server_is_identical_to_ar(setup):
    out, ar = setup["out"], setup["ar"]
    doc = _doc(out)
    c = doc["counts"]
    assert setup["code"] == 0, (c, doc["mismatches"], doc["lost"])
    assert c["questions"] == c["answered"] == c["identical"] == c["asked_now"] == 6
    assert c["changed"] == c["lost"] == c["missing"] == c["usage_differs"] == 0
    assert c["by_streamed"]["streamed"]["identical"] == 3 == c["by_streamed"]["whole"]["identical"]
    rows = _journal(out)
    assert sorted(r["question_id"] for r in rows) == sorted(r["question_id"] for r in ar)
    assert all(r["identical"] and r["status"] == 200 and "got" not in r for r in rows)
    assert len({r["client"] for r in rows}) > 1  # several requests in flight at once
    by_id = {r["question_id"]: r for r in rows}
    cut = by_id[ar[CUT]["question_id"]]  # the server stopped at the EOS id; so did the answer
    first = ar[CUT]["tokens"].index(setup["eos"])
    assert cut["finish_reason"] == "stop" and cut["completion_tokens"] == first + 1
    assert cut["completion_tokens"] < NEW_TOKENS
    whole = [r for r in rows if r["completion_tokens"] == NEW_TOKENS]
    assert whole and all(r["finish_reason"] == "length" for r in whole)
    assert all(
        r["prompt_tokens"] == a["prompt_tokens"] for a in ar for r in [by_id[a["question_id"]]]
    )
    served = doc["server_metrics"]  # batched rounds, and the draft ran in them
    assert served["rounds_batched"] > 0 and served["mean_batch_size"] > 1, served
    assert served["drafted_tokens"] > 0 and served["draft_fallbacks"] == 0
    assert doc["plan_check"]["question_id"] == ar[0]["question_id"]
    assert doc["endpoint"] == "/v1/chat/completions" and doc["reference"]["records"] == 6
    assert doc["settings"]["clients"] == 3 and doc["machine"]["cpu"] and doc["versions"]["torch"]
    assert "| verdict | PASS |" in (out / "replay.md").read_text()


def test_resume_asks_only_what_the_journal_lacks(setup, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(setup["out"], out)
    lines = (out / JOURNAL).read_text().splitlines()
    last = json.loads(lines[-1])["question_id"]
    (out / JOURNAL).write_text("\n".join(lines[:-1]) + "\n")
    assert main([*setup["argv"], "--out", str(out), "--clients", "3", "--resume"]) == 0
    c = _doc(out)["counts"]
    assert (c["asked_now"], c["resumed"], c["identical"]) == (1, 5, 6)
    rows = _journal(out)
    assert len(rows) == 6 and rows[-1]["question_id"] == last


def test_an_altered_reference_is_reported_changed(setup, tmp_path):
    ref = tmp_path / "ref"
    shutil.copytree(setup["ref"], ref)
    groups = [json.loads(line) for line in (ref / "records.jsonl").read_text().splitlines()]
    r = groups[2][0]  # not the first question: the plan check decodes that one
    r["tokens"][0] = 5 + (r["tokens"][0] - 5 + 1) % 92  # another word, never an EOS id
    assert r["tokens"][0] not in (1, setup["eos"])
    (ref / "records.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups))
    out = tmp_path / "out"
    argv = [*setup["argv"], "--reference", str(ref), "--out", str(out), "--clients", "2"]
    assert main(argv) == 1
    doc = _doc(out)
    assert doc["counts"]["changed"] == 1 and doc["counts"]["identical"] == 5 and not doc["ok"]
    (m,) = doc["mismatches"]
    assert m["question_id"] == r["question_id"] and m["first_difference"] == 0
    assert m["got"] != m["expected"] and m["margin"] >= 0 and len(m["target_top2"]) == 2
    assert m["got_token_ids"][0] != r["tokens"][0]  # the server's ids, not the altered ones
    assert "| verdict | FAIL |" in (out / "replay.md").read_text()


def test_a_reference_of_another_model_is_refused(setup, tmp_path, capsys):
    other = save_tiny_with_tokenizer(make_tiny("qwen2", seed=2, num_hidden_layers=6), tmp_path)
    out = tmp_path / "out"
    argv = [*setup["argv"], "--target", str(other), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the model's save progress bar
    assert err.startswith("scripts/soak.py: error: --reference was made with another plan")
    assert f"question {setup['ar'][0]['question_id']}" in err and "--target" in err
    assert not (out / JOURNAL).exists()  # refused before any request


def test_expected_answer_ends_at_the_first_eos_as_the_server_does():
    tok = make_tokenizer()  # <|end|> (1) is special: the server's text skips it
    w = tok.convert_tokens_to_ids(["w1", "w2", "w3"])
    assert expected_answer(tok, [w[0], 1, w[1], 1], {1}) == ([w[0], 1], "w1", "stop")
    assert expected_answer(tok, [w[0], w[1], w[2]], {1, w[1]}) == ([w[0], w[1]], "w1 w2", "stop")
    assert expected_answer(tok, [w[0], w[2]], {1}) == ([w[0], w[2]], "w1 w3", "length")


def test_an_answer_is_identical_only_when_its_token_ids_are_too():
    """Two token sequences can decode to one text: the replay compares the ids as well."""
    q = Question(7, "qa", "qa", "hi", [4, 5], [6, 7, 8], [6, 7, 8], "w1 w2", "length")
    got = {"status": 200, "text": "w1 w2", "finish_reason": "length",
           "usage": {"prompt_tokens": 2, "completion_tokens": 3}}  # fmt: skip
    assert judge(q, {**got, "token_ids": [6, 7, 8]}, False, 0, 0.1)["outcome"] == "identical"
    row = judge(q, {**got, "token_ids": [6, 9, 8]}, False, 0, 0.1)
    assert row["outcome"] == "changed" and row["got_token_ids"] == [6, 9, 8]
    assert judge(q, got, False, 0, 0.1)["outcome"] == "changed"  # no ids: not shown identical


def test_question_ids_replay_only_the_part_this_plan_made(setup, tmp_path, capsys):
    """A reference whose first question another plan made (altered here) is refused whole, and
    replays with --question-ids naming the rest: the plan check decodes the first one named."""
    ref = tmp_path / "ref"
    shutil.copytree(setup["ref"], ref)
    groups = [json.loads(line) for line in (ref / "records.jsonl").read_text().splitlines()]
    groups[0][0]["tokens"][0] = 5 + (groups[0][0]["tokens"][0] - 5 + 1) % 92
    (ref / "records.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups))
    ids = [g[0]["question_id"] for g in groups]
    argv = [*setup["argv"], "--reference", str(ref), "--clients", "2"]
    assert main([*argv, "--out", str(tmp_path / "all")]) == 2  # the plan check fails on ids[0]
    out = tmp_path / "part"
    assert main([*argv, "--out", str(out), "--question-ids", f"{ids[1]}-{ids[-1]}"]) == 0
    doc = _doc(out)
    assert doc["plan_check"]["question_id"] == ids[1]
    assert doc["counts"]["questions"] == doc["counts"]["identical"] == len(ids) - 1
    assert sorted(r["question_id"] for r in _journal(out)) == sorted(ids[1:])
    capsys.readouterr()
    for bad in ("9-3", "x", "100000-100005"):
        assert main([*argv, "--out", str(tmp_path / "bad"), "--question-ids", bad]) == 2
        err = capsys.readouterr().err.splitlines()[-1]
        assert err.startswith(f"scripts/soak.py: error: --question-ids {bad}: "), err
