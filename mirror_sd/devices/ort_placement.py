"""Which execution provider really runs which node of an ONNX Runtime session.

ORT silently runs the nodes an accelerator's provider rejects on the CPU provider; a draft
that is "on the NPU" but half on the CPU is the most common surprise of heterogeneous
decoding, so every runner reports its placement (`placement_summary`). Recent ORT records
the assignment when a session is made (`RECORD_ASSIGNMENT`, set by `OrtDevice.session`);
older ORT is read from the profile of the session's first run.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

RECORD_ASSIGNMENT = "session.record_ep_graph_assignment_info"  # recent ORT (1.24, 1.32 have it)


def records_assignment_api() -> bool:
    """True when this onnxruntime records which provider runs each node at session creation."""
    return hasattr(ort.InferenceSession, "get_provider_graph_assignment_info")


def node_placement(session: ort.InferenceSession) -> dict[str, dict[str, int]]:
    """Execution provider -> {op type: number of nodes} that it runs in `session`.

    Read from ORT's graph assignment record (sessions from `OrtDevice.session`, recent ORT),
    else from the profile of the session's first run (older ORT; call after one run). A fused
    accelerator subgraph counts all the nodes it swallowed.

    Raises:
        RuntimeError: the session records neither (it was not made by `OrtDevice.session`).
    """
    options = session.get_session_options()
    placement: dict[str, Counter[str]] = {}
    if records_assignment_api() and _config(options, RECORD_ASSIGNMENT) == "1":
        for subgraph in session.get_provider_graph_assignment_info():
            ops = placement.setdefault(subgraph.ep_name, Counter())
            ops.update(node.op_type for node in subgraph.get_nodes())
        return {ep: dict(ops) for ep, ops in placement.items()}
    profile = session.end_profiling() if options.enable_profiling else ""
    if not profile:
        raise RuntimeError(
            "this session records no node placement; create it with "
            "OrtDevice.session(path, record_placement=True) (and, on an ORT without "
            "assignment records, run it once first)"
        )
    return _placement_from_profile(Path(profile))


def actual_providers(session: ort.InferenceSession) -> dict[str, int]:
    """Execution provider -> number of graph nodes it runs in `session` (see node_placement)."""
    return {ep: sum(ops.values()) for ep, ops in node_placement(session).items()}


def _config(options: ort.SessionOptions, key: str) -> str | None:
    try:
        return options.get_session_config_entry(key)
    except RuntimeError:  # ORT raises for a key that was never set
        return None


def _placement_from_profile(path: Path) -> dict[str, dict[str, int]]:
    """Op types per provider of the nodes in an ORT profile (Chrome trace JSON); deletes it."""
    events = json.loads(path.read_text())
    path.unlink(missing_ok=True)
    placement: dict[str, Counter[str]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            args = e.get("args", {})
            placement.setdefault(args.get("provider", "?"), Counter())[
                args.get("op_name", "?")
            ] += 1
    return {ep: dict(ops) for ep, ops in placement.items()}


def placement_summary(
    placement: dict[str, dict[str, int]], expected: str, who: str = "stage"
) -> str:
    """'OpenVINOExecutionProvider: 299 nodes, CPUExecutionProvider: 4 nodes (IsNaN x4)'; warns
    when any node runs on a provider other than `expected` (the first requested one)."""
    counts = {ep: sum(ops.values()) for ep, ops in placement.items()}
    parts = []
    for ep, n in sorted(counts.items(), key=lambda x: -x[1]):
        ops = ", ".join(f"{op} x{k}" for op, k in sorted(placement[ep].items()))
        parts.append(f"{ep}: {n} nodes" + (f" ({ops})" if ep != expected else ""))
    summary = ", ".join(parts)
    elsewhere = sum(n for ep, n in counts.items() if ep != expected)
    if elsewhere:
        warnings.warn(
            f"{who}: {elsewhere} of {sum(counts.values())} nodes do not run on {expected} "
            f"({summary}); those operators are not supported there and fall back",
            RuntimeWarning,
            stacklevel=2,
        )
    return summary


def merged_placement(sessions: Sequence[ort.InferenceSession]) -> dict[str, dict[str, int]]:
    """`node_placement` summed over several sessions (a runner made of several graphs)."""
    merged: dict[str, Counter[str]] = {}
    for session in sessions:
        for ep, ops in node_placement(session).items():
            merged.setdefault(ep, Counter()).update(ops)
    return {ep: dict(ops) for ep, ops in merged.items()}
