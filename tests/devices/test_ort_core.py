"""ort_core: sessions per thread count share one copy of the weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mirror_sd.devices.ort_core import OrtDevice, SessionPool

ROWS, COLS = 2048, 8192  # a 64 MiB fp32 MatMul weight
MIB = 2**20
STATUS = Path("/proc/self/status")


@pytest.fixture(scope="module")
def big_matmul(tmp_path_factory):
    """y = x @ W with W (2048, 8192) fp32 in external data, as our exports store weights."""
    folder = tmp_path_factory.mktemp("big")
    w = np.random.default_rng(0).standard_normal((ROWS, COLS), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", ROWS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", COLS])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    path = folder / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, location="model.onnx.data")
    return path


def run(session, x):
    return session.run(None, {"x": x})[0]


_MEASURE = """
import json, sys
import numpy as np
from mirror_sd.devices.ort_core import OrtDevice, SessionPool

def anon():
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) * 1024

path, how, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
x = np.ones((3, rows), np.float32)
device = OrtDevice(intra_op_threads=1, spinning=False)
pool = SessionPool(device, path)
pool.session.run(None, {"x": x})
before = anon()
if how == "pool":  # rebuilds the 1-thread session and adds a 2-thread one over one mapped file
    pool.set_threads(2)
    pool.session.run(None, {"x": x})
else:  # control: a second plain session pre-packs its own copy in heap memory
    plain = device.session(path, threads=2)
    plain.run(None, {"x": x})
out = {"growth": anon() - before, "threads": list(pool.thread_counts),
       "intra": pool.session.get_session_options().intra_op_num_threads}
print(json.dumps(out))
"""


def _measure(path: Path, how: str) -> dict:
    """Anonymous-memory growth of one more session, in a fresh process (a long-lived test
    process reuses freed heap, which would hide a copy)."""
    res = subprocess.run([sys.executable, "-c", _MEASURE, str(path), how, str(ROWS)], capture_output=True,
                         text=True, check=True, timeout=300)  # fmt: skip
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not STATUS.is_file(), reason="reads RssAnon from /proc (Linux)")
def test_a_second_thread_count_shares_the_weights(big_matmul):
    plain = _measure(big_matmul, "plain")
    assert plain["growth"] > 48 * MIB  # the measurement sees a copy of the 64 MiB weight
    pool = _measure(big_matmul, "pool")
    assert pool["growth"] < 16 * MIB
    assert pool["threads"] == [1, 2] and pool["intra"] == 2
    assert plain["threads"] == [1]
    assert any(p.name.startswith("prepacked-") for p in big_matmul.parent.iterdir())


def test_every_thread_count_computes_the_same(big_matmul):
    x = np.random.default_rng(1).standard_normal((3, ROWS), dtype=np.float32)
    pool = SessionPool(OrtDevice(intra_op_threads=1, spinning=False), big_matmul)
    ref = run(pool.session, x)
    pool.set_threads(2)
    assert pool.session.get_session_options().intra_op_num_threads == 2
    np.testing.assert_allclose(run(pool.session, x), ref, rtol=1e-4, atol=1e-3)
    pool.set_threads(1)
    assert pool.session.get_session_options().intra_op_num_threads == 1
    np.testing.assert_allclose(run(pool.session, x), ref, rtol=1e-4, atol=1e-3)


def test_spinning_off_is_a_session_option(big_matmul):
    so = OrtDevice(spinning=False).session_options(threads=2)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_spin_stop_spins_inside_a_run_only():
    so = OrtDevice(spin_stop=True).session_options(threads=2)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert so.get_session_config_entry("session.force_spinning_stop") == "1"
    plain = OrtDevice().session_options(threads=2)
    with pytest.raises(Exception):  # noqa: B017 - ORT raises a bare RuntimeError for a missing key
        plain.get_session_config_entry("session.force_spinning_stop")
    assert so.intra_op_num_threads == 2
    assert OrtDevice(intra_op_threads=3).session_options().intra_op_num_threads == 3
