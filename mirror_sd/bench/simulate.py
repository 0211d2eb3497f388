"""Replay measured rounds on hardware we do not have: every figure here is PREDICTED.

Input: a benchmark's `results.json` (per round: tokens committed, hit or miss, branches
rolled out) and a cost `Profile` of other hardware. Each recorded round is re-timed on a
`SimDevice` with docs/algorithm.md's latency model, keeping the measured acceptance and hits:

    ar           every token: t_T(1)
    speculative  every round: d·t_d(1) + t_T(d+1), d = the round's drafted tokens (γ, or
                 fewer after a draft-length policy stopped early; `+conf` methods replay too)
    mirror       every round: t_T(d+1) + t_exit + (f−1)·t_suf + t_sync
                 + max(0, t_chan + (m·t_d(B) − t_suf)·f) + d·t_d(1) when the round before
                 missed (and before the first round); f = the profile's overlap slowdown,
                 m = the round's recorded rollout steps (γ in older results)

Mirror methods whose records carry hit ranks are also replayed as `<method>@B=n`, with the
budget n this profile favours: a round hits iff its verdict ranked < n among all branches.

A closed-form prediction from the pooled averages (E[T_round] with the mean hit rate and
branch count; speedup = L̄·t_T(1)/E[T_round]) is given beside the replay. Prefill is not
in the profile, so all PREDICTED times are decode-only. The exit layer keeps its depth
fraction: ℓe_sim = round(ℓe/N_run · N_profile) unless given.
"""

from __future__ import annotations

import json
from pathlib import Path

from mirror_sd.bench.methods import PLAN_METHODS
from mirror_sd.bench.report import OVERALL
from mirror_sd.bench.specbench import TASKS
from mirror_sd.devices.sim_device import SimDevice
from mirror_sd.partition.cost_model import Profile, mirror_round_time, vanilla_round_time
from mirror_sd.runtime.profiling import CALIBRATION_TEXT, profile

PREDICTED = "PREDICTED"


def measure_profile(plan, text: str = CALIBRATION_TEXT, max_block: int = 16,
                    description: str = "") -> Profile:  # fmt: skip
    """Measure a `Profile` of this machine from a compiled plan's own runners (t_T(1..max_block),
    t_d(1, 2, 4, 8, 16), exit head, logit-lens agreement, draft agreement as α)."""
    import torch

    if plan.draft is None:
        raise ValueError("measure_profile needs a plan with a draft model")
    threads = getattr(plan.target.device, "threads", None)
    if threads:  # time the target with the thread count its pipeline uses
        torch.set_num_threads(threads)
    lens = getattr(plan.target, "model", None)  # a torch target is its own logit lens
    if lens is None:
        from mirror_sd.graphs.loader import load_model

        lens = load_model(plan.report.target, "float32")
    ids = plan.tokenizer(text)["input_ids"]
    return profile(plan.target, plan.draft, lens_model=lens, calibration_ids=ids,
                   max_block=max_block, description=description)  # fmt: skip


def replay_mode(method: str) -> str | None:
    """The mode whose latency formula replays `method` (ar / speculative / mirror, with or
    without a draft-length policy, `@B=n` re-budgeted), or None for methods the model cannot
    time (HF baselines, model-free retrieval sources)."""
    settings = PLAN_METHODS.get(method.split("@B=")[0])
    if settings is None or set(settings) - {"mode", "draft_stop", "draft_stop_threshold"}:
        return None
    return {"autoregressive": "ar"}.get(settings["mode"], settings["mode"])


def _drafted(rec: dict, gamma: int) -> list[int]:
    """Draft tokens proposed per round (γ when the record predates draft-length policies)."""
    return rec.get("drafted") or [gamma] * len(rec["accept_lengths"])


def _round_times(dev: SimDevice, mode: str, rec: dict, gamma: int, exit_layer: int) -> list[float]:
    """PREDICTED seconds of each recorded round of `rec` (a results.json record)."""
    if mode == "ar":
        return [dev.time_target(1)] * rec["new_tokens"]
    drafted = _drafted(rec, gamma)
    if mode == "speculative":
        return [vanilla_round_time(dev.time_target(d + 1), dev.time_draft(1), d) for d in drafted]
    times, missed_before = [], True  # the first round drafts a fresh chain
    steps = rec.get("rollout_steps") or [gamma] * len(drafted)
    rounds = zip(rec["round_hits"], rec["round_branches"], drafted, steps, strict=True)
    for hit, branches, d, m in rounds:
        t_block = _verify_round(dev, d, m, branches, exit_layer)
        times.append(t_block + (d * dev.time_draft(1) if missed_before else 0.0))
        missed_before = hit is not True
    return times


