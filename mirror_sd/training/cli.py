"""`mirror-sd train exit-head | amphista | adapter | streams` and `mirror-sd calibrate vocab`:
the command lines of the training modules, which hold library code only.

Each command is an `add_arguments(parser)` and a `run(args) -> int`; the library module
loads when the parser is built (its defaults are the arguments' defaults).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GROUP_HELP = {
    "train": "train heads and adapters from the target's own hidden states (CPU, offline)",
    "calibrate": "calibration artifacts computed from the target's own outputs",
}


# --- train exit-head -------------------------------------------------------------------------
def _exit_head_arguments(p: argparse.ArgumentParser) -> None:
    from mirror_sd.training.exit_head import DEFAULTS

    p.add_argument("target", help="a known model name or a local HF folder")
    p.add_argument("--layers", default=None,
                   help="comma-separated exit layers ℓe to train (default: N/4 .. 3N/4, step 2)")  # fmt: skip
    p.add_argument("--rank", type=int, default=DEFAULTS["rank"], help="adapter width")
    p.add_argument("--vocab", type=int, default=DEFAULTS["vocab"],
                   help="VocabTrim K: LM-head rows the head keeps (0 = all)")  # fmt: skip
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="tokens per step")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--chunks", type=int, default=40, help="corpus chunks (last 4 held out)")
    p.add_argument("--chunk-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="cache folder (default $MIRROR_SD_CACHE)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _exit_head(args: argparse.Namespace) -> int:
    from mirror_sd.graphs import zoo
    from mirror_sd.graphs.export import source_identity
    from mirror_sd.graphs.loader import load_model, load_tokenizer
    from mirror_sd.graphs.vocab_trim import VocabTrim
    from mirror_sd.training.collect import collect_cached
    from mirror_sd.training.corpus import build_corpus
    from mirror_sd.training.exit_head import DEFAULTS, heads_dir, train_head

    folder = zoo.resolve_model(args.target, cache=args.cache)
    model = load_model(folder, "float32")
    n = model.num_layers
    layers = (
        [int(x) for x in args.layers.split(",")]
        if args.layers
        else list(range(max(1, n // 4), 3 * n // 4 + 1, 2))
    )
    corpus = build_corpus(load_tokenizer(folder), args.chunks, args.chunk_len, args.seed)
    print(f"corpus: {corpus.description} ({corpus.identity})")
    col = collect_cached(model, json.dumps(source_identity(folder)), corpus, layers,
                         zoo.cache_dir(args.cache) / "train")  # fmt: skip
    counts = col.counts(model.config.vocab_size)
    k = args.vocab or model.config.vocab_size
    trim = VocabTrim.from_counts(counts, k, source=f"{folder.name} argmax over {corpus.identity}")
    print(f"VocabTrim K={k}: covers {trim.coverage(counts):.3f} of the target's choices")
    out = heads_dir(args.cache, folder)
    print(
        f"{'ℓe':>3}  {'lens top1':>9}  {'lens top4':>9}  {'head top1':>9}  {'head top4':>9}  train s"
    )
    for layer in layers:
        head = train_head(model, col, layer, trim, args.rank, args.steps, args.batch, args.lr,
                          DEFAULTS["holdout"], args.seed)  # fmt: skip
        head.meta.update(corpus=corpus.description, corpus_identity=corpus.identity)
        head.save(out / f"exit-L{layer}-r{args.rank}-k{k}.pt")
        m = head.meta
        print(f"{layer:>3}  {m['lens']['top1']:>9.3f}  {m['lens']['top4']:>9.3f}  "
              f"{m['trained']['top1']:>9.3f}  {m['trained']['top4']:>9.3f}  {m['train_seconds']:>7}")  # fmt: skip
    print(f"heads written to {out}")
    return 0


# --- train amphista --------------------------------------------------------------------------
def _amphista_arguments(p: argparse.ArgumentParser) -> None:
    from mirror_sd.training.amphista import DEFAULTS

    p.add_argument("target", help="a known model name or a local HF folder")
    p.add_argument("--layer", type=int, default=DEFAULTS["layer"],
                   help="ℓ: the heads read the hidden state entering this layer (default: the "
                        "deepest trained exit head's ℓe, else 3N/4)")  # fmt: skip
    p.add_argument("--heads", type=int, default=DEFAULTS["heads"],
                   help="K: tokens guessed after the target's next one")  # fmt: skip
    p.add_argument("--rank", type=int, default=DEFAULTS["rank"],
                   help="adapter width and attention width")  # fmt: skip
    p.add_argument("--vocab", type=int, default=DEFAULTS["vocab"],
                   help="VocabTrim K: LM-head rows the heads keep (0 = all)")  # fmt: skip
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="positions per step")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--chunks", type=int, default=40,
                   help=f"corpus chunks (last {DEFAULTS['holdout']} held out)")  # fmt: skip
    p.add_argument("--chunk-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="cache folder (default $MIRROR_SD_CACHE)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--force", action="store_true", help="train even if the same heads are cached")


def _amphista(args: argparse.Namespace) -> int:
    from mirror_sd.graphs import zoo
    from mirror_sd.graphs.export import source_identity
    from mirror_sd.graphs.loader import load_model, load_tokenizer
    from mirror_sd.graphs.vocab_trim import VocabTrim
    from mirror_sd.training import amphista
    from mirror_sd.training.collect import collect_cached
    from mirror_sd.training.corpus import build_corpus
    from mirror_sd.training.exit_head import trained_heads

    folder = zoo.resolve_model(args.target, cache=args.cache)
    model = load_model(folder, "float32")
    n = model.num_layers
    layer = args.layer
    if layer is None:
        layer = max(trained_heads(args.cache, folder), default=3 * n // 4)
    holdout = amphista.DEFAULTS["holdout"]
    amphista.check_settings(n, layer, args.heads, args.rank, args.steps, args.batch, args.chunks,
                            holdout)  # fmt: skip
    k = args.vocab or model.config.vocab_size
    path = amphista.amphista_path(args.cache, folder, layer, args.heads, args.rank, k)
    corpus = build_corpus(load_tokenizer(folder), args.chunks, args.chunk_len, args.seed)
    print(f"corpus: {corpus.description} ({corpus.identity})")
    meta = amphista.cached_meta(path)
    done = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed}
    same = meta.get("corpus_identity") == corpus.identity and all(
        meta.get("settings", {}).get(key) == value for key, value in done.items()
    )
    if same and not args.force:
        print(f"cached: {path}")
        return 0
    col = collect_cached(model, json.dumps(source_identity(folder)), corpus, [layer],
                         zoo.cache_dir(args.cache) / "train")  # fmt: skip
    counts = col.counts(model.config.vocab_size)
    trim = VocabTrim.from_counts(counts, k, source=f"{folder.name} argmax over {corpus.identity}")
    print(f"VocabTrim K={k}: covers {trim.coverage(counts):.3f} of the target's choices")
    heads = amphista.train_amphista(model, col, layer, args.heads, trim, args.rank, args.steps,
                                    args.batch, args.lr, holdout, args.seed,
                                    checkpoint=path.with_suffix(".ckpt"))  # fmt: skip
    heads.meta.update(corpus=corpus.description, corpus_identity=corpus.identity)
    heads.save(path)
    lens, m = heads.meta["lens"], heads.meta["trained"]
    print(f"amphista heads at ℓ={layer}: {args.heads} heads, rank {args.rank}, "
          f"{heads.meta['train_seconds']} s; held-out agreement with the target's token")  # fmt: skip
    print(f"{'head':>4}  {'lens top1':>9}  {'lens top4':>9}  {'head top1':>9}  {'head top4':>9}")
    for j in range(args.heads):
        print(f"{j + 1:>4}  {lens['top1'][j]:>9.3f}  {lens['top4'][j]:>9.3f}  "
              f"{m['top1'][j]:>9.3f}  {m['top4'][j]:>9.3f}")  # fmt: skip
    print(f"chain (mean leading heads right): lens {lens['chain']:.3f}, heads {m['chain']:.3f}")
    print(f"heads written to {path}")
    return 0


# --- train adapter ---------------------------------------------------------------------------
def _adapter_arguments(p: argparse.ArgumentParser) -> None:
    from mirror_sd.training.adapter import INITS, AdapterSettings

    d = AdapterSettings()
    p.add_argument("target", help="target model (known name or HF folder)")
    p.add_argument("--layers", "-k", type=int, default=d.k, help="target layers kept (k)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps, one chunk each")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument("--seed", type=int, default=d.seed, help="training seed (chunk order)")
    p.add_argument("--init", choices=INITS, default=d.init,
                   help="adapter initialisation: target layer k, its last layer, or the better")  # fmt: skip
    p.add_argument("--chunks", type=int, default=d.n_chunks, help="corpus chunks")
    p.add_argument("--chunk-len", type=int, default=d.chunk_len, help="tokens per chunk")
    p.add_argument("--candidates", type=int, default=d.candidates,
                   help="output tokens in the training softmax")  # fmt: skip
    p.add_argument("--distill", type=float, default=d.distill,
                   help="weight of the KL term towards the target's distribution (0: off)")  # fmt: skip
    p.add_argument("--attention-only", action="store_true",
                   help="train only the adapter's attention and norms (its MLP stays as initialised)")  # fmt: skip
    p.add_argument("-o", "--out", default=None, help="output folder (default: in the cache)")
    p.add_argument("--cache", default=None, help="cache folder (default $MIRROR_SD_CACHE)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _adapter(args: argparse.Namespace) -> int:
    from mirror_sd.training.adapter import train_adapter

    path = train_adapter(
        args.target, args.layers, steps=args.steps, lr=args.lr, seed=args.seed,
        n_chunks=args.chunks, chunk_len=args.chunk_len, out=args.out, cache=args.cache,
        progress=not args.quiet, init=args.init, candidates=args.candidates,
        distill=args.distill, train_mlp=not args.attention_only,
    )  # fmt: skip
    if args.quiet:
        print(path)
    return 0


# --- train streams ---------------------------------------------------------------------------
def _streams_arguments(p: argparse.ArgumentParser) -> None:
    from mirror_sd.training.streams import DEFAULTS as D

    p.add_argument("target", help="target model (known name or HF folder): its argmax is the label")
    p.add_argument("--draft", required=True, help="draft model (known name or HF folder), frozen")
    p.add_argument("--k", type=int, default=D["k"], help="stream rows (guesses per forward)")
    p.add_argument("--steps", type=int, default=D["steps"], help="optimizer steps, one chunk each")
    p.add_argument("--lr", type=float, default=D["lr"], help="peak learning rate (Adam)")
    p.add_argument("--chunks", type=int, default=D["n_chunks"], help="corpus chunks")
    p.add_argument("--chunk-len", type=int, default=D["chunk_len"], help="tokens per chunk")
    p.add_argument("--positions", type=int, default=D["positions"],
                   help="base positions per step, each with all k stream rows")  # fmt: skip
    p.add_argument("--seed", type=int, default=D["seed"], help="training seed")
    p.add_argument("--cache", default=None, help="cache folder (default $MIRROR_SD_CACHE)")
    p.add_argument("-o", "--out", default=None, help="output folder (default: in the cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _streams(args: argparse.Namespace) -> int:
    from mirror_sd.training.streams import train_streams

    path = train_streams(
        args.target, args.draft, args.k, steps=args.steps, lr=args.lr, seed=args.seed,
        n_chunks=args.chunks, chunk_len=args.chunk_len, out=args.out, cache=args.cache,
        progress=not args.quiet, positions=args.positions,
    )  # fmt: skip
    print(_streams_summary(path))
    return 0


def _streams_summary(folder: Path) -> str:
    """Where the table is, how well each stream guesses before and after training, and how a
    device map uses it."""
    from mirror_sd.graphs.streams import StreamTable

    p = StreamTable.load(folder).provenance
    before, after = (p["agreement"][w]["streams"] for w in ("before", "after"))
    lines = [
        f"stream rows: {folder}",
        f"  k = {p['k']}: draft {Path(p['draft']['folder']).name}, target "
        f"{Path(p['target']['folder']).name}, {p['settings']['steps']} steps, {p['train_seconds']} s",
        "  held-out top-1 of each stream's guess, before -> after training:",
    ]
    for b, a in zip(before, after, strict=True):
        lines.append(f"    stream {b['stream']}: the target's token {b['target_top1']:.1%} -> "
                     f"{a['target_top1']:.1%}, the draft's own choice {b['draft_top1']:.1%} -> "
                     f"{a['draft_top1']:.1%}")  # fmt: skip
    lines.append("  use it: `speculation: {draft_streams: trained}` in a device map (this draft "
                 f"and target), or `draft_streams: {folder}`")  # fmt: skip
    return "\n".join(lines)


# --- calibrate vocab -------------------------------------------------------------------------
def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ks {text!r}: expected integers like 8192,16384,0"
        ) from None
    if not ks or any(k < 0 for k in ks):
        raise argparse.ArgumentTypeError(f"--ks {text!r}: expected integers >= 0 (0 = full)")
    return ks


def _vocab_arguments(p: argparse.ArgumentParser) -> None:
    from mirror_sd.training.vocab import DEFAULT_CHUNK_LEN, DEFAULT_CHUNKS, REPORT_KS

    p.add_argument("target", help="a known model name or a local HF folder")
    p.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, help="corpus chunks")
    p.add_argument("--chunk-len", type=int, default=DEFAULT_CHUNK_LEN, help="tokens per chunk")
    p.add_argument("--seed", type=int, default=0, help="corpus seed")
    p.add_argument("--cache", default=None, help="cache folder (default $MIRROR_SD_CACHE)")
    p.add_argument("-o", "--output", default=None, help="write the counts as JSON here")
    p.add_argument("--ks", type=_ks, default=REPORT_KS, help="K values, comma-separated; 0 = full")
    p.add_argument("--report", metavar="DRAFT", default=None,
                   help="also measure DRAFT with each K: ONNX Runtime step time (1 and 5 rows) "
                        "and top-1 agreement with the target on held-out text")  # fmt: skip
    p.add_argument("--quantize", default="int8", choices=("none", "int8", "int4"),
                   help="the draft's weights for --report (default int8, as the default map)")  # fmt: skip
    p.add_argument("--heldout-chunks", type=int, default=4, help="held-out chunks for --report")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--json", default=None, help="write the --report result as JSON here")


def _vocab(args: argparse.Namespace) -> int:
    from mirror_sd.training.vocab import coverage_table, save_counts, vocab_counts

    counts, source = vocab_counts(args.target, args.cache, args.chunks, args.chunk_len, args.seed)
    print(f"counts: {source}")
    print(
        f"{int(counts.sum())} target tokens, {int((counts > 0).sum())} distinct, V = {counts.numel()}"
    )
    for k, cov in coverage_table(counts, args.ks):
        print(f"  top-{k}: {cov:.2%} of the target's tokens (in-sample)")
    if args.output:
        print(f"counts written to {save_counts(args.output, counts, source)}")
    if args.report:
        from mirror_sd.training.vocab_report import format_report, vocab_trim_report

        report = vocab_trim_report(
            args.target, args.report, args.ks, cache=args.cache, quantize=args.quantize,
            n_chunks=args.chunks, chunk_len=args.chunk_len, seed=args.seed,
            heldout_chunks=args.heldout_chunks, threads=args.threads,
        )  # fmt: skip
        print(format_report(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


# --- the groups ------------------------------------------------------------------------------
def _commands() -> dict:
    """(group, name) -> (add_arguments, run, help)."""
    return {
        ("train", "exit-head"): (
            _exit_head_arguments, _exit_head,
            "train the target's exit head at ℓe (adapter before the shared LM head)",
        ),
        ("train", "amphista"): (
            _amphista_arguments, _amphista,
            "train Amphista heads: K tokens guessed from the target's hidden state at ℓ",
        ),
        ("train", "adapter"): (
            _adapter_arguments, _adapter,
            "train a Kangaroo self-draft: the target's first k layers + an adapter layer",
        ),
        ("train", "streams"): (
            _streams_arguments, _streams,
            "train the draft's stream rows (speculative streaming: k tokens guessed per forward)",
        ),
        ("calibrate", "vocab"): (
            _vocab_arguments, _vocab,
            "count the target's own next-token choices for VocabTrim",
        ),
    }  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `train` and `calibrate` groups and their commands on `mirror-sd`'s subparsers."""
    commands = _commands()
    for group, help_text in GROUP_HELP.items():
        p = sub.add_parser(group, help=help_text)
        gsub = p.add_subparsers(dest=f"{group}_cmd", required=True)
        for (g, name), (add_arguments, run, cmd_help) in commands.items():
            if g == group:
                cp = gsub.add_parser(name, help=cmd_help)
                add_arguments(cp)
                cp.set_defaults(func=run)
