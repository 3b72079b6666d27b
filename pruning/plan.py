"""Persistence: remove masks, save / load / apply pruning plans (safetensors + JSON, no pickle).

A plan saved at ``path`` is two files:

* ``<path>.safetensors``: one ``bool`` tensor per pruned layer, key ``"<layer>.weight_mask"`` (and, with
  ``include_weights=True``, the pruned weight as ``"<layer>.weight"``: needed to reproduce
  SparseGPT, whose reconstruction changes kept weights too);
* ``<path>.json``: ``{"format": "pruning-plan", "version": 1, "layers": {name: {"kind", "weight_shape",
  "pattern", "importance", "sparsity"}}, "has_weights": bool}``.

Neither file can execute code when loaded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .masks import MASK_NAME, attach_mask, detach_mask, get_mask, mask_info, masked_modules
from .weights import LayerPruning, PruningReport

__all__ = ["remove_masks", "save_plan", "load_plan", "apply_plan", "PruningPlan", "PLAN_FORMAT", "PLAN_VERSION"]

PLAN_FORMAT = "pruning-plan"
PLAN_VERSION = 1


def remove_masks(model: nn.Module) -> list[str]:
    """Drop every ``weight_mask`` buffer, leaving plain weights with their zeros.

    The weights are multiplied by their masks one last time, so the zeros are exact even if something
    wrote to them since the last enforcement. Afterwards ``model.state_dict()`` has exactly the keys of
    an unpruned instance.

    Returns:
        Names of the modules whose masks were removed.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"remove_masks(): expected an nn.Module, got {type(model).__name__}")
    removed = []
    for name, module in list(masked_modules(model)):
        detach_mask(module)
        removed.append(name)
    return removed


@dataclass(frozen=True)
class PruningPlan:
    """A loaded plan: per-layer masks (and optionally weights) plus metadata.

    Attributes:
        masks: layer name -> ``torch.bool`` mask of the weight's shape.
        layers: layer name -> metadata dict (``kind``, ``weight_shape``, ``pattern``, ``importance``, ``sparsity``).
        weights: layer name -> pruned weight, empty unless saved with ``include_weights=True``.
    """

    masks: dict[str, torch.Tensor]
    layers: dict[str, dict]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)