def _verify_round(dev: SimDevice, d: int, m: float, branches: float, exit_layer: int) -> float:
    """A mirror round without its chain draft: the target block of d + 1 rows with the exit
    head, and `m` rollout steps over `branches` rows overlapping the suffix (both stretched
    by the profile's overlap slowdown f); no branches, no overlap."""
    t_block = dev.time_target(d + 1) + dev.time_exit_head()
    if not branches:
        return t_block + dev.t_sync
    return mirror_round_time(
        t_block, dev.time_suffix(d + 1, exit_layer), dev.time_draft(branches), 0.0, m, 1.0,
        dev.t_sync, dev.t_chan, dev.profile.overlap_slowdown,
    )  # fmt: skip


def _formula(dev: SimDevice, mode: str, rows: list[dict], gamma: int, exit_layer: int) -> dict:
    """Closed-form PREDICTED speedup over ar from pooled averages of `rows`."""
    lengths = [x for r in rows for x in r["accept_lengths"]]
    mean_len = sum(lengths) / len(lengths)
    drafted = [x for r in rows for x in _drafted(r, gamma)]
    d = max(1, round(sum(drafted) / len(drafted)))  # the mean chain, as a block size
    t_block = dev.time_target(d + 1)
    if mode == "speculative":
        t_round, h, b = vanilla_round_time(t_block, dev.time_draft(1), d), None, None
    else:
        hits = [x for r in rows for x in r["round_hits"] if x is not None]
        branches = [x for r in rows for x in r["round_branches"] if x]
        h = sum(hits) / len(hits) if hits else 0.0
        b = sum(branches) / len(branches) if branches else 1.0
        steps = [x for r in rows for x in r.get("rollout_steps") or [] if x]
        m = sum(steps) / len(steps) if steps else gamma
        t_round = _verify_round(dev, d, m, b, exit_layer) + (1 - h) * d * dev.time_draft(1)
    return {"predicted_tokens_per_round": mean_len, "predicted_round_s": t_round,
            "mean_drafted": sum(drafted) / len(drafted), "hit_rate": h, "mean_branches": b,
            "predicted_speedup_vs_ar": mean_len * dev.time_target(1) / t_round}  # fmt: skip


def rebudgeted(dev: SimDevice, rows: list[dict], gamma: int, kappa: int, exit_layer: int,
               method: str) -> list[dict]:  # fmt: skip
    """`rows` (one mirror method's records) replayed with the branch budget this profile would
    choose: for each B up to (γ + 1)·κ (every exit candidate a branch), a round hits iff its recorded
    `round_hit_ranks` entry is < B; B maximizes the closed-form speedup. Returns copies named
    `<method>@B=<B>`, or [] when the records carry no hit ranks (runs before they existed)."""
    if not rows or any(r.get("round_hit_ranks") is None for r in rows):
        return []
    if not any(b for r in rows for b in r["round_branches"]):
        return []

    def with_budget(budget: int) -> list[dict]:
        out = []
        for r in rows:
            pairs = list(zip(r["round_hit_ranks"], r["round_branches"], strict=True))
            hits = [(k is not None and k < budget) if b else None for k, b in pairs]
            out.append({**r, "method": f"{method}@B={budget}", "round_hits": hits,
                        "round_branches": [budget if b else 0 for _, b in pairs]})  # fmt: skip
        return out

    best = max(
        range(1, (gamma + 1) * kappa + 1),  # every candidate is a branch when d_j is not among them
        key=lambda b: (
            _formula(dev, "mirror", with_budget(b), gamma, exit_layer)["predicted_speedup_vs_ar"],
            -b,
        ),
    )
    return with_budget(best)


def scaled_exit_layer(results: dict, num_layers: int) -> int:
    """ℓe at the same depth fraction on a target of `num_layers` layers."""
    plan = results["plan"]
    layer = round(plan["exit_layer"] / plan["num_layers"] * num_layers)
    return min(max(1, layer), num_layers - 1)


