"""Benchmark numbers -> aggregates, results.json, results.md, speedup.png, answers/*.jsonl.

Speedups, both measured in the same run (docs/benchmarks.md "The machine"):
  - whole-machine speedup: a method vs `hf-ar` (transformers on every core). This is
    Spec-Bench's speedup: mean tokens/s over questions ÷ the baseline's mean tokens/s
    (`evaluation/speed.py`); the mean of per-question ratios is reported beside it.
  - heterogeneous speedup: our speculative / mirror vs our `ar` (the target alone on
    its own device): what a user whose draft device is extra hardware would see.
Hit rate and exposed-draft fraction are pooled: all rounds' hits over all mirror rounds,
all exposed draft seconds over all wall seconds.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from mirror_sd.bench.specbench import TASKS

OVERALL = "overall"
# baselines that are not ours: no heterogeneous speedup vs our `ar` (they use every core)
PEER_PREFIXES = ("hf-", "ov-")
# the fastest peers a CPU user would run: × vs each (ov-sd+conf: OpenVINO's dynamic draft length)
PEER_REFERENCES = ("ov-ar", "ov-sd", "ov-sd+conf")


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _pooled(rows: list[dict], key: str) -> list:
    if any(r.get(key) is None for r in rows):
        return []
    return [x for r in rows for x in r[key]]


def _stats(rows: list[dict], hf: dict, ar: dict, ours: bool, peers: dict | None = None) -> dict:
    """Aggregates of one method over `rows`; `hf` / `ar`: question_id -> baseline record;
    `peers`: peer method -> its question_id -> record (× vs each, same questions)."""
    tps = [r["tokens_per_s"] for r in rows]
    s = {
        "questions": len(rows),
        "new_tokens": sum(r["new_tokens"] for r in rows),
        "wall_time": sum(r["wall_time"] for r in rows),
        "tokens_per_s": _mean(tps),
    }
    if hf:
        base = [hf[r["question_id"]]["tokens_per_s"] for r in rows]
        s["whole_machine_speedup_vs_hf_ar"] = _ratio(_mean(tps), _mean(base))
        s["mean_of_ratios_vs_hf_ar"] = _mean([t / b for t, b in zip(tps, base, strict=True)])
    for name, index in (peers or {}).items():
        if index and all(r["question_id"] in index for r in rows):
            base = [index[r["question_id"]]["tokens_per_s"] for r in rows]
            s[f"speedup_vs_{name.replace('-', '_')}"] = _ratio(_mean(tps), _mean(base))
    if ar and ours:
        s["heterogeneous_speedup_vs_ar"] = _ratio(
            _mean(tps), _mean([ar[r["question_id"]]["tokens_per_s"] for r in rows])
        )
    s["mean_accepted"] = _mean(_pooled(rows, "accept_lengths"))
    s["mean_drafted"] = _mean(_pooled(rows, "drafted"))
    hits = [h for h in _pooled(rows, "round_hits") if h is not None]
    s["hit_rate"] = sum(hits) / len(hits) if hits else None
    exposed = [r["exposed_draft_s"] for r in rows if r["exposed_draft_s"] is not None]
    s["exposed_draft_fraction"] = (
        sum(exposed) / s["wall_time"] if len(exposed) == len(rows) and s["wall_time"] else None
    )
    for key in ("identical_to_hf_ar", "identical_to_ar"):
        flags = [r.get(key) for r in rows if r.get(key) is not None]
        s[key] = sum(flags) / len(flags) if flags else None
    mism = [m for r in rows for m in r.get("mismatches", {}).values()]
    s["mismatches"] = len(mism)
    s["mismatches_near_tie"] = sum(m["near_tie"] for m in mism)
    return s


def aggregate(records: list[dict], methods: list[str]) -> dict:
    """method -> {task | "overall" -> stats}, plus "best_whole_machine" (highest overall
    whole-machine speedup among non-baseline methods)."""
    index = {m: {r["question_id"]: r for r in records if r["method"] == m} for m in methods}
    hf, ar = index.get("hf-ar", {}), index.get("ar", {})
    peers = {p: index[p] for p in PEER_REFERENCES if index.get(p)}
    out: dict = {}
    for m in methods:
        rows = [r for r in records if r["method"] == m]
        ours = not m.startswith(PEER_PREFIXES)
        groups = {t: [r for r in rows if r["task"] == t] for t in TASKS}
        out[m] = {t: _stats(g, hf, ar, ours, peers) for t, g in groups.items() if g}
        out[m][OVERALL] = _stats(rows, hf, ar, ours, peers)
    ranked = [
        (out[m][OVERALL].get("whole_machine_speedup_vs_hf_ar") or 0, m)
        for m in methods
        if m != "hf-ar"
    ]
    out["best_whole_machine"] = max(ranked)[1] if hf and ranked else None
    return out


# --- writers -------------------------------------------------------------------------------


def write_all(results: dict, out: str | Path, write_json: bool = True) -> dict[str, Path]:
    """Write every report file into `out`; returns name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "results.md", "png": out / "speedup.png"}
    if write_json:
        paths["json"] = out / "results.json"
        paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    paths["md"].write_text(markdown(results))
    plot_speedup(results, paths["png"])
    paths.update(write_answers(results, out / "answers"))
    return paths


