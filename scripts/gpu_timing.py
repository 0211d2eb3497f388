"""Time the CUDA path on synthetic Qwen2-shaped models (random weights, no hub, no network).

    python scripts/gpu_timing.py OUTDIR [--device cuda|cpu] [--shapes qwen2|tiny]
                                        [--draft ort-cpu|torch]

For each target shape (Qwen2-1.5B, then Qwen2-7B) this builds a random-weight model folder
from a `Qwen2Config`, compiles it with a random 0.5B-shaped int8 draft in ONNX Runtime on
the CPU cores (or, `--draft torch`, in torch beside the target on the GPU; `mirror_sd.compile`:
ℓe and the branch budget profiled and chosen), and
measures `ar`, `speculative` and `mirror` tokens/s with `plan.generate(ids, n, mode=...)`.
Next to each it reports the plan's profile (t_T(n), t_d(b), the overlap slowdown f) and the
cost model's predicted tokens/s, at the measured acceptance and at assumed ones: random
weights make acceptance near zero, so the measured speculative and mirror rates are not
representative; the per-round component times and the predictions are.

OUTDIR/gpu_timing.json and OUTDIR/gpu_timing.md are rewritten after every step, so a run
stopped by a time limit leaves what it measured. `--device cpu --shapes tiny` runs the
same code in seconds (tests/test_gpu_check.py). `scripts/gpu_check.sh` runs this after the
`cuda` tests; docs/gpu_check.md explains the output.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

import mirror_sd  # noqa: E402
from mirror_sd.graphs.loader import load_model  # noqa: E402
from mirror_sd.partition import choose  # noqa: E402
from mirror_sd.runtime.autoregressive import extend  # noqa: E402

# The one home of the shapes: Qwen2-0.5B / 1.5B / 7B (config.json of the released models),
# and a tiny set for CPU tests. Each entry: (name, Qwen2Config overrides).
SHAPES = {
    "qwen2": {
        "vocab_size": 151936,
        "draft": ("qwen2-0.5b", dict(hidden_size=896, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                  tie_word_embeddings=True)),
        "targets": [
            ("qwen2-1.5b", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
             num_key_value_heads=2, intermediate_size=8960, tie_word_embeddings=True)),
            ("qwen2-7b", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
             num_key_value_heads=4, intermediate_size=18944, tie_word_embeddings=False)),
        ],
    },
    "tiny": {
        "vocab_size": 97,
        "draft": ("tiny-draft", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=64)),
        "targets": [
            ("tiny-4l", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=128)),
            ("tiny-6l", dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=256)),
        ],
    },
}  # fmt: skip
DEFAULT_DTYPE = {"cuda": "bfloat16", "cpu": "float32"}  # the target's; the draft is int8
MODES = {"ar": "autoregressive", "speculative": "speculative", "mirror": "mirror"}
NEW_TOKENS = 48  # per mode, after an 8-token warm-up
PROMPT_TOKENS = 64
MAX_LEN = 512
ASSUMED_ALPHAS = (0.6, 0.8)  # what a trained draft of the same family typically reaches
NOTE = (
    "Random weights: the draft's acceptance (α) and mirror's hit rate are near zero, so the "
    "measured speculative / mirror tokens/s are NOT representative. The per-round times "
    "(t_T, t_d, f) are; the cost model's predictions at α = 0.6 / 0.8 read them as a trained "
    "draft would. 'predicted' at the measured α should match the measured tokens/s."
)


def make_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` entries (prompts here are token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def build_folder(folder: Path, vocab: int, shape: dict, dtype: str, device: str, seed: int):
    """A complete local HF folder with random weights (built on `device`, saved as `dtype`)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=vocab, max_position_embeddings=4096, **shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    del model
    make_tokenizer(vocab).save_pretrained(folder)
    _free()
    return folder


DRAFTS = {  # --draft: where the draft runs
    "ort-cpu": "int8, ONNX Runtime CPUExecutionProvider on the host cores",
    "torch": "torch on the target's device and dtype",
}


