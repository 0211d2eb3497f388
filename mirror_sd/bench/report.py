"""Benchmark numbers -> aggregates, results.json, results.md, speedup.png, answers/*.jsonl.

The headline of every method is its total tokens ÷ total time over the run's prompts
(`total_tokens_per_s`), and every ratio in the tables is one of those totals over a
reference's on the same prompts: a method cannot gain from a few short, fast prompts. Beside
it, against every reference (each peer: hf-*, ov-*, llama-*, and our `ar`):
  - total_ratio: total tok/s ÷ the reference's total tok/s (the headline ratio);
  - median_ratio: the median over prompts of tok/s ÷ the reference's tok/s on that prompt;
  - won: prompts where the method's tok/s beat the reference's (of `prompts`).
Also kept: the mean of per-prompt tok/s (`mean_tokens_per_s`), and Spec-Bench's own
whole-machine speedup vs `hf-ar` (mean tok/s ÷ the baseline's mean tok/s,
`evaluation/speed.py`). The heterogeneous speedup is our method's total ratio vs our `ar`
(the target alone on its own device: what a user whose draft device is extra hardware sees).
A prompt is a (question, repeat) pair. Hit rate and exposed-draft fraction are pooled: all
rounds' hits over all mirror rounds, all exposed draft seconds over all wall seconds.
"""

from __future__ import annotations

import json
import statistics
import uuid
from pathlib import Path

from mirror_sd.bench.specbench import TASKS

OVERALL = "overall"
# baselines that are not ours: no heterogeneous speedup vs our `ar` (they use every core)
PEER_PREFIXES = ("hf-", "ov-", "llama-")


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _pooled(rows: list[dict], key: str) -> list:
    if any(r.get(key) is None for r in rows):
        return []
    return [x for r in rows for x in r[key]]


def prompt_key(r: dict) -> tuple[int, int]:
    """A record's prompt: (question_id, repeat); records before --repeat have repeat 0."""
    return r["question_id"], r.get("repeat", 0)


def total_tokens_per_s(rows: list[dict]) -> float | None:
    """Total new tokens ÷ total wall time of `rows` (the headline tok/s)."""
    wall = sum(r["wall_time"] for r in rows)
    return sum(r["new_tokens"] for r in rows) / wall if wall > 0 else None


def compare(rows: list[dict], ref: dict) -> dict | None:
    """`rows` (one method) against the reference's records on the same prompts (`ref`:
    prompt_key -> record): total_ratio, median_ratio, won, prompts. None when the reference
    lacks one of the prompts."""
    if not rows or any(prompt_key(r) not in ref for r in rows):
        return None
    base = [ref[prompt_key(r)] for r in rows]
    per = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(rows, base, strict=True)
           if b["tokens_per_s"] > 0]  # fmt: skip
    won = sum(r["tokens_per_s"] > b["tokens_per_s"] for r, b in zip(rows, base, strict=True))
    return {"total_ratio": _ratio(total_tokens_per_s(rows), total_tokens_per_s(base)),
            "median_ratio": statistics.median(per) if per else None,
            "won": won, "prompts": len(rows)}  # fmt: skip


def _stats(rows: list[dict], refs: dict[str, dict], method: str) -> dict:
    """Aggregates of one method over `rows`; `refs`: reference method -> its prompt_key ->
    record (the peers and our `ar`, same prompts)."""
    tps = [r["tokens_per_s"] for r in rows]
    s = {
        "questions": len(rows),
        "new_tokens": sum(r["new_tokens"] for r in rows),
        "wall_time": sum(r["wall_time"] for r in rows),
        "total_tokens_per_s": total_tokens_per_s(rows),
        "mean_tokens_per_s": _mean(tps),
        "vs": {},
    }
    for name, index in refs.items():
        if name != method and (c := compare(rows, index)) is not None:
            s["vs"][name] = c
    hf = refs.get("hf-ar")
    if hf and all(prompt_key(r) in hf for r in rows):
        base = [hf[prompt_key(r)]["tokens_per_s"] for r in rows]
        s["whole_machine_speedup_vs_hf_ar"] = _ratio(_mean(tps), _mean(base))
        s["mean_of_ratios_vs_hf_ar"] = _mean([t / b for t, b in zip(tps, base, strict=True)])
    if "ar" in s["vs"] and not method.startswith(PEER_PREFIXES):
        s["heterogeneous_speedup_vs_ar"] = s["vs"]["ar"]["total_ratio"]
    s["mean_accepted"] = _mean(_pooled(rows, "accept_lengths"))
    s["mean_drafted"] = _mean(_pooled(rows, "drafted"))
    hits = [h for h in _pooled(rows, "round_hits") if h is not None]
    s["hit_rate"] = sum(hits) / len(hits) if hits else None
    exposed = [r["exposed_draft_s"] for r in rows if r.get("exposed_draft_s") is not None]
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


