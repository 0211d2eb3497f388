"""OpenVINO GenAI as benchmark peers: `ov-ar`, `ov-sd`, `ov-sd+conf`, `ov-pld` (greedy,
batch 1, CPU).

    ov-ar   LLMPipeline(target IR): autoregressive greedy decoding
    ov-sd   LLMPipeline(target IR, draft_model=draft_model(draft IR, "CPU")): speculative
            decoding with `num_assistant_tokens` = the plan's γ (SpecConfig.num_draft_tokens)
    ov-sd+conf  the same pipeline drafting while the draft's top-1 probability is at least
            `assistant_confidence_threshold` = PEER_CONFIDENCE (OpenVINO's own dynamic draft
            length, the counterpart of our `+conf` methods)
    ov-pld  LLMPipeline(target IR, prompt_lookup=True): prompt lookup decoding with
            `num_assistant_tokens` = PLD_ASSISTANT_TOKENS, `max_ngram_size` = PLD_MAX_NGRAM

Each method takes the same prompt token ids as ours (a `TokenizedInputs`, never text), the
runner's EOS policy (no EOS: `ignore_eos=True`, and no `min_new_tokens`, which would mask
the EOS logit and change the greedy choice where ours emits EOS as an ordinary token; with
EOS: `stop_token_ids` = the runner's ids), and reports the tokens each call really produced.

The models are converted offline from the plan's own Hugging Face folders into OpenVINO IR
by optimum-intel's `optimum-cli export openvino`, run from a converter virtualenv that this
module creates on demand under `<cache>/peers/converter` (optimum-intel pins an older
transformers than mirror-sd's and would otherwise replace it in the project venv; the
converter venv's torch is pinned to the project's torch version with a pip constraint).
IRs are cached under `<cache>/peers/ir/<name>-<format>-<key>/`, keyed by the source
folder's identity (`export.source_identity`) and the weight format, so a second run reuses
them. The runtime side needs only `openvino-genai` (`pip install -e '.[peers]'`).

Every default is in the constants block below.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

# --- defaults (all of them) ---------------------------------------------------------------

PEER_METHODS = ("ov-ar", "ov-sd", "ov-sd+conf", "ov-pld")
DRAFT_PEERS = ("ov-sd", "ov-sd+conf")  # the peers that load the draft model
PEER_CONFIDENCE = 0.6  # ov-sd+conf: as our speculative+conf's draft_stop_threshold
OV_DEVICE = "CPU"
WEIGHT_FORMATS = ("fp32", "int8", "int4")
TARGET_FORMAT = "fp32"  # the target IR's weights unless the plan's target is quantized
DRAFT_FORMAT = "int8"  # the draft IR's weights unless the plan's draft device says otherwise
# ours: MatMulNBits symmetric, one scale per 32 weights (graphs/export.quantize_weights);
# NNCF's int8 is per output channel (no groups), int4 takes the same group size
FORMAT_OPTIONS = {
    "fp32": (),
    "int8": ("--sym",),
    "int4": ("--sym", "--group-size", "32", "--ratio", "1.0"),
}
PLD_ASSISTANT_TOKENS = 10  # as hf-pld's prompt_lookup_num_tokens (Spec-Bench's PLD baseline)
PLD_MAX_NGRAM = 3  # openvino.genai's prompt-lookup sample value
# CPU plugin properties for the closest match to our fp32 (or int8-weight) target: f32
# arithmetic (the plugin's default on a BF16-capable CPU is bf16), an f32 KV cache (the
# default is u8: compressed keys and values), activations quantized per 32 values only where
# the weights are int8/int4 (as ORT's accuracy_level 4 with block 32), latency mode.
OV_PROPERTIES = {
    "INFERENCE_PRECISION_HINT": "f32",
    "KV_CACHE_PRECISION": "f32",
    "KEY_CACHE_PRECISION": "f32",
    "VALUE_CACHE_PRECISION": "f32",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE": 32,
    "PERFORMANCE_HINT": "LATENCY",
}
# continuous-batching scheduler (all three methods run on it, so they share one backend):
# no prefix caching (a repeated prompt, e.g. the warm-up's, must not skip its prefill), and
# a prompt up to this many tokens is prefilled in one pass as ours is
SCHEDULER = {"enable_prefix_caching": False, "max_num_batched_tokens": 8192}
IR_FORMAT_VERSION = 1  # bump when the conversion command changes
CONVERTER_DIR = "peers/converter"
IR_DIR = "peers/ir"
IR_MARKER = "mirror_sd_peer_ir.json"
CONVERTER_MARKER = "mirror_sd_converter.json"
CONVERTER_PACKAGES = ("optimum-intel[openvino]",)  # + torch / openvino / tokenizers pins
# removed after the install: optimum-intel requires torchvision, whose PyPI wheel is built
# for the CUDA torch and fails to load next to the CPU torch ("operator torchvision::nms
# does not exist"), which breaks `import transformers`; text models never use it
CONVERTER_REMOVE = ("torchvision",)
IR_FILES = ("openvino_model.xml", "openvino_tokenizer.xml", "openvino_detokenizer.xml")
RESIDENCY = ("auto", "all", "one")  # how many peer pipelines stay loaded (see `residency`)
# `auto` keeps every peer loaded only while their weights fit in this share of the memory
# available when they are built; beyond it the OS evicts mapped weight pages (ours included)
# and every method in the run slows down: peers then load for their turn only
RESIDENT_SHARE = 0.6
MISSING = (
    "OpenVINO GenAI peers ({names}) need the `openvino-genai` package: "
    "pip install -e '.[peers]' (or pip install openvino-genai next to torch==2.13.0)"
)


class PeersUnavailableError(ValueError):
    """An ov-* method was chosen but openvino-genai (or the converter) cannot be used."""


def is_peer(name: str) -> bool:
    """Whether `name` is one of the OpenVINO GenAI peer methods."""
    return name in PEER_METHODS


def import_genai():
    """`import openvino_genai`, or PeersUnavailableError naming the `peers` extra."""
    try:
        import openvino_genai
    except ImportError:
        raise PeersUnavailableError(MISSING.format(names=", ".join(PEER_METHODS))) from None
    return openvino_genai


def check_available(names: Sequence[str]) -> None:
    """Fail early (before any model loads) when `names` holds an ov-* method and
    openvino-genai is missing. Raises PeersUnavailableError (a ValueError)."""
    chosen = [n for n in names if is_peer(n)]
    if chosen:
        try:
            import_genai()
        except PeersUnavailableError:
            raise PeersUnavailableError(MISSING.format(names=", ".join(chosen))) from None


def quantize_to_format(quantize: str | None, default: str) -> str:
    """A device map's `quantize` value ('none' | 'int8' | 'int4' | None) -> an IR weight format."""
    if quantize in (None, ""):
        return default
    fmt = "fp32" if quantize == "none" else quantize
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"quantize {quantize!r}: peers convert to {', '.join(WEIGHT_FORMATS)}")
    return fmt


