"""Traces of real mirror generations: Chrome trace structure, summary numbers, timeline PNG."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import defaultdict
from types import SimpleNamespace

import pytest

from mirror_sd import cli
from mirror_sd.runtime.trace_plot import plot_timeline
from mirror_sd.runtime.trace_tools import TraceError, load_trace, summarize
from tests.runtime.conftest import make_plan, tiny_model
from tests.runtime.test_faults import FaultyRunner

NODE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+(\+[a-z0-9_]+)*)+$")  # target.prefix+exit_head
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One traced mirror generation on a 4-layer target and a 2-layer draft."""
    tmp = tmp_path_factory.mktemp("tracing")
    target = tiny_model(tmp, "qwen2", seed=0, num_hidden_layers=4, hidden_size=128)
    draft = tiny_model(tmp, "qwen2", seed=1, num_hidden_layers=2)
    plan = make_plan(target, draft, mode="mirror")
    try:
        res = plan.generate([5, 6, 7, 8], 24, trace=str(tmp / "trace.json"))
        busy = {"gpu": plan.target_pipe.busy_s, "npu": plan.draft_pipe.busy_s}
    finally:
        plan.close()
    trace = json.loads((tmp / "trace.json").read_text())
    return SimpleNamespace(res=res, path=tmp / "trace.json", trace=trace, busy=busy)


def events(trace: dict, ph: str, name: str | None = None) -> list[dict]:
    return [e for e in trace["traceEvents"] if e["ph"] == ph and name in (None, e["name"])]


def pid_of(trace: dict, alias: str) -> int:
    (pid,) = [e["pid"] for e in events(trace, "M", "process_name")
              if e["args"]["name"].startswith(f"{alias} (")]  # fmt: skip
    return pid


def overlaps(a: dict, b: dict) -> bool:
    return a["ts"] < b["ts"] + b["dur"] and b["ts"] < a["ts"] + a["dur"]


# --- structure of a real trace -------------------------------------------------------------
def test_trace_is_chrome_json(run):
    assert isinstance(run.trace["traceEvents"], list) and run.trace["traceEvents"]
    assert run.res.trace_path == str(run.path)
    assert load_trace(run.path) == run.trace


def test_each_device_process_is_named_with_its_backend(run):
    names = {e["args"]["name"] for e in events(run.trace, "M", "process_name")}
    assert names == {"gpu (torch cpu)", "npu (torch cpu)", "scheduler"}


def test_one_thread_per_pipeline(run):
    threads = defaultdict(list)
    for e in events(run.trace, "M", "thread_name"):
        threads[e["pid"]].append(e["args"]["name"])
    assert threads[pid_of(run.trace, "gpu")] == ["verification"]
    assert threads[pid_of(run.trace, "npu")] == ["draft streaming"]
    for e in events(run.trace, "X"):
        owner = "gpu" if e["name"].startswith("target.") else "npu"
        assert e["pid"] == pid_of(run.trace, owner), e


def test_slices_are_well_formed_graph_nodes(run):
    slices = events(run.trace, "X")
    assert {e["name"] for e in slices} >= {
        "target.prefill", "target.prefix+exit_head", "target.suffix", "draft.chain", "draft.rollout"
    }  # fmt: skip
    for e in slices:
        assert e["ts"] >= 0 and e["dur"] >= 0, e
        assert NODE.match(e["name"]), e["name"]


def test_slices_on_one_thread_do_not_overlap(run):
    lanes = defaultdict(list)
    for e in events(run.trace, "X"):
        lanes[e["pid"], e["tid"]].append(e)
    for lane in lanes.values():
        lane.sort(key=lambda e: e["ts"])
        for a, b in zip(lane, lane[1:], strict=False):
            assert b["ts"] >= a["ts"] + a["dur"] - 0.01, (a, b)  # 0.01 µs: rounding


def test_every_flow_start_has_a_matching_finish(run):
    ends = defaultdict(dict)
    for e in events(run.trace, "s") + events(run.trace, "f"):
        assert e["ph"] not in ends[e["id"]], f"flow id {e['id']} has two {e['ph']!r} ends"
        ends[e["id"]][e["ph"]] = e
    gpu, npu = pid_of(run.trace, "gpu"), pid_of(run.trace, "npu")
    direction = {"token channel": (gpu, npu), "rendezvous": (npu, gpu)}
    for fid, pair in ends.items():
        assert set(pair) == {"s", "f"}, f"flow id {fid} is missing an end"
        s, f = pair["s"], pair["f"]
        assert s["name"] == f["name"] and f["ts"] >= s["ts"]
        assert (s["pid"], f["pid"]) == direction[s["name"]]
    assert len(events(run.trace, "s", "token channel")) == len(
        events(run.trace, "X", "target.suffix")
    )


