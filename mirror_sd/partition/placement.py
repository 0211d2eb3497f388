"""Placement: which device alias runs each node of a `ModelGraph`, decided from a `DeviceMap`.

Each node goes to the placement key that is its **longest dotted prefix**: `draft` covers
`draft.layers.3`; `draft.layers.1` covers `draft.layers.1` but not `draft.layers.10`.
Every node must be covered and every key must cover some node. Deciding placement is
separate from applying it (the devices layer loads stages); this module is pure.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from mirror_sd.backends import facts  # light: capability facts, no device API
from mirror_sd.graphs.model_graph import ModelGraph
from mirror_sd.partition.device_map import DeviceMap, DeviceMapError
from mirror_sd.partition.device_map_load import load_device_map
from mirror_sd.partition.spec_config import SpecConfig

TOKEN_CHANNEL = ("target.exit_head", "draft.embed")  # exit candidates -> draft (ids + log-probs)
MAX_LISTED = 5  # unplaced nodes named in an error message


class PlacementError(DeviceMapError):
    """The device map does not fit the graph (unplaced node, dead key, incapable device)."""


class CutEdge(NamedTuple):
    """An edge whose two ends run on different devices, and what crosses it per round."""

    src: str
    dst: str
    bytes_per_round: int


@dataclass(frozen=True)
class Placement:
    """node -> device alias for every graph node, in the graph's deterministic order.

    `rules` says which placement key placed each node; `graph` and `speculation` (γ, κ)
    are kept to price the cut edges. Two placements are equal when their assignments are.
    """

    assignment: Mapping[str, str]
    rules: Mapping[str, str] = field(compare=False, repr=False)
    graph: ModelGraph = field(compare=False, repr=False)
    speculation: SpecConfig = field(default_factory=SpecConfig, compare=False, repr=False)

    def by_device(self) -> dict[str, list[str]]:
        """alias -> its nodes in graph order; aliases in order of their first node."""
        out: dict[str, list[str]] = {}
        for node, alias in self.assignment.items():
            out.setdefault(alias, []).append(node)
        return out

    def cut_edges(self) -> list[CutEdge]:
        """Edges crossing devices with their bytes per round, in graph order.

        A hidden-state edge carries T·D·4 bytes per round, T = γ+1 block rows and D the
        source stage's hidden size (fp32 on the wire). The token channel
        `target.exit_head -> draft.embed` (added when both nodes exist, even if the graph
        has no such edge) carries (γ+1)·κ·(4+4) bytes: κ candidate ids (int32) and
        log-probs (fp32) per block position.
        """
        gamma, kappa = self.speculation.num_draft_tokens, self.speculation.exit_top_k
        edges = {(a, b) for a, b in self.graph.graph.edges}
        if all(n in self.assignment for n in TOKEN_CHANNEL):
            edges.add(TOKEN_CHANNEL)
        order = {n: i for i, n in enumerate(self.assignment)}
        out = []
        for src, dst in sorted(edges, key=lambda e: (order[e[0]], order[e[1]])):
            if self.assignment[src] == self.assignment[dst]:
                continue
            if self.graph.stage(src).role == "exit_head":
                nbytes = (gamma + 1) * kappa * (4 + 4)
            else:
                nbytes = (gamma + 1) * _hidden_size(self.graph, src) * 4
            out.append(CutEdge(src, dst, nbytes))
        return out


def place(
    graph: ModelGraph, device_map: DeviceMap | Any, check_capability: bool = True
) -> Placement:
    """Assign every node of `graph` to a device alias by longest dotted-prefix match.

    Args:
        graph: the stages to place (target, draft, or both composed).
        device_map: a `DeviceMap`, or anything `load_device_map` accepts.
        check_capability: also run `check_capabilities` (what each backend can run).
    Returns:
        The `Placement`; deterministic for a given graph and map.
    Raises:
        PlacementError: a placement key matches no node; some nodes are not placed (up to
            5 named); `speculation.exit_layer` is outside [1, N-1] for the graph's target
            or disagrees with the graph's exit head; a device cannot run its nodes.
        DeviceMapError: `device_map` is not a valid map.
    """
    dm = device_map if isinstance(device_map, DeviceMap) else load_device_map(device_map)
    names = graph.names()
    for key in dm.placement:
        if not any(_covers(key, n) for n in names):
            raise _error(dm, f"placement[{key}]", f"matches no graph node; {_suggest(key, names)}")
    rules = {n: k for n in names if (k := _longest_key(n, dm.placement)) is not None}
    unplaced = [n for n in names if n not in rules]
    if unplaced:
        raise _error(dm, "placement", _unplaced_message(unplaced, dm))
    _check_exit_layer(graph, dm)
    assignment = {n: dm.placement[rules[n]] for n in names}
    placement = Placement(assignment, rules, graph, dm.speculation)
    if check_capability:
        check_capabilities(placement, dm)
    return placement


def check_capabilities(placement: Placement, device_map: DeviceMap) -> None:
    """Check that each device can run the nodes placed on it.

    A device whose backend runs whole models only (`Capabilities.whole_models`: onnxruntime
    in schema v1) runs all of `draft.*` (one exported graph) and/or all of `target.*`
    (exported as prefix, exit head and suffix at ℓe); torch and sim devices run anything.

    Raises:
        PlacementError: naming the node, the device and the placement key to change.
    """
    for alias, nodes in placement.by_device().items():
        spec = device_map.devices[alias]
        if not facts.capabilities(spec).whole_models:
            continue
        for model in sorted({n.split(".")[0] for n in nodes}):
            for node, where in placement.assignment.items():
                if node.split(".")[0] == model and where != alias:
                    msg = (
                        f"node {node} is on {where!r} but the rest of the {model} is on "
                        f"{spec.backend} device {alias!r}, which runs whole models in schema v1; "
                        f"place all of it with `{model}: {alias}`"
                    )
                    raise _error(device_map, f"placement[{placement.rules[node]}]", msg)


def _covers(key: str, node: str) -> bool:
    """`key` is `node` itself or one of its dotted prefixes ('a.b' covers 'a.b.c', not 'a.bc')."""
    return node == key or node.startswith(key + ".")


def _longest_key(node: str, placement: Mapping[str, str]) -> str | None:
    keys = [k for k in placement if _covers(k, node)]
    return max(keys, key=lambda k: k.count("."), default=None)


def _suggest(key: str, names: list[str]) -> str:
    """'did you mean ...? ' among node names and their prefixes, plus what exists."""
    prefixes = sorted(
        {".".join(n.split(".")[: i + 1]) for n in names for i in range(n.count(".") + 1)}
    )
    close = difflib.get_close_matches(key, prefixes, n=3)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    models = sorted({n.split(".")[0] for n in names})
    return f"{hint}graph nodes start with {', '.join(models)} (e.g. {names[0]}, {names[-1]})"


def _unplaced_message(unplaced: list[str], dm: DeviceMap) -> str:
    listed = ", ".join(unplaced[:MAX_LISTED])
    more = f" (and {len(unplaced) - MAX_LISTED} more)" if len(unplaced) > MAX_LISTED else ""
    models = sorted({n.split(".")[0] for n in unplaced})
    keys = ", ".join(f"`{m}: <alias>`" for m in models)
    return (
        f"{len(unplaced)} graph node(s) not placed: {listed}{more}; add a key that covers "
        f"them, e.g. {keys} (devices: {', '.join(dm.devices)})"
    )


def _check_exit_layer(graph: ModelGraph, dm: DeviceMap) -> None:
    """A fixed `speculation.exit_layer` must split the graph's target: 1 <= ℓe <= N-1."""
    exit_layer = dm.speculation.exit_layer
    stages = graph.stages()
    n = sum(1 for s in stages if s.model == "target" and s.role == "layer")
    if exit_layer == "auto" or n == 0:
        return
    if not 1 <= exit_layer <= n - 1:
        msg = (
            f"{exit_layer} is out of range for a target with {n} layers; valid: 1..{n - 1} or auto"
        )
        raise _error(dm, "speculation.exit_layer", msg)
    head = [s for s in stages if s.model == "target" and s.role == "exit_head"]
    if head and head[0].layer != exit_layer:
        msg = (
            f"{exit_layer}, but the graph's target.exit_head was built for exit_layer "
            f"{head[0].layer}; rebuild the graph with exit_layer={exit_layer}"
        )
        raise _error(dm, "speculation.exit_layer", msg)


