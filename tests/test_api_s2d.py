"""`speculation.draft_exits` through compile(): a torch draft gets S2D's sorted exits, the plan
stays lossless, a saved plan keeps them, and maps that cannot run them are refused early."""

import pytest

import mirror_sd.api as api
from mirror_sd.devices.sorted_exits import SortedExitRunner
from mirror_sd.partition import DeviceMapError
from mirror_sd.partition.spec_config import EXIT_THRESHOLDS
from tests.conftest import TORCH_DRAFT_MAP, make_tiny, save_tiny_with_tokenizer, tiny_pair


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    target, _, _ = tiny_pair(root)
    deep = make_tiny("qwen2", seed=1, num_hidden_layers=8)  # exits at layers 2 and 4
    return target, save_tiny_with_tokenizer(deep, root / "deep"), root


def test_compiled_exits_are_lossless_and_saved(folders, tmp_path):
    target, draft, root = folders
    with api.compile(target, draft, TORCH_DRAFT_MAP, max_len=128, exit_layer=3, branch_budget=4,
                     mode="speculative", draft_exits="lens", draft_exit_threshold=0.0) as p:  # fmt: skip
        assert isinstance(p.draft, SortedExitRunner)
        assert "sorted exits at 2, 4" in p.draft.name
        for prompt in ("w3 w4", "w1 w2 w5 w1"):
            ref = p.generate(prompt, 12, mode="autoregressive").tokens
            assert p.generate(prompt, 12).tokens == ref
            assert p.generate(prompt, 12, mode="mirror").tokens == ref
        assert p.draft.exits[2] > 0
        said = api.describe(p)
        assert "draft exits (S2D): layers 2, 4 of 8 (logit lens)" in said
        assert "stopped early" in said
        api.save(p, tmp_path / "plan")
    with api.load(tmp_path / "plan") as again:
        assert isinstance(again.draft, SortedExitRunner) and again.spec.draft_exits == "lens"


def test_auto_threshold_is_measured_by_compile_and_kept(folders, tmp_path):
    """`draft_exit_threshold: auto` (the default): compile times each of EXIT_THRESHOLDS and
    keeps the fastest; the plan stays lossless, a call's 'auto' means the plan's own, and a
    saved plan keeps the number without measuring again."""
    target, draft, root = folders
    with api.compile(target, draft, TORCH_DRAFT_MAP, max_len=128, exit_layer=3, branch_budget=4,
                     mode="speculative", draft_exits="lens") as p:  # fmt: skip
        rates = p.report.exit_thresholds
        assert tuple(rates) == EXIT_THRESHOLDS and all(v > 0 for v in rates.values())
        assert p.spec.draft_exit_threshold == max(rates, key=rates.get)
        assert p.draft.threshold == p.spec.draft_exit_threshold
        assert "chosen by compile, tokens/s per threshold: 0.5: " in api.describe(p)
        ref = p.generate("w3 w4", 12, mode="autoregressive").tokens
        assert p.generate("w3 w4", 12, draft_exit_threshold="auto").tokens == ref
        assert p.draft.threshold == p.spec.draft_exit_threshold
        api.save(p, tmp_path / "plan")
    with api.load(tmp_path / "plan") as again:
        assert again.spec.draft_exit_threshold == p.spec.draft_exit_threshold
        assert again.report.exit_thresholds is None  # not measured again


def test_maps_that_cannot_run_exits_are_refused_naming_the_key(folders, tmp_path):
    target, draft, root = folders
    with pytest.raises(DeviceMapError, match="backend: torch") as e:  # the default map: ORT
        api.compile(target, draft, onnx_dir=root / "onnx", max_len=128, draft_exits="lens")
    assert "speculation.draft_exits" in str(e.value)
    with pytest.raises(DeviceMapError, match="mirror-sd train exit-head"):
        api.compile(target, draft, TORCH_DRAFT_MAP, max_len=128, draft_exits="trained",
                    cache=tmp_path / "cache")  # fmt: skip
    with pytest.raises(ValueError, match="draft_exits 'middle'"):
        api.compile(target, draft, TORCH_DRAFT_MAP, max_len=128, draft_exits="middle")
    with pytest.raises(ValueError, match="probability in"):
        api.compile(target, draft, TORCH_DRAFT_MAP, max_len=128, draft_exits="lens",
                    draft_exit_threshold=1.5)  # fmt: skip
