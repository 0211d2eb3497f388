"""Kangaroo self-draft: the target's first k layers plus one trained adapter layer.

The draft is the target truncated after layer k - 1, followed by an adapter, the target's
final norm and its LM head (Kangaroo, arXiv 2404.18911). Its first k layers and head are the
target's own, frozen; only the adapter is trained, on the target's own hidden states entering
layer k and the target's own next-token choices over an offline corpus (`corpus.py`).

It is written as an ordinary Hugging Face folder (`adapter_folder`: the target's
architecture with num_hidden_layers = k + 1) so that everything that takes a draft folder takes it unchanged:
`load_model`, `mirror_sd.compile(target, draft=folder)`, the ONNX export with int8 weights,
and VocabTrim of the draft head. That format has uniform decoder layers, so the adapter is a
full decoder layer (attention *and* MLP, unlike Kangaroo's attention-only adapter),
initialised from one of the target's layers and trained whole: its MLP costs the same at
draft time whether it is trained or not, so it is used as capacity (`train_mlp=False`
trains only attention and norms, as Kangaroo does). The default initialisation is the
target's last layer, whose output already suits the final norm and LM head: with `init=
"auto"` both it and layer k are probe-trained and the better one on held-out chunks kept,
and the last layer won on SmolLM2-135M and Qwen2.5-Coder-1.5B (docs/training.md).

The loss is cross-entropy against the target's argmax plus a KL term towards the target's
distribution, both over a candidate set of output tokens (the labels, the target's top-8 and
the most frequent of them) instead of all 151,936 rows of the LM head, which would dominate
a CPU step; agreement reported at the end uses the full head.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mirror_sd import progress as progress_switch
from mirror_sd.graphs import zoo
from mirror_sd.graphs.config import load_config
from mirror_sd.graphs.export import source_identity
from mirror_sd.graphs.loader import build_model, load_state_dict, load_tokenizer
from mirror_sd.graphs.masks import causal_mask
from mirror_sd.graphs.model import CausalLM, DecoderLayer
from mirror_sd.graphs.vocab_trim import VocabTrim
from mirror_sd.training.adapter_folder import ADAPTER_FILE, write_draft_folder
from mirror_sd.training.collect import Collected, collect_cached
from mirror_sd.training.corpus import Corpus, build_corpus

ADAPTER_VERSION = 1  # of the settings key and the provenance format
_IGNORE = -100  # held-out labels outside the candidate set: no cross-entropy term


@dataclass(frozen=True)
class AdapterSettings:
    """Everything a trained adapter depends on besides the target and the corpus text."""

    k: int = 2  # target layers kept; the adapter is layer k of the draft
    n_chunks: int = 40  # corpus chunks (40 x 512: the shared cached collection)
    chunk_len: int = 512
    steps: int = 100  # optimizer steps, one chunk each
    lr: float = 1e-3
    seed: int = 0
    corpus_seed: int = 0  # the corpus draw (0: the shared cached collection)
    init: str = "last"  # "last" (target's last layer) | "layer" (target layer k) | "auto" (better)
    probe_steps: int = 12  # steps each init gets before "auto" keeps the better one
    train_mlp: bool = True  # False: only attention + norms learn (Kangaroo's adapter)
    candidates: int = 8192  # output tokens in the training softmax
    distill: float = 1.0  # weight of KL(target || draft) next to the argmax cross-entropy
    holdout_every: int = 7  # every 7th chunk (from the 4th) is held out for evaluation


# ----------------------------------------------------------------------------- checks / data


def check_k(num_layers: int, k: int) -> None:
    """The draft keeps k of the target's layers: at least one, and fewer than all of them
    (k = num_layers would leave no layer to adapt and the draft would cost the target)."""
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k < num_layers:
        raise ValueError(
            f"k = {k} is outside [1, {num_layers - 1}]: the self-draft keeps k of the target's "
            f"{num_layers} layers and appends an adapter, so it needs 1 <= k < {num_layers}"
        )


def holdout_split(n: int, every: int) -> tuple[list[int], list[int]]:
    """(train, held-out) chunk indices: every `every`-th chunk from index every // 2 is held
    out. Interleaved rather than a tail, because the corpus puts prose chunks before code."""
    if n < 2:
        raise ValueError(f"need at least 2 corpus chunks to hold one out, got {n}")
    held = list(range(min(every // 2, n - 1), n, max(every, 2)))
    return [i for i in range(n) if i not in held], held


def candidate_set(col: Collected, train: Sequence[int], size: int, vocab: int) -> VocabTrim:
    """The training softmax's support: every label and top-8 token of the training chunks
    that fits, labels first, each group by frequency. It always holds the training labels,
    so cross-entropy against them is defined, and grows past `size` if they need it."""
    idx = torch.tensor(list(train))
    labels = torch.bincount(col.labels[idx].flatten(), minlength=vocab)
    tops = torch.bincount(col.final_top[idx].flatten(), minlength=vocab)
    score = labels.double() * (tops.sum().double() + 1) + tops.double()  # labels dominate
    size = min(vocab, max(size, int((labels > 0).sum())))
    keep = torch.argsort(-score, stable=True)[:size]
    return VocabTrim(tuple(keep.tolist()), vocab, "training labels + the target's top-8")


# ----------------------------------------------------------------------------- the draftlet


class Draftlet(nn.Module):
    """The trainable part of the self-draft seen from layer k: adapter layer, then the
    target's frozen final norm and (candidate rows of the) LM head."""

    def __init__(self, target: CausalLM, init_layer: int, cand: torch.Tensor, seq_len: int):
        super().__init__()
        self.adapter: DecoderLayer = copy.deepcopy(target.model.layers[init_layer]).float()
        self.norm = copy.deepcopy(target.model.norm).float().requires_grad_(False)
        self.register_buffer("head", target.lm_head.weight.detach()[cand].float().clone())
        cos, sin = target.rope(torch.arange(seq_len).unsqueeze(0), torch.float32)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.register_buffer("mask", causal_mask(0, seq_len))
        cfg = target.config
        self.register_buffer("empty", torch.zeros(1, 0, cfg.num_kv_heads, cfg.head_dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(1, T, D) hidden entering layer k -> (1, T, D) normed output of the adapter."""
        t = x.shape[1]
        y, _, _ = self.adapter(
            x, self.cos[:, :t], self.sin[:, :t], self.mask[:, :t, :t], self.empty, self.empty
        )
        return self.norm(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(1, T, D) -> (1, T, K) logits over the candidate set."""
        return F.linear(self.features(x), self.head)


def _loss(logits: torch.Tensor, label_idx: torch.Tensor, teacher: torch.Tensor | None,
          distill: float) -> torch.Tensor:  # fmt: skip
    """Cross-entropy against the target's argmax (as candidate indices), plus `distill` x
    KL(target || draft) over the candidates when the target's logits are given."""
    loss = F.cross_entropy(logits.flatten(0, 1), label_idx.flatten(), ignore_index=_IGNORE)
    if teacher is not None and distill > 0:
        t = F.log_softmax(teacher.flatten(0, 1), -1)
        s = F.log_softmax(logits.flatten(0, 1), -1)
        loss = loss + distill * F.kl_div(s, t, log_target=True, reduction="batchmean")
    return loss


# ----------------------------------------------------------------------------- training


@dataclass
class _Data:
    """The collection seen through the candidate set."""

    col: Collected
    k: int
    n: int  # target layer count: hidden[n] is the target's final hidden state
    cand: torch.Tensor  # (K,) candidate token ids, the order of Draftlet.head's rows
    label_idx: torch.Tensor  # (C, T) labels as indices into the candidate set
    train: list[int]
    held: list[int]

    def x(self, c: int) -> torch.Tensor:
        return self.col.hidden[self.k][c : c + 1].float()

    def teacher(self, model: Draftlet, c: int) -> torch.Tensor | None:
        if self.n not in self.col.hidden:
            return None
        with torch.no_grad():
            return F.linear(model.norm(self.col.hidden[self.n][c : c + 1].float()), model.head)


def lr_schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


class _Trainer:
    """One adapter being trained: model, optimizer, schedule and a seeded chunk order."""

    def __init__(self, model: Draftlet, s: AdapterSettings, data: _Data):
        self.model, self.s, self.data, self.step = model, s, data, 0
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
        warm = max(1, s.steps // 20)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda i: lr_schedule(i, s.steps, warm)
        )
        g = torch.Generator().manual_seed(s.seed)
        epochs = -(-s.steps // len(data.train))
        self.order = [
            data.train[i] for _ in range(epochs) for i in torch.randperm(len(data.train), generator=g)
        ]  # fmt: skip

    def run(self, steps: int, progress: bool, desc: str) -> float:
        """`steps` optimizer steps; returns the mean training loss over them."""
        self.model.train()
        total = 0.0
        for _ in tqdm(range(steps), desc=desc, disable=not progress):
            c = self.order[self.step]
            logits = self.model(self.data.x(c))
            teacher = self.data.teacher(self.model, c)
            loss = _loss(logits, self.data.label_idx[c : c + 1], teacher, self.s.distill)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.adapter.parameters(), 1.0)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            total += float(loss.detach())
            self.step += 1
        self.model.eval()
        return total / max(1, steps)


@torch.no_grad()
def evaluate(model: Draftlet, data: _Data, chunks: Sequence[int],
             full_head: torch.Tensor | None = None) -> dict[str, float]:  # fmt: skip
    """Top-1 agreement with the target's argmax and the candidate-set cross-entropy over
    `chunks`. With `full_head` (V, D) the argmax is over the whole vocabulary (what the draft
    proposes at run time); without it, over the candidate set (cheap, for choosing)."""
    model.eval()
    hits = rows = 0
    ce = 0.0
    for c in chunks:
        feats = model.features(data.x(c))
        ce += float(_loss(F.linear(feats, model.head), data.label_idx[c : c + 1], None, 0.0))
        labels = data.col.labels[c]
        if full_head is None:
            pred = data.cand[F.linear(feats, model.head)[0].argmax(-1)]
        else:
            pred = torch.cat([F.linear(f, full_head).argmax(-1) for f in feats[0].split(128)])
        hits += int((pred == labels).sum())
        rows += labels.numel()
    return {"top1": hits / max(1, rows), "ce": ce / max(1, len(chunks))}


def _make_data(col: Collected, k: int, n: int, s: AdapterSettings, vocab: int) -> _Data:
    train, held = holdout_split(len(col.ids), s.holdout_every)
    cand = candidate_set(col, train, s.candidates, vocab).ids()
    where = torch.full((vocab,), _IGNORE, dtype=torch.long)
    where[cand] = torch.arange(len(cand))
    return _Data(col, k, n, cand, where[col.labels], train, held)


INITS = ("auto", "layer", "last")


def _init_layers(n: int, k: int, init: str) -> list[int]:
    """Which target layers to start the adapter from: layer k (the next layer, fed exactly
    the input it was trained on) and/or the last layer (whose output already suits the
    final norm and LM head)."""
    if init not in INITS:
        raise ValueError(f"init {init!r} is not one of {', '.join(INITS)}")
    return {"layer": [k], "last": [n - 1], "auto": sorted({k, n - 1})}[init]


def _train_best_init(
    target: CausalLM, data: _Data, s: AdapterSettings, progress: bool
) -> tuple[_Trainer, int, dict[str, Any]]:
    """Train from each candidate initialisation for `probe_steps`, keep the one with the
    better held-out agreement (candidate-set argmax) and finish training it."""
    t = data.col.ids.shape[1]
    report: dict[str, Any] = {}
    best: tuple[float, int, _Trainer] | None = None
    inits = _init_layers(data.n, data.k, s.init)
    probe = min(s.probe_steps, s.steps) if len(inits) > 1 else 0
    for layer in inits:
        torch.manual_seed(s.seed)
        model = Draftlet(target, layer, data.cand, t)
        model.adapter.mlp.requires_grad_(s.train_mlp)
        trainer = _Trainer(model, s, data)
        before = evaluate(trainer.model, data, data.held)
        trainer.run(probe, progress, f"adapter from layer {layer} (probe)")
        after = evaluate(trainer.model, data, data.held) if probe else before
        report[str(layer)] = {"untrained": before, f"after_{probe}_steps": after}
        if best is None or after["top1"] > best[0]:
            best = (after["top1"], layer, trainer)
        else:
            del trainer
    assert best is not None
    _, layer, trainer = best
    trainer.run(s.steps - trainer.step, progress, f"adapter from layer {layer}")
    return trainer, layer, report


# ----------------------------------------------------------------------------- entry point


def _key(target_id: dict[str, Any], corpus: Corpus, s: AdapterSettings) -> str:
    blob = json.dumps(
        {"v": ADAPTER_VERSION, "target": target_id, "corpus": corpus.identity, "s": asdict(s)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def say(progress: bool, msg: str) -> None:
    """Print a training status line on stdout when progress is shown."""
    if progress:
        print(msg, flush=True)


def train_adapter(
    target: str | Path, k: int = 2, *, steps: int = 100, lr: float = 1e-3, seed: int = 0,
    n_chunks: int = 40, chunk_len: int = 512, out: str | Path | None = None,
    cache: str | Path | None = None, progress: bool | None = None, corpus: Corpus | None = None,
    **settings: Any,
) -> Path:  # fmt: skip
    """Train a Kangaroo self-draft for `target` (name or HF folder) keeping its first `k`
    layers; return the written draft folder (usable as `compile(target, draft=folder)`).

    The default folder, <cache>/adapters/<target>-k<k>-<key>, is keyed by the target's
    identity, the corpus and every setting; if it is complete it is returned untrained.
    `corpus` replaces the default offline corpus (`build_corpus` of the target's tokenizer
    with n_chunks x chunk_len tokens); its chunks must share one length. Extra `settings`
    are `AdapterSettings` fields (init, probe_steps, candidates, distill, holdout_every,
    corpus_seed).

    Raises:
        ValueError: k is outside [1, num_layers - 1] or a setting is invalid.
    """
    s = AdapterSettings(k=k, n_chunks=n_chunks, chunk_len=chunk_len, steps=steps, lr=lr,
                        seed=seed, **settings)  # fmt: skip
    if s.steps < 1 or s.lr <= 0:
        raise ValueError(f"need steps >= 1 and lr > 0, got {s.steps}, {s.lr}")
    progress = progress_switch.wanted(progress)
    folder = zoo.resolve_model(target, cache=cache)
    cfg = load_config(folder)
    check_k(cfg.num_layers, k)
    _init_layers(cfg.num_layers, k, s.init)
    if corpus is None:
        corpus = build_corpus(load_tokenizer(folder), s.n_chunks, s.chunk_len, s.corpus_seed)
    s = replace(s, n_chunks=len(corpus.chunks), chunk_len=len(corpus.chunks[0]))
    if len(corpus.chunks) < 2:
        raise ValueError(f"the corpus has {len(corpus.chunks)} chunks; need at least 2")
    target_id = source_identity(folder)
    dest = Path(out) if out is not None else (
        zoo.cache_dir(cache) / "adapters" / f"{folder.name}-k{k}-{_key(target_id, corpus, s)}"
    )  # fmt: skip
    if out is None and (dest / ADAPTER_FILE).is_file():
        say(progress, f"cached self-draft: {dest}")
        return dest
    start = time.perf_counter()
    raw = load_state_dict(folder)
    model = build_model(cfg, raw, torch.float32)
    layers = [k, cfg.num_layers] if s.distill > 0 else [k]
    col = collect_cached(model, json.dumps(target_id), corpus, layers,
                         zoo.cache_dir(cache) / "train", progress=progress)  # fmt: skip
    data = _make_data(col, k, cfg.num_layers, s, cfg.vocab_size)
    trainer, init_layer, probes = _train_best_init(model, data, s, progress)
    final = _final_report(model, trainer.model, data, progress)
    provenance = {
        "format": ADAPTER_VERSION,
        "kind": "kangaroo-self-draft",
        "target": {"folder": str(folder), "identity": target_id, "num_layers": cfg.num_layers},
        "k": k,
        "adapter": f"layer {k}: a full decoder layer initialised from target layer {init_layer}",
        "init_layer": init_layer,
        "init_probes": probes,
        "corpus": {
            "identity": corpus.identity,
            "description": corpus.description,
            "train_chunks": len(data.train),
            "heldout_chunks": data.held,
        },  # fmt: skip
        "settings": asdict(s),
        "candidates": int(len(data.cand)),
        **final,
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    del model, col
    path = write_draft_folder(folder, raw, k, trainer.model.adapter, dest, provenance)
    say(progress, _summary(provenance, path))
    return path


def _final_report(
    target: CausalLM, model: Draftlet, data: _Data, progress: bool
) -> dict[str, float]:
    """Agreement with the target's argmax on the held-out chunks over the full vocabulary
    (what the draft proposes at run time), and, over the candidate set only (a full-head
    pass costs ~240 GFLOP per 512-token chunk of the 1.5B), on the held-out and training
    chunks (as many, evenly spread): their gap shows over-fitting."""
    say(progress, f"evaluating on {len(data.held)} held-out chunks (full vocabulary)")
    held = evaluate(model, data, data.held, target.lm_head.weight.detach().float())
    held_c = evaluate(model, data, data.held)
    step = max(1, len(data.train) // len(data.held))
    train_c = evaluate(model, data, data.train[::step][: len(data.held)])
    return {
        "heldout_top1": held["top1"],
        "heldout_ce": held["ce"],
        "heldout_top1_candidates": held_c["top1"],
        "train_top1_candidates": train_c["top1"],
        "train_ce": train_c["ce"],
    }


def _summary(p: dict[str, Any], path: Path) -> str:
    return (
        f"self-draft: {path}\n  k = {p['k']}, adapter from target layer {p['init_layer']}, "
        f"{p['settings']['steps']} steps, {p['train_seconds']} s\n"
        f"  top-1 agreement with the target: held-out {p['heldout_top1']:.1%} "
        f"(candidate set: held-out {p['heldout_top1_candidates']:.1%}, "
        f"train {p['train_top1_candidates']:.1%})"
    )
