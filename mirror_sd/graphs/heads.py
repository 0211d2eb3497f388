"""Exit heads: what turns the target's hidden state at ℓe into the top-κ exit candidates.

An `ExitHead` is [adapter] -> the target's final norm -> LM-head rows:

- untrained (the logit lens): no adapter, all V rows — what `SplitRunner.exit_logits` does;
- trimmed (VocabTrim): only the K rows of the tokens the target emits most often;
- trained: a residual adapter h + W2·silu(W1·norm(h)) fitted to the target's own final
  choices (`mirror-sd train exit-head`), usually with trimmed rows.

Exit candidates only steer which branches the draft rolls out (the hit rate); the target
verifies with its own full head, so no exit head can change the output.
The head runs in torch next to the target pipeline; its cost is one small matmul chain on
γ + 1 rows. Files are `torch.save` dicts of tensors plus a metadata dict (no pickled code).
"""

from __future__ import annotations

import copy
import pickle
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mirror_sd.graphs.model import CausalLM, RMSNorm
from mirror_sd.graphs.quantize import linear_weight
from mirror_sd.graphs.vocab_trim import VocabTrim

HEAD_FORMAT_VERSION = 1
_DENSE: weakref.WeakKeyDictionary[nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()


def dense_head(model: CausalLM) -> torch.Tensor:
    """`model`'s LM head as one float32 (V, D) tensor that every untrimmed exit head of the
    model shares: its own weight when that is already dense float32 (no copy), else a
    dequantized or widened copy made once per head module and kept while it lives (S2D's two
    logit-lens exits on a 0.5B draft would otherwise hold 2 × 545 MB, and each plan sharing
    the draft two more)."""
    head = model.lm_head
    if head not in _DENSE:
        _DENSE[head] = linear_weight(head).detach().float()  # dense if weight-only quantized
    return _DENSE[head]


def write_state(path: str | Path, state: dict[str, Any]) -> Path:
    """`torch.save` a head file's dict atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def trim_state(trim: VocabTrim | None) -> dict[str, Any]:
    """A head file's entries for its VocabTrim (None: the full vocabulary)."""
    return {"keep": torch.tensor(trim.keep) if trim else None,
            "trim_source": trim.source if trim else ""}  # fmt: skip


def trim_from_state(d: dict[str, Any]) -> VocabTrim | None:
    """The VocabTrim `trim_state` wrote into a head file's dict `d` (with its "vocab_size")."""
    if d["keep"] is None:
        return None
    return VocabTrim(tuple(d["keep"].tolist()), d["vocab_size"], d["trim_source"])


def read_state(path: str | Path, what: str) -> dict[str, Any]:
    """A head file's dict (tensors and plain values only; ValueError naming `what` the file
    should have been when it cannot be read as one)."""
    try:
        d = torch.load(Path(path), weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path}: not a readable {what} file ({exc})") from exc
    if not isinstance(d, dict):
        raise ValueError(f"{path}: holds no {what} dict")
    return d


class Adapter(nn.Module):
    """Residual MLP h + up(silu(down(norm(h)))); `up` starts at zero, so an untrained adapter
    is the identity and training starts from the logit lens."""

    def __init__(self, hidden_size: int, rank: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps)
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(nn.functional.silu(self.down(self.norm(h))))


class ExitHead(nn.Module):
    """[adapter] + final norm + LM-head rows at exit layer ℓe: hidden (..., D) -> logits."""

    def __init__(
        self, model: CausalLM, layer: int, trim: VocabTrim | None = None, rank: int = 0,
        meta: dict[str, Any] | None = None,
    ):  # fmt: skip
        super().__init__()
        c = model.config
        if not 1 <= layer < c.num_layers:
            raise ValueError(f"exit head layer {layer} outside [1, {c.num_layers - 1}]")
        if trim is not None and trim.vocab_size != c.vocab_size:
            raise ValueError(
                f"VocabTrim is for a vocabulary of {trim.vocab_size}, the model has {c.vocab_size}"
            )
        self.layer, self.trim, self.vocab_size = layer, trim, c.vocab_size
        self.meta = dict(meta or {})
        self.norm = copy.deepcopy(model.model.norm).float()  # the family's own norm (Gemma: 1 + w)
        if trim is not None:  # K rows of their own; the dense head is not kept
            rows = trim.trim(linear_weight(model.lm_head).detach().float())
        else:  # all V rows: the model's own, shared by its every exit, never written
            rows = dense_head(model)
        self.rows = nn.Parameter(rows, requires_grad=False)  # (K or V, D)
        self.adapter = Adapter(c.hidden_size, rank, c.rms_norm_eps) if rank else None
        self.norm.weight.requires_grad_(False)

    @property
    def trained(self) -> bool:
        return self.adapter is not None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., D) -> logits over the kept rows (..., K) (K = V when untrimmed)."""
        h = hidden.to(self.rows.dtype)
        if self.adapter is not None:
            h = self.adapter(h)
        return self.norm(h) @ self.rows.T

    @torch.inference_mode()
    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The `SplitRunner.exit_logits` contract: hidden (1, T, D) -> (T, V) float32 on the
        CPU, -inf outside the kept vocabulary."""
        logits = self(hidden.to(self.rows.device))[0].float().cpu()
        return self.trim.expand(logits) if self.trim is not None else logits

    def describe(self) -> str:
        kind = (
            f"trained adapter (rank {self.adapter.down.out_features})"
            if self.trained
            else "logit lens"
        )
        vocab = f"{self.trim.size} of {self.vocab_size} tokens" if self.trim else "full vocabulary"
        return f"exit head at ℓe={self.layer}: {kind}, {vocab}"

    # --- files ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        state = {
            "version": HEAD_FORMAT_VERSION,
            "layer": self.layer,
            "vocab_size": self.vocab_size,
            **trim_state(self.trim),
            "rank": self.adapter.down.out_features if self.adapter else 0,
            "adapter": {k: v.detach().clone() for k, v in self.adapter.state_dict().items()}
            if self.adapter
            else None,
            "meta": self.meta,
        }
        return write_state(path, state)

    @classmethod
    def load(cls, path: str | Path, model: CausalLM) -> ExitHead:
        """Rebuild a saved head around `model`'s own norm and LM head (the file holds only the
        adapter, the kept ids and metadata; the big rows come from the model)."""
        d = read_state(path, "exit-head")
        if d.get("version") != HEAD_FORMAT_VERSION:
            raise ValueError(f"{path}: not an exit-head file of format {HEAD_FORMAT_VERSION}")
        if d["vocab_size"] != model.config.vocab_size:
            raise ValueError(
                f"{path}: trained for a vocabulary of {d['vocab_size']}, the target has "
                f"{model.config.vocab_size}: train a head for this target (mirror-sd train exit-head)"
            )
        head = cls(model, d["layer"], trim_from_state(d), d["rank"], d["meta"])
        if head.adapter is not None:
            head.adapter.load_state_dict(d["adapter"])
        return head.eval()
