"""`ModelGraph`: a model's stages as a networkx DiGraph with stable dotted names.

Nodes are `<model>.embed`, `<model>.layers.<i>`, `<model>.norm`, `<model>.lm_head`
(and `<model>.exit_head` when an exit layer is given); each carries a frozen `Stage`
record. Edges carry the activation that flows between stages. No device information
lives here: placement is `mirror_sd.partition`'s job.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import networkx as nx

from mirror_sd.graphs.config import ModelConfig
from mirror_sd.graphs.families import FAMILIES

ROLES = ("embed", "layer", "norm", "lm_head", "exit_head")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[str | int, ...]  # symbolic dims: B batch, T new rows, S cached rows
    dtype: str


@dataclass(frozen=True)
class Stage:
    """What one stage is and costs; `flops_per_token` counts 2 FLOPs per weight MAC."""

    name: str
    model: str  # "target" | "draft"
    role: str  # one of ROLES
    layer: int | None
    param_bytes: int
    flops_per_token: int
    kv_bytes_per_token: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def _layer_params(c: ModelConfig) -> int:
    hd, d = c.head_dim, c.hidden_size
    attn = d * hd * (2 * c.num_heads + 2 * c.num_kv_heads)
    if c.attention_bias:
        attn += hd * (c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * d * c.intermediate_size
    norms = FAMILIES[c.model_type].layer_norms * d + (2 * hd if c.qk_norm else 0)
    return attn + mlp + norms


def _stages(c: ModelConfig, model: str, bytes_per_param: int, exit_layer: int | None):
    hid = TensorSpec("hidden", ("B", "T", c.hidden_size), "float")
    ids = TensorSpec("input_ids", ("B", "T"), "int64")
    logits = TensorSpec("logits", ("B", "T", c.vocab_size), "float")
    d, v = c.hidden_size, c.vocab_size
    kv = TensorSpec("kv", ("B", "S", c.num_kv_heads, c.head_dim), "float")
    per_layer_kv = 2 * c.num_kv_heads * c.head_dim * bytes_per_param
    lp = _layer_params(c)
    head_params = 0 if c.tie_word_embeddings else d * v
    yield Stage(
        f"{model}.embed", model, "embed", None, d * v * bytes_per_param, 0, 0, (ids,), (hid,)
    )
    for i in range(c.num_layers):
        yield Stage(
            f"{model}.layers.{i}", model, "layer", i, lp * bytes_per_param,
            2 * (lp - 2 * d), per_layer_kv, (hid, kv), (hid, kv),
        )  # fmt: skip
    yield Stage(f"{model}.norm", model, "norm", None, d * bytes_per_param, 0, 0, (hid,), (hid,))
    yield Stage(
        f"{model}.lm_head", model, "lm_head", None, head_params * bytes_per_param, 2 * d * v, 0,
        (hid,), (logits,),
    )  # fmt: skip
    if exit_layer is not None:
        yield Stage(
            f"{model}.exit_head", model, "exit_head", exit_layer, 0, 2 * d * v, 0,
            (hid,), (TensorSpec("candidates", ("B", "T", "k"), "int64"),),
        )  # fmt: skip


class ModelGraph:
    """A DiGraph of `Stage`s in execution order; `graph.nodes[name]["stage"]` is the record."""

    def __init__(self, graph: nx.DiGraph):
        self.graph = graph

    @classmethod
    def from_config(
        cls,
        cfg: ModelConfig,
        model: str = "target",
        bytes_per_param: int = 4,
        exit_layer: int | None = None,
    ) -> ModelGraph:
        """Stages of one model. `exit_layer` ℓe adds `<model>.exit_head` fed by layer ℓe-1."""
        if exit_layer is not None and not 1 <= exit_layer < cfg.num_layers:
            raise ValueError(f"exit_layer {exit_layer} outside [1, {cfg.num_layers - 1}]")
        g = nx.DiGraph()
        chain = []
        for s in _stages(cfg, model, bytes_per_param, exit_layer):
            g.add_node(s.name, stage=s)
            if s.role != "exit_head":
                chain.append(s.name)
        for a, b in itertools.pairwise(chain):
            g.add_edge(a, b, tensor="hidden")
        if exit_layer is not None:
            g.add_edge(f"{model}.layers.{exit_layer - 1}", f"{model}.exit_head", tensor="hidden")
        return cls(g)

    @classmethod
    def compose(cls, *graphs: ModelGraph) -> ModelGraph:
        """Union of disjoint model graphs (e.g. target + draft); add channel edges afterwards."""
        return cls(nx.compose_all([g.graph for g in graphs]))

    def stage(self, name: str) -> Stage:
        if name not in self.graph:
            raise KeyError(f"no stage {name!r}; stages: {', '.join(self.names()[:6])}, ...")
        return self.graph.nodes[name]["stage"]

    def names(self) -> list[str]:
        """Stage names in a deterministic topological order."""
        return list(nx.lexicographical_topological_sort(self.graph, key=_natural_key))

    def stages(self) -> list[Stage]:
        return [self.stage(n) for n in self.names()]

    def to_json(self) -> dict:
        nodes = [asdict(self.stage(n)) for n in self.names()]
        edges = [{"src": a, "dst": b, **d} for a, b, d in sorted(self.graph.edges(data=True))]
        return {"version": 1, "nodes": nodes, "edges": edges}

    @classmethod
    def from_json(cls, data: dict) -> ModelGraph:
        g = nx.DiGraph()
        for n in data["nodes"]:
            n = dict(n)
            n["inputs"] = tuple(_spec(t) for t in n["inputs"])
            n["outputs"] = tuple(_spec(t) for t in n["outputs"])
            g.add_node(n["name"], stage=Stage(**n))
        for e in data["edges"]:
            e = dict(e)
            g.add_edge(e.pop("src"), e.pop("dst"), **e)
        return cls(g)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> ModelGraph:
        return cls.from_json(json.loads(Path(path).read_text()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelGraph) and self.to_json() == other.to_json()


def _spec(t: dict) -> TensorSpec:
    return TensorSpec(t["name"], tuple(t["shape"]), t["dtype"])


def _natural_key(name: str) -> tuple:
    """'target.layers.10' sorts after 'target.layers.9'."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
