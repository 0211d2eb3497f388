"""Amphista heads fitted to the target's own choices (`mirror-sd train amphista`; its command
line is in training/cli.py), how well they agree with it, and where their files live.

The data are the collection the exit heads use (`training.collect`): the hidden state
entering layer ℓ and the target's argmax labels[c, t] (its choice for token t + 1) at every
position of the offline corpus. Head j at position t learns labels[c, t + j]: the token j
positions after the target's next one, as the target itself would choose it after the
corpus prefix. Positions with t + K >= T are dropped, labels outside the VocabTrim are
ignored. Loss: the sum over heads of cross-entropy, head j weighted HEAD_DECAY^(j - 1).

Held-out chunks measure, per head, top-1 / top-κ agreement and the chain: the mean number
of leading heads whose top-1 is right, i.e. the extra tokens a round would accept if the
target's choices agreed with the corpus. Both the untrained heads (the logit lens) and the
trained ones are measured; the numbers go into the heads file's metadata.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mirror_sd import progress
from mirror_sd.graphs.amphista import AmphistaHeads
from mirror_sd.graphs.model import CausalLM
from mirror_sd.graphs.vocab_trim import VocabTrim
from mirror_sd.training.collect import Collected
from mirror_sd.training.exit_head import KAPPAS, heads_dir

DEFAULTS: dict[str, Any] = {
    "layer": None,  # None: the caller chooses (the CLI: the deepest trained exit head, else 3N/4)
    "heads": 3,
    "rank": 256,
    "vocab": 16384,
    "steps": 600,
    "batch": 256,
    "lr": 2e-3,
    "holdout": 4,
    "checkpoint_every": 50,  # steps between saves of a resumable run's checkpoint
}
HEAD_DECAY = 0.8  # loss weight of head j: HEAD_DECAY ** (j - 1)
EVAL_ROWS = 128  # positions per forward in `agreement` (bounds the (rows, K, V') logits)
IGNORE = -100  # a label outside the kept rows (cross_entropy's ignore_index)


def amphista_path(
    cache: str | Path | None, target_folder: str | Path, layer: int, heads: int, rank: int,
    vocab: int,
) -> Path:  # fmt: skip
    """The heads file for these settings: heads_dir/amphista-L<ℓ>-h<K>-r<rank>-k<vocab>.pt."""
    name = f"amphista-L{layer}-h{heads}-r{rank}-k{vocab}.pt"
    return heads_dir(cache, target_folder) / name


def trained_amphista(cache: str | Path | None, target_folder: str | Path) -> dict[int, Path]:
    """ℓ -> the newest trained heads file for this target (empty when none was trained)."""
    found: dict[int, Path] = {}
    files = heads_dir(cache, target_folder).glob("amphista-L*.pt")
    for p in sorted(files, key=lambda p: p.stat().st_mtime):
        found[int(p.stem.split("-")[1][1:])] = p
    return found


def cached_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of the heads file at `path`; {} when there is none or it is unreadable."""
    try:
        d = torch.load(Path(path), weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        return {}
    return d.get("meta", {}) if isinstance(d, dict) else {}


def check_settings(
    num_layers: int, layer: int, heads: int, rank: int, steps: int, batch: int,
    chunks: int | None = None, holdout: int = DEFAULTS["holdout"],
) -> None:  # fmt: skip
    """Raise ValueError naming the first bad setting (before any costly collection)."""
    if not 1 <= layer < num_layers:
        raise ValueError(f"layer = {layer}: outside [1, {num_layers - 1}] for this target")
    for name, value in (("heads", heads), ("rank", rank), ("steps", steps), ("batch", batch)):
        if value < 1:
            raise ValueError(f"{name} = {value}: must be >= 1")
    if chunks is not None and not 0 < holdout < chunks:
        raise ValueError(f"{chunks} chunks with {holdout} held out: need more than {holdout}")


def targets(labels: torch.Tensor, heads: int) -> torch.Tensor:
    """labels (C, T) -> (C, T - K, K): head j's label at position t is labels[c, t + j]."""
    n = labels.shape[1] - heads
    return torch.stack([labels[:, j : n + j] for j in range(1, heads + 1)], dim=-1)


def _kept_index(y: torch.Tensor, trim: VocabTrim | None) -> torch.Tensor:
    """Full-vocabulary labels -> rows of the kept set (IGNORE outside it)."""
    if trim is None:
        return y
    index = torch.full((trim.vocab_size,), IGNORE, dtype=torch.long)
    index[trim.ids()] = torch.arange(trim.size)
    return index[y]


def _loss(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """logits (N, K, V'), y (N, K) kept-row labels -> Σ_j w_j · mean CE of head j."""
    ce = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=IGNORE, reduction="none")
    per_head = ce.sum(0) / (y != IGNORE).sum(0).clamp(min=1)  # (K,)
    return (per_head * weights).sum()


@torch.no_grad()
def agreement(
    heads: AmphistaHeads, hidden: torch.Tensor, labels: torch.Tensor, kappas=KAPPAS
) -> dict[str, Any]:
    """How the heads' guesses match the target's labels on held-out chunks.

    hidden (C, T, D), labels (C, T). Per head j, `top{κ}`: the fraction of positions t whose
    labels[t + j] is in head j's top-κ; `ce`: mean cross-entropy over in-trim labels.
    `chain`: the mean number of leading heads whose top-1 is right (stopping at the first
    miss); `positions`: positions measured (t + K < T).
    """
    k = heads.heads
    y_all = targets(labels, k)  # (C, T - K, K)
    hits = {kappa: torch.zeros(k) for kappa in kappas}
    ce, valid = torch.zeros(k), torch.zeros(k)
    chain, n = 0.0, 0
    for c in range(hidden.shape[0]):
        for h, y in zip(hidden[c, : y_all.shape[1]].split(EVAL_ROWS),
                        y_all[c].split(EVAL_ROWS), strict=True):  # fmt: skip
            logits = heads(h.float())  # (rows, K, V')
            cand = logits.topk(min(max(kappas), logits.shape[-1]), dim=-1).indices
            if heads.trim is not None:
                cand = heads.trim.ids()[cand]  # (rows, K, κ) full ids
            for kappa in kappas:
                hits[kappa] += (cand[..., :kappa] == y[..., None]).any(-1).sum(0)
            right = (cand[..., 0] == y).long()  # (rows, K)
            chain += float(right.cumprod(-1).sum())
            yk = _kept_index(y, heads.trim)
            per = F.cross_entropy(logits.transpose(1, 2), yk, ignore_index=IGNORE, reduction="none")
            ce, valid = ce + per.sum(0), valid + (yk != IGNORE).sum(0)
            n += y.shape[0]
    out: dict[str, Any] = {f"top{kappa}": (hits[kappa] / n).tolist() for kappa in kappas}
    out.update(chain=chain / n, ce=(ce / valid.clamp(min=1)).tolist(), positions=n)
    return out


def train_amphista(
    model: CausalLM, col: Collected, layer: int, heads: int = DEFAULTS["heads"],
    trim: VocabTrim | None = None, rank: int = DEFAULTS["rank"], steps: int = DEFAULTS["steps"],
    batch: int = DEFAULTS["batch"], lr: float = DEFAULTS["lr"],
    holdout: int = DEFAULTS["holdout"], seed: int = 0, checkpoint: Path | None = None,
    checkpoint_every: int = DEFAULTS["checkpoint_every"],
) -> AmphistaHeads:  # fmt: skip
    """Train `heads` Amphista heads at `layer` on all but the last `holdout` chunks of `col`;
    agreements (lens and trained), token counts, seconds and settings in `.meta`.

    With `checkpoint`, the run saves its state there every `checkpoint_every` steps
    (atomically), resumes from it when it holds a run of the same settings and data, and
    deletes it when done. A bar over the steps on stderr when progress is shown.

    Raises:
        ValueError: a setting out of range (`check_settings`), or chunks too short for K heads.
    """
    c_n, t_n = col.labels.shape
    check_settings(model.num_layers, layer, heads, rank, steps, batch, c_n, holdout)
    if t_n <= heads:
        raise ValueError(f"chunks of {t_n} tokens are too short for {heads} heads")
    vocab = trim.size if trim else model.config.vocab_size
    settings = dict(layer=layer, heads=heads, rank=rank, vocab=vocab, steps=steps, batch=batch,
                    lr=lr, holdout=holdout, seed=seed)  # fmt: skip
    torch.manual_seed(seed)
    amph = AmphistaHeads(model, layer, heads, trim, rank)
    y = _kept_index(targets(col.labels[:-holdout], heads), trim).flatten(0, 1)  # (N, K)
    x = col.hidden[layer][:-holdout, : t_n - heads].flatten(0, 1)  # (N, D) float16
    keep = (y != IGNORE).any(-1)
    x, y = x[keep], y[keep]
    if not x.shape[0]:
        raise ValueError("no training position has a label among the kept rows: raise --vocab")
    key = _run_key(settings, col.labels, trim)
    losses, seconds = _fit(amph, x, y, settings, key, checkpoint, checkpoint_every)
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    ev_h, ev_y = col.hidden[layer][-holdout:], col.labels[-holdout:]
    lens = AmphistaHeads(model, layer, heads, trim, rank).eval()  # untrained: the logit lens
    amph.meta.update(
        settings=settings, train_tokens=int(x.shape[0]),
        heldout_tokens=int(ev_y.shape[0] * (t_n - heads)), train_seconds=round(seconds, 1),
        final_loss=sum(losses[-20:]) / max(1, min(20, len(losses))),
        lens=agreement(lens, ev_h, ev_y), trained=agreement(amph, ev_h, ev_y),
    )  # fmt: skip
    return amph


def _fit(
    amph: AmphistaHeads, x: torch.Tensor, y: torch.Tensor, s: dict[str, Any], key: str,
    checkpoint: Path | None, every: int,
) -> tuple[list[float], float]:  # fmt: skip
    """AdamW + one-cycle on x (N, D), y (N, K) from step 0 or the checkpoint's step to
    s["steps"], saving the checkpoint every `every` steps; (losses, training seconds)."""
    steps, batch, lr = s["steps"], s["batch"], s["lr"]
    weights = HEAD_DECAY ** torch.arange(amph.heads, dtype=torch.float32)
    params = [p for p in amph.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(s["seed"])
    state = _resume(checkpoint, key)
    if state:
        amph.load_trained_state(state["weights"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
    losses, seconds, t0 = state.get("losses", []), state.get("seconds", 0.0), time.perf_counter()
    amph.train()
    desc = f"amphista heads at layer {amph.layer}"
    for i in progress.bar(range(state.get("step", 0), steps), desc=desc, unit="step"):
        pick = torch.randint(0, x.shape[0], (batch,), generator=gen)
        loss = _loss(amph(x[pick].float()), y[pick], weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if checkpoint is not None and (i + 1) % every == 0 and i + 1 < steps:
            now = seconds + time.perf_counter() - t0
            _save_checkpoint(checkpoint, {"key": key, "step": i + 1, "losses": losses,
                                          "seconds": now, "weights": amph.trained_state(),
                                          "opt": opt.state_dict(), "sched": sched.state_dict(),
                                          "gen": gen.get_state()})  # fmt: skip
    amph.eval()
    return losses, seconds + time.perf_counter() - t0


def _run_key(settings: dict[str, Any], labels: torch.Tensor, trim: VocabTrim | None) -> str:
    """What a checkpoint must match to be resumed: the settings, the labels and the kept ids."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(labels.contiguous().numpy().tobytes())
    h.update(json.dumps(list(trim.keep) if trim else None).encode())
    return h.hexdigest()[:16]


def _resume(checkpoint: Path | None, key: str) -> dict[str, Any]:
    """The checkpoint's state when it holds a run with this key, else {} (none, or another's)."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return {}
    state = torch.load(checkpoint, weights_only=True)
    return state if isinstance(state, dict) and state.get("key") == key else {}


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # atomic: write, then rename
    torch.save(state, tmp)
    tmp.replace(path)
