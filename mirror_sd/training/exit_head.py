"""The exit head at ℓe, fitted to the target's own choices (`mirror-sd train exit-head`; its command
line is in training/cli.py).

The data are the target's hidden states entering layer ℓe and its final argmax over the
offline stdlib corpus (`collect`). The head is `graphs.heads.ExitHead` with a residual
adapter (zero-initialised: training starts from the logit lens) before the target's frozen
final norm and LM-head rows, trimmed to the K tokens the target emits most often (VocabTrim):
the softmax over K rows keeps training within minutes on a CPU, and positions whose label is
outside the kept set are left out (a trimmed head can never propose them).

Held-out chunks measure top-1 and top-κ agreement with the target for the logit lens and
for the trained head; both go into the head file's metadata, and the partitioner reads them
when it chooses ℓe for `exit_head: trained`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from mirror_sd import progress
from mirror_sd.graphs.export import source_identity
from mirror_sd.graphs.heads import ExitHead
from mirror_sd.graphs.model import CausalLM
from mirror_sd.graphs.vocab_trim import VocabTrim
from mirror_sd.training.collect import Collected

DEFAULTS = {"rank": 256, "vocab": 16384, "steps": 400, "batch": 256, "lr": 2e-3, "holdout": 4}
KAPPAS = (1, 4)  # agreement reported as top-1 and top-4 ("is the target's token a candidate")


def heads_dir(cache: str | Path | None, target_folder: str | Path) -> Path:
    """Where trained heads of one target live: <cache>/heads/<target identity hash>/."""
    from mirror_sd.graphs import zoo

    ident = json.dumps(source_identity(target_folder), sort_keys=True)
    return zoo.cache_dir(cache) / "heads" / hashlib.sha256(ident.encode()).hexdigest()[:16]


def trained_heads(cache: str | Path | None, target_folder: str | Path) -> dict[int, Path]:
    """ℓe -> the newest trained head file for this target (empty when none was trained)."""
    folder = heads_dir(cache, target_folder)
    found: dict[int, Path] = {}
    for p in sorted(folder.glob("exit-L*.pt"), key=lambda p: p.stat().st_mtime):
        found[int(p.stem.split("-")[1][1:])] = p
    return found


def head_metrics(path: Path) -> dict:
    """The metadata a trained head carries (agreements, corpus, settings)."""
    return torch.load(path, weights_only=True)["meta"]


@torch.no_grad()
def agreement(head: ExitHead, hidden: torch.Tensor, top: torch.Tensor, kappas=KAPPAS) -> dict:
    """Fraction of positions whose target token (top[..., 0]) is in the head's top-κ, per κ.

    hidden (C, T, D), top (C, T, k): evaluated chunk by chunk (V-wide logits are large).
    """
    hits = {k: 0 for k in kappas}
    n = 0
    ids = head.trim.ids() if head.trim is not None else None
    for c in range(hidden.shape[0]):
        logits = head(hidden[c].float())  # (T, K)
        cand = logits.topk(max(kappas), dim=-1).indices
        if ids is not None:
            cand = ids[cand]
        label = top[c, :, :1]
        for k in kappas:
            hits[k] += int((cand[:, :k] == label).any(-1).sum())
        n += label.shape[0]
    return {f"top{k}": hits[k] / n for k in kappas}


def train_head(
    model: CausalLM, col: Collected, layer: int, trim: VocabTrim, rank: int = 256,
    steps: int = 400, batch: int = 256, lr: float = 2e-3, holdout: int = 4, seed: int = 0,
) -> ExitHead:  # fmt: skip
    """Train an `ExitHead` at `layer` on all but the last `holdout` chunks; metrics in .meta.
    A bar over the steps on stderr when progress is shown (`mirror_sd.progress`)."""
    if not 0 < holdout < col.ids.shape[0]:
        raise ValueError(f"holdout must leave training chunks: 0 < {holdout} < {col.ids.shape[0]}")
    torch.manual_seed(seed)
    head = ExitHead(model, layer, trim, rank)
    hid, top = col.hidden[layer], col.final_top
    tr_h, ev_h = hid[:-holdout].flatten(0, 1), hid[-holdout:]
    index = torch.full((trim.vocab_size,), -1, dtype=torch.long)
    index[trim.ids()] = torch.arange(trim.size)
    tr_y = index[top[:-holdout, :, 0].flatten()]
    keep = tr_y >= 0
    tr_h, tr_y = tr_h[keep], tr_y[keep]
    opt = torch.optim.AdamW(head.adapter.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    t0, losses = time.perf_counter(), []
    head.train()
    for _ in progress.bar(range(steps), desc=f"exit head at layer {layer}", unit="step"):
        pick = torch.randint(0, tr_h.shape[0], (batch,), generator=gen)
        loss = torch.nn.functional.cross_entropy(head(tr_h[pick].float()), tr_y[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    head.eval()
    lens = ExitHead(model, layer, None, 0)
    head.meta.update(
        layer=layer, rank=rank, steps=steps, batch=batch, lr=lr, seed=seed,
        train_tokens=int(tr_y.numel()), heldout_tokens=int(ev_h.shape[0] * ev_h.shape[1]),
        train_seconds=round(time.perf_counter() - t0, 1),
        final_loss=sum(losses[-20:]) / min(20, len(losses)),
        lens=agreement(lens, ev_h, top[-holdout:]),
        trained=agreement(head, ev_h, top[-holdout:]),
    )  # fmt: skip
    return head