def test_counters_match_the_generation(run):
    tokens = events(run.trace, "C", "tokens")
    accepted = events(run.trace, "C", "accepted")
    assert tokens and accepted
    assert tokens[-1]["args"]["committed"] == len(run.res.tokens)
    assert [e["args"]["accepted"] for e in accepted] == [r.accepted for r in run.res.rounds]


def test_target_suffix_and_draft_rollout_run_at_the_same_time(run):
    """Real concurrency: two worker threads, torch kernels release the GIL."""
    suffixes = events(run.trace, "X", "target.suffix")
    rollouts = events(run.trace, "X", "draft.rollout")
    assert len(suffixes) == len(rollouts) > 0
    assert any(overlaps(s, r) for s in suffixes for r in rollouts)


# --- summary and timeline of the real trace ------------------------------------------------
def test_summary_is_consistent_with_the_run(run):
    summary = summarize(run.trace)
    stats = run.res.stats
    assert summary.rounds == stats.rounds
    assert summary.mirror_rounds == len(events(run.trace, "X", "target.suffix"))
    assert summary.tokens == stats.new_tokens
    assert summary.accepted == sum(r.accepted for r in run.res.rounds)
    assert [d.name for d in summary.devices] == ["gpu (torch cpu)", "npu (torch cpu)"]
    for d in summary.devices:
        assert 0 < d.busy_s <= summary.span_s and 0 < d.busy_frac <= 1
        assert d.busy_s == pytest.approx(run.busy[d.name.split()[0]], abs=1e-4)
    assert 0 < summary.overlap_frac <= 1
    assert summary.exposed_draft_s == pytest.approx(summary.chain_s + summary.rollout_overrun_s)
    # the scheduler times chain drafting from submit to result, so it can only see more
    assert summary.exposed_draft_s <= stats.exposed_draft_s + 1e-5
    if summary.hits is not None:  # once the scheduler emits the per-round "hits" counter
        mirrored = [r for r in run.res.rounds if r.hit is not None]
        assert (summary.hits, summary.verdicts) == (sum(r.hit for r in mirrored), len(mirrored))
    assert not summary.fallbacks
    table = summary.table()
    assert "gpu (torch cpu)" in table and "overlap" in table and "exposed draft" in table


