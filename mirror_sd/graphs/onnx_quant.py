"""Weight quantization of an exported ONNX model: `MatMulNBits` int8 / int4 weights, and the
row-invariant int8 `DynamicQuantizeMatMul` of `graphs.row_quant` (`quantize_model`).

`graphs.export` calls it for quantized cache entries, `graphs.layered` for each layer part,
`devices.row_exact` probes its kernel with the same settings (QUANT_BLOCK, QUANT_ACCURACY_LEVEL).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import onnx

from mirror_sd import progress

EXTERNAL_DATA_BYTES = 1 << 30  # weights at least this large go to one `<file>.data` beside it


def model_files(path: str | Path) -> list[Path]:
    """The files one exported model consists of: the graph and its external data, if any."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return [path, data] if data.is_file() else [path]


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """int8 weights for an exported model (`quantize_weights` with 8 bits). Returns `dst`."""
    return quantize_weights(src, dst, 8)


def quantize_int4(src: str | Path, dst: str | Path) -> Path:
    """int4 MatMul weights for an exported model (`quantize_weights` with 4 bits). Returns `dst`."""
    return quantize_weights(src, dst, 4)


def quantize_int8_rows(src: str | Path, dst: str | Path) -> Path:
    """int8 row-invariant DynamicQuantizeMatMul weights (`quantize_model` "int8-rows")."""
    return quantize_model(src, dst, "int8-rows")


def quantize_int7_rows(src: str | Path, dst: str | Path) -> Path:
    """int8-rows with weights in [-64, 64], exact without VNNI (`quantize_model` "int7-rows")."""
    return quantize_model(src, dst, "int7-rows")


QUANT_BLOCK = 32  # weights per MatMulNBits scale
QUANT_ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations, integer kernels (VNNI / AMX / AVX2)


