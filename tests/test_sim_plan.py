"""`backend: sim` in a live plan: compile() plans from the sim profile (no measuring), runs the
models on the host, keeps the target's output, and says which devices are simulated."""

import pytest

import mirror_sd.api as api
from mirror_sd.partition import DeviceMapError, Profile
from tests.conftest import tiny_pair

SIM_MAP = """
version: 1
devices:
  gpu: {backend: sim, profile: profiles/gpu.json}
  npu: {backend: sim, profile: profiles/npu.json}
placement: {target: gpu, draft: npu}
speculation: {mode: auto, exit_layer: auto, branch_budget: auto}
"""


def _profile(num_layers: int, overlap_slowdown: float, t_draft_1: float) -> Profile:
    """A cheap draft beside a target that verifies 16 rows for the price of one."""
    return Profile(
        num_layers=num_layers,
        t_target={1: 1.0, 16: 1.0},
        t_draft={1: t_draft_1, 16: 16 * t_draft_1},
        accept_rate=0.8,
        hit_rate_by_exit_layer={layer: 0.6 for layer in range(1, num_layers)},
        overlap_slowdown=overlap_slowdown,
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("models"))


def _map(tmp_path, gpu: Profile, npu: Profile):
    (tmp_path / "profiles").mkdir(parents=True, exist_ok=True)
    gpu.save(tmp_path / "profiles" / "gpu.json")
    npu.save(tmp_path / "profiles" / "npu.json")
    path = tmp_path / "sim.yaml"
    path.write_text(SIM_MAP)
    return path


@pytest.mark.parametrize(("f", "expected"), [(1.0, "mirror"), (3.0, "speculative")])
def test_a_sim_plan_is_planned_from_its_profiles_and_decodes_as_the_target(
    folders, tmp_path, f, expected
):
    target, draft, _ = folders
    # the draft's own file gives t_draft: 0.05 s per step (the target's file says 10 s)
    path = _map(tmp_path, _profile(6, f, 10.0), _profile(6, 1.0, 0.05))
    with api.compile(target, draft, path, max_len=128) as plan:
        assert plan.report.profile.t_draft[1] == 0.05  # from npu.json, not measured here
        assert plan.spec.mode == expected  # the cost model's verdict for the simulated pair
        text = api.describe(plan)
        assert "sim gpu (profile" in text and "sim npu (profile" in text
        ref = plan.generate("w1 w2 w3", 16, mode="autoregressive").tokens
        for mode in ("speculative", "mirror"):
            assert plan.generate("w1 w2 w3", 16, mode=mode).tokens == ref, mode


def test_a_saved_sim_plan_loads_from_another_folder(folders, tmp_path, monkeypatch):
    target, draft, _ = folders
    path = _map(tmp_path / "maps", _profile(6, 3.0, 0.05), _profile(6, 3.0, 0.05))
    with api.compile(target, draft, path, max_len=128) as plan:
        ref = plan.generate("w1 w2", 8).tokens
        api.save(plan, tmp_path / "plan")
    monkeypatch.chdir(tmp_path / "plan")  # the map's relative paths no longer resolve from here
    with api.load(tmp_path / "plan") as again:
        assert again.spec.mode == "speculative"
        assert again.generate("w1 w2", 8).tokens == ref


def test_sim_profile_errors_name_the_device(folders, tmp_path):
    target, draft, _ = folders
    path = _map(tmp_path, _profile(6, 1.0, 0.05), _profile(6, 1.0, 0.05))
    (tmp_path / "profiles" / "npu.json").unlink()
    with pytest.raises(DeviceMapError, match=r"devices\.npu\.profile.*no profile file"):
        api.compile(target, draft, path, max_len=128)
    path = _map(tmp_path, _profile(12, 1.0, 0.05), _profile(12, 1.0, 0.05))
    with pytest.raises(DeviceMapError, match="12-layer target, this target has 6 layers"):
        api.compile(target, draft, path, max_len=128)
