"""A bounded load run (≤ 60 s, loopback) against `mirror-sd serve`; prints a markdown row
for docs/benchmarks.md and the JSON report.

    mirror-sd serve plans/qwen --port 8000 &
    .venv/bin/python scripts/serve_load.py --model qwen --clients 4 --requests 32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mirror_sd.serve.loadgen import MARKDOWN_HEADER, MAX_DURATION_S, run_load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="the served model id (GET /v1/models)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--duration", type=float, default=MAX_DURATION_S, help="seconds, at most 60")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--system-file", default=None,
                   help="a system prompt every request sends first (a shared prefix)")  # fmt: skip
    args = p.parse_args()
    system = Path(args.system_file).read_text() if args.system_file else None
    report = run_load(args.base_url, args.model, args.clients, args.requests, args.duration,
                      args.max_tokens, system=system)  # fmt: skip
    print(MARKDOWN_HEADER)
    print(report.markdown_row())
    print(json.dumps(report.to_dict(), indent=1))


if __name__ == "__main__":
    main()
