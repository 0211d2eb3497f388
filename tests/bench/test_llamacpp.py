"""The llama.cpp peers (bench/llamacpp.py) against a fake `llama_cpp` module: llama-cpp-python
is not built on the test machines (minutes of every core)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from mirror_sd.bench import llamacpp, peers
from mirror_sd.bench.methods import parse_methods
from mirror_sd.bench.peer_common import PeersUnavailableError
from tests.bench.fakes import install_fakes, module

CLOCK = [0.0]


class FakeLlama:
    """llama_cpp.Llama: generate yields 100, 101, ... (one second of the fake clock each)."""

    built: list[FakeLlama] = []

    def __init__(self, model_path, **kwargs):
        self.model_path, self.kwargs = model_path, kwargs
        self.prompts: list[list[int]] = []  # the tokens of every generate call
        self.resets = 0
        self.sampling: dict = {}
        FakeLlama.built.append(self)

    def reset(self):
        self.resets += 1

    def generate(self, tokens, **kwargs):
        self.prompts.append(list(tokens))
        self.sampling = kwargs
        i = 0
        while True:
            CLOCK[0] += 1.0
            yield 100 + i
            i += 1


class FakePLD:
    def __init__(self, max_ngram_size=2, num_pred_tokens=10):
        self.max_ngram_size, self.num_pred_tokens = max_ngram_size, num_pred_tokens


@pytest.fixture
def fake_llama(monkeypatch):
    spec = module("llama_cpp.llama_speculative", LlamaPromptLookupDecoding=FakePLD)
    llama = module("llama_cpp", Llama=FakeLlama, llama_speculative=spec)
    install_fakes(monkeypatch, llamacpp, CLOCK, llama_cpp=llama, llama_cpp__llama_speculative=spec)
    FakeLlama.built = []
    return FakeLlama


def test_llama_ar_warms_once_then_times_greedy_generations(fake_llama):
    m = llamacpp.LlamaMethod("llama-ar", "/g/t.gguf", [], gamma=4, threads=2, n_ctx=1024)
    (llm,) = fake_llama.built
    assert llm.kwargs["n_threads"] == llm.kwargs["n_threads_batch"] == 2
    assert llm.kwargs["n_ctx"] == 1024 and llm.kwargs["draft_model"] is None
    m.warm_up([1, 2], 3)
    out = m.generate([5, 6, 7], 5)
    assert llm.prompts == [[1, 2], [5, 6, 7]]  # the warm-up came first, untimed
    assert out.tokens == [100, 101, 102, 103, 104] and out.wall_s == 5.0
    assert out.accept_lengths == [1] * 5
    assert llm.resets == 2  # every generation starts from an empty KV cache
    assert llm.sampling["temp"] == 0.0 and llm.sampling["repeat_penalty"] == 1.0
    assert "warmed 1 time(s)" in m.describe()["warmup"]


def test_a_first_generate_warms_on_its_own_prompt(fake_llama):
    m = llamacpp.LlamaMethod("llama-ar", "/g/t.gguf", [], gamma=4)
    out = m.generate([5], 2)
    assert fake_llama.built[0].prompts == [[5], [5]] and out.wall_s == 2.0


def test_eos_stops_the_generation_where_the_runner_gives_eos_ids(fake_llama):
    m = llamacpp.LlamaMethod("llama-ar", "/g/t.gguf", [102], gamma=4)
    assert m.generate([5], 10).tokens == [100, 101, 102]


def test_llama_pld_and_llama_sd_get_their_drafts(fake_llama):
    pld = llamacpp.LlamaMethod("llama-pld", "/g/t.gguf", [], gamma=4)
    draft = pld.slot.loaded()["llama-pld"].kwargs["draft_model"]
    assert isinstance(draft, FakePLD)
    assert (draft.max_ngram_size, draft.num_pred_tokens) == (3, 10)  # as ov-pld / hf-pld
    sd = llamacpp.LlamaMethod("llama-sd", "/g/t.gguf", [], gamma=4, draft_gguf="/g/d.gguf")
    target = sd.slot.loaded()["llama-sd"]
    assert isinstance(target.kwargs["draft_model"], llamacpp.GGUFDraft)
    assert target.kwargs["draft_model"].llm.model_path == "/g/d.gguf"
    sd.generate([5], 2)
    assert target.kwargs["draft_model"].llm.resets == 2  # the draft forgets each prompt too
    with pytest.raises(ValueError, match="--draft"):
        llamacpp.LlamaMethod("llama-sd", "/g/t.gguf", [], gamma=4)


def test_gguf_draft_proposes_its_greedy_continuation(fake_llama):
    draft = llamacpp.GGUFDraft(FakeLlama("/g/d.gguf"), num_pred_tokens=3)
    got = draft(np.asarray([1, 2, 3], dtype=np.intc))
    assert got.tolist() == [100, 101, 102] and got.dtype == np.intc
    assert draft.llm.prompts == [[1, 2, 3]] and draft.llm.sampling["temp"] == 0.0


def test_missing_llama_cpp_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(PeersUnavailableError) as e:
        peers.check_available(["ar", "llama-ar"])
    msg = str(e.value)
    assert "llama-ar" in msg and "CMAKE_ARGS=" in msg and "-DGGML_NATIVE=OFF" in msg
    assert "pip install" in msg and "llama-cpp-python" in msg
    assert isinstance(e.value, ValueError)
    peers.check_available(["ar", "hf-ar"])  # no llama-* method: nothing to check


def test_install_hint_adds_avx512_only_where_the_cpu_has_it():
    plain = llamacpp.install_hint({"avx2", "fma"})
    assert "-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" in plain and "AVX512" not in plain
    wide = llamacpp.install_hint({"avx2", "avx512f", "avx512_vnni"})
    assert "-DGGML_AVX512=ON" in wide and "-DGGML_AVX512_VNNI=ON" in wide
    assert "-DGGML_AVX512_BF16" not in wide


def test_without_llama_speculative_only_llama_ar_runs(fake_llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_speculative", None)
    llamacpp.check_available(["llama-ar"])
    with pytest.raises(PeersUnavailableError, match="llama-sd and llama-pld"):
        llamacpp.check_available(["llama-pld"])


def test_llama_names_parse_and_stay_unexpanded():
    assert parse_methods("llama-ar,llama-sd,llama-pld") == ("llama-ar", "llama-sd", "llama-pld")
    assert peers.is_peer("llama-sd") and not peers.is_ov("llama-sd")


def test_gguf_path_finds_the_zoo_gguf_and_refuses_other_folders(tmp_path):
    from mirror_sd.graphs import gguf_fetch, model_registry

    folder = tmp_path / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / gguf_fetch.FETCH_MARKER).write_text(json.dumps({"name": "smollm2-135m"}))
    gguf = tmp_path / "gguf" / model_registry.get_spec("smollm2-135m").gguf_file
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert llamacpp.gguf_path(folder, cache=tmp_path) == gguf
    with pytest.raises(ValueError, match="models fetch"):
        llamacpp.gguf_path(tmp_path / "plain", cache=tmp_path)
