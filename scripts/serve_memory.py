"""Memory and speed of several targets behind one server (one shared draft) against one
server each.

Starts (a) `mirror-sd serve A B` (the plans' common draft shares one ONNX Runtime session),
(b) the same with `--no-shared-draft` (a draft session per plan: what sharing saves inside one
process) and (c) `mirror-sd serve A` and `mirror-sd serve B` side by side; waits until each listens,
sends one completion to every target (a warm-up), reads the memory of each server's whole
process tree: RSS (VmRSS: every resident page, shared file pages counted in each process) and
PSS (pages shared between processes split among them; what the machine pays), then times
PROMPTS greedy completions to each target, one target after the other (tokens/s per target:
what sharing the draft costs a target's speed), keeping the texts to check that every setup
answers alike. Prints markdown and writes `result.json` and `result.md` under `--out`.

    .venv/bin/python scripts/serve_memory.py /tmp/plans/qwen-1.5b /tmp/plans/qwen-0.5b \
        --out benchmarks/results/serve-shared-draft
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mirror_sd.devices.cpu_caps import host_caps  # noqa: E402

READY = re.compile(r"serving .* at (http://[^ ]+/v1)")
START_TIMEOUT_S = 1800.0  # loading (or compiling) real plans on a busy CPU is slow
SETTLE_S = 2.0  # after the requests, before reading memory


def start(
    plans: list[str], names: list[str], extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, str]:
    """A `mirror-sd serve` of `plans` on a free port, once it listens: (process, base URL)."""
    argv = [sys.executable, "-m", "mirror_sd.cli", "serve", *plans, "--port", "0", *extra]
    for name in names:
        argv += ["--served-model-name", name]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    deadline, seen = time.monotonic() + START_TIMEOUT_S, []
    assert proc.stderr is not None
    for line in proc.stderr:
        seen.append(line)
        if m := READY.search(line):
            return proc, m.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"serve_memory: {' '.join(argv)} did not start:\n{''.join(seen[-20:])}")


PROMPTS = (
    "def fibonacci(n):",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Explain what a hash map is in two sentences.",
    "def quicksort(items):",
)


def ask(url: str, name: str, max_tokens: int, prompt: str = PROMPTS[0]) -> tuple[int, str]:
    """One greedy completion; returns (completion tokens, text)."""
    c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    r = c.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return r.usage.completion_tokens, r.choices[0].text


def timed(url: str, name: str, max_tokens: int) -> dict:
    """PROMPTS completions to one target, one at a time: tokens/s over them and their texts."""
    t0, tokens, texts = time.perf_counter(), 0, []
    for prompt in PROMPTS:
        n, text = ask(url, name, max_tokens, prompt)
        tokens += n
        texts.append(text)
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2), "texts": texts}  # fmt: skip


def tree_memory(pid: int) -> dict[str, float]:
    """RSS and PSS (MiB) of a process and its descendants."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    rss = pss = 0
    for p in procs:
        info = p.memory_full_info()
        rss, pss = rss + info.rss, pss + info.pss
    return {"rss_mib": round(rss / 2**20, 1), "pss_mib": round(pss / 2**20, 1)}


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def one_server(plans, names, max_tokens, extra: tuple[str, ...] = ()) -> dict:
    proc, url = start(plans, names, extra)
    try:
        tokens = {name: ask(url, name, max_tokens)[0] for name in names}
        time.sleep(SETTLE_S)
        memory = tree_memory(proc.pid)
        speed = {name: timed(url, name, max_tokens) for name in names}
        return {"processes": 1, "tokens": tokens, **memory, "speed": speed}
    finally:
        stop(proc)


def separate_servers(plans, names, max_tokens) -> dict:
    running = []
    try:
        for plan, name in zip(plans, names, strict=True):
            running.append((name, *start([plan], [name])))
        tokens = {name: ask(url, name, max_tokens)[0] for name, _, url in running}
        time.sleep(SETTLE_S)
        each = {name: tree_memory(proc.pid) for name, proc, _ in running}
        total = {k: round(sum(m[k] for m in each.values()), 1) for k in ("rss_mib", "pss_mib")}
        speed = {name: timed(url, name, max_tokens) for name, _, url in running}
        return {"processes": len(running), "tokens": tokens, "each": each, **total,
                "speed": speed}  # fmt: skip
    finally:
        for _, proc, _ in running:
            stop(proc)


SETUPS = {  # result key -> what the markdown row calls it
    "one_server_shared_draft": "one server, {n} targets, one shared draft",
    "one_server_draft_per_plan": "one server, {n} targets, a draft each (--no-shared-draft)",
    "one_server_per_target": "one server per target",
}


def markdown(result: dict) -> str:
    names = result["names"]
    speed_cols = " | ".join(f"{n} tok/s" for n in names)
    rows = [f"| setup | processes | RSS (MiB) | PSS (MiB) | {speed_cols} |",
            "| --- | --- | --- | --- |" + " --- |" * len(names)]  # fmt: skip
    for key, label in SETUPS.items():
        r = result[key]
        speeds = " | ".join(str(r["speed"][n]["tokens_per_s"]) for n in names)
        rows.append(f"| {label.format(n=len(names))} | {r['processes']} | {r['rss_mib']} | "
                    f"{r['pss_mib']} | {speeds} |")  # fmt: skip
    same = all(len({tuple(result[k]["speed"][n]["texts"]) for k in SETUPS}) == 1 for n in names)
    rows.append(f"\nEvery setup gave each target the same completions: {'yes' if same else 'NO'}")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plans", nargs="+", help="plan folders (or models) with one draft")
    parser.add_argument("--names", nargs="+", default=None, help="model ids (default: folders)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default=None, help="folder for result.json and result.md")
    args = parser.parse_args()
    names = args.names or [Path(p).name for p in args.plans]
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "load_average": list(psutil.getloadavg()),
        "plans": args.plans,
        "names": names,
        "machine": {
            "cpu": host_caps().model,
            "flags": sorted(f for f in host_caps().flags if f.startswith(("avx", "amx"))),
            "cores": psutil.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        },
        "one_server_shared_draft": one_server(args.plans, names, args.max_tokens),
        "one_server_draft_per_plan": one_server(
            args.plans, names, args.max_tokens, ("--no-shared-draft",)
        ),
        "one_server_per_target": separate_servers(args.plans, names, args.max_tokens),
    }
    table = markdown(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "result.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
