"""`mirror-sd` command line: models, compile, describe, generate, serve, demo, trace, bench,
train, calibrate."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from pathlib import Path

DEMO_TARGET, DEMO_DRAFT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"
DEMO_PROMPT = "Write a Python function that returns the n-th Fibonacci number iteratively."
DEBUG_HELP = "show the Python traceback of an error instead of one line"
QUIET_HELP = "no progress bars on stderr (export, quantization, profiling)"
# The user's errors (one line, exit 2; see is_user_error), more in modules loaded lazily:
USER_ERRORS = (ValueError, FileNotFoundError)
LAZY_USER_ERRORS = {  # module -> exception class; when it raised, its module is loaded
    "mirror_sd.devices.ort_core": "ProviderUnavailableError",
    "mirror_sd.graphs.gguf_fetch": "ModelFetchError",
    "mirror_sd.devices.torch_device": "DeviceUnavailableError",
}
SPEC_FLAGS = {  # CLI flag -> SpecConfig field
    "mode": "mode",
    "gamma": "num_draft_tokens",
    "exit_layer": "exit_layer",
    "kappa": "exit_top_k",
    "branch_budget": "branch_budget",
    "max_len": "max_len",
}


def _spec_overrides(args: argparse.Namespace) -> dict:
    from mirror_sd.partition.spec_config import CONFIG_MODES  # lazy: `--help` stays fast

    if getattr(args, "mode", None) not in (None, *CONFIG_MODES):
        raise ValueError(f"--mode {args.mode!r}: expected one of {', '.join(CONFIG_MODES)}")
    out = {}
    for flag, field in SPEC_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            out[field] = (
                int(value)
                if field in ("exit_layer", "branch_budget") and value != "auto"
                else value
            )
    return out


def _models(args: argparse.Namespace) -> int:
    from mirror_sd.graphs import zoo

    if args.models_cmd == "fetch":
        print(zoo.fetch_model(args.name, cache=args.cache, progress=not args.quiet))
        return 0
    for m in zoo.list_models(cache=args.cache):
        state = f"ready at {m['path']}" if m["materialized"] else "not fetched"
        print(f"{m['name']:<22} {m['description'][:60]:<60} {state}")
    return 0


def _plan(args: argparse.Namespace):
    import mirror_sd.api as api

    if (Path(args.model) / "plan.yaml").is_file():
        return api.load(args.model)
    return api.compile(
        args.model, args.draft, args.device_map, cache=args.cache, **_spec_overrides(args)
    )


def _compile(args: argparse.Namespace) -> int:
    import mirror_sd.api as api

    with _plan(args) as plan:
        api.save(plan, args.output)
        print(api.describe(plan))
    print(f"\nplan saved to {args.output}")
    return 0


def _describe(args: argparse.Namespace) -> int:
    import mirror_sd.api as api

    if not (Path(args.plan) / "plan.yaml").is_file():
        raise FileNotFoundError(
            f"{args.plan} has no plan.yaml: give a plan folder written by `mirror-sd compile -o`"
        )
    with api.load(args.plan) as plan:
        print(api.describe(plan))
    return 0


def _run_generation(plan, args: argparse.Namespace, prompt: str) -> None:
    kwargs = dict(seed=args.seed, trace=args.trace, chat=not args.no_chat)
    if args.temperature is not None:
        kwargs["temperature"] = args.temperature
    if args.stop:
        kwargs["stop_strings"] = args.stop
    for piece in plan.stream(prompt, args.max_new_tokens, **kwargs):
        print(piece, end="", flush=True)
    print()
    res = plan.last_result
    print(f"[{res.stats.summary()}]", file=sys.stderr)
    if res.trace_path:
        print(f"[trace: {res.trace_path} — open in ui.perfetto.dev; "
              f"summary: mirror-sd trace summarize {res.trace_path}]", file=sys.stderr)  # fmt: skip
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(res.stats.to_dict(), indent=1))


def _generate(args: argparse.Namespace) -> int:
    with _plan(args) as plan:
        _run_generation(plan, args, args.prompt)
    return 0


def _demo(args: argparse.Namespace) -> int:
    import mirror_sd.api as api

    args.model = args.target
    where = args.device_map or (
        "the default device map (target and draft in ONNX Runtime on the CPU, each at "
        "`quantize: auto`, named below; every core to whichever runs alone; mode auto)"
    )
    print(f"[compiling {args.target} <- {args.draft} on {where}]", file=sys.stderr)
    with _plan(args) as plan:
        print(api.describe(plan), file=sys.stderr)
        print(f"[running mode {plan.spec.mode}: {_why_mode(plan)}]", file=sys.stderr)
        args.trace = args.trace or "mirror_sd_demo_trace.json"
        _run_generation(plan, args, args.prompt)
        run = plan.last_result
        if not args.skip_check:
            ar = plan.generate(
                args.prompt, args.max_new_tokens, mode="autoregressive", chat=not args.no_chat
            )
            same = "yes" if ar.tokens == run.tokens else "NO (see docs/runtime.md on near-ties)"
            print(f"[target-only on the same plan: {ar.stats.tokens_per_s:.2f} tok/s; "
                  f"{plan.spec.mode} speedup {run.stats.tokens_per_s / ar.stats.tokens_per_s:.2f}x; "
                  f"identical tokens: {same}]", file=sys.stderr)  # fmt: skip
    return 0


def _serve(args: argparse.Namespace) -> int:
    # no third-party imports: checks run first
    from mirror_sd.serve.config import ServeConfig, check_model_names

    names = _served_names(args.model, args.served_model_name)
    check_model_names(names)
    config = ServeConfig(
        model_name=names[0],
        host=args.host,
        port=args.port,
        max_queue=args.max_queue,
        engine=args.engine,
        prefix_cache=args.prefix_cache,
    )
    try:
        from mirror_sd.serve.server import listen, serve
    except ImportError as exc:
        raise ValueError(
            f"mirror-sd serve needs the 'serve' extra ({exc.name} is not installed): "
            "pip install -e '.[serve]'"
        ) from None
    sock = listen(config.host, config.port)  # before compiling: a taken port fails at once
    from mirror_sd.devices.shared_sessions import shared_sessions

    with ExitStack() as opened:
        plans = {}
        sharing = nullcontext() if args.no_shared_draft else shared_sessions()
        with sharing as share:  # plans of the same draft share one copy of its weights
            for name, model in zip(names, args.model, strict=True):
                one = argparse.Namespace(**{**vars(args), "model": model})
                plans[name] = opened.enter_context(_plan(one))
        for what, weights, users in share.shared() if share else ():
            print(f"[{users} plans share one {what} of {weights}]", file=sys.stderr)
        serve(plans, config, sock, on_ready=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


def _served_names(models: list[str], given: list[str] | None) -> list[str]:
    """The id of each served plan: `--served-model-name`, once per plan in order, else each
    plan or model's folder name."""
    if given is None:
        return [Path(m).name for m in models]
    if len(given) != len(models):
        raise ValueError(
            f"--served-model-name given {len(given)} time(s) for {len(models)} plan(s) "
            f"({', '.join(models)}): give it once per plan, in the same order, or leave it out "
            "to serve each under its folder name"
        )
    return list(given)