def references(methods: list[str]) -> list[str]:
    """The methods every other is compared with: the peers (hf-*, ov-*, llama-*) and our `ar`."""
    return [m for m in methods if m.startswith(PEER_PREFIXES) or m == "ar"]


def aggregate(records: list[dict], methods: list[str]) -> dict:
    """method -> {task | "overall" -> stats}, plus "best_whole_machine" (highest overall
    Spec-Bench speedup vs hf-ar among the others) and "fastest_peer" (the peer with the
    highest overall total tok/s)."""
    index = {m: {prompt_key(r): r for r in records if r["method"] == m} for m in methods}
    refs = {m: index[m] for m in references(methods) if index.get(m)}
    out: dict = {}
    for m in methods:
        rows = [r for r in records if r["method"] == m]
        groups = {t: [r for r in rows if r["task"] == t] for t in TASKS}
        out[m] = {t: _stats(g, refs, m) for t, g in groups.items() if g}
        out[m][OVERALL] = _stats(rows, refs, m)
    ranked = [
        (out[m][OVERALL].get("whole_machine_speedup_vs_hf_ar") or 0, m)
        for m in methods
        if m != "hf-ar"
    ]
    out["best_whole_machine"] = max(ranked)[1] if refs.get("hf-ar") and ranked else None
    peers = [(out[m][OVERALL]["total_tokens_per_s"] or 0, m) for m in methods
             if m.startswith(PEER_PREFIXES)]  # fmt: skip
    out["fastest_peer"] = max(peers)[1] if peers else None
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


def cell(x, fmt: str = ".2f", suffix: str = "") -> str:
    """A number as a table cell: `x` in `fmt` plus `suffix`, or '–' for None."""
    return "–" if x is None else f"{x:{fmt}}{suffix}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table: header, separator, one line per row of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _vs_cell(c: dict | None) -> str:
    if c is None:
        return "–"
    return (f"{cell(c['total_ratio'], '.2f', '×')} · med {cell(c['median_ratio'], '.2f', '×')} · "
            f"won {c['won']}/{c['prompts']}")  # fmt: skip


def _session_lines(sessions: list[dict]) -> list[str]:
    """One line per process when a resumed run was made by several (bench/sessions.py)."""
    if len(sessions) < 2:
        return []
    each = "; ".join(f"{s['session']}: {s['questions']} questions, {s['started']}, "
                     f"{s['machine.cpu']}, target on {s['plan.target_device']}"
                     for s in sessions)  # fmt: skip
    return [f"- made by {len(sessions)} processes (sessions.jsonl has each one's machine and "
            f"plan): {each}"]  # fmt: skip


def _setup_lines(results: dict) -> list[str]:
    mach, plan, st = results["machine"], results["plan"], results["settings"]
    load = f"load average at start {mach['load_average_at_start']}"
    if mach.get("load_average_at_end") is not None:
        load += f", at end {mach['load_average_at_end']}"
    repeat = st.get("repeat", 1)
    prompts = len(results["questions"]) * repeat
    return [
        "# Spec-Bench results", "",
        f"- date: {results['date']}; command: `{results['command']}`",
        f"- machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB; {load}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}",
        f"- target: {results['models']['target']}; draft: {results['models']['draft']}",
        f"- plan: target on {plan['target_device']}, draft on {plan['draft_device']}; "
        f"γ={plan['spec']['num_draft_tokens']}, ℓe={plan['exit_layer']}/{plan['num_layers']}, "
        f"κ={plan['spec']['exit_top_k']}, branch budget {plan['spec']['branch_budget']}; "
        f"hf-* methods: transformers {st.get('hf_dtype', 'float32')}",
        f"- {prompts} prompts: {len(results['questions'])} questions "
        f"({st['per_category']} per task) × {repeat} repeat(s), {st['max_new_tokens']} new "
        f"tokens; {st['eos_policy']}; {st['timing']}; {st.get('order', '')}",
        *_session_lines(results.get("sessions") or []), "",
        "tok/s = total new tokens ÷ total time over every prompt (the headline); × = that over "
        "the reference's total on the same prompts. Per prompt: the median of the per-prompt "
        "ratios and the prompts won (faster than the reference).", "",
    ]  # fmt: skip


