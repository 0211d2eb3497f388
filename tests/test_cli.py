"""The command line, run in-process: compile -> describe -> generate with a trace."""

import json
import subprocess
import sys

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


def _user_error(capsys, argv: list[str]) -> str:
    """Run the CLI; assert the user-error contract (exit 2, one `mirror-sd: error:` line on
    stderr, no traceback) and return the message."""
    capsys.readouterr()  # drop what setting up wrote (e.g. saving a tiny model)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mirror-sd: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err.removeprefix("mirror-sd: error: ").rstrip("\n")


def test_unknown_mode_is_rejected_before_any_work(tmp_path, capsys):
    msg = _user_error(
        capsys, ["compile", str(tmp_path / "none"), "-o", str(tmp_path / "p"), "--mode", "fastest"]
    )
    assert msg.startswith("--mode 'fastest': expected one of") and "auto" in msg


def test_malformed_device_map_is_a_user_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ndevices:\n  a: {backend: torhc}\nplacement: {target: a}\n")
    msg = _user_error(capsys, ["compile", "whatever", "--device-map", str(bad), "-o", "p"])
    assert f"device map {bad}: devices.a.backend" in msg and "torch" in msg  # names the fix


@pytest.mark.parametrize(
    ("speculation", "key"),
    [("{num_draft_tokens: 100000}", "speculation.num_draft_tokens"),
     ("{num_draft_tokens: 8, branch_budget: 4, max_len: 40}", "speculation.max_len")],
)  # fmt: skip
def test_speculation_beyond_what_a_plan_runs_is_a_user_error(tmp_path, capsys, speculation, key):
    """γ above the row-invariant block size, or rounds that leave no room in max_len: one
    line naming the key and the value that works, before any model is loaded."""
    text = "version: 1\ndevices:\n  a: {backend: torch}\nplacement: {target: a, draft: a}\n"
    text += "speculation: " + speculation
    dm = tmp_path / "map.yaml"
    dm.write_text(text + "\n")
    msg = _user_error(capsys, ["compile", "whatever", "--draft", "x", "--device-map", str(dm),
                               "-o", str(tmp_path / "p")])  # fmt: skip
    assert key in msg
    assert ("use at most 63" if "draft_tokens" in key else "raise max_len") in msg


def test_missing_device_map_file_is_a_user_error(tmp_path, capsys):
    msg = _user_error(
        capsys, ["compile", "x", "--device-map", str(tmp_path / "no.yaml"), "-o", "p"]
    )
    assert "device map file not found" in msg and "no.yaml" in msg


def test_unknown_model_is_a_user_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MIRROR_SD_CACHE", str(tmp_path))
    msg = _user_error(capsys, ["generate", "no-such-model", "--prompt", "hi"])
    assert "'no-such-model' is neither a local Hugging Face folder" in msg
    assert "known models: " in msg and "smollm2-135m" in msg


CUDA_TARGET_MAP = """
version: 1
devices:
  gpu: {backend: onnxruntime, providers: [CUDAExecutionProvider: {}], allow_fallback: false}
  drf: {backend: onnxruntime, providers: [CPUExecutionProvider: {}]}
placement: {target: gpu, draft: drf}
"""


def test_missing_execution_provider_is_a_user_error(tmp_path, capsys, monkeypatch):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    monkeypatch.setenv("MIRROR_SD_CACHE", str(tmp_path / "cache"))
    t = save_tiny_with_tokenizer(make_tiny("llama", seed=0, num_hidden_layers=2), tmp_path / "t")
    dm = tmp_path / "cuda.yaml"
    dm.write_text(CUDA_TARGET_MAP)
    msg = _user_error(capsys, ["compile", str(t), "--device-map", str(dm), "-o", "p"])
    assert "execution provider CUDAExecutionProvider is not available" in msg
    assert "allow_fallback: true" in msg  # and how to fix it


def test_describe_without_a_plan_says_what_to_give(tmp_path, capsys):
    msg = _user_error(capsys, ["describe", str(tmp_path)])
    assert (
        msg == f"{tmp_path} has no plan.yaml: give a plan folder written by `mirror-sd compile -o`"
    )


