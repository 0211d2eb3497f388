"""Spec-Bench harness on tiny models: reports, losslessness vs hf-ar, PREDICTED replays."""

from __future__ import annotations

import json

import pytest

from mirror_sd.bench import cli as bench_cli
from mirror_sd.bench import report
from mirror_sd.bench.methods import KNOWN_METHODS, first_difference, parse_methods
from mirror_sd.bench.runner import BenchConfig, run_bench
from mirror_sd.bench.simulate import markdown, measure_profile, simulate
from mirror_sd.bench.specbench import (
    ENV_VAR,
    TASKS,
    SpecBenchNotFoundError,
    default_path,
    load_questions,
)
from mirror_sd.devices.sim_device import SimDevice
from mirror_sd.partition.cost_model import Profile
from tests.conftest import make_tiny, save_tiny_with_tokenizer

CATEGORIES = ("writing", "translation", "summarization", "qa", "math_reasoning", "rag")
SPEC = {"exit_layer": 3, "branch_budget": 4, "max_len": 256}  # fixed: no profiling in compile
# float32 target (the default map's may be bf16): lossless vs hf-ar then means token-identical
FP32_MAP = """
version: 1
devices:
  cpu: {backend: torch, device: cpu, dtype: float32, threads: 1}
  ortcpu:
    backend: onnxruntime
    providers: [CPUExecutionProvider: {}]
    intra_op_threads: 1
placement: {target: cpu, draft: ortcpu}
"""


