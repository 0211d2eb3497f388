"""`mode: auto`: compile() keeps the mode the cost model predicts fastest for the measured
profile, describe() says so, save()/load() keep the verdict, and the output stays the target's."""

import pytest

import mirror_sd.api as api
from mirror_sd.partition import Profile, SpecConfig
from tests.conftest import TORCH_DRAFT_MAP, tiny_pair

TARGET_ONLY_MAP = """
version: 1
devices:
  a: {backend: torch, device: cpu, threads: 1}
placement: {target: a}
"""

FLAT = {1: 1.0, 16: 1.0}  # the target verifies 16 rows for the price of one


def _profile(overlap_slowdown: float) -> Profile:
    """A 6-layer target with a cheap draft and a good exit head at every layer."""
    return Profile(
        num_layers=6,
        t_target=FLAT,
        t_draft={1: 0.05, 16: 0.8},
        accept_rate=0.8,
        hit_rate_by_exit_layer={layer: 0.6 for layer in range(1, 6)},
        overlap_slowdown=overlap_slowdown,
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("models"))


def _compile(folders, f: float, **kw):
    target, draft, _ = folders
    return api.compile(target, draft, TORCH_DRAFT_MAP, mode="auto", max_len=128,
                       profile_data=_profile(f), **kw)  # fmt: skip


@pytest.mark.parametrize(("f", "expected"), [(1.0, "mirror"), (3.0, "speculative")])
def test_auto_keeps_the_predicted_best_mode(folders, f, expected):
    with _compile(folders, f) as plan:
        choice = plan.report.choice
        assert choice.best_mode == expected and plan.spec.mode == expected
        assert f"mode: auto -> {expected}" in api.describe(plan)
        ref = plan.generate("w1 w2 w3", 20, mode="autoregressive")
        res = plan.generate("w1 w2 w3", 20, mode="auto")  # "auto" at call time: the plan's mode
        assert res.tokens == ref.tokens
        assert res.stats.mode == expected


def test_auto_survives_save_and_load(folders, tmp_path):
    with _compile(folders, 3.0) as plan:
        api.save(plan, tmp_path / "plan")
    assert "mode_asked: auto" in (tmp_path / "plan" / "plan.yaml").read_text()
    with api.load(tmp_path / "plan") as again:
        assert again.spec.mode == "speculative"
        assert "mode: auto -> speculative (chosen when it was compiled)" in api.describe(again)


def test_auto_without_a_draft_is_autoregressive(folders):
    target, _, _ = folders
    with api.compile(target, None, TARGET_ONLY_MAP, mode="auto", max_len=128) as plan:
        assert plan.spec.mode == "autoregressive"
        assert "mode: auto -> autoregressive (no draft to run)" in api.describe(plan)


def test_auto_mode_is_a_config_value_not_a_runtime_mode():
    assert SpecConfig(mode="auto").mode == "auto"
    with pytest.raises(
        ValueError, match="expected one of mirror, speculative, autoregressive, auto"
    ):
        SpecConfig(mode="fastest")


ORT_MAP = """
version: 1
devices:
  tgt: {backend: onnxruntime, providers: [CPUExecutionProvider: {}]}
  drf: {backend: onnxruntime, providers: [CPUExecutionProvider: {}]}
placement: {target: tgt, draft: drf}
"""


def test_auto_without_mirror_keeps_the_first_exported_split(folders, tmp_path):
    """ℓe matters only to mirror rounds: when mode auto picks speculative, an exported target
    keeps the split compiled first (no second export) and describe() says which ℓe mirror
    would want; with mode auto picking mirror, the chosen split is exported."""
    target, draft, _ = folders
    prof = Profile(
        num_layers=6, t_target=FLAT, t_draft={1: 0.05, 16: 0.8}, accept_rate=0.8,
        hit_rate_by_exit_layer={1: 0.1, 2: 0.1, 3: 0.1, 4: 0.2, 5: 0.9}, overlap_slowdown=3.0,
    )  # fmt: skip
    onnx = tmp_path / "onnx"
    with api.compile(target, draft, ORT_MAP, mode="auto", max_len=128, profile_data=prof,
                     onnx_dir=onnx) as plan:  # fmt: skip
        assert plan.spec.mode == "speculative"
        kept, best = plan.report.kept_split
        assert plan.target.exit_layer == plan.spec.exit_layer == kept == 3  # 6 layers // 2
        assert best == plan.report.choice.exit_layer != kept
        assert f"kept ℓe={kept}" in api.describe(plan)
        ref = plan.generate("w1 w2 w3", 16, mode="autoregressive").tokens
        assert plan.generate("w1 w2 w3", 16).tokens == ref
    (layers,) = onnx.glob("qwen2-layers-*")  # the per-layer export (graphs.layered)
    ranges = sorted(p.name for p in layers.glob("range-*.onnx"))
    assert ranges == [f"range-0-{kept}-embed.onnx", f"range-{kept}-6.onnx"]  # one split only


