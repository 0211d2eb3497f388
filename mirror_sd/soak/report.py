"""What a soak reports: progress lines on stderr, RSS and thread samples and the flatness
numbers drawn from them, and the files written to `--out` (soak.json, soak.md and
rss_threads.png)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

WARMUP_SHARE = 0.1  # samples in the first tenth of a run are warm-up (caches and pools fill)
PROGRESS_S = 30.0  # seconds between progress lines
COLORS = {"raise": "tab:red", "hang": "tab:purple"}


def sample(**where) -> dict:
    """RSS (MiB), Python threads and OS threads of this process now, with `where`."""
    try:
        import psutil

        proc = psutil.Process()
        rss, os_threads = proc.memory_info().rss / 2**20, proc.num_threads()
    except ImportError:
        status = dict(
            line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
        )
        rss, os_threads = int(status["VmRSS"].split()[0]) / 1024, int(status["Threads"])
    return {**where, "rss_mib": round(rss, 1), "threads": threading.active_count(),
            "os_threads": os_threads}  # fmt: skip


def flatness(samples: list[dict], x: str, per: float, unit: str) -> dict:
    """The RSS slope over the second half of the run (least squares, MiB per `per` of `x`) and
    the spread (max - min) of thread counts after warm-up (the first WARMUP_SHARE of samples)."""
    if not samples:
        return {}
    half = samples[len(samples) // 2 :]
    xs, ys = [s[x] for s in half], [s["rss_mib"] for s in half]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((v - mx) ** 2 for v in xs)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / var if var else 0.0
    warm = samples[int(len(samples) * WARMUP_SHARE) :] or samples
    rss = [s["rss_mib"] for s in samples]
    return {
        "rss_slope_second_half": round(slope * per, 2), "rss_slope_unit": unit,
        "rss_first_mib": rss[0], "rss_last_mib": rss[-1], "rss_max_mib": max(rss),
        "threads_spread_after_warmup": max(s["threads"] for s in warm)
        - min(s["threads"] for s in warm),
        "os_threads_spread_after_warmup": max(s["os_threads"] for s in warm)
        - min(s["os_threads"] for s in warm),
        "warmup_samples": len(samples) - len(warm),
    }  # fmt: skip


def plan_info(plan) -> dict:
    return {"spec": asdict(plan.spec), "target": plan.target_device.label,
            "draft": plan.draft_device.label if plan.draft_device else None,
            "batch_policy": [s.describe() for s in plan.batch_policy]}  # fmt: skip


def write_report(out: Path, doc: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "soak.md").write_text(markdown(doc))
    plot(doc, out / "rss_threads.png")


def markdown(doc: dict) -> str:
    c, f, kind = doc["counts"], doc["flatness"], doc["kind"]
    fired = ", ".join(f"{k} {v}" for k, v in c["faults_fired"].items()) or "none"
    rows = [("verdict", "PASS" if doc["ok"] else "FAIL")]
    if kind == "sequential":
        rows += [("generations", c["generations"]),
                 ("identical to target-only greedy", c["identical"]),
                 ("changed", c["changed"]), ("lost (raised)", c["lost"]),
                 ("by mode", ", ".join(f"{k} {v}" for k, v in c["by_mode"].items())),
                 ("draft faults fired (unseen)", f"{fired} ({c['faults_unseen']})"),
                 ("fallbacks (spontaneous)", f"{c['fallbacks']} ({c['spontaneous_fallbacks']})")]  # fmt: skip
    else:
        mx = c["metrics"]
        rows += [("requests sent", c["sent"]), ("answered, identical", c["answered"]),
                 ("changed", c["changed"]), ("cancelled by the client", c["cancelled_by_client"]),
                 ("malformed, 4xx", c["rejected_4xx"]),
                 ("unexpected status", c["unexpected_status"]), ("lost", c["lost"]),
                 ("draft faults armed / fired (unseen)",
                  f"{c['faults_armed']} / {fired} ({c['faults_unseen']})"),
                 ("/metrics draft_fallbacks_total", mx["draft_fallbacks_total"]),
                 ("/metrics 200s (expected)",
                  f"{mx['http_200_generation_endpoints']:.0f} ({mx['expected_200']})")]  # fmt: skip
    margins = sorted(m["margin"] for m in doc["mismatches"] if "margin" in m)
    if margins:
        rows.append(("target's top-2 logit margin where changed outputs part",
                     ", ".join(f"{x:.3g}" for x in margins[:10])))  # fmt: skip
    if f:
        rows += [("RSS first / last / max (MiB)",
                  f"{f['rss_first_mib']} / {f['rss_last_mib']} / {f['rss_max_mib']}"),
                 ("RSS slope, second half", f"{f['rss_slope_second_half']} {f['rss_slope_unit']}"),
                 ("threads max - min after warm-up (Python / OS)",
                  f"{f['threads_spread_after_warmup']} / {f['os_threads_spread_after_warmup']}")]  # fmt: skip
    m = doc["machine"]
    head = (f"# Soak: {kind}\n\n{doc['date']}, {m['cpu']} ({m['cores']} cores, {m['memory_gib']} "
            f"GiB), load average {m['load_average_at_start']} -> {m['load_average_at_end']}, "
            f"{doc['wall_s']:.0f} s\n\n`{doc['command']}`\n\n| | |\n| --- | --- |\n")  # fmt: skip
    return head + "".join(f"| {k} | {v} |\n" for k, v in rows) + "\n![](rss_threads.png)\n"


def plot(doc: dict, path: Path) -> None:
    """RSS and thread counts over the run, the faults that fired marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    x, samples = doc["x"], doc["samples"]
    xs = [s[x] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5))
    top.plot(xs, [s["rss_mib"] for s in samples], color="tab:blue")
    top.set_ylabel("RSS (MiB)")
    bottom.plot(xs, [s["threads"] for s in samples], label="Python threads")
    bottom.plot(xs, [s["os_threads"] for s in samples], label="OS threads")
    bottom.set_ylabel("threads")
    for f in doc["faults"]:
        if f.get(x) is not None:
            for ax in (top, bottom):
                ax.axvline(f[x], color=COLORS[f["kind"]], ls=":", lw=0.9)
    marks = [Line2D([], [], color=c, ls=":", label=f"draft fault: {k}") for k, c in COLORS.items()]
    if doc["kind"] == "server":  # after this the clients finish what they sent, then leave
        for ax in (top, bottom):
            ax.axvline(doc["settings"]["duration"], color="gray", ls="--", lw=0.9)
        marks.append(Line2D([], [], color="gray", ls="--", label="clients stop"))
    bottom.legend(handles=bottom.get_legend_handles_labels()[0] + marks, fontsize=8)
    bottom.set_xlabel("generation" if x == "i" else "seconds")
    top.set_title(f"soak ({doc['kind']}): RSS and threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress(args: argparse.Namespace, done: float, total: float, changed: int, lost: int) -> None:
    """A line on stderr at most every PROGRESS_S seconds (and at the end)."""
    now = time.monotonic()
    if not args.quiet and (done >= total or now - getattr(args, "_shown", 0.0) >= PROGRESS_S):
        args._shown = now
        print(f"[soak {args.command}: {done:.0f}/{total:.0f}, changed {changed}, lost {lost}]",
              file=sys.stderr, flush=True)  # fmt: skip
