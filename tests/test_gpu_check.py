"""The prepared GPU check on a machine without one: scripts/gpu_check.sh says so and exits 0,
and the timing module runs end to end on tiny CPU shapes (docs/gpu_check.md)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parents[1] / "scripts"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the whole check")
def test_gpu_check_without_gpu_says_so_and_exits_0(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU visible to torch" in proc.stdout


def test_gpu_check_without_outdir_is_a_usage_error():
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: scripts/gpu_check.sh OUTDIR" in proc.stderr


@pytest.mark.parametrize("draft", ["ort-cpu", "torch"])
def test_timing_runs_on_tiny_cpu_shapes(tmp_path, capsys, draft):
    spec = importlib.util.spec_from_file_location("gpu_timing", SCRIPTS / "gpu_timing.py")
    timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)
    tests = tmp_path / "tests.json"
    tests.write_text('{"exit_code": 0, "summary": "4 passed"}')
    argv = [str(tmp_path), "--device", "cpu", "--shapes", "tiny", "--new-tokens", "12"]
    argv += ["--draft", draft]
    assert timing.main([*argv, "--tests-json", str(tests)]) == 0

    doc = json.loads((tmp_path / "gpu_timing.json").read_text())
    assert doc["complete"] and not doc["errors"] and doc["tests"]["summary"] == "4 passed"
    assert doc["settings"]["draft"] == timing.DRAFTS[draft]
    assert [t["name"] for t in doc["targets"]] == [n for n, _ in timing.SHAPES["tiny"]["targets"]]
    for t in doc["targets"]:
        assert set(t["measured"]) == {"ar", "speculative", "mirror"}
        for m in t["measured"].values():
            assert m["tokens_per_s"] > 0 and m["new_tokens"] == 12
            assert m["identical_to_ar"], t["name"]  # float32 on the CPU: lossless, exactly
            assert 0 <= m["exposed_draft_share"] <= 1
        c = t["components"]
        assert c["overlap_slowdown_f"] >= 1 and c["t_T_block_ms"] > 0 and c["t_d_1_ms"] > 0
        assert set(t["predicted"]) == {"measured", "alpha=0.6", "alpha=0.8"}
        assert all(p["tokens_per_s"]["mirror"] > 0 for p in t["predicted"].values())
    md = (tmp_path / "gpu_timing.md").read_text()
    assert "NOT representative" in md and "| tiny-6l | mirror |" in md
    assert "complete after" in md


def test_tie_gap_measures_the_targets_own_logits(tmp_path):
    """At a difference, the report gives the target's logit gap between the two choices:
    0 when both are the target's top token, > 0 when `got` took a lower one."""
    spec = importlib.util.spec_from_file_location("gpu_timing", SCRIPTS / "gpu_timing.py")
    timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)
    from tests.conftest import tiny_pair

    target, _, _ = tiny_pair(tmp_path)
    model = timing.load_model(target, "float32")
    prompt = [5, 6, 7]
    logits = timing.extend(model, model.new_cache(8), prompt)[-1]
    best, second = logits.topk(2).indices.tolist()
    same = timing.tie_gap(target, "float32", "cpu", prompt, [best], [best], 0)
    assert same["logit_gap"] == 0.0
    lower = timing.tie_gap(target, "float32", "cpu", prompt, [best], [second], 0)
    assert lower["logit_gap"] > 0 and 0 < lower["relative_gap"] <= 2
    assert timing.same({"identical_to_ar": False, "first_difference": 3, "tie": lower}).startswith(
        "no (at 3, gap "
    )
