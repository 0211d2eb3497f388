"""How large a round may be: γ, κ, the branch budget and token trees against what a plan
can run (row-invariant verification, the cache's rows, the exit head's vocabulary)."""

from __future__ import annotations

from mirror_sd.graphs.model import ROW_INVARIANT_ROWS
from mirror_sd.partition.device_map import DeviceMapError


def check_block_bounds(spec, source: str = "<dict>", vocab_size: int | None = None) -> None:
    """γ, κ and the branch budget within what a plan can run, named by key when not.

    A verified block is γ + 1 rows, scored row-invariantly (the lossless guarantee of a
    quantized target, docs/runtime.md) up to ROW_INVARIANT_ROWS; mirror's branches need
    (1 + budget)·(γ + 1) + 1 cache rows beyond the prompt within max_len; κ exit candidates
    per position come from the exit head's vocabulary (`vocab_size`, or its VocabTrim).

    Raises:
        DeviceMapError: naming the key and the largest value that works.
    """
    gamma = spec.num_draft_tokens
    leaves = 0 if spec.tree_siblings == "auto" else sum(spec.tree_shape)  # auto: sized within
    if leaves and 1 + gamma + leaves > ROW_INVARIANT_ROWS:
        raise DeviceMapError(
            "speculation.tree_siblings", f"{spec.tree_siblings!r} sibling leaves make a "
            f"{1 + gamma + leaves}-row tree with γ = {gamma}; at most {ROW_INVARIANT_ROWS} rows "
            f"verify row-invariantly (lossless), so use at most {ROW_INVARIANT_ROWS - 1 - gamma} "
            f"leaves in all (at most {(ROW_INVARIANT_ROWS - 1 - gamma) // gamma} per depth)",
            source,
        )  # fmt: skip
    if gamma + 1 > ROW_INVARIANT_ROWS:
        raise DeviceMapError(
            "speculation.num_draft_tokens", f"{gamma} draft tokens make a {gamma + 1}-row block; "
            f"at most {ROW_INVARIANT_ROWS} rows verify row-invariantly (lossless), so use at most "
            f"{ROW_INVARIANT_ROWS - 1}", source,
        )  # fmt: skip
    budget = spec.branch_budget if isinstance(spec.branch_budget, int) else 1
    need = (1 + budget) * (gamma + 1) + 1
    if need >= spec.max_len:
        raise DeviceMapError(
            "speculation.max_len", f"{spec.max_len} rows leave no room for a prompt: a round "
            f"needs {need} rows beyond it (γ = {gamma}, branch budget {budget}); raise max_len "
            "or lower num_draft_tokens / branch_budget", source,
        )  # fmt: skip
    if vocab_size is not None:
        heads = min(vocab_size, spec.exit_vocab_size or vocab_size)
        if spec.exit_top_k > heads:
            raise DeviceMapError(
                "speculation.exit_top_k", f"κ = {spec.exit_top_k} exit candidates per position, "
                f"but the exit head scores {heads} tokens; use at most {heads}", source,
            )  # fmt: skip


def tree_rounding(t_spec) -> str | None:
    """Why token trees cannot stay lossless on this target, or None when they can.

    A tree's later branches see keys that are not one contiguous prefix. ONNX Runtime graphs
    regroup each root-to-leaf path into a prefix of its own keys (`masks.group_rows`), so every
    row computes what its path verified as a chain computes, bit for bit, at fp32, int8 and int4
    weights (docs/runtime.md, *Row invariance*). Eager torch does not: there a branch's sums
    round differently, last-bit noise at fp32 (a flip only at a near-tie) but other tokens once
    a quantized or bf16/fp16 target amplifies it."""
    quant = getattr(t_spec, "quantize", "none") or "none"
    dtype = getattr(t_spec, "dtype", "float32")
    if getattr(t_spec, "backend", None) == "onnxruntime" and dtype == "float32":
        return None
    if quant != "none" or dtype != "float32":
        return (f"the target runs {quant if quant != 'none' else dtype} on {t_spec.backend}: a "
                "tree's branches round differently from one-row decoding there and that changes "
                "tokens; tree_siblings needs an onnxruntime target or an fp32 one (quantize: "
                "none, dtype: float32)")  # fmt: skip
    return None
