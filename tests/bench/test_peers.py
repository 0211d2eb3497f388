"""OpenVINO GenAI peers (bench/peers.py, bench/ov_convert.py): method names, the missing-extra
error, the IR cache key, and a real run on smollm2-135m (skipped without openvino-genai / the
converter)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from types import SimpleNamespace

import pytest

from mirror_sd.bench import cli as bench_cli
from mirror_sd.bench import ov_convert, peers, report
from mirror_sd.bench.methods import (
    ALL_METHODS,
    KNOWN_METHODS,
    SELECTABLE_METHODS,
    first_difference,
    parse_methods,
    target_margin,
)
from tests.conftest import TORCH_DRAFT_MAP

HAVE_GENAI = importlib.util.find_spec("openvino_genai") is not None
needs_genai = pytest.mark.skipif(
    not HAVE_GENAI, reason="openvino-genai is not installed: pip install -e '.[peers]'"
)


@pytest.fixture
def no_genai(monkeypatch):
    """`import openvino_genai` raises ImportError, as where the extra is not installed."""
    monkeypatch.setitem(sys.modules, "openvino_genai", None)


# --- names and the registry ------------------------------------------------------------------


def test_peer_methods_parse_and_unknown_names_still_fail():
    assert parse_methods("ar,speculative,ov-ar,ov-sd,ov-pld") == (
        "ar", "speculative", "ov-ar", "ov-sd", "ov-pld",
    )  # fmt: skip
    assert set(peers.PEER_METHODS) <= set(SELECTABLE_METHODS)
    assert parse_methods("ov-ar@f32,ov-sd@bf16,llama-ar") == ("ov-ar@f32", "ov-sd@bf16", "llama-ar")
    for bad in ("ov-ar@f64", "llama-ar@f32", "ar@f32"):
        with pytest.raises(ValueError, match="unknown method"):
            parse_methods(bad)
    # the base install's set (what the tiny-model bench runs) and the default set hold no peer
    assert not set(peers.PEER_METHODS) & (set(KNOWN_METHODS) | set(ALL_METHODS))
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['ov-xx'\].*ov-pld"):
        parse_methods("ar,ov-xx")


def test_missing_openvino_genai_fails_early_naming_the_extra(no_genai):
    with pytest.raises(peers.PeersUnavailableError, match=r"ov-sd.*\.\[peers\]"):
        peers.check_available(["ar", "ov-sd"])
    assert isinstance(peers.PeersUnavailableError("x"), ValueError)
    with pytest.raises(peers.PeersUnavailableError, match=r"ov-ar@f32.*\.\[peers\]"):
        peers.check_available(["ov-ar@f32"])
    peers.check_available(["ar", "hf-ar", "mirror"])  # no peer chosen: nothing to check


def test_cli_without_openvino_genai_exits_with_a_message_before_compiling(no_genai):
    # the target does not exist: reaching compile() would fail differently
    with pytest.raises(SystemExit) as exc:
        bench_cli.main(["--target", "/no/such/model", "--methods", "ar,ov-ar", "--quiet"])
    msg = str(exc.value.code)
    assert "ov-ar" in msg and "'.[peers]'" in msg and "/no/such/model" not in msg


def test_runner_checks_before_compiling(no_genai, tmp_path):
    from mirror_sd.bench.runner import BenchConfig, run_bench

    cfg = BenchConfig(target="/no/such/model", draft=None, methods=("ov-pld",), out=tmp_path)
    with pytest.raises(peers.PeersUnavailableError, match="ov-pld"):
        run_bench(cfg)


# --- formats and the IR cache --------------------------------------------------------------------


def _hf_folder(path, hidden=8):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"hidden_size": hidden}))
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    return path


def test_ir_cache_key_follows_the_source_and_the_format(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRROR_SD_CACHE", str(tmp_path / "cache"))
    a = _hf_folder(tmp_path / "a")
    key = ov_convert.ir_key(a, "fp32")
    assert key == ov_convert.ir_key(a, "fp32")  # stable: a second run finds the same entry
    assert key != ov_convert.ir_key(a, "int8") != ov_convert.ir_key(a, "int4")
    assert key != ov_convert.ir_key(_hf_folder(tmp_path / "b"), "fp32")  # another folder
    folder = ov_convert.ir_dir(a, "int8")
    assert folder.parent == tmp_path / "cache" / "peers" / "ir"
    assert folder.name == f"a-int8-{ov_convert.ir_key(a, 'int8')}"
    (a / "config.json").write_text(json.dumps({"hidden_size": 16}))  # the weights changed
    assert ov_convert.ir_key(a, "fp32") != key
    with pytest.raises(ValueError, match="weight format"):
        ov_convert.ir_key(a, "fp16")


def test_a_converted_folder_is_reused_without_running_the_converter(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRROR_SD_CACHE", str(tmp_path / "cache"))
    src = _hf_folder(tmp_path / "m")
    out = ov_convert.ir_dir(src, "fp32")
    out.mkdir(parents=True)
    for f in ov_convert.IR_FILES:
        (out / f).write_text("<net/>")
    assert not ov_convert.is_converted(out)  # no marker yet: an interrupted conversion
    (out / ov_convert.IR_MARKER).write_text("{}")

    def boom(*a, **k):
        raise AssertionError("the converter ran although the IR is cached")

    monkeypatch.setattr(ov_convert, "ensure_converter", boom)
    assert ov_convert.convert(src, "fp32") == out


def test_weight_formats_follow_the_plan_devices():
    def plan(target_q, draft_q):
        dm = {
            "devices": {"t": {"quantize": target_q} if target_q else {}, "d": {"quantize": draft_q}}
        }
        return SimpleNamespace(report=SimpleNamespace(device_map=dm), target_device=SimpleNamespace(alias="t"),
                               draft_device=SimpleNamespace(alias="d"))  # fmt: skip

    assert ov_convert.plan_formats(plan(None, "int8")) == ("fp32", "int8")
    assert ov_convert.plan_formats(plan("none", "none")) == ("fp32", "fp32")
    assert ov_convert.plan_formats(plan("int4", "int4")) == ("int4", "int4")
    assert ov_convert.plan_formats(plan("int8-rows", "int4")) == ("int8", "int4")
    assert ov_convert.plan_formats(plan("int8", None)) == ("int8", ov_convert.DRAFT_FORMAT)
    with pytest.raises(ValueError, match="int2"):
        ov_convert.quantize_to_format("int2", "fp32")


def test_converter_pins_keep_the_project_torch():
    import torch

    assert ov_convert.converter_pins()["torch"] == torch.__version__.split("+")[0]


def test_report_treats_peers_as_baselines():
    rec = {"question_id": 1, "task": "qa", "tokens_per_s": 2.0, "new_tokens": 4, "wall_time": 2.0,
           "accept_lengths": None, "drafted": None, "round_hits": None, "exposed_draft_s": None}  # fmt: skip
    names = ["hf-ar", "ar", "ov-ar", "llama-ar"]
    agg = report.aggregate([{**rec, "method": m} for m in names], names)
    assert agg["ov-ar"]["overall"]["whole_machine_speedup_vs_hf_ar"] == 1.0
    assert "heterogeneous_speedup_vs_ar" not in agg["ov-ar"]["overall"]
    assert "heterogeneous_speedup_vs_ar" not in agg["llama-ar"]["overall"]
    assert set(agg["ar"]["overall"]["vs"]) == {"hf-ar", "ov-ar", "llama-ar"}


# --- the generation config -----------------------------------------------------------------------


@needs_genai
def test_generation_config_honours_the_eos_policy():
    m = object.__new__(peers.OVMethod)  # no pipeline: only the config is built
    m._genai = peers.import_genai()
    m.name, m.gamma, m.eos = "ov-sd", 5, []
    m.base = "ov-sd"
    cfg = m.config(16)
    assert cfg.ignore_eos and cfg.max_new_tokens == 16
    assert cfg.min_new_tokens == 0  # it would mask EOS's logit: not the same greedy choice
    assert not cfg.do_sample and cfg.num_assistant_tokens == 5 and not cfg.stop_token_ids
    m.name, m.base, m.eos = "ov-pld", "ov-pld", [2, 7]
    cfg = m.config(16)
    assert not cfg.ignore_eos and cfg.stop_token_ids == {2, 7} and cfg.eos_token_id == 2
    assert cfg.num_assistant_tokens == peers.PLD_ASSISTANT_TOKENS
    assert cfg.max_ngram_size == peers.PLD_MAX_NGRAM


# --- a real run ----------------------------------------------------------------------------------

N_NEW = 24
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2_peers():
    """smollm2-135m as target and draft (torch on both sides) and the four ov-* peers at
    OpenVINO's defaults, plus ov-ar pinned to f32; skipped
    where openvino-genai or the optimum-intel converter (a venv under the cache) is missing."""
    if not HAVE_GENAI:
        pytest.skip("openvino-genai is not installed: pip install -e '.[peers]'")
    import mirror_sd.api as api
    from mirror_sd.graphs import zoo

    folder = zoo.resolve_model("smollm2-135m")
    with api.compile(folder, folder, TORCH_DRAFT_MAP, exit_layer=22, exit_top_k=4,
                     branch_budget=4, max_len=512) as plan:  # fmt: skip
        try:
            names = peers.expand_methods(peers.OV_METHODS, ("defaults", "f32"), "f32")
            # the pipelines the tests run (each loads in ~5 s): not ov-sd@f32 / ov-pld@f32
            used = [n for n in names if "@" not in n or n == "ov-ar@f32"]
            methods = peers.build_peer_methods(used, plan, [], threads=os.cpu_count())
        except peers.PeersUnavailableError as e:  # e.g. no package index for the converter
            pytest.skip(f"OpenVINO peers unavailable: {e}")
        yield plan, methods


@pytest.mark.real_model
@pytest.mark.slow
def test_ov_ar_equals_our_greedy_target_on_smollm2(smollm2_peers):
    from mirror_sd.runtime.prompts import encode_prompt

    plan, methods = smollm2_peers
    ids = encode_prompt(plan.tokenizer, PROMPT, chat=True)
    ours = plan.generate(ids, N_NEW, eos_token_id=[], mode="autoregressive").tokens
    out = methods["ov-ar@f32"].generate(ids, N_NEW)  # our precision: our target's tokens
    assert len(ours) == N_NEW and len(out.tokens) == N_NEW  # EOS disabled: exactly N_NEW
    pos = first_difference(out.tokens, ours)
    if pos is not None:  # only a near-tie of our target may explain a different token
        m = target_margin(plan, ids, ours[:pos])
        assert m["near_tie"], f"ov-ar differs at {pos} and it is not a near-tie: {m}"
    d = methods["ov-ar@f32"].describe()
    assert "INFERENCE_PRECISION_HINT=f32" in d["runs"] and "KV_CACHE_PRECISION=f32" in d["runs"]
    assert "target fp32" in d["runs"] and "INFERENCE_NUM_THREADS" in d["threads"]
    defaults = methods["ov-ar"].describe()["runs"]
    assert "INFERENCE_PRECISION_HINT" not in defaults and "default numerics" in defaults


@pytest.mark.real_model
@pytest.mark.slow
def test_ov_sd_and_ov_pld_report_the_tokens_they_generated(smollm2_peers):
    from mirror_sd.runtime.prompts import encode_prompt

    plan, methods = smollm2_peers
    ids = encode_prompt(plan.tokenizer, PROMPT, chat=True)
    vocab = len(plan.tokenizer)
    for name in ("ov-sd", "ov-sd+conf", "ov-pld"):
        out = methods[name].generate(ids, N_NEW)
        assert 0 < len(out.tokens) <= N_NEW, name
        assert all(isinstance(t, int) and 0 <= t < vocab for t in out.tokens), name
        assert out.tokens[: len(ids)] != ids or len(ids) > len(out.tokens)  # no echoed prompt
        assert out.wall_s > 0
    sd = methods["ov-sd"].describe()["runs"]
    # the draft IR's weights match the plan's draft: a torch fp32 draft here (`plan_formats`)
    assert f"num_assistant_tokens={plan.spec.num_draft_tokens}" in sd and "draft fp32" in sd
    conf = methods["ov-sd+conf"].describe()["runs"]
    assert f"assistant_confidence_threshold={peers.PEER_CONFIDENCE}" in conf
    pld = methods["ov-pld"].describe()["runs"]
    assert f"max_ngram_size={peers.PLD_MAX_NGRAM}" in pld


@pytest.mark.real_model
@pytest.mark.slow
def test_with_eos_the_peers_stop_and_count_what_they_generated(smollm2_peers):
    """smollm2 answers PROMPT in a few tokens and an EOS: with EOS on, the peer stops there
    and Output.tokens holds exactly the tokens up to it (as our target's own run)."""
    from mirror_sd.runtime.prompts import encode_prompt

    plan, methods = smollm2_peers
    ids = encode_prompt(plan.tokenizer, PROMPT, chat=True)
    eos = [plan.tokenizer.eos_token_id]
    ours = plan.generate(ids, N_NEW, eos_token_id=eos, mode="autoregressive").tokens
    assert len(ours) < N_NEW and ours[-1] in eos  # the premise: an early EOS
    ar = methods["ov-ar"]
    stop = peers.OVMethod("ov-sd@f32", ov_convert.convert(plan.report.target, "fp32"), eos,
                          plan.spec.num_draft_tokens, ar.properties["INFERENCE_NUM_THREADS"],
                          draft_ir=ov_convert.convert(plan.report.draft, "int8"))  # fmt: skip
    out = stop.generate(ids, N_NEW)
    assert out.tokens[-1] in eos and len(out.tokens) < N_NEW
    assert out.tokens == ours  # draft = target's own weights (int8): greedy output unchanged


def test_residency_keeps_peers_loaded_only_while_they_fit():
    assert peers.residency("all", 100.0, 1.0) and not peers.residency("one", 0.1, 100.0)
    share = peers.RESIDENT_SHARE
    assert peers.residency("auto", share * 20 - 0.1, 20.0)
    assert not peers.residency("auto", share * 20 + 0.1, 20.0)
    assert peers.residency("auto", 1e6, None)  # memory unknown (not Linux): stay
    with pytest.raises(ValueError, match="residency 'some'"):
        peers.residency("some", 1.0, 1.0)


def test_weights_gib_sums_the_ir_weight_files(tmp_path):
    (tmp_path / "openvino_model.bin").write_bytes(b"\0" * 2**20)
    (tmp_path / "openvino_model.xml").write_text("<net/>")
    assert peers.weights_gib(tmp_path, None) == pytest.approx(1 / 1024)


@pytest.mark.real_model
@pytest.mark.slow
def test_peers_that_load_for_their_turn_give_the_same_tokens(smollm2_peers):
    """residency 'one': a run's peers share one PipelineSlot that holds one pipeline at a
    time (ov-sd and ov-sd+conf share theirs); each produces the tokens the resident one does."""
    from mirror_sd.runtime.prompts import encode_prompt

    plan, methods = smollm2_peers
    ids = encode_prompt(plan.tokenizer, PROMPT, chat=True)
    kept, draft_ir = methods["ov-ar"], methods["ov-sd"].draft_ir
    slot = peers.PipelineSlot(resident=False)
    ar = peers.OVMethod("ov-ar", kept.target_ir, [], kept.gamma, slot=slot)
    sd = peers.OVMethod("ov-sd", kept.target_ir, [], kept.gamma, draft_ir=draft_ir, slot=slot)
    conf = peers.OVMethod("ov-sd+conf", kept.target_ir, [], kept.gamma, draft_ir=draft_ir,
                          slot=slot)  # fmt: skip
    assert slot.loaded() == {} and ar.pipe is None  # nothing loads before its turn
    assert ar.generate(ids, N_NEW).tokens == kept.generate(ids, N_NEW).tokens
    assert list(slot.loaded()) == ["ov-ar@defaults"]
    assert sd.generate(ids, N_NEW).tokens == methods["ov-sd"].generate(ids, N_NEW).tokens
    shared = sd.pipe
    assert list(slot.loaded()) == ["sd@defaults"] and ar.pipe is None  # ov-ar's pipeline was freed
    conf.generate(ids, N_NEW)
    assert conf.pipe is shared  # ov-sd+conf reused ov-sd's pipeline
    assert "one peer pipeline in memory at a time" in ar.describe()["residency"]