def test_mirror_at_another_exit_layer_assembles_the_split_without_torch(
    folders, tmp_path, monkeypatch
):
    """compile() measures on a provisional split; when mirror wants another ℓe, the chosen
    split is spliced from the per-layer export: no second export, no second load of the
    target's weights, and the output stays the target's."""
    import mirror_sd.export_worker as worker
    import mirror_sd.graphs.layered as layered

    target, draft, _ = folders
    prof = Profile(
        num_layers=6, t_target=FLAT, t_draft={1: 0.05, 16: 0.8}, accept_rate=0.8,
        hit_rate_by_exit_layer={1: 0.1, 2: 0.1, 3: 0.1, 4: 0.2, 5: 0.9}, overlap_slowdown=1.0,
    )  # fmt: skip
    loads, exports = [], []
    load, export = worker.load_model, layered._export_parts
    monkeypatch.setattr(worker, "load_model", lambda f, *a: loads.append(str(f)) or load(f, *a))
    monkeypatch.setattr(layered, "_export_parts", lambda *a: exports.append(1) or export(*a))
    with api.compile(target, draft, ORT_MAP, mode="auto", max_len=128, profile_data=prof,
                     onnx_dir=tmp_path / "onnx") as plan:  # fmt: skip
        assert plan.spec.mode == "mirror" and plan.report.kept_split is None
        best = plan.report.choice.exit_layer
        assert plan.target.exit_layer == best != 3
        ref = plan.generate("w1 w2 w3", 16, mode="autoregressive").tokens
        assert plan.generate("w1 w2 w3", 16).tokens == ref
    assert exports == [1]  # the target's layers, once
    assert loads == [str(draft), str(target)]  # the exports; the second split reads none
    (layers,) = (tmp_path / "onnx").glob("qwen2-layers-*")
    names = {p.name for p in layers.glob("range-*.onnx")}
    assert {f"range-0-{best}-embed.onnx", f"range-{best}-6.onnx"} <= names