def test_plot_timeline_writes_a_png(run, tmp_path):
    pytest.importorskip("matplotlib")
    for rounds in (4, None):
        png = plot_timeline(run.trace, tmp_path / f"timeline-{rounds}.png", max_rounds=rounds)
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_trace_summarize_command_prints_the_table(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(["trace", "summarize", str(run.path), "--png", str(tmp_path / "t.png")]) == 0
    out = capsys.readouterr().out
    assert "busy: npu (torch cpu)" in out and "timeline:" in out
    assert (tmp_path / "t.png").read_bytes().startswith(PNG_MAGIC)


def test_draft_failure_shows_as_a_fallback(tmp_path, plan_factory):
    target = tiny_model(tmp_path, "qwen2", seed=0, num_hidden_layers=4)
    draft = tiny_model(tmp_path, "qwen2", seed=1, num_hidden_layers=2)
    runner = FaultyRunner(draft, "raise", after=12)  # fails after a few mirror rounds
    plan = plan_factory(target, None, draft_runner=runner, mode="mirror", draft_timeout_s=5.0)
    with pytest.warns(UserWarning, match="target-only"):
        res = plan.generate([5, 6, 7, 8], 16, trace=str(tmp_path / "trace.json"))
    summary = summarize(load_trace(tmp_path / "trace.json"))
    (fallback,) = summary.fallbacks
    assert "RuntimeError: NPU driver lost the device" in fallback.why
    assert fallback.why == res.stats.fallback
    assert summary.rounds == res.stats.rounds > summary.mirror_rounds  # target-only rounds after
    assert "NPU driver lost the device" in summary.table()


@pytest.mark.parametrize("mode", ["speculative", "autoregressive"])
def test_plain_modes_summarize_and_plot(tmp_path, plan_factory, mode):
    target = tiny_model(tmp_path, "qwen2", seed=0, num_hidden_layers=4)
    plan = plan_factory(
        target, tiny_model(tmp_path, "qwen2", seed=1, num_hidden_layers=2), mode=mode
    )
    res = plan.generate([5, 6, 7, 8], 12, trace=str(tmp_path / "trace.json"))
    trace = load_trace(tmp_path / "trace.json")
    summary = summarize(trace)
    assert (summary.rounds, summary.mirror_rounds) == (res.stats.rounds, 0)
    assert summary.rollout_overrun_s == 0 and summary.hits is None
    assert len(summary.devices) == (2 if mode == "speculative" else 1)
    if mode == "autoregressive":
        assert summary.overlap_frac == 0 and summary.exposed_draft_s == 0
    if importlib.util.find_spec("matplotlib"):
        assert plot_timeline(trace, tmp_path / "t.png").read_bytes().startswith(PNG_MAGIC)


# --- exact numbers on a hand-made trace ----------------------------------------------------
def _hand_trace() -> dict:
    """Two mirror rounds (µs): a chain, then rollouts that overrun the suffix by 10 and 0."""

    def x(name, pid, ts, dur):
        return {"ph": "X", "name": name, "pid": pid, "tid": pid, "ts": ts, "dur": dur}

    def c(name, ts, **args):
        return {"ph": "C", "name": name, "pid": 3, "tid": 3, "ts": ts, "args": args}

    meta = [{"ph": "M", "name": "process_name", "pid": p, "args": {"name": n}}
            for p, n in ((1, "gpu (torch cuda:0)"), (2, "npu (onnxruntime QNN)"), (3, "scheduler"))]  # fmt: skip
    return {"traceEvents": meta + [
        x("draft.chain", 2, 0, 20),
        x("target.prefix+exit_head", 1, 20, 10), x("target.suffix", 1, 30, 30),
        x("draft.rollout", 2, 30, 40),
        {"ph": "s", "name": "token channel", "pid": 1, "tid": 1, "ts": 30, "id": 1},
        {"ph": "f", "name": "token channel", "pid": 2, "tid": 2, "ts": 30, "id": 1, "bp": "e"},
        c("accepted", 70, accepted=2), c("tokens", 70, committed=3), c("hits", 70, hit=1),
        x("target.prefix+exit_head", 1, 70, 10), x("target.suffix", 1, 80, 20),
        x("draft.rollout", 2, 80, 10),
        c("accepted", 100, accepted=1), c("tokens", 100, committed=5), c("hits", 100, hit=0),
        {"ph": "i", "name": "draft failed: target-only fallback", "pid": 2, "tid": 2,
         "ts": 95, "s": "p", "args": {"why": "boom"}},
    ]}  # fmt: skip


def test_summary_numbers_on_a_hand_made_trace():
    s = summarize(_hand_trace())
    assert s.span_s == pytest.approx(100e-6)
    assert s.device("gpu").busy_s == pytest.approx(70e-6)  # prefix + suffix, twice
    assert s.device("npu").busy_frac == pytest.approx(0.7)  # chain 20 + rollouts 40 + 10
    assert s.overlap_frac == pytest.approx(0.4)  # both busy 30..60 and 80..90 of 0..100
    assert s.chain_s == pytest.approx(20e-6)
    assert s.rollout_overrun_s == pytest.approx(10e-6)
    assert s.exposed_draft_s == pytest.approx(30e-6)
    assert (s.rounds, s.mirror_rounds, s.tokens, s.accepted) == (2, 2, 5, 3)
    assert (s.hits, s.verdicts, s.hit_rate) == (1, 2, 0.5)
    assert [f.why for f in s.fallbacks] == ["boom"]
    assert "1 of 2 mirror rounds (50%)" in s.table()


def test_plot_of_a_hand_made_trace(tmp_path):
    pytest.importorskip("matplotlib")
    png = plot_timeline(_hand_trace(), tmp_path / "hand.png", max_rounds=1)
    assert png.read_bytes().startswith(PNG_MAGIC)


# --- validation ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON at line 1"),
        ('{"events": []}', "'traceEvents' list"),
        ('{"traceEvents": [1]}', r"traceEvents\[0\]: an event must be an object"),
        ('[{"ph": "B", "name": "a", "pid": 1, "tid": 1, "ts": 0}]', "phase 'B' is not supported"),
        (
            '{"traceEvents": [{"ph": "X", "name": "target.suffix", "pid": 1, "tid": 1, "ts": 0}]}',
            r"traceEvents\[0\] \(ph 'X', name 'target.suffix'\): 'dur' must be a number >= 0",
        ),  # fmt: skip
        (
            '{"traceEvents": [{"ph": "s", "name": "rendezvous", "pid": 1, "tid": 1, "ts": 0}]}',
            "flow events need an 'id'",
        ),  # fmt: skip
        (
            '{"traceEvents": [{"ph": "C", "name": "tokens", "pid": 3, "ts": 0, "args": {"n": "x"}}]}',
            "counter 'args' must map series names to numbers",
        ),  # fmt: skip
    ],
)
def test_load_trace_names_what_is_malformed(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(TraceError, match=message):
        load_trace(path)


def test_missing_trace_file_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(TraceError, match="cannot read trace file"):
        load_trace(tmp_path / "nope.json")
    assert cli.main(["trace", "summarize", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mirror-sd: error: ") and "cannot read trace file" in err


def test_unwritable_png_is_a_clear_error(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "no-such-folder" / "t.png"
    assert cli.main(["trace", "summarize", str(run.path), "--png", str(png)]) == 2
    assert capsys.readouterr().err.startswith("mirror-sd: error: trace summarize: ")