def test_which_exceptions_are_user_errors():
    from mirror_sd.api import TokenizerMismatchError
    from mirror_sd.cli import is_user_error
    from mirror_sd.devices.ort_core import ProviderUnavailableError
    from mirror_sd.graphs.model_registry import UnknownModelError
    from mirror_sd.graphs.zoo import DiskSpaceError
    from mirror_sd.partition.placement import PlacementError
    from mirror_sd.runtime.prompts import PromptTooLongError

    users = [PlacementError("placement", "x"), UnknownModelError("x"), FileNotFoundError("x"),
             ProviderUnavailableError("x"), DiskSpaceError("x"), TokenizerMismatchError("x"),
             PromptTooLongError("x")]  # fmt: skip
    assert all(is_user_error(e) for e in users)
    assert not any(is_user_error(e) for e in (RuntimeError("x"), KeyError("x"), TypeError("x")))


def test_subcommand_exit_messages_take_the_same_form(capsys):
    msg = _user_error(capsys, ["bench"])  # bench/cli.py: SystemExit("mirror-sd bench: ...")
    assert msg.startswith("bench: give --target")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_raises_the_error_itself(tmp_path, where):
    argv = ["compile", str(tmp_path / "none"), "-o", "p", "--mode", "fastest"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(ValueError, match="--mode 'fastest'"):
        main(argv)


def test_internal_errors_keep_their_traceback(monkeypatch, tmp_path):
    def broken(args):
        raise KeyError("a bug, not the user's input")

    monkeypatch.setattr("mirror_sd.cli._describe", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["describe", str(tmp_path)])


@pytest.mark.parametrize("debug", [False, True])
def test_console_exit_status_and_traceback(tmp_path, debug):
    """The real process: exit 2 and one line; with --debug, Python's traceback (exit 1)."""
    argv = ["compile", str(tmp_path / "none"), "-o", "p", "--mode", "bogus"]
    run = subprocess.run(
        [sys.executable, "-m", "mirror_sd.cli", *(["--debug"] if debug else []), *argv],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ("Traceback" in run.stderr) is debug
    if debug:
        assert run.returncode == 1 and "ValueError: --mode 'bogus'" in run.stderr
    else:
        assert run.returncode == 2
        assert run.stderr == (
            "mirror-sd: error: --mode 'bogus': expected one of mirror, speculative, "
            "autoregressive, auto\n"
        )


def test_generate_without_a_draft_on_the_default_map(tmp_path, capsys, monkeypatch):
    """`mirror-sd generate MODEL --prompt ...`: the default map places a draft; with none
    given, the target runs alone instead of failing with a PlacementError."""
    monkeypatch.setenv("MIRROR_SD_CACHE", str(tmp_path / "cache"))
    t = save_tiny_with_tokenizer(make_tiny("llama", seed=0, num_hidden_layers=2), tmp_path / "t")
    argv = ["generate", str(t), "--prompt", "w1 w2", "--max-new-tokens", "5", "--max-len", "256",
            "--stats-json", str(tmp_path / "stats.json")]  # fmt: skip
    assert main(argv) == 0
    assert "autoregressive" in capsys.readouterr().err
    assert json.loads((tmp_path / "stats.json").read_text())["new_tokens"] == 5


def test_missing_torch_gpu_is_a_user_error(tmp_path, capsys, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    monkeypatch.setenv("MIRROR_SD_CACHE", str(tmp_path / "cache"))
    t = save_tiny_with_tokenizer(make_tiny("llama", seed=0, num_hidden_layers=2), tmp_path / "t")
    dm = "examples/device_maps/cuda_ortcuda.yaml"
    msg = _user_error(capsys, ["compile", str(t), "--device-map", dm, "-o", str(tmp_path / "p")])
    assert "torch sees no CUDA GPU here" in msg and "device: cpu" in msg


def test_more_exit_candidates_than_the_vocabulary_is_a_user_error(tmp_path, capsys):
    """κ is bounded by the target's vocabulary (read from its config before any export)."""
    from tests.conftest import make_tiny, make_tokenizer, save_tiny

    folder = save_tiny(make_tiny("llama"), tmp_path / "llama")
    make_tokenizer().save_pretrained(folder)
    dm = tmp_path / "map.yaml"
    dm.write_text("version: 1\ndevices:\n  a: {backend: torch}\nplacement: {target: a, draft: a}\n"
                  "speculation: {exit_top_k: 1000}\n")  # fmt: skip
    msg = _user_error(capsys, ["compile", str(folder), "--draft", str(folder), "--device-map",
                               str(dm), "-o", str(tmp_path / "p")])  # fmt: skip
    assert "speculation.exit_top_k" in msg and "use at most 97" in msg
