"""The retrieval-source registry: `SpecConfig.retrieval` name -> factory.

Every model-free draft source registers itself in its own module with `@register(name,
summary)` on a factory that takes the plan's `SourceSettings`. This registry is the one list
of names: compile() and `Plan` check `speculation.retrieval` against it, the benchmark's
retrieval-only methods and docs/device_map.md's table derive from it (a test checks the
docs). Adding a source is one new module in this package (it is found by `discover`) plus
its test.

A source that learns from finished generations implements `finish(prompt, output)`; the
plan calls it after each generation (Hierarchy Drafting keeps recent outputs, the
reference source the last output per prompt).
"""

from __future__ import annotations

import copy
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from mirror_sd.runtime.drafters.base import DraftSource

NONE = "none"  # no retrieval source
RECENT_OUTPUTS = 32  # generations Hierarchy Drafting remembers per plan


@dataclass(frozen=True)
class SourceSettings:
    """What a factory may read from the plan's SpecConfig."""

    max_ngram: int  # speculation.retrieval_max_ngram


@dataclass(frozen=True)
class SourceEntry:
    name: str
    summary: str  # one line for docs and errors
    factory: Callable[[SourceSettings], DraftSource]


_SOURCES: dict[str, SourceEntry] = {}
_DISCOVERED = False


def register(name: str, summary: str):
    """Decorator: make `factory(settings) -> DraftSource` the source called `name`."""

    def add(factory: Callable[[SourceSettings], DraftSource]):
        if name == NONE or (name in _SOURCES and _SOURCES[name].factory is not factory):
            raise ValueError(f"retrieval source name {name!r} is taken")
        _SOURCES[name] = SourceEntry(name, summary, factory)
        return factory

    return add


def discover() -> None:
    """Import every module of this package once, so that each registers its sources."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{module.name}")
    _DISCOVERED = True


def sources() -> dict[str, SourceEntry]:
    """Every registered source, by name (sorted)."""
    discover()
    return {name: _SOURCES[name] for name in sorted(_SOURCES)}


def source_names() -> tuple[str, ...]:
    """The valid values of `speculation.retrieval`: 'none' and every registered source."""
    return (NONE, *sources())


def check_source(name: object) -> str:
    """`name` if it is a valid `speculation.retrieval` value, else ValueError listing them."""
    if name not in source_names():
        listed = ", ".join(f"{n} ({e.summary})" for n, e in sources().items())
        raise ValueError(
            f"speculation.retrieval {name!r}: expected {NONE!r} or one of the registered "
            f"sources: {listed}"
        )
    return str(name)


def make_source(name: str, max_ngram: int) -> DraftSource | None:
    """The source called `name` ('none' -> None). Raises ValueError for an unknown name."""
    if check_source(name) == NONE:
        return None
    return _SOURCES[name].factory(SourceSettings(max_ngram=max_ngram))


def fork(source: DraftSource) -> DraftSource:
    """A copy of `source` for one more sequence: it shares the plan-level memory (corpus,
    recent outputs, references) and gets its own sequence state at its `reset` (which
    rebinds that state; see base.py)."""
    return copy.copy(source)
