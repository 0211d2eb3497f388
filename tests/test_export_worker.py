"""The export worker's jobs quantize with the torch model already freed (the fp32 weights and
the quantizer's copy never share the memory) and keep only the quantized files they made."""

from __future__ import annotations

import gc
import weakref

import pytest

import mirror_sd.export_worker as worker
import mirror_sd.graphs.onnx_quant as onnx_quant
from tests.conftest import make_tiny, save_tiny


@pytest.mark.parametrize("job", ["draft", "target"])
def test_a_quantizing_job_frees_the_torch_model_first(job, tmp_path, monkeypatch):
    folder = save_tiny(make_tiny("qwen2", num_hidden_layers=4), tmp_path / "m")
    loaded, alive = [], []
    load = worker.load_model

    def recording_load(*a, **k):
        model = load(*a, **k)
        loaded.append(weakref.ref(model))
        return model

    quantize = onnx_quant.quantize_weights

    def checking_quantize(*a, **k):
        gc.collect()
        alive.append(any(ref() is not None for ref in loaded))
        return quantize(*a, **k)

    monkeypatch.setattr(worker, "load_model", recording_load)
    # every quantizing path (quantize_model, quantize_int8/int4) calls it through this module
    monkeypatch.setattr(onnx_quant, "quantize_weights", checking_quantize)
    onnx = tmp_path / "onnx"
    if job == "draft":
        out = worker.export_draft(str(folder), str(onnx), "int8")
        assert "-int8-" in out["path"]
        # the fp32 whole-model export the quantizer read is gone (disk), the int8 one stays
        names = [p.name for p in onnx.glob("qwen2-0-4-*")]
        assert len(names) == 1 and names[0].startswith("qwen2-0-4-int8-"), names
    else:
        out = worker.export_target(str(folder), str(onnx), 2, "int4", lens_ids=[1, 2, 3, 4])
        assert len(out["graphs"]) == 3 and out["lens"]
    assert alive and not any(alive)  # every quantizer call ran with no torch model left
