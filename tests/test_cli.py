"""The command line, run in-process: compile -> describe -> generate with a trace."""

import json

import pytest

from mirror_sd.cli import main
from tests.conftest import make_tiny, save_tiny_with_tokenizer


def test_compile_describe_generate(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MIRROR_SD_CACHE", str(tmp_path / "cache"))
    t = save_tiny_with_tokenizer(make_tiny("llama", seed=0, num_hidden_layers=4), tmp_path / "t")
    d = save_tiny_with_tokenizer(make_tiny("llama", seed=1, num_hidden_layers=1), tmp_path / "d")
    plan_dir = tmp_path / "plan"
    assert main(["compile", str(t), "--draft", str(d), "-o", str(plan_dir), "--exit-layer", "2",
                 "--branch-budget", "4", "--max-len", "128", "--mode", "auto"]) == 0  # fmt: skip
    compiled = capsys.readouterr().out
    assert "plan saved to" in compiled
    assert "mode: auto -> " in compiled and "best mode:" in compiled  # profiled for the verdict
    assert main(["describe", str(plan_dir)]) == 0
    described = capsys.readouterr().out
    assert "target.layers.[0-2) prefix" in described
    assert "mode: auto -> " in described and "chosen when it was compiled" in described
    trace, stats = tmp_path / "trace.json", tmp_path / "stats.json"
    assert main(["generate", str(plan_dir), "--prompt", "w1 w2 w3", "--max-new-tokens", "6",
                 "--trace", str(trace), "--stats-json", str(stats)]) == 0  # fmt: skip
    out = capsys.readouterr()
    assert "tok/s" in out.err and out.out.strip()
    assert json.loads(stats.read_text())["new_tokens"] == 6
    assert json.loads(trace.read_text())["traceEvents"]


def test_models_list(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MIRROR_SD_CACHE", str(tmp_path))
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "qwen2.5-coder-1.5b" in out and "not fetched" in out


def test_quantize_check_reports_agreement(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MIRROR_SD_CACHE", str(tmp_path / "cache"))
    d = save_tiny_with_tokenizer(make_tiny("llama", seed=1, num_hidden_layers=1), tmp_path / "d")
    assert main(["quantize-check", str(d)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.0 <= report["top1_agreement"] <= 1.0 and report["tokens"] > 10
    assert report["fp32_step_ms"] > 0 and report["int8_step_ms"] > 0


def test_unknown_mode_is_rejected_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="--mode 'fastest': expected one of .*auto"):
        main(["compile", str(tmp_path / "none"), "-o", str(tmp_path / "p"), "--mode", "fastest"])
