"""Weight-only int8 / int4 linears for a torch `CausalLM` (a module swap, as gpt-fast does).

`quantize_linears(model, "int4")` replaces every decoder `nn.Linear` and the LM head by a
`WeightOnlyLinear` that keeps packed integer weights and runs torch's CPU kernels:

    int8   per output channel, symmetric      torch._weight_int8pack_mm
    int4   groups of GROUP_SIZE along K,       torch._weight_int4pack_mm_for_cpu
           asymmetric (scale and zero point)

Activations stay in the model's dtype (bfloat16 where the CPU computes it natively: the
kernels are fast there, and ~20x slower with float32 activations on the AMX Xeon measured).
Both kernels are row-invariant: a row's output is bit for bit the same alone or among any
number of rows (tests/graphs/test_quantize.py), which a quantized target needs to stay lossless
against its own decoding. The embedding table stays as it is (a lookup reads one row).

int4 from a Q4_K checkpoint: Q4_K stores each group of 32 weights as `d·q − m` with q in
[0, 15], the same affine form as these groups, so a group that uses its whole range is
reproduced exactly by min/max quantization (up to the bf16 rounding of scale and zero
point); `quantize_linears` returns the largest weight error per linear so that callers can
report it (docs/models.md).
"""

from __future__ import annotations

import torch
from torch import nn

GROUP_SIZE = 32  # int4 weights per scale / zero point (Q4_K's sub-block size)
INT4_N_MULTIPLE = 16  # torch's int4 packing takes out_features in multiples of this
BITS = {"int8": 8, "int4": 4}


class WeightOnlyLinear(nn.Module):
    """y = x @ dequant(W).T + b with W kept packed: (..., K) -> (..., N)."""

    def __init__(self, linear: nn.Linear, bits: int, dtype: torch.dtype):
        super().__init__()
        w = linear.weight.detach().float()  # (N, K)
        self.in_features, self.out_features, self.bits, self.dtype = (
            w.shape[1],
            w.shape[0],
            bits,
            dtype,
        )
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype))
        if bits == 8:
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (N,)
            q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            self.register_buffer("weight_q", q)
            self.register_buffer("scales", scale.to(dtype))
            deq = q.float() * self.scales.float()[:, None]
        elif bits == 4:
            if w.shape[1] % GROUP_SIZE:
                raise ValueError(
                    f"int4 needs in_features divisible by {GROUP_SIZE}, got {w.shape[1]}"
                )
            n, k = w.shape
            g = w.view(n, k // GROUP_SIZE, GROUP_SIZE)
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            scale = ((hi - lo) / 15).clamp(min=1e-12)
            q = torch.round((g - lo) / scale).clamp(0, 15)
            zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
            sz = torch.stack([scale.view(n, -1), zero.view(n, -1)], -1).transpose(0, 1)
            self.register_buffer("scales_and_zeros", sz.contiguous().to(dtype))  # (K/G, N, 2)
            self.register_buffer(
                "weight_q",
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).view(n, k), 1),
            )
            s, z = (self.scales_and_zeros.float()[..., i].transpose(0, 1) for i in (0, 1))
            deq = ((q - 8) * s[..., None] + z[..., None]).view(n, k)
        else:
            raise ValueError(f"bits={bits}: expected 8 or 4")
        self.max_error = float((deq - w).abs().max())  # largest weight change, for reports

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_q, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.weight_q, GROUP_SIZE, self.scales_and_zeros
            )
        y = y.view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}"


def int4_fits(linear: nn.Linear) -> bool:
    """Whether torch's int4 kernel takes this linear's shape (else it gets int8)."""
    return linear.in_features % GROUP_SIZE == 0 and linear.out_features % INT4_N_MULTIPLE == 0


def quantize_linears(model: nn.Module, quantize: str) -> dict[str, float]:
    """Swap every `nn.Linear` of `model` (decoder layers and the LM head; a tied head gets its
    own packed copy, the embedding keeps the table) for a `WeightOnlyLinear` in place.

    A linear whose shape the int4 kernel does not take (`int4_fits`) gets int8 weights.
    Returns {module name: max |weight error|}. Raises ValueError for an unknown `quantize`
    or a model on a device other than the CPU (the kernels are CPU kernels here)."""
    if quantize not in BITS:
        raise ValueError(f"quantize={quantize!r}: torch weight-only kernels are {tuple(BITS)}")
    params = list(model.parameters())
    if params and params[0].device.type != "cpu":
        raise ValueError("quantize on a torch device runs torch's CPU kernels: use device: cpu")
    dtype = params[0].dtype if params else torch.float32
    errors: dict[str, float] = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                full = f"{name}.{child_name}" if name else child_name
                bits = BITS[quantize] if quantize != "int4" or int4_fits(child) else 8
                swapped = WeightOnlyLinear(child, bits, dtype)
                setattr(module, child_name, swapped)
                errors[full] = swapped.max_error
    return errors


def linear_weight(module: nn.Module) -> torch.Tensor:
    """A linear's weight as a dense float tensor (N, K): dequantized for a WeightOnlyLinear."""
    if isinstance(module, WeightOnlyLinear):
        eye = torch.eye(module.in_features, dtype=module.dtype)
        bias = module.bias
        module.bias = None
        try:
            return module(eye).T.float()
        finally:
            module.bias = bias
    return module.weight
