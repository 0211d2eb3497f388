"""The methods a benchmark compares, all greedy, batch 1, on the same target and draft.

    hf-ar        transformers `generate(do_sample=False)`                     all cores
    hf-assisted  transformers `generate(assistant_model=draft)`               all cores
    hf-pld       transformers `generate(prompt_lookup_num_tokens=10)`         all cores
    ar           our plan, mode="autoregressive": the target alone on its own device
    speculative  our plan, mode="speculative": draft then verify, no overlap
    mirror       our plan, mode="mirror"
    (+ pld, sam, hd, mirror+sam: model-free draft sources; speculative+conf, mirror+conf,
     speculative+entropy, mirror+entropy: draft-length policies; speculative+streams,
     mirror+streams: the draft's stream rows, on a plan compiled with them; speculative+tree:
     the draft's 2 next-best tokens per depth verified as sibling leaves;
     speculative+tree-auto: the tree compile sized from the profile, partition/tree_shape.py;
     speculative+amphista (+tree), mirror+amphista: the Amphista heads' blocks, on a plan
     compiled with them; speculative+s2d, mirror+s2d: S2D's sorted exits on a torch draft,
     on a plan compiled with them)
    speculative+conf+sam  SAM-Decoding's hybrid: a suffix-automaton match long enough is the
                 block, else the draft model drafts until its confidence drops (at most
                 HYBRID_MAX_DRAFT tokens: with a confidence stop γ is only a ceiling)
    ov-ar, ov-sd, ov-sd+conf, ov-pld  OpenVINO GenAI peers on all cores (bench/peers.py; the
                 `peers` extra), at OpenVINO's defaults or pinned: ov-ar@f32, ov-sd@bf16, ...
    llama-ar, llama-sd, llama-pld  llama.cpp peers on all cores (bench/llamacpp.py; the
                 `llamacpp` extra)

Every method has `warm_up(ids, n)` (the runner's untimed generation before the first timed
one) and `generate(ids, n)`; peers also warm again after every reload (peer_common).

Every method gets the same prompt token ids and the same EOS ids (an empty list: EOS
never stops a generation, so every method produces exactly `max_new_tokens`). The HF
models get a clean `GenerationConfig` (no repetition penalty, no sampling defaults
from a model's generation_config.json) so that "greedy" means the same everywhere.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from mirror_sd.bench import peers
from mirror_sd.bench.output import Output
from mirror_sd.bench.peers import PEER_METHODS, PINS
from mirror_sd.runtime.drafters.sources import sources

HF_METHODS = ("hf-ar", "hf-assisted", "hf-pld")
PLAN_MODES = {"ar": "autoregressive", "speculative": "speculative", "mirror": "mirror"}
# model-free draft sources (SpecConfig.retrieval): alone on the target device, or with mirror
# (one method per registered source: runtime/drafters/sources.py)
RETRIEVAL_METHODS = {
    **{n: {"mode": "speculative", "retrieval": n, "model_draft": False} for n in sources()},
    "mirror+sam": {"mode": "mirror", "retrieval": "sam"},
}
# draft-length policies (SpecConfig.draft_stop): Kangaroo's confidence exit at its paper's
# threshold 0.6, and an entropy stop at 1.0 nat (a draft distribution spread over ~3 tokens)
POLICY_METHODS = {
    f"{mode}+{tag}": {"mode": mode, "draft_stop": stop, "draft_stop_threshold": threshold}
    for mode in ("speculative", "mirror")
    for tag, stop, threshold in (("conf", "confidence", 0.6), ("entropy", "entropy", 1.0))
}
HYBRID_MAX_DRAFT = 8  # speculative+conf+sam's γ ceiling (ov-sd+conf's confidence stop has none)
HYBRID_METHODS = {
    "speculative+conf+sam": {"mode": "speculative", "retrieval": "sam",
                             "draft_stop": "confidence", "draft_stop_threshold": 0.6,
                             "num_draft_tokens": HYBRID_MAX_DRAFT},
}  # fmt: skip
# speculative streaming (SpecConfig.draft_streams): the plan must be compiled with stream
# rows (`--set draft_streams=trained --set mode=speculative`); every other plan method runs
# without them
STREAM_METHODS = {f"{mode}+streams": {"mode": mode} for mode in ("speculative", "mirror")}
# token trees: the draft's next-best tokens at each depth as sibling leaves (greedy)
TREE_SIBLINGS = 2
TREE_METHODS = {"speculative+tree": {"mode": "speculative", "tree_siblings": TREE_SIBLINGS}}
# the tree compile() sized from its profile (Plan.auto_tree): a plan compiled with something
# `auto` (the default map's mode) has one
SIZED_TREE_METHODS = {"speculative+tree-auto": {"mode": "speculative", "tree_siblings": "auto"}}
# Amphista heads (SpecConfig.amphista) on the target's hidden state: the plan must be compiled
# with them (`--set amphista=trained`); alone (no draft model) or as mirror's block source
HEAD_METHODS = {
    "speculative+amphista": {"mode": "speculative", "model_draft": False},
    "speculative+amphista+tree": {"mode": "speculative", "model_draft": False,
                                  "tree_siblings": TREE_SIBLINGS},
    "mirror+amphista": {"mode": "mirror"},
}  # fmt: skip
# S2D's sorted exits on a torch draft (SpecConfig.draft_exits): the plan must be compiled with
# them (`--set draft_exits=lens|trained` and a torch draft device)
S2D_METHODS = {f"{mode}+s2d": {"mode": mode} for mode in ("speculative", "mirror")}
# what a plan must be compiled with for a method to run: setting -> (its methods, the hint)
COMPILED_FEATURES = {
    "draft_streams": (STREAM_METHODS, "--set draft_streams=trained (after `mirror-sd train "
                      "streams`) and a fixed mode (--set mode=speculative): with mode auto the "
                      "cost model may turn them off"),
    "amphista": (HEAD_METHODS, "--set amphista=trained (after `mirror-sd train amphista`)"),
    "draft_exits": (S2D_METHODS, "--set draft_exits=lens (or trained) with the draft on a "
                    "torch device (examples/device_maps/ort_torch_s2d.yaml)"),
}  # fmt: skip
PLAN_METHODS = {
    **{k: {"mode": v} for k, v in PLAN_MODES.items()},
    **STREAM_METHODS,
    **HEAD_METHODS,
    **S2D_METHODS,
    **TREE_METHODS,
    **SIZED_TREE_METHODS,
    **RETRIEVAL_METHODS,
    **POLICY_METHODS,
    **HYBRID_METHODS,
}
ALL_METHODS = HF_METHODS + tuple(PLAN_MODES)  # the default set
# everything the base install runs on any plan (the stream and head methods need a plan
# compiled with stream rows / heads)
NEEDS_COMPILED = (
    *(m for methods, _ in COMPILED_FEATURES.values() for m in methods),
    *SIZED_TREE_METHODS,
)
KNOWN_METHODS = HF_METHODS + tuple(m for m in PLAN_METHODS if m not in NEEDS_COMPILED)
SELECTABLE_METHODS = KNOWN_METHODS + NEEDS_COMPILED + PEER_METHODS  # + peers' extras
PLD_TOKENS = 10  # prompt_lookup_num_tokens, as Spec-Bench's PLD baseline
NEAR_TIE = 1e-3  # a top-2 logit margin below this explains a mismatch by rounding


def parse_methods(text: str | Sequence[str]) -> tuple[str, ...]:
    """'hf-ar,mirror' -> ('hf-ar', 'mirror'). Raises ValueError naming unknown methods.

    Any of SELECTABLE_METHODS parses, and an ov-* method pinned to a precision (`ov-ar@f32`);
    whether a peer can run is checked separately (`peers.check_available`), so that its error
    names the missing extra."""
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text)]
    names = [m for m in names if m]
    bad = [m for m in names if m not in SELECTABLE_METHODS and not peers.is_peer(m)]
    if bad or not names:
        raise ValueError(
            f"unknown method(s) {bad}; choose from {','.join(SELECTABLE_METHODS)} (an ov-* "
            f"method may be pinned: ov-ar@{'|'.join(PINS)})"
        )
    return tuple(dict.fromkeys(names))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-call deprecation chatter during timed calls."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load_hf_model(folder: str | Path, pad_token_id: int, dtype: str = "float32"):
    """`AutoModelForCausalLM.from_pretrained(folder, dtype=...)` with a clean greedy config."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    model.generation_config = GenerationConfig(eos_token_id=None, pad_token_id=pad_token_id)
    return model


