"""The soak's command line: `sequential`, `server` and `replay` sub-commands (the plan flags
as `mirror-sd generate` takes them), and `main`, which runs one, writes the report and returns
the exit code (0 only when nothing was lost or changed and every fault that fired was seen;
`replay`: 2 when its reference cannot be replayed on the plan). scripts/soak.py calls `main`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

from mirror_sd import cli, soak  # cli: mirror-sd's own command line (its plan flags)
from mirror_sd.bench.runner import load_average, machine_info, versions
from mirror_sd.soak.replay import run_replay
from mirror_sd.soak.report import write_report
from mirror_sd.soak.sequential import run_sequential
from mirror_sd.soak.server import run_server

SCHEMA = "mirror-sd-soak/1"
DEFAULT_MODEL = "smollm2-135m"
MODES = ("autoregressive", "speculative", "mirror")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="scripts/soak.py", description=soak.__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    seq = sub.add_parser("sequential", help="N generations in a row, draft faults injected")
    srv = sub.add_parser("server", help="a bounded server run: clients, cancels, bad requests")
    rep = sub.add_parser("replay", help="a Spec-Bench run's questions through the server, "
                         "each answer equal to the run's `ar` output")  # fmt: skip
    for p in (seq, srv, rep):
        p.add_argument("--target", default=DEFAULT_MODEL, help="known model name or HF folder")
        cli._add_plan_args(p, "")
        p.set_defaults(draft=DEFAULT_MODEL, mode="mirror")
        p.add_argument(
            "--out",
            required=True,
            type=Path,
            help="folder for soak.json / .md / .png (replay: replay.json / .md)",
        )
        p.add_argument("--questions", default=None, help="Spec-Bench question.jsonl (default: "
                       "$MIRROR_SD_SPEC_BENCH, else ../shared/data/spec_bench)")  # fmt: skip
        p.add_argument("--draft-timeout", type=float,
                       help="the plan's draft_timeout_s: a hung draft step is given up after it "
                       "(sequential: 5 s; server, replay: 30 s, SpecConfig's, as a served plan "
                       "has it)")  # fmt: skip
        p.add_argument(
            "--keep-batch-policy",
            action="store_true",
            help="keep the plan's per-batch-size modes (default: its mode at every size)",
        )
        p.add_argument("--seed", type=int, default=0)
    for p in (seq, srv):
        p.add_argument("--per-category", type=int, default=2, help="prompts per Spec-Bench task")
        p.add_argument("--lengths", default="16,32,64,128", help="max_new_tokens to mix")
    seq.set_defaults(draft_timeout=5.0)
    srv.set_defaults(draft_timeout=30.0)
    rep.set_defaults(draft_timeout=30.0)
    seq.add_argument("--generations", type=int, default=1000)
    seq.add_argument("--modes", default=",".join(MODES), help="generation modes to mix")
    seq.add_argument(
        "--fault-rate",
        type=float,
        default=0.1,
        help="share of the drafting generations given a draft fault",
    )
    srv.add_argument("--duration", type=float, default=1800.0, help="seconds of traffic")
    srv.add_argument("--clients", type=int, default=8)
    srv.add_argument("--fault-every", type=float, default=150.0, help="seconds between faults")
    srv.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    srv.add_argument("--engine", default="batch", choices=("batch", "serial"))
    srv.add_argument("--endpoints", default="chat,completion")
    for p in (srv, rep):
        p.add_argument("--prefix-cache", action="store_true",
                       help="serve with the prefix cache (its reuse may part from the reference "
                       "at a near-tie: docs/runtime.md, Prefix caching)")  # fmt: skip
    srv.add_argument("--stream-rate", type=float, default=0.5, help="share of streamed requests")
    srv.add_argument(
        "--cancel-rate", type=float, default=0.2, help="share of streams the client closes part way"
    )
    srv.add_argument("--malformed-rate", type=float, default=0.1, help="share of bad requests")
    rep.add_argument(
        "--reference",
        required=True,
        type=Path,
        help="a `mirror-sd bench --out` folder whose records.jsonl has `ar` records",
    )
    rep.add_argument("--clients", type=int, default=4, help="requests in flight at once")
    rep.add_argument("--stream-rate", type=float, default=0.0, help="share of streamed requests")
    rep.add_argument("--limit", type=int, default=None, help="only the first N questions")
    rep.add_argument(
        "--question-ids",
        default=None,
        help="only these Spec-Bench question ids, e.g. 460-560,81 (the part of a resumed "
        "reference that this machine's plan made)",
    )
    rep.add_argument(
        "--resume",
        action="store_true",
        help="keep the answers in OUT/replay_records.jsonl, ask only the others",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "scripts/soak.py", *(sys.argv[1:] if argv is None else argv)])
    warnings.filterwarnings("ignore", message="draft device failed")  # counted, not printed
    if args.command == "replay":
        return run_replay(args, command)
    machine, t0 = machine_info(), time.monotonic()
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result = (run_sequential if args.command == "sequential" else run_server)(args)
    machine["load_average_at_end"] = load_average()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    doc = {"schema": SCHEMA, "date": date, "wall_s": round(time.monotonic() - t0, 1),
           "command": command,
           "settings": settings, "machine": machine, "versions": versions(), **result}  # fmt: skip
    write_report(args.out, doc)
    c = doc["counts"]
    print(f"soak {args.command}: {'PASS' if doc['ok'] else 'FAIL'}; {json.dumps(c)}; "
          f"{args.out / 'soak.md'}", file=sys.stderr)  # fmt: skip
    return 0 if doc["ok"] else 1