def plan_formats(plan) -> tuple[str, str]:
    """(target format, draft format) that match the plan's own weights: a device's `quantize`
    in the plan's device map, else TARGET_FORMAT / DRAFT_FORMAT."""
    devices = (plan.report.device_map or {}).get("devices", {})

    def of(device, default: str) -> str:
        alias = getattr(device, "alias", None)
        return quantize_to_format((devices.get(alias) or {}).get("quantize"), default)

    return of(plan.target_device, TARGET_FORMAT), of(plan.draft_device, DRAFT_FORMAT)


# --- conversion ----------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _public(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0' (a pin that the same wheel, and pip's default one, satisfy)."""
    return version.split("+", 1)[0]


def converter_pins() -> dict[str, str]:
    """Package -> version that the converter venv pins: the project's torch (never upgraded by
    optimum-intel) and the runtime's openvino / openvino-tokenizers (so the tokenizer IR the
    converter writes loads in this process)."""
    pins = {}
    for dist in ("torch", "openvino", "openvino-tokenizers"):
        v = _version(dist)
        if v:
            pins[dist] = _public(v)
    if "openvino-tokenizers" not in pins and "openvino" in pins:
        pins["openvino-tokenizers"] = pins["openvino"] + ".0"
    return pins


def ir_key(source_folder: str | Path, weight_format: str) -> str:
    """The IR cache key: a digest of the source folder's identity (path, size and mtime of its
    config / safetensors files), the weight format with its options, and the conversion
    version (IR_FORMAT_VERSION, openvino's version)."""
    from mirror_sd.graphs.export import source_identity

    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {weight_format!r}: choose from {WEIGHT_FORMATS}")
    parts = {
        "source": source_identity(source_folder),
        "format": weight_format,
        "options": list(FORMAT_OPTIONS[weight_format]),
        "version": IR_FORMAT_VERSION,
        "openvino": converter_pins().get("openvino"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def ir_dir(source_folder: str | Path, weight_format: str, cache: str | Path | None = None) -> Path:
    """`<cache>/peers/ir/<folder name>-<format>-<key>`: where the IR of one model and format is."""
    from mirror_sd.graphs.zoo import cache_dir

    name = Path(source_folder).resolve().name
    key = ir_key(source_folder, weight_format)
    return cache_dir(cache) / IR_DIR / f"{name}-{weight_format}-{key}"


def is_converted(folder: Path) -> bool:
    """A complete IR folder: the marker (written last) and every file the pipeline opens."""
    return (folder / IR_MARKER).is_file() and all((folder / f).is_file() for f in IR_FILES)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[mirror-sd peers] {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise PeersUnavailableError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def converter_bin(cache: str | Path | None = None) -> Path:
    """The converter venv's bin folder (`<cache>/peers/converter/bin`), not created."""
    from mirror_sd.graphs.zoo import cache_dir

    return cache_dir(cache) / CONVERTER_DIR / "bin"


def ensure_converter(cache: str | Path | None = None, progress: bool = True) -> Path:
    """Create (once) the converter venv with optimum-intel and return its `optimum-cli`.

    `python -m venv <cache>/peers/converter`, then one `pip install -c constraints.txt
    optimum-intel[openvino] torch==T openvino==O openvino-tokenizers==K` where T, O, K are
    `converter_pins()`: torch stays at the project's version (without the pin optimum-intel's
    dependencies move it to a newer CUDA build), then `pip uninstall torchvision`
    (CONVERTER_REMOVE). A marker with the pins, written last, makes the next call return at
    once; changed pins rebuild the venv.
    Raises PeersUnavailableError when the venv or the install fails (e.g. no package index).
    """
    venv = converter_bin(cache).parent
    pins = converter_pins()
    marker = venv / CONVERTER_MARKER
    cli = venv / "bin" / "optimum-cli"
    from mirror_sd.graphs.zoo import locked

    with locked(venv.parent / "converter.lock"):
        if marker.is_file() and cli.is_file():
            with contextlib.suppress(ValueError):
                done = json.loads(marker.read_text())
                if done.get("pins") == pins and done.get("removed") == list(CONVERTER_REMOVE):
                    return cli
        _say(progress, f"creating the converter venv {venv} (optimum-intel; once, a few minutes)")
        shutil.rmtree(venv, ignore_errors=True)
        base = getattr(sys, "_base_executable", None) or sys.executable
        _run([base, "-m", "venv", str(venv)], "python -m venv")
        constraints = venv / "constraints.txt"
        constraints.write_text("".join(f"{k}=={v}\n" for k, v in pins.items()))
        reqs = [*CONVERTER_PACKAGES, *(f"{k}=={v}" for k, v in pins.items())]
        t0 = time.perf_counter()
        _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
              "--disable-pip-version-check", "-c", str(constraints), *reqs],
             "pip install of the converter (optimum-intel)")  # fmt: skip
        _run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "--yes", "--quiet",
              *CONVERTER_REMOVE], "pip uninstall in the converter")  # fmt: skip
        if not cli.is_file():
            raise PeersUnavailableError(f"the converter venv {venv} has no optimum-cli")
        info = {"pins": pins, "packages": list(CONVERTER_PACKAGES),
                "removed": list(CONVERTER_REMOVE),
                "install_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
        marker.write_text(json.dumps(info, indent=1) + "\n")
        _say(progress, f"converter ready in {info['install_s']} s")
    return cli


def convert(
    source_folder: str | Path,
    weight_format: str,
    cache: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """The OpenVINO IR folder of one Hugging Face folder in one weight format, converted once.

    Runs `optimum-cli export openvino --model SRC --task text-generation-with-past
    --weight-format FMT [FORMAT_OPTIONS] OUT` from the converter venv (see
    `ensure_converter`) into a temporary folder beside the cache entry, checks that the model
    and the tokenizer / detokenizer IRs are there, writes the marker and renames the folder
    into place. A complete cached folder is returned without running anything.
    """
    src = Path(source_folder).resolve()
    out = ir_dir(src, weight_format, cache)
    if is_converted(out):
        return out
    from mirror_sd.graphs.zoo import locked

    with locked(out.parent / f"{out.name}.lock"):
        if is_converted(out):
            return out
        cli = ensure_converter(cache, progress)
        _say(progress, f"converting {src.name} to OpenVINO IR ({weight_format}) -> {out}")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            dst = Path(tmp) / "ir"
            _run([str(cli), "export", "openvino", "--model", str(src),
                  "--task", "text-generation-with-past", "--library", "transformers",
                  "--weight-format", weight_format, *FORMAT_OPTIONS[weight_format], str(dst)],
                 f"optimum-cli export openvino ({src.name}, {weight_format})")  # fmt: skip
            missing = [f for f in IR_FILES if not (dst / f).is_file()]
            if missing:
                raise PeersUnavailableError(
                    f"optimum-cli wrote no {', '.join(missing)} in {dst} (openvino-tokenizers "
                    f"missing from the converter venv?)"
                )
            info = {"source": str(src), "weight_format": weight_format,
                    "options": list(FORMAT_OPTIONS[weight_format]), "pins": converter_pins(),
                    "convert_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
            (dst / IR_MARKER).write_text(json.dumps(info, indent=1) + "\n")
            shutil.rmtree(out, ignore_errors=True)
            dst.rename(out)
        _say(progress, f"converted in {info['convert_s']} s")
    return out


# --- the methods ---------------------------------------------------------------------------


def ov_properties(threads: int | None) -> dict:
    """OV_PROPERTIES plus INFERENCE_NUM_THREADS (`threads`; None: all cores)."""
    return {**OV_PROPERTIES, "INFERENCE_NUM_THREADS": int(threads or os.cpu_count() or 1)}


class PipelineSlot:
    """The OpenVINO pipelines of one run's peers, by kind ('ov-ar', 'sd', 'ov-pld'), built
    on first use. `resident`: keep every one; else keep at most one, freeing it before
    another kind loads."""

    def __init__(self, resident: bool = True):
        self.resident = resident
        self._pipes: dict[str, object] = {}

    def get(self, kind: str, build):
        """The pipeline of `kind`, built with `build()` when it is not loaded."""
        if kind not in self._pipes:
            if not self.resident and self._pipes:
                self._pipes.clear()
                gc.collect()  # the C++ pipeline goes with its last reference
            self._pipes[kind] = build()
        return self._pipes[kind]

    def loaded(self) -> dict[str, object]:
        """The pipelines in memory now, by kind."""
        return dict(self._pipes)


class OVMethod:
    """One openvino_genai.LLMPipeline on OV_DEVICE, greedy, batch 1.

    Args:
        name: one of PEER_METHODS.
        target_ir: the target's IR folder (see `convert`).
        eos: the runner's EOS ids; [] disables EOS (exactly max_new_tokens tokens).
        gamma: draft tokens per step for ov-sd (`num_assistant_tokens`).
        threads: INFERENCE_NUM_THREADS for the target (and the draft); None: all cores.
        draft_ir: the draft's IR folder (DRAFT_PEERS only).
        formats: (target, draft) weight formats, for describe().
        resident: keep the pipeline loaded for the run; False: keep at most one pipeline
            of the run loaded (`slot`), freed when another is needed (loads are not timed),
            so that peers that do not fit in memory together never run side by side.
        slot: the run's `PipelineSlot`, shared by its peers (ov-sd and ov-sd+conf share a
            pipeline: they differ only in their GenerationConfig); None: a slot of its own.
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
        resident: bool = True,
        slot: PipelineSlot | None = None,
    ):
        if name not in PEER_METHODS:
            raise ValueError(f"{name!r} is not an OpenVINO peer ({', '.join(PEER_METHODS)})")
        if name in DRAFT_PEERS and draft_ir is None:
            raise ValueError(f"{name} needs a draft model: pass --draft")
        genai = import_genai()
        self.name, self.eos, self.gamma = name, list(eos), int(gamma)
        self.formats = formats
        self.properties = ov_properties(threads)
        self.scheduler = genai.SchedulerConfig()
        for key, value in SCHEDULER.items():
            setattr(self.scheduler, key, value)
        self._genai = genai
        self.target_ir, self.draft_ir = target_ir, draft_ir
        self.slot = slot or PipelineSlot(resident)
        self.resident = self.slot.resident
        # one pipeline per kind: what it loads (the GenerationConfig makes the method)
        self.kind = "sd" if name in DRAFT_PEERS else name
        if self.resident:
            self.slot.get(self.kind, self.load)

    @property
    def pipe(self):
        """This method's pipeline if it is loaded now, else None."""
        return self.slot.loaded().get(self.kind)

    def load(self):
        """A new openvino_genai.LLMPipeline for this method."""
        genai = self._genai
        kwargs: dict = {"scheduler_config": self.scheduler, **self.properties}
        if self.name in DRAFT_PEERS:
            kwargs["draft_model"] = genai.draft_model(
                str(self.draft_ir), OV_DEVICE, **self.properties
            )
        elif self.name == "ov-pld":
            kwargs["prompt_lookup"] = True
        return genai.LLMPipeline(str(self.target_ir), OV_DEVICE, **kwargs)

    def settings(self) -> dict:
        """The GenerationConfig fields this method sets beyond the EOS policy."""
        if self.name == "ov-sd":
            return {"num_assistant_tokens": self.gamma}
        if self.name == "ov-sd+conf":
            return {"assistant_confidence_threshold": PEER_CONFIDENCE}
        if self.name == "ov-pld":
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
                "ov-pld": "LLMPipeline(prompt_lookup=True)"}[self.name]  # fmt: skip
        weights = f"target {self.formats[0]}"
        if self.name in DRAFT_PEERS:
            weights += f", draft {self.formats[1]}"
        props = ", ".join(f"{k}={v}" for k, v in self.properties.items())
        sched = ", ".join(f"{k}={v}" for k, v in SCHEDULER.items())
        threads = self.properties["INFERENCE_NUM_THREADS"]
        return {
            "runs": f"openvino_genai {_version('openvino-genai')} {what} on {OV_DEVICE}, "
            f"greedy{extra}; {weights} IR; properties {props}; scheduler {sched}",
            "threads": f"OpenVINO INFERENCE_NUM_THREADS {threads}"
            + (" (all cores)" if threads == os.cpu_count() else "")
            + ("; draft the same" if self.name in DRAFT_PEERS else ""),
            "residency": "loaded for the whole run"
            if self.resident
            else "one peer pipeline in memory at a time, loaded when its turn comes (load "
            "not timed)" + (", shared by ov-sd and ov-sd+conf" if self.kind == "sd" else ""),
        }

    def generate(self, ids: list[int], max_new_tokens: int, trace: str | None = None):
        """Greedy generation from the prompt token ids; Output.tokens: what really came out."""
        import numpy as np
        import openvino as ov

        from mirror_sd.bench.methods import Output  # here: methods imports this module

        x = np.asarray([ids], dtype=np.int64)
        inputs = self._genai.TokenizedInputs(ov.Tensor(x), ov.Tensor(np.ones_like(x)))
        cfg = self.config(max_new_tokens)
        pipe = self.slot.get(self.kind, self.load)  # a load happens here, before the clock
        t0 = time.perf_counter()
        res = pipe.generate(inputs, cfg)
        wall = time.perf_counter() - t0
        tokens = [int(t) for t in res.tokens[0]]
        if tokens[: len(ids)] == list(ids) and len(tokens) > max_new_tokens:
            tokens = tokens[len(ids) :]  # a result that echoes the prompt
        lengths = [1] * len(tokens) if self.name == "ov-ar" else None
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
        raise ValueError(f"peer residency {mode!r}: choose from {', '.join(RESIDENCY)}")
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
    """name -> OVMethod for the ov-* names in `names`, converting the plan's model folders.

    `target_format` / `draft_format`: IR weight formats (WEIGHT_FORMATS); None follows the
    plan (`plan_formats`: its devices' `quantize`, else fp32 target / int8 draft).
    `resident`: RESIDENCY mode (see `residency`).
    """
    chosen = [n for n in names if is_peer(n)]
    if not chosen:
        return {}
    check_available(chosen)
    drafted = [n for n in chosen if n in DRAFT_PEERS]
    if drafted and not plan.report.draft:
        raise ValueError(f"{', '.join(drafted)} need(s) a draft model: pass --draft")
    t_default, d_default = plan_formats(plan)
    t_fmt, d_fmt = target_format or t_default, draft_format or d_default
    target_ir = convert(plan.report.target, t_fmt, cache, progress)
    draft_ir = convert(plan.report.draft, d_fmt, cache, progress) if drafted else None
    gamma = plan.spec.num_draft_tokens
    kinds = {("sd" if n in DRAFT_PEERS else n) for n in chosen}  # ov-sd(+conf): one pipeline
    need = sum(weights_gib(target_ir, draft_ir if k == "sd" else None) for k in kinds)
    slot = PipelineSlot(residency(resident, need, available_gib()))
    _say(progress and not slot.resident,
         f"peers need ~{need:.1f} GiB together: one pipeline in memory at a time")  # fmt: skip
    out = {}
    for n in chosen:
        sd = n in DRAFT_PEERS
        out[n] = OVMethod(n, target_ir, eos, gamma, threads, draft_ir if sd else None,
                          (t_fmt, d_fmt if sd else None), slot=slot)  # fmt: skip
    return out
