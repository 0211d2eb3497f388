"""Benchmark peers: OpenVINO GenAI (`ov-ar`, `ov-sd`, `ov-sd+conf`, `ov-pld`, each also
`@f32` / `@bf16` / `@f16`) and llama.cpp (`llama-ar`, `llama-sd`, `llama-pld`,
bench/llamacpp.py); greedy, batch 1, CPU.

    ov-ar   LLMPipeline(target IR): autoregressive greedy decoding
    ov-sd   LLMPipeline(target IR, draft_model=draft_model(draft IR, "CPU")): speculative
            decoding with `num_assistant_tokens` = the plan's γ (SpecConfig.num_draft_tokens)
    ov-sd+conf  the same pipeline drafting while the draft's top-1 probability is at least
            `assistant_confidence_threshold` = PEER_CONFIDENCE (OpenVINO's own dynamic draft
            length, the counterpart of our `+conf` methods)
    ov-pld  LLMPipeline(target IR, prompt_lookup=True): prompt lookup decoding with
            `num_assistant_tokens` = PLD_ASSISTANT_TOKENS, `max_ngram_size` = PLD_MAX_NGRAM
    ov-X@P  the same method with the CPU plugin's numerics pinned to P (PIN_PROPERTIES):
            INFERENCE_PRECISION_HINT = P and a KV cache in P. Without `@` a method runs at
            OpenVINO's own defaults (bf16 arithmetic and a u8 KV cache on a CPU with AMX or
            AVX512-BF16), so one run shows the peer as a user gets it and at our precision.

`expand_methods` completes a run's list: ov-pld joins whenever any ov-* method is chosen (a
user has it; the fastest peer counts), and `--peer-precision defaults,plan` gives every
ov-* method a row at OpenVINO's defaults and one pinned to the plan's precision
(`plan_precision`).

Each method takes the same prompt token ids as ours (a `TokenizedInputs`, never text), the
runner's EOS policy (no EOS: `ignore_eos=True`, and no `min_new_tokens`, which would mask
the EOS logit and change the greedy choice where ours emits EOS as an ordinary token; with
EOS: `stop_token_ids` = the runner's ids), and reports the tokens each call really produced.
Every pipeline is warmed (one untimed generation) after each load, before its first timed
call (peer_common.PipelineSlot). The IRs come from bench/ov_convert.py; the runtime needs
only `openvino-genai` (`pip install -e '.[peers]'`).

Every default is in the constants block below.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

from mirror_sd.bench import llamacpp
from mirror_sd.bench.output import Output
from mirror_sd.bench.ov_convert import TARGET_FORMAT, convert, plan_formats
from mirror_sd.bench.peer_common import (
    PLD_ASSISTANT_TOKENS,
    PLD_MAX_NGRAM,
    PeersUnavailableError,
    PipelineSlot,
    dist_version,
    say,
)

# --- defaults (all of them) ---------------------------------------------------------------

OV_METHODS = ("ov-ar", "ov-sd", "ov-sd+conf", "ov-pld")
PEER_METHODS = OV_METHODS + llamacpp.LLAMA_METHODS  # without a precision pin
DRAFT_PEERS = ("ov-sd", "ov-sd+conf")  # the peers that load the draft model
ALWAYS_WITH_OV = "ov-pld"  # joins any run with an ov-* method
PEER_CONFIDENCE = 0.6  # ov-sd+conf: as our speculative+conf's draft_stop_threshold
OV_DEVICE = "CPU"
# CPU plugin properties of a pinned method `ov-X@P`: P arithmetic and a KV cache in P (the
# defaults are bf16 and u8, a compressed cache, on AMX / AVX512-BF16 CPUs), activations
# quantized per 32 values only where the weights are int8/int4 (as ORT's accuracy_level 4
# with block 32), latency mode. Unpinned methods get only INFERENCE_NUM_THREADS.
PINS = ("f32", "bf16", "f16")
PIN_PROPERTIES = {
    pin: {
        "INFERENCE_PRECISION_HINT": pin,
        "KV_CACHE_PRECISION": pin,
        "KEY_CACHE_PRECISION": pin,
        "VALUE_CACHE_PRECISION": pin,
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": 32,
        "PERFORMANCE_HINT": "LATENCY",
    }
    for pin in PINS
}
# `--peer-precision`: 'defaults' (OpenVINO's own), 'plan' (the plan's precision), or a pin
PEER_PRECISIONS = ("defaults", "plan", *PINS)
DEFAULT_PEER_PRECISION = ("defaults", "plan")
# the plan's target precision -> the pin: torch dtypes; int8/int4 weights run f32 arithmetic
DTYPE_PINS = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
# continuous-batching scheduler (every ov-* method runs on it, so they share one backend):
# no prefix caching (a repeated prompt, e.g. the warm-up's, must not skip its prefill), and
# a prompt up to this many tokens is prefilled in one pass as ours is
SCHEDULER = {"enable_prefix_caching": False, "max_num_batched_tokens": 8192}
RESIDENCY = ("auto", "all", "one")  # how many peer pipelines stay loaded (see `residency`)
# `auto` keeps every peer loaded only while their weights fit in this share of the memory
# available when they are built; beyond it the OS evicts mapped weight pages (ours included)
# and every method in the run slows down: peers then load for their turn only
RESIDENT_SHARE = 0.6
MISSING = (
    "OpenVINO GenAI peers ({names}) need the `openvino-genai` package: "
    "pip install -e '.[peers]' (or pip install openvino-genai next to torch==2.13.0)"
)


def split_pin(name: str) -> tuple[str, str | None]:
    """'ov-ar@f32' -> ('ov-ar', 'f32'); 'ov-ar' -> ('ov-ar', None)."""
    base, sep, pin = name.partition("@")
    return base, (pin if sep else None)


def is_peer(name: str) -> bool:
    """Whether `name` is a peer method: an ov-* method (optionally @ one of PINS) or llama-*."""
    base, pin = split_pin(name)
    if base in OV_METHODS:
        return pin is None or pin in PINS
    return base in llamacpp.LLAMA_METHODS and pin is None


def is_ov(name: str) -> bool:
    """Whether `name` is an OpenVINO GenAI peer (pinned or not)."""
    return is_peer(name) and split_pin(name)[0] in OV_METHODS


def import_genai():
    """`import openvino_genai`, or PeersUnavailableError naming the `peers` extra."""
    try:
        import openvino_genai
    except ImportError:
        raise PeersUnavailableError(MISSING.format(names=", ".join(OV_METHODS))) from None
    return openvino_genai


def check_available(names: Sequence[str]) -> None:
    """Fail early (before any model loads) when `names` holds an ov-* method and
    openvino-genai is missing, or a llama-* method and llama-cpp-python is missing.
    Raises PeersUnavailableError (a ValueError)."""
    chosen = [n for n in names if is_ov(n)]
    if chosen:
        try:
            import_genai()
        except PeersUnavailableError:
            raise PeersUnavailableError(MISSING.format(names=", ".join(chosen))) from None
    llamacpp.check_available([n for n in names if n in llamacpp.LLAMA_METHODS])


def parse_precisions(text: str | Sequence[str]) -> tuple[str, ...]:
    """'defaults,plan' -> ('defaults', 'plan'). Raises ValueError naming a bad value."""
    items = [p.strip() for p in (text.split(",") if isinstance(text, str) else text)]
    items = [p for p in items if p]
    bad = [p for p in items if p not in PEER_PRECISIONS]
    if bad or not items:
        raise ValueError(
            f"--peer-precision {','.join(items) or repr(text)}: choose from "
            f"{', '.join(PEER_PRECISIONS)}, comma-separated (e.g. defaults,plan: every ov-* "
            "method at OpenVINO's defaults and pinned to the plan's precision)"
        )
    return tuple(dict.fromkeys(items))


def plan_precision(plan) -> str:
    """The pin (one of PINS) that matches the plan's target precision: its device's `dtype`
    (a torch device: float32 -> f32, bfloat16 -> bf16, float16 -> f16); int8 / int4 weights
    (`quantize`, read as `ov_convert.plan_formats` reads it) and ONNX Runtime targets -> f32."""
    devices = (plan.report.device_map or {}).get("devices", {})
    spec = plan.target_device
    entry = devices.get(getattr(spec, "alias", None)) or {}
    dtype = entry.get("dtype", getattr(spec, "dtype", None))
    if dtype is None:
        return "f32"
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_PINS:
        raise ValueError(f"target dtype {dtype!r}: peers pin {', '.join(DTYPE_PINS)}")
    return DTYPE_PINS[name]


def expand_methods(names: Sequence[str], precisions: Sequence[str], plan_pin: str) -> tuple:
    """The run's methods with the peers completed, in order: ALWAYS_WITH_OV added after the
    last ov-* method when any is chosen, then every unpinned ov-* method replaced by one row
    per precision ('defaults': itself, 'plan': `@plan_pin`, a pin P: `@P`). Methods pinned
    by name (`ov-ar@bf16`) and every other method stay as given."""
    names = list(names)
    ov = [i for i, n in enumerate(names) if is_ov(n)]
    if ov and not any(split_pin(n)[0] == ALWAYS_WITH_OV for n in names):
        names.insert(ov[-1] + 1, ALWAYS_WITH_OV)
    out = []
    for n in names:
        if not is_ov(n) or split_pin(n)[1] is not None:
            out.append(n)
            continue
        for p in precisions:
            out.append(n if p == "defaults" else f"{n}@{plan_pin if p == 'plan' else p}")
    return tuple(dict.fromkeys(out))


def ov_properties(threads: int | None, pin: str | None = None) -> dict:
    """The CPU plugin properties of one method: PIN_PROPERTIES[pin] (None: OpenVINO's
    defaults) plus INFERENCE_NUM_THREADS (`threads`; None: all cores)."""
    pinned = PIN_PROPERTIES[pin] if pin is not None else {}
    return {**pinned, "INFERENCE_NUM_THREADS": int(threads or os.cpu_count() or 1)}


class OVMethod:
    """One openvino_genai.LLMPipeline on OV_DEVICE, greedy, batch 1.

    Args:
        name: an ov-* method, optionally pinned (`ov-sd@f32`; see `is_peer`).
        target_ir: the target's IR folder (see `ov_convert.convert`).
        eos: the runner's EOS ids; [] disables EOS (exactly max_new_tokens tokens).
        gamma: draft tokens per step for ov-sd (`num_assistant_tokens`).
        threads: INFERENCE_NUM_THREADS for the target (and the draft); None: all cores.
        draft_ir: the draft's IR folder (DRAFT_PEERS only).
        formats: (target, draft) weight formats, for describe().
        slot: the run's `PipelineSlot`, shared by its peers: with `resident=False` at most
            one pipeline of the run is loaded, freed when another is needed (loads are not
            timed; each load is warmed before its first timed call). ov-sd and ov-sd+conf at
            one precision share a pipeline (they differ only in their GenerationConfig).
            None: a resident slot of its own.

    `warmup`: the untimed generation after every load, (prompt ids, max_new_tokens); the
    runner sets its own warm-up's; None: the timed call's own prompt and length.
    """

    def __init__(
        self,
        name: str,
        target_ir: str | Path,
        eos: Sequence[int],
        gamma: int,
        threads: int | None = None,
        draft_ir: str | Path | None = None,
        formats: tuple[str, str | None] = (TARGET_FORMAT, None),
        slot: PipelineSlot | None = None,
    ):
        if not is_ov(name):
            raise ValueError(
                f"{name!r} is not an OpenVINO peer ({', '.join(OV_METHODS)}, each optionally "
                f"@{'|'.join(PINS)})"
            )
        self.base, self.pin = split_pin(name)
        if self.base in DRAFT_PEERS and draft_ir is None:
            raise ValueError(f"{name} needs a draft model: pass --draft")
        genai = import_genai()
        self.name, self.eos, self.gamma = name, list(eos), int(gamma)
        self.formats = formats
        self.properties = ov_properties(threads, self.pin)
        self.scheduler = genai.SchedulerConfig()
        for key, value in SCHEDULER.items():
            setattr(self.scheduler, key, value)
        self._genai = genai
        self.target_ir, self.draft_ir = target_ir, draft_ir
        self.slot = slot or PipelineSlot(resident=True)
        self.resident = self.slot.resident
        self.warmup: tuple[list[int], int] | None = None
        # one pipeline per kind and precision (the GenerationConfig makes the method)
        kind = "sd" if self.base in DRAFT_PEERS else self.base
        self.key = f"{kind}@{self.pin or 'defaults'}"
        if self.resident:
            self.slot.get(self.key, self.load)

    @property
    def pipe(self):
        """This method's pipeline if it is loaded now, else None."""
        return self.slot.loaded().get(self.key)

    def load(self):
        """A new openvino_genai.LLMPipeline for this method."""
        genai = self._genai
        kwargs: dict = {"scheduler_config": self.scheduler, **self.properties}
        if self.base in DRAFT_PEERS:
            kwargs["draft_model"] = genai.draft_model(
                str(self.draft_ir), OV_DEVICE, **self.properties
            )
        elif self.base == "ov-pld":
            kwargs["prompt_lookup"] = True
        return genai.LLMPipeline(str(self.target_ir), OV_DEVICE, **kwargs)

    def settings(self) -> dict:
        """The GenerationConfig fields this method sets beyond the EOS policy."""
        if self.base == "ov-sd":
            return {"num_assistant_tokens": self.gamma}
        if self.base == "ov-sd+conf":
            return {"assistant_confidence_threshold": PEER_CONFIDENCE}
        if self.base == "ov-pld":
            return {"num_assistant_tokens": PLD_ASSISTANT_TOKENS, "max_ngram_size": PLD_MAX_NGRAM}
        return {}

    def config(self, max_new_tokens: int):
        """A fresh greedy openvino_genai.GenerationConfig for one call."""
        cfg = self._genai.GenerationConfig()
        cfg.max_new_tokens = max_new_tokens
        cfg.do_sample = False
        cfg.num_return_sequences = 1
        cfg.apply_chat_template = False  # the ids already carry the chat template
        if self.eos:
            cfg.ignore_eos = False
            cfg.eos_token_id = self.eos[0]
            cfg.stop_token_ids = set(self.eos)
        else:  # EOS is an ordinary token: no min_new_tokens, which would mask EOS's logit
            cfg.ignore_eos = True
            cfg.stop_token_ids = set()
        for key, value in self.settings().items():
            setattr(cfg, key, value)
        return cfg

    def describe(self) -> dict:
        extra = "".join(f", {k}={v}" for k, v in self.settings().items())
        what = {"ov-ar": "LLMPipeline", "ov-sd": "LLMPipeline(draft_model=draft)",
                "ov-sd+conf": "LLMPipeline(draft_model=draft)",
                "ov-pld": "LLMPipeline(prompt_lookup=True)"}[self.base]  # fmt: skip
        weights = f"target {self.formats[0]}"
        if self.base in DRAFT_PEERS:
            weights += f", draft {self.formats[1]}"
        props = ", ".join(f"{k}={v}" for k, v in self.properties.items())
        numerics = f"pinned to {self.pin}" if self.pin else "OpenVINO's default numerics"
        sched = ", ".join(f"{k}={v}" for k, v in SCHEDULER.items())
        threads = self.properties["INFERENCE_NUM_THREADS"]
        shared = ", shared by ov-sd and ov-sd+conf" if self.key.startswith("sd@") else ""
        return {
            "runs": f"openvino_genai {dist_version('openvino-genai')} {what} on {OV_DEVICE}, "
            f"greedy{extra}; {weights} IR; {numerics}: properties {props}; scheduler {sched}",
            "threads": f"OpenVINO INFERENCE_NUM_THREADS {threads}"
            + (" (all cores)" if threads == os.cpu_count() else "")
            + ("; draft the same" if self.base in DRAFT_PEERS else ""),
            "residency": (
                "loaded for the whole run"
                if self.resident
                else "one peer pipeline in memory at a time, loaded when its turn "
                "comes (load not timed)"
            )
            + shared,  # fmt: skip
            "warmup": "one untimed generation after every load; " + self.slot.describe(self.key),
        }

    def _inputs(self, ids: list[int]):
        import numpy as np
        import openvino as ov

        x = np.asarray([ids], dtype=np.int64)
        return self._genai.TokenizedInputs(ov.Tensor(x), ov.Tensor(np.ones_like(x)))

    def _pipeline(self, ids: list[int], max_new_tokens: int):
        """The loaded pipeline, warmed (one untimed generation) if it was not since it loaded."""
        w_ids, w_n = self.warmup or (ids, max_new_tokens)

        def warm(pipe) -> None:
            pipe.generate(self._inputs(w_ids), self.config(w_n))

        return self.slot.get(self.key, self.load, warm)

    def warm_up(self, ids: list[int], max_new_tokens: int) -> None:
        """The runner's warm-up: load this method's pipeline if needed and warm it on `ids`."""
        self.warmup = self.warmup or (list(ids), max_new_tokens)
        self._pipeline(ids, max_new_tokens)

    def generate(self, ids: list[int], max_new_tokens: int, trace: str | None = None):
        """Greedy generation from the prompt token ids; Output.tokens: what really came out."""
        inputs = self._inputs(ids)
        cfg = self.config(max_new_tokens)
        pipe = self._pipeline(ids, max_new_tokens)  # load and warm-up happen before the clock
        t0 = time.perf_counter()
        res = pipe.generate(inputs, cfg)
        wall = time.perf_counter() - t0
        tokens = [int(t) for t in res.tokens[0]]
        if tokens[: len(ids)] == list(ids) and len(tokens) > max_new_tokens:
            tokens = tokens[len(ids) :]  # a result that echoes the prompt
        lengths = [1] * len(tokens) if self.base == "ov-ar" else None
        return Output(tokens, wall, accept_lengths=lengths)


