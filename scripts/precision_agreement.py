"""How often the target at a weight format picks the same next token as its fp32 checkpoint:
top-1 agreement, teacher-forced, over the answers a Spec-Bench run stored (its `ar` token
ids by default; results.json, or records.jsonl of a run still going), every format fed the same tokens, the prompt read and not counted.

    .venv/bin/python scripts/precision_agreement.py --run benchmarks/results/RUN \\
        [--target qwen2.5-coder-1.5b] [--formats int7-rows,int8-rows,int4] [--method ar] \\
        [--out FILE.json]

The reference is the Hugging Face folder in torch at float32 (for a zoo model the GGUF
de-quantized, docs/models.md); each format is the target's ONNX Runtime export at that
`quantize`, exactly as a plan runs it. Prints a table (positions counted, agreement overall
and per task) and writes the numbers, the machine and each question's agreement as JSON.
Lossless means identical to the plan's own target; this measures how far that target is from
the checkpoint. docs/models.md records the result.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from mirror_sd import api
from mirror_sd.bench.runner import machine_info
from mirror_sd.bench.specbench import default_path
from mirror_sd.runtime.profiling import teacher_forced
from mirror_sd.runtime.prompts import encode_prompt


def device_map(backend: str, quantize: str | None) -> dict:
    """A one-device, target-only map: torch fp32 (the reference) or ONNX Runtime at `quantize`."""
    dev = {"backend": backend, "dtype": "float32"} if backend == "torch" else {
        "backend": "onnxruntime", "providers": [{"CPUExecutionProvider": {}}],
        "inter_op_threads": 1, "quantize": quantize}  # fmt: skip
    return {"version": 1, "devices": {"tgt": dev}, "placement": {"target": "tgt"},
            "speculation": {"mode": "autoregressive"}}  # fmt: skip


def answers(run: Path, method: str) -> list[dict]:
    """The run's records of `method` (question id, task, token ids), one per question."""
    if (run / "results.json").is_file():
        records = json.loads((run / "results.json").read_text())["records"]
    else:  # a run still going: its journal
        lines = (run / "records.jsonl").read_text().splitlines()
        records = [rec for line in lines for rec in json.loads(line)]
    out = {}
    for rec in records:
        if rec["method"] == method:
            out.setdefault(rec["question_id"], rec)
    if not out:
        raise SystemExit(f"precision_agreement: {run} has no `{method}` record")
    return list(out.values())


def texts(question_file: Path) -> dict[int, str]:
    """Spec-Bench question id -> its first turn (what the benchmark prompts with)."""
    rows = (json.loads(line) for line in question_file.read_text().splitlines() if line.strip())
    return {q["question_id"]: q["turns"][0] for q in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path, help="a bench results folder")
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--formats", default="int7-rows,int8-rows,int4")
    ap.add_argument("--method", default="ar", help="whose stored answers to read (default ar)")
    ap.add_argument("--questions", type=Path, default=None, help="Spec-Bench question.jsonl")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    records = answers(args.run, args.method)
    text = texts(args.questions or default_path())
    sequences = []  # (task, question id, ids, first counted position)
    with api.compile(args.target, None, device_map("torch", None), max_len=4096) as ref:
        for rec in records:
            prompt = encode_prompt(ref.tokenizer, text[rec["question_id"]], chat=True)
            ids = [*prompt, *rec["tokens"][:-1]]  # the last token predicts nothing checked
            sequences.append((rec["task"], rec["question_id"], ids, len(prompt) - 1))
        result = {"machine": machine_info(), "run": str(args.run), "method": args.method,
                  "target": args.target, "formats": {}}  # fmt: skip
        for fmt in args.formats.split(","):
            with api.compile(args.target, None, device_map("onnxruntime", fmt),
                             max_len=4096) as plan:  # fmt: skip
                per_q, by_task = {}, defaultdict(lambda: [0.0, 0])
                for task, qid, ids, first in sequences:
                    agree, _ = teacher_forced(ref.target, plan.target, ids, first=first)
                    n = len(ids) - first
                    per_q[qid] = round(agree, 4)
                    by_task[task][0] += agree * n
                    by_task[task][1] += n
            hits, total = sum(h for h, _ in by_task.values()), sum(n for _, n in by_task.values())
            result["formats"][fmt] = {
                "agreement": hits / total, "positions": total, "per_question": per_q,
                "per_task": {t: h / n for t, (h, n) in sorted(by_task.items())},
            }  # fmt: skip
            print(f"{fmt}: {hits / total:.2%} of {total} positions", flush=True)
    tasks = sorted({t for t, *_ in sequences})
    print("\n| format | positions | agreement | " + " | ".join(tasks) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in tasks) + " |")
    for fmt, r in result["formats"].items():
        cells = " | ".join(f"{r['per_task'][t]:.1%}" for t in tasks)
        print(f"| {fmt} | {r['positions']} | {r['agreement']:.1%} | {cells} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
