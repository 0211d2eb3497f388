"""`mirror-sd train exit-head | adapter` and `mirror-sd calibrate vocab`.

Each command lives in its own module as `add_arguments(parser)` + `main(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib

COMMANDS = {  # (group, name) -> (module, help)
    ("train", "exit-head"): (
        "mirror_sd.training.exit_head",
        "train the target's exit head at ℓe (adapter before the shared LM head)",
    ),
    ("train", "adapter"): (
        "mirror_sd.training.adapter",
        "train a Kangaroo self-draft: the target's first k layers + an adapter layer",
    ),
    ("calibrate", "vocab"): (
        "mirror_sd.training.vocab",
        "count the target's own next-token choices for VocabTrim",
    ),
}
GROUP_HELP = {
    "train": "train heads and adapters from the target's own hidden states (CPU, offline)",
    "calibrate": "calibration artifacts computed from the target's own outputs",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    for group, help_text in GROUP_HELP.items():
        p = sub.add_parser(group, help=help_text)
        gsub = p.add_subparsers(dest=f"{group}_cmd", required=True)
        for (g, name), (module, cmd_help) in COMMANDS.items():
            if g != group:
                continue
            mod = importlib.import_module(module)
            cp = gsub.add_parser(name, help=cmd_help)
            mod.add_arguments(cp)
            cp.set_defaults(func=mod.main)