def test_an_ort_target_is_profiled_with_its_torch_model_freed_and_compiled_again_without_it(
    folders, tmp_path, monkeypatch
):
    """compile()'s peak memory: an exported target's torch model measures the logit lens and
    is freed *before* the target's ONNX Runtime sessions load, so the weights are in memory
    once at a time; the lens agreement it measured is the profile's, unchanged. The lens is
    kept beside the per-layer export: compiling the same target again neither measures it nor
    loads the target's weights (the draft's ONNX is reused too). One export serves both."""
    import gc
    import weakref

    import mirror_sd.backends.ort as builders
    import mirror_sd.export_worker as worker
    from mirror_sd.devices.ort_split import OrtSplitRunner
    from mirror_sd.runtime.profiling import CALIBRATION_TEXT, agreement_by_layer, lens_layers

    target, draft, _ = folders
    onnx = tmp_path / "onnx"
    loaded, alive_at_open = [], []
    load = worker.load_model

    def recording_load(folder, *args, **kw):
        model = load(folder, *args, **kw)
        loaded.append((str(folder), weakref.ref(model)))
        return model

    opened = OrtSplitRunner.from_graphs.__func__

    def checking_open(cls, *args, **kw):
        gc.collect()
        alive_at_open.append([f for f, ref in loaded if ref() is not None and f == str(target)])
        return opened(cls, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(worker, "load_model", recording_load)
        m.setattr(builders, "load_model", recording_load)
        m.setattr(OrtSplitRunner, "from_graphs", classmethod(checking_open))
        with api.compile(target, draft, ORT_MAP, mode="auto", max_len=128, onnx_dir=onnx) as plan:
            assert alive_at_open == [[]]  # one split opened, no torch copy of the target left
            lens = plan.report.profile.hit_rate_by_exit_layer
            ref = plan.generate("w1 w2 w3", 16, mode="autoregressive").tokens
            assert plan.generate("w1 w2 w3", 16).tokens == ref
    model = load(target, "float32")
    ids = plan.tokenizer(CALIBRATION_TEXT)["input_ids"]
    assert lens == agreement_by_layer(model, ids, list(lens_layers(model.num_layers)))
    assert len(list(onnx.glob("qwen2-layers-*/lens-*.json"))) == 1

    loads = []
    for module in (worker, builders):
        monkeypatch.setattr(module, "load_model", lambda f, *a, **k: loads.append(f) or 1 / 0)
    with api.compile(target, draft, ORT_MAP, mode="auto", max_len=128, onnx_dir=onnx) as plan:
        assert plan.report.profile.hit_rate_by_exit_layer == lens
        ref = plan.generate("w1 w2 w3", 12, mode="autoregressive").tokens
        assert plan.generate("w1 w2 w3", 12).tokens == ref
    assert loads == []


def test_large_models_export_in_a_worker_process(folders, tmp_path, monkeypatch):
    """Above export_worker.ISOLATE_BYTES the exports and the lens run in a fresh interpreter
    (`python -m mirror_sd.export_worker`): this process loads no torch model, and the plan
    decodes exactly as one exported in-process does."""
    import mirror_sd.backends.ort as builders
    import mirror_sd.export_worker as worker

    target, draft, _ = folders
    monkeypatch.setattr(worker, "ISOLATE_BYTES", 0)
    loads = []
    for module in (worker, builders):
        monkeypatch.setattr(module, "load_model", lambda f, *a, **k: loads.append(f) or 1 / 0)
    with api.compile(target, draft, ORT_MAP, mode="auto", max_len=128,
                     onnx_dir=tmp_path / "onnx") as plan:  # fmt: skip
        assert plan.report.profile.hit_rate_by_exit_layer  # measured in the worker
        ref = plan.generate("w1 w2 w3", 12, mode="autoregressive").tokens
        assert plan.generate("w1 w2 w3", 12).tokens == ref
    assert loads == []


def test_a_failing_export_worker_says_why(tmp_path):
    """A user error in the worker (a folder without weights) comes back as its builtin class
    with its message, which the CLI prints as one line; a crash quotes the worker's stderr."""
    import mirror_sd.export_worker as worker
    from tests.conftest import make_tiny, save_tiny

    for f in save_tiny(make_tiny("qwen2"), tmp_path / "m").glob("*.safetensors"):
        f.unlink()  # a config, no weights
    with pytest.raises(FileNotFoundError, match=r"m has no \*\.safetensors weights"):
        worker._in_worker("draft", {"folder": str(tmp_path / "m"), "onnx_dir": str(tmp_path),
                                    "quantize": None})  # fmt: skip
    with pytest.raises(worker.ExportWorkerError, match="TypeError"):  # a bad job: a bug
        worker._in_worker("draft", {"folder": str(tmp_path / "m"), "onnx_dir": str(tmp_path)})


def test_tree_siblings_auto_sizes_the_tree_from_the_profile(folders, tmp_path):
    """With a flat block cost and measured sibling coverage the cost model grows a tree for
    speculative rounds, shallow depths first; describe() says why; the output is the target's,
    a call's `tree_siblings="auto"` runs the compiled shape, and save()/load() keep it."""
    target, draft, _ = folders
    prof = Profile(
        num_layers=6, t_target={1: 1.0, 16: 1.1}, t_draft={1: 0.05, 16: 0.8}, accept_rate=0.5,
        hit_rate_by_exit_layer={layer: 0.6 for layer in range(1, 6)}, overlap_slowdown=3.0,
        sibling_coverage=(0.4, 0.55, 0.6, 0.62),
    )  # fmt: skip
    with api.compile(target, draft, TORCH_DRAFT_MAP, mode="speculative", tree_siblings="auto",
                     max_len=128, profile_data=prof) as plan:  # fmt: skip
        shape = plan.spec.tree_siblings
        assert isinstance(shape, tuple) and shape[0] > 0 and list(shape) == sorted(shape)[::-1]
        assert plan.auto_tree == shape and "(what tree_siblings: auto runs): [" in api.describe(
            plan
        )
        ref = plan.generate("w1 w2 w3", 20, mode="autoregressive").tokens
        assert plan.generate("w1 w2 w3", 20).tokens == ref
        assert plan.generate("w1 w2 w3", 20, tree_siblings="auto").tokens == ref
        api.save(plan, tmp_path / "plan")
    with api.load(tmp_path / "plan") as again:
        assert again.spec.tree_siblings == shape and again.auto_tree == shape
    with api.compile(target, draft, TORCH_DRAFT_MAP, mode="mirror", tree_siblings="auto",
                     max_len=128, profile_data=prof) as plan:  # fmt: skip
        assert plan.spec.tree_siblings == 0  # mirror rounds verify chains
    int8_target = TORCH_DRAFT_MAP.replace("threads: 1}", "threads: 1, quantize: int8}")
    with api.compile(target, draft, int8_target, mode="speculative", tree_siblings="auto",
                     max_len=128, profile_data=prof) as plan:  # fmt: skip
        assert plan.spec.tree_siblings == 0 and plan.auto_tree is None  # trees would round
        assert "token tree: none (tree_siblings: auto runs a chain) because the target runs " \
               "int8 on torch" in api.describe(plan)  # fmt: skip


def test_compile_measures_acceptance_on_the_target_s_own_answer(folders):
    """compile() reads α off the target's greedy answer to ACCEPTANCE_PROMPT and replays the
    draft-free retrieval source over the same answer: both are in the profile."""
    from mirror_sd.runtime.profiling import (
        ACCEPTANCE_PROMPT,
        ACCEPTANCE_TOKENS,
        AUTO_RETRIEVAL,
        answer_agreement,
    )
    from mirror_sd.runtime.prompts import encode_prompt

    target, draft, _ = folders
    with api.compile(target, draft, TORCH_DRAFT_MAP, mode="auto", max_len=128) as plan:
        prof, choice = plan.report.profile, plan.report.choice
        assert prof.retrieval_source == AUTO_RETRIEVAL == choice.retrieval_source
        assert sum(n for _, n in prof.retrieval_rounds) == ACCEPTANCE_TOKENS
        ids = encode_prompt(plan.tokenizer, ACCEPTANCE_PROMPT)
        assert prof.accept_rate == answer_agreement(plan.target, plan.draft, ids)[0]
        assert choice.speedup_retrieval == prof.retrieval_speedup() > 0


def test_auto_can_pick_the_retrieval_source_alone(folders, tmp_path):
    """When the replayed retrieval rounds are predicted fastest, the plan runs speculative
    rounds from that source with the draft idle; describe() says so, save()/load() keep it,
    a call that names a mode runs the draft, and the output stays the target's."""
    target, draft, _ = folders
    prof = Profile(
        num_layers=6, t_target={1: 1.0, 16: 1.0}, t_draft={1: 0.5, 16: 8.0}, accept_rate=0.1,
        overlap_slowdown=3.0, retrieval_source="sam", retrieval_rounds=((5, 5), (5, 4), (1, 1)),
    )  # fmt: skip
    with api.compile(target, draft, TORCH_DRAFT_MAP, mode="auto", max_len=128,
                     profile_data=prof) as plan:  # fmt: skip
        assert plan.report.choice.best_candidate == "retrieval"
        assert (plan.spec.mode, plan.spec.retrieval, plan.spec.model_draft) == (
            "speculative", "sam", False,
        )  # fmt: skip
        assert "mode: auto -> speculative with sam alone, the draft idle" in api.describe(plan)
        _alone_then_draft(plan)
        api.save(plan, tmp_path / "plan")
    with api.load(tmp_path / "plan") as again:
        assert (again.spec.retrieval, again.spec.model_draft) == ("sam", False)
        assert again.report.auto_alone == "sam"
        _alone_then_draft(again)


def _alone_then_draft(plan) -> None:
    """The plan's own mode (no mode, or "auto") proposes from sam alone; mode="speculative"
    and "mirror" run the draft; every output is the target's."""
    # its batches are priced by sam's rounds (t_T flat: B = 2 pays), a call with the draft
    # runs its own settings at every batch size
    assert plan.batch_policy[1].reason.startswith("sam alone predicted")
    assert plan.settings(plan.spec).by_batch == plan.batch_policy
    assert plan.settings(plan.spec.with_(model_draft=True)).by_batch == ()
    prompt = "w1 w2 w3 w1 w2 w3 w1 w2"
    ref = plan.generate(prompt, 20, mode="autoregressive").tokens
    for kw in ({}, {"mode": "auto"}):
        res = plan.generate(prompt, 20, **kw)
        assert res.tokens == ref and res.stats.mode == "speculative"
        assert res.stats.draft_device is None and "draft" not in res.stats.tokens_by_source
    for mode in ("speculative", "mirror"):
        res = plan.generate(prompt, 20, mode=mode)
        assert res.tokens == ref and res.stats.draft_device is not None, mode
