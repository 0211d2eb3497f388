"""The calibration / training corpus: text every machine with Python has, offline.

Source: the running interpreter's standard library (PSF licence): the `.py` sources outside
test folders (code, docstrings, comments) and `pydoc_data/topics.py`, the Python Language
Reference as English prose. Never Spec-Bench. Files are read in sorted order and shuffled
with a fixed seed, so a corpus is a pure function of (Python version, seed, sizes); its
identity hash goes into every artifact made from it.
"""

from __future__ import annotations

import hashlib
import random
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__", "encodings"}
_PROSE = Path("pydoc_data") / "topics.py"


@dataclass(frozen=True)
class Corpus:
    """Token chunks (each `chunk_len` ids) and where they came from."""

    chunks: list[list[int]]
    identity: str  # hash of (python version, seed, sizes, the chunks' ids)
    description: str


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files outside test folders, sorted, prose file first."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not (_SKIP_PARTS & set(p.relative_to(root).parts)) and p.stat().st_size > 2000
    )
    prose = root / _PROSE
    return ([prose] if prose.is_file() else []) + [p for p in files if p != prose]


def _prose_text(path: Path) -> str:
    """topics.py is a dict literal of reference-manual sections: keep the text, not the repr."""
    ns: dict = {}
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), ns)  # stdlib's own data
    topics = ns.get("topics", {})
    return "\n\n".join(topics[k] for k in sorted(topics))


def build_corpus(
    tokenizer, n_chunks: int, chunk_len: int = 512, seed: int = 0, prose_fraction: float = 0.5,
    root: Path | None = None,
) -> Corpus:  # fmt: skip
    """`n_chunks` windows of `chunk_len` tokens: about `prose_fraction` of them English prose
    from the language reference, the rest standard-library source, all drawn with `seed`."""
    if n_chunks < 1 or chunk_len < 8:
        raise ValueError(f"need n_chunks >= 1 and chunk_len >= 8, got {n_chunks}, {chunk_len}")
    rng = random.Random(seed)
    files = stdlib_files(root)
    if not files:
        raise FileNotFoundError("no standard-library sources found for the calibration corpus")
    n_prose = round(n_chunks * prose_fraction) if files[0].name == "topics.py" else 0
    chunks: list[list[int]] = []
    if n_prose:
        chunks += _windows(tokenizer(_prose_text(files[0]))["input_ids"], chunk_len, n_prose, rng)
    code = files[1:] if n_prose else files
    rng.shuffle(code)
    for path in code:
        if len(chunks) >= n_chunks:
            break
        ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"))["input_ids"]
        chunks += _windows(ids, chunk_len, 1, rng)
    h = hashlib.sha256(f"{sys.version_info[:3]}|{seed}|{n_chunks}|{chunk_len}".encode())
    for c in chunks:
        h.update(bytes(str(c), "ascii"))
    desc = (
        f"Python {'.'.join(map(str, sys.version_info[:3]))} standard library: {n_prose} prose "
        f"chunks (pydoc topics) + {len(chunks) - n_prose} source chunks of {chunk_len} tokens, seed {seed}"
    )
    return Corpus(chunks, h.hexdigest()[:16], desc)


def _windows(ids: Sequence[int], length: int, count: int, rng: random.Random) -> list[list[int]]:
    """`count` non-overlapping windows of `length` ids at random offsets (fewer if too short)."""
    slots = len(ids) // length
    picks = rng.sample(range(slots), min(count, slots)) if slots else []
    return [list(ids[s * length : (s + 1) * length]) for s in sorted(picks)]