def weights_gib(*folders: str | Path | None) -> float:
    """The IR weight files' size (GiB) of `folders`: about what their pipelines hold in RAM."""
    total = sum(f.stat().st_size for d in folders if d for f in Path(d).glob("*.bin"))
    return total / 2**30


def available_gib() -> float | None:
    """MemAvailable now (GiB; the page cache counts as available); None off Linux."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return None


def residency(mode: str, need_gib: float, available: float | None) -> bool:
    """Whether the peers stay loaded for the whole run (True) or load for their turn only.

    `mode`: 'all' (stay), 'one' (one at a time) or 'auto': stay while `need_gib` (every
    peer's weights) is at most RESIDENT_SHARE of `available` (unknown: stay)."""
    if mode not in RESIDENCY:
        raise ValueError(f"--peer-residency {mode!r}: choose from {', '.join(RESIDENCY)}")
    if mode != "auto":
        return mode == "all"
    return available is None or need_gib <= RESIDENT_SHARE * available


def build_peer_methods(
    names: Sequence[str],
    plan,
    eos: list[int],
    threads: int | None = None,
    target_format: str | None = None,
    draft_format: str | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
    resident: str = "auto",
) -> dict:
    """name -> method for the peer names in `names` (already expanded: `expand_methods`):
    OVMethod for ov-*, converting the plan's model folders; llamacpp.LlamaMethod for llama-*.

    `target_format` / `draft_format`: IR weight formats (ov_convert.WEIGHT_FORMATS); None
    follows the plan (`plan_formats`: its devices' `quantize`, else fp32 target / int8 draft).
    `resident`: RESIDENCY mode (see `residency`) of the OpenVINO pipelines.
    """
    out = llamacpp.build_llama_methods(names, plan, eos, threads, cache, progress)
    chosen = [n for n in names if is_ov(n)]
    if not chosen:
        return {n: out[n] for n in names if n in out}
    check_available(chosen)
    drafted = [n for n in chosen if split_pin(n)[0] in DRAFT_PEERS]
    if drafted and not plan.report.draft:
        raise ValueError(f"{', '.join(drafted)} need(s) a draft model: pass --draft")
    t_default, d_default = plan_formats(plan)
    t_fmt, d_fmt = target_format or t_default, draft_format or d_default
    target_ir = convert(plan.report.target, t_fmt, cache, progress)
    draft_ir = convert(plan.report.draft, d_fmt, cache, progress) if drafted else None
    gamma = plan.spec.num_draft_tokens
    keys = {}  # pipeline key -> its IR folders (ov-sd and ov-sd+conf share one per precision)
    for n in chosen:
        base, pin = split_pin(n)
        sd = base in DRAFT_PEERS
        keys[f"{'sd' if sd else base}@{pin or 'defaults'}"] = (target_ir, draft_ir if sd else None)
    need = sum(weights_gib(*irs) for irs in keys.values())
    slot = PipelineSlot(residency(resident, need, available_gib()))
    say(progress and not slot.resident,
        f"peers need ~{need:.1f} GiB together: one pipeline in memory at a time")  # fmt: skip
    for n in chosen:
        sd = split_pin(n)[0] in DRAFT_PEERS
        out[n] = OVMethod(n, target_ir, eos, gamma, threads, draft_ir if sd else None,
                          (t_fmt, d_fmt if sd else None), slot=slot)  # fmt: skip
    return {n: out[n] for n in names if n in out}