def simulate(results: dict, prof: Profile, exit_layer: int | None = None) -> dict:
    """PREDICTED per-question and aggregate times and speedups of ar / speculative / mirror.

    Raises:
        ValueError: the results hold no round logs of speculative or mirror to replay.
    """
    dev = SimDevice(prof)
    gamma = int(results["plan"]["spec"]["num_draft_tokens"])
    layer = exit_layer or scaled_exit_layer(results, prof.num_layers)
    recs = [r for r in results["records"] if replay_mode(r["method"])]
    kappa = int(results["plan"]["spec"].get("exit_top_k", 1))
    for m in list(dict.fromkeys(r["method"] for r in recs)):
        if replay_mode(m) == "mirror":
            rows = [r for r in recs if r["method"] == m]
            recs += rebudgeted(dev, rows, gamma, kappa, layer, m)
    modes = list(dict.fromkeys(r["method"] for r in recs))  # in the run's order
    if not any(replay_mode(m) != "ar" for m in modes):
        raise ValueError("nothing to replay: the results have no speculative or mirror records")
    per_q = []
    for r in recs:
        t = sum(_round_times(dev, replay_mode(r["method"]), r, gamma, layer))
        t_ar = r["new_tokens"] * dev.time_target(1)
        per_q.append({"question_id": r["question_id"], "task": r["task"], "method": r["method"],
                      "new_tokens": r["new_tokens"], "predicted_decode_s": t,
                      "predicted_tokens_per_s": r["new_tokens"] / t,
                      "predicted_speedup_vs_ar": t_ar / t})  # fmt: skip
    agg = {m: _aggregate([q for q in per_q if q["method"] == m], dev) for m in modes}
    formula = {
        m: _formula(dev, replay_mode(m), [r for r in recs if r["method"] == m], gamma, layer)
        for m in modes
        if replay_mode(m) != "ar"
    }
    assumptions = [
        "decode only: prefill is not in the profile",
        "measured acceptance, hits, branch counts and drafted tokens per round are kept; only "
        "the timings change",
        "`<mirror method>@B=n`: the same rounds with the branch budget this profile favours; a "
        "round hits iff the verdict's recorded rank among all branches is < n (κ as in the run)",
        "mirror rollouts take the recorded batched steps per round (γ for runs before "
        "`rollout_steps` was recorded, which overestimates rollouts under a draft-length policy)",
        f"overlap slowdown f = {prof.overlap_slowdown:g} (suffix and rollouts, while both run)",
        f"exit layer {layer} of {prof.num_layers} (same depth fraction as the measured run)",
        "target layers cost the same: t_pre = (ℓe/N)·t_T",
    ]
    if dev.extrapolated:
        assumptions.append(f"linearly extrapolated beyond the profile: {sorted(dev.extrapolated)}")
    return {
        "label": PREDICTED, "profile": prof.to_dict(), "gamma": gamma, "exit_layer": layer,
        "source": {"command": results.get("command"), "date": results.get("date"),
                   "models": results.get("models")},
        "assumptions": assumptions, "per_question": per_q,
        "aggregates": agg, "formula": formula,
    }  # fmt: skip


def _aggregate(rows: list[dict], dev: SimDevice) -> dict:
    out = {}
    for task in (*TASKS, OVERALL):
        g = rows if task == OVERALL else [q for q in rows if q["task"] == task]
        if not g:
            continue
        tps = sum(q["predicted_tokens_per_s"] for q in g) / len(g)
        out[task] = {"predicted_tokens_per_s": tps,
                     "predicted_speedup_vs_ar": tps * dev.time_target(1)}  # fmt: skip
    return out


def markdown(sim: dict) -> str:
    """simulated.md: every number under a PREDICTED heading or column."""
    p = sim["profile"]
    lines = [f"# {PREDICTED} Spec-Bench speedups on simulated hardware", "",
             f"Profile: {p['description'] or '(no description)'}", "",
             f"γ={sim['gamma']}, ℓe={sim['exit_layer']}/{p['num_layers']}; replayed from "
             f"`{sim['source']['command']}` ({sim['source']['date']}).", "",
             *[f"- assumption: {a}" for a in sim["assumptions"]], ""]  # fmt: skip
    agg = sim["aggregates"]
    tasks = [t for t in (*TASKS, OVERALL) if t in next(iter(agg.values()))]
    lines += [f"## {PREDICTED} speedup vs ar (replay of measured rounds)", "",
              "| method | " + " | ".join(tasks) + " |", "|" + " --- |" * (len(tasks) + 1)]  # fmt: skip
    for m, by_task in agg.items():
        cells = [f"{by_task[t]['predicted_speedup_vs_ar']:.2f}× {PREDICTED}" for t in tasks]
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    lines += ["", f"## {PREDICTED} closed form (pooled averages, docs/algorithm.md latency model)", "",
              f"| method | drafted/round | tokens/round | hit rate | mean branches | "
              f"{PREDICTED} round | {PREDICTED} speedup vs ar |",
              "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for m, f in sim["formula"].items():
        h = "–" if f["hit_rate"] is None else f"{f['hit_rate']:.0%}"
        b = "–" if f["mean_branches"] is None else f"{f['mean_branches']:.1f}"
        lines.append(f"| `{m}` | {f['mean_drafted']:.2f} | {f['predicted_tokens_per_round']:.2f} | {h} | {b} | "
                     f"{f['predicted_round_s'] * 1e3:.2f} ms | "
                     f"{f['predicted_speedup_vs_ar']:.2f}× {PREDICTED} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def run_simulation(results: dict | str | Path, profile_path: str | Path, out: str | Path,
                   exit_layer: int | None = None) -> dict:  # fmt: skip
    """Load results (dict or results.json path) and a profile JSON; write simulated.json/.md."""
    if not isinstance(results, dict):
        path = Path(results)
        if not path.is_file():
            raise FileNotFoundError(f"--from-results {path}: no such file")
        results = json.loads(path.read_text())
    sim = simulate(results, Profile.load(profile_path), exit_layer)
    sim["profile_file"] = str(profile_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulated.json").write_text(json.dumps(sim, indent=1) + "\n")
    (out / "simulated.md").write_text(markdown(sim))
    return sim
