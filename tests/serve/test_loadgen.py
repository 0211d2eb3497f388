"""The load run's report counts every request (no timings are checked)."""

from mirror_sd.serve.loadgen import percentile, run_load
from tests.serve.conftest import MODEL


def test_percentile_nearest_rank():
    assert percentile([], 50) == 0.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([5.0], 99) == 5.0


def test_load_run_reports_every_request(server):
    report = run_load(server.url, MODEL, clients=3, requests=7, max_tokens=4)
    assert report.requests == 7 and report.errors == 0
    assert (
        report.latency_p50_s <= report.latency_p99_s and report.ttft_p50_s <= report.latency_p99_s
    )
    assert report.tokens_per_s > 0 and report.markdown_row().startswith("| 3 | 7 | 0 |")