def _hidden_size(graph: ModelGraph, node: str) -> int:
    """D of the hidden state a stage emits (its output tensor named 'hidden')."""
    for spec in graph.stage(node).outputs:
        if spec.name == "hidden" and isinstance(spec.shape[-1], int):
            return spec.shape[-1]
    raise ValueError(f"stage {node} emits no hidden-state tensor with a fixed size")


def _error(dm: DeviceMap, path: str, message: str) -> PlacementError:
    return PlacementError(path, message, dm.source)


def one_alias(dm: DeviceMap, placement: Placement, prefix: str) -> str:
    """The one device alias every `prefix`.* node is placed on (DeviceMapError otherwise:
    schema v1 runs a model on one device unless it is spread as a pipeline)."""
    aliases = {a for n, a in placement.assignment.items() if n.startswith(prefix + ".")}
    if len(aliases) != 1:
        raise DeviceMapError(
            "placement",
            f"all {prefix}.* nodes must be on one device in schema v1, got {sorted(aliases)}",
            dm.source,
        )
    return aliases.pop()


def plan_graph(t_cfg, d_cfg, exit_layer: int) -> ModelGraph:
    """The dataflow graph of a target split at `exit_layer` and its draft (None: no draft)."""
    graphs = [ModelGraph.from_config(t_cfg, "target", exit_layer=exit_layer)]
    if d_cfg is not None:
        graphs.append(ModelGraph.from_config(d_cfg, "draft"))
    return ModelGraph.compose(*graphs)
