"""Stream rows for speculative streaming in the draft (`graphs.streams`), trained offline.

Only the k stream rows train: the draft is frozen and the rows enter at its first layer (the
variant of Speculative Streaming, Bhendawade et al. 2024, that fits a CPU; the paper's top-Ns
stream layers and LoRA are not done). Stream j after the real row t sits at position t + j,
sees rows 0..t and streams 1..j, and learns the target's own argmax for token t + 1 + j
(`collect`: the offline corpus, the cached collection the other heads share), by
cross-entropy over a candidate set of the draft's LM-head rows (`adapter.candidate_set`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mirror_sd import progress as progress_switch
from mirror_sd.graphs import zoo
from mirror_sd.graphs.export import source_identity
from mirror_sd.graphs.loader import load_model, load_tokenizer
from mirror_sd.graphs.masks import causal_mask
from mirror_sd.graphs.model import CausalLM
from mirror_sd.graphs.streams import STREAMS_FILE, STREAMS_META, StreamTable, with_streams
from mirror_sd.progress import bar as progress_bar
from mirror_sd.training.adapter import candidate_set, holdout_split, lr_schedule, say
from mirror_sd.training.collect import Collected, collect_cached
from mirror_sd.training.corpus import Corpus, build_corpus

KIND = "speculative-streaming-rows"
VERSION = 1  # of the settings key and the provenance
PARTIAL = "partial.pt"  # the checkpoint of an unfinished run, in its destination folder
_IGNORE = -100  # a held-out label outside the candidate set: no cross-entropy term

DEFAULTS: dict[str, Any] = {
    "k": 2,  # streams: tokens guessed beyond the next one per draft forward
    "steps": 200,  # optimizer steps, one chunk each
    "lr": 3e-3,  # peak learning rate (Adam on the rows; 5% warm-up, cosine decay)
    "positions": 64,  # base positions t per step, each with all k streams
    "n_chunks": 40,  # corpus chunks (40 x 512: the collection the adapter and heads share)
    "chunk_len": 512,
    "holdout_every": 7,  # every 7th chunk (from the 4th) is held out
    "candidates": 8192,  # LM-head rows in the training softmax
    "eval_positions": 256,  # held-out base positions the agreements are measured on
    "init_noise": 0.1,  # initial rows: mean embedding row + this x the table's std x N(0, 1)
    "checkpoint_every": 25,  # steps between saves of partial.pt
    "seed": 0,  # initial noise, chunk order, positions
    "corpus_seed": 0,  # the corpus draw (0: the shared cached collection)
}


def streams_dir(cache: str | Path | None, draft_folder: str | Path) -> Path:
    """Where stream tables of one draft live: <cache>/streams/<draft>-<identity hash>/."""
    ident = json.dumps(source_identity(draft_folder), sort_keys=True)
    name = f"{Path(draft_folder).name}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"
    return zoo.cache_dir(cache) / "streams" / name


def trained_streams(
    cache: str | Path | None, draft_folder: str | Path, target_folder: str | Path
) -> Path | None:
    """The newest complete stream table in `streams_dir` trained for this draft against this
    target (both matched by `source_identity`, as the table's provenance records them);
    None if there is none. The models may be folders or fetched registry names."""
    draft = zoo.resolve_model(draft_folder, cache=cache, fetch=False)
    target = zoo.resolve_model(target_folder, cache=cache, fetch=False)
    want = json.loads(json.dumps([source_identity(draft), source_identity(target)]))
    found = []
    for meta in streams_dir(cache, draft).glob(f"*/{STREAMS_META}"):
        p = _read_json(meta)
        have = [p.get(m, {}).get("identity") for m in ("draft", "target")]
        if p.get("kind") == KIND and have == want and (meta.parent / STREAMS_FILE).is_file():
            found.append((meta.stat().st_mtime_ns, meta.parent))
    return max(found)[1] if found else None


def train_streams(
    target: str | Path, draft: str | Path, k: int = DEFAULTS["k"], *,
    steps: int = DEFAULTS["steps"], lr: float = DEFAULTS["lr"], seed: int = DEFAULTS["seed"],
    n_chunks: int = DEFAULTS["n_chunks"], chunk_len: int = DEFAULTS["chunk_len"],
    out: str | Path | None = None, cache: str | Path | None = None,
    progress: bool | None = None, corpus: Corpus | None = None, **settings: Any,
) -> Path:  # fmt: skip
    """Train k stream rows for `draft` against `target` (names or HF folders sharing a
    tokenizer); return the folder `StreamTable.save` wrote.

    The default folder, `streams_dir(cache, draft)`/<target>-k<k>-<key>, is keyed by both
    models' identities, the corpus and every setting but checkpoint_every; a complete table
    there (or at `out`) with this key is returned untrained. Every checkpoint_every steps
    the run saves `partial.pt` there; a later call with the same key resumes from it.
    `corpus` replaces the offline corpus of the target's tokenizer (n_chunks x chunk_len
    tokens). Extra `settings` are other DEFAULTS keys (positions, candidates, ...).

    Raises:
        ValueError: a setting is out of range, or the draft cannot read the target's tokens.
        TypeError: an unknown setting.
    """
    s = _settings(dict(settings, k=k, steps=steps, lr=lr, seed=seed, n_chunks=n_chunks,
                       chunk_len=chunk_len))  # fmt: skip
    progress = progress_switch.wanted(progress)
    t_folder, d_folder = (zoo.resolve_model(m, cache=cache) for m in (target, draft))
    if corpus is None:
        corpus = build_corpus(load_tokenizer(t_folder), n_chunks, chunk_len, s["corpus_seed"])
    s.update(n_chunks=len(corpus.chunks), chunk_len=len(corpus.chunks[0]))
    if len(corpus.chunks) < 2 or s["chunk_len"] < k + 2:
        raise ValueError(f"the corpus has {len(corpus.chunks)} chunks of {s['chunk_len']} "
                         f"tokens; need at least 2 chunks of more than k + 1 = {k + 1}")  # fmt: skip
    t_id, d_id = source_identity(t_folder), source_identity(d_folder)
    key = _key(d_id, t_id, corpus, s)
    name = f"{t_folder.name}-k{k}-{key}"
    dest = Path(out) if out is not None else streams_dir(cache, d_folder) / name
    if _read_json(dest / STREAMS_META).get("key") == key and (dest / STREAMS_FILE).is_file():
        say(progress, f"cached stream rows: {dest}")
        return dest
    start = time.perf_counter()
    col = collect_cached(_Lazy(t_folder), json.dumps(t_id), corpus, [],
                         zoo.cache_dir(cache) / "train", progress=progress)  # fmt: skip
    run = _Run(load_model(d_folder, "float32").requires_grad_(False), col, s)
    state = torch.load(dest / PARTIAL, weights_only=True) if (dest / PARTIAL).is_file() else {}
    if state.get("key") == key:
        say(progress, f"resuming {dest / PARTIAL} at step {state['step']} of {steps}")
    else:  # none, or another run's
        state = {"key": key, "step": 0, "before": run.evaluate(), "seconds": 0.0}
    run.fit(state, dest / PARTIAL, start, progress)
    provenance = {
        "kind": KIND, "version": VERSION, "key": key, "k": k,
        "draft": {"folder": str(d_folder), "identity": d_id},
        "target": {"folder": str(t_folder), "identity": t_id},
        "corpus": {"identity": corpus.identity, "description": corpus.description,
                   "train_chunks": len(run.train), "heldout_chunks": run.held},
        "settings": s, "candidates": int(len(run.cand)),
        "agreement": {"before": state["before"], "after": run.evaluate()},
        "train_seconds": round(state["seconds"] + time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }  # fmt: skip
    path = StreamTable(run.rows.detach().clone(), run.vocab, provenance).save(dest)
    (dest / PARTIAL).unlink(missing_ok=True)
    return path


class _Run:
    """The frozen draft with trainable stream rows, its data and its optimizer steps."""

    def __init__(self, draft: CausalLM, col: Collected, s: dict[str, Any]):
        self.s, self.vocab, self.ids, self.labels = s, draft.config.vocab_size, col.ids, col.labels
        top = max(int(col.ids.max()), int(col.labels.max()))
        if top >= self.vocab:
            raise ValueError(
                f"the target's tokens reach id {top} but the draft's embedding has {self.vocab} "
                "rows: the draft must share the target's tokenizer (a draft of the same family)"
            )
        self.train, self.held = holdout_split(len(col.ids), s["holdout_every"])
        wide = max(self.vocab, int(col.final_top.max()) + 1)  # the target's top-8 may reach past V
        cand = torch.as_tensor(candidate_set(col, self.train, s["candidates"], wide).ids())
        self.cand = cand[cand < self.vocab]  # every training label is below V
        self.where = torch.full((self.vocab,), _IGNORE, dtype=torch.long)
        self.where[self.cand] = torch.arange(len(self.cand))
        self.head = draft.lm_head.weight.detach()[self.cand].float()
        table, g = draft.model.embed_tokens.weight.detach().float(), torch.Generator()
        noise = torch.randn(s["k"], table.shape[1], generator=g.manual_seed(s["seed"]))
        self.rows = nn.Parameter(table.mean(0) + s["init_noise"] * float(table.std()) * noise)
        self.model = with_streams(draft, self.rows)
        self.order = [self.train[int(i)] for _ in range(-(-s["steps"] // len(self.train)))
                      for i in torch.randperm(len(self.train), generator=g)]  # fmt: skip

    def context(self, c: int) -> tuple[Any, torch.Tensor]:
        """Chunk c's real rows through the draft without grad: (its cache, hidden (T, D))."""
        m, t = self.model, self.ids.shape[1]
        cache = m.new_cache(t)
        with torch.no_grad():
            x = m.run_layers(0, m.num_layers, m.embed(self.ids[c : c + 1]),
                             torch.arange(t)[None], causal_mask(0, t), cache)  # fmt: skip
        cache.advance(t)
        return cache, x[0]

    def streams(self, cache: Any, ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stream rows (t, j), j = 1..k, after each base position t of `ts` (P,), attending to
        the cache: hidden (P k, D) and their positions t + j (P k,), also where their labels
        are (labels[c, t + j] is the target's token t + 1 + j)."""
        k, p = self.s["k"], len(ts)
        j, t = torch.arange(1, k + 1).repeat(p), ts.repeat_interleave(k)
        group, own = torch.arange(p).repeat_interleave(k), torch.arange(p * k)
        real = torch.arange(cache.length)[None] <= t[:, None]  # the sequence up to t
        mine = (group[:, None] == group[None]) & (own[None] <= own[:, None])  # streams 1..j
        m, mask = self.model, torch.cat([real, mine], 1)[None]
        read_only = SimpleNamespace(past=cache.past, write=lambda *_: None)  # K/V not kept
        x = m.run_layers(0, m.num_layers, m.embed((self.vocab + j - 1)[None]), (t + j)[None],
                         mask, read_only)  # fmt: skip
        return x[0], t + j

    def loss(self, c: int, ts: torch.Tensor, cache: Any) -> tuple[torch.Tensor, int]:
        """Summed candidate-set cross-entropy of the streams after `ts` in chunk c, and the
        number of its terms (labels in the candidate set)."""
        h, at = self.streams(cache, ts)
        idx = self.where[self.labels[c, at]]
        logits = F.linear(self.model.model.norm(h), self.head)
        ce = F.cross_entropy(logits, idx, ignore_index=_IGNORE, reduction="sum")
        return ce, int((idx != _IGNORE).sum())

    def positions(self, step: int, c: int | None = None) -> torch.Tensor:
        """The sorted base positions of training step `step`, or of held-out chunk c's
        evaluation sample; every stream's label lies inside the chunk."""
        s, span = self.s, self.ids.shape[1] - self.s["k"]
        if c is None:
            g, n = torch.Generator().manual_seed(s["seed"] * 1_000_003 + step), s["positions"]
        else:
            g, n = torch.Generator().manual_seed(c), -(-s["eval_positions"] // len(self.held))
        return torch.randperm(span, generator=g)[:n].sort().values

    def fit(self, state: dict[str, Any], partial: Path, start: float, progress: bool) -> None:
        """Adam on the rows from state["step"] (rows and optimizer state from `state` when
        resuming) to `steps`; saves the state to `partial` every checkpoint_every steps."""
        s, opt = self.s, torch.optim.Adam([self.rows], lr=self.s["lr"])
        if state["step"]:
            self.rows.data.copy_(state["rows"])
            opt.load_state_dict(state["opt"])
        steps = range(state["step"], s["steps"])
        for i in progress_bar(steps, desc="stream rows", unit="step", show=progress):
            for group in opt.param_groups:
                group["lr"] = s["lr"] * lr_schedule(i, s["steps"], max(1, s["steps"] // 20))
            cache, _ = self.context(self.order[i])
            ce, n = self.loss(self.order[i], self.positions(i), cache)
            (ce / max(1, n)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (i + 1) % s["checkpoint_every"] == 0 and i + 1 < s["steps"]:
                now = state["seconds"] + time.perf_counter() - start
                tmp = partial.with_name(partial.name + ".tmp")  # atomic: write, then rename
                partial.parent.mkdir(parents=True, exist_ok=True)
                torch.save({**state, "step": i + 1, "seconds": now, "opt": opt.state_dict(),
                            "rows": self.rows.detach().clone()}, tmp)  # fmt: skip
                tmp.replace(partial)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Per stream j, on a fixed sample of held-out positions: top-1 agreement of its
        full-head argmax with the target's label and with the draft's own teacher-forced
        argmax at the same position; and the mean candidate-set cross-entropy."""
        k, hits, rows, ce, terms = self.s["k"], torch.zeros(2, self.s["k"]), 0, 0.0, 0
        for c in self.held:
            cache, x = self.context(c)
            ts = self.positions(0, c)
            h, at = self.streams(cache, ts)
            guess = self.model.head(h[None])[0].argmax(-1).view(-1, k)
            own = self.model.head(x[at][None])[0].argmax(-1).view(-1, k)
            hits[0] += (guess == self.labels[c, at].view(-1, k)).sum(0)
            hits[1] += (guess == own).sum(0)
            loss, n = self.loss(c, ts, cache)
            rows, ce, terms = rows + len(ts), ce + float(loss), terms + n
        share = (hits / max(1, rows)).tolist()
        return {"streams": [{"stream": j + 1, "target_top1": share[0][j],
                             "draft_top1": share[1][j]} for j in range(k)],
                "ce": ce / max(1, terms), "positions": rows}  # fmt: skip


class _Lazy:
    """A model loaded (fp32) at first use: `collect_cached` uses it only when not cached."""

    def __init__(self, folder: Path):
        self._folder, self._model = folder, None

    def __getattr__(self, name: str) -> Any:
        if self._model is None:
            self._model = load_model(self._folder, "float32")
        return getattr(self._model, name)


def _settings(given: dict[str, Any]) -> dict[str, Any]:
    """DEFAULTS updated with `given`, checked."""
    if unknown := sorted(set(given) - set(DEFAULTS)):
        raise TypeError(f"unknown stream training settings {unknown}; known: {sorted(DEFAULTS)}")
    s = {**DEFAULTS, **given}
    for name in ("k", "steps", "positions", "eval_positions", "checkpoint_every", "candidates"):
        if s[name] < 1:
            raise ValueError(f"{name} = {s[name]}: must be >= 1 (default {DEFAULTS[name]})")
    if not s["lr"] > 0:
        raise ValueError(f"lr = {s['lr']}: must be > 0 (default {DEFAULTS['lr']})")
    return s


def _key(draft_id: dict, target_id: dict, corpus: Corpus, s: dict[str, Any]) -> str:
    keyed = {n: v for n, v in s.items() if n != "checkpoint_every"}  # it changes no row
    blob = json.dumps({"v": VERSION, "draft": draft_id, "target": target_id,
                       "corpus": corpus.identity, "s": keyed}, sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object at `path`; {} when it is missing or unreadable (unfinished)."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return {}
