"""compile()'s heavy exports in a fresh interpreter, so their memory leaves with it.

Why: torch's ONNX exporter keeps the exported weights referenced after `export()` returns
(the program's initializers wrap the module's own parameters), and glibc keeps the freed
heap of the export and the quantization in its arenas. In-process, a first compile of
Qwen2.5-Coder-1.5B therefore carried ~7.6 GB of dead weights and free heap into the phase
where the target's ONNX Runtime sessions load, and peaked at 15.2 GB RSS. A worker process
exports (and measures the logit lens on the torch model it has loaded anyway), writes the
cache entries, returns their paths, and exits: compile() itself never holds a torch copy of
a model it runs in ONNX Runtime.

The worker is `python -m mirror_sd.export_worker REQUEST RESULT` (JSON files): a clean
interpreter, so a caller's script is never re-imported (as multiprocessing's spawn would)
and no thread or OpenMP state is forked. Models smaller than `ISOLATE_BYTES` export
in-process: a worker's start (importing torch, ~3 s) costs more than their memory. The worker
shows progress when its caller does (`progress.child_env`): its stderr is passed on to the
caller's as it comes, and its end is kept for the error message of a crash.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mirror_sd import progress
from mirror_sd.graphs.export import export_cached, find_cached, source_identity
from mirror_sd.graphs.layered import export_layers_cached, layers_entry
from mirror_sd.graphs.loader import load_model, release_memory, weightless_model
from mirror_sd.graphs.model import CausalLM

ISOLATE_BYTES = 1 << 30  # weights at least this large export in a worker process
STDERR_TAIL = 4000  # characters of a failed worker's stderr quoted in the error


USER_ERRORS = (FileNotFoundError, ValueError)  # raised again here, as these builtin classes


class ExportWorkerError(RuntimeError):
    """The export worker process crashed; the message quotes the end of its stderr."""


def weight_bytes(folder: str | Path) -> int:
    """Bytes of a model folder's safetensors files (what an export would load)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def export_draft(folder: str, onnx_dir: str, quantize: str | None) -> dict[str, Any]:
    """The whole model exported (and quantized) into the cache: {"path": model.onnx}. The
    fp32 export a quantized draft is made from is not kept: disk. The torch model is freed
    before the quantizer loads that fp32 export, so the two never share the memory."""
    model = load_model(folder, "float32")
    key = source_identity(folder)
    if not quantize or find_cached(model, onnx_dir, key, quantize) is not None:
        return {"path": str(export_cached(model, onnx_dir, key, quantize=quantize))}
    made = find_cached(model, onnx_dir, key) is None
    src = export_cached(model, onnx_dir, key)  # the quantizer's fp32 input
    del model
    release_memory()
    path = export_cached(weightless_model(folder), onnx_dir, key, quantize=quantize)
    if made:
        shutil.rmtree(src.parent, ignore_errors=True)
    return {"path": str(path)}


def export_target(folder: str, onnx_dir: str, exit_layer: int, quantize: str | None,
                  lens_ids: list[int] | None) -> dict[str, Any]:  # fmt: skip
    """The target's split at ℓe (`export_split`: per-layer export + splice + head) and, with
    `lens_ids`, the logit lens's agreement per ℓe candidate: {"graphs": [prefix, suffix,
    head], "lens": {ℓe: agreement} | None}.

    With `quantize`, every step that needs the torch model (the fp32 head and parts, the lens)
    runs first and the model is freed before the quantizer loads the fp32 ranges: the two
    never share the memory (on the 1.5B the worker reached 11.1 GB when they did; its parts
    export alone peaks near 6.5 GB)."""
    from mirror_sd.devices.ort_split import export_head_cached, export_split

    model = load_model(folder, "float32")
    key = source_identity(folder)
    lens = None
    if quantize:
        export_head_cached(model, onnx_dir, key)  # the head first: see export_split
        export_layers_cached(model, onnx_dir, key)
        lens = measure_lens(model, onnx_dir, key, lens_ids) if lens_ids else None
        del model
        release_memory()
        model = weightless_model(folder)  # the rest reads only cached ONNX files
    graphs = export_split(model, onnx_dir, key, exit_layer, quantize)
    if lens_ids and lens is None:
        lens = measure_lens(model, onnx_dir, key, lens_ids)
    return {"graphs": [str(p) for p in graphs], "lens": lens}


