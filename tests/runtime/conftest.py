"""Runtime fixtures: plans over tiny random models on two torch CPU "devices"."""

from __future__ import annotations

import itertools

import pytest
import torch

from mirror_sd.devices.torch_device import TorchDevice, TorchRunner
from mirror_sd.graphs.loader import load_model
from mirror_sd.partition.spec_config import SpecConfig
from mirror_sd.runtime.autoregressive import extend
from mirror_sd.runtime.plan import DeviceSlot, Plan
from tests.conftest import make_tiny, save_tiny


class IdTokenizer:
    """Decodes ids as space-separated numbers; no chat template, no EOS."""

    chat_template = None
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


def tiny_model(tmp_path, family="qwen2", seed=0, **overrides):
    folder = tmp_path / f"{family}-{seed}-{abs(hash(tuple(sorted(overrides.items()))))}"
    return load_model(save_tiny(make_tiny(family, seed=seed, **overrides), folder))


def make_plan(target, draft, exit_layer=2, max_len=512, draft_runner=None, **spec) -> Plan:
    spec.setdefault("branch_budget", 8)
    cfg = SpecConfig(exit_layer=exit_layer, max_len=max_len, **spec)
    return Plan(
        target=TorchRunner(target, TorchDevice(), max_len, exit_layer=exit_layer),
        target_device=DeviceSlot("gpu", "torch cpu"),
        draft=draft_runner
        or (TorchRunner(draft, TorchDevice(), max_len, name="draft") if draft else None),
        draft_device=DeviceSlot("npu", "torch cpu") if (draft or draft_runner) else None,
        tokenizer=IdTokenizer(),
        spec=cfg,
    )


@pytest.fixture
def plan_factory():
    plans = []

    def factory(*args, **kwargs):
        plans.append(make_plan(*args, **kwargs))
        return plans[-1]

    yield factory
    for p in plans:
        p.close()


# χ² critical values at 99.9% by degrees of freedom: V - 1 and V² - 1 for V = 6 and V = 8
CHI2_99_9 = {5: 20.52, 7: 24.32, 35: 66.62, 63: 103.44}


def chi2(counts, p) -> float:
    """Pearson's χ² statistic of observed `counts` against the law `p` (same shape)."""
    expected = p * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def target_dists(model, prompt, v: int):
    """Exact P(t1, t2) (v, v) and P(t3) (v,) of `model` at temperature 1 after `prompt`
    (a v-token vocabulary): the laws the sampling tests compare generated counts with."""

    def p_next(seq):
        return torch.softmax(extend(model, model.new_cache(32), seq)[-1].double(), -1)

    p1 = p_next(prompt)
    joint = torch.zeros(v, v, dtype=torch.double)
    third = torch.zeros(v, dtype=torch.double)
    for a, b in itertools.product(range(v), repeat=2):
        joint[a, b] = p1[a] * p_next(prompt + [a])[b]
        third += joint[a, b] * p_next(prompt + [a, b])
    return joint, third


def sample_counts(plan, prompt, v: int, n: int = 1000):
    """Counts of (t1, t2) pairs (v, v) and of t3 (v,) over n seeded 3-token generations of
    `plan` (closed after): what the sampling tests compare with `target_dists`."""
    pairs = torch.zeros(v, v, dtype=torch.double)
    thirds = torch.zeros(v, dtype=torch.double)
    try:
        for seed in range(n):
            a, b, c = plan.generate(prompt, 3, seed=seed).tokens
            pairs[a, b] += 1
            thirds[c] += 1
    finally:
        plan.close()
    return pairs, thirds