def device_map(device: str, dtype: str, draft: str = "ort-cpu") -> dict:
    """Target in torch on `device`; the draft int8 in ONNX Runtime on every CPU core, or
    (`draft="torch"`) in torch beside the target, same device and dtype."""
    torch_dev = {"backend": "torch", "device": "cuda:0" if device == "cuda" else "cpu",
                 "dtype": dtype}  # fmt: skip
    ort = {"backend": "onnxruntime", "providers": [{"CPUExecutionProvider": {}}],
           "inter_op_threads": 1, "quantize": "int8"}  # fmt: skip
    return {
        "version": 1,
        "devices": {"tgt": torch_dev, "drf": dict(torch_dev) if draft == "torch" else ort},
        "placement": {"target": "tgt", "draft": "drf"},
        "speculation": {"mode": "auto", "num_draft_tokens": 4, "exit_layer": "auto",
                        "exit_top_k": 4},
    }  # fmt: skip


def prediction(c) -> dict:
    """The cost model's numbers for one `Choice` (times in ms, rates in tokens/s)."""
    return {
        "alpha": round(c.accept_rate, 3),
        "exit_layer": c.exit_layer,
        "branch_budget": c.branch_budget,
        "hit_rate": round(c.hit_rate, 3),
        "tokens_per_round": round(c.expected_tokens, 3),
        "round_ms": {"ar": c.t_round_autoregressive * 1e3, "speculative":
                     c.t_round_vanilla * 1e3, "mirror": c.t_round_mirror * 1e3},
        "tokens_per_s": {"ar": 1 / c.t_round_autoregressive,
                         "speculative": c.expected_tokens / c.t_round_vanilla,
                         "mirror": c.expected_tokens / c.t_round_mirror},
        "best_mode": c.best_mode,
    }  # fmt: skip


def predictions(plan) -> dict:
    """At the measured α (the plan's own choice) and at ASSUMED_ALPHAS with the assumed
    exit-head agreement (the random model's logit lens says nothing about a real one)."""
    prof, spec = plan.report.profile, plan.spec.with_(exit_layer="auto", branch_budget="auto")
    out = {"measured": prediction(plan.report.choice)}
    for a in ASSUMED_ALPHAS:
        assumed = replace(prof, accept_rate=a, hit_rate_by_exit_layer={})
        out[f"alpha={a}"] = prediction(choose(assumed, spec, prefer_hidden=False))
    return out


def components(plan) -> dict:
    """The per-round component times the plan was chosen from (ms) and f."""
    prof, g, b = plan.report.profile, plan.spec.num_draft_tokens, plan.spec.branch_budget
    return {
        "exit_layer": plan.spec.exit_layer, "gamma": g, "branch_budget": b,
        "mode_auto": plan.spec.mode,
        "t_T_1_ms": prof.target(1) * 1e3, "t_T_block_ms": prof.target(g + 1) * 1e3,
        "t_exit_head_ms": prof.t_exit_head * 1e3, "t_d_1_ms": prof.draft(1) * 1e3,
        "t_d_B_ms": prof.draft(min(b, max(prof.t_draft))) * 1e3,
        "overlap_slowdown_f": prof.overlap_slowdown, "alpha_measured": prof.accept_rate,
    }  # fmt: skip


def tie_gap(folder: Path, dtype: str, device: str, prompt: list[int], ref: list[int],
            got: list[int], i: int) -> dict:  # fmt: skip
    """At the first difference i: the target's own logit gap between `ref`'s token and
    `got`'s, and that gap over the largest |logit| (a rounding tie is ~2^-8 in bf16)."""
    model = load_model(folder, dtype).to("cuda:0" if device == "cuda" else "cpu")
    logits = extend(model, model.new_cache(len(prompt) + i + 1), prompt + ref[:i])[-1].float()
    gap = float(logits[ref[i]] - logits[got[i]])
    del model
    return {"logit_gap": gap, "relative_gap": abs(gap) / float(logits.abs().max())}


