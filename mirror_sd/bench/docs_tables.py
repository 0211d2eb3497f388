"""Tables in the docs made from the results files, so that every number in them can be
re-checked: `mirror-sd bench --docs docs/benchmarks.md [--check]`.

A generated table sits between two markers in a markdown file:

    <!-- results: benchmarks/results/RUN [ref=ov-ar] [methods=ar,speculative,ov-ar] -->
    | method | tok/s (total) | ... |
    <!-- /results -->

RUN is a results folder of `mirror-sd bench` (its results.json, or the records.jsonl of a run
still going), relative to the repository root (the folder above docs/). The table is rebuilt
from the per-prompt records with the same aggregation as results.md (`report.aggregate`):
total tokens ÷ total time, the ratio to our `ar`, against the reference (`ref`, default the
run's fastest peer) the total ratio, median per-prompt ratio and prompts won, tokens per
round, milliseconds per round (and the draft's part of them), and the outputs identical to
our `ar`. Prose around the tables stays written
by hand; `--check` fails when a table no longer matches its results. The identity-at-scale
tables (`<!-- identity: ... -->`) are rebuilt here too (`identity_table`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mirror_sd.bench import identity_table, report
from mirror_sd.bench.jsonl import read_jsonl
from mirror_sd.bench.runner import OWN_CONVERSION

BLOCK = re.compile(
    r"(?P<open><!-- results: (?P<args>[^>]*?) -->\n)(?P<body>.*?)(?P<close><!-- /results -->)",
    re.S,
)


def load_run(folder: Path) -> tuple[list[dict], list[str]]:
    """(records, methods in the run's order) of a results folder."""
    res, rec = folder / "results.json", folder / "records.jsonl"
    if res.is_file():
        doc = json.loads(res.read_text())
        return doc["records"], list(doc["settings"]["methods"])
    if rec.is_file():
        records = []
        for row in read_jsonl(rec):  # one question's records (a list), or one record
            records += row if isinstance(row, list) else [row]
        methods = list(dict.fromkeys(r["method"] for r in records))
        return records, methods
    raise ValueError(
        f"{folder}: no results.json or records.jsonl (is it a `mirror-sd bench --out` folder?)"
    )


def parse_args(text: str) -> tuple[str, dict[str, str]]:
    """'RUN ref=ov-ar methods=a,b' -> ('RUN', {'ref': 'ov-ar', 'methods': 'a,b'})."""
    path, *opts = text.split()
    out = {}
    for o in opts:
        key, sep, value = o.partition("=")
        if not sep or key not in ("ref", "methods"):
            raise ValueError(f"results marker {text!r}: {o!r} is not ref=METHOD or methods=A,B")
        out[key] = value
    return path, out


def table(records: list[dict], methods: list[str], ref: str | None = None,
          only: list[str] | None = None) -> str:  # fmt: skip
    """The markdown table of one run (see the module docstring)."""
    agg = report.aggregate(records, methods)
    ref = ref or agg.get("fastest_peer")
    if ref is not None and ref not in methods:
        raise ValueError(f"ref={ref}: not a method of this run ({', '.join(methods)})")
    shown = only or methods
    missing = [m for m in shown if m not in methods]
    if missing:
        raise ValueError(f"methods={','.join(missing)}: not in this run ({', '.join(methods)})")
    vs_ref = f"vs `{ref}`: total · median · won" if ref else "vs a peer"
    header = ["method", "tok/s (total)", "× our `ar`", vs_ref, "tokens/round",
              "ms/round (drafting)", "identical to our `ar`"]  # fmt: skip
    rows = []
    for m in shown:
        s = agg[m][report.OVERALL]
        vs = s.get("vs", {})
        c = vs.get(ref) if ref else None
        vs_cell = "–" if c is None else (
            f"{report.cell(c['total_ratio'], '.2f', '×')} · {report.cell(c['median_ratio'], '.2f', '×')}"
            f" · {c['won']}/{c['prompts']}")  # fmt: skip
        same, n = s.get("identical_to_ar"), s["questions"]
        if m == "ar" or same is None:
            same_cell = "–"
        elif m.startswith(OWN_CONVERSION):  # its own conversion of the checkpoint
            same_cell = f"another model ({round(same * n)}/{n})"
        else:
            same_cell = f"{round(same * n)}/{n}"
        rows.append([
            f"`{m}`", report.cell(s["total_tokens_per_s"]),
            report.cell((vs.get("ar") or {}).get("total_ratio"), ".2f", "×"), vs_cell,
            report.cell(s["mean_accepted"]), round_ms(records, m),
            same_cell,
        ])  # fmt: skip
    return "\n".join(report.markdown_table(header, rows)) + "\n"


def round_ms(records: list[dict], method: str) -> str:
    """Wall time per round over the method's prompts (prefill included), and in brackets the
    draft's share of it (its `draft_s`, where the method drafts): '361 (134)'."""
    rows = [r for r in records if r["method"] == method]
    rounds = sum(len(r.get("accept_lengths") or []) for r in rows)
    if not rounds:
        return "–"
    ms = 1e3 * sum(r["wall_time"] for r in rows) / rounds
    draft = sum(r.get("draft_s") or 0.0 for r in rows)
    return f"{ms:.0f}" + (f" ({1e3 * draft / rounds:.0f})" if draft > 0 else "")


def regenerate(doc: Path, root: Path | None = None) -> tuple[str, list[str]]:
    """(the document with every generated table rebuilt, the runs whose tables changed)."""
    root = root or doc.resolve().parent.parent
    text, changed = doc.read_text(), []

    def rebuild(m: re.Match) -> str:
        path, opts = parse_args(m["args"])
        records, methods = load_run(root / path)
        only = opts["methods"].split(",") if "methods" in opts else None
        body = table(records, methods, opts.get("ref"), only)
        if body != m["body"]:
            changed.append(path)
        return m["open"] + body + m["close"]

    return identity_table.regenerate(BLOCK.sub(rebuild, text), root, changed), changed


def main_docs(doc: Path, check: bool) -> int:
    """`mirror-sd bench --docs FILE [--check]`: rewrite (or, with check, compare) the tables."""
    if not doc.is_file():
        raise ValueError(f"--docs {doc}: no such file")
    new, changed = regenerate(doc)
    n = len(BLOCK.findall(doc.read_text())) + len(identity_table.BLOCK.findall(doc.read_text()))
    if check:
        if changed:
            print(f"{doc}: {len(changed)} of {n} generated tables differ from their results: "
                  f"{', '.join(changed)}; run `mirror-sd bench --docs {doc}` to rewrite them")  # fmt: skip
            return 1
        print(f"{doc}: all {n} generated tables match their results")
        return 0
    doc.write_text(new)
    print(f"{doc}: rebuilt {n} generated tables ({len(changed)} changed)")
    return 0
