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


def test_a_shared_system_prompt_is_served_from_the_prefix_cache(plan):
    from tests.serve.conftest import metrics, running

    with running(plan, prefix_cache=True) as server:
        report = run_load(server.url, MODEL, clients=2, requests=6, max_tokens=4,
                          system="w9 w8 w7 w6 w5 w4 w3 w2 w1")  # fmt: skip
        m = metrics(server)
    assert report.requests == 6 and report.ttft_p50_s <= report.ttft_p95_s <= report.ttft_p99_s
    # every request but the first joins with the system prompt retained (two clients: the
    # second of the first pair may join before the first one finished)
    assert m[("mirror_sd_prefix_cache_hits_total", ())] >= 4
    assert m[("mirror_sd_prefix_cache_reused_tokens_total", ())] >= 4 * 9
