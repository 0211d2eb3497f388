"""The soak harness (mirror_sd/soak/, the package scripts/soak.py runs) on tiny random models:
short runs of both sub-commands with draft faults injected count every request, see every fault
recovered and counted, find every output equal to the target-only reference, and report a
changed output as a failure."""

import json
from pathlib import Path

import pytest

from mirror_sd.soak import sequential, server
from mirror_sd.soak.cli import main
from mirror_sd.soak.plans import Reference
from tests.conftest import TORCH_DRAFT_MAP, tiny_pair

TASKS = ("writing", "translation", "summarization", "qa", "math_reasoning", "rag")


@pytest.fixture(scope="module")
def plan_args(tmp_path_factory) -> list[str]:
    """Flags for a mirror plan over a tiny Qwen2 pair (torch on the CPU, a 0.3 s draft timeout;
    the server test sets 1 s) and a Spec-Bench file of six questions in the tiny tokenizer's
    words."""
    root = tmp_path_factory.mktemp("soak")
    target, draft, _ = tiny_pair(root)
    device_map = root / "map.yaml"
    device_map.write_text(TORCH_DRAFT_MAP)
    questions = root / "question.jsonl"
    questions.write_text("".join(
        json.dumps({"question_id": i, "category": task,
                    "turns": [" ".join(f"w{(7 * i + k) % 90}" for k in range(3 + i))]}) + "\n"
        for i, task in enumerate(TASKS)
    ))  # fmt: skip
    return ["--target", str(target), "--draft", str(draft), "--device-map", str(device_map),
            "--questions", str(questions), "--per-category", "1", "--exit-layer", "3",
            "--branch-budget", "4", "--max-len", "256", "--draft-timeout", "0.3",
            "--lengths", "8,16", "--quiet"]  # fmt: skip


def _doc(out: Path) -> dict:
    assert (out / "soak.md").is_file() and (out / "rss_threads.png").stat().st_size > 0
    return json.loads((out / "soak.json").read_text())


def test_sequential_generations_with_faults_are_identical_and_counted(plan_args, tmp_path):
    out = tmp_path / "seq"
    argv = ["sequential", *plan_args, "--out", str(out), "--generations", "12"]
    assert main([*argv, "--fault-rate", "0.9"]) == 0
    doc = _doc(out)
    c = doc["counts"]
    assert c["generations"] == c["identical"] == 12 and c["changed"] == c["lost"] == 0
    fired = c["faults_fired"]
    assert fired.get("raise", 0) >= 1 and fired.get("hang", 0) >= 1, c
    assert c["faults_unseen"] == 0 and c["fallbacks"] >= sum(fired.values())
    for f in doc["faults"]:  # each fault ended its generation target-only, the same tokens
        assert f["seen"] and f["fallback"]
        assert ("draft_timeout_s" if f["kind"] == "hang" else "injected") in f["fallback"]
    rows = doc["generations"]
    assert all(r["fallback"] for r in rows if r["fired"])
    assert len(doc["samples"]) == 13 and all(s["rss_mib"] > 0 for s in doc["samples"])
    flat = doc["flatness"]
    assert flat["rss_slope_unit"] == "MiB per 100 generations"
    assert flat["threads_spread_after_warmup"] == 0  # no thread leaks, faults included
    assert doc["machine"]["cpu"] and doc["versions"]["torch"] and doc["command"]
    assert "| verdict | PASS |" in (out / "soak.md").read_text()


def test_sequential_reports_a_changed_output(plan_args, tmp_path, monkeypatch):
    real = sequential.references  # the run looks it up in its own module: patched there

    def one_wrong(*args, **kwargs):
        refs = real(*args, **kwargs)
        ref = refs[("chat", 0, 8)]
        wrong = [(ref.tokens[0] + 1) % 97, *ref.tokens[1:]]
        refs[("chat", 0, 8)] = Reference(ref.prompt, wrong, "")
        return refs

    monkeypatch.setattr(sequential, "references", one_wrong)
    out = tmp_path / "changed"
    argv = ["sequential", *plan_args, "--out", str(out), "--generations", "12"]
    assert main([*argv, "--fault-rate", "0", "--lengths", "8"]) == 1
    doc = _doc(out)
    assert doc["counts"]["changed"] == 2 and not doc["ok"]  # prompt 0 runs at i = 0 and 6
    assert [m["index"] for m in doc["mismatches"]] == [0, 6]
    for m in doc["mismatches"]:  # where it parts, and the target's margin there
        assert m["first_difference"] == 0 and m["margin"] >= 0 and len(m["target_top2"]) == 2
    assert "| verdict | FAIL |" in (out / "soak.md").read_text()


def test_server_run_loses_nothing_and_shows_every_fault(plan_args, tmp_path):
    out = tmp_path / "srv"
    argv = ["server", *plan_args, "--out", str(out), "--duration", "12", "--clients", "3",
            "--fault-every", "3", "--sample-every", "1", "--malformed-rate", "0.2", "--prefix-cache",
            "--cancel-rate", "0.5", "--draft-timeout", "1"]  # fmt: skip
    code = main(argv)
    doc = _doc(out)
    c = doc["counts"]
    assert code == 0, (c, doc["lost"], doc["mismatches"], doc["errors"])
    assert c["sent"] == c["answered"] + c["cancelled_by_client"] + c["rejected_4xx"] > 20
    assert c["lost"] == c["changed"] == c["unexpected_status"] == 0
    assert c["rejected_4xx"] > 0 and c["cancelled_by_client"] > 0 and c["streamed"] > 0
    fired = c["faults_fired"]
    assert fired.get("raise", 0) >= 1 and fired.get("hang", 0) >= 1, doc["faults"]
    assert c["faults_unseen"] == 0
    assert c["metrics"]["draft_fallbacks_total"] >= sum(fired.values())
    for f in doc["faults"]:  # each one is visible in /metrics; a hang disabled the draft
        assert f["fallbacks_after"] > f["fallbacks_before"]
        assert f["draft_disabled"] == (f["kind"] == "hang")
    assert all(r["status"] // 100 == 4 for r in doc["requests"] if "malformed" in r["kind"])
    assert len(doc["samples"]) >= 10 and doc["flatness"]["rss_slope_unit"] == "MiB per hour"


def test_server_reports_changed_outputs(plan_args, tmp_path, monkeypatch):
    real = server.references  # the run looks it up in its own module: patched there

    def all_wrong(*args, **kwargs):
        refs = real(*args, **kwargs)
        return {k: Reference(r.prompt, r.tokens, "x" + r.text) for k, r in refs.items()}

    monkeypatch.setattr(server, "references", all_wrong)
    out = tmp_path / "srv-changed"
    argv = ["server", *plan_args, "--out", str(out), "--duration", "3", "--clients", "2",
            "--fault-every", "100", "--malformed-rate", "0"]  # fmt: skip
    assert main(argv) == 1
    doc = _doc(out)
    assert doc["counts"]["changed"] == doc["counts"]["sent"] > 0 and not doc["ok"]
    whole = [m for m in doc["mismatches"] if not m["cancel_after"]]
    assert whole and all(m["expected"] == "x" + m["got"] for m in whole)
