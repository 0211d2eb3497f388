"""`mirror-sd bench --ablation RUN[=LABEL] ...`: one table across several benchmark runs.

Each run is a `mirror-sd bench` output folder for one draft variant (a compiled plan: int8 /
int4 / VocabTrim / self-draft, lens or trained exit head) with its policy methods side by
side. Ratios are taken inside each run (against that run's own `ar` and `hf-ar` on the same
questions), never across runs, so machine load differences between runs cancel.
"""

from __future__ import annotations

import json
from pathlib import Path

from mirror_sd.bench.report import OVERALL, cell, markdown_table

BASELINES = ("hf-ar", "hf-assisted", "hf-pld", "ar")


def load_runs(specs: list[str]) -> list[tuple[str, dict]]:
    """'DIR' or 'DIR=LABEL' -> (label, results dict). Raises FileNotFoundError naming a
    folder without results.json."""
    runs = []
    for spec in specs:
        folder, _, label = spec.partition("=")
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"--ablation {folder}: no results.json there (run bench first)")
        runs.append((label or Path(folder).name, json.loads(path.read_text())))
    return runs


def rows(runs: list[tuple[str, dict]]) -> list[dict]:
    """One row per (run, non-baseline method): the overall aggregates that the table shows."""
    out = []
    for label, res in runs:
        plan = res.get("plan", {})
        for method, per_task in res["aggregates"].items():
            if method in BASELINES or not isinstance(per_task, dict):
                continue
            s = per_task[OVERALL]
            out.append({
                "variant": label, "method": method, "exit_head": _head(plan),
                "draft_step_ms": plan.get("draft_step_ms"), "mean_accepted": s["mean_accepted"],
                "mean_drafted": s.get("mean_drafted"),
                "hit_rate": s["hit_rate"], "heterogeneous": s.get("heterogeneous_speedup_vs_ar"),
                "whole_machine": s.get("whole_machine_speedup_vs_hf_ar"),
                "identical": s.get("identical_to_ar"), "questions": s["questions"],
                "new_tokens": s["new_tokens"],
            })  # fmt: skip
    return out


def _head(plan: dict) -> str | None:
    """'trained, ℓe=10' / 'lens, ℓe=17' from a run's plan record (None for old results)."""
    desc = plan.get("exit_head")
    if desc is None:
        return None
    kind = "lens" if "logit lens" in desc else "trained"
    return f"{kind}, ℓe={plan['exit_layer']}" if "exit_layer" in plan else kind


def markdown(runs: list[tuple[str, dict]]) -> str:
    header = ["draft variant", "method", "exit head", "draft step ms", "drafted/round", "tokens/round",
              "hit rate", "× vs ar (hetero)", "× vs hf-ar (whole machine)", "= ar"]  # fmt: skip
    body = [
        [r["variant"], r["method"], r["exit_head"] or "-", cell(r["draft_step_ms"], ".1f"),
         cell(r["mean_drafted"]), cell(r["mean_accepted"]), cell(r["hit_rate"]), cell(r["heterogeneous"]), cell(r["whole_machine"]),
         cell(r["identical"], ".0%")]
        for r in rows(runs)
    ]  # fmt: skip
    lines = markdown_table(header, body)
    notes = []
    for label, res in runs:
        st = res["settings"]
        notes.append(
            f"- {label}: {res['models']['target']} <- {res['models']['draft']}, "
            f"{len(res['questions'])} questions x {st['max_new_tokens']} tokens, "
            f"overrides {st['speculation_overrides'] or 'none'}, {res['date']}"
        )
    return "\n".join([*lines, "", *notes])
