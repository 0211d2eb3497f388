"""`quantize: auto` and `dtype: auto`: the precision a device runs a model at, chosen from the
checkpoint's own precision and what the hardware runs natively (pure: facts in, choice out).

Rule: the checkpoint's precision where the device has native kernels for it, fp32 elsewhere.

    ONNX Runtime device (`quantize`)
        a 4-bit / 8-bit checkpoint (a GGUF such as Q4_K_M, Q8_0) -> int4 / int8 weights
            where the CPU has integer dot-product kernels (MatMulNBits with int8 activations:
            AMX-INT8, AVX512-VNNI, AVX-VNNI or AVX2 on x86, dot-product NEON on Arm);
            except a 4-bit checkpoint's *target* on a CPU with AVX512-VNNI: int8-rows
            (ROWS_GEMM_FLAG, `choose_quantize`), faster there and closer to the checkpoint;
            and on an AVX2 CPU whose u8s8 GEMM saturates (no VNNI / AMX): int7-rows, the
            same kernel with weights it computes exactly, faster there than int4
        anything else -> none (fp32 weights): ORT's CPU provider has no bf16 / fp16 GEMM, and
            quantizing a float checkpoint below its precision is the user's call, not ours
    torch device (`dtype`)
        a bfloat16 / float16 checkpoint -> that dtype where the device computes it natively
            (CPU: AMX-BF16 or AVX512-BF16 for bf16, AVX512-FP16 / AMX-FP16 for fp16; CUDA: yes)
        anything else (fp32, or a quantized GGUF de-quantized to fp32) -> float32

Either way the plan's reference is the model at the chosen precision (lossless means identical
to its own greedy decoding); `describe()` prints the choice and its reason.
"""

from __future__ import annotations

from dataclasses import dataclass

AUTO = "auto"
INT8_DOT_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx2", "asimddp")  # best first
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
FP16_FLAGS = ("amx_fp16", "avx512_fp16")
CHECKPOINT_PRECISIONS = ("int4", "int8", "float16", "bfloat16", "float32")
ROWS_GEMM_FLAG = "avx512_vnni"  # where a 4-bit checkpoint's target runs int8-rows (measured)
ROWS7_GEMM_FLAG = "avx2"  # without exact u8s8 (VNNI, AMX): int7-rows instead of int4 (measured)
# Where MLAS's u8s8 GEMM (int8-rows) is exact: VNNI / AMX dot products on x86, SDOT/UDOT on Arm.
# Without them (AVX2, AVX-512 without VNNI) it multiplies through vpmaddubsw, whose 16-bit pair
# sums saturate once 255 * |w| pairs exceed 32767 (|w| > 64 of our 127): devices/u8s8_probe.py
# measures it, tests/partition/test_u8s8_exact.py holds this rule to the measurement,
# docs/benchmarks.md *int8-rows needs VNNI* records it.
U8S8_EXACT_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "asimddp")


@dataclass(frozen=True)
class CpuCaps:
    """What a CPU offers, as /proc/cpuinfo names it (`devices.cpu_caps.host_caps()` reads it)."""

    model: str
    flags: frozenset[str]

    @property
    def int8_dot(self) -> str | None:
        """The best integer dot-product instruction set present, or None."""
        return next((f for f in INT8_DOT_FLAGS if f in self.flags), None)

    @property
    def u8s8_exact(self) -> bool:
        """True when int8-rows' u8s8 GEMM computes exactly here (U8S8_EXACT_FLAGS)."""
        return any(f in self.flags for f in U8S8_EXACT_FLAGS)

    def native(self, dtype: str) -> str | None:
        """The flag that makes `dtype` ("bfloat16" | "float16") native here, or None."""
        flags = {"bfloat16": BF16_FLAGS, "float16": FP16_FLAGS}.get(dtype, ())
        return next((f for f in flags if f in self.flags), None)


@dataclass(frozen=True)
class PrecisionChoice:
    """A device's resolved precision and why: `value` is what the map's key becomes."""

    key: str  # "quantize" or "dtype"
    value: str
    reason: str

    def describe(self) -> str:
        return f"{self.key}: auto -> {self.value} ({self.reason})"


