"""Do fewer nodes make a quantized decoding step faster? Two graph rewrites, measured before
adopting them (docs/benchmarks.md, *Where an int4 token goes*; neither was adopted).

    .venv/bin/python scripts/rewrite_probe.py RANGE.onnx [--quantize int8-rows] [--out probe.json]

RANGE.onnx is an fp32 layer range from the export cache (e.g.
`~/.cache/mirror-sd/onnx/qwen2-layers-*/range-14-28.onnx`). Three variants are quantized the
way the runtime quantizes a target (`onnx_quant.quantize_model`):

- `plain`: the graph as exported (what the runtime runs);
- `merged`: the MatMuls that read the same input (q/k/v, gate/up) as one MatMul and a Split,
  so a layer has 4 quantized linears instead of 7 (10 nodes each at int8-rows);
- `merged+norms`: also each RMSNorm's seven exported nodes (Pow, ReduceMean, Add, Sqrt,
  Reciprocal, Mul, Mul; ONNX Runtime's own fusion does not match the Reciprocal form) as one
  SimplifiedLayerNormalization.

For each: nodes after ONNX Runtime's optimizer, whether the outputs equal `plain`'s bit for
bit, whether a 5-row block equals its rows decoded one by one (row invariance: a lossless
target needs it), and the time of a 1-row and a 5-row call (300 cached rows; medians of 15
interleaved rounds of 5 calls, 2 threads). Random inputs: this compares graphs, not tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mirror_sd.devices.cpu_caps import host_caps  # noqa: E402
from mirror_sd.graphs.masks import KEY_PAD  # noqa: E402
from mirror_sd.graphs.onnx_quant import quantize_model  # noqa: E402

PAST, BLOCK = 300, 5


def merge_linears(model: onnx.ModelProto) -> int:
    """MatMuls sharing an input, with 2-D float weights read once and one K, as one MatMul
    on the weights concatenated along N and a Split to the old outputs. Returns MatMuls removed."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    reads: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            reads[name] = reads.get(name, 0) + 1
    groups: dict[str, list[int]] = {}
    for i, node in enumerate(g.node):
        w = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        is_float = w is not None and len(w.dims) == 2 and w.data_type == TensorProto.FLOAT
        if is_float and reads[w.name] == 1:
            groups.setdefault(node.input[0], []).append(i)
    replace: dict[int, list[onnx.NodeProto]] = {}
    drop_nodes: set[int] = set()
    drop_inits: set[str] = set()
    for x, members in groups.items():
        ws = [numpy_helper.to_array(inits[g.node[i].input[1]]) for i in members]
        if len(members) < 2 or len({w.shape[0] for w in ws}) != 1:
            continue
        p = f"merged{members[0]}"
        g.initializer.extend([
            numpy_helper.from_array(np.concatenate(ws, axis=1), f"{p}_w"),
            numpy_helper.from_array(np.array([w.shape[1] for w in ws], np.int64), f"{p}_n"),
        ])  # fmt: skip
        replace[members[0]] = [
            helper.make_node("MatMul", [x, f"{p}_w"], [f"{p}_y"]),
            helper.make_node(
                "Split", [f"{p}_y", f"{p}_n"], [g.node[i].output[0] for i in members], axis=-1
            ),  # fmt: skip
        ]
        drop_nodes.update(members)
        drop_inits.update(g.node[i].input[1] for i in members)
    _rebuild(g, replace, drop_nodes, drop_inits)
    return len(drop_nodes) - len(replace)


NORM_CHAIN = ("ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul", "Mul")  # after Pow(x, 2)


def fuse_rms_norms(model: onnx.ModelProto) -> int:
    """Each `w * (x * 1/sqrt(mean(x², -1) + eps))` chain whose intermediates nothing else reads
    as one SimplifiedLayerNormalization (ONNX Runtime's kernel). Returns norms fused."""
    g = model.graph
    small = {i.name: numpy_helper.to_array(i) for i in g.initializer if len(i.dims) <= 1}
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(g.node):
        for name in node.input:
            readers.setdefault(name, []).append(i)
    replace: dict[int, list[onnx.NodeProto]] = {}
    drop: set[int] = set()
    for i, node in enumerate(g.node):
        two = small.get(node.input[1]) if node.op_type == "Pow" else None
        if two is None or two.size != 1 or float(two.reshape(())) != 2.0:
            continue
        chain, cur = [], i
        for op in NORM_CHAIN:
            nxt = readers.get(g.node[cur].output[0], [])
            if len(nxt) != 1 or g.node[nxt[0]].op_type != op:
                break
            cur = nxt[0]
            chain.append(cur)
        if len(chain) != len(NORM_CHAIN):
            continue
        _, add, _, _, scale, weigh = (g.node[j] for j in chain)
        eps = next(small[n] for n in add.input if n in small)
        weight = next(n for n in weigh.input if n in small)
        if node.input[0] not in scale.input:
            continue
        replace[i] = [helper.make_node(
            "SimplifiedLayerNormalization", [node.input[0], weight], [weigh.output[0]],
            axis=-1, epsilon=float(eps.reshape(())), stash_type=1,
        )]  # fmt: skip
        drop.update([i, *chain])
    _rebuild(g, replace, drop, set())
    return len(replace)


