"""The A/B of ab_short_prompts.jsonl: the default plan's `ar`, four short prompts one at a time
(B = 1) and as one batch (B = 4), two repeats, tok/s per line. Run once with the old tree's
`mirror_sd` importable and once with the new one, back to back on one machine."""

import json
import time

import mirror_sd

plan = mirror_sd.compile("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", progress=False)
print(plan.target_device.label, plan.spec.mode, flush=True)
prompts = [
    [9707, 11, 1246, 525, 498, 30],
    [785, 3974, 13876, 38835, 34208, 916],
    [7985, 264, 729, 311, 3378, 264],
    [3838, 374, 279, 6722, 315, 9625],
]
plan.generate(prompts[0], 8, mode="autoregressive")  # warm
for _ in range(2):
    for b in (1, 4):
        t0 = time.perf_counter()
        if b == 1:
            outs = [plan.generate(p, 48, mode="autoregressive") for p in prompts]
        else:
            outs = plan.generate(prompts, 48, mode="autoregressive")
        dt = time.perf_counter() - t0
        n = sum(len(o.tokens) for o in outs)
        print(json.dumps({"B": b, "tok_s": round(n / dt, 2), "s": round(dt, 2)}), flush=True)