def _why_mode(plan) -> str:
    """Why the plan runs its mode: the cost model's verdict under `mode: auto`, else the map."""
    choice = plan.report.choice
    if plan.report.mode_asked == "auto" and choice is not None:
        return choice.mode_verdict()
    if plan.report.mode_asked == "auto":
        return "mode auto without a draft to profile"
    return "the mode the device map (or --mode) asks for"


def _quant(args: argparse.Namespace) -> int:
    import mirror_sd.api as api

    text = Path(args.text).read_text() if args.text else None
    kwargs = {"text": text} if text else {}
    print(
        json.dumps(
            api.quantization_report(
                args.model,
                cache=args.cache,
                threads=args.threads,
                quantizations=tuple(q.strip() for q in args.quantize.split(",") if q.strip()),
                **kwargs,
            ),
            indent=1,
        )
    )
    return 0


def _trace(args: argparse.Namespace) -> int:
    from mirror_sd.runtime.trace_tools import load_trace, summarize

    trace = load_trace(args.path)  # a TraceError (ValueError) names what is wrong: exit 2
    print(f"trace: {args.path}")
    print(summarize(trace).table())
    if args.png is not None:
        from mirror_sd.runtime.trace_plot import plot_timeline

        try:
            print(f"timeline: {plot_timeline(trace, args.png, max_rounds=args.rounds)}")
        except (ImportError, OSError) as exc:  # no matplotlib, or the PNG cannot be written
            raise SystemExit(f"mirror-sd trace summarize: {exc}") from None
    return 0


def _cache(args: argparse.Namespace) -> int:
    from mirror_sd.graphs import export_cache, zoo

    folder = Path(args.onnx_dir) if args.onnx_dir else zoo.cache_dir(args.cache) / "onnx"
    if args.cache_cmd == "list":
        print(f"{folder}:")
        print(export_cache.table(export_cache.entries(folder)))
        return 0
    gone = export_cache.prune(folder, args.max_gb, args.older_than_days, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} from {folder}:")
    print(export_cache.table(gone))
    print(f"left:\n{export_cache.table(export_cache.entries(folder))}")
    return 0


