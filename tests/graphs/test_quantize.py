"""Weight-only int8 / int4 linears (graphs/quantize.py) and row invariance of a torch target:
a block's rows score bit for bit as decoding each row alone (what keeps a quantized target
lossless against its own `ar`, docs/runtime.md *Row invariance*)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mirror_sd.graphs import load_model
from mirror_sd.graphs.masks import causal_mask
from mirror_sd.graphs.quantize import WeightOnlyLinear, linear_weight, quantize_linears
from tests.conftest import make_tiny, save_tiny


@pytest.mark.parametrize("bits", [8, 4])
def test_a_weight_only_linear_approximates_the_float_one_and_reports_its_error(bits):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48, bias=True)
    q = WeightOnlyLinear(lin, bits, torch.bfloat16)
    dense = linear_weight(q)  # the dequantized weight the kernel multiplies by
    bf16_step = 2**-8 * lin.weight.abs().max()  # the kernel's output rounding
    assert (dense - lin.weight).abs().max() <= q.max_error + bf16_step
    assert 0 < q.max_error < (0.01 if bits == 8 else 0.05)
    x = torch.randn(7, 128)
    ref = (x.bfloat16().float() @ dense.T + lin.bias).float()
    out = q(x.bfloat16()).float()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("bits", [8, 4])
def test_the_kernels_are_row_invariant(bits):
    """Any number of rows: each row's output equals that row computed alone, bit for bit."""
    torch.manual_seed(1)
    q = WeightOnlyLinear(nn.Linear(256, 96), bits, torch.bfloat16)
    x = torch.randn(40, 256).bfloat16()
    alone = torch.cat([q(x[i : i + 1]) for i in range(40)])
    for m in (2, 3, 5, 8, 9, 17, 40):
        assert torch.equal(q(x[:m]), alone[:m]), m


def test_quantize_linears_swaps_every_linear_and_unties_the_head(tmp_path):
    model = load_model(save_tiny(make_tiny("qwen2", tie_word_embeddings=True), tmp_path / "m"))
    errors = quantize_linears(model, "int4")
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert "lm_head" in errors and len(errors) == 7 * model.num_layers + 1
    assert model.lm_head.bits == 8  # a vocabulary of 97 rows: int4 packing needs 16k
    assert isinstance(model.model.embed_tokens, nn.Embedding)  # lookups stay dense
    with pytest.raises(ValueError, match="torch weight-only kernels are"):
        quantize_linears(model, "int3")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_a_quantized_torch_block_scores_each_row_as_decoding_it_alone(tmp_path, family, quantize):
    """bf16 activations, weight-only linears, eager attention row by row: bit-for-bit equal.
    (Dense torch linears are not row-invariant: MKL / oneDNN pick kernels by row count.)"""
    model = load_model(save_tiny(make_tiny(family, seed=2), tmp_path / family), torch.bfloat16)
    errors = quantize_linears(model, quantize)
    assert errors["lm_head"] > 0  # vocab 97: the int4 kernel does not take it, int8 does
    prompt, block = torch.tensor([[5, 17, 3, 44, 9, 61, 2]]), torch.tensor([[41, 9, 13, 2, 60]])
    s, t = prompt.shape[1], block.shape[1]
    with torch.no_grad():
        cache = model.new_cache(s + t)
        model(prompt, torch.arange(s)[None], causal_mask(0, s), cache)
        together = model(block, torch.arange(s, s + t)[None], causal_mask(s, t), cache)
        cache.length = s  # roll back: decode the same rows one at a time
        for j in range(t):
            one = model(block[:, j : j + 1], torch.tensor([[s + j]]), causal_mask(s + j, 1), cache)
            assert torch.equal(one[0, 0], together[0, j]), f"row {j}"
