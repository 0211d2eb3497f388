"""S2D's sorted early exits on a torch draft (`speculation.draft_exits`, docs/algorithm.md,
*S2D*): one draft model with exits at several depths, all reading the draft's own final norm
and LM head (the logit lens) or a trained adapter before them (`mirror-sd train exit-head`
run on the draft). Per draft step the forward stops at the first exit whose top-1
probability clears the threshold and emits from there; else it runs on to the next exit and
finally to the last layer.

The layers an exited step skips still need its K/V rows, or a later step could not attend to
it. As S2D and CALM do, the exited hidden state is copied up: every skipped layer computes
its K/V from that state with its attention only (no MLP, the larger share of a layer's
weights), so the cache keeps one length for every layer and the runner keeps the whole
`ModelRunner` contract (rollback, keep, packed batches). Only the draft changes: the target
verifies as before, so output stays the target's own (greedy identical; sampling exact for
any draft distribution).

Forwards of more than MAX_EXIT_ROWS rows (a prefill, a mirror rollout, a large batch) run every
layer. One threshold serves every exit; a plan picks its own threshold per target
(`draft_exit_threshold`), so several targets can share one draft at different depths.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from mirror_sd.devices.base import RunnerWrapper
from mirror_sd.graphs.heads import ExitHead
from mirror_sd.graphs.model import CausalLM

MAX_EXIT_ROWS = 4  # forwards of more rows run every layer (prefill, rollouts, big batches)
LENS_EXITS = (1 / 4, 1 / 2)  # `lens`: exits at these fractions of the draft's depth
EXIT_KINDS = ("none", "lens", "trained")


def lens_layers(num_layers: int) -> list[int]:
    """The `lens` exits of a draft of `num_layers` layers (distinct, inside [1, N-1])."""
    return sorted({min(num_layers - 1, max(1, round(f * num_layers))) for f in LENS_EXITS})


def exit_heads(
    kind: str, model: CausalLM, folder: Path, cache: str | Path | None
) -> list[ExitHead]:
    """The draft's exits for `speculation.draft_exits` = kind ('lens' or 'trained')."""
    if kind == "lens":
        return [ExitHead(model, layer) for layer in lens_layers(model.num_layers)]
    if kind == "trained":
        from mirror_sd.training.exit_head import trained_heads

        files = trained_heads(cache, folder)
        if not files:
            raise ValueError(
                f"draft_exits 'trained': no exit heads were trained for the draft {folder}; run "
                f"`mirror-sd train exit-head {folder}` (the draft as its own target) or use "
                "draft_exits: lens"
            )
        return [ExitHead.load(files[layer], model) for layer in sorted(files)]
    raise ValueError(f"draft_exits {kind!r}: expected one of {', '.join(EXIT_KINDS)}")


@torch.inference_mode()
def copy_up_kv(model: CausalLM, cache, start: int, hidden, position_ids, mask) -> None:
    """K/V rows of layers [start, N) for rows whose hidden state stays `hidden` (B, T, D)
    from layer `start` on: each layer's attention on the copied-up state, no MLP."""
    cos, sin = model.rope(position_ids, hidden.dtype)
    for i in range(start, model.num_layers):
        layer = model.model.layers[i]
        past_k, past_v = cache.past(i)
        _, k, v = layer.self_attn(layer.input_layernorm(hidden), cos, sin, mask, past_k, past_v)
        cache.write(i, k, v)


class SortedExitRunner(RunnerWrapper):
    """A torch draft runner (`TorchRunner`) whose short forwards stop at the first confident
    exit. `threshold`: an exit emits when every row's top-1 probability is at least this;
    `enabled` False runs every layer (a plan's call turned the exits off). `exits` counts
    forwards by the layer they stopped at (N: the full depth)."""

    def __init__(self, runner, heads: Sequence[ExitHead], threshold: float):
        layers = [h.layer for h in heads]
        if not heads or layers != sorted(set(layers)):
            raise ValueError(f"draft exits at layers {layers}: expected distinct, increasing")
        self.runner, self.heads = runner, list(heads)
        self.threshold, self.enabled = float(threshold), True
        self.exits: Counter[int] = Counter()
        self.name = f"{runner.name} [sorted exits at {', '.join(map(str, layers))}]"

    def describe(self, measured: dict[float, float] | None = None) -> str:
        """One line for `describe()`; `measured`: the tokens/s compile measured per threshold."""
        n = self.runner.model.num_layers
        kind = "trained" if any(h.trained for h in self.heads) else "logit lens"
        taken = sum(self.exits.values())
        early = sum(c for layer, c in self.exits.items() if layer < n)
        rate = f"; {early} of {taken} draft forwards so far stopped early" if taken else ""
        return (f"draft exits (S2D): layers {', '.join(str(h.layer) for h in self.heads)} of "
                f"{n} ({kind}); a step emits at the first whose top-1 probability is >= "
                f"{self.threshold:g}{rate}{_measured(measured)}")  # fmt: skip

    def configure(self, enabled: bool, threshold: float) -> None:
        """Before a round loop: the call's `draft_exits` (off: 'none') and threshold."""
        self.enabled, self.threshold = enabled, float(threshold)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor):
        r = self.runner
        model, n, t = r.model, r.model.num_layers, ids.shape[1]
        if not self.enabled or t > MAX_EXIT_ROWS:
            self.exits[n] += 1
            return r.forward(ids, position_ids, mask)
        ids, position_ids, mask = r._to(ids, position_ids, mask)
        x, start = model.embed(ids), 0
        for head in self.heads:
            x = model.run_layers(start, head.layer, x, position_ids, mask, r.cache)
            start = head.layer
            logits = head.exit_logits(x)  # (T, V) float32 on the host, -inf outside a trim
            if bool((torch.softmax(logits, -1).amax(-1) >= self.threshold).all()):
                copy_up_kv(model, r.cache, start, x, position_ids, mask)
                r.cache.advance(t)
                self.exits[head.layer] += 1
                return logits
        x = model.run_layers(start, n, x, position_ids, mask, r.cache)
        r.cache.advance(t)
        self.exits[n] += 1
        return model.head(x)[0].float().cpu()


def with_sorted_exits(runner, kind: str, threshold: float, folder: Path,
                      cache: str | Path | None) -> SortedExitRunner:  # fmt: skip
    """`runner` (the draft's) with S2D exits; ValueError unless it is a torch draft with its
    full head (an ONNX graph cannot stop part way; a trimmed head has its own exits)."""
    from mirror_sd.devices.torch_device import TorchRunner

    if not isinstance(runner, TorchRunner):
        raise ValueError(
            f"draft_exits {kind!r} needs the draft on a torch device with its full head (the "
            f"draft runs as {getattr(runner, 'name', type(runner).__name__)}): place the draft "
            "on a `backend: torch` device (e.g. examples/device_maps/ort_torch_s2d.yaml) and "
            "leave draft_vocab_size at 0"
        )
    return SortedExitRunner(runner, exit_heads(kind, runner.model, folder, cache), threshold)


def _measured(rates: dict[float, float] | None) -> str:
    if not rates:
        return ""
    tried = ", ".join(f"{t:g}: {v:.1f}" for t, v in sorted(rates.items()))
    return f" (chosen by compile, tokens/s per threshold: {tried})"
