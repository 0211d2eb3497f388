"""`mirror-sd` command line: models, generate, demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

DEFAULT_MODEL = "smollm2-135m"
DEMO_PROMPT = "Write a Python function that checks whether a string is a palindrome."


def _models(args: argparse.Namespace) -> int:
    from mirror_sd.graphs import zoo

    if args.models_cmd == "fetch":
        path = zoo.fetch_model(args.name, cache=args.cache, progress=not args.quiet)
        print(path)
    else:
        for m in zoo.list_models(cache=args.cache):
            print(json.dumps(m))
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from mirror_sd.graphs import zoo
    from mirror_sd.graphs.loader import load_model, load_tokenizer
    from mirror_sd.runtime.autoregressive import greedy_decode
    from mirror_sd.runtime.prompts import check_fits, encode_prompt, eos_token_ids

    torch.set_num_threads(args.threads)
    folder = zoo.resolve_model(args.model, cache=args.cache)
    model, tok = load_model(folder, dtype=args.dtype), load_tokenizer(folder)
    gen_cfg = folder / "generation_config.json"
    eos = eos_token_ids(tok, json.loads(gen_cfg.read_text()) if gen_cfg.is_file() else None)
    ids = encode_prompt(tok, args.prompt, chat=not args.no_chat)
    check_fits(len(ids), args.max_new_tokens, args.max_len)
    t0 = time.perf_counter()
    out = greedy_decode(model, ids, args.max_new_tokens, eos, max_len=args.max_len)
    dt = time.perf_counter() - t0
    print(tok.decode(out, skip_special_tokens=True))
    print(
        f"[{len(out)} tokens in {dt:.2f} s: {len(out) / dt:.2f} tokens/s incl. prefill of "
        f"{len(ids)}; model {args.model}, {args.dtype}, {args.threads} thread(s)]",
        file=sys.stderr,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    args.model, args.prompt = DEFAULT_MODEL, DEMO_PROMPT
    return _generate(args)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-len", type=int, default=2048, help="context length (KV cache rows)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--cache", default=None, help="model cache folder (default $MIRROR_SD_CACHE)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror-sd", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    models = sub.add_parser("models", help="list or fetch the known pretrained models")
    msub = models.add_subparsers(dest="models_cmd", required=True)
    fetch = msub.add_parser("fetch", help="materialize a model as a local HF folder")
    fetch.add_argument("name")
    fetch.add_argument("--quiet", action="store_true")
    for p in (fetch, msub.add_parser("list", help="known models and where they are")):
        p.add_argument("--cache", default=None, help="cache folder (default $MIRROR_SD_CACHE)")
    models.set_defaults(func=_models)

    gen = sub.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("model", help="a known model name or a local HF folder")
    gen.add_argument("--prompt", required=True)
    _add_generation_args(gen)
    gen.set_defaults(func=_generate)

    demo = sub.add_parser("demo", help="the main job on the default model")
    _add_generation_args(demo)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
