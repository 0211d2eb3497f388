"""Spec-Bench questions (Xia et al. 2024, Apache-2.0): six tasks, first turn only.

Spec-Bench's `question.jsonl` has 480 questions. Its six tasks are `mt_bench` (the 80
MT-Bench questions, whose `category` is one of eight MT-Bench categories) and five
categories that are tasks of their own: translation, summarization, qa, math_reasoning
and rag. `load_questions` keeps the first `per_category` questions of each task in file
order, so a small run is a deterministic prefix of a larger one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "MIRROR_SD_SPEC_BENCH"
TASKS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
MT_BENCH_CATEGORIES = (
    "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
)  # fmt: skip
REPO_RELATIVE = Path("..") / "shared" / "data" / "spec_bench" / "question.jsonl"


class SpecBenchNotFoundError(FileNotFoundError):
    """The Spec-Bench question file is not where we looked."""


@dataclass(frozen=True)
class Question:
    question_id: int
    category: str  # Spec-Bench's own category (one of the MT-Bench eight for mt_bench)
    task: str  # one of TASKS
    text: str  # the first turn


def task_of(category: str) -> str:
    """The Spec-Bench task a `category` belongs to. Raises ValueError for an unknown one."""
    if category in MT_BENCH_CATEGORIES:
        return "mt_bench"
    if category in TASKS:
        return category
    raise ValueError(
        f"unknown Spec-Bench category {category!r}; expected one of "
        f"{', '.join(MT_BENCH_CATEGORIES + TASKS[1:])}"
    )


def repo_root() -> Path:
    """The folder holding the `mirror_sd` package (the repository in an editable install)."""
    return Path(__file__).resolve().parents[2]


def default_path() -> Path:
    """$MIRROR_SD_SPEC_BENCH, else ../shared/data/spec_bench/question.jsonl next to the repo.

    Raises:
        SpecBenchNotFoundError: neither exists; the message says where to put the file.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise SpecBenchNotFoundError(f"${ENV_VAR} points to {path}, which is not a file")
        return path
    path = (repo_root() / REPO_RELATIVE).resolve()
    if path.is_file():
        return path
    raise SpecBenchNotFoundError(
        f"Spec-Bench questions not found at {path}. Download question.jsonl from "
        "https://github.com/hemingkx/Spec-Bench (data/spec_bench/question.jsonl) and put it "
        f"there, or set ${ENV_VAR} to its path, or pass --questions PATH"
    )


def load_questions(
    path: str | Path | None = None, per_category: int = 1, tasks: tuple[str, ...] = TASKS
) -> list[Question]:
    """The first `per_category` questions of each task in `tasks` (default all six), in file
    order.

    Args:
        path: a Spec-Bench `question.jsonl`; None means `default_path()`.
        per_category: questions kept per task (>= 1).
        tasks: the tasks to keep (a subset of TASKS).
    Raises:
        SpecBenchNotFoundError: no file; ValueError: a malformed line or a task with no question.
    """
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown task(s) {unknown}; Spec-Bench's tasks: {', '.join(TASKS)}")
    path = Path(path) if path is not None else default_path()
    if not path.is_file():
        raise SpecBenchNotFoundError(f"Spec-Bench question file {path} does not exist")
    kept: list[Question] = []
    count = dict.fromkeys(tasks, 0)
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            q = Question(int(row["question_id"]), row["category"], "", str(row["turns"][0]))
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{path}:{lineno}: not a Spec-Bench question ({e})") from None
        task = task_of(q.category)
        if task in count and count[task] < per_category:
            count[task] += 1
            kept.append(Question(q.question_id, q.category, task, q.text))
    missing = [t for t, n in count.items() if n == 0]
    if missing:
        raise ValueError(f"{path}: no question for task(s) {', '.join(missing)}")
    return kept