def measure(plan, prompt: list[int], new_tokens: int, report: Report, entry: dict,
            folder: Path, dtype: str, device: str) -> None:  # fmt: skip
    for mode in MODES.values():  # warm-up: first-call allocations, kernels, ORT arenas
        plan.generate(prompt, 8, mode=mode, eos_token_id=[])
    ref = None
    for label, mode in MODES.items():
        res = plan.generate(prompt, new_tokens, mode=mode, eos_token_id=[])
        s = res.stats
        ref = ref if ref is not None else res.tokens
        diff = next(
            (i for i, (a, b) in enumerate(zip(ref, res.tokens, strict=False)) if a != b), None
        )
        entry["measured"][label] = {
            "tokens_per_s": s.tokens_per_s, "new_tokens": s.new_tokens, "wall_s": s.wall_s,
            "rounds": s.rounds, "tokens_per_round": s.mean_accepted, "hit_rate": s.hit_rate,
            "draft_s": s.draft_s, "exposed_draft_s": s.exposed_draft_s,
            "exposed_draft_share": s.exposed_draft_s / s.wall_s if s.wall_s else 0.0,
            "identical_to_ar": res.tokens == ref, "first_difference": diff,
        }  # fmt: skip
        if diff is not None and diff < min(len(ref), len(res.tokens)):
            gap = tie_gap(folder, dtype, device, prompt, ref, res.tokens, diff)
            entry["measured"][label]["tie"] = gap
        report.log(f"  {s.summary()}")
        report.write()


def same(m: dict) -> str:
    """The '= ar' cell: yes, or where it first differs and the target's relative logit gap."""
    if m["identical_to_ar"]:
        return "yes"
    tie = m.get("tie")
    gap = f", gap {tie['relative_gap']:.1e} of max abs logit" if tie else ""
    return f"no (at {m['first_difference']}{gap})"