class HFMethod:
    """A transformers `generate()` call on all cores (`threads` intra-op threads)."""

    def __init__(
        self, name: str, model, threads: int, eos: list[int], assistant=None, dtype: str = "float32"
    ):
        if name not in HF_METHODS:
            raise ValueError(f"{name!r} is not an HF method ({', '.join(HF_METHODS)})")
        self.name, self.model, self.threads, self.assistant = name, model, threads, assistant
        self.eos, self.dtype = list(eos), dtype

    def _kwargs(self) -> dict:
        if self.name == "hf-assisted":
            return {"assistant_model": self.assistant}
        if self.name == "hf-pld":
            return {"prompt_lookup_num_tokens": PLD_TOKENS}
        return {}

    def describe(self) -> dict:
        extra = {
            "hf-assisted": ", assistant_model=draft (transformers' default schedule)",
            "hf-pld": f", prompt_lookup_num_tokens={PLD_TOKENS}",
        }.get(self.name, "")
        return {
            "runs": f"transformers generate(do_sample=False{extra}), {self.dtype}",
            "threads": f"torch intra-op threads {self.threads}"
            + (" (all cores)" if self.threads == os.cpu_count() else ""),
        }

    def warm_up(self, ids: list[int], max_new_tokens: int) -> None:
        """One untimed generation (the runner's warm-up)."""
        self.generate(ids, max_new_tokens)

    @torch.inference_mode()
    def generate(self, ids: list[int], max_new_tokens: int, trace: str | None = None) -> Output:
        torch.set_num_threads(self.threads)  # per OS thread: the plan's workers keep theirs
        x = torch.tensor([ids])
        kw = {"eos_token_id": self.eos or None, **self._kwargs()}
        with _quiet_transformers():
            t0 = time.perf_counter()
            out = self.model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                do_sample=False, **kw,
            )  # fmt: skip
            wall = time.perf_counter() - t0
        tokens = out[0, len(ids) :].tolist()
        lengths = [1] * len(tokens) if self.name == "hf-ar" else None  # one token per step
        return Output(tokens, wall, accept_lengths=lengths)


