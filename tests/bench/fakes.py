"""Shared by the peer tests: fake peer libraries installed in sys.modules, and a fake clock."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace


def install_fakes(monkeypatch, timed, clock: list[float], **modules: types.ModuleType) -> None:
    """Put `modules` (dotted names with "__" for ".") in sys.modules for the test, and make
    `timed.time.perf_counter` read clock[0] (the fakes advance it when they generate)."""
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name.replace("__", "."), module)
    monkeypatch.setattr(timed, "time", SimpleNamespace(perf_counter=lambda: clock[0]))


def module(name: str, **attrs) -> types.ModuleType:
    """A module called `name` holding `attrs`."""
    mod = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod
