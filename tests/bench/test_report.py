"""Report math on hand-made records: the headline is total tokens ÷ total time, and every
method is compared with every reference by total ratio, median per-prompt ratio and prompts
won (bench/report.py)."""

from __future__ import annotations

import pytest

from mirror_sd.bench import report

# 10 tokens per prompt. speculative: 1 s, 1 s, 4 s (10, 10, 2.5 tok/s; total 30/6 = 5 tok/s,
# mean 7.5); ov-ar: 2 s, 2 s, 1 s (5, 5, 10 tok/s; total 30/5 = 6, mean 6.67); ar: 2 s each.
WALLS = {"speculative": (1.0, 1.0, 4.0), "ov-ar": (2.0, 2.0, 1.0), "ar": (2.0, 2.0, 2.0)}
TASKS = ("qa", "qa", "rag")


def _records(walls=WALLS, repeat: int = 0) -> list[dict]:
    return [
        {"question_id": q, "task": TASKS[q], "method": m, "new_tokens": 10, "wall_time": w,
         "tokens_per_s": 10 / w, "accept_lengths": None, "drafted": None, "round_hits": None,
         "exposed_draft_s": None, "repeat": repeat, "tokens": [1] * 10}
        for m, ws in walls.items()
        for q, w in enumerate(ws)
    ]  # fmt: skip


def test_total_ratio_median_ratio_and_prompts_won():
    agg = report.aggregate(_records(), list(WALLS))
    s = agg["speculative"]["overall"]
    assert s["total_tokens_per_s"] == pytest.approx(5.0)
    assert s["mean_tokens_per_s"] == pytest.approx(7.5)
    vs = s["vs"]["ov-ar"]
    # the mean of tok/s would say 7.5 / 6.67 = 1.125x; the totals say 5 / 6
    assert vs["total_ratio"] == pytest.approx(5 / 6)
    assert vs["median_ratio"] == pytest.approx(2.0)  # per prompt: 2, 2, 0.25
    assert (vs["won"], vs["prompts"]) == (2, 3)
    assert s["vs"]["ar"] == {"total_ratio": pytest.approx(1.0), "median_ratio": 2.0,
                             "won": 2, "prompts": 3}  # fmt: skip
    assert s["heterogeneous_speedup_vs_ar"] == pytest.approx(1.0)  # the total ratio
    # the peer against our ar, and against itself: no entry
    assert agg["ov-ar"]["overall"]["vs"]["ar"]["total_ratio"] == pytest.approx(6 / 5)
    assert "ov-ar" not in agg["ov-ar"]["overall"]["vs"]
    assert "heterogeneous_speedup_vs_ar" not in agg["ov-ar"]["overall"]
    # per task: rag is one prompt where ov-ar won
    rag = agg["speculative"]["rag"]["vs"]["ov-ar"]
    assert rag["total_ratio"] == pytest.approx(0.25) and rag["won"] == 0
    assert agg["fastest_peer"] == "ov-ar"


def test_repeats_are_separate_prompts():
    again = {"speculative": (2.0, 2.0, 2.0), "ov-ar": (1.0, 1.0, 1.0), "ar": (2.0, 2.0, 2.0)}
    agg = report.aggregate(_records() + _records(again, repeat=1), list(WALLS))
    vs = agg["speculative"]["overall"]["vs"]["ov-ar"]
    assert vs["prompts"] == 6 and vs["won"] == 2
    assert vs["total_ratio"] == pytest.approx((60 / 12) / (60 / 8))
    assert agg["speculative"]["overall"]["questions"] == 6


def test_a_reference_missing_a_prompt_is_not_compared():
    recs = [r for r in _records() if not (r["method"] == "ov-ar" and r["question_id"] == 2)]
    agg = report.aggregate(recs, list(WALLS))
    assert "ov-ar" not in agg["speculative"]["overall"]["vs"]
    assert "ov-ar" in agg["speculative"]["qa"]["vs"]  # both qa prompts are there


def _results(records: list[dict]) -> dict:
    methods = list(WALLS)
    return {
        "date": "today", "command": "hand", "versions": {"torch": "x"},
        "machine": {"cpu": "cpu", "cores": 2, "memory_gib": 1, "load_average_at_start": [0.1],
                    "load_average_at_end": [0.2]},
        "models": {"target": "t", "draft": "d"},
        "plan": {"target_device": "cpu", "draft_device": "cpu", "exit_layer": 1,
                 "num_layers": 2, "spec": {"num_draft_tokens": 4, "exit_top_k": 4,
                                           "branch_budget": 1}},
        "settings": {"methods": methods, "per_category": 1, "max_new_tokens": 10, "repeat": 1,
                     "eos_policy": "off", "timing": "perf_counter", "order": "interleaved"},
        "questions": [{"question_id": q} for q in range(3)],
        "threads": {m: {"threads": "2"} for m in methods},
        "records": records, "aggregates": report.aggregate(records, methods),
    }  # fmt: skip


def test_markdown_headline_is_the_total_ratio():
    md = report.markdown(_results(_records()))
    row = next(line for line in md.splitlines() if line.startswith("| `speculative` | 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "5.00" and cells[3] == "7.50"  # tok/s total, then mean of per-prompt
    assert cells[4] == "1.00×" and cells[5] == "0.83×"  # vs ar, vs the fastest peer (ov-ar)
    assert "× vs fastest peer (`ov-ar`)" in md and "at end [0.2]" in md
    assert "0.83× · med 2.00× · won 2/3" in md  # speculative vs ov-ar
    assert "1.20× · med 1.00× · won 1/3" in md  # ov-ar vs ar: per prompt 1, 1, 2 (a tie loses)