class PlanMethod:
    """`plan.generate(ids, n, mode=...)` on one compiled plan (its device map splits the cores)."""

    def __init__(self, name: str, plan, eos: list[int]):
        if name not in PLAN_METHODS:
            raise ValueError(f"{name!r} is not a plan method ({', '.join(PLAN_METHODS)})")
        self.name, self.plan, self.eos = name, plan, list(eos)
        self.settings = dict(PLAN_METHODS[name])
        self.mode = self.settings["mode"]
        for key, (methods, hint) in COMPILED_FEATURES.items():
            compiled = getattr(getattr(plan, "spec", None), key, "none")
            if name in methods and compiled == "none":
                raise ValueError(f"method {name!r} needs a plan compiled with {key}: add {hint}")
            if name not in methods and compiled != "none":
                self.settings[key] = "none"  # the other methods run without it
        if name in SIZED_TREE_METHODS and getattr(plan, "auto_tree", None) is None:
            raise ValueError(
                f"method {name!r} needs a plan whose compile measured a profile: --set "
                "tree_siblings=auto (or the default map's mode auto)"
            )

    def describe(self) -> dict:
        budget = self.plan.thread_budget() if hasattr(self.plan, "thread_budget") else None
        t_threads = f", {budget.target()} thread(s) alone" if budget and budget.target() else ""
        target = f"target: {self.plan.target_device.label}{t_threads}"
        runs = "plan " + ", ".join(f"{k}={v}" for k, v in self.settings.items())
        if (
            self.mode == "autoregressive"
            or self.plan.draft_device is None
            or not self.settings.get("model_draft", True)
        ):
            return {"runs": runs, "threads": f"{target}; draft idle"}
        draft = f"draft: {self.plan.draft_device.label}{_ort_threads(self.plan)}"
        return {"runs": runs, "threads": f"{target}; {draft}"}

    def warm_up(self, ids: list[int], max_new_tokens: int) -> None:
        """One untimed generation (the runner's warm-up)."""
        self.generate(ids, max_new_tokens)

    def generate(self, ids: list[int], max_new_tokens: int, trace: str | None = None) -> Output:
        t0 = time.perf_counter()
        res = self.plan.generate(ids, max_new_tokens, eos_token_id=self.eos, trace=trace,
                                 **self.settings)  # fmt: skip
        wall = time.perf_counter() - t0
        rounds = res.rounds
        return Output(
            res.tokens,
            wall,
            accept_lengths=[r.committed for r in rounds],
            drafted=[r.drafted for r in rounds],
            round_hits=[r.hit for r in rounds],
            round_branches=[r.branches for r in rounds],
            round_hit_ranks=[r.hit_rank for r in rounds],
            rollout_steps=[r.rollout_steps for r in rounds],
            draft_s=res.stats.draft_s,
            exposed_draft_s=res.stats.exposed_draft_s,
            hit_rate=res.stats.hit_rate,
            draft_exits=res.stats.draft_exits,
            trace_path=res.trace_path,
        )


