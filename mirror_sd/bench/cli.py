"""`mirror-sd bench`: Spec-Bench over hf-ar, hf-assisted, hf-pld and our ar / speculative / mirror
(+ the OpenVINO GenAI peers ov-ar, ov-sd, ov-sd+conf, ov-pld with `pip install -e '.[peers]'`,
each at OpenVINO's defaults and pinned to the plan's precision, e.g. ov-ar@f32; + the
llama.cpp peers llama-ar, llama-sd, llama-pld with the `llamacpp` extra).

    mirror-sd bench --target T --draft D [--per-category 6] [--max-new-tokens 128] [--repeat 1]
                    [--methods hf-ar,...,mirror,ov-ar,ov-sd] [--peer-precision defaults,plan]
                    [--out DIR]
    mirror-sd bench --from-results DIR/results.json --simulate PROFILE.json [--out DIR]
    mirror-sd bench --from-results DIR/results.json        # re-render results.md / speedup.png
    mirror-sd bench --ablation RUN1=int8 --ablation RUN2=int4 --out DIR   # one table over runs
    mirror-sd bench --target T --draft D --batch 1,2,4 [--methods ar,speculative,...]
    mirror-sd bench --docs docs/benchmarks.md [--check]   # rebuild (check) the tables made
                                                          # from benchmarks/results/

Imports stay light here: torch and transformers load only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import yaml

SPEC_FLAGS = {"gamma": "num_draft_tokens", "kappa": "exit_top_k", "exit_layer": "exit_layer",
              "branch_budget": "branch_budget", "max_len": "max_len"}  # fmt: skip


DEFAULT_METHODS = "hf-ar,hf-assisted,hf-pld,ar,speculative,mirror"


def _speculation(args: argparse.Namespace) -> dict:
    out = {}
    for flag, name in SPEC_FLAGS.items():
        v = getattr(args, flag)
        if v is not None:
            out[name] = v if v == "auto" else int(v)
    for item in args.set or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"mirror-sd bench: --set {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)  # YAML scalars: 16384 -> int, trained -> str
    return out


def _tasks(args: argparse.Namespace) -> tuple[str, ...]:
    from mirror_sd.bench.specbench import TASKS

    return tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else TASKS


def _run(args: argparse.Namespace) -> int:
    from mirror_sd.bench import report, simulate
    from mirror_sd.bench.methods import parse_methods

    if args.docs:
        from mirror_sd.bench import docs_tables

        try:
            return docs_tables.main_docs(Path(args.docs), args.check)
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"mirror-sd bench --docs: {e}") from None
    out = Path(args.out)
    if args.batch:
        return _run_batch(args, out)
    if args.reference:
        raise SystemExit("mirror-sd bench: --reference RUN_DIR serves a --batch run (its "
                         "batch-1 token ids); add --batch SIZES")  # fmt: skip
    if args.sweep:
        from mirror_sd.bench import sweep
        from mirror_sd.partition import Profile

        try:
            prof = Profile.load(args.sweep)
        except (OSError, ValueError) as e:
            raise SystemExit(f"mirror-sd bench --sweep: {e}") from None
        text = sweep.markdown(sweep.sweep(prof), prof)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.md").write_text(text + "\n")
        print(text)
        return 0
    if args.ablation:
        from mirror_sd.bench import ablation

        try:
            text = ablation.markdown(ablation.load_runs(args.ablation))
        except FileNotFoundError as e:
            raise SystemExit(f"mirror-sd bench: {e}") from None
        out.mkdir(parents=True, exist_ok=True)
        (out / "ablation.md").write_text(text + "\n")
        print(text)
        return 0
    if args.from_results:
        path = Path(args.from_results)
        if not path.is_file():
            raise SystemExit(f"mirror-sd bench: --from-results {path}: no such file")
        results = json.loads(path.read_text())
        if not args.simulate:
            results["aggregates"] = report.aggregate(
                results["records"], results["settings"]["methods"]
            )
            paths = report.write_all(results, out)
            print(f"re-rendered {', '.join(str(p) for p in paths.values())}")
            return 0
    else:
        if not args.target:
            raise SystemExit("mirror-sd bench: give --target (and --draft), or --from-results")
        from mirror_sd.bench.peers import PeersUnavailableError, check_available, parse_precisions
        from mirror_sd.bench.runner import BenchConfig, run_bench

        try:
            methods = parse_methods(args.methods)
            check_available(methods)
        except ValueError as e:
            raise SystemExit(f"mirror-sd bench: --methods: {e}") from None
        try:
            precisions = parse_precisions(args.peer_precision)
            if args.repeat < 1 or args.per_category < 1 or args.max_new_tokens < 1:
                raise ValueError(
                    f"--repeat {args.repeat}, --per-category {args.per_category}, "
                    f"--max-new-tokens {args.max_new_tokens}: each must be 1 or more"
                )
        except ValueError as e:
            raise SystemExit(f"mirror-sd bench: {e}") from None
        cfg = BenchConfig(
            target=args.target, draft=args.draft, device_map=args.device_map,
            per_category=args.per_category, max_new_tokens=args.max_new_tokens, tasks=_tasks(args),
            repeat=args.repeat, peer_precision=precisions,
            methods=methods, out=out, questions=args.questions, stop_at_eos=args.stop_at_eos,
            hf_threads=args.hf_threads, hf_dtype=args.hf_dtype, cache=args.cache, speculation=_speculation(args),
            progress=not args.quiet, peer_target_format=args.peer_target_format,
            peer_draft_format=args.peer_draft_format, peer_residency=args.peer_residency,
            resume=args.resume,
        )  # fmt: skip
        try:
            results = run_bench(cfg)
        except PeersUnavailableError as e:  # conversion or the converter venv failed
            raise SystemExit(f"mirror-sd bench: {e}") from None
        print((out / "results.md").read_text())
        print(f"written to {out}/: results.json results.md speedup.png answers/ trace_mirror.json")
    if args.simulate:
        try:
            sim = simulate.run_simulation(results, args.simulate, out, args.sim_exit_layer)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"mirror-sd bench --simulate: {e}") from None
        print(simulate.markdown(sim))
        print(f"PREDICTED figures written to {out}/simulated.json and {out}/simulated.md")
    return 0


def _run_batch(args: argparse.Namespace, out: Path) -> int:
    """`--batch 1,2,4`: batched ar / speculative / mirror over Spec-Bench (bench/batch_bench)."""
    from mirror_sd.bench import batch_bench

    if not args.target:
        raise SystemExit("mirror-sd bench --batch: give --target (and --draft)")
    try:
        sizes = batch_bench.parse_sizes(args.batch)
    except ValueError as e:
        raise SystemExit(f"mirror-sd bench: {e}") from None
    batchable = ["ar", "speculative", "mirror"]
    given = args.methods.split(",") if args.methods != DEFAULT_METHODS else batchable
    methods = [m.strip() for m in given if m.strip()]
    from tqdm import tqdm

    import mirror_sd.api as api
    from mirror_sd.bench.runner import _command_line, load_average, machine_info, versions
    from mirror_sd.bench.specbench import default_path, load_questions
    from mirror_sd.runtime.prompts import encode_prompt, eos_token_ids

    qpath = Path(args.questions) if args.questions else default_path()
    questions = load_questions(qpath, args.per_category, _tasks(args))
    try:
        reference = batch_bench.load_reference(args.reference) if args.reference else None
    except ValueError as e:
        raise SystemExit(f"mirror-sd bench: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    started = {"command": _command_line(), "machine": machine_info(), "versions": versions(),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    with api.compile(args.target, args.draft, args.device_map, cache=args.cache,
                     **_speculation(args)) as plan:  # fmt: skip
        prompts = [encode_prompt(plan.tokenizer, q.text, chat=True) for q in questions]
        eos = eos_token_ids(plan.tokenizer, plan.generation_config) if args.stop_at_eos else ()
        bar = tqdm(desc="batch bench", unit="group", disable=args.quiet)
        try:
            rows = batch_bench.run(plan, prompts, sizes, args.max_new_tokens, methods, eos,
                                   ids=[q.question_id for q in questions], reference=reference,
                                   journal=out / batch_bench.JOURNAL_FILE, resume=args.resume,
                                   progress=lambda g: bar.update())  # fmt: skip
        except ValueError as e:
            raise SystemExit(f"mirror-sd bench --batch: {e}") from None
        finally:
            bar.close()
    text = batch_bench.markdown(rows)
    (out / "batch.json").write_text(json.dumps(batch_bench.to_json(rows), indent=1) + "\n")
    (out / "batch.md").write_text(text + "\n")
    run = {**started, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "load_average_at_end": load_average(), "reference": args.reference,
           "questions": str(qpath), "question_ids": [q.question_id for q in questions],
           "sizes": sizes, "methods": methods, "max_new_tokens": args.max_new_tokens,
           "stop_at_eos": args.stop_at_eos, "journal": batch_bench.JOURNAL_FILE}  # fmt: skip
    (out / "batch_run.json").write_text(json.dumps(run, indent=1) + "\n")
    print(text)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to a `mirror-sd` subparsers object."""
    p = subparsers.add_parser(
        "bench",
        help="Spec-Bench: HF baselines vs our ar / speculative / mirror (and PREDICTED replays)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", default=None, help="target model (known name or HF folder)")
    p.add_argument("--draft", default=None, help="draft model (known name or HF folder)")
    p.add_argument(
        "--device-map",
        default=None,
        help="YAML device map (default: the packaged ort_ort_cpu.yaml)",
    )
    p.add_argument("--per-category", type=int, default=6,
                   help="questions per Spec-Bench task (default 6: 36 prompts)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=128, help="default 128")
    p.add_argument("--repeat", type=int, default=1,
                   help="passes over the questions, each interleaving every method per prompt "
                        "(e.g. --per-category 3 --repeat 2: 36 timed prompts)")  # fmt: skip
    p.add_argument("--tasks", default=None,
                   help="comma-separated Spec-Bench tasks to run (default: all six)")  # fmt: skip
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated methods (default: the six shown; more: pld, sam, hd, "
                        "mirror+sam, speculative+conf, ..., ov-ar, ov-sd, ov-sd+conf, ov-pld "
                        "(ov-pld joins any ov-* run), ov-ar@f32|bf16|f16, llama-ar, llama-sd, "
                        "llama-pld)")  # fmt: skip
    p.add_argument("--out", default="bench_results", help="output folder")
    p.add_argument("--questions", default=None,
                   help="Spec-Bench question.jsonl (default $MIRROR_SD_SPEC_BENCH, then "
                        "../shared/data/spec_bench/question.jsonl beside the repo)")  # fmt: skip
    p.add_argument("--stop-at-eos", action="store_true",
                   help="stop every method at EOS (default: EOS disabled, equal token counts)")  # fmt: skip
    p.add_argument(
        "--hf-threads", type=int, default=None, help="torch threads for hf-* (default: all)"
    )
    p.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the transformers models (default float32)")  # fmt: skip
    p.add_argument("--peer-target-format", default=None, choices=["fp32", "int8", "int4"],
                   help="ov-* peers: the target IR's weights (default: as the plan's target)")  # fmt: skip
    p.add_argument("--peer-draft-format", default=None, choices=["fp32", "int8", "int4"],
                   help="ov-sd: the draft IR's weights (default: as the plan's draft, else int8)")  # fmt: skip
    p.add_argument("--peer-residency", default="auto", choices=["auto", "all", "one"],
                   help="ov-* peers: keep every pipeline loaded (all), load each for its turn "
                   "only (one), or decide by free memory (auto, the default)")  # fmt: skip
    p.add_argument("--peer-precision", default="defaults,plan",
                   help="ov-* peers: one row per item, comma-separated: defaults (OpenVINO's "
                   "own: bf16 on AMX/AVX512-BF16 CPUs), plan (INFERENCE_PRECISION_HINT pinned "
                   "to the plan's target precision: ov-ar@f32, ...), f32, bf16, f16 "
                   "(default: defaults,plan)")  # fmt: skip
    p.add_argument("--gamma", default=None, help="γ for the plan")
    p.add_argument("--kappa", default=None, help="κ for the plan")
    p.add_argument("--exit-layer", default=None, help="ℓe for the plan, or 'auto'")
    p.add_argument("--branch-budget", default=None, help="branch budget, or 'auto'")
    p.add_argument("--max-len", default=None, help="context length of the plan's KV caches")
    p.add_argument("--cache", default=None, help="model cache folder (default $MIRROR_SD_CACHE)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any speculation setting for the plan, e.g. exit_head=trained "
                        "(repeatable; see docs/device_map.md)")  # fmt: skip
    p.add_argument("--simulate", default=None, metavar="PROFILE",
                   help="cost Profile JSON of other hardware: replay the rounds on it (PREDICTED)")  # fmt: skip
    p.add_argument("--from-results", default=None, metavar="RESULTS_JSON",
                   help="use a finished run's results.json instead of running")  # fmt: skip
    p.add_argument("--sweep", default=None, metavar="PROFILE_JSON",
                   help="PREDICTED speedups over an (ℓe, κ, γ) grid from a measured profile "
                        "(a run's profile.json) into OUT/sweep.md")  # fmt: skip
    p.add_argument("--ablation", action="append", metavar="RUN_DIR[=LABEL]",
                   help="tabulate finished runs (one per draft variant) into OUT/ablation.md")  # fmt: skip
    p.add_argument("--sim-exit-layer", type=int, default=None,
                   help="ℓe on the simulated target (default: same depth fraction)")  # fmt: skip
    p.add_argument("--batch", default=None, metavar="SIZES",
                   help="batch sizes, e.g. 1,2,4: batched plan methods (default ar, "
                        "speculative, mirror; --methods takes any plan method, e.g. "
                        "speculative+conf+sam) into OUT/batch.md and batch.json")  # fmt: skip
    p.add_argument("--reference", default=None, metavar="RUN_DIR",
                   help="with --batch: the batch-1 token ids of a Spec-Bench run (its "
                        "records.jsonl) instead of running batch 1 here; questions it lacks "
                        "are skipped")  # fmt: skip
    p.add_argument("--docs", default=None, metavar="MARKDOWN",
                   help="rebuild the tables between <!-- results: RUN --> markers in MARKDOWN "
                        "from the results folders they name (docs/benchmarks.md)")  # fmt: skip
    p.add_argument("--check", action="store_true",
                   help="with --docs: change nothing, exit 1 if a table differs from its results")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true",
                   help="continue a run that stopped: keep the questions OUT/records.jsonl "
                   "finished (same methods; with --batch the groups of "
                   "OUT/batch_records.jsonl), run the rest; without --batch it warns when "
                   "the machine or plan is not the one OUT/sessions.jsonl recorded"
                   )  # fmt: skip
    p.set_defaults(func=_run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run `bench` on its own (the same as `mirror-sd bench ...`)."""
    parser = argparse.ArgumentParser(prog="mirror-sd")
    add_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
