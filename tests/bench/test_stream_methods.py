"""The benchmark's methods that need a compiled feature: `+streams` a plan compiled with
stream rows, `+amphista` one compiled with Amphista heads; every other plan method runs such
a plan without them (one draft token per forward; no head blocks)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mirror_sd.bench.methods import PlanMethod, parse_methods
from mirror_sd.partition.spec_config import SpecConfig


def _plan(streams: str):
    return SimpleNamespace(spec=SpecConfig(draft_streams=streams))


def test_stream_methods_parse_and_need_stream_rows():
    assert parse_methods("speculative+streams,mirror+streams") == (
        "speculative+streams", "mirror+streams",
    )  # fmt: skip
    with pytest.raises(ValueError, match="--set draft_streams=trained"):
        PlanMethod("speculative+streams", _plan("none"), [])


def test_other_methods_turn_a_plans_streams_off():
    with_rows = _plan("trained")
    assert PlanMethod("speculative+streams", with_rows, []).settings == {"mode": "speculative"}
    assert PlanMethod("speculative", with_rows, []).settings["draft_streams"] == "none"
    assert PlanMethod("speculative+conf+sam", with_rows, []).settings["draft_streams"] == "none"
    assert "draft_streams" not in PlanMethod("speculative", _plan("none"), []).settings


def test_head_methods_need_heads_and_others_turn_them_off():
    with pytest.raises(ValueError, match="--set amphista=trained"):
        PlanMethod("speculative+amphista", _plan("none"), [])
    heads = SimpleNamespace(spec=SpecConfig(amphista="trained"))
    alone = PlanMethod("speculative+amphista", heads, [])
    assert alone.settings == {"mode": "speculative", "model_draft": False}
    assert PlanMethod("mirror+amphista", heads, []).settings == {"mode": "mirror"}
    assert PlanMethod("speculative", heads, []).settings["amphista"] == "none"
    assert parse_methods("speculative+amphista+tree") == ("speculative+amphista+tree",)


def test_tree_method_asks_for_sibling_leaves():
    method = PlanMethod("speculative+tree", _plan("none"), [])
    assert method.settings == {"mode": "speculative", "tree_siblings": 2}
    plan = _plan("none")
    with pytest.raises(ValueError, match="tree_siblings=auto"):
        PlanMethod("speculative+tree-auto", plan, [])  # compiled without a profile
    plan.auto_tree = (2, 1, 0, 0)  # a Plan derives it from its compile report
    sized = PlanMethod("speculative+tree-auto", plan, [])
    assert sized.settings == {"mode": "speculative", "tree_siblings": "auto"}


def test_a_peer_with_its_own_conversion_is_another_model_not_a_failure():
    from mirror_sd.bench.runner import _verdict

    m = {"near_tie": False, "margin": 0.5}
    dtypes = ("onnxruntime int4", "transformers float32")
    assert "another model" in _verdict({"method": "ov-ar"}, "ar", m, dtypes)
    assert "another model" in _verdict({"method": "llama-sd"}, "ar", m, dtypes)
    assert "investigate" in _verdict({"method": "speculative"}, "ar", m, dtypes)
