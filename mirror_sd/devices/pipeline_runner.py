"""PipelineRunner: one model whose layer ranges run on different torch devices.

The model's main path (embed, layers 0..N-1, norm, lm_head) is cut into `Stage`s
(partition/stages.py); each stage holds its own modules on its own device and a KV cache for
its own layers only. The hidden state (1, T, D) crosses each cut: it is moved to the next
stage's device (and kept in the model's dtype; every stage of one model has the same dtype,
so the arithmetic is exactly the single-device model's). The exit head (final norm + LM head
applied at ℓe, the logit lens) runs on the device the map gives `target.exit_head`.

It is a `SplitRunner` (and so a `ModelRunner`): `forward_prefix` runs the stages up to layer
ℓe-1 (splitting the stage that holds ℓe), `forward_suffix` the rest, `forward` everything.
`exit_layer` may be changed at any time, like TorchRunner's.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mirror_sd.devices.torch_device import TorchDevice
from mirror_sd.graphs.kv_cache import StaticKVCache
from mirror_sd.graphs.model import CausalLM
from mirror_sd.partition.stages import Stage


def _on(module: nn.Module, device: str) -> nn.Module:
    """`module` on `device`: itself when already there, else a copy moved there (the loaded
    model stays whole on the host, so tied weights and other stages are not disturbed)."""
    params = list(module.parameters()) + list(module.buffers())
    if all(p.device == torch.device(device) for p in params):
        return module
    return copy.deepcopy(module).to(device)


class _StageModules(nn.Module):
    """The modules of one stage on its device; `rope` reuses CausalLM.rope on these buffers."""

    def __init__(self, model: CausalLM, stage: Stage, device: str):
        super().__init__()
        self.embed_tokens = _on(model.model.embed_tokens, device) if stage.embed else None
        self.layers = nn.ModuleList(
            _on(model.model.layers[i], device) for i in range(stage.first, stage.last)
        )
        self.norm = _on(model.model.norm, device) if stage.norm else None
        self.lm_head = _on(model.lm_head, device) if stage.lm_head else None
        self.register_buffer("inv_freq", model.inv_freq.to(device), persistent=False)
        self.rope_scale = model.rope_scale

    rope = CausalLM.rope


@dataclass
class _Part:
    """A stage at run time: its spec, device, modules and the KV cache of its layers."""

    stage: Stage
    device: TorchDevice
    mods: _StageModules
    cache: StaticKVCache


class PipelineRunner:
    """`SplitRunner` over a `CausalLM` cut into stages on several torch devices.

    Args:
        model: the loaded model (on the host); stages on other devices get copies of their
            modules, stages on the host share them.
        stages: the model's stages in execution order (`model_stages`).
        devices: alias -> TorchDevice for every alias the stages and `exit_on` use.
        max_len: KV rows preallocated per stage.
        exit_layer: ℓe (0 for a draft).
        exit_on: the alias running the exit head (None: the last stage's device).
        name: "target" or "draft", for messages.
    Raises:
        ValueError: stages that do not cover the model exactly once in order, or devices
            with different dtypes (the output would not be one model's).
    """

    def __init__(self, model: CausalLM, stages: Sequence[Stage], devices: dict[str, TorchDevice],
                 max_len: int, exit_layer: int = 0, exit_on: str | None = None,
                 name: str = "target"):  # fmt: skip
        _check_cover(stages, model.num_layers)
        dtypes = {devices[s.alias].dtype for s in stages}
        if len(dtypes) != 1:
            raise ValueError(
                f"the {name}'s stages use dtypes {sorted(dtypes)}; every device running one "
                "model must use the same dtype (set `dtype:` alike on those devices)"
            )
        cfg = model.config
        self.parts: list[_Part] = []
        for s in stages:
            dev = devices[s.alias]
            dev.check()
            mods = _StageModules(model, s, dev.device).eval()
            w = next(mods.parameters()).dtype
            cache = StaticKVCache(max(s.last - s.first, 0), 1, max_len, cfg.num_kv_heads,
                                  cfg.head_dim, w, dev.device)  # fmt: skip
            self.parts.append(_Part(s, dev, mods, cache))
        exit_alias = exit_on or stages[-1].alias
        self.exit_device = devices[exit_alias]
        self.exit_norm = _on(model.model.norm, self.exit_device.device)
        self.exit_lm_head = _on(model.lm_head, self.exit_device.device)
        self.max_len = max_len
        self.vocab_size = cfg.vocab_size
        self.num_layers = model.num_layers
        self.exit_layer = exit_layer
        self.threads: int | None = None
        self.name = f"{name} pipelined over " + " | ".join(
            f"{s.describe()} ({devices[s.alias].describe()})" for s in stages
        )

    @property
    def length(self) -> int:
        return self.parts[0].cache.length

    def set_threads(self, threads: int | None) -> None:
        """Run the next forwards on `threads` torch intra-op threads (every stage in turn)."""
        self.threads = threads

    def _threads(self) -> None:
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def _run(self, x: torch.Tensor | None, ids: torch.Tensor | None, position_ids: torch.Tensor,
             mask: torch.Tensor, lo: int, hi: int, head: bool) -> torch.Tensor:  # fmt: skip
        """Run the main path from layer `lo` (embedding first when lo == 0 and `ids` given)
        to layer `hi`, then the final norm and LM head when `head`; K/V written, not advanced."""
        for p in self.parts:
            s, m, dev = p.stage, p.mods, p.device.device
            a, b = max(s.first, lo), min(s.last, hi)
            runs_embed = s.embed and ids is not None
            runs_head = head and (s.norm or s.lm_head)
            if not (runs_embed or a < b or runs_head):
                continue
            if runs_embed:
                x = m.embed_tokens(ids.to(dev))
            x = x.to(dev)
            if a < b:
                pos, msk = position_ids.to(dev), mask.to(dev)
                cos, sin = m.rope(pos, x.dtype)
                for i in range(a, b):
                    past_k, past_v = p.cache.past(i - s.first)
                    x, k, v = m.layers[i - s.first](x, cos, sin, msk, past_k, past_v)
                    p.cache.write(i - s.first, k, v)
            if runs_head and s.norm:
                x = m.norm(x)
            if runs_head and s.lm_head:
                x = m.lm_head(x)
        return x

    def _advance(self, n: int) -> None:
        for p in self.parts:
            p.cache.advance(n)

    @torch.inference_mode()
    def forward(self, ids, position_ids, mask):
        self._threads()
        out = self._run(None, ids, position_ids, mask, 0, self.num_layers, True)
        self._advance(ids.shape[1])
        return out[0].float().cpu()

    @torch.inference_mode()
    def fill(self, ids, position_ids, mask) -> None:
        """All layers on new rows without the head: their K/V only (length += T)."""
        self._threads()
        self._run(None, ids, position_ids, mask, 0, self.num_layers, False)
        self._advance(ids.shape[1])

    @torch.inference_mode()
    def forward_prefix(self, ids, position_ids, mask):
        self._threads()
        return self._run(None, ids, position_ids, mask, 0, self.exit_layer, False)

    @torch.inference_mode()
    def exit_logits(self, hidden):
        self._threads()
        h = hidden.to(self.exit_device.device)
        return self.exit_lm_head(self.exit_norm(h))[0].float().cpu()

    @torch.inference_mode()
    def forward_suffix(self, hidden, position_ids, mask):
        self._threads()
        out = self._run(hidden, None, position_ids, mask, self.exit_layer, self.num_layers, True)
        self._advance(hidden.shape[1])
        return out[0].float().cpu()

    def rollback(self, length: int) -> None:
        for p in self.parts:
            p.cache.rollback(length)

    def keep(self, start: int, rows: Sequence[int]) -> None:
        for p in self.parts:
            p.cache.keep(start, rows)


def _check_cover(stages: Sequence[Stage], num_layers: int) -> None:
    """The stages must run embed, layers 0..N-1, norm and lm_head each once, in order."""
    layers = [i for s in stages for i in range(s.first, s.last)]
    ok = (
        layers == list(range(num_layers))
        and [s.embed for s in stages].count(True) == 1
        and stages[0].embed
        and [s.norm for s in stages].count(True) == 1
        and [s.lm_head for s in stages].count(True) == 1
        and stages[-1].lm_head
    )
    if not ok:
        raise ValueError(
            f"stages {[s.describe() for s in stages]} do not run embed, layers 0..{num_layers - 1}, "
            "norm and lm_head once each in order"
        )
