"""Amphista heads: K drafting heads on the target's hidden state at ℓ (Li et al. 2024,
"Amphista: Bi-directional Multi-head Decoding").

The target's own LM head gives the token at position +1; head j (1..K) guesses the token
j positions after it, from the same hidden state: the one entering layer ℓ (after layers
[0, ℓ)), which the runtime holds for every verified row at the early-exit layer ℓe. Per
head j:

    s_j = Adapter_j(h) + e_j                      staged adaptation (graphs.heads.Adapter)
    s   = s + out(attn(RMSNorm(s)))               auto-embedding block: bi-directional
                                                  self-attention across the K states
    logits_j = the target's final norm and LM-head rows (VocabTrim'd) applied to s_j

Every adapter's `up`, the head embeddings e_j and the block's `out` start at zero, so
untrained heads all equal the logit lens of h (an untrained `ExitHead`). The frozen norm
and rows are an `ExitHead` without adapter (`lens`); files hold only the trained parts and
are rebuilt around the target's weights when loaded. Heads only propose: the target
verifies every token, so no head can change the output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mirror_sd.graphs.heads import (
    Adapter,
    ExitHead,
    read_state,
    trim_from_state,
    trim_state,
    write_state,
)
from mirror_sd.graphs.model import CausalLM, RMSNorm
from mirror_sd.graphs.vocab_trim import VocabTrim

AMPHISTA_FORMAT_VERSION = 1
KIND = "amphista-heads"  # tells a heads file from an exit-head file (both torch.save dicts)
RETRAIN = "train heads for this target (mirror-sd train amphista)"


class AutoEmbedding(nn.Module):
    """One pre-norm, residual, non-causal multi-head self-attention over the K head states
    in a `dim`-wide projection; `out` starts at zero, so the block starts as the identity."""

    def __init__(self, hidden_size: int, dim: int, eps: float):
        super().__init__()
        self.n_heads = next(n for n in (4, 2, 1) if dim % n == 0)
        self.norm = RMSNorm(hidden_size, eps)
        self.qkv = nn.Linear(hidden_size, 3 * dim, bias=False)
        self.out = nn.Linear(dim, hidden_size, bias=False)
        nn.init.zeros_(self.out.weight)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """s (..., K, D) -> (..., K, D): every head state attends to all K (no mask)."""
        q, k, v = (self._split(x) for x in self.qkv(self.norm(s)).chunk(3, dim=-1))
        a = nn.functional.scaled_dot_product_attention(q, k, v)  # (..., nh, K, dim / nh)
        return s + self.out(a.transpose(-3, -2).flatten(-2))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K, dim) -> (..., nh, K, dim / nh)."""
        return x.unflatten(-1, (self.n_heads, -1)).transpose(-3, -2)


class AmphistaHeads(nn.Module):
    """K heads at layer ℓ: hidden (..., D) -> logits (..., K, V') over the kept rows."""

    def __init__(
        self, model: CausalLM, layer: int, heads: int, trim: VocabTrim | None = None,
        rank: int = 256, meta: dict[str, Any] | None = None,
    ):  # fmt: skip
        super().__init__()
        c = model.config
        if not 1 <= layer < c.num_layers:
            raise ValueError(f"amphista heads layer {layer} outside [1, {c.num_layers - 1}]")
        if heads < 1:
            raise ValueError(f"amphista heads = {heads}: must be >= 1")
        if rank < 1:
            raise ValueError(f"amphista rank = {rank}: must be >= 1")
        self.lens = ExitHead(model, layer, trim)  # frozen final norm + LM-head rows; checks trim
        self.layer, self.heads, self.rank, self.trim = layer, heads, rank, trim
        self.vocab_size, self.hidden_size = c.vocab_size, c.hidden_size
        self.meta = dict(meta or {})
        self.adapters = nn.ModuleList(
            Adapter(c.hidden_size, rank, c.rms_norm_eps) for _ in range(heads)
        )
        self.embed = nn.Parameter(torch.zeros(heads, c.hidden_size))  # e_j
        self.mix = AutoEmbedding(c.hidden_size, rank, c.rms_norm_eps)
        self.cpu()  # heads run on the host in float32, whatever device the target is on

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., D) -> logits (..., K, V') over the kept rows (V' = V untrimmed)."""
        h = hidden.to(self.embed.device, self.embed.dtype)
        s = torch.stack([a(h) for a in self.adapters], dim=-2) + self.embed  # (..., K, D)
        return self.lens(self.mix(s))

    @torch.inference_mode()
    def propose(self, hidden: torch.Tensor, top_k: int = 1) -> tuple[list[int], list[list[int]]]:
        """hidden (D,), one row -> (each head's top-1 token, each head's next `top_k - 1`
        tokens best first), all as full-vocabulary ids; float32 on the CPU."""
        logits = self(hidden.detach().reshape(-1))  # (K, V')
        top = logits.topk(min(max(1, top_k), logits.shape[-1]), dim=-1).indices  # (K, k)
        if self.trim is not None:
            top = self.trim.ids()[top]
        return top[:, 0].tolist(), top[:, 1:].tolist()

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors (adapters, e_j, the block): what files and checkpoints hold."""
        return {
            k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("lens.")
        }

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set the trained tensors from `trained_state()`'s dict (ValueError if it does not fit)."""
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # a shape mismatch
            raise ValueError(f"amphista heads state does not fit: {exc}") from exc
        missing = [k for k in missing if not k.startswith("lens.")]
        if missing or unexpected:
            raise ValueError(f"amphista heads state: missing {missing}, unexpected {unexpected}")

    def describe(self) -> str:
        vocab = f"{self.trim.size} of {self.vocab_size} tokens" if self.trim else "full vocabulary"
        text = f"amphista heads at ℓ={self.layer}: {self.heads} heads (rank {self.rank}), {vocab}"
        trained = self.meta.get("trained")
        if trained:
            top1 = "/".join(f"{x:.3f}" for x in trained["top1"])
            text += f"; held-out top-1 per head {top1}, chain {trained['chain']:.2f}"
        return text

    # --- files ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        state = {
            "version": AMPHISTA_FORMAT_VERSION,
            "kind": KIND,
            "layer": self.layer,
            "heads": self.heads,
            "rank": self.rank,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            **trim_state(self.trim),
            "weights": self.trained_state(),
            "meta": self.meta,
        }
        return write_state(path, state)

    @classmethod
    def load(cls, path: str | Path, model: CausalLM) -> AmphistaHeads:
        """Rebuild saved heads around `model`'s own norm and LM head.

        Raises:
            ValueError: not a heads file of this format, or trained for another target shape.
        """
        d = read_state(path, "amphista heads")
        if d.get("kind") != KIND:
            raise ValueError(f"{path}: not an amphista heads file: {RETRAIN}")
        if d.get("version") != AMPHISTA_FORMAT_VERSION:
            raise ValueError(f"{path}: heads file format {d.get('version')}, this runtime reads "
                             f"{AMPHISTA_FORMAT_VERSION}: {RETRAIN}")  # fmt: skip
        c = model.config
        if (d["vocab_size"], d["hidden_size"]) != (c.vocab_size, c.hidden_size):
            raise ValueError(
                f"{path}: trained for a vocabulary of {d['vocab_size']} and width "
                f"{d['hidden_size']}, the target has {c.vocab_size} and {c.hidden_size}: {RETRAIN}"
            )
        heads = cls(model, d["layer"], d["heads"], trim_from_state(d), d["rank"], d["meta"])
        heads.load_trained_state(d["weights"])
        return heads.eval()
