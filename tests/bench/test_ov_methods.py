"""The ov-* peers without OpenVINO: a fake `openvino_genai` records what each pipeline is
given and every generate call, so that the warm-up rule (one untimed generation after every
load, before the first timed one), the precision pins and the run's method list are exact."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mirror_sd import cli as root_cli
from mirror_sd.bench import peers
from mirror_sd.bench.peer_common import PipelineSlot
from tests.bench.fakes import install_fakes, module

IDS = [5, 6, 7]


class FakePipeline:
    """An LLMPipeline: each generate call takes one second of the fake clock."""

    built: list[FakePipeline] = []

    def __init__(self, path, device, **kwargs):
        self.path, self.device, self.kwargs = path, device, kwargs
        self.calls: list[int] = []  # max_new_tokens of every generate call, in order
        FakePipeline.built.append(self)

    def generate(self, inputs, cfg):
        self.calls.append(cfg.max_new_tokens)
        CLOCK[0] += 1.0
        return SimpleNamespace(tokens=[[9] * cfg.max_new_tokens])


CLOCK = [0.0]


@pytest.fixture
def fake_ov(monkeypatch):
    """Fake `openvino_genai` and `openvino` modules, and peers' clock reading the fake clock."""
    genai = module(
        "openvino_genai", SchedulerConfig=SimpleNamespace, GenerationConfig=SimpleNamespace,
        LLMPipeline=FakePipeline, draft_model=lambda path, device, **props: ("draft", path, props),
        TokenizedInputs=lambda ids, mask: (ids, mask),
    )  # fmt: skip
    ov = module("openvino", Tensor=lambda x: x)
    install_fakes(monkeypatch, peers, CLOCK, openvino_genai=genai, openvino=ov)
    FakePipeline.built = []
    return FakePipeline


def test_a_resident_pipeline_is_warmed_once_before_its_first_timed_call(fake_ov):
    m = peers.OVMethod("ov-ar", "/ir/t", [], gamma=4, threads=2)
    (pipe,) = fake_ov.built
    assert pipe.calls == []  # loaded at build time, not warmed yet
    out = m.generate(IDS, 8)
    assert pipe.calls == [8, 8]  # the warm-up (the call's own prompt), then the timed call
    assert out.wall_s == 1.0 and out.tokens == [9] * 8  # the clock saw the timed call only
    m.generate(IDS, 8)
    assert pipe.calls == [8, 8, 8] and len(fake_ov.built) == 1
    assert "loaded 1 time(s), warmed 1 time(s)" in m.describe()["warmup"]


def test_every_reload_is_warmed_with_the_runners_warmup_before_it_is_timed(fake_ov):
    """One pipeline in memory at a time: ov-ar and ov-pld evict each other on every prompt,
    and each new pipeline gets the runner's warm-up generation before its timed one."""
    slot = PipelineSlot(resident=False)
    ar = peers.OVMethod("ov-ar", "/ir/t", [], 4, slot=slot)
    pld = peers.OVMethod("ov-pld", "/ir/t", [], 4, slot=slot)
    assert fake_ov.built == []  # nothing loads before its turn
    for m in (ar, pld):
        m.warm_up(IDS, 3)  # the runner's warm-up: (first prompt, its length)
    assert [p.calls for p in fake_ov.built] == [[3], [3]]
    for _ in range(2):  # two prompts, methods interleaved
        for m in (ar, pld):
            out = m.generate([1, 2], 8)
            assert out.wall_s == 1.0
    assert [p.calls for p in fake_ov.built] == [[3], [3], [3, 8], [3, 8], [3, 8], [3, 8]]
    assert slot.loads == slot.warmups == {"ov-ar@defaults": 3, "ov-pld@defaults": 3}
    assert len(slot.loaded()) == 1


def test_pinned_methods_pass_the_precision_hint_and_defaults_pass_none(fake_ov):
    peers.OVMethod("ov-ar", "/ir/t", [], 4, threads=2)
    peers.OVMethod("ov-ar@f32", "/ir/t", [], 4, threads=2)
    sd = peers.OVMethod("ov-sd@bf16", "/ir/t", [], 4, threads=2, draft_ir="/ir/d")
    defaults, f32, bf16 = (p.kwargs for p in fake_ov.built)
    assert "INFERENCE_PRECISION_HINT" not in defaults and "KV_CACHE_PRECISION" not in defaults
    assert defaults["INFERENCE_NUM_THREADS"] == 2
    assert f32["INFERENCE_PRECISION_HINT"] == "f32" and f32["KV_CACHE_PRECISION"] == "f32"
    assert f32["INFERENCE_NUM_THREADS"] == 2
    assert bf16["INFERENCE_PRECISION_HINT"] == "bf16"
    assert bf16["draft_model"][2]["INFERENCE_PRECISION_HINT"] == "bf16"  # the draft too
    assert sd.key == "sd@bf16" and sd.settings() == {"num_assistant_tokens": 4}
    assert "pinned to bf16" in sd.describe()["runs"]
    with pytest.raises(ValueError, match="ov-ar@f64"):
        peers.OVMethod("ov-ar@f64", "/ir/t", [], 4)


