"""Build the model-free draft source a `SpecConfig.retrieval` name asks for."""

from __future__ import annotations

from mirror_sd.runtime.drafters.base import DraftSource
from mirror_sd.runtime.drafters.hierarchy import HierarchyDrafter
from mirror_sd.runtime.drafters.prompt_lookup import PromptLookup
from mirror_sd.runtime.drafters.suffix_automaton import SamDrafter

RECENT_OUTPUTS = 32  # generations Hierarchy Drafting remembers per plan


def make_source(name: str, max_ngram: int) -> DraftSource | None:
    """'none' -> None; 'pld' prompt lookup; 'sam' suffix automaton; 'hd' Hierarchy Drafting."""
    if name == "none":
        return None
    if name == "pld":
        return PromptLookup(max_ngram=max_ngram, name="pld")
    if name == "sam":
        return SamDrafter(name="sam")
    if name == "hd":
        return HierarchyDrafter(max_ngram=max_ngram, capacity=RECENT_OUTPUTS, name="hd")
    raise ValueError(f"unknown retrieval source {name!r}; expected none, pld, sam or hd")
