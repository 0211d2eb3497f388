"""Sampling from a quantized ONNX Runtime target keeps *that* target's distribution: the
speculative plan's first two sampled tokens, over many seeds, against the exact laws computed
from the quantized target's own logits (χ² at 99.9%), with a power check against the draft's
laws. Greedy losslessness of every format is in tests/test_api.py."""

from __future__ import annotations

import math

import pytest
import torch

import mirror_sd.api as api
from mirror_sd.graphs.masks import causal_mask
from mirror_sd.runtime.autoregressive import positions
from tests.conftest import tiny_pair

MAP = """
version: 1
devices:
  tgt: {backend: onnxruntime, providers: [CPUExecutionProvider: {}], intra_op_threads: 1,
        quantize: QUANT}
  drf: {backend: onnxruntime, providers: [CPUExecutionProvider: {}], intra_op_threads: 1,
        quantize: int4}
placement: {target: tgt, draft: drf}
"""
PROMPT = [5, 17, 33, 8]
TEMPERATURE = 0.7  # sharper laws than the tiny models' near-uniform ones: the test has power
SAMPLES = 1500
Z_99_9 = 3.090  # the standard normal's 99.9% quantile


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("models"))


def next_probs(runner, ids: list[int]) -> torch.Tensor:
    """The runner's law of the token after `ids` at TEMPERATURE (its cache left empty)."""
    runner.rollback(0)
    t = len(ids)
    logits = runner.forward(torch.tensor([ids]), positions(0, t), causal_mask(0, t))[-1]
    runner.rollback(0)
    return torch.softmax(logits.double() / TEMPERATURE, -1)


def laws(runner, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """P(t1) and the marginal P(t2) = sum over t1 of P(t1) P(t2 | t1)."""
    p1 = next_probs(runner, PROMPT)
    p2 = sum(p1[a] * next_probs(runner, [*PROMPT, a]) for a in range(vocab))
    return p1, p2


def chi2_exceeds(counts: torch.Tensor, p: torch.Tensor) -> tuple[float, float]:
    """(Pearson's χ², its 99.9% critical value) with categories expecting < 5 pooled."""
    expected = p * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1  # Wilson-Hilferty's approximation of the χ² quantile
    crit = df * (1 - 2 / (9 * df) + Z_99_9 * math.sqrt(2 / (9 * df))) ** 3
    return stat, crit


@pytest.mark.parametrize("quant", ["int4", "int8-rows"])
def test_speculative_sampling_keeps_the_quantized_targets_distribution(folders, quant):
    target, draft, root = folders
    text = MAP.replace("QUANT", quant)
    with api.compile(target, draft, text, onnx_dir=root / "onnx", max_len=256) as p:
        vocab = p.target.vocab_size
        p1, p2 = laws(p.target, vocab)
        d1, d2 = laws(p.draft, vocab)
        first, second = (
            torch.zeros(vocab, dtype=torch.double),
            torch.zeros(vocab, dtype=torch.double),
        )
        drafted = 0
        for seed in range(SAMPLES):
            res = p.generate(PROMPT, 2, mode="speculative", temperature=TEMPERATURE, seed=seed,
                             eos_token_id=[])  # fmt: skip
            a, b = res.tokens
            first[a] += 1
            second[b] += 1
            drafted += sum(r.drafted for r in res.rounds)
    assert drafted > SAMPLES  # the draft proposed: acceptance and resampling both ran
    for counts, law, own in ((first, p1, d1), (second, p2, d2)):
        stat, crit = chi2_exceeds(counts, law)
        assert stat < crit, (quant, stat, crit)
        power, crit_d = chi2_exceeds(counts, own)
        assert power > crit_d, (quant, "the draft's law must be told apart", power, crit_d)