def test_ov_sd_and_ov_sd_conf_share_a_pipeline_per_precision(fake_ov):
    slot = PipelineSlot(resident=True)
    keys = {peers.OVMethod(n, "/ir/t", [], 4, draft_ir="/ir/d", slot=slot).key
            for n in ("ov-sd", "ov-sd+conf", "ov-sd@f32", "ov-sd+conf@f32")}  # fmt: skip
    assert keys == {"sd@defaults", "sd@f32"} and len(fake_ov.built) == 2


def test_expand_methods_adds_ov_pld_and_a_row_per_precision():
    got = peers.expand_methods(["ar", "ov-ar", "ov-sd", "mirror"], ("defaults", "plan"), "bf16")
    assert got == ("ar", "ov-ar", "ov-ar@bf16", "ov-sd", "ov-sd@bf16", "ov-pld", "ov-pld@bf16",
                   "mirror")  # fmt: skip
    # pinned by name: kept as given, and ov-pld still joins (at every requested precision)
    assert peers.expand_methods(["ov-ar@f32"], ("defaults",), "f32") == ("ov-ar@f32", "ov-pld")
    assert peers.expand_methods(["ov-pld", "ar"], ("plan",), "f32") == ("ov-pld@f32", "ar")
    # no ov-* method: nothing added (llama-* and ours stay as they are)
    assert peers.expand_methods(["ar", "llama-ar"], ("defaults", "plan"), "f32") == (
        "ar", "llama-ar",
    )  # fmt: skip
    assert peers.expand_methods(["ov-ar"], ("defaults", "f32", "plan"), "f32") == (
        "ov-ar", "ov-ar@f32", "ov-pld", "ov-pld@f32",
    )  # fmt: skip


def _plan(device: dict, spec=None):
    dm = {"devices": {"t": device}}
    target = spec or SimpleNamespace(alias="t")
    return SimpleNamespace(report=SimpleNamespace(device_map=dm), target_device=target)


def test_plan_precision_follows_the_target_device():
    assert peers.plan_precision(_plan({"backend": "torch", "dtype": "bfloat16"})) == "bf16"
    assert peers.plan_precision(_plan({"backend": "torch", "dtype": "float16"})) == "f16"
    assert peers.plan_precision(_plan({"backend": "torch", "dtype": "float32"})) == "f32"
    assert peers.plan_precision(_plan({"backend": "onnxruntime", "quantize": "none"})) == "f32"
    assert peers.plan_precision(_plan({"backend": "onnxruntime", "quantize": "int4"})) == "f32"
    # a device map without the entry: the device spec's own dtype
    spec = SimpleNamespace(alias="x", dtype="torch.bfloat16")
    assert peers.plan_precision(_plan({}, spec)) == "bf16"
    with pytest.raises(ValueError, match="float64"):
        peers.plan_precision(_plan({"dtype": "float64"}))


def test_parse_precisions_names_the_option_and_the_choices():
    assert peers.parse_precisions("defaults,plan") == ("defaults", "plan")
    assert peers.parse_precisions(" f32 , bf16,f32") == ("f32", "bf16")
    with pytest.raises(ValueError, match=r"--peer-precision fp32.*defaults, plan, f32, bf16"):
        peers.parse_precisions("fp32")
    with pytest.raises(ValueError, match="--peer-precision"):
        peers.parse_precisions(",")


def test_cli_rejects_a_bad_peer_precision_and_repeat_before_compiling(capsys):
    base = ["bench", "--target", "/no/such/model", "--methods", "ar", "--quiet"]
    assert root_cli.main([*base, "--peer-precision", "fp64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mirror-sd: error: ") and "--peer-precision fp64" in err
    assert "/no/such/model" not in err  # refused before the plan compiles
    assert root_cli.main([*base, "--repeat", "0"]) == 2
    assert "--repeat 0" in capsys.readouterr().err
