"""compile() with `draft_streams` (speculative streaming in the draft), end to end on tiny
models: the stream rows reach the torch and ONNX Runtime drafts, output stays the target's,
describe() says what runs, the cost model turns unprofitable streams off, bad settings are
clear errors."""

from __future__ import annotations

import pytest
import torch

import mirror_sd.api as api
from mirror_sd.graphs.streams import StreamTable
from mirror_sd.partition.cost_model import Profile
from tests.conftest import TORCH_DRAFT_MAP, tiny_pair
from tests.test_api_vocab_trim import FIXED, ORT_DRAFT_MAP, _lossless

V = 97


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    target, draft, root = tiny_pair(tmp_path_factory.mktemp("streams"))
    rows = torch.randn(2, 64, generator=torch.Generator().manual_seed(0)) * 0.1
    streams = [{"stream": j + 1, "draft_top1": a} for j, a in enumerate((0.6, 0.4))]
    table = StreamTable(rows, V, {"agreement": {"after": {"streams": streams}}}).save(
        root / "table"
    )
    return target, draft, root, table


@pytest.mark.parametrize("device_map", [TORCH_DRAFT_MAP, ORT_DRAFT_MAP % "int8"])
def test_plans_with_stream_rows_are_lossless(folders, device_map):
    target, draft, root, table = folders
    with api.compile(target, draft, device_map, cache=root, onnx_dir=root / "onnx",
                     draft_streams=str(table), **FIXED) as p:  # fmt: skip
        assert p.draft_streams == [V, V + 1] and p.report.draft_streams_used
        assert "draft streams: 2 stream row(s)" in api.describe(p)
        assert "60%, 40%" in api.describe(p)
        _lossless(p)
        if "onnxruntime" in device_map:
            assert p.draft.sessions.path.name.startswith("model.streams-")


def _profile(extra_row_cost: float) -> Profile:
    """A profile whose draft forward costs 10 ms + `extra_row_cost` per row beyond one."""
    t_draft = {b: 0.010 + extra_row_cost * (b - 1) for b in (1, 2, 4, 8, 16)}
    return Profile(num_layers=6, t_target={n: 0.05 + 0.001 * n for n in range(1, 40)},
                   t_draft=t_draft)  # fmt: skip


@pytest.mark.parametrize(("extra", "used"), [(0.0005, True), (0.02, False)])
def test_the_cost_model_keeps_streams_only_where_they_pay(folders, extra, used):
    target, draft, root, table = folders
    with api.compile(target, draft, TORCH_DRAFT_MAP, cache=root, draft_streams=str(table),
                     profile_data=_profile(extra), mode="auto", exit_layer=3,
                     max_len=256) as p:  # fmt: skip
        assert p.report.draft_streams_used is used
        assert p.draft_streams == ([V, V + 1] if used else [])
        assert ("off (mode auto): the one-token chain" in api.describe(p)) is not used
        _lossless(p, "w3 w1")
    with api.compile(target, draft, TORCH_DRAFT_MAP, cache=root, draft_streams=str(table),
                     profile_data=_profile(extra), mode="speculative", exit_layer=3,
                     max_len=256) as p:  # fmt: skip
        assert p.report.draft_streams_used  # a mode the user fixed runs them as asked


def test_bad_stream_settings_are_clear_errors(folders, tmp_path):
    target, draft, root, _ = folders
    with pytest.raises(FileNotFoundError, match="mirror-sd train streams"):
        api.compile(target, draft, TORCH_DRAFT_MAP, cache=root, draft_streams=str(tmp_path),
                    **FIXED)  # fmt: skip
    with pytest.raises(FileNotFoundError, match="run `mirror-sd train streams"):
        api.compile(target, draft, TORCH_DRAFT_MAP, cache=tmp_path, draft_streams="trained",
                    **FIXED)  # fmt: skip
    wrong = StreamTable(torch.zeros(2, 32), V).save(tmp_path / "wrong")
    with pytest.raises(ValueError, match="train streams for this draft"):
        api.compile(target, draft, TORCH_DRAFT_MAP, cache=root, draft_streams=str(wrong),
                    **FIXED)  # fmt: skip
    with pytest.raises(ValueError, match="speculation.draft_streams"):
        api.compile(target, draft, TORCH_DRAFT_MAP, cache=root, draft_streams="", **FIXED)
