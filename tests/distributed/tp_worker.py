"""Run under torchrun by tests/distributed/test_tp.py: compile a plan whose target is
tensor-parallel over the launched ranks, generate on rank 0 and write the tokens as JSON.

    torchrun --standalone --nproc-per-node 2 tp_worker.py TARGET DRAFT MAP OUT [FAULT]

FAULT (a test's fault injection): `die` exits rank 1 at its 3rd layer-running call, `hang`
makes it sleep there, `die0` exits rank 0 there; rank 0 exits 3 after a DeviceError.
TP_WORKER_GREEDY_ONLY=1 in the environment skips the sampled runs (`sample|SEED`).
"""

import json
import os
import sys
import time

import mirror_sd.api as api
from mirror_sd.devices.base import DeviceError

PROMPTS = ("w1 w2 w3", "w7 w7 w8 w9")
SEEDS = (0, 1, 2)
SAMPLING = {"temperature": 1.0, "top_p": 0.9}


def _inject(fault: str) -> None:
    """Make this rank die or hang at its 3rd layer-running call."""
    from mirror_sd.devices.torch_device import TorchRunner

    calls = {"n": 0}
    for op in ("forward", "fill", "forward_prefix", "forward_suffix"):
        orig = getattr(TorchRunner, op)

        def faulty(self, *a, _orig=orig):
            calls["n"] += 1
            if calls["n"] == 3:
                if fault == "die":
                    os._exit(7)
                time.sleep(3600)
            return _orig(self, *a)

        setattr(TorchRunner, op, faulty)


def main() -> None:
    target, draft, map_path, out = sys.argv[1:5]
    fault = sys.argv[5] if len(sys.argv) > 5 else ""  # "" = none
    if fault == "die0" and os.environ["RANK"] == "0":  # rank 0 itself dies mid-generation
        _inject("die")
    elif fault and os.environ["RANK"] == "1":
        _inject(fault)
    plan = api.compile(target, draft, map_path, max_len=128)  # ranks > 0 stay in here
    result = {"rank": os.environ["RANK"], "name": plan.target.name, "tokens": {}}
    try:
        for prompt in PROMPTS:
            for mode in ("autoregressive", "speculative", "mirror"):
                toks = plan.generate(prompt, 24, mode=mode).tokens
                result["tokens"][f"{prompt}|{mode}"] = toks
        seeds = () if os.environ.get("TP_WORKER_GREEDY_ONLY") == "1" else SEEDS
        for seed in seeds:  # sampled: the same draws as the single-process plan's
            toks = plan.generate(PROMPTS[0], 24, mode="mirror", seed=seed, **SAMPLING).tokens
            result["tokens"][f"sample|{seed}"] = toks
    except DeviceError as e:
        result["error"] = str(e)
    plan.close()  # closes the TP target: the other ranks leave follow() and exit
    with open(out, "w") as f:
        json.dump(result, f)
    if "error" in result:  # a non-zero exit makes torchrun end the other ranks
        sys.exit(3)


if __name__ == "__main__":
    main()
