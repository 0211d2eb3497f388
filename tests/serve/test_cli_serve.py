"""`mirror-sd serve`: its errors follow the CLI's contract; one command serves a saved plan."""

import re
import signal
import socket
import subprocess
import sys

import openai
import pytest

from mirror_sd.cli import main
from tests.conftest import make_tiny, save_tiny_with_tokenizer


def _user_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mirror-sd: error: ") and "Traceback" not in err, err
    return err


def test_bad_port_queue_and_taken_port_fail_before_compiling(capsys, tmp_path):
    missing = str(tmp_path / "no-such-model")  # never compiled: the checks come first
    assert "--port 70000" in _user_error(capsys, ["serve", missing, "--port", "70000"])
    assert "--max-queue 0" in _user_error(capsys, ["serve", missing, "--max-queue", "0"])
    assert "--engine" in _user_error(capsys, ["serve", missing, "--engine", "nope"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        assert "cannot listen there" in _user_error(capsys, ["serve", missing, "--port", port])


def test_missing_model_is_a_user_error(capsys, tmp_path):
    _user_error(capsys, ["serve", str(tmp_path / "no-such-model"), "--port", "0"])


@pytest.mark.slow
def test_one_command_serves_a_saved_plan(tmp_path, monkeypatch):
    t = save_tiny_with_tokenizer(make_tiny("llama", seed=0, num_hidden_layers=4), tmp_path / "t")
    d = save_tiny_with_tokenizer(make_tiny("llama", seed=1, num_hidden_layers=1), tmp_path / "d")
    plan_dir = tmp_path / "myplan"
    monkeypatch.setenv("MIRROR_SD_CACHE", str(tmp_path / "cache"))  # the server inherits it
    compile_argv = ["compile", str(t), "--draft", str(d), "-o", str(plan_dir), "--exit-layer",
                    "2", "--branch-budget", "4", "--max-len", "128"]  # fmt: skip
    assert main(compile_argv) == 0  # in this process: the CLI's code, without a 2nd interpreter
    cli = [sys.executable, "-m", "mirror_sd.cli"]
    proc = subprocess.Popen(
        cli + ["serve", str(plan_dir), "--port", "0"], stderr=subprocess.PIPE, text=True
    )
    try:
        for line in proc.stderr:  # the server says where it listens once it does
            if m := re.search(r"serving 'myplan' at (http://127\.0\.0\.1:\d+/v1)", line):
                break
        else:
            pytest.fail(f"the server exited with {proc.wait()} before listening")
        assert "batch engine" in line  # continuous batching is the default
        c = openai.OpenAI(base_url=m.group(1), api_key="unused", max_retries=0)
        assert [x.id for x in c.models.list().data] == ["myplan"]
        r = c.completions.create(model="myplan", prompt="w1 w2", max_tokens=5)
        assert r.usage.completion_tokens == 5 and r.choices[0].text
    finally:
        proc.send_signal(signal.SIGTERM)  # a graceful stop: exit status 0
        assert proc.wait(timeout=60) == 0


def test_prefix_cache_is_opt_in():
    """Off unless asked: without it every answer is plan.generate's (docs/serving.md)."""
    from mirror_sd.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["serve", "plans/x"]).prefix_cache is False
    assert parse(["serve", "plans/x", "--prefix-cache"]).prefix_cache is True
    assert parse(["serve", "plans/x", "--no-prefix-cache"]).prefix_cache is False