def markdown(results: dict) -> str:
    """results.md: setup, the overall table (headline: total tokens ÷ total time), every
    method against every reference, per-task tables and every mismatch."""
    agg, methods = results["aggregates"], results["settings"]["methods"]
    lines = _setup_lines(results)
    fastest = agg.get("fastest_peer")
    header = ["method", "threads", "tok/s (total)", "mean of per-prompt tok/s", "× vs ar",
              f"× vs fastest peer (`{fastest}`)", "tokens/round", "hit rate", "exposed draft",
              "identical to hf-ar", "identical to ar"]  # fmt: skip
    rows = []
    for m in methods:
        s = agg[m][OVERALL]
        vs = s.get("vs", {})
        rows.append([f"`{m}`", results["threads"][m]["threads"], cell(s["total_tokens_per_s"]),
                     cell(s["mean_tokens_per_s"]),
                     cell((vs.get("ar") or {}).get("total_ratio"), ".2f", "×"),
                     cell((vs.get(fastest) or {}).get("total_ratio"), ".2f", "×"),
                     cell(s["mean_accepted"]), cell(s["hit_rate"], ".0%"),
                     cell(s["exposed_draft_fraction"], ".0%"),
                     cell(s["identical_to_hf_ar"], ".0%"), cell(s["identical_to_ar"], ".0%")])  # fmt: skip
    lines += ["## Overall", "", *markdown_table(header, rows), ""]
    refs = references(methods)
    if refs:
        body = [[f"`{m}`", *(_vs_cell(agg[m][OVERALL].get("vs", {}).get(r)) for r in refs)]
                for m in methods]  # fmt: skip
        lines += ["## Against each reference (total ratio · median per-prompt ratio · prompts won)",
                  "", *markdown_table(["method", *(f"vs `{r}`" for r in refs)], body), ""]  # fmt: skip
    mem = results.get("memory")
    if mem:
        lines += [
            f"Memory (resident, GiB): after compiling our plan {mem.get('after_compile_gib')}, "
            f"after loading every method's models {mem.get('after_building_methods_gib')}, "
            f"process peak {mem.get('process_peak_gib')} ({mem.get('note', '')}).",
            "",
        ]
    if agg.get("best_whole_machine"):
        lines += [f"Best Spec-Bench speedup vs hf-ar: `{agg['best_whole_machine']}`.", ""]
    tasks = [t for t in (*TASKS, OVERALL) if t in agg[methods[0]]]
    for title, get, which in (
        ("Tokens/s per task (total tokens ÷ total time)",
         lambda s: s["total_tokens_per_s"], methods),
        ("× vs our ar per task (total ratio)",
         lambda s: s.get("vs", {}).get("ar", {}).get("total_ratio"),
         [m for m in methods if m != "ar"]),
        ("Spec-Bench whole-machine speedup vs hf-ar per task (mean tok/s ÷ hf-ar's mean)",
         lambda s: s.get("whole_machine_speedup_vs_hf_ar"), methods),
    ):  # fmt: skip
        body = [[f"`{m}`", *(cell(get(agg[m][t])) for t in tasks)] for m in which]
        if any(c != "–" for r in body for c in r[1:]):
            lines += [f"## {title}", "", *markdown_table(["method", *tasks], body), ""]
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
    """Grouped bars per task, total ratios: vs the fastest peer (left), vs our ar (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg, methods = results["aggregates"], results["settings"]["methods"]
    tasks = [t for t in (*TASKS, OVERALL) if t in agg[methods[0]]]
    fastest = agg.get("fastest_peer")
    panels = [
        (f"× vs the fastest peer ({fastest}), total tokens ÷ total time", fastest,
         [m for m in methods if m != fastest]),
        ("× vs our ar (target alone), total tokens ÷ total time", "ar",
         [m for m in methods if not m.startswith(PEER_PREFIXES) and m != "ar"]),
    ]  # fmt: skip
    colors = {m: f"C{i}" for i, m in enumerate(methods)}  # one color per method, both panels
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), squeeze=False)
    for ax, (title, ref, which) in zip(axes[0], panels, strict=True):
        width = 0.8 / max(1, len(which))
        for i, m in enumerate(which):
            ys = [(agg[m][t].get("vs", {}).get(ref) or {}).get("total_ratio") or 0.0
                  for t in tasks]  # fmt: skip
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
