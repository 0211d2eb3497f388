"""`save()` a compiled plan into a folder and `load()` it back (no export, no profiling)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from mirror_sd.compiler import compile
from mirror_sd.partition import Profile, load_device_map
from mirror_sd.partition.batch_policy import plan_policy
from mirror_sd.partition.tree_shape import sized_tree
from mirror_sd.runtime.plan import Plan

PLAN_VERSION = 1


def save(plan: Plan, folder: str | Path) -> Path:
    """Write plan.yaml (fully expanded), graph.json, profile.json and the ONNX draft files (its
    own graph, and its prefill graph where `prefill_quantize` made one: `load` finds both in
    the folder's onnx/ cache instead of exporting them)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = plan.report
    onnx_rel = None
    fill = getattr(plan.draft, "fill_graph", None) if plan.draft is not None else None
    for graph in (info.onnx, fill):
        if graph:
            src = Path(graph).parent
            if not (folder / "onnx" / src.name).exists():
                shutil.copytree(src, folder / "onnx" / src.name)
    if info.onnx:
        onnx_rel = str(Path("onnx") / Path(info.onnx).parent.name / "model.onnx")
    doc = {
        "version": PLAN_VERSION,
        "target": info.target,
        "draft": info.draft,
        "onnx": onnx_rel,
        "device_map": load_device_map(info.device_map).with_speculation(plan.spec).to_dict(),
    }
    if info.mode_asked == "auto":  # the map said auto; plan.yaml keeps the verdict
        doc["mode_asked"] = "auto"
        if info.auto_alone:  # the verdict ran a retrieval source alone (CompileReport)
            doc["auto_alone"] = info.auto_alone
    if info.precision:  # the map said auto: the concrete precision is in device_map, the why here
        doc["precision"] = dict(info.precision)
    if info.draft_trim is not None:  # the draft's head as exported: never recalibrated
        info.draft_trim.save(folder / "vocab_trim.json")
        doc["draft_vocab_trim"] = {"file": "vocab_trim.json",
                                   "coverage": info.draft_trim_coverage}  # fmt: skip
    if plan.exit_head is not None and plan.exit_head.trained:  # the head file travels along
        plan.exit_head.save(folder / "exit_head.pt")
        doc["device_map"]["speculation"]["exit_head"] = "exit_head.pt"
    if plan.amphista is not None:  # the heads file too
        plan.amphista.save(folder / "amphista.pt")
        doc["device_map"]["speculation"]["amphista"] = "amphista.pt"
    (folder / "plan.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    info.graph.save(folder / "graph.json")
    if info.profile:
        info.profile.save(folder / "profile.json")
    if info.choice:
        (folder / "choice.txt").write_text(info.choice.explain() + "\n")
    return folder


def load(folder: str | Path) -> Plan:
    """Rebuild a plan saved with `save()`: same models, device map and chosen settings (no
    profiling), the saved draft ONNX files reused. An ONNX Runtime target is not in the
    saved folder (gigabytes): the first load exports it into the folder's onnx/ (per layer,
    `graphs.layered`) and later loads reuse that."""
    folder = Path(folder)
    doc = yaml.safe_load((folder / "plan.yaml").read_text())
    if not isinstance(doc, dict) or doc.get("version") != PLAN_VERSION:
        raise ValueError(f"{folder}/plan.yaml: not a mirror-sd plan of version {PLAN_VERSION}")
    spec_doc = doc["device_map"].get("speculation", {})
    if spec_doc.get("exit_head") not in (None, "lm_head", "trained"):  # saved beside plan.yaml
        spec_doc["exit_head"] = str(folder / spec_doc["exit_head"])
    if spec_doc.get("amphista") not in (None, "none", "trained"):
        spec_doc["amphista"] = str(folder / spec_doc["amphista"])
    trim_doc = doc.get("draft_vocab_trim") or {}
    extra = {"draft_trim": folder / trim_doc["file"]} if trim_doc else {}
    plan = compile(doc["target"], doc["draft"], doc["device_map"], onnx_dir=folder / "onnx",
                   **extra)  # fmt: skip
    plan.report.mode_asked = doc.get("mode_asked", plan.spec.mode)
    plan.report.auto_alone = doc.get("auto_alone", "")
    plan.report.precision = dict(doc.get("precision") or {})
    if trim_doc:
        plan.report.draft_trim_coverage = trim_doc.get("coverage")
    plan.report.profile = (
        Profile.load(folder / "profile.json") if (folder / "profile.json").is_file() else None
    )
    plan.batch_policy = plan.report.batch_policy = plan_policy(  # as compile() chose it
        plan.report.profile, plan.spec, plan.draft is not None
    )
    if plan.report.profile is not None and plan.draft is not None:
        plan.report.tree = sized_tree(plan.report.profile, plan.spec, plan.device_specs[0])
    return plan
