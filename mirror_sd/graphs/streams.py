"""Speculative streaming in the draft: trained stream rows that let one draft forward guess
several tokens ahead, and the draft graphs (torch and ONNX) that read them.

A *stream table* holds k vectors, one per stream j = 1..k. The draft reads stream j as the
input id V + j - 1 (V: its embedding rows), so no graph input changes: a stream row placed
after the last real row of a sequence, at that row's position + j, attends to the sequence
and to the streams before it, and its logits guess the token j positions after the real
row's next token (Speculative Streaming, Bhendawade et al. 2024, with its stream rows entering
at the first layer and the draft frozen: docs/algorithm.md, *Multi-token drafts*). The draft
checks its own guesses in its next forward (`runtime.draft_engine`), so what it proposes is
exactly its one-token-per-step chain, in fewer forwards when the guesses hold.

`with_streams` wraps a torch draft's embedding; `add_streams_onnx` rewrites an exported
draft's embedding lookup (fp32 or int8 table) to the same function, beside the original
graph and sharing its weight files.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

STREAMS_FILE = "streams.safetensors"
STREAMS_META = "streams.json"
STREAMS_FORMAT = 1


@dataclass(frozen=True)
class StreamTable:
    """k stream rows for a draft whose embedding has `vocab_size` rows.

    Attributes:
        rows: (k, D) float32; row j - 1 is stream j's input vector.
        vocab_size: the draft's embedding rows V; stream j is fed as id V + j - 1.
        provenance: how it was made (draft and target identities, corpus, settings, held-out
            guess accuracy per stream); saved beside the rows.
    """

    rows: torch.Tensor
    vocab_size: int
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.rows.ndim != 2 or self.rows.shape[0] < 1:
            raise ValueError(f"stream rows must be (k >= 1, D), got {tuple(self.rows.shape)}")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")

    @property
    def k(self) -> int:
        """How many streams (tokens guessed beyond the next one per forward)."""
        return int(self.rows.shape[0])

    def ids(self, n: int | None = None) -> list[int]:
        """The input ids of streams 1..n (all k when None)."""
        n = self.k if n is None else n
        if not 0 <= n <= self.k:
            raise ValueError(f"asked for {n} streams; the table has {self.k}")
        return [self.vocab_size + j for j in range(n)]

    def guess_accuracy(self) -> tuple[float, ...]:
        """Held-out accuracy of each stream's guess of the draft's own (teacher-forced) token,
        stream 1 first, as training measured it (`agreement.after.streams[j].draft_top1` in
        the provenance, `training.streams`); empty when not recorded."""
        after = self.provenance.get("agreement", {}).get("after", {})
        return tuple(float(x["draft_top1"]) for x in after.get("streams", ()))

    def identity(self) -> str:
        """A short hash of the rows and V (an export's cache key part)."""
        h = hashlib.sha256(json.dumps([self.vocab_size, list(self.rows.shape)]).encode())
        h.update(self.rows.float().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def check(self, vocab_size: int, hidden_size: int) -> None:
        """Raise ValueError unless the table fits a draft of this vocabulary and width."""
        if (self.vocab_size, self.rows.shape[1]) != (vocab_size, hidden_size):
            raise ValueError(
                f"the stream table was trained for a draft with {self.vocab_size} embedding "
                f"rows of width {self.rows.shape[1]}; this draft has {vocab_size} of width "
                f"{hidden_size}: train streams for this draft (`mirror-sd train streams`)"
            )

    def save(self, folder: str | Path) -> Path:
        """Write `streams.safetensors` and `streams.json` into `folder`; returns the folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"rows": self.rows.float().contiguous()}, str(folder / STREAMS_FILE))
        meta = {"format": STREAMS_FORMAT, "vocab_size": self.vocab_size, **self.provenance}
        (folder / STREAMS_META).write_text(json.dumps(meta, indent=1) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> StreamTable:
        """Read a table `save` wrote (a folder, or the path of its streams.safetensors).

        Raises:
            FileNotFoundError: no stream table there.
            ValueError: a table of another format version.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        folder = folder.parent if folder.name == STREAMS_FILE else folder
        if not (folder / STREAMS_FILE).is_file() or not (folder / STREAMS_META).is_file():
            raise FileNotFoundError(
                f"no stream table in {folder} (expected {STREAMS_FILE} and {STREAMS_META}; "
                "make one with `mirror-sd train streams TARGET --draft DRAFT`)"
            )
        meta = json.loads((folder / STREAMS_META).read_text())
        if meta.get("format") != STREAMS_FORMAT:
            raise ValueError(
                f"{folder / STREAMS_META}: stream table format {meta.get('format')!r}, this "
                f"version reads {STREAMS_FORMAT}: train the streams again"
            )
        rows = load_file(str(folder / STREAMS_FILE))["rows"]
        provenance = {k: v for k, v in meta.items() if k not in ("format", "vocab_size")}
        return cls(rows, int(meta["vocab_size"]), provenance)


class StreamEmbedding(nn.Module):
    """An embedding lookup that reads ids >= V from a stream table (rows `rows`, trainable
    when it is an `nn.Parameter`) and every other id from `base`."""

    def __init__(self, base: nn.Embedding, rows: torch.Tensor):
        super().__init__()
        self.base, self.vocab_size = base, base.num_embeddings
        self.rows = rows if isinstance(rows, nn.Parameter) else nn.Parameter(rows, False)

    @property
    def weight(self) -> torch.Tensor:  # the table a tied LM head and the cache read
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        stream = ids >= self.vocab_size
        own = self.base(ids.masked_fill(stream, 0))
        k = self.rows.shape[0]
        extra = self.rows.to(own.dtype)[(ids - self.vocab_size).clamp(0, k - 1)]
        return torch.where(stream[..., None], extra, own)


def with_streams(model: Any, rows: StreamTable | torch.Tensor) -> Any:
    """A copy of the draft `model` (a `CausalLM`) whose embedding also reads the stream rows;
    every weight is shared with `model`, which is not modified. `rows` may be an
    `nn.Parameter` (training)."""
    table = rows.rows if isinstance(rows, StreamTable) else rows
    cfg = model.config
    if isinstance(rows, StreamTable):
        rows.check(cfg.vocab_size, cfg.hidden_size)
    out = copy.copy(model)
    out._modules = dict(model._modules)
    backbone = copy.copy(model.model)
    backbone._modules = dict(model.model._modules)
    backbone.embed_tokens = StreamEmbedding(model.model.embed_tokens, table)
    out.model = backbone
    return out


def add_streams_onnx(src: str | Path, table: StreamTable, name: str | None = None) -> Path:
    """Write a copy of the exported draft `src` whose embedding lookup also reads the stream
    rows (ids >= V), beside `src` (weights stay in `src`'s external files, not copied);
    returns its path. Finds the Gather on `input_ids` (and the DequantizeLinear after it for
    an int8 table) and selects the stream row where the id is >= V. Cached: a file made for
    the same table is reused.

    Raises:
        ValueError: `src` has no embedding Gather on `input_ids`, or the table does not fit.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    src = Path(src)
    dst = src.with_name(name or f"{src.stem}.streams-{table.identity()}.onnx")
    if dst.is_file():
        return dst
    model = onnx.load(str(src), load_external_data=False)
    g = model.graph
    gathers = [n for n in g.node if n.op_type == "Gather" and list(n.input[1:]) == ["input_ids"]]
    if len(gathers) != 1:
        raise ValueError(f"{src}: expected one embedding Gather on input_ids, found {len(gathers)}")
    gather = gathers[0]
    emb = gather.output[0]
    after = [n for n in g.node if emb in n.input]
    if len(after) == 1 and after[0].op_type == "DequantizeLinear":
        emb = after[0].output[0]
    _check_width(g, gather.input[0], table)
    rows = table.rows.float().numpy()
    k = rows.shape[0]
    p = "streams/"
    g.initializer.extend([
        numpy_helper.from_array(rows, p + "rows"),
        numpy_helper.from_array(_i64(table.vocab_size), p + "V"),
        numpy_helper.from_array(_i64(0), p + "zero"),
        numpy_helper.from_array(_i64(k - 1), p + "last"),
        numpy_helper.from_array(_i64([-1]), p + "axes"),
    ])  # fmt: skip
    gather.input[1] = p + "own_ids"
    mixed = p + "embedding"
    for n in g.node:  # every reader of the embedding now reads the mixed rows
        n.input[:] = [mixed if x == emb else x for x in n.input]
    new = [
        helper.make_node("GreaterOrEqual", ["input_ids", p + "V"], [p + "is_stream"]),
        helper.make_node("Where", [p + "is_stream", p + "zero", "input_ids"], [p + "own_ids"]),
        helper.make_node("Sub", ["input_ids", p + "V"], [p + "j"]),
        helper.make_node("Max", [p + "j", p + "zero"], [p + "j0"]),
        helper.make_node("Min", [p + "j0", p + "last"], [p + "j1"]),
        helper.make_node("Gather", [p + "rows", p + "j1"], [p + "stream_rows"]),
        helper.make_node("Unsqueeze", [p + "is_stream", p + "axes"], [p + "pick"]),
        helper.make_node("Where", [p + "pick", p + "stream_rows", emb], [mixed]),
    ]
    # topological order: the id arithmetic first, the mix right after the embedding
    at = next(i for i, n in enumerate(g.node) if emb in n.output) + 1
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(new[:2] + nodes[:at] + new[2:] + nodes[at:])
    if _elem_type(g, emb) not in (None, TensorProto.FLOAT):
        raise ValueError(f"{src}: the embedding is not float32; stream rows need a float32 draft")
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(dst)
    return dst


def _i64(x: Any) -> Any:
    import numpy as np

    return np.asarray(x, dtype=np.int64)


def _check_width(g: Any, table_name: str, table: StreamTable) -> None:
    for init in g.initializer:
        if init.name == table_name:
            v, d = init.dims[0], init.dims[-1]
            table.check(int(v), int(d))
            return


def _elem_type(g: Any, name: str) -> int | None:
    for vi in list(g.value_info) + list(g.output):
        if vi.name == name:
            return vi.type.tensor_type.elem_type
    return None
