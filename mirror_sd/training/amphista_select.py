"""Which Amphista heads a plan uses (`speculation.amphista`), and the ℓe they fix.

  - "none": no heads;
  - "trained": the heads `mirror-sd train amphista` cached for this target, at the given
    `exit_layer` when it is fixed, else the newest trained layer's;
  - a path to a heads file: those heads.

The heads read the hidden state entering the layer they were trained at, which the target
produces only at its exit layer ℓe, so the heads fix ℓe.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from mirror_sd.graphs.amphista import KIND
from mirror_sd.partition.spec_config import SpecConfig
from mirror_sd.training.amphista import trained_amphista


def heads_layer(path: Path) -> int:
    """The layer a heads file was trained at (ValueError: not a heads file)."""
    try:
        d = torch.load(path, weights_only=True, map_location="cpu")
        if d.get("kind") != KIND:
            raise KeyError("kind")
        return int(d["layer"])
    except (
        OSError,
        RuntimeError,
        EOFError,
        KeyError,
        TypeError,
        AttributeError,
        pickle.UnpicklingError,
    ) as e:
        raise ValueError(
            f"speculation.amphista {str(path)!r}: not an Amphista heads file ({e})"
        ) from None


def amphista_file(spec: SpecConfig, target_folder: Path, cache) -> tuple[Path, int] | None:
    """(heads file, its layer) for `spec.amphista`, None for "none".

    Raises:
        ValueError: "trained" but none is cached for this target (at the fixed ℓe), a missing
            or unreadable file, or a file trained at another layer than a fixed `exit_layer`.
    """
    if spec.amphista == "none":
        return None
    fixed = spec.exit_layer if isinstance(spec.exit_layer, int) else None
    if spec.amphista == "trained":
        found = trained_amphista(cache, target_folder)
        if not found or (fixed is not None and fixed not in found):
            at = f" at ℓe={fixed}" if fixed is not None else ""
            raise ValueError(
                f"speculation.amphista 'trained': no trained Amphista heads for {target_folder}"
                f"{at} (trained: {sorted(found) or 'none'}); run `mirror-sd train amphista "
                f"{target_folder}{f' --layer {fixed}' if fixed else ''}` first, or give a heads file"
            )
        layer = fixed if fixed is not None else max(found, key=lambda x: found[x].stat().st_mtime)
        return found[layer], layer
    path = Path(spec.amphista).expanduser()
    if not path.is_file():
        raise ValueError(
            f"speculation.amphista {spec.amphista!r}: no such file; expected 'none', 'trained' "
            "or the path of a heads file written by `mirror-sd train amphista`"
        )
    layer = heads_layer(path)
    if fixed is not None and fixed != layer:
        raise ValueError(
            f"speculation.amphista {path} was trained at ℓe={layer}, but exit_layer is {fixed}: "
            f"drop exit_layer (the heads fix it) or train heads at {fixed}"
        )
    return path, layer
