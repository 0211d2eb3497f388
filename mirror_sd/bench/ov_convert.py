"""OpenVINO IR for the ov-* peers: the plan's own Hugging Face folders converted once by
optimum-intel's `optimum-cli export openvino`, from a converter virtualenv that this module
creates on demand under `<cache>/peers/converter` (optimum-intel pins an older transformers
than mirror-sd's and would otherwise replace it in the project venv; the converter venv's
torch is pinned to the project's torch version with a pip constraint). IRs are cached under
`<cache>/peers/ir/<name>-<format>-<key>/`, keyed by the source folder's identity
(`export.source_identity`) and the weight format, so a second run reuses them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mirror_sd.bench.peer_common import PeersUnavailableError, dist_version, say

WEIGHT_FORMATS = ("fp32", "int8", "int4")
TARGET_FORMAT = "fp32"  # the target IR's weights unless the plan's target is quantized
DRAFT_FORMAT = "int8"  # the draft IR's weights unless the plan's draft device says otherwise
# ours: MatMulNBits symmetric, one scale per 32 weights (graphs/onnx_quant.quantize_weights);
# NNCF's int8 is per output channel (no groups), int4 takes the same group size
FORMAT_OPTIONS = {
    "fp32": (),
    "int8": ("--sym",),
    "int4": ("--sym", "--group-size", "32", "--ratio", "1.0"),
}
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


def quantize_to_format(quantize: str | None, default: str) -> str:
    """A device map's `quantize` value ('none' | 'int8' | 'int4' | 'int8-rows' | 'int7-rows' |
    None) -> an IR weight format (int8-rows and int7-rows: int8 weights too, activations
    quantized per row by our kernel)."""
    if quantize in (None, ""):
        return default
    from mirror_sd.graphs.row_quant import ROWS_KINDS

    fmt = "fp32" if quantize == "none" else "int8" if quantize in ROWS_KINDS else quantize
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


def _public(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0' (a pin that the same wheel, and pip's default one, satisfy)."""
    return version.split("+", 1)[0]


def converter_pins() -> dict[str, str]:
    """Package -> version that the converter venv pins: the project's torch (never upgraded by
    optimum-intel) and the runtime's openvino / openvino-tokenizers (so the tokenizer IR the
    converter writes loads in this process)."""
    pins = {}
    for dist in ("torch", "openvino", "openvino-tokenizers"):
        v = dist_version(dist)
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
    from mirror_sd.graphs.file_lock import locked

    with locked(venv.parent / "converter.lock"):
        if marker.is_file() and cli.is_file():
            with contextlib.suppress(ValueError):
                done = json.loads(marker.read_text())
                if done.get("pins") == pins and done.get("removed") == list(CONVERTER_REMOVE):
                    return cli
        say(progress, f"creating the converter venv {venv} (optimum-intel; once, a few minutes)")
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
        say(progress, f"converter ready in {info['install_s']} s")
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
    from mirror_sd.graphs.file_lock import locked

    with locked(out.parent / f"{out.name}.lock"):
        if is_converted(out):
            return out
        cli = ensure_converter(cache, progress)
        say(progress, f"converting {src.name} to OpenVINO IR ({weight_format}) -> {out}")
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
        say(progress, f"converted in {info['convert_s']} s")
    return out
