"""Tensor-parallel target (#16): 2 ranks over gloo, launched by torchrun from the test.

Greedy output under TP equals the single-process target's (and sampled generations its
draws, seed for seed); a rank that hangs ends the
generation with a clear error within the group's timeout and a rank that dies ends the
launch, with no process left behind; the map's `tensor_parallel` is validated."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import mirror_sd.api as api
from mirror_sd.partition import DeviceMapError
from tests.conftest import tiny_pair
from tests.distributed.tp_worker import PROMPTS, SAMPLING, SEEDS

WORKER = Path(__file__).with_name("tp_worker.py")
ROOT = Path(__file__).parents[2]
LAUNCH_TIMEOUT_S = 300  # a launch that takes longer has hung: the test fails instead

TP_MAP = """
version: 1
devices:
  cpus: {backend: torch, device: cpu, threads: 1, tensor_parallel: 2, tp_timeout_s: 20}
  draft: {backend: torch, device: cpu, threads: 1}
placement: {target: cpus, draft: draft}
speculation: {exit_layer: 3, branch_budget: 4, mode: mirror}
"""
ONE = TP_MAP.replace(", tensor_parallel: 2, tp_timeout_s: 20", "")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("models"))


def _launch(folders, tmp_path, map_text: str, fault: str = "") -> tuple[int, dict | None, str]:
    """(torchrun's exit code, rank 0's JSON or None, its output); asserts no process of the
    launch is left."""
    target, draft, _ = folders
    (tmp_path / "tp.yaml").write_text(map_text)
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(target), str(draft), str(tmp_path / "tp.yaml"), str(out), fault]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)  # fmt: skip
    try:
        text, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the launch hung for {LAUNCH_TIMEOUT_S} s")
    try:  # every process of the launch's session is gone
        os.killpg(proc.pid, 0)
        left = True
    except ProcessLookupError:
        left = False
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, "a rank outlived the launch"
    return proc.returncode, json.loads(out.read_text()) if out.is_file() else None, text


def _reference(folders) -> dict[str, list[int]]:
    target, draft, _ = folders
    with api.compile(target, draft, ONE, max_len=128) as plan:
        ref = {
            f"{p}|{m}": plan.generate(p, 24, mode="autoregressive").tokens
            for p in PROMPTS
            for m in ("autoregressive", "speculative", "mirror")
        }
        for seed in SEEDS:
            ref[f"sample|{seed}"] = plan.generate(
                PROMPTS[0], 24, mode="mirror", seed=seed, **SAMPLING
            ).tokens
        return ref


def test_a_two_rank_tp_target_decodes_as_the_single_process_target(folders, tmp_path):
    rc, result, text = _launch(folders, tmp_path, TP_MAP)
    assert rc == 0, text[-3000:]
    assert "tensor-parallel over 2 ranks (gloo)" in result["name"]
    ref = _reference(folders)
    assert result["tokens"] == ref  # greedy in every mode, and sampled draw for draw
    assert len({tuple(ref[f"sample|{s}"]) for s in SEEDS}) > 1  # the seeds do differ


def test_a_hanging_rank_ends_generation_with_a_clear_error(folders, tmp_path):
    rc, result, text = _launch(folders, tmp_path, TP_MAP, fault="hang")
    assert rc != 0
    assert result is not None, text[-3000:]
    err = result["error"]
    assert "a rank died, or hung past the group's timeout (20 s" in err
    assert "Timed out" in err  # gloo's own words: the hang was detected by the timeout


def test_a_dying_rank_ends_the_launch(folders, tmp_path):
    rc, _, text = _launch(folders, tmp_path, TP_MAP, fault="die")
    assert rc != 0
    assert re.search(r"exitcode\s*: 7", text), text[-3000:]  # torchrun names the dead rank


def test_a_dying_rank_0_ends_its_followers(folders, tmp_path):
    rc, result, text = _launch(folders, tmp_path, TP_MAP, fault="die0")
    assert rc != 0 and result is None  # rank 0 wrote nothing; _launch saw no rank survive
    assert re.search(r"exitcode\s*: 7", text), text[-3000:]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            "device: cpu, threads: 1, tensor_parallel: 2",
            r"not started by torchrun \(WORLD_SIZE is unset\)",
        ),
        ("device: cpu, threads: 1, tensor_parallel: 3", r"do not divide over 3 ranks"),
        ("device: cpu, threads: 1, tensor_parallel: 0", r"must be a positive integer"),
        ("device: mps, threads: 1, tensor_parallel: 2", r"runs on cpu \(gloo\) or cuda"),
    ],
)
def test_tensor_parallel_is_validated(folders, change, message, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    target, draft, _ = folders
    text = TP_MAP.replace("device: cpu, threads: 1, tensor_parallel: 2", change)
    with pytest.raises(DeviceMapError, match=r"devices\.cpus\.tensor_parallel: .*" + message):
        api.compile(target, draft, text, max_len=128)


def test_a_world_of_the_wrong_size_is_named(folders, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    target, draft, _ = folders
    with pytest.raises(
        DeviceMapError, match=r"torchrun started 4 processes: use --nproc-per-node 2"
    ):
        api.compile(target, draft, TP_MAP, max_len=128)


def test_a_tp_draft_is_rejected(folders):
    target, draft, _ = folders
    text = ONE.replace("draft: {backend: torch, device: cpu, threads: 1}",
                       "draft: {backend: torch, device: cpu, tensor_parallel: 2}")  # fmt: skip
    with pytest.raises(
        DeviceMapError, match=r"devices\.draft\.tensor_parallel: applies to the target only"
    ):
        api.compile(target, draft, text, max_len=128)