def _add_plan_args(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("--draft", default=None, help="draft model (name or HF folder)")
    p.add_argument(
        "--device-map",
        default=None,
        help="YAML device map (default: examples/device_maps/ort_ort_cpu.yaml)",
    )
    p.add_argument(
        "--mode",
        default=None,
        help="mirror, speculative, autoregressive, or auto: the mode the cost model predicts "
        "fastest on these devices (profiled)",
    )
    p.add_argument("--gamma", type=int, default=None, help="γ, draft tokens per round")
    p.add_argument("--kappa", type=int, default=None, help="κ, exit candidates per position")
    p.add_argument("--exit-layer", default=None, help="ℓe or 'auto'")
    p.add_argument("--branch-budget", default=None, help="branches per round or 'auto'")
    p.add_argument("--max-len", type=int, default=None, help="context length (KV cache rows)")
    p.add_argument("--cache", default=None, help="model cache folder (default $MIRROR_SD_CACHE)")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--trace", default=None, help="write a Chrome trace JSON here")
    p.add_argument("--stats-json", default=None, help="write the generation stats here")


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    from mirror_sd.serve.config import (
        DEFAULT_ENGINE,
        DEFAULT_HOST,
        DEFAULT_MAX_QUEUE,
        DEFAULT_PORT,
        DEFAULT_PREFIX_CACHE,
        ENGINES,
    )

    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on ({DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"{DEFAULT_PORT}; 0: a free port")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests that may wait; one more gets 429")  # fmt: skip
    p.add_argument("--engine", default=DEFAULT_ENGINE,
                   help=f"{' or '.join(ENGINES)}: continuous batching (default {DEFAULT_ENGINE}) "
                   "or one request at a time")  # fmt: skip
    p.add_argument("--served-model-name", action="append", default=None,
                   help="the model id clients send (default: the plan or model's folder name); "
                   "with several plans, once per plan in their order")  # fmt: skip
    p.add_argument("--no-shared-draft", action="store_true",
                   help="give each plan a copy of its draft of its own (default: plans whose "
                   "draft is the same ONNX graph share one session, and plans whose torch draft "
                   "is the same checkpoint one model: one copy of its weights)")  # fmt: skip
    p.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction,
                   default=DEFAULT_PREFIX_CACHE,
                   help="reuse the K/V rows of finished requests whose prompt shares a prefix "
                   "(faster TTFT for chats and shared system prompts; an answer may then part "
                   "from plan.generate's at a close call, docs/serving.md). Default: off, "
                   "every prompt prefilled from scratch, every answer plan.generate's")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror-sd", description=__doc__)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="cmd", required=True)

    models = sub.add_parser("models", help="list or fetch the known pretrained models")
    msub = models.add_subparsers(dest="models_cmd", required=True)
    fetch = msub.add_parser("fetch", help="materialize a model as a local HF folder")
    fetch.add_argument("name")
    fetch.add_argument("--quiet", action="store_true")
    for p in (fetch, msub.add_parser("list", help="known models and where they are")):
        p.add_argument("--cache", default=None, help="cache folder (default $MIRROR_SD_CACHE)")
    models.set_defaults(func=_models)

    comp = sub.add_parser("compile", help="compile a target (+ draft) into a saved plan folder")
    comp.add_argument("model", help="target: a known model name or a local HF folder")
    _add_plan_args(comp, "target")
    comp.add_argument("-o", "--output", required=True, help="plan folder to write")
    comp.set_defaults(func=_compile)

    desc = sub.add_parser("describe", help="describe a saved plan")
    desc.add_argument("plan")
    desc.set_defaults(func=_describe)

    gen = sub.add_parser("generate", help="generate text with a plan (or compile one on the fly)")
    gen.add_argument("model", help="a saved plan folder, a known model name or a local HF folder")
    gen.add_argument("--prompt", required=True)
    _add_plan_args(gen, "target")
    _add_generation_args(gen)
    gen.set_defaults(func=_generate)

    demo = sub.add_parser("demo", help="the main job: Mirror-SD on the default models and map")
    demo.add_argument("--target", default=DEMO_TARGET)
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    demo.add_argument("--skip-check", action="store_true", help="skip the target-only comparison")
    _add_plan_args(demo, "target")
    _add_generation_args(demo)
    demo.set_defaults(func=_demo, draft=DEMO_DRAFT, max_new_tokens=64)

    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (docs/serving.md)")
    srv.add_argument("model", nargs="+", metavar="PLAN_OR_MODEL",
                     help="a saved plan folder, a known model name or a local HF folder; several "
                     "serve several targets (plans of one draft share its weights)")  # fmt: skip
    _add_plan_args(srv, "target")
    _add_serve_args(srv)
    srv.set_defaults(func=_serve)

    quant = sub.add_parser(
        "quantize-check",
        help="int8 / int4 vs fp32 top-1 agreement and step time of an exported model",
    )
    quant.add_argument(
        "model", help="a known model name or a local HF folder (typically the draft)"
    )
    quant.add_argument(
        "--text",
        default=None,
        help="a text file to measure on (default: a built-in calibration text)",
    )
    quant.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    quant.add_argument(
        "--quantize",
        default="int8,int4",
        help="comma-separated quantizations to compare with fp32 (default int8,int4)",
    )
    quant.add_argument(
        "--cache", default=None, help="model cache folder (default $MIRROR_SD_CACHE)"
    )
    quant.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    quant.set_defaults(func=_quant)

    trace = sub.add_parser("trace", help="inspect a Chrome trace written by --trace")
    tsub = trace.add_subparsers(dest="trace_cmd", required=True)
    summ = tsub.add_parser("summarize", help="per-device busy %%, overlap %%, exposed draft time")
    summ.add_argument("path")
    summ.add_argument("--png", default=None, help="also draw a timeline PNG of the first rounds")
    summ.add_argument("--rounds", type=int, default=4, help="rounds drawn in the PNG")
    trace.set_defaults(func=_trace)

    cache = sub.add_parser("cache", help="list or prune the ONNX export cache")
    csub = cache.add_subparsers(dest="cache_cmd", required=True)
    clist = csub.add_parser("list", help="entries, sizes and days since last use (LRU first)")
    cprune = csub.add_parser("prune", help="remove least recently used exports (re-made on demand)")
    cprune.add_argument("--max-gb", type=float, default=None, help="keep at most this many GB")
    cprune.add_argument("--older-than-days", type=float, default=None,
                        help="remove entries unused for longer than this")  # fmt: skip
    cprune.add_argument("--dry-run", action="store_true", help="only list what would go")
    for p in (clist, cprune):
        p.add_argument(
            "--cache", default=None, help="model cache folder (default $MIRROR_SD_CACHE)"
        )
        p.add_argument("--onnx-dir", default=None, help="export cache (default <cache>/onnx)")
    cache.set_defaults(func=_cache)

    from mirror_sd.bench.cli import add_parser as add_bench_parser

    add_bench_parser(sub)
    from mirror_sd.training.cli import add_parser as add_training_parser

    add_training_parser(sub)
    _debug_flag_everywhere(parser)
    return parser


def _debug_flag_everywhere(parser: argparse.ArgumentParser) -> None:
    """`--debug` after any (sub)command too; unset there, it keeps the top-level value."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help=DEBUG_HELP)  # fmt: skip
                _debug_flag_everywhere(p)


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc` is the user's to fix (printed as one line, exit 2) rather than a bug.

    ValueError covers DeviceMapError and PlacementError (the map), UnknownModelError and
    UnsupportedModelError (the model), TokenizerMismatchError (the draft),
    PromptTooLongError and bad arguments; FileNotFoundError a missing file or folder;
    ProviderUnavailableError an execution provider this onnxruntime lacks; ModelFetchError
    a model that could not be fetched (network, disk space).
    """
    if isinstance(exc, USER_ERRORS):
        return True
    for module, name in LAZY_USER_ERRORS.items():
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(exc, getattr(loaded, name)):
            return True
    return False


def _fail(message: str) -> int:
    print(f"mirror-sd: error: {message}", file=sys.stderr)
    return 2


def progress_shown(args: argparse.Namespace) -> AbstractContextManager[None]:
    """Progress bars on for the command's long steps (`mirror_sd.progress`) unless `--quiet`."""
    from mirror_sd import progress

    return progress.shown(not getattr(args, "quiet", False))


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; a user error prints `mirror-sd: error: ...` and returns 2 (with
    `--debug`, it raises with its traceback instead). Other exceptions propagate."""
    args = build_parser().parse_args(argv)
    try:
        with progress_shown(args):
            return args.func(args)
    except SystemExit as exc:  # a subcommand's `raise SystemExit("mirror-sd bench: ...")`
        if args.debug or not isinstance(exc.code, str):
            raise
        message = exc.code.removeprefix("mirror-sd").lstrip()
        return _fail(message.removeprefix(":").lstrip())
    except Exception as exc:
        if args.debug or not is_user_error(exc):
            raise
        return _fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