def _write_questions(path, per_task: int = 2):
    rows = []
    for i, cat in enumerate(CATEGORIES):
        for j in range(per_task):
            words = " ".join(f"w{(7 * i + 3 * j + k) % 80}" for k in range(6))
            rows.append({"question_id": 10 * i + j, "category": cat, "turns": [words, "w1"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    target = save_tiny_with_tokenizer(make_tiny("qwen2", seed=0, num_hidden_layers=6), root / "t")
    draft = save_tiny_with_tokenizer(make_tiny("qwen2", seed=1, num_hidden_layers=2), root / "d")
    cfg = BenchConfig(
        target=str(target), draft=str(draft), device_map=FP32_MAP, per_category=1, max_new_tokens=8,
        out=root / "out", questions=str(_write_questions(root / "q.jsonl")),
        onnx_dir=str(root / "onnx"), speculation=SPEC, progress=False, command="test",
        hf_threads=1,  # a shared 2-core machine makes 2 OpenMP threads slow; speed is not tested
        methods=KNOWN_METHODS,  # + the model-free sources: pld, sam, hd, mirror+sam
        repeat=2,  # two passes over the questions: separate prompts in every ratio
    )  # fmt: skip
    return run_bench(cfg), root / "out", (target, draft, root)


def test_spec_bench_file_has_six_tasks_in_file_order():
    try:
        path = default_path()
    except SpecBenchNotFoundError:
        pytest.skip("Spec-Bench question.jsonl not available here")
    qs = load_questions(path, per_category=2)
    assert [q.task for q in qs] == [t for t in TASKS for _ in range(2)]
    assert [q.question_id for q in qs[:2]] == [81, 82] and qs[0].category == "writing"


def test_question_path_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing.jsonl"))
    with pytest.raises(SpecBenchNotFoundError, match=ENV_VAR):
        default_path()
    partial = tmp_path / "q.jsonl"
    partial.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["x"]}) + "\n")
    with pytest.raises(ValueError, match="no question for task"):
        load_questions(partial)
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("hf-ar,eagle")


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_outputs_files_and_fields(bench):
    results, out, _ = bench
    for name in ("results.json", "results.md", "speedup.png", "trace_mirror.json"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["machine"]["cores"] and on_disk["machine"]["cpu"]
    assert on_disk["machine"]["load_average_at_end"] and "cpu_flags" in on_disk["machine"]
    assert "openvino-genai" in on_disk["versions"] and "llama-cpp-python" in on_disk["versions"]
    assert on_disk["settings"]["repeat"] == 2 and on_disk["settings"]["methods"] == list(
        KNOWN_METHODS
    )
    assert on_disk["versions"]["torch"] and on_disk["command"] == "test" and on_disk["date"]
    assert set(on_disk["threads"]) == set(KNOWN_METHODS)
    assert "threads 1" in on_disk["threads"]["hf-ar"]["threads"]
    assert "draft idle" in on_disk["threads"]["ar"]["threads"]
    assert on_disk["plan"]["target_device"] == "torch cpu float32, 1 thread(s)"
    assert len(on_disk["records"]) == 2 * len(TASKS) * len(KNOWN_METHODS)
    assert [r["repeat"] for r in on_disk["records"][:: len(KNOWN_METHODS)]] == [0] * 6 + [1] * 6
    for r in on_disk["records"]:
        assert r["new_tokens"] == 8 and r["wall_time"] > 0 and r["tokens_per_s"] > 0
        assert len(r["tokens"]) == 8  # every generation's token ids
        if r["method"] in ("ar", "speculative", "mirror"):
            assert r["accept_lengths"] and sum(r["accept_lengths"]) >= 8
            assert r["exposed_draft_fraction"] is not None
    mirror = [r for r in on_disk["records"] if r["method"] == "mirror"]
    assert all(r["hit_rate"] is not None for r in mirror)
    overall = on_disk["aggregates"]["mirror"]["overall"]
    for key in ("whole_machine_speedup_vs_hf_ar", "heterogeneous_speedup_vs_ar",
                "mean_accepted", "hit_rate", "exposed_draft_fraction", "identical_to_hf_ar",
                "total_tokens_per_s", "mean_tokens_per_s"):  # fmt: skip
        assert overall[key] is not None, key
    assert overall["vs"]["hf-ar"]["prompts"] == overall["vs"]["ar"]["prompts"] == 12
    assert overall["heterogeneous_speedup_vs_ar"] == overall["vs"]["ar"]["total_ratio"]
    assert set(on_disk["aggregates"]["hf-ar"]) == {*TASKS, "overall"}
    md = (out / "results.md").read_text()
    assert "tok/s (total)" in md and "Against each reference" in md and "vs `hf-ar`" in md


def test_answers_are_spec_bench_model_answers(bench):
    _, out, _ = bench
    for method in KNOWN_METHODS:
        lines = (out / "answers" / f"{method}.jsonl").read_text().splitlines()
        assert len(lines) == 2 * len(TASKS)
        a = json.loads(lines[0])
        assert {"question_id", "answer_id", "model_id", "choices", "tstamp", "category"} <= set(a)
        c = a["choices"][0]
        assert c["index"] == 0 and len(c["turns"]) == 1 and c["new_tokens"] == [8]
        assert len(c["wall_time"]) == 1 and isinstance(c["accept_lengths"], list)


def test_every_method_is_lossless_vs_hf_ar(bench):
    results, _, _ = bench
    for r in results["records"]:
        assert r["identical_to_hf_ar"] is True, (r["method"], r["question_id"], r["mismatches"])
        if not r["method"].startswith("hf-"):
            assert r["identical_to_ar"] is True
    assert results["aggregates"]["mirror"]["overall"]["identical_to_hf_ar"] == 1.0
    assert "None: every output is token-identical" in report.markdown(results)


def test_mismatch_is_reported_with_margin(bench):
    results, _, (target, draft, root) = bench
    import mirror_sd.api as api
    from mirror_sd.runtime.prompts import encode_prompt

    rec = next(r for r in results["records"] if r["method"] == "mirror")
    group = [dict(r) for r in results["records"]
             if r["question_id"] == rec["question_id"] and r["repeat"] == 0]  # fmt: skip
    tampered = next(r for r in group if r["method"] == "mirror")
    tampered["tokens"] = [*tampered["tokens"][:3], (tampered["tokens"][3] + 1) % 97,
                          *tampered["tokens"][4:]]  # fmt: skip
    from mirror_sd.bench.runner import _check

    text = next(q["text"] for q in results["questions"] if q["question_id"] == rec["question_id"])
    with api.compile(target, draft, FP32_MAP, onnx_dir=root / "onnx", **SPEC) as plan:
        _check(
            group,
            plan,
            encode_prompt(plan.tokenizer, text),
            ("torch cpu float32", "transformers float32"),
        )
    m = tampered["mismatches"]["hf-ar"]
    assert tampered["identical_to_hf_ar"] is False and m["position"] == 3
    assert m["margin"] >= 0 and len(m["target_top2"]) == 2 and "near_tie" in m
    assert "investigate" in m["verdict"] or "near-tie" in m["verdict"]


def _hand_results() -> dict:
    """Two mirror questions (all hits, 4 branches, 5 tokens/round) and their speculative twins."""
    rounds = {"accept_lengths": [5, 5, 5, 5], "round_hits": [True] * 4, "round_branches": [4] * 4}
    recs = [
        {"question_id": q, "task": t, "method": m, "new_tokens": 20, **rounds}
        for q, t in ((1, "qa"), (2, "rag"))
        for m in ("speculative", "mirror")
    ]
    for r in recs:
        if r["method"] == "speculative":
            r["round_hits"], r["round_branches"] = [None] * 4, [0] * 4
    plan = {"spec": {"num_draft_tokens": 4}, "exit_layer": 2, "num_layers": 4}
    return {"plan": plan, "records": recs, "command": "hand", "date": "today"}


HAND_PROFILE = Profile(
    num_layers=4,
    t_target={1: 0.1, 5: 0.1},
    t_draft={1: 0.01, 4: 0.01},
    description="hand-made: t_T = 100 ms flat, t_d = 10 ms",
)


def test_simulation_follows_the_latency_formulas():
    sim = simulate(_hand_results(), HAND_PROFILE)
    assert sim["label"] == "PREDICTED" and sim["exit_layer"] == 2
    # mirror: first round drafts a chain (4 x 10 ms); every round 100 ms; γ·t_d(4) = 40 ms
    # fits in t_suf = 50 ms, so nothing else is exposed. ar: 20 x 100 ms.
    mirror = sim["aggregates"]["mirror"]["overall"]["predicted_speedup_vs_ar"]
    assert mirror == pytest.approx(2.0 / (0.04 + 4 * 0.1))
    # speculative: 4 rounds of 4 x 10 ms + 100 ms
    spec = sim["aggregates"]["speculative"]["qa"]["predicted_speedup_vs_ar"]
    assert spec == pytest.approx(2.0 / (4 * 0.14))
    # closed form: E[L] = 5, round = 100 ms (h = 1, hidden draft) -> 5x; vanilla 5 x 0.1 / 0.14
    assert sim["formula"]["mirror"]["predicted_speedup_vs_ar"] == pytest.approx(5.0)
    assert sim["formula"]["speculative"]["predicted_speedup_vs_ar"] == pytest.approx(0.5 / 0.14)
    md = markdown(sim)
    assert md.startswith("# PREDICTED") and md.count("PREDICTED") >= 6


def test_simulation_replays_policy_methods_with_their_drafted_tokens():
    from dataclasses import replace

    res = _hand_results()
    conf = [dict(r, method=r["method"] + "+conf", drafted=[2] * 4) for r in res["records"]]
    res["records"] += conf + [dict(res["records"][0], method="pld")]  # pld: not replayable
    sim = simulate(res, HAND_PROFILE)
    assert list(sim["aggregates"]) == ["speculative", "mirror", "speculative+conf", "mirror+conf"]
    # speculative+conf: 4 rounds of 2 x 10 ms + 100 ms (a 3-row block on a flat profile)
    spec = sim["aggregates"]["speculative+conf"]["overall"]["predicted_speedup_vs_ar"]
    assert spec == pytest.approx(2.0 / (4 * 0.12))
    assert sim["formula"]["speculative+conf"]["mean_drafted"] == 2
    # mirror+conf: only the first chain is exposed, and it is 2 steps long
    mirror = sim["aggregates"]["mirror+conf"]["overall"]["predicted_speedup_vs_ar"]
    assert mirror == pytest.approx(2.0 / (0.02 + 4 * 0.1))
    # a shared memory bus (f = 2): each round's suffix (2 of 4 layers, 50 ms) takes 50 ms
    # longer, and the rollouts (γ·t_d(4) = 60 ms) outlast it by (60 − 50)·2 = 20 ms
    shared = simulate(res, replace(HAND_PROFILE, overlap_slowdown=2.0, t_draft={1: 0.01, 4: 0.015}))
    t_round = 0.1 + 0.05 + 0.02
    got = shared["aggregates"]["mirror"]["overall"]["predicted_speedup_vs_ar"]
    assert got == pytest.approx(2.0 / (0.04 + 4 * t_round))
    assert any("overlap slowdown f = 2" in a for a in shared["assumptions"])
    # recorded rollout steps replace γ: 2 steps (30 ms) fit in the 50 ms suffix, nothing exposed
    for r in res["records"]:
        r["rollout_steps"] = [2] * 4
    short = simulate(res, replace(HAND_PROFILE, overlap_slowdown=2.0, t_draft={1: 0.01, 4: 0.015}))
    got = short["aggregates"]["mirror"]["overall"]["predicted_speedup_vs_ar"]
    assert got == pytest.approx(2.0 / (0.04 + 4 * (0.1 + 0.05)))


def test_simulation_rebudgets_mirror_from_the_recorded_hit_ranks():
    res = _hand_results()
    res["plan"]["spec"]["exit_top_k"] = 2  # γ = 4, κ = 2: up to (4 + 1)·2 = 10 branches
    for r in res["records"]:
        if r["method"] == "mirror":  # measured with B = 1: rank 0 hits, ranks 2 and 5 would not
            r["round_branches"], r["round_hit_ranks"] = [1] * 4, [0, 2, 5, None]
            r["round_hits"] = [True, False, False, False]
    cheap = Profile(num_layers=4, t_target={1: 0.1, 5: 0.1}, t_draft={1: 0.01, 16: 0.01})
    sim = simulate(res, cheap)
    # branch rows are free on this profile, so the smallest budget that catches every rank
    # wins: B = 6 (rank None was never a candidate: that round still misses)
    assert "mirror@B=6" in sim["aggregates"]
    assert sim["formula"]["mirror@B=6"]["hit_rate"] == pytest.approx(3 / 4)
    assert sim["formula"]["mirror"]["hit_rate"] == pytest.approx(1 / 4)
    faster = sim["aggregates"]["mirror@B=6"]["overall"]["predicted_speedup_vs_ar"]
    assert faster > sim["aggregates"]["mirror"]["overall"]["predicted_speedup_vs_ar"]
    # mirror@B=6 replays: chains before round 1 and after the miss in round 4 (none: last)
    assert faster == pytest.approx(2.0 / (0.04 + 4 * 0.1))
    assert "@B=" in markdown(sim)
    # records without hit ranks (older runs) are replayed as measured only
    assert not any("@B=" in m for m in simulate(_hand_results(), cheap)["aggregates"])


def test_sim_device_timings():
    dev = SimDevice(HAND_PROFILE)
    assert dev.time_target(3) == pytest.approx(0.1)
    assert dev.time_suffix(5, 1) == pytest.approx(0.075) and dev.time_prefix(5, 1) == 0.025
    assert dev.time_draft(8) == pytest.approx(0.01) and ("t_draft", 8) in dev.extrapolated
    with pytest.raises(ValueError, match="exit_layer 4"):
        dev.time_suffix(5, 4)


def test_cli_simulate_and_rerender_from_results(bench, tmp_path):
    _, out, _ = bench
    prof = tmp_path / "p.json"
    Profile(num_layers=6, t_target={1: 0.02, 16: 0.025}, t_draft={1: 0.001, 16: 0.002},
            description="test").save(prof)  # fmt: skip
    args = ["--from-results", str(out / "results.json"), "--simulate", str(prof)]
    assert bench_cli.main([*args, "--out", str(tmp_path / "sim")]) == 0
    md = (tmp_path / "sim" / "simulated.md").read_text()
    assert "PREDICTED" in md and "`mirror`" in md
    assert bench_cli.main(["--from-results", str(out / "results.json"),
                           "--out", str(tmp_path / "again")]) == 0  # fmt: skip
    assert (tmp_path / "again" / "speedup.png").is_file()


def test_measure_profile_from_a_plan(bench):
    import mirror_sd.api as api

    _, _, (target, draft, root) = bench
    with api.compile(target, draft, FP32_MAP, onnx_dir=root / "onnx", **SPEC) as plan:
        prof = measure_profile(plan, max_block=4, description="tiny")
    assert set(prof.t_target) == {1, 2, 3, 4} and prof.num_layers == 6
    assert prof.accept_rate is not None and prof.description == "tiny"


def test_ablation_table_over_runs(bench, tmp_path, capsys):
    """Two runs tabulated: one row per non-baseline method and run, ratios taken in-run."""
    results, out, _ = bench
    assert bench_cli.main(["--ablation", f"{out}=int8", "--ablation", f"{out}=again",
                           "--out", str(tmp_path)]) == 0  # fmt: skip
    table = (tmp_path / "ablation.md").read_text()
    ours = [m for m in KNOWN_METHODS if m not in ("hf-ar", "hf-assisted", "hf-pld", "ar")]
    assert table.count("| int8 |") == len(ours) and table.count("| again |") == len(ours)
    row = next(line for line in table.splitlines() if line.startswith("| int8 | mirror |"))
    hetero = results["aggregates"]["mirror"]["overall"]["heterogeneous_speedup_vs_ar"]
    assert f"{hetero:.2f}" in row and "100%" in row  # identical to ar on every question
    assert "speculative+conf" in table and "mirror+entropy" in table
    with pytest.raises(SystemExit, match="no results.json"):
        bench_cli.main(["--ablation", str(tmp_path / "nothing"), "--out", str(tmp_path)])


def test_question_subset_by_task(tmp_path):
    path = _write_questions(tmp_path / "q.jsonl", per_task=2)
    qs = load_questions(path, per_category=1, tasks=("qa", "math_reasoning"))
    assert [q.task for q in qs] == ["qa", "math_reasoning"]
    with pytest.raises(ValueError, match="unknown task"):
        load_questions(path, tasks=("coding",))


def test_sweep_predicts_every_cell_from_a_profile(tmp_path, capsys):
    prof = Profile(num_layers=4, t_target={1: 1.0, 5: 1.2}, t_draft={1: 0.1, 8: 0.3},
                   accept_rate=0.7, hit_rate_by_exit_layer={1: 0.1, 2: 0.4, 3: 0.6})  # fmt: skip
    path = tmp_path / "profile.json"
    prof.save(path)
    assert bench_cli.main(["--sweep", str(path), "--out", str(tmp_path)]) == 0
    table = (tmp_path / "sweep.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3 * 4 * 4  # ℓe in {1, 2, 3} x κ in {1, 2, 4, 8} x γ in 1..4
    assert table.count("**") == 2 and "PREDICTED" in table
    with pytest.raises(SystemExit, match="--sweep"):
        bench_cli.main(["--sweep", str(tmp_path / "missing.json"), "--out", str(tmp_path)])