def _plan_paths(path) -> tuple[Path, Path]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"plan path: expected a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def save_plan(model: nn.Module, path, *, include_weights: bool = False) -> tuple[Path, Path]:
    """Save the masks of ``model`` (and their metadata) as ``<path>.safetensors`` + ``<path>.json``.

    Args:
        model: a model with masks (from :func:`pruning.prune_weights` or :func:`apply_plan`).
        path: file stem; a ``.json`` / ``.safetensors`` suffix is stripped. Parent folders are created.
        include_weights: also store each pruned layer's weight (reproduces SparseGPT's updated weights).

    Returns:
        ``(safetensors_path, json_path)``.

    Raises:
        TypeError: ``model`` is not a module, or a bad path type.
        ValueError: the model has no masks.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_plan(): expected an nn.Module, got {type(model).__name__}")
    tensor_path, json_path = _plan_paths(path)
    tensors, layers = {}, {}
    for name, module in masked_modules(model):
        mask = get_mask(module)
        tensors[f"{name}.{MASK_NAME}"] = mask.detach().to("cpu", torch.bool).contiguous()
        if include_weights:
            tensors[f"{name}.weight"] = module.weight.detach().to("cpu").contiguous()
        info = mask_info(module)
        layers[name] = {
            "kind": type(module).__name__,
            "weight_shape": list(mask.shape),
            "pattern": info["pattern"],
            "importance": info["importance"],
            "sparsity": float((~mask).sum()) / mask.numel(),
        }
    if not layers:
        raise ValueError("save_plan(): the model has no masks to save (prune it first with pruning.prune_weights)")
    meta = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "has_weights": bool(include_weights), "layers": layers}
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tensor_path), metadata={"format": PLAN_FORMAT, "version": str(PLAN_VERSION)})
    json_path.write_text(json.dumps(meta, indent=2) + "\n")
    return tensor_path, json_path


def load_plan(path) -> PruningPlan:
    """Load a plan written by :func:`save_plan` (``path`` as given to it).

    Raises:
        FileNotFoundError: either file is missing.
        ValueError: not a pruning plan, an unsupported version, or the two files disagree (a layer
            without a mask, a mask without metadata, a shape or dtype mismatch).
    """
    from safetensors.torch import load_file

    tensor_path, json_path = _plan_paths(path)
    for p in (tensor_path, json_path):
        if not p.is_file():
            raise FileNotFoundError(f"load_plan(): expected the plan file {p}, which does not exist")
    try:
        meta = json.loads(json_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"load_plan(): {json_path} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != PLAN_FORMAT:
        raise ValueError(f"load_plan(): expected a {PLAN_FORMAT!r} JSON file, got format={meta.get('format')!r}"
                         if isinstance(meta, dict) else f"load_plan(): expected a JSON object in {json_path}")
    if meta.get("version") != PLAN_VERSION:
        raise ValueError(f"load_plan(): expected plan version {PLAN_VERSION}, got {meta.get('version')!r}")
    layers = meta.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"load_plan(): expected a 'layers' object in {json_path}")
    tensors = load_file(str(tensor_path))
    masks, weights = {}, {}
    for name, info in layers.items():
        key = f"{name}.{MASK_NAME}"
        if key not in tensors:
            raise ValueError(f"load_plan(): layer {name!r} is in {json_path.name} but has no mask in {tensor_path.name}")
        mask = tensors.pop(key)
        if mask.dtype != torch.bool or list(mask.shape) != list(info.get("weight_shape", [])):
            raise ValueError(
                f"load_plan(): mask of {name!r} is {mask.dtype} {list(mask.shape)}, expected torch.bool "
                f"{info.get('weight_shape')}"
            )
        masks[name] = mask
        if meta.get("has_weights"):
            wkey = f"{name}.weight"
            if wkey not in tensors:
                raise ValueError(f"load_plan(): plan says it has weights but {wkey!r} is missing")
            weights[name] = tensors.pop(wkey)
    if tensors:
        raise ValueError(f"load_plan(): {tensor_path.name} has tensors not described in {json_path.name}: {sorted(tensors)}")
    return PruningPlan(masks, {k: dict(v) for k, v in layers.items()}, weights)


def apply_plan(model: nn.Module, plan) -> PruningReport:
    """Attach a plan's masks to a fresh instance of the model it was made on (and its weights, if saved).

    Every layer is checked before anything changes: the name must exist, be a Linear / Conv2d, and have
    the recorded weight shape. The masked weights become zero; with a plan saved with
    ``include_weights=True`` each layer's weight is replaced by the saved one.

    Args:
        model: the model to prune.
        plan: a :class:`PruningPlan` or the path given to :func:`save_plan`.

    Returns:
        A :class:`pruning.PruningReport` of the applied layers.

    Raises:
        TypeError: ``model`` is not a module or ``plan`` is neither a plan nor a path.
        ValueError: a layer is missing, of another type, or has another shape (all mismatches are
            listed); the model is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_plan(): expected an nn.Module, got {type(model).__name__}")
    if not isinstance(plan, PruningPlan):
        if isinstance(plan, (str, os.PathLike)):
            plan = load_plan(plan)
        else:
            raise TypeError(f"apply_plan(): expected a PruningPlan or a path, got {type(plan).__name__}")
    modules = dict(model.named_modules())
    problems = []
    for name, mask in plan.masks.items():
        module = modules.get(name)
        if module is None:
            problems.append(f"{name!r}: no such module in {type(model).__name__}")
        elif not isinstance(module, (nn.Linear, nn.Conv2d)):
            problems.append(f"{name!r}: expected nn.Linear or nn.Conv2d, got {type(module).__name__}")
        elif tuple(module.weight.shape) != tuple(mask.shape):
            problems.append(f"{name!r}: plan has weight shape {tuple(mask.shape)}, model has {tuple(module.weight.shape)}")
        elif name in plan.weights and tuple(plan.weights[name].shape) != tuple(mask.shape):
            problems.append(f"{name!r}: saved weight shape {tuple(plan.weights[name].shape)} != mask shape")
    if problems:
        raise ValueError("apply_plan(): the plan does not fit this model:\n  " + "\n  ".join(problems))
    layers = []
    for name in [n for n in modules if n in plan.masks]:  # the model's order
        mask = plan.masks[name]
        module = modules[name]
        info = plan.layers.get(name, {})
        if name in plan.weights:
            with torch.no_grad():
                module.weight.copy_(plan.weights[name].to(module.weight.device, module.weight.dtype))
        attach_mask(module, mask, pattern=info.get("pattern", "custom"), importance=info.get("importance", "custom"))
        pattern, importance = info.get("pattern", "custom"), info.get("importance", "custom")
        layers.append(LayerPruning.of(name, module, mask, pattern, importance))
    patterns = sorted({layer.pattern for layer in layers})
    criteria = sorted({layer.importance for layer in layers})
    return PruningReport(",".join(patterns), ",".join(criteria), tuple(layers), ())
