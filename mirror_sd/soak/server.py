"""The `server` run: the OpenAI-compatible server in-process on a free port, `--clients`
client threads, a fault every `--fault-every` seconds and an RSS/thread sampler; the result
counts every request and judges every fault by /metrics."""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from pathlib import Path

from mirror_sd.serve.config import ServeConfig
from mirror_sd.serve.server import ServerThread
from mirror_sd.soak.faults import FaultInjector, metric, scrape
from mirror_sd.soak.plans import compile_plan, explain, load_prompts, parse_list, references
from mirror_sd.soak.report import flatness, plan_info, progress, sample
from mirror_sd.soak.traffic import ENDPOINTS, Traffic, client_loop


def run_server(args: argparse.Namespace) -> dict:
    plan, draft = compile_plan(args)
    args.plan_max_len = int(plan.spec.max_len)
    model = Path(args.target).name
    try:
        prompts, lengths = load_prompts(args), parse_list(args.lengths, int)
        refs = references(plan, prompts, lengths, tuple(parse_list(args.endpoints, str)))
        config = ServeConfig(model, port=0, engine=args.engine, prefix_cache=args.prefix_cache)
        with ServerThread(plan, config) as server:
            base = server.url.removesuffix("/v1")
            start = time.monotonic()
            traffic = Traffic(start + args.duration)
            samples, stop = [sample(t=0.0, requests=0)], threading.Event()

            def sampler() -> None:
                while not stop.wait(args.sample_every):
                    samples.append(sample(t=round(time.monotonic() - start, 2),
                                          requests=len(traffic.records)))  # fmt: skip
                    progress(args, time.monotonic() - start, args.duration, *bad(traffic))

            clients = [threading.Thread(target=client_loop, name=f"soak-client-{c}",
                                        args=(c, server.url, model, prompts, refs, traffic, args,
                                              start), daemon=True) for c in range(args.clients)]  # fmt: skip
            watcher = threading.Thread(target=sampler, name="soak-sampler", daemon=True)
            watcher.start()
            with FaultInjector(plan, draft, base, traffic, args.fault_every, start,
                               args.seed) as injector:  # fmt: skip
                for c in clients:
                    c.start()
                for c in clients:
                    c.join()
            injector.finish()
            stop.set()
            watcher.join()
            samples.append(sample(t=round(time.monotonic() - start, 2),
                                  requests=len(traffic.records)))  # fmt: skip
            final = scrape(base)
        explain(plan, [r for r in traffic.records if r["outcome"] == "changed"], refs)
        return server_result(plan, traffic.records, injector, samples, final, args.duration)
    finally:
        plan.close()


def bad(traffic: Traffic) -> tuple[int, int]:
    """(changed, lost) so far."""
    outcomes = Counter(r["outcome"] for r in list(traffic.records))
    return outcomes["changed"], outcomes["lost"] + outcomes["unexpected"]


def server_result(plan, records: list[dict], injector: FaultInjector, samples: list[dict],
                  m: dict, duration: float) -> dict:  # fmt: skip
    outcomes = Counter(r["outcome"] for r in records)
    faults = injector.faults
    fired = [f for f in faults if f.get("fired")]
    http_200 = sum(metric(m, "requests_total", endpoint=f"/v1{p}", status="200")
                   for p in ENDPOINTS.values())  # fmt: skip
    counts = {
        "sent": len(records), "answered": outcomes["ok"], "changed": outcomes["changed"],
        "cancelled_by_client": outcomes["cancelled"], "rejected_4xx": outcomes["rejected"],
        "unexpected_status": outcomes["unexpected"], "lost": outcomes["lost"],
        "streamed": sum(bool(r.get("stream")) for r in records),
        "by_kind": dict(Counter(r["kind"].split(":")[0] for r in records if "kind" in r)),
        "faults_armed": len(faults), "faults_fired": dict(Counter(f["kind"] for f in fired)),
        "faults_unseen": sum(not f["seen"] for f in fired),
        "metrics": {
            "draft_fallbacks_total": metric(m, "draft_fallbacks_total"),
            "client_disconnects_total": metric(m, "client_disconnects_total"),
            "generations_completed": metric(m, "generations_total", outcome="completed"),
            "generations_cancelled": metric(m, "generations_total", outcome="cancelled"),
            "http_200_generation_endpoints": http_200,
            "expected_200": sum(r.get("status") == 200 for r in records),
        },
    }  # fmt: skip
    ok = not (outcomes["changed"] or outcomes["lost"] or outcomes["unexpected"]
              or counts["faults_unseen"] or injector.errors or (faults and not fired))  # fmt: skip
    return {"kind": "server", "plan": plan_info(plan), "counts": counts, "ok": ok,
            "mismatches": [r for r in records if r["outcome"] == "changed"],
            "lost": [r for r in records if r["outcome"] in ("lost", "unexpected")],
            "faults": faults, "errors": injector.errors, "samples": samples,
            "flatness": flatness([s for s in samples if 0 < s["t"] < duration], "t", 3600,
                                 "MiB per hour"),  # while the clients run
            "requests": records, "x": "t"}  # fmt: skip
