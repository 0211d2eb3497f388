"""The identity-at-scale table in the docs, made from the runs' token ids (#26):

    <!-- identity: RUN [RUN ...] [BATCH_RUN=REFERENCE_RUN ...] -->
    | run | questions | methods | generations | identical to `ar` |
    <!-- /identity -->

RUN is a `mirror-sd bench --out` folder (its records.jsonl: every method's token ids per
question); each row counts its questions, its generations and how many of the non-`ar` ones
are token-identical to `ar` on the same question. BATCH_RUN=REFERENCE_RUN is a `mirror-sd
bench --batch --reference REFERENCE_RUN` folder (its batch_records.jsonl): its batched
sequences of batch size > 1 against the reference's `ar`. A `scripts/soak.py replay --out`
folder (its replay_records.jsonl: each answer's token ids and text judged against its
reference's `ar`) as RUN counts the server's answers. `mirror-sd bench --docs` rebuilds
these tables with the results tables (`docs_tables`); `--check` fails when one is stale.
"""

from __future__ import annotations

import re
from pathlib import Path

from mirror_sd.bench.jsonl import read_jsonl

BLOCK = re.compile(
    r"(?P<open><!-- identity: (?P<args>[^>]*?) -->\n)(?P<body>.*?)(?P<close><!-- /identity -->)",
    re.S,
)
HEADER = ("| run | questions | methods | generations | identical to `ar` |\n"
          "| --- | --- | --- | --- | --- |\n")  # fmt: skip


def _lines(path: Path) -> list:
    if not path.is_file():
        raise ValueError(f"{path}: no such file (is the folder a `mirror-sd bench --out` run?)")
    return read_jsonl(path)


def spec_bench_row(root: Path, run: str) -> list[str]:
    """One run's row: questions, methods, generations, non-`ar` generations equal to `ar`."""
    groups = _lines(root / run / "records.jsonl")
    methods = list(dict.fromkeys(r["method"] for g in groups for r in g))
    same = other = 0
    for g in groups:
        ar = next((r["tokens"] for r in g if r["method"] == "ar"), None)
        for r in g:
            if r["method"] != "ar" and ar is not None:
                other += 1
                same += r["tokens"] == ar
    return [f"`{run}`", str(len(groups)), ", ".join(methods),
            str(sum(map(len, groups))), f"{same} of {other}"]  # fmt: skip


def batch_row(root: Path, run: str, reference: str) -> list[str]:
    """A batch run's row: its sequences of B > 1 against the reference run's `ar`."""
    ar = {r["question_id"]: r["tokens"] for g in _lines(root / reference / "records.jsonl")
          for r in g if r["method"] == "ar" and r.get("repeat", 0) == 0}  # fmt: skip
    groups = [g for g in _lines(root / run / "batch_records.jsonl") if g["batch"] > 1]
    n = max((len(t) for g in groups for t in g["tokens"]), default=0)
    pairs = [(q, t) for g in groups for q, t in zip(g["question_ids"], g["tokens"], strict=True)]
    same = sum(t == ar.get(q, [])[:n] for q, t in pairs)
    sizes = sorted({g["batch"] for g in groups})
    methods = list(dict.fromkeys(g["method"] for g in groups))
    return [f"`{run}` (B = {', '.join(map(str, sizes))}; against `{reference}`)",
            str(len({q for q, _ in pairs})), ", ".join(methods), str(len(pairs)),
            f"{same} of {len(pairs)}"]  # fmt: skip


def replay_row(root: Path, run: str) -> list[str]:
    """A replay run's row: the server's answers identical to the reference's `ar` (token ids
    and text: the replay asks for `return_token_ids`)."""
    rows = _lines(root / run / "replay_records.jsonl")
    clients = len({r["client"] for r in rows})
    return [f"`{run}` (through the server, {clients} clients)", str(len(rows)),
            "the plan's mode, batched by the server", str(len(rows)),
            f"{sum(bool(r['identical']) for r in rows)} of {len(rows)} (ids and text)"]  # fmt: skip


def table(root: Path, args: str) -> str:
    rows = []
    for item in args.split():
        run, sep, reference = item.partition("=")
        if sep:
            rows.append(batch_row(root, run, reference))
        elif (root / run / "replay_records.jsonl").is_file():
            rows.append(replay_row(root, run))
        else:
            rows.append(spec_bench_row(root, run))
    return HEADER + "".join("| " + " | ".join(r) + " |\n" for r in rows)


def regenerate(text: str, root: Path, changed: list[str]) -> str:
    """`text` with every identity table rebuilt; the marker of each changed one appended to
    `changed`."""

    def rebuild(m: re.Match) -> str:
        body = table(root, m["args"])
        if body != m["body"]:
            changed.append(m["args"])
        return m["open"] + body + m["close"]

    return BLOCK.sub(rebuild, text)