def choose_quantize(checkpoint: str, caps: CpuCaps, role: str = "target") -> PrecisionChoice:
    """`quantize: auto` for an ONNX Runtime CPU device running the `role` model.

    A 4-bit checkpoint's target on a CPU with ROWS_GEMM_FLAG gets int8-rows. On the AVX-512
    EPYC, side by side on 12 prompts (docs/benchmarks.md, *int4 or int8-rows*), its `ar` ran at
    1.03x int4's (long prompts faster, short ones slower) and the plan's best method at 1.28x
    int4's best, since a 5-row verification block costs 1.22x a row there against 1.75x at
    int4 (speculation 1.24x its `ar`; at int4 0.87x); and it stays closer to the checkpoint's
    de-quantized weights (93% top-1 agreement against 84% for int4 per 32). A draft stays int4: one
    decoding row is faster there (31 vs 43 ms on the 0.5B; its prompt can take int8-rows,
    `prefill_quantize`).

    Where AVX2 is present but the u8s8 GEMM is not exact (no VNNI or AMX), a 4-bit checkpoint's
    target gets int7-rows (weights in [-64, 64], which that GEMM computes exactly). On the
    AVX2-only EPYC, side by side on 12 prompts (docs/benchmarks.md, *int7-rows on AVX2*), its
    `ar` ran at 1.13x int4's and the plan's best method at 1.18x int4's best: a lone int4 row
    is padded to two there (`devices.row_exact`) and int4 MatMulNBits is compute-bound on
    blocks, while the u8s8 GEMM is not.

    Raises:
        ValueError: `checkpoint` is not one of CHECKPOINT_PRECISIONS.
    """
    _check(checkpoint)
    if checkpoint == "int4" and role == "target" and ROWS_GEMM_FLAG in caps.flags:
        return PrecisionChoice(
            "quantize", "int8-rows", f"the checkpoint is int4; on this CPU ({ROWS_GEMM_FLAG}) the "
            "row-invariant int8 GEMM decodes a target faster than int4 MatMulNBits and keeps "
            "closer to the checkpoint's weights"
        )  # fmt: skip
    if (checkpoint == "int4" and role == "target" and ROWS7_GEMM_FLAG in caps.flags
            and not caps.u8s8_exact):  # fmt: skip
        return PrecisionChoice(
            "quantize", "int7-rows", f"the checkpoint is int4; on this CPU ({ROWS7_GEMM_FLAG}, "
            "no VNNI or AMX) the row-invariant int8 GEMM with weights in [-64, 64] computes "
            "exactly and decodes a target faster than int4 MatMulNBits"
        )  # fmt: skip
    if checkpoint in ("int4", "int8"):
        dot = caps.int8_dot
        if dot:
            return PrecisionChoice(
                "quantize", checkpoint, f"the checkpoint is {checkpoint}; this CPU runs "
                f"{checkpoint}-weight MatMulNBits with int8 activations natively ({dot})"
            )  # fmt: skip
        return PrecisionChoice(
            "quantize", "none", f"the checkpoint is {checkpoint}, but this CPU has no integer "
            f"dot-product instructions ({', '.join(INT8_DOT_FLAGS)}): fp32 weights"
        )  # fmt: skip
    return PrecisionChoice(
        "quantize", "none", f"the checkpoint is {checkpoint}; ONNX Runtime's CPU provider runs "
        "floating-point weights in fp32 (no bf16/fp16 GEMM)"
    )  # fmt: skip


def choose_prefill_quantize(quantize: str, caps: CpuCaps) -> PrecisionChoice:
    """`prefill_quantize: auto` for an ONNX Runtime CPU draft whose weights are `quantize`
    (resolved): int8-rows for an int4 draft where the CPU's u8s8 GEMM is exact (VNNI, AMX or
    Arm dot products: `CpuCaps.u8s8_exact`), int7-rows where it saturates but AVX2 runs it
    (the same GEMM with weights it computes exactly), else none.

    Why: int4 MatMulNBits de-quantizes per block and is compute-bound on many rows, while
    int8-rows runs the prepacked u8s8 GEMM; on the 0.5B draft (AVX-512 EPYC, 2 threads) a
    700-token prefill took 1.49 s against 2.64 s, while one decoding row took 43 ms against 31
    (docs/benchmarks.md, *A second graph for the draft's prefill*): prefill on one, decode on
    the other."""
    if quantize == "int4" and caps.u8s8_exact:
        return PrecisionChoice("prefill_quantize", "int8-rows", "an int4 draft's prompt runs "
                               f"faster through the u8s8 GEMM ({caps.int8_dot})")  # fmt: skip
    if quantize == "int4" and ROWS7_GEMM_FLAG in caps.flags:
        return PrecisionChoice("prefill_quantize", "int7-rows", "an int4 draft's prompt runs "
                               f"faster through the u8s8 GEMM ({ROWS7_GEMM_FLAG}; weights in "
                               "[-64, 64]: without VNNI or AMX it saturates beyond)")  # fmt: skip
    why = (f"the draft is {quantize}" if quantize != "int4"
           else "this CPU has no u8s8 GEMM (no AVX2, VNNI, AMX or Arm dot products)")  # fmt: skip
    return PrecisionChoice("prefill_quantize", "none", f"{why}: the draft's own graph")


