"""TrimmedVocabRunner: a draft with a VocabTrim head, seen as a full-vocabulary `ModelRunner`.

The wrapped runner's model emits logits over the K kept tokens (`graphs.trimmed_head`); this
wrapper scatters them back to the full vocabulary V with -inf everywhere else. The draft
engine, the acceptance rules and the profiler therefore see an ordinary (T, V) distribution
that puts zero mass outside the kept set: greedy drafting never proposes such a token, and
sampling draws from q with q(x) = 0 there, which speculative sampling's rule handles exactly
(the target, verifying with its full head, still emits any token with its own probability).
"""

from __future__ import annotations

import torch

from mirror_sd.devices.base import DeviceError, ModelRunner, RunnerWrapper
from mirror_sd.graphs.vocab_trim import VocabTrim


class TrimmedVocabRunner(RunnerWrapper):
    """`ModelRunner` delegating to `runner` (K-logit head) and expanding its logits to V.

    Everything but `forward` and `vocab_size` is the wrapped runner's: the KV cache, length,
    rollback / keep, and any backend attribute (`session`, `placement`, ...).
    """

    def __init__(self, runner: ModelRunner, trim: VocabTrim):
        self.runner = runner
        self.trim = trim
        self.vocab_size = trim.vocab_size
        self.name = f"{runner.name} [vocabulary trimmed to {trim.size}]"

    def forward(
        self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """As the wrapped runner's forward, returning (T, V) logits, -inf outside the kept ids."""
        logits = self.runner.forward(ids, position_ids, mask)  # (T, K)
        if logits.shape != (ids.shape[1], self.trim.size):
            raise DeviceError(
                f"{self.runner.name} returned logits {tuple(logits.shape)}, expected "
                f"({ids.shape[1]}, {self.trim.size}) for a head trimmed to {self.trim.size} "
                "tokens: the model and the VocabTrim do not belong together (re-export the "
                "draft with this trim)"
            )
        return self.trim.expand(logits)
