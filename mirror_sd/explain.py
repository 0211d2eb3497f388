"""`describe()`: a compiled plan as a table (stage, device, EP actually used, params, measured
time) followed by what was decided and why."""

from __future__ import annotations

import json
from dataclasses import asdict

from mirror_sd.graphs.vocab_trim import VocabTrim
from mirror_sd.partition import Profile
from mirror_sd.runtime.plan import Plan


def describe(plan: Plan) -> str:
    """A table: stage | device | EP actually used | params MB | measured ms; then the choice."""
    info, spec = plan.report, plan.spec
    graph, placement = info.graph, info.placement
    prof: Profile | None = info.profile
    le = plan.target.exit_layer
    n = sum(1 for s in graph.names() if s.startswith("target.layers."))
    groups = [
        ("target.embed", ["target.embed"]),
        (f"target.layers.[0-{le}) prefix", [f"target.layers.{i}" for i in range(le)]),
        (f"target.layers.[{le}-{n}) suffix", [f"target.layers.{i}" for i in range(le, n)]),
        ("target.norm + lm_head (+ exit head)", ["target.norm", "target.lm_head"]),
    ]
    if plan.draft is not None:
        groups.append(("draft (all stages)", [s for s in graph.names() if s.startswith("draft.")]))
    t_block = prof.target(spec.num_draft_tokens + 1) if prof else None
    ms = {
        groups[1][0]: t_block * le / n if t_block else None,
        groups[2][0]: t_block * (n - le) / n if t_block else None,
        "draft (all stages)": prof.draft(1) if prof else None,
    }
    rows = [("stage", "device", "EP actually used", "params MB", "measured ms")]
    for label, nodes in groups:
        alias = "+".join(dict.fromkeys(placement.assignment[s] for s in nodes))  # spread: a+b
        mb = sum(graph.stage(s).param_bytes for s in nodes) / 2**20
        ep = plan.draft_device.label if label.startswith("draft") else plan.target_device.label
        t = ms.get(label)
        rows.append((label, alias, ep, f"{mb:.1f}", f"{t * 1e3:.1f}" if t else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append("")
    if info.mode_asked == "auto":
        why = (
            "the highest predicted speedup, below"
            if info.choice
            else ("no draft to run" if plan.draft is None else "chosen when it was compiled")
        )
        alone = f" with {info.auto_alone} alone, the draft idle" if info.auto_alone else ""
        lines.append(f"mode: auto -> {spec.mode}{alone} ({why})")
    lines.append(f"speculation: {json.dumps(asdict(spec))}")
    lines.append(f"reference: {reference_precision(plan)}")
    for alias, note in info.precision.items():
        lines.append(f"precision of {alias}: {note}")
    budget = plan.thread_budget()
    if budget is not None:
        lines.append(budget.describe())
    if info.draft_placement:
        lines.append(f"draft placement: {info.draft_placement}")
    if info.draft_trim is not None:
        lines.append(_describe_trim(info.draft_trim, info.draft_trim_coverage))
    if info.draft_streams is not None:
        lines.append(_describe_streams(info.draft_streams, info.draft_streams_used, prof,
                                       plan.spec.num_draft_tokens))  # fmt: skip
    for edge in placement.cut_edges():
        lines.append(f"cut edge {edge.src} -> {edge.dst}: {edge.bytes_per_round} bytes/round")
    lines.append(
        plan.exit_head.describe() if plan.exit_head is not None
        else f"exit head at ℓe={le}: logit lens (final norm + full LM head)"
    )  # fmt: skip
    if info.exit_heads is not None and info.exit_heads.files:
        lines.append(info.exit_heads.table())
    if plan.amphista is not None:  # they propose each next block (runtime/head_drafts.py)
        lines.append(plan.amphista.describe())
    if hasattr(plan.draft, "heads") and hasattr(plan.draft, "exits"):  # S2D (sorted_exits.py)
        lines.append(plan.draft.describe(info.exit_thresholds))
    if info.choice:
        lines.append(info.choice.explain())
    if info.tree is not None:
        lines.append(info.tree.explain())
    elif plan.no_trees and info.profile is not None:  # a profile would have sized one
        lines.append(f"token tree: none (tree_siblings: auto runs a chain) because {plan.no_trees}")
    if info.batch_policy:
        lines.append("per live batch size: " + "; ".join(b.describe() for b in info.batch_policy))
    if info.kept_split:
        kept, best = info.kept_split
        lines.append(
            f"exit layer: kept ℓe={kept}, the split compiled first, because the plan's mode is "
            f"{spec.mode} (no mirror rounds, where ℓe matters); for mirror the cost model "
            f"chose ℓe={best}: compile with mode: mirror to use that split"
        )
    if plan.draft_disabled:
        lines.append(f"draft DISABLED: {plan.draft_disabled}")
    return "\n".join(lines)


def reference_precision(plan: Plan) -> str:
    """What lossless means for this plan: identical to which target's greedy decoding."""
    t_spec = plan.device_specs[0] if plan.device_specs else None
    quant = getattr(t_spec, "quantize", "none")
    if quant != "none":
        return (
            f"the {quant}-weight target (its own greedy decoding, the plan's `ar`; the fp32 "
            "model may choose other tokens)"
        )
    dtype = getattr(t_spec, "dtype", "float32")
    return f"the {dtype} target (its own greedy decoding, the plan's `ar`)"


def _describe_trim(trim: VocabTrim, coverage: float | None) -> str:
    cov = f"; {coverage:.1%} of the target's calibration tokens inside" if coverage else ""
    return (
        f"draft vocabulary: VocabTrim, {trim.size} of {trim.vocab_size} tokens{cov} "
        f"(lossless: the target verifies with its full head); counts: {trim.source or '?'}"
    )


def _describe_streams(table, used: bool, prof, gamma: int) -> str:
    """One line on the draft's stream rows: how many, their held-out guess accuracy, and
    whether the plan runs them (with the chain times the cost model compared)."""
    acc = table.guess_accuracy()
    shown = ", ".join(f"{a:.0%}" for a in acc) if acc else "not recorded"
    line = (f"draft streams: {table.k} stream row(s) (speculative streaming; held-out guess "
            f"accuracy per stream {shown})")  # fmt: skip
    if prof is not None and acc:
        from mirror_sd.partition.profile import streamed_chain_time

        t_s = streamed_chain_time(gamma, acc, prof.draft) * 1e3
        line += (
            f"; a {gamma}-token chain {t_s:.0f} ms streamed vs {gamma * prof.draft(1) * 1e3:.0f} ms"
        )
    return line + (
        "" if used else "; off (mode auto): the one-token chain is predicted faster here"
    )