def quantize_weights(src: str | Path, dst: str | Path, bits: int) -> Path:
    """`bits`-bit weights (8 or 4) for every MatMul of an exported model, int8 embedding table.

    MatMuls become `MatMulNBits`: symmetric, one scale per QUANT_BLOCK weights, accuracy level
    QUANT_ACCURACY_LEVEL (ORT quantizes each row's activations to int8 per block and runs
    integer dot products: VNNI / AMX-INT8 / AVX2; 4-bit weights unpack to int8 in the kernel).
    The same file serves drafts and targets. A quantized target stays lossless against its own
    one-row decoding because every op of the graph is row-invariant: each row's result is
    bit-for-bit the same alone or in a block (MatMulNBits at this level and block size is, for
    every M >= 2, and for M = 1 where `devices.row_exact` measures so; elsewhere the target
    runner pads a lone row to two; attention computes a short block row by row, `model.attend`; tested in
    tests/graphs/test_row_invariance.py). That matters more here than in fp32: int8 activation
    quantization is a step function, so a last-bit difference between a block and a single row
    that crosses a rounding boundary becomes a whole quantization step (docs/runtime.md, *Row
    invariance*). Other levels (0-3: fp32 activations) are neither faster nor row-invariant in
    ONNX Runtime 1.32: a 1536x8960 int8 MatMul takes 32-53 ms at levels 0-3 against 0.4 ms at
    level 4 on the AMX Xeon (docs/benchmarks.md, *Kernels*).
    Per-block scales keep Qwen's outlier channels: on the 0.5B draft the int8 top-1 token agrees
    with fp32 on ~98% of code positions, where per-tensor dynamic quantization agrees on ~69%.
    The embedding Gather gets per-tensor int8 (a lookup: no kernel to speed up, only bytes to
    save). Returns `dst`.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: MatMulNBits weights are 4 or 8 bits here")
    nbits = import_matmul_nbits()
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    large = sum(f.stat().st_size for f in model_files(src)) // 4 >= EXTERNAL_DATA_BYTES
    config = nbits.DefaultWeightOnlyQuantConfig(
        block_size=QUANT_BLOCK, is_symmetric=True, accuracy_level=QUANT_ACCURACY_LEVEL, bits=bits
    )
    quantizer = nbits.MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config)
    n_matmuls = _count_ops(quantizer.model.model.graph, "MatMul")
    desc = f"quantizing {entry_label(src)} to int{bits}"
    with (
        progress.bar(n_matmuls + 1, desc=desc, unit="op") as bar,
        tempfile.TemporaryDirectory(dir=dst.parent) as tmp,
    ):
        _tick_per_node(quantizer, bar)
        quantizer.process()
        matmuls = Path(tmp) / "matmuls.onnx"  # (+ .data when large)
        quantizer.model.save_model_to_file(str(matmuls), use_external_data_format=large)
        del quantizer
        _embedding_int8(matmuls, dst, large)
        bar.update(max(0, bar.total - bar.n))  # the embedding (and any MatMul not counted)
    return dst


QUANTIZE_KINDS = ("int8", "int4", "int8-rows", "int7-rows")  # what `quantize_model` writes


def quantize_model(src: str | Path, dst: str | Path, quantize: str) -> Path:
    """`quantize` ("int8" | "int4": MatMulNBits, `quantize_weights`; "int8-rows" |
    "int7-rows": the row-invariant DynamicQuantizeMatMul, `graphs.row_quant`) weights for an
    exported model, int8 embedding table. Returns `dst`."""
    if quantize in ("int8", "int4"):
        return quantize_weights(src, dst, int(quantize.removeprefix("int")))
    from mirror_sd.graphs.row_quant import ROWS_KINDS, quantize_rows

    if quantize not in ROWS_KINDS:
        raise ValueError(f"quantize={quantize!r}: expected one of {', '.join(QUANTIZE_KINDS)}")

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    large = sum(f.stat().st_size for f in model_files(src)) // 4 >= EXTERNAL_DATA_BYTES
    with (
        progress.step(f"quantizing {entry_label(src)} to {quantize}"),
        tempfile.TemporaryDirectory(dir=dst.parent) as tmp,
    ):
        matmuls = quantize_rows(src, Path(tmp) / "matmuls.onnx", large, ROWS_KINDS[quantize])
        _embedding_int8(matmuls, dst, large)
    return dst


def _embedding_int8(src: Path, dst: Path, large: bool) -> None:
    """`src` with its embedding Gather's table in per-tensor int8, saved at `dst`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    hint = _DropPreprocessHint()
    logging.getLogger().addFilter(hint)
    try:
        quantize_dynamic(src, dst, op_types_to_quantize=["Gather"],
                         weight_type=QuantType.QInt8, use_external_data_format=large)  # fmt: skip
    finally:
        logging.getLogger().removeFilter(hint)


def entry_label(path: Path) -> str:
    """A short name of an exported file for progress lines: its cache entry's name without the
    hash (`qwen2-0-24`), or the file's own name when it is not its entry's `model.onnx`."""
    return path.parent.name.rsplit("-", 1)[0] if path.name == "model.onnx" else path.name


def _count_ops(graph: onnx.GraphProto, op_type: str) -> int:
    """Nodes of `op_type` in `graph` and its subgraphs (an If's branches)."""
    n = 0
    for node in graph.node:
        n += node.op_type == op_type
        for a in node.attribute:
            subgraphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs
            n += sum(_count_ops(g, op_type) for g in subgraphs)
    return n


def _tick_per_node(quantizer: Any, bar: Any) -> None:
    """Tick `bar` after each node ORT's MatMulNBits quantizer quantizes (it visits every MatMul
    through `node_quantizer.quantize`; ORT 1.32). Without that hook the bar just jumps at the
    end: progress is a courtesy, never a reason to fail."""
    node_quantizer = getattr(quantizer, "node_quantizer", None)
    if bar.disable or not callable(getattr(node_quantizer, "quantize", None)):
        return
    inner = node_quantizer.quantize

    def quantize(*args: Any, **kwargs: Any) -> Any:
        out = inner(*args, **kwargs)
        bar.update()
        return out

    node_quantizer.quantize = quantize


def import_matmul_nbits():
    """Import ORT's MatMulNBits quantizer without its import-time `logging.basicConfig(INFO)`,
    which would otherwise turn on INFO logging for the whole application."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    return matmul_nbits_quantizer


class _DropPreprocessHint(logging.Filter):
    """quantize_dynamic logs advice for static image models on every call; it does not apply."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()
