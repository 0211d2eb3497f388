"""Where a decoding step's time goes: ONNX Runtime's own per-node profile of a plan's ORT
sessions over one timed generation, grouped by operator type and by graph.

    .venv/bin/python scripts/profile_step.py [--target qwen2.5-coder-1.5b]
        [--draft qwen2.5-coder-0.5b] [--mode autoregressive] [--new-tokens 64] [--out DIR]

Every ORT session the plan creates profiles itself (`SessionOptions.enable_profiling`); only
the events after the warm-up count. The report (stdout and OUT/profile_step.json) gives, for
the timed generation: wall time per token, the time inside ORT runs (per graph) and outside
them (Python, the round loop, sampling), and per operator type the kernel time and its share.
Ratios only; the machine (CPU model and flags) is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mirror_sd  # noqa: E402
from mirror_sd.devices import ort_core  # noqa: E402
from mirror_sd.devices.cpu_caps import host_caps  # noqa: E402

PROMPT = "Write a Python function that merges two sorted lists into one sorted list."


def patch_profiling(folder: Path) -> list[tuple[ort.InferenceSession, float, str]]:
    """Make every session the plan creates profile itself; return the list it fills with
    (session, perf_counter at creation, model path)."""
    made: list[tuple[ort.InferenceSession, float, str]] = []
    options = ort_core.OrtDevice.session_options

    def session_options(self, record_placement=True, threads=None):
        so = options(self, record_placement, threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(folder / "ort")
        return so

    ort_core.OrtDevice.session_options = session_options
    init = ort.InferenceSession.__init__

    def session_init(self, path_or_bytes, sess_options=None, *args, **kwargs):
        t = time.perf_counter()
        init(self, path_or_bytes, sess_options, *args, **kwargs)
        if sess_options is not None and sess_options.enable_profiling:
            made.append((self, t, str(path_or_bytes)))

    ort.InferenceSession.__init__ = session_init
    return made


def graph_name(path: str) -> str:
    """'…/onnx/qwen2-24-28-int4-<hash>/model.onnx' -> 'qwen2-24-28-int4'."""
    parent = Path(path).parent.name
    return parent.rsplit("-", 1)[0] if "-" in parent else parent


def phase_profile(files, t0: float, t1: float, res) -> dict:
    """The profile events of every session inside [t0, t1] (perf_counter), grouped."""
    by_op: dict[str, float] = defaultdict(float)
    by_graph: dict[str, float] = defaultdict(float)
    runs: dict[str, int] = defaultdict(int)
    for file, created, path in files:
        if not file or not Path(file).is_file():
            continue
        lo, hi = (t0 - created) * 1e6, (t1 - created) * 1e6  # this session's clock, µs
        for ev in json.loads(Path(file).read_text()):
            if not lo <= ev.get("ts", -1) <= hi:
                continue
            if ev.get("cat") == "Session" and ev["name"] == "model_run":
                by_graph[graph_name(path)] += ev["dur"] / 1e6
                runs[graph_name(path)] += 1
            elif ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
                by_op[ev["args"].get("op_name", "?")] += ev["dur"] / 1e6
    wall, in_ort, kernels = t1 - t0, sum(by_graph.values()), sum(by_op.values())
    return {
        "wall_s": wall, "new_tokens": len(res.tokens), "stats": res.stats.to_dict(),
        "in_ort_runs_s": in_ort, "outside_ort_s": wall - in_ort, "kernel_s": kernels,
        "graphs": {g: {"s": t, "runs": runs[g], "ms_per_run": 1e3 * t / max(1, runs[g])}
                   for g, t in sorted(by_graph.items(), key=lambda kv: -kv[1])},
        "ops": {o: {"s": t, "share_of_kernels": t / kernels if kernels else None}
                for o, t in sorted(by_op.items(), key=lambda kv: -kv[1])},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b")
    ap.add_argument("--device-map", default=None)
    ap.add_argument("--mode", default="autoregressive")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-file", type=Path, default=None,
                    help="the prompt's text (default: a short coding request)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path("profile_step"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="profile_step_"))
    made = patch_profiling(tmp)

    prompt = args.prompt_file.read_text() if args.prompt_file else PROMPT
    with mirror_sd.compile(args.target, args.draft, args.device_map) as plan:
        plan.generate(prompt, 8, mode=args.mode)  # warm-up
        windows = {}
        for phase, n in (("prefill", 1), ("generation", args.new_tokens)):
            t0 = time.perf_counter()
            res = plan.generate(prompt, n, mode=args.mode, eos_token_id=[])
            windows[phase] = (t0, time.perf_counter(), res)
        files = [(s.end_profiling(), created, path) for s, created, path in made]
    prompt_tokens = res.prompt_tokens
    doc = {
        "machine": {"cpu": host_caps().model, "cores": os.cpu_count(),
                    "flags": sorted(f for f in host_caps().flags
                                    if f.startswith(("avx", "amx", "fma")))},
        "versions": {"onnxruntime": ort.__version__, "mirror-sd": mirror_sd.__version__},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "prompt_tokens": prompt_tokens,
        "phases": {ph: phase_profile(files, t0, t1, r) for ph, (t0, t1, r) in windows.items()},
    }  # fmt: skip
    (args.out / "profile_step.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{doc['machine']['cpu']} {doc['machine']['flags']}; prompt {prompt_tokens} tokens")
    for ph, d in doc["phases"].items():
        print(f"{ph}: {d['new_tokens']} tokens in {d['wall_s']:.2f} s; inside ORT runs "
              f"{d['in_ort_runs_s']:.2f} s, outside {d['outside_ort_s']:.2f} s")  # fmt: skip
        for g, v in d["graphs"].items():
            print(f"  graph {g}: {v['runs']} runs, {v['ms_per_run']:.1f} ms each")
        for o, v in list(d["ops"].items())[:10]:
            print(f"  op {o}: {v['s']:.3f} s ({v['share_of_kernels']:.0%} of kernels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