def rows_gemm_warning(key: str, caps: CpuCaps) -> str | None:
    """Why `key: int8-rows` computes a different model on this CPU, or None where its GEMM is
    exact: the words of the warning a pinned int8-rows gets on a CPU without U8S8_EXACT_FLAGS."""
    if caps.u8s8_exact:
        return None
    fix = ("prefill_quantize: int7-rows (the same kernel, exact everywhere) or auto"
           if key.endswith("prefill_quantize")
           else "quantize: int7-rows (the same kernel, exact everywhere) or auto")  # fmt: skip
    return (
        f"{key}: int8-rows on this CPU ({caps.model}) runs MLAS's u8s8 GEMM without VNNI, AMX or "
        "Arm dot products: its 16-bit pair sums saturate, so the weights act as a distorted "
        "model (still lossless to its own decoding, but not the int8 model a VNNI CPU runs, and "
        f"further from the checkpoint). Use {fix} instead"
    )


def choose_dtype(checkpoint: str, device: str, caps: CpuCaps | None) -> PrecisionChoice:
    """`dtype: auto` for a torch device ("cpu", "cuda:N", "mps"); `caps` for "cpu".

    Raises:
        ValueError: `checkpoint` is not one of CHECKPOINT_PRECISIONS.
    """
    _check(checkpoint)
    if checkpoint not in ("bfloat16", "float16"):
        return PrecisionChoice("dtype", "float32", f"the checkpoint is {checkpoint} "
                               "(weights de-quantized to float): float32")  # fmt: skip
    if device.startswith("cuda"):
        return PrecisionChoice("dtype", checkpoint, f"the checkpoint is {checkpoint}; CUDA "
                               "computes it natively")  # fmt: skip
    if device == "mps" and checkpoint == "float16":
        return PrecisionChoice("dtype", checkpoint, "the checkpoint is float16; MPS computes it")
    flag = caps.native(checkpoint) if caps is not None and device == "cpu" else None
    if flag:
        return PrecisionChoice("dtype", checkpoint, f"the checkpoint is {checkpoint}; this CPU "
                               f"computes it natively ({flag})")  # fmt: skip
    return PrecisionChoice("dtype", "float32", f"the checkpoint is {checkpoint}, which {device} "
                           "does not compute natively here: float32")  # fmt: skip


def choose_torch_quantize(checkpoint: str, device: str, caps: CpuCaps | None) -> PrecisionChoice:
    """`quantize: auto` for a torch device: the checkpoint's int4 / int8 as weight-only linears
    (`graphs.quantize`) where torch's CPU kernels run them fast, i.e. with bfloat16
    activations computed natively (AMX-BF16 / AVX512-BF16); otherwise none.

    Raises:
        ValueError: `checkpoint` is not one of CHECKPOINT_PRECISIONS.
    """
    _check(checkpoint)
    if checkpoint not in ("int4", "int8"):
        return PrecisionChoice("quantize", "none", f"the checkpoint is {checkpoint}")
    flag = caps.native("bfloat16") if caps is not None and device == "cpu" else None
    if flag is None:
        return PrecisionChoice(
            "quantize", "none", f"the checkpoint is {checkpoint}, but torch's weight-only "
            f"kernels need a CPU computing bfloat16 natively ({', '.join(BF16_FLAGS)}); {device} "
            "is not one"
        )  # fmt: skip
    return PrecisionChoice(
        "quantize", checkpoint, f"the checkpoint is {checkpoint}; torch's weight-only "
        f"{checkpoint} kernels with bfloat16 activations run natively here ({flag})"
    )  # fmt: skip


def dtype_for_quantized(quantize: str, caps: CpuCaps | None) -> PrecisionChoice:
    """`dtype: auto` beside weight-only int8 / int4 on a torch CPU device: bfloat16 activations
    (the kernels' fast path) where native, else float32."""
    flag = caps.native("bfloat16") if caps is not None else None
    if flag:
        return PrecisionChoice("dtype", "bfloat16", f"{quantize} weight-only kernels take "
                               f"bfloat16 activations, native here ({flag})")  # fmt: skip
    return PrecisionChoice("dtype", "float32", f"{quantize} weights; no native bfloat16 here")


def _check(checkpoint: str) -> None:
    if checkpoint not in CHECKPOINT_PRECISIONS:
        raise ValueError(
            f"checkpoint precision {checkpoint!r}: expected one of {CHECKPOINT_PRECISIONS}"
        )
