"""Progress on long steps (mirror_sd.progress): silent in the API unless asked, bars on stderr
naming the step when shown, off under the CLI's --quiet, inherited by worker processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mirror_sd import progress
from mirror_sd.graphs import layered, load_model, onnx_quant
from tests.conftest import make_tiny, save_tiny

KEY = {"tiny": "progress"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, model): a tiny qwen2 with 2 layers (each exported part takes seconds)."""
    model = make_tiny("qwen2", seed=3, num_hidden_layers=2)
    folder = save_tiny(model, tmp_path_factory.mktemp("qwen2"))
    return folder, load_model(folder)


def test_the_api_is_silent_by_default(tiny, tmp_path, capsys):
    assert not progress.enabled()
    for _ in progress.bar(range(3), desc="counting"):
        pass
    with progress.step("one long call"):
        pass
    layered.export_layers_cached(tiny[1], tmp_path, KEY)
    assert capsys.readouterr().err == ""


def test_shown_bars_name_the_step_on_stderr(tiny, tmp_path, capsys):
    """The per-layer export counts its parts (embed, prep, 2 layers); quantization its MatMuls."""
    with progress.shown(True):
        parts = layered.export_layers_cached(tiny[1], tmp_path, KEY)
        onnx_quant.quantize_weights(parts / "layer_000.onnx", tmp_path / "q" / "model.onnx", 8)
    err = capsys.readouterr().err
    assert "exporting qwen2 per layer" in err and "4/4" in err
    assert "quantizing layer_000.onnx to int8" in err
    assert not progress.enabled()  # the block's setting ends with it


def test_a_step_shows_its_elapsed_time(capsys):
    with progress.shown(True), progress.step("exporting a draft"):
        pass
    assert "exporting a draft: 00:00" in capsys.readouterr().err


def test_quiet_turns_the_cli_bars_off(capsys):
    from mirror_sd.cli import build_parser, progress_shown

    for argv, on in ((["compile", "m", "-o", "out"], True),
                     (["compile", "m", "-o", "out", "--quiet"], False),
                     (["demo", "--quiet"], False), (["trace", "summarize", "t.json"], True)):  # fmt: skip
        with progress_shown(build_parser().parse_args(argv)):
            assert progress.enabled() is on, argv
            for _ in progress.bar(range(2), desc="a long step"):
                pass
        assert ("a long step" in capsys.readouterr().err) is on, argv


def test_compile_progress_sets_the_switch_for_its_call(monkeypatch):
    import mirror_sd.api as api

    seen = []
    monkeypatch.setattr(api.compiler, "compile", lambda *a, **k: seen.append(progress.enabled()))
    api.compile("t")
    api.compile("t", progress=True)
    with progress.shown(True):
        api.compile("t")  # None keeps the caller's setting (the CLI's)
        api.compile("t", progress=False)
    assert seen == [False, True, True, False]


@pytest.mark.parametrize("on", [True, False])
def test_the_switch_reaches_a_child_process(on):
    code = "from mirror_sd import progress; print(progress.enabled())"
    with progress.shown(on):
        env = progress.child_env()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert out.strip() == str(on)


def test_an_export_worker_passes_its_bars_on(tiny, tmp_path, capsys):
    """The worker process exports with progress shown and its stderr reaches ours."""
    import mirror_sd.export_worker as worker

    args = {"folder": str(tiny[0]), "onnx_dir": str(tmp_path), "quantize": "int8"}
    with progress.shown(True):
        out = worker._in_worker("draft", args)
    err = capsys.readouterr().err
    assert out["path"].endswith("model.onnx")
    assert "exporting qwen2-0-2" in err and "quantizing qwen2-0-2 to int8" in err


def test_library_calls_with_progress_steps_follow_the_switch(tmp_path, capsys):
    """Functions with a `progress` argument (the vocabulary counts compile() builds for a
    trimmed draft, zoo fetches, adapter training) are silent unless the switch is on or the
    caller asks: their default is None, not True."""
    from mirror_sd.training.vocab import target_choices
    from tests.conftest import save_tiny_with_tokenizer

    folder = save_tiny_with_tokenizer(make_tiny("qwen2"), tmp_path / "m")
    capsys.readouterr()  # transformers' own bar while saving
    assert progress.wanted(None) is False and progress.wanted(True) is True
    target_choices(folder, tmp_path / "c1", n_chunks=2, chunk_len=16)
    assert capsys.readouterr().err == ""
    with progress.shown():
        assert progress.wanted(None) is True and progress.wanted(False) is False
        target_choices(folder, tmp_path / "c2", n_chunks=2, chunk_len=16)
    assert "%" in capsys.readouterr().err  # collect()'s bar over the chunks
