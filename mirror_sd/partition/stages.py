"""Execution stages of one model from a placement: the runs of consecutive nodes on one device.

A model's nodes execute in the order embed, layers 0..N-1, norm, lm_head. `model_stages`
cuts that sequence wherever the device changes, so a map that puts `target.layers.0`..
`target.layers.13` on `dev0` and the rest on `dev1` gives two stages; the hidden state crosses
each cut (the edge `Placement.cut_edges()` prices). `target.exit_head` is not on the main
path: it is returned apart (`exit_alias`), and runs wherever the map puts it.

Pure: no torch, no device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """Consecutive nodes of one model on device `alias`: the embedding (if `embed`), decoder
    layers [first, last), the final norm (if `norm`) and the LM head (if `lm_head`)."""

    alias: str
    embed: bool = False
    first: int = 0
    last: int = 0
    norm: bool = False
    lm_head: bool = False

    def nodes(self, model: str) -> list[str]:
        """The graph node names this stage runs (for messages and describe())."""
        out = [f"{model}.embed"] if self.embed else []
        out += [f"{model}.layers.{i}" for i in range(self.first, self.last)]
        out += [f"{model}.norm"] * self.norm + [f"{model}.lm_head"] * self.lm_head
        return out

    def describe(self) -> str:
        parts = ["embed"] if self.embed else []
        if self.last - self.first == 1:
            parts.append(f"layer {self.first}")
        elif self.last > self.first:
            parts.append(f"layers {self.first}-{self.last - 1}")
        parts += ["norm"] * self.norm + ["lm_head"] * self.lm_head
        return f"{self.alias}: {' + '.join(parts)}"


def model_stages(assignment: Mapping[str, str], model: str, num_layers: int) -> list[Stage]:
    """The stages of `model` ("target" / "draft") under a placement's node -> alias map.

    Raises:
        KeyError: a node of the model is missing from `assignment` (place() checks that first).
    """
    seq: list[tuple[str, str, int]] = [("embed", assignment[f"{model}.embed"], -1)]
    seq += [("layer", assignment[f"{model}.layers.{i}"], i) for i in range(num_layers)]
    seq += [
        ("norm", assignment[f"{model}.norm"], -1),
        ("lm_head", assignment[f"{model}.lm_head"], -1),
    ]
    stages: list[dict] = []
    for kind, alias, i in seq:
        if not stages or stages[-1]["alias"] != alias:
            stages.append({"alias": alias, "first": max(i, 0), "last": max(i, 0)})
            if kind in ("norm", "lm_head"):
                stages[-1]["first"] = stages[-1]["last"] = num_layers
        s = stages[-1]
        if kind == "layer":
            if s["last"] == s["first"]:
                s["first"] = i
            s["last"] = i + 1
        else:
            s[kind] = True
    return [Stage(**s) for s in stages]


def model_aliases(assignment: Mapping[str, str], model: str) -> list[str]:
    """The device aliases running `model`'s main path (exit head excluded), first use first."""
    out: list[str] = []
    for node, alias in assignment.items():
        if node.split(".")[0] == model and node != f"{model}.exit_head" and alias not in out:
            out.append(alias)
    return out


def exit_alias(assignment: Mapping[str, str], model: str = "target") -> str | None:
    """Where `<model>.exit_head` runs, or None when the graph has no exit head."""
    return assignment.get(f"{model}.exit_head")
