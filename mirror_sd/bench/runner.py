"""Run Spec-Bench: every method on every question, interleaved per question.

Protocol (what `results.json` records under "settings"): greedy, batch 1, the target's
chat template applied once per question by the target tokenizer (every method gets the
same token ids), one untimed warm-up generation per method (a peer's pipeline is warmed
again after every reload), `time.perf_counter` around each generate call (prefill included,
as Spec-Bench times it), methods interleaved per prompt, `repeat` passes over the questions.
By default (6 questions per task × 128 new tokens: 36 prompts) EOS is disabled for every
method, so every method produces exactly `max_new_tokens` tokens (`stop_at_eos=True` makes
all of them stop at the same EOS ids instead). Every record keeps its generated token ids.

Every output is compared with hf-ar's (and ours with our `ar`'s); where they differ, the
first differing position and the plan's target's top-2 logit margin there are recorded,
so a mismatch is explained as a near-tie or reported as a bug, never hidden.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

from mirror_sd.bench import peers, report
from mirror_sd.bench.jsonl import read_jsonl
from mirror_sd.bench.methods import (
    ALL_METHODS,
    NEAR_TIE,
    build_methods,
    first_difference,
    target_margin,
)
from mirror_sd.bench.peer_common import cpu_flags
from mirror_sd.bench.sessions import open_session, session_summary
from mirror_sd.bench.specbench import TASKS, Question, default_path, load_questions

SCHEMA = "mirror-sd-bench/1"
TRACE_FILE = "trace_mirror.json"
JOURNAL_FILE = "records.jsonl"  # one line per finished question (all its methods): --resume


@dataclass
class BenchConfig:
    """One benchmark run. `speculation` holds SpecConfig overrides for the compiled plan."""

    target: str
    draft: str | None
    device_map: str | None = None
    per_category: int = 6  # 36 prompts over the six tasks
    tasks: tuple[str, ...] = TASKS
    max_new_tokens: int = 128
    repeat: int = 1  # passes over the questions (each pass interleaves every method per prompt)
    methods: tuple[str, ...] = ALL_METHODS
    out: Path = Path("bench_results")
    questions: str | None = None  # question.jsonl; None: specbench.default_path()
    stop_at_eos: bool = False
    hf_threads: int | None = None  # None: every core (os.cpu_count())
    hf_dtype: str = "float32"  # dtype of the transformers models (hf-* methods)
    # OpenVINO IR weight formats of the ov-* peers (fp32 | int8 | int4); None: follow the
    # plan's devices (`quantize`), else fp32 target and int8 draft (bench/peers.py)
    peer_target_format: str | None = None
    peer_draft_format: str | None = None
    # ov-* peers: 'all' stay loaded, 'one' load for their turn only, 'auto' decides by memory
    peer_residency: str = "auto"
    # ov-* peers: a row per precision, 'defaults' (OpenVINO's own) and 'plan' (pinned to the
    # plan's target precision, peers.plan_precision) or a pin (f32 | bf16 | f16)
    peer_precision: tuple[str, ...] = peers.DEFAULT_PEER_PRECISION
    cache: str | None = None
    onnx_dir: str | None = None
    speculation: dict = field(default_factory=dict)
    warmup: bool = True
    progress: bool = True
    command: str | None = None  # the command line to record; None: sys.argv
    resume: bool = False  # keep the questions `out/records.jsonl` finished, run the rest


def machine_info() -> dict:
    """CPU model and flags, core counts, memory, OS and the load average when the run started
    (run_bench adds the one at its end: other work during a run distorts every ratio)."""
    cpu = platform.processor() or "unknown"
    with_file = Path("/proc/cpuinfo")
    if with_file.is_file():
        for line in with_file.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    mem = None
    if Path("/proc/meminfo").is_file():
        first = Path("/proc/meminfo").read_text().splitlines()[0].split()
        mem = round(int(first[1]) / 2**20, 1)
    return {"cpu": cpu, "cpu_flags": " ".join(sorted(cpu_flags())), "cores": os.cpu_count(),
            "cores_usable": usable, "memory_gib": mem, "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": load_average()}  # fmt: skip


def load_average() -> list[float] | None:
    """os.getloadavg() now (1, 5, 15 minutes); None where the OS has none."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def rss_gib() -> float | None:
    """This process's resident memory now (GiB), mapped weight files included; None off Linux."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    kb = int(status.read_text().split("VmRSS:")[1].split()[0])
    return round(kb / 2**20, 2)


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (GiB; ru_maxrss is in KiB on Linux)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def versions() -> dict:
    """Installed versions of the libraries whose behaviour the numbers depend on."""
    out = {}
    for dist in ("mirror-sd", "torch", "transformers", "onnxruntime", "tokenizers", "numpy",
                 "openvino", "openvino-genai", "openvino-tokenizers",
                 "llama-cpp-python"):  # fmt: skip
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _command_line() -> str:
    prog = Path(sys.argv[0])
    head = ["python", "-m", "mirror_sd.bench.cli"] if prog.match("bench/cli.py") else [prog.name]
    return shlex.join([*head, *sys.argv[1:]])


def _record(q: Question, name: str, prompt: list[int], out, tok) -> dict:
    n = len(out.tokens)
    exposed = out.exposed_draft_s
    return {
        "question_id": q.question_id, "category": q.category, "task": q.task, "method": name,
        "prompt_tokens": len(prompt), "tokens": out.tokens, "new_tokens": n,
        "wall_time": out.wall_s, "tokens_per_s": n / out.wall_s if out.wall_s > 0 else 0.0,
        "accept_lengths": out.accept_lengths, "drafted": out.drafted, "round_hits": out.round_hits,
        "round_branches": out.round_branches, "round_hit_ranks": out.round_hit_ranks,
        "rollout_steps": out.rollout_steps,
        "hit_rate": out.hit_rate,
        "draft_s": out.draft_s, "exposed_draft_s": exposed,
        "exposed_draft_fraction": exposed / out.wall_s if exposed is not None else None,
        "draft_exits": out.draft_exits,
        "text": tok.decode(out.tokens, skip_special_tokens=True).strip(),
    }  # fmt: skip


OWN_CONVERSION = ("ov-", "llama-")  # peers that run their own conversion of the checkpoint


def _verdict(r: dict, ref: str, m: dict, dtypes: tuple[str, str]) -> str:
    """Why `r` differs from `ref` at the first differing token, as far as the numbers tell."""
    if m["near_tie"]:
        return f"near-tie: top-2 margin {m['margin']:.1e} < {NEAR_TIE:g}, rounding can flip it"
    ours, hf = dtypes
    if ref == "hf-ar" and r.get("identical_to_ar"):
        return (f"equals our target's own greedy output (`ar`): our target ({ours}) and "
                f"{hf} disagree here numerically")  # fmt: skip
    if r["method"].startswith(OWN_CONVERSION):
        return (f"a peer running its own conversion of the checkpoint ({r['method']}): another "
                "model's rounding, not a lossless failure of ours")  # fmt: skip
    return "NOT a near-tie and not explained: investigate"


def _check(records: list[dict], plan, prompt: list[int], dtypes: tuple[str, str]) -> None:
    """Fill identical_to_hf_ar / identical_to_ar and explain every mismatch (one question).

    `dtypes`: (our target's device label, the HF models' label), for the verdicts."""
    by = {r["method"]: r for r in records}
    for r in records:
        r["mismatches"] = {}
        for ref, key in (("ar", "identical_to_ar"), ("hf-ar", "identical_to_hf_ar")):
            if ref not in by or (ref == "ar" and r["method"].startswith("hf-")):
                r[key] = None
                continue
            ref_toks = by[ref]["tokens"]
            pos = first_difference(r["tokens"], ref_toks)
            r[key] = pos is None
            if pos is None:
                continue
            m = {"position": pos,
                 "reference_token": ref_toks[pos] if pos < len(ref_toks) else None,
                 "token": r["tokens"][pos] if pos < len(r["tokens"]) else None}  # fmt: skip
            m.update(target_margin(plan, prompt, ref_toks[:pos]))
            m["verdict"] = _verdict(r, ref, m, dtypes)
            r["mismatches"][ref] = m


def _plan_info(plan) -> dict:
    import mirror_sd.api as api

    return {
        "spec": asdict(plan.spec),
        "device_map": plan.report.device_map,
        "target_device": plan.target_device.label,
        "draft_device": plan.draft_device.label if plan.draft_device else None,
        "num_layers": sum(1 for s in plan.report.graph.names() if s.startswith("target.layers.")),
        "exit_layer": plan.target.exit_layer,
        "describe": api.describe(plan),
        "draft_step_ms": _draft_step_ms(plan),
        "exit_head": plan.exit_head.describe() if plan.exit_head is not None else "logit lens",
    }


def _draft_step_ms(plan) -> float | None:
    """The draft's measured one-row step (the compile-time profile), in ms."""
    prof = plan.report.profile
    return round(prof.draft(1) * 1e3, 1) if prof is not None and plan.draft is not None else None


def _settings(cfg: BenchConfig, methods: list[str], eos: list[int], qpath: Path, hf_threads: int,
              pin: str | None) -> dict:  # fmt: skip
    return {
        "per_category": cfg.per_category, "tasks": list(cfg.tasks), "max_new_tokens": cfg.max_new_tokens,
        "repeat": cfg.repeat, "methods_requested": list(cfg.methods),
        "methods": methods, "greedy": True, "batch_size": 1,
        "eos_policy": "stop at the same EOS ids for every method" if cfg.stop_at_eos
        else "EOS disabled for every method: exactly max_new_tokens tokens each",
        "eos_token_ids": eos, "hf_threads": hf_threads, "hf_dtype": cfg.hf_dtype,
        "prompt": "first turn; the target tokenizer's chat template, applied once per question",
        "warmup": "one untimed generation per method on the first question; a peer's "
        "pipeline again after every reload" if cfg.warmup
        else "none (peers: one untimed generation after every load)",
        "timing": "time.perf_counter around each generate call, prefill included",
        "order": "interleaved: every method on question 1, then question 2, ...; "
        f"{cfg.repeat} pass(es) over the questions",
        "questions_file": str(qpath), "speculation_overrides": cfg.speculation,
        "peer_formats": {"target": cfg.peer_target_format, "draft": cfg.peer_draft_format},
        "peer_residency": cfg.peer_residency,
        "peer_precision": {"requested": list(cfg.peer_precision), "plan_pin": pin,
                           "pins": {p: peers.PIN_PROPERTIES[p] for p in peers.PINS}},
    }  # fmt: skip


