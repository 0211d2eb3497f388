"""The soak's command line: `sequential` and `server` sub-commands (the plan flags as
`mirror-sd generate` takes them), and `main`, which runs one, writes the report and returns
the exit code (0 only when nothing was lost or changed and every fault that fired was seen).
scripts/soak.py calls `main`."""

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
    for p in (seq, srv):
        p.add_argument("--target", default=DEFAULT_MODEL, help="known model name or HF folder")
        cli._add_plan_args(p, "")
        p.set_defaults(draft=DEFAULT_MODEL, mode="mirror")
        p.add_argument("--out", required=True, type=Path, help="folder for soak.json / .md / .png")
        p.add_argument("--questions", default=None, help="Spec-Bench question.jsonl (default: "
                       "$MIRROR_SD_SPEC_BENCH, else ../shared/data/spec_bench)")  # fmt: skip
        p.add_argument("--per-category", type=int, default=2, help="prompts per Spec-Bench task")
        p.add_argument("--lengths", default="16,32,64,128", help="max_new_tokens to mix")
        p.add_argument("--draft-timeout", type=float,
                       help="the plan's draft_timeout_s: a hung draft step is given up after it "
                       "(sequential: 5 s; server: 30 s, SpecConfig's, as a served plan has it)")  # fmt: skip
        p.add_argument(
            "--keep-batch-policy",
            action="store_true",
            help="keep the plan's per-batch-size modes (default: its mode at every size)",
        )
        p.add_argument("--seed", type=int, default=0)
    seq.set_defaults(draft_timeout=5.0)
    srv.set_defaults(draft_timeout=30.0)
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
    srv.add_argument("--prefix-cache", action="store_true",
                     help="serve with the prefix cache, as `mirror-sd serve` does (its reuse may "
                     "part from the reference at a near-tie: docs/runtime.md, Prefix caching)")  # fmt: skip
    srv.add_argument("--stream-rate", type=float, default=0.5, help="share of streamed requests")
    srv.add_argument(
        "--cancel-rate", type=float, default=0.2, help="share of streams the client closes part way"
    )
    srv.add_argument("--malformed-rate", type=float, default=0.1, help="share of bad requests")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message="draft device failed")  # counted, not printed
    machine, t0 = machine_info(), time.monotonic()
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result = (run_sequential if args.command == "sequential" else run_server)(args)
    machine["load_average_at_end"] = load_average()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    doc = {"schema": SCHEMA, "date": date, "wall_s": round(time.monotonic() - t0, 1),
           "command": shlex.join(["python", "scripts/soak.py", *(sys.argv[1:] if argv is None
                                                                  else argv)]),
           "settings": settings, "machine": machine, "versions": versions(), **result}  # fmt: skip
    write_report(args.out, doc)
    c = doc["counts"]
    print(f"soak {args.command}: {'PASS' if doc['ok'] else 'FAIL'}; {json.dumps(c)}; "
          f"{args.out / 'soak.md'}", file=sys.stderr)  # fmt: skip
    return 0 if doc["ok"] else 1
