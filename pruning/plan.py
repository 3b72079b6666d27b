"""Persistence: remove masks, save / load / apply pruning plans (safetensors + JSON, no pickle).

A plan saved at ``path`` is two files:

* ``<path>.safetensors``: one ``bool`` tensor per pruned layer, key ``"<layer>.weight_mask"`` (and, with
  ``include_weights=True``, the pruned weight as ``"<layer>.weight"``: needed to reproduce
  SparseGPT, whose reconstruction changes kept weights too), and for a layer that carries an input permutation
  (:func:`pruning.channels.permute_for_nm`) its ``int64`` ``"<layer>.input_perm"``;
* ``<path>.json``: ``{"format": "pruning-plan", "version": 1, "layers": {name: {"kind", "weight_shape",
  "pattern", "importance", "sparsity"[, "input_perm"]}}, "has_weights": bool}``.

Neither file can execute code when loaded.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .masks import MASK_NAME, attach_mask, detach_mask, get_mask, mask_info, masked_modules
from .patterns import INPUT_PERM, input_width, is_conv1d
from .permutation import check_permutation
from .plan_schema import PLAN_FORMAT, PLAN_VERSION, read_plan_json, read_plan_tensors
from .transaction import all_or_nothing
from .weights import LayerPruning, PruningReport

__all__ = ["remove_masks", "save_plan", "load_plan", "apply_plan", "PruningPlan", "PLAN_FORMAT", "PLAN_VERSION"]

def remove_masks(model: nn.Module) -> list[str]:
    """Drop every ``weight_mask`` buffer, leaving plain weights with their zeros.

    The weights are multiplied by their masks one last time, so the zeros are exact even if something
    wrote to them since the last enforcement. Afterwards ``model.state_dict()`` has exactly the keys of
    an unpruned instance. All or nothing: on an error no mask is removed.

    Returns:
        Names of the modules whose masks were removed.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"remove_masks(): expected an nn.Module, got {type(model).__name__}")
    masked = list(masked_modules(model))
    with all_or_nothing(model, tensors=[module.weight for _, module in masked]):
        for _, module in masked:
            detach_mask(module)
    return [name for name, _ in masked]


@dataclass(frozen=True)
class PruningPlan:
    """A loaded plan: per-layer masks (and optionally weights) plus metadata.

    Attributes:
        masks: layer name -> ``torch.bool`` mask of the weight's shape.
        layers: layer name -> metadata dict (``kind``, ``weight_shape``, ``pattern``, ``importance``, ``sparsity``).
        weights: layer name -> pruned weight, empty unless saved with ``include_weights=True``.
        input_perms: layer name -> ``int64`` input permutation, for the layers that carry one (their masks are N:M
            in that order; :func:`apply_plan` attaches it as the layer's ``input_perm`` buffer).
    """

    masks: dict[str, torch.Tensor]
    layers: dict[str, dict]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    input_perms: dict[str, torch.Tensor] = field(default_factory=dict)