def write_answers(results: dict, folder: Path) -> dict[str, Path]:
    """Spec-Bench `model_answer` JSONL, one file per method (evaluation/speed.py reads them).

    accept_lengths is [] where a method does not expose rounds (hf-assisted, hf-pld)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = Path(str(results["models"]["target"])).name
    paths = {}
    for m in results["settings"]["methods"]:
        lines = []
        for r in (r for r in results["records"] if r["method"] == m):
            choice = {"index": 0, "turns": [r["text"]], "new_tokens": [r["new_tokens"]],
                      "wall_time": [r["wall_time"]], "accept_lengths": r["accept_lengths"] or []}  # fmt: skip
            lines.append(json.dumps({
                "question_id": r["question_id"], "answer_id": uuid.uuid4().hex[:22],
                "model_id": f"{model}-{m}", "choices": [choice],
                "tstamp": r.get("tstamp"), "category": r["category"],
            }))  # fmt: skip
        paths[f"answers/{m}"] = folder / f"{m}.jsonl"
        paths[f"answers/{m}"].write_text("".join(line + "\n" for line in lines))
    return paths


def _f(x, fmt: str = ".2f", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{fmt}}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(results: dict) -> str:
    """results.md: setup, the overall table, per-task tables and every mismatch."""
    agg, methods = results["aggregates"], results["settings"]["methods"]
    mach, plan = results["machine"], results["plan"]
    lines = [
        "# Spec-Bench results", "",
        f"- date: {results['date']}; command: `{results['command']}`",
        f"- machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB; "
        f"load average at start {mach['load_average_at_start']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}",
        f"- target: {results['models']['target']}; draft: {results['models']['draft']}",
        f"- plan: target on {plan['target_device']}, draft on {plan['draft_device']}; "
        f"γ={plan['spec']['num_draft_tokens']}, ℓe={plan['exit_layer']}/{plan['num_layers']}, "
        f"κ={plan['spec']['exit_top_k']}, branch budget {plan['spec']['branch_budget']}; "
        f"hf-* methods: transformers {results['settings'].get('hf_dtype', 'float32')}",
        f"- {len(results['questions'])} questions ({results['settings']['per_category']} per task), "
        f"{results['settings']['max_new_tokens']} new tokens; {results['settings']['eos_policy']}; "
        f"{results['settings']['timing']}", "",
        "Whole-machine speedup = vs `hf-ar` on every core (Spec-Bench's definition: mean tok/s ÷ "
        "baseline mean tok/s). Heterogeneous speedup = vs our `ar`, the target alone on its own "
        "device (the paper's setting, where the draft device is extra hardware).", "",
    ]  # fmt: skip
    peer_cols = [p for p in PEER_REFERENCES if p in methods]
    header = ["method", "threads", "tok/s", *(f"× vs {p}" for p in peer_cols),
              "whole-machine speedup (vs hf-ar)",
              "mean of per-question ratios", "heterogeneous speedup (vs ar)",
              "tokens/round", "hit rate", "exposed draft", "identical to hf-ar", "identical to ar"]  # fmt: skip
    rows = []
    for m in methods:
        s = agg[m][OVERALL]
        vs_peers = [_f(s.get(f"speedup_vs_{p.replace('-', '_')}"), ".2f", "×") for p in peer_cols]
        rows.append([f"`{m}`", results["threads"][m]["threads"], _f(s["tokens_per_s"]), *vs_peers,
                     _f(s.get("whole_machine_speedup_vs_hf_ar"), ".2f", "×"),
                     _f(s.get("mean_of_ratios_vs_hf_ar"), ".2f", "×"),
                     _f(s.get("heterogeneous_speedup_vs_ar"), ".2f", "×"), _f(s["mean_accepted"]),
                     _f(s["hit_rate"], ".0%"), _f(s["exposed_draft_fraction"], ".0%"),
                     _f(s["identical_to_hf_ar"], ".0%"), _f(s["identical_to_ar"], ".0%")])  # fmt: skip
    lines += ["## Overall", "", *_table(header, rows), ""]
    mem = results.get("memory")
    if mem:
        lines += [
            f"Memory (resident, GiB): after compiling our plan {mem.get('after_compile_gib')}, "
            f"after loading every method's models {mem.get('after_building_methods_gib')}, "
            f"process peak {mem.get('process_peak_gib')} ({mem.get('note', '')}).",
            "",
        ]
    if agg.get("best_whole_machine"):
        lines += [f"Best on this whole machine: `{agg['best_whole_machine']}`.", ""]
    tasks = [t for t in (*TASKS, OVERALL) if t in agg[methods[0]]]
    for title, key, which in (
        ("Whole-machine speedup vs hf-ar, per task", "whole_machine_speedup_vs_hf_ar", methods),
        ("Heterogeneous speedup vs ar, per task", "heterogeneous_speedup_vs_ar",
         [m for m in methods if not m.startswith(PEER_PREFIXES)]),
        ("Tokens/s per task", "tokens_per_s", methods),
    ):  # fmt: skip
        body = [[f"`{m}`", *(_f(agg[m][t].get(key)) for t in tasks)] for m in which]
        if any(c != "–" for r in body for c in r[1:]):
            lines += [f"## {title}", "", *_table(["method", *tasks], body), ""]
    lines += ["## Mismatches", "", *_mismatch_lines(results["records"]), ""]
    return "\n".join(lines)


def _mismatch_lines(records: list[dict]) -> list[str]:
    out = []
    for r in records:
        for ref, m in r.get("mismatches", {}).items():
            out.append(
                f"- `{r['method']}` q{r['question_id']} ({r['task']}) differs from `{ref}` at "
                f"token {m['position']}: {m['token']} vs {m['reference_token']}; our target's "
                f"top-2 there {m['target_top2']}, margin {m['margin']:.2e} -> {m['verdict']}"
            )
    return out or ["None: every output is token-identical to its references."]


def plot_speedup(results: dict, path: Path) -> None:
    """Grouped bars per task: whole-machine speedup (left), heterogeneous speedup (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg, methods = results["aggregates"], results["settings"]["methods"]
    tasks = [t for t in (*TASKS, OVERALL) if t in agg[methods[0]]]
    panels = [
        ("whole-machine speedup vs hf-ar (all cores)", "whole_machine_speedup_vs_hf_ar",
         [m for m in methods if m != "hf-ar"]),
        ("heterogeneous speedup vs ar (target's own device)", "heterogeneous_speedup_vs_ar",
         [m for m in methods if not m.startswith(PEER_PREFIXES) and m != "ar"]),
    ]  # fmt: skip
    colors = {m: f"C{i}" for i, m in enumerate(methods)}  # one color per method, both panels
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), squeeze=False)
    for ax, (title, key, which) in zip(axes[0], panels, strict=True):
        width = 0.8 / max(1, len(which))
        for i, m in enumerate(which):
            ys = [agg[m][t].get(key) or 0.0 for t in tasks]
            xs = [j + (i - (len(which) - 1) / 2) * width for j in range(len(tasks))]
            ax.bar(xs, ys, width, label=m, color=colors[m])
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(tasks)), tasks, rotation=20)
        ax.set_title(title)
        ax.set_ylabel("speedup (×)")
        if which:
            ax.legend(fontsize=8)
    fig.suptitle(f"Spec-Bench: {results['models']['target']} <- {results['models']['draft']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
