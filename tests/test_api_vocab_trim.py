"""compile() with `draft_vocab_size` (VocabTrim draft) and an int4 draft, end to end on tiny
models: lossless in every mode, the trim in describe(), kept by save() / load()."""

from __future__ import annotations

import pytest
import yaml

import mirror_sd.api as api
from mirror_sd.devices.torch_device import TorchRunner
from mirror_sd.devices.trimmed import TrimmedVocabRunner
from mirror_sd.graphs.vocab_trim import VocabTrim
from mirror_sd.training import vocab
from tests.conftest import TORCH_DRAFT_MAP, tiny_pair
from tests.training.test_vocab import fake_corpus

V = 97
ORT_DRAFT_MAP = """
version: 1
devices:
  a: {backend: torch, device: cpu, threads: 1}
  b: {backend: onnxruntime, providers: [CPUExecutionProvider: {}], intra_op_threads: 1, quantize: %s}
placement: {target: a, draft: b}
"""
FIXED = dict(exit_layer=3, branch_budget=4, max_len=256)  # no profiling: faster


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("trim")
    return tiny_pair(root)


@pytest.fixture(scope="module", autouse=True)
def random_corpus():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vocab, "build_corpus", fake_corpus)
        yield


@pytest.fixture(scope="module")
def plan(folders):
    target, draft, root = folders
    with api.compile(target, draft, ORT_DRAFT_MAP % "none", cache=root, onnx_dir=root / "onnx",
                     draft_vocab_size=24, **FIXED) as p:  # fmt: skip
        yield p


def _lossless(p, prompt="w1 w2 w3 w4 w5", n=20):
    ref = p.generate(prompt, n, mode="autoregressive").tokens
    for mode in ("speculative", "mirror"):
        res = p.generate(prompt, n, mode=mode)
        assert res.tokens == ref, mode
        assert res.stats.fallback is None and res.stats.tokens_by_source.get("target", 0) < n


def test_trimmed_draft_in_a_compiled_plan_is_lossless(plan):
    trim = plan.report.draft_trim
    assert isinstance(plan.draft, TrimmedVocabRunner) and plan.draft.trim is trim
    assert plan.spec.draft_vocab_size == trim.size == 24 and plan.draft.vocab_size == V
    assert 1 in trim.keep  # the tokenizer's EOS (<|end|>) is always kept
    assert "-v24-" in plan.report.onnx
    _lossless(plan)


def test_describe_mentions_the_trim(plan):
    text = api.describe(plan)
    assert "draft vocabulary: VocabTrim, 24 of 97 tokens" in text
    assert f"{plan.report.draft_trim_coverage:.1%} of the target's calibration tokens" in text


def test_save_load_keeps_the_trim_without_recalibrating(plan, tmp_path, monkeypatch):
    api.save(plan, tmp_path / "plan")
    assert VocabTrim.load(tmp_path / "plan" / "vocab_trim.json") == plan.report.draft_trim
    doc = yaml.safe_load((tmp_path / "plan" / "plan.yaml").read_text())
    assert doc["draft_vocab_trim"]["file"] == "vocab_trim.json"
    monkeypatch.setattr(vocab, "vocab_counts", lambda *a, **k: pytest.fail("recalibrated"))
    with api.load(tmp_path / "plan") as again:
        assert again.report.draft_trim == plan.report.draft_trim
        assert again.report.draft_trim_coverage == plan.report.draft_trim_coverage
        assert again.spec == plan.spec
        assert again.generate([5, 6, 7], 12).tokens == plan.generate([5, 6, 7], 12).tokens


def test_torch_draft_is_trimmed_too(folders):
    target, draft, root = folders
    with api.compile(target, draft, TORCH_DRAFT_MAP, cache=root, draft_vocab_size=16,
                     **FIXED) as p:  # fmt: skip
        assert isinstance(p.draft, TrimmedVocabRunner) and isinstance(p.draft.runner, TorchRunner)
        assert p.draft.runner.model.lm_head.out_features == 16
        _lossless(p, "w9 w8 w7")


def test_int4_draft_in_a_compiled_plan_is_lossless(folders):
    target, draft, root = folders
    with api.compile(target, draft, ORT_DRAFT_MAP % "int4", cache=root,
                     onnx_dir=root / "onnx", **FIXED) as p:  # fmt: skip
        assert "-int4-" in p.report.onnx and not isinstance(p.draft, TrimmedVocabRunner)
        _lossless(p, "w4 w2")


def test_bad_sizes_are_clear_errors(folders, tmp_path):
    target, draft, root = folders
    with pytest.raises(ValueError, match=r"vocab_size 500 is outside \[1, 97\]"):
        api.compile(target, draft, TORCH_DRAFT_MAP, cache=root, draft_vocab_size=500, **FIXED)
    wrong = VocabTrim(tuple(range(10)), V).save(tmp_path / "t.json")
    with pytest.raises(ValueError, match="draft_trim keeps 10 of 97 tokens.*draft_vocab_size 12"):
        api.compile(target, draft, TORCH_DRAFT_MAP, cache=root, draft_trim=wrong,
                    draft_vocab_size=12, **FIXED)  # fmt: skip