def _plan_paths(path) -> tuple[Path, Path]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"plan path: expected a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def _replace_together(files: dict[Path, bytes]) -> None:
    """Write every ``path: data`` to a temporary file beside it, then rename each into place, in order: a
    failure before the renames leaves every old file as it was."""
    staged = []
    try:
        for path, data in files.items():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
            staged.append((Path(tmp), path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # what a plain open() would have made; mkstemp makes it private
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def save_plan(model: nn.Module, path, *, include_weights: bool = False) -> tuple[Path, Path]:
    """Save the masks of ``model`` (and their metadata) as ``<path>.safetensors`` + ``<path>.json``.

    Both files are written to temporary files first and renamed into place together (the JSON last), so an
    error or an interruption leaves any earlier plan at ``path`` whole.

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
    from safetensors.torch import save

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
        perm = module._buffers.get(INPUT_PERM)
        if perm is not None:
            tensors[f"{name}.{INPUT_PERM}"] = perm.detach().to("cpu", torch.int64).contiguous()
            layers[name]["input_perm"] = perm.shape[0]
    if not layers:
        raise ValueError("save_plan(): the model has no masks to save (prune it first with pruning.prune_weights)")
    meta = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "has_weights": bool(include_weights), "layers": layers}
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    blob = save(tensors, metadata={"format": PLAN_FORMAT, "version": str(PLAN_VERSION)})
    _replace_together({tensor_path: blob, json_path: (json.dumps(meta, indent=2) + "\n").encode()})
    return tensor_path, json_path


def load_plan(path) -> PruningPlan:
    """Load a plan written by :func:`save_plan` (``path`` as given to it), trusting nothing in the files.

    Both files are checked against the plan schema before any tensor is read (:mod:`pruning.plan_schema`:
    types, shapes, ranges, sizes within :data:`pruning.plan_schema.PLAN_LIMITS`, and the two files agreeing
    with each other); neither file can execute code.

    Raises:
        FileNotFoundError: either file is missing.
        ValueError: anything wrong in either file: one message naming the file, the entry and the problem.
    """
    tensor_path, json_path = _plan_paths(path)
    for p in (tensor_path, json_path):
        if not p.is_file():
            raise FileNotFoundError(f"load_plan(): expected the plan file {p}, which does not exist")
    layers, has_weights = read_plan_json(json_path)
    masks, weights, perms = read_plan_tensors(tensor_path, json_path.name, layers, has_weights)
    return PruningPlan(masks, layers, weights, perms)


def _check_plan(plan: PruningPlan) -> None:
    """Check a plan built in Python as :func:`load_plan` checks the files (types, dtypes, shapes, finite weights)."""
    fn = "apply_plan()"
    for label, table in (("masks", plan.masks), ("layers", plan.layers), ("weights", plan.weights)):
        if not isinstance(table, dict) or not all(isinstance(k, str) for k in table):
            raise TypeError(f"{fn}: expected plan.{label} as a dict keyed by layer name")
    for name, mask in plan.masks.items():
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{fn}: plan.masks[{name!r}]: expected a torch.bool tensor, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        info = plan.layers.get(name, {})
        if not isinstance(info, dict) or not all(isinstance(info.get(k, ""), str) for k in ("pattern", "importance")):
            raise TypeError(f"{fn}: plan.layers[{name!r}]: expected a dict with str 'pattern' and 'importance'")
    for name, perm in plan.input_perms.items():
        if name not in plan.masks:
            raise ValueError(f"{fn}: plan.input_perms[{name!r}] has no mask in plan.masks")
        length = perm.shape[0] if isinstance(perm, torch.Tensor) and perm.dim() == 1 else -1
        check_permutation(f"{fn}: plan.input_perms[{name!r}]", perm, length)
    for name, weight in plan.weights.items():
        if name not in plan.masks:
            raise ValueError(f"{fn}: plan.weights[{name!r}] has no mask in plan.masks")
        if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
            raise TypeError(f"{fn}: plan.weights[{name!r}]: expected a floating-point tensor, got "
                            f"{getattr(weight, 'dtype', type(weight).__name__)}")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"{fn}: plan.weights[{name!r}] holds NaN or inf")


def apply_plan(model: nn.Module, plan) -> PruningReport:
    """Attach a plan's masks to a fresh instance of the model it was made on (and its weights, if saved).

    Every layer is checked before anything changes: the name must exist, be a Linear / Conv2d, and have
    the recorded weight shape. The masked weights become zero; with a plan saved with
    ``include_weights=True`` each layer's weight is replaced by the saved one. All or nothing: on any
    error the model is left exactly as it was.

    Args:
        model: the model to prune.
        plan: a :class:`PruningPlan` or the path given to :func:`save_plan` (read with :func:`load_plan`).

    Returns:
        A :class:`pruning.PruningReport` of the applied layers.

    Raises:
        TypeError: ``model`` is not a module or ``plan`` is neither a plan nor a path; a plan whose tables
            hold the wrong types.
        ValueError: a layer is missing, of another type, or has another shape (all mismatches are
            listed); a bad plan file (see :func:`load_plan`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_plan(): expected an nn.Module, got {type(model).__name__}")
    if not isinstance(plan, PruningPlan):
        if isinstance(plan, (str, os.PathLike)):
            plan = load_plan(plan)
        else:
            raise TypeError(f"apply_plan(): expected a PruningPlan or a path, got {type(plan).__name__}")
    _check_plan(plan)
    modules = dict(model.named_modules())
    problems = []
    for name, mask in plan.masks.items():
        module = modules.get(name)
        if module is None:
            problems.append(f"{name!r}: no such module in {type(model).__name__}")
        elif not isinstance(module, (nn.Linear, nn.Conv2d)) and not is_conv1d(module):
            problems.append(f"{name!r}: expected nn.Linear, nn.Conv2d or a transformers Conv1D, got "
                            f"{type(module).__name__}")
        elif tuple(module.weight.shape) != tuple(mask.shape):
            problems.append(f"{name!r}: plan has weight shape {tuple(mask.shape)}, model has {tuple(module.weight.shape)}")
        elif name in plan.input_perms and plan.input_perms[name].shape[0] != input_width(module):
            problems.append(f"{name!r}: plan's input_perm has {plan.input_perms[name].shape[0]} entries, the layer "
                            f"has {input_width(module)} inputs")
        elif name in plan.weights and tuple(plan.weights[name].shape) != tuple(mask.shape):
            problems.append(f"{name!r}: saved weight shape {tuple(plan.weights[name].shape)} != mask shape")
    if problems:
        raise ValueError("apply_plan(): the plan does not fit this model:\n  " + "\n  ".join(problems))
    names = [n for n in modules if n in plan.masks]  # the model's order
    layers = []
    with all_or_nothing(model, tensors=[modules[n].weight for n in names]):
        for name in names:
            mask = plan.masks[name]
            module = modules[name]
            info = plan.layers.get(name, {})
            pattern, importance = info.get("pattern", "custom"), info.get("importance", "custom")
            if name in plan.weights:
                with torch.no_grad():
                    module.weight.copy_(plan.weights[name].to(module.weight.device, module.weight.dtype))
            if name in plan.input_perms:
                module.register_buffer(INPUT_PERM, plan.input_perms[name].to(module.weight.device))
            attach_mask(module, mask, pattern=pattern, importance=importance)
            layers.append(LayerPruning.of(name, module, mask, pattern, importance))
    patterns = sorted({layer.pattern for layer in layers})
    criteria = sorted({layer.importance for layer in layers})
    return PruningReport(",".join(patterns), ",".join(criteria), tuple(layers), ())
