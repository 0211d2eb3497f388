"""Draft sources: model-free retrieval drafts (SAM-Decoding, Hierarchy Drafting, prompt
lookup, reference reuse) behind one `DraftSource` protocol, and their combination."""

from mirror_sd.runtime.drafters.base import DraftSource, Proposal
from mirror_sd.runtime.drafters.combine import Combined
from mirror_sd.runtime.drafters.hierarchy import HierarchyDrafter
from mirror_sd.runtime.drafters.prompt_lookup import NgramIndex, PromptLookup
from mirror_sd.runtime.drafters.reference import ReferenceSource
from mirror_sd.runtime.drafters.suffix_automaton import (
    SEPARATOR,
    SamDrafter,
    SuffixAutomaton,
    SuffixMatch,
)

__all__ = [
    "SEPARATOR",
    "Combined",
    "DraftSource",
    "HierarchyDrafter",
    "NgramIndex",
    "PromptLookup",
    "Proposal",
    "ReferenceSource",
    "SamDrafter",
    "SuffixAutomaton",
    "SuffixMatch",
]