def _ort_threads(plan) -> str:
    budget = plan.thread_budget() if hasattr(plan, "thread_budget") else None
    if budget is None:
        return ""
    return f", {budget.draft()} thread(s) alone, {budget.draft(overlapped=True)} overlapped"


def build_methods(
    names: Sequence[str],
    plan,
    eos: list[int],
    hf_threads: int,
    hf_dtype: str = "float32",
    peer_target_format: str | None = None,
    peer_draft_format: str | None = None,
    cache: str | None = None,
    peer_residency: str = "auto",
) -> dict:
    """name -> method object, in the order of `names` (peers already expanded:
    `peers.expand_methods`). HF models are loaded from the plan's own model folders; ov-* peers
    convert them to OpenVINO IR (`peers.build_peer_methods`, weight formats `peer_*_format`,
    None: follow the plan; `peer_residency`: whether they stay loaded), llama-* peers run the
    zoo's GGUFs of them; all of them on `hf_threads` cores."""
    peers.check_available(names)
    peer = peers.build_peer_methods(names, plan, eos, hf_threads, peer_target_format,
                                  peer_draft_format, cache, resident=peer_residency)  # fmt: skip
    tok = plan.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    hf = [n for n in names if n in HF_METHODS]
    target = load_hf_model(plan.report.target, pad, hf_dtype) if hf else None
    assistant = None
    if "hf-assisted" in names:
        if not plan.report.draft:
            raise ValueError("hf-assisted needs a draft model: pass --draft")
        assistant = load_hf_model(plan.report.draft, pad, hf_dtype)
    out = {}
    for name in names:
        if name in HF_METHODS:
            out[name] = HFMethod(name, target, hf_threads, eos, assistant, hf_dtype)
        elif name in peer:
            out[name] = peer[name]
        else:
            if PLAN_METHODS.get(name, {}).get("model_draft", name != "ar") and plan.draft is None:
                raise ValueError(f"method {name!r} needs a draft model: pass --draft")
            out[name] = PlanMethod(name, plan, eos)
    return out


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where `a` and `b` differ (a length difference counts), else None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def target_margin(plan, prompt: list[int], prefix: list[int]) -> dict:
    """The plan's own target at the position after `prompt + prefix`: its top-2 tokens and the
    logit margin between them (< NEAR_TIE: a near-tie that rounding can flip)."""
    runner = plan.target
    threads = getattr(getattr(runner, "device", None), "threads", None)
    if threads:
        torch.set_num_threads(threads)
    from mirror_sd.graphs.masks import causal_mask

    seq = list(prompt) + list(prefix)
    runner.rollback(0)
    try:
        logits = runner.forward(
            torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0), causal_mask(0, len(seq))
        )[-1]  # (V,)
    finally:
        runner.rollback(0)
    top = torch.topk(logits.float(), 2)
    margin = float(top.values[0] - top.values[1])
    return {
        "target_top2": [[int(i), float(v)] for i, v in zip(top.indices, top.values, strict=True)],
        "margin": margin,
        "near_tie": margin < NEAR_TIE,
    }