class Report:
    """The JSON document and its markdown table, rewritten in OUTDIR after every step."""

    def __init__(self, out: Path, args: argparse.Namespace, tests: dict | None):
        self.out, self.t0 = out, time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        self.doc = {
            "complete": False, "note": NOTE, "env": environment(args.device),
            "settings": {"device": args.device, "shapes": args.shapes, "dtype": args.dtype,
                         "new_tokens": args.new_tokens, "prompt_tokens": PROMPT_TOKENS,
                         "max_len": MAX_LEN, "draft": DRAFTS[args.draft]},
            "tests": tests, "targets": [], "errors": [],
        }  # fmt: skip
        self.write()

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}", flush=True)

    def write(self) -> None:
        self.doc["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        (self.out / "gpu_timing.json").write_text(json.dumps(self.doc, indent=1) + "\n")
        (self.out / "gpu_timing.md").write_text(markdown(self.doc))


def markdown(doc: dict) -> str:
    env, tests = doc["env"], doc.get("tests")
    lines = [
        f"# GPU check: {env['device_name']} ({doc['settings']['shapes']} shapes, "
        f"{doc['settings']['dtype']} target; draft: {doc['settings']['draft']}; "
        f"{env['cpu_count']} host cores)",
        "",
        f"torch {env['torch']}, onnxruntime {env['onnxruntime']}, Python {env['python']}; "
        f"{'complete' if doc['complete'] else 'INCOMPLETE (stopped or still running)'} after "
        f"{doc.get('elapsed_s', 0)} s.",
    ]
    if tests:
        lines.append(f"`cuda` tests: exit code {tests.get('exit_code')}: {tests.get('summary')}")
    lines += ["", doc["note"], ""]
    lines += [
        "| target | mode | tok/s | predicted tok/s (α measured / 0.6 / 0.8) | tokens/round "
        "| hit rate | exposed draft share | = ar |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for t in doc["targets"]:
        pred = t.get("predicted", {})
        for label, m in t["measured"].items():
            p = " / ".join(f"{v['tokens_per_s'][label]:.1f}" for v in pred.values()) or "-"
            hit = "-" if m["hit_rate"] is None else f"{m['hit_rate']:.2f}"
            lines.append(
                f"| {t['name']} | {label} | {m['tokens_per_s']:.1f} | {p} | "
                f"{m['tokens_per_round']:.2f} | {hit} | {m['exposed_draft_share']:.2f} | "
                f"{same(m)} |"
            )
    lines += [
        "",
        "| target | ℓe | γ | B | t_T(1) ms | t_T(γ+1) ms | exit head ms | t_d(1) ms | t_d(B) ms "
        "| f | α measured | mode auto |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for t in doc["targets"]:
        c = t.get("components")
        if c:
            alpha = "-" if c["alpha_measured"] is None else f"{c['alpha_measured']:.2f}"
            lines.append(
                f"| {t['name']} | {c['exit_layer']} | {c['gamma']} | {c['branch_budget']} | "
                f"{c['t_T_1_ms']:.1f} | {c['t_T_block_ms']:.1f} | {c['t_exit_head_ms']:.2f} | "
                f"{c['t_d_1_ms']:.1f} | {c['t_d_B_ms']:.1f} | {c['overlap_slowdown_f']:.2f} | "
                f"{alpha} | {c['mode_auto']} |"
            )
    for e in doc["errors"]:
        lines.append(f"\nERROR in {e['step']}: {e['error']}")
    return "\n".join(lines) + "\n"


def environment(device: str) -> dict:
    import onnxruntime as ort

    cuda = device == "cuda" and torch.cuda.is_available()
    return {
        "python": platform.python_version(), "torch": torch.__version__,
        "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
        "cpu_count": os.cpu_count(),
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "cuda": torch.version.cuda if cuda else None,
    }  # fmt: skip


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(args: argparse.Namespace, report: Report, work: Path) -> None:
    shapes = SHAPES[args.shapes]
    vocab, (d_name, d_shape) = shapes["vocab_size"], shapes["draft"]
    report.log(f"building draft {d_name}")
    draft = build_folder(work / d_name, vocab, d_shape, args.dtype, args.device, seed=1)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, vocab, (PROMPT_TOKENS,), generator=gen).tolist()
    for i, (name, shape) in enumerate(shapes["targets"]):
        entry = {"name": name, "shape": shape, "measured": {}}
        report.doc["targets"].append(entry)
        try:
            t0 = time.perf_counter()
            report.log(f"building target {name}")
            folder = build_folder(work / name, vocab, shape, args.dtype, args.device, seed=2 + i)
            entry["build_s"] = time.perf_counter() - t0
            report.log(f"compiling {name}" + ("" if i else " (also exports the int8 draft)"))
            t0 = time.perf_counter()
            dm = device_map(args.device, args.dtype, args.draft)
            with mirror_sd.compile(folder, draft, dm, onnx_dir=work / "onnx", max_len=MAX_LEN,
                                   cache=work / "cache") as plan:  # fmt: skip
                entry["compile_s"] = time.perf_counter() - t0
                entry["components"] = components(plan)
                entry["predicted"] = predictions(plan)
                entry["profile"] = plan.report.profile.to_dict()
                report.log(f"  {entry['components']}")
                report.write()
                measure(
                    plan, prompt, args.new_tokens, report, entry, folder, args.dtype, args.device
                )
        except Exception as exc:  # record it and go on with the next target
            report.doc["errors"].append({"step": name, "error": repr(exc),
                                         "traceback": traceback.format_exc()})  # fmt: skip
            report.log(f"ERROR in {name}: {exc!r}")
        finally:
            shutil.rmtree(work / name, ignore_errors=True)
            _free()
            report.write()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder for gpu_timing.json and gpu_timing.md")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="qwen2")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="the target's dtype (default: bfloat16 on cuda, float32 on cpu)")  # fmt: skip
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--draft", choices=sorted(DRAFTS), default="ort-cpu",
                    help="where the draft runs: " + "; ".join(f"{k}: {v}" for k, v in DRAFTS.items()))  # fmt: skip
    ap.add_argument("--tests-json", type=Path, default=None,
                    help="a JSON file with the cuda tests' outcome, copied into the report")  # fmt: skip
    args = ap.parse_args(argv)
    args.dtype = args.dtype or DEFAULT_DTYPE[args.device]
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_timing: torch sees no CUDA GPU here; use --device cpu", file=sys.stderr)
        return 2
    tests = json.loads(args.tests_json.read_text()) if args.tests_json else None
    report = Report(args.out, args, tests)
    # `timeout` sends SIGTERM: unwind, so the report is written and the model folders removed
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_timing_") as tmp:
            run(args, report, Path(tmp))
    finally:
        signal.signal(signal.SIGTERM, previous)
    report.doc["complete"] = True
    report.write()
    report.log(f"wrote {args.out / 'gpu_timing.json'} and gpu_timing.md")
    print((args.out / "gpu_timing.md").read_text())
    return 1 if report.doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