def _rebuild(g, replace: dict, drop_nodes: set, drop_inits: set) -> None:
    nodes = []
    for i, node in enumerate(g.node):
        nodes += replace.get(i, []) if i in drop_nodes else [node]
    keep = [t for t in g.initializer if t.name not in drop_inits]
    del g.node[:], g.initializer[:]
    g.node.extend(nodes)
    g.initializer.extend(keep)


def build(src: Path, folder: Path, quantize: str, rewrites: tuple) -> tuple[Path, dict]:
    model = onnx.load(str(src))
    done = {f.__name__: f(model) for f in rewrites}
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "fp32.onnx"
    onnx.save_model(model, str(fp32), save_as_external_data=True, location="fp32.onnx.data")
    del model
    return quantize_model(fp32, folder / "model.onnx", quantize), done


def session(path: Path, optimized: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", optimized.name + ".data"
        )
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def feeds(s: ort.InferenceSession, rows: np.ndarray, past: dict, start: int) -> dict:
    """Inputs for `rows` (1, T, D) after `start` cached rows, each seeing every earlier row."""
    t = rows.shape[1]
    width = -(-(start + t) // KEY_PAD) * KEY_PAD
    mask = np.zeros((1, t, width), bool)
    for r in range(t):
        mask[0, r, : start + r + 1] = True
    keys = np.zeros((1, width), np.int64)
    keys[0, : start + t] = np.arange(start + t)
    return {"hidden": rows, "position_ids": np.arange(start, start + t)[None], "mask": mask,
            "key_index": keys, "row_index": np.arange(t)[None], "row_slot": np.arange(t),
            **past}  # fmt: skip


def random_inputs(s: ort.InferenceSession, rng: np.random.Generator):
    past, width = {}, None
    for i in s.get_inputs():
        if i.name.startswith("past_"):
            past[i.name] = rng.standard_normal((1, PAST, i.shape[2], i.shape[3]), np.float32)
        elif i.name == "hidden":
            width = i.shape[2]
    return rng.standard_normal((1, BLOCK, width), np.float32), past


def row_invariant(s: ort.InferenceSession, rows: np.ndarray, past: dict) -> bool:
    names = [o.name for o in s.get_outputs()]
    block = s.run(None, feeds(s, rows, past, PAST))[0]
    cache, one = dict(past), []
    for r in range(rows.shape[1]):
        outputs = s.run(None, feeds(s, rows[:, r : r + 1], cache, PAST + r))
        out = dict(zip(names, outputs, strict=True))
        one.append(out[names[0]])
        for k in cache:
            cache[k] = np.concatenate([cache[k], out["new_" + k.removeprefix("past_")]], 1)
    return bool(np.array_equal(np.concatenate(one, 1), block))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("range", type=Path)
    ap.add_argument("--quantize", default="int8-rows")
    ap.add_argument("--out", type=Path, default=Path("rewrite_probe.json"))
    args = ap.parse_args()
    variants = {"plain": (), "merged": (merge_linears,),
                "merged+norms": (merge_linears, fuse_rms_norms)}  # fmt: skip
    caps = host_caps()
    report = {"machine": {"cpu": caps.model, "flags": sorted(caps.flags), "cores": os.cpu_count()},
              "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__},
              "command": sys.argv, "date": datetime.datetime.now(datetime.UTC).isoformat(),
              "load_average": os.getloadavg(), "range": str(args.range),
              "quantize": args.quantize, "variants": {}}  # fmt: skip
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, rewrites in variants.items():
            path, done = build(args.range, Path(tmp) / name, args.quantize, rewrites)
            opt = Path(tmp) / name / "optimized.onnx"
            sessions[name] = session(path, opt)
            nodes = len(onnx.load(str(opt), load_external_data=False).graph.node)
            report["variants"][name] = {"rewrites": done, "nodes_after_ort": nodes}
        rows, past = random_inputs(sessions["plain"], rng)
        ref = {t: sessions["plain"].run(None, feeds(sessions["plain"], rows[:, :t], past, PAST))
               for t in (1, BLOCK)}  # fmt: skip
        times = {name: {1: [], BLOCK: []} for name in sessions}
        for _ in range(15):
            for name, s in sessions.items():
                for t in (1, BLOCK):
                    f = feeds(s, rows[:, :t], past, PAST)
                    start = time.perf_counter()
                    for _ in range(5):
                        s.run(None, f)
                    times[name][t].append((time.perf_counter() - start) / 5 * 1e3)
        for name, s in sessions.items():
            v = report["variants"][name]
            v["bit_equal_to_plain"] = all(
                all(np.array_equal(a, b) for a, b in zip(
                    s.run(None, feeds(s, rows[:, :t], past, PAST)), ref[t], strict=True))
                for t in (1, BLOCK)
            )  # fmt: skip
            v["row_invariant"] = row_invariant(s, rows, past)
            for t in (1, BLOCK):
                v[f"ms_{t}_rows"] = round(statistics.median(times[name][t]), 2)
            print(name, json.dumps(v))
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