def lens_file(model: CausalLM, onnx_dir: str | Path, key_info: Mapping[str, Any],
              ids: Sequence[int]) -> Path:  # fmt: skip
    """Where the lens agreement of these weights on `ids` is kept: beside the per-layer
    export (`graphs.layered`), whose key covers the weights; `model` may be weightless."""
    digest = hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:16]
    return layers_entry(model, onnx_dir, key_info) / f"lens-{digest}.json"


def cached_lens(model: CausalLM, onnx_dir: str | Path, key_info: Mapping[str, Any],
                ids: Sequence[int]) -> dict[int, float] | None:  # fmt: skip
    """The kept lens agreement (`measure_lens`), or None."""
    path = lens_file(model, onnx_dir, key_info, ids)
    if not path.is_file():
        return None
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def measure_lens(model: CausalLM, onnx_dir: str | Path, key_info: Mapping[str, Any],
                 ids: Sequence[int]) -> dict[int, float]:  # fmt: skip
    """The logit lens's top-1 agreement per ℓe candidate on `ids` (`agreement_by_layer`),
    kept beside the per-layer export when there is one, so a later compile of the same
    weights neither measures it again nor loads the weights to do so."""
    from mirror_sd.runtime.profiling import agreement_by_layer, lens_layers

    lens = agreement_by_layer(model, ids, list(lens_layers(model.num_layers)))
    path = lens_file(model, onnx_dir, key_info, ids)
    if path.parent.is_dir():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(lens))
        os.replace(tmp, path)
    return lens


JOBS = {"draft": export_draft, "target": export_target}


def run(job: str, folder: str | Path, **kwargs: Any) -> dict[str, Any]:
    """`JOBS[job](folder, **kwargs)`: in a worker process when the model's weights are at
    least ISOLATE_BYTES, else here (its freed memory handed back with `release_memory`).
    Lens keys come back as ints either way.

    Raises:
        FileNotFoundError, ValueError: the job found a user error (e.g. a folder without
            weights), raised again here as that builtin class with the worker's message.
        ExportWorkerError: the worker crashed otherwise (its stderr's end is quoted).
    """
    args = {"folder": str(folder), **kwargs}
    if weight_bytes(folder) < ISOLATE_BYTES:
        out = JOBS[job](**args)
        release_memory()
    else:
        out = _in_worker(job, args)
    if out.get("lens") is not None:
        out["lens"] = {int(k): v for k, v in out["lens"].items()}
    return out


def _in_worker(job: str, args: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mirror-sd-export-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"job": job, "args": args}))
        status, stderr = _run_passing_stderr(
            [sys.executable, "-m", __name__, str(request), str(result)]
        )
        out = json.loads(result.read_text()) if result.is_file() else {}
        error = out.get("user_error")
        if error is not None:
            cls = next(c for c in USER_ERRORS if c.__name__ == error["kind"])
            raise cls(error["message"])
        if status != 0 or not out:
            raise ExportWorkerError(
                f"the {job} export worker failed (exit status {status}); its last "
                f"messages:\n{stderr[-STDERR_TAIL:]}"
            )
        return out


def _run_passing_stderr(cmd: list[str]) -> tuple[int, str]:
    """Run `cmd` with this context's progress switch in its environment (`progress.child_env`);
    when progress is shown, its stderr (its progress bars) is copied to ours as it comes.
    Returns its exit status and the last STDERR_TAIL characters of its stderr."""
    show = progress.enabled()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=progress.child_env()
    )
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tail = ""
    while chunk := proc.stderr.read1(4096):  # type: ignore[union-attr]
        text = decoder.decode(chunk)
        if show:
            sys.stderr.write(text)
            sys.stderr.flush()
        tail = (tail + text)[-STDERR_TAIL:]
    return proc.wait(), tail


def main(argv: list[str]) -> int:
    request, result = (Path(a) for a in argv)
    req = json.loads(request.read_text())
    try:
        out = JOBS[req["job"]](**req["args"])
    except USER_ERRORS as exc:  # the caller's to fix: its class and message go back
        kind = next(c.__name__ for c in USER_ERRORS if isinstance(exc, c))
        result.write_text(json.dumps({"user_error": {"kind": kind, "message": str(exc)}}))
        return 1
    result.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