def run_bench(cfg: BenchConfig) -> dict:
    """Compile one plan, run every method on every question, write the reports into `cfg.out`.

    Returns:
        The results dict written to `results.json`.
    Raises:
        SpecBenchNotFoundError, ValueError (bad methods or config), and whatever
        `mirror_sd.compile` raises for the models and device map.
    """
    import mirror_sd.api as api
    from mirror_sd.runtime.prompts import encode_prompt, eos_token_ids

    if cfg.repeat < 1:
        raise ValueError(f"--repeat {cfg.repeat}: give 1 or more passes over the questions")
    precisions = peers.parse_precisions(cfg.peer_precision)
    peers.check_available(cfg.methods)  # before the plan compiles: a missing extra fails at once
    qpath = Path(cfg.questions) if cfg.questions else default_path()
    questions = load_questions(qpath, cfg.per_category, cfg.tasks)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_threads = cfg.hf_threads or os.cpu_count() or 1
    command = cfg.command or _command_line()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = machine_info()
    with api.compile(cfg.target, cfg.draft, cfg.device_map, cache=cfg.cache,
                     onnx_dir=cfg.onnx_dir, **cfg.speculation) as plan:  # fmt: skip
        eos = (
            sorted(eos_token_ids(plan.tokenizer, plan.generation_config)) if cfg.stop_at_eos else []
        )
        memory = {"after_compile_gib": rss_gib()}
        pin = peers.plan_precision(plan) if any(map(peers.is_ov, cfg.methods)) else None
        names = list(peers.expand_methods(cfg.methods, precisions, pin or "f32"))
        methods = build_methods(names, plan, eos, hf_threads, cfg.hf_dtype,
                                cfg.peer_target_format, cfg.peer_draft_format, cfg.cache,
                                cfg.peer_residency)  # fmt: skip
        memory["after_building_methods_gib"] = rss_gib()
        prompts = [encode_prompt(plan.tokenizer, q.text, chat=True) for q in questions]
        if cfg.warmup:
            for m in methods.values():
                m.warm_up(prompts[0], cfg.max_new_tokens)
        memory["after_warmup_gib"] = rss_gib()
        journal = out_dir / JOURNAL_FILE
        done = load_journal(journal, names) if cfg.resume else {}
        if not cfg.resume:
            journal.unlink(missing_ok=True)
        session, sessions = open_session(out_dir, {
            "started": started, "command": command, "machine": machine, "versions": versions(),
            "plan": _plan_info(plan)}, cfg.resume, len(done))  # fmt: skip
        records = _run_all(questions, prompts, methods, plan, cfg, journal, done, session)
        trace = None
        if "mirror" in methods:  # untimed: one traced mirror run on the first question
            res = methods["mirror"].generate(prompts[0], cfg.max_new_tokens,
                                             trace=str(out_dir / TRACE_FILE))  # fmt: skip
            trace = {"file": TRACE_FILE, "question_id": questions[0].question_id,
                     "note": "an extra untimed mirror run; open in ui.perfetto.dev",
                     "tokens_per_s": len(res.tokens) / res.wall_s}  # fmt: skip
        results = {
            "schema": SCHEMA, "date": started, "command": command, "machine": machine,
            "versions": versions(),
            "models": {"target": cfg.target, "target_folder": plan.report.target,
                       "draft": cfg.draft, "draft_folder": plan.report.draft},
            "settings": {**_settings(cfg, names, eos, qpath, hf_threads, pin),
                         "resumed_questions": len(done)},
            "plan": _plan_info(plan),
            "threads": {name: m.describe() for name, m in methods.items()},
            "questions": [{**asdict(q), "prompt_tokens": len(p)}
                          for q, p in zip(questions, prompts, strict=True)],
            "records": records, "trace": trace,
            "sessions": session_summary(sessions, records),
            "memory": {**memory, "process_peak_gib": peak_rss_gib(),
                       "note": "one process holds every method's models: the plan's share is "
                               "after_compile (target + draft + tokenizer); the peers' and "
                               "transformers' models come on top of it"},
        }  # fmt: skip
    if plan.report.profile is not None:  # what the partitioner measured: --sweep reads it
        plan.report.profile.save(out_dir / "profile.json")
    results["machine"]["load_average_at_end"] = load_average()
    results["aggregates"] = report.aggregate(records, names)
    results["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report.write_all(results, out_dir)
    return results


def load_journal(path: Path, names: list[str]) -> dict[tuple[int, int], list[dict]]:
    """The finished questions of an interrupted run: {(repeat, question_id): its records},
    each marked `resumed` (timed by an earlier process). Raises ValueError when the journal's
    methods are not this run's (resuming would compare runs of different settings)."""
    done: dict[tuple[int, int], list[dict]] = {}
    for group in read_jsonl(path):  # the line an interruption cut short is run again
        methods = [r["method"] for r in group]
        if methods != names:
            raise ValueError(
                f"--resume: {path} holds methods {methods}, this run has {names}; resume with "
                "the same --methods and --peer-precision, or write to another --out"
            )
        done[(group[0]["repeat"], group[0]["question_id"])] = [
            {**r, "resumed": True} for r in group
        ]
    return done


def _run_all(questions, prompts, methods: dict, plan, cfg: BenchConfig, journal: Path,
             done: dict[tuple[int, int], list[dict]], session: int = 0) -> list[dict]:  # fmt: skip
    """Every method on every question, interleaved; each finished question is appended to
    `journal` at once (each record names its `session`, bench/sessions.py), and the questions
    in `done` (a resumed run's) are not run again."""
    records = []
    bar = tqdm(total=len(questions) * len(methods) * cfg.repeat, desc="spec-bench", unit="gen",
               disable=not cfg.progress)  # fmt: skip
    passes = [(k, q, p) for k in range(cfg.repeat) for q, p in zip(questions, prompts, strict=True)]
    try:
        for k, q, prompt in passes:
            if (k, q.question_id) in done:
                records += done[(k, q.question_id)]
                bar.update(len(methods))
                continue
            group = []
            for name, method in methods.items():
                bar.set_postfix_str(f"{q.task} q{q.question_id} {name}")
                out = method.generate(prompt, cfg.max_new_tokens)
                group.append(_record(q, name, prompt, out, plan.tokenizer))
                group[-1].update(repeat=k, tstamp=time.time(), session=session)
                bar.update()
            _check(group, plan, prompt, (plan.target_device.label, f"transformers {cfg.hf_dtype}"))
            records += group
            with journal.open("a") as f:
                f.write(json.dumps(group) + "\n")
    finally:
        bar.close()
    return records
