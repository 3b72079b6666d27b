"""One-shot weight pruning of ``nn.Linear`` / ``nn.Conv2d`` layers: :func:`prune_weights` and its report.

How masks live on a model
-------------------------
A pruned layer gets a boolean buffer ``weight_mask`` (same shape as ``weight``, ``True`` = kept) and its
weight is multiplied by the mask in place. Nothing else is patched: no forward hooks, no
parametrizations, so the layer stays a plain ``nn.Linear`` / ``nn.Conv2d`` and ``model(x)`` costs what
it did. The buffer is persistent, so a masked model's ``state_dict`` holds ``<layer>.weight_mask`` and
loads back into a masked model (e.g. to resume fine-tuning). To keep zeros at zero while training use
:func:`pruning.finetune` (it does this for you) or :func:`pruning.training.attach_mask_hooks` with your
own optimizer, or call :func:`pruning.enforce_masks` after each step. :func:`pruning.remove_masks`
drops the buffers and leaves plain weights with zeros.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .importance import (
    ImportanceCriterion,
    Magnitude,
    SparseGPT,
    Taylor,
    Wanda,
    collect_input_statistics,
    magnitude_scores,
    resolve_importance,
    sparsegpt_prune,
    taylor_scores,
    wanda_scores,
)
from .patterns import (
    Pattern,
    block_mask,
    global_unstructured_masks,
    matrix_to_weight,
    nm_mask,
    parse_pattern,
    unstructured_mask,
    weight_matrix,
)

__all__ = [
    "prune_weights",
    "PruningReport",
    "LayerPruning",
    "SkippedLayer",
    "MASK_NAME",
    "attach_mask",
    "get_mask",
    "masked_modules",
]

MASK_NAME = "weight_mask"
_INFO_ATTR = "_pruning_info"


# ---------------------------------------------------------------------------------------------------
# Mask primitives
# ---------------------------------------------------------------------------------------------------


def attach_mask(module: nn.Module, mask: torch.Tensor, *, pattern: str = "custom", importance: str = "custom") -> None:
    """Attach a boolean ``weight_mask`` buffer to ``module`` and zero its pruned weights in place.

    Args:
        module: ``nn.Linear`` / ``nn.Conv2d`` (anything with a ``weight`` parameter).
        mask: ``torch.bool`` tensor of the weight's shape, ``True`` = kept.
        pattern, importance: recorded for reports and plans.

    Raises:
        TypeError: no ``weight`` parameter, or a non-boolean mask.
        ValueError: mask shape differs from the weight's.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"attach_mask(): expected a module with a weight tensor, got {type(module).__name__}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"attach_mask(): expected a torch.bool mask, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != weight.shape:
        raise ValueError(f"attach_mask(): expected a mask of shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
    mask = mask.to(weight.device)
    with torch.no_grad():
        weight.mul_(mask)
    if MASK_NAME in module._buffers:
        module._buffers[MASK_NAME] = mask
    else:
        module.register_buffer(MASK_NAME, mask)
    setattr(module, _INFO_ATTR, {"pattern": str(pattern), "importance": str(importance)})


def get_mask(module: nn.Module) -> torch.Tensor | None:
    """The module's ``weight_mask`` buffer, or ``None`` if it is not masked."""
    return module._buffers.get(MASK_NAME)


def masked_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every module of ``model`` that carries a ``weight_mask``."""
    for name, module in model.named_modules():
        if get_mask(module) is not None:
            yield name, module


def _mask_info(module: nn.Module) -> dict:
    return dict(getattr(module, _INFO_ATTR, {"pattern": "custom", "importance": "custom"}))


# ---------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPruning:
    """One pruned layer: its name, type, weight shape, pattern, criterion and achieved sparsity."""

    name: str
    kind: str
    shape: tuple[int, ...]
    pattern: str
    importance: str
    numel: int
    pruned: int

    @property
    def sparsity(self) -> float:
        """Fraction of the weight's elements masked out."""
        return self.pruned / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SkippedLayer:
    """A Linear / Conv2d left dense, and why."""

    name: str
    kind: str
    reason: str


@dataclass(frozen=True)
class PruningReport:
    """What :func:`prune_weights` (or :func:`pruning.apply_plan`) did: every pruned layer and every skipped one."""

    pattern: str
    importance: str
    layers: tuple[LayerPruning, ...]
    skipped: tuple[SkippedLayer, ...]

    @property
    def pruned_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def skipped_names(self) -> list[str]:
        return [s.name for s in self.skipped]

    @property
    def overall_sparsity(self) -> float:
        """Masked-out fraction over the weights of the pruned layers (0.0 if none)."""
        total = sum(layer.numel for layer in self.layers)
        return sum(layer.pruned for layer in self.layers) / total if total else 0.0

    def to_dict(self) -> dict:
        """A JSON-serialisable view."""
        return {
            "pattern": self.pattern,
            "importance": self.importance,
            "overall_sparsity": self.overall_sparsity,
            "layers": [{**asdict(layer), "sparsity": layer.sparsity} for layer in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
        }

    def __str__(self) -> str:
        lines = [
            f"PruningReport: pattern={self.pattern}, importance={self.importance}, {len(self.layers)} layer(s) pruned "
            f"(overall sparsity {self.overall_sparsity:.4f}), {len(self.skipped)} skipped"
        ]
        width = max([len(x.name) for x in self.layers] + [len(x.name) for x in self.skipped] + [5])
        for layer in self.layers:
            lines.append(
                f"  {layer.name or '<model>':<{width}}  {layer.kind:<7} {str(layer.shape):<22} {layer.pattern:<12} "
                f"sparsity {layer.sparsity:.4f}"
            )
        for s in self.skipped:
            lines.append(f"  {s.name or '<model>':<{width}}  {s.kind:<7} skipped: {s.reason}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# prune_weights
# ---------------------------------------------------------------------------------------------------


def _check_reiterable(fn: str, calib, passes: str) -> None:
    if calib is None or isinstance(calib, (torch.Tensor, str, bytes)) or not isinstance(calib, Iterable):
        raise TypeError(
            f"{fn}: expected calib as an iterable of batches (a list of tensors / tuples / dicts, or a DataLoader), "
            f"got {type(calib).__name__}"
        )
    if isinstance(calib, Iterator):
        raise ValueError(
            f"{fn}: {passes} needs a re-iterable calib (a list or a DataLoader), got a one-shot iterator "
            f"({type(calib).__name__}); wrap it with list(...)"
        )


def _layer_sparsity(name: str, sparsity):
    """The budget for one layer, or ``None`` when a per-layer mapping leaves it out."""
    if isinstance(sparsity, Mapping):
        return sparsity.get(name)
    return sparsity


def _validate_sparsity(fn: str, sparsity, pat: Pattern) -> None:
    def check_one(label, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{fn}: expected {label} as a float in [0, 1], got {type(value).__name__}")
        if not 0.0 <= float(value) <= 1.0:  # also rejects NaN
            raise ValueError(f"{fn}: expected 0 <= {label} <= 1, got {value}")

    if pat.kind == "nm":
        if sparsity is not None:
            raise ValueError(
                f"{fn}: pattern {pat} fixes the sparsity at {pat.fixed_sparsity:g}; expected sparsity=None, got {sparsity!r}"
            )
        return
    if sparsity is None:
        raise ValueError(f"{fn}: pattern {pat!s} needs a sparsity (a float in [0, 1]), got None")
    if isinstance(sparsity, Mapping):
        if pat.kind == "global":
            raise TypeError(f"{fn}: pattern 'global' takes one float sparsity, got a per-layer mapping")
        for key, value in sparsity.items():
            if not isinstance(key, str):
                raise TypeError(f"{fn}: expected layer names as sparsity keys, got {type(key).__name__}")
            check_one(f"sparsity[{key!r}]", value)
        return
    check_one("sparsity", sparsity)


def _eligibility(module: nn.Module, pat: Pattern, crit: ImportanceCriterion) -> str | None:
    """Why ``module`` cannot take this pattern / criterion, or ``None`` if it can."""
    weight = module.weight
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "lazy module not initialised yet (run a forward pass first)"
    if not weight.dtype.is_floating_point:
        return f"weight dtype {weight.dtype} is not floating point"
    if isinstance(module, nn.Conv2d) and weight.dim() != 4:
        return f"unexpected conv weight shape {tuple(weight.shape)}"
    rows, cols = weight.shape[0], weight[0].numel()
    if pat.kind == "nm":
        k = module.in_features if isinstance(module, nn.Linear) else module.in_channels // module.groups
        what = "input features" if isinstance(module, nn.Linear) else "input channels per group"
        if k % pat.m:
            return f"{what} ({k}) not a multiple of m={pat.m}"
    if pat.kind == "block":
        br, bc = pat.block
        if rows % br or cols % bc:
            return f"GEMM view {rows}x{cols} not divisible by the {br}x{bc} block"
    if isinstance(crit, (Wanda, SparseGPT)) and isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"{crit.name} needs im2col statistics; grouped convolutions (groups={module.groups}) are not supported"
    return None


def _scores_to_mask(scores: torch.Tensor, pat: Pattern, sparsity, row_budget: bool) -> torch.Tensor:
    if pat.kind == "nm":
        return nm_mask(scores, pat.n, pat.m)
    if pat.kind == "block":
        return block_mask(scores, pat.block, sparsity)
    return unstructured_mask(scores, sparsity, dim=-1 if row_budget else None)


def prune_weights(
    model: nn.Module,
    pattern: str = "2:4",
    importance="magnitude",
    sparsity: float | Mapping[str, float] | None = None,
    calib: Iterable | None = None,
    loss_fn: Callable | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    *,
    progress: bool = True,
) -> PruningReport:
    """Attach masks to every selected ``nn.Linear`` / ``nn.Conv2d`` of ``model`` and zero the pruned weights.

    Args:
        model: any ``nn.Module``; its Linear / Conv2d layers (including ``model`` itself) are candidates.
        pattern: ``"n:m"`` (e.g. ``"2:4"``; groups along the input dimension, for Conv2d along the input
            channels at each kernel position), ``"unstructured"`` (layer-wise budget), ``"global"`` (one
            budget across all selected layers; magnitude / taylor only) or ``"block<R>x<C>"`` (whole tiles
            of the GEMM view, e.g. ``"block16x16"``).
        importance: ``"magnitude"``, ``"taylor"``, ``"wanda"``, ``"sparsegpt"`` or an
            :class:`pruning.importance.ImportanceCriterion` instance (e.g. ``SparseGPT(blocksize=64)``).
            With ``"unstructured"``, Wanda compares weights within each output row (its paper's rule:
            every row loses the same share); the others use one budget per layer.
        sparsity: fraction of weights to prune (``None`` for N:M, which fixes it at ``1 - n/m``); a float
            or a mapping layer name -> float (layers missing from the mapping are skipped and reported).
        calib: iterable of calibration batches (tensor / tuple of positional args / dict of kwargs),
            needed by taylor, wanda and sparsegpt. Must be re-iterable (list, DataLoader) for sequential
            SparseGPT. The model runs in eval mode on it; modes are restored afterwards.
        loss_fn: ``loss_fn(model, batch) -> scalar`` (taylor only).
        filter_fn: ``filter_fn(name, module) -> bool`` selects the layers; others are reported as skipped.
        progress: show progress bars.

    Returns:
        A :class:`PruningReport` with each pruned layer's achieved sparsity and every skipped layer's reason.

    Raises:
        TypeError: ``model`` is not a module, or arguments of the wrong type.
        ValueError: bad pattern / importance / sparsity, missing ``calib`` / ``loss_fn`` for the criterion,
            unknown layer names in a sparsity mapping, or an unsupported pattern / criterion combination.
        Any error from the model's forward on ``calib`` propagates; in every error case the model is
        left exactly as it was.
    """
    fn = "prune_weights()"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module, got {type(model).__name__}")
    pat = parse_pattern(pattern)
    crit = resolve_importance(importance)
    _validate_sparsity(fn, sparsity, pat)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"{fn}: expected filter_fn(name, module) -> bool, got {type(filter_fn).__name__}")
    if crit.needs_calibration:
        if calib is None:
            raise ValueError(f"{fn}: importance={crit.name!r} needs calib (an iterable of calibration batches)")
        if isinstance(crit, SparseGPT) and crit.sequential:
            _check_reiterable(fn, calib, "sequential SparseGPT (one calibration pass per layer)")
        elif isinstance(calib, (torch.Tensor, str, bytes)) or not isinstance(calib, Iterable):
            raise TypeError(
                f"{fn}: expected calib as an iterable of batches (wrap a single tensor in a list), "
                f"got {type(calib).__name__}"
            )
    if crit.needs_loss and not callable(loss_fn):
        raise ValueError(f"{fn}: importance={crit.name!r} needs loss_fn(model, batch) -> scalar, got {loss_fn!r}")
    if pat.kind == "global" and not isinstance(crit, (Magnitude, Taylor)):
        raise ValueError(
            f"{fn}: pattern 'global' compares scores across layers; expected importance 'magnitude' or 'taylor', "
            f"got {crit.name!r} (use 'unstructured' with a per-layer sparsity mapping instead)"
        )
    if pat.kind == "block" and isinstance(crit, SparseGPT):
        raise ValueError(f"{fn}: importance 'sparsegpt' supports 'n:m', 'unstructured' patterns, got {pat}")

    selected, skipped, all_names = _select_layers(model, pat, crit, filter_fn, sparsity)

    # ---- compute new weights and masks on copies -------------------------------------------------
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (new weight, keep mask), weight shape
    backups: dict[str, torch.Tensor] = {}
    try:
        if isinstance(crit, SparseGPT):
            results = _sparsegpt_all(model, selected, pat, sparsity, calib, crit, progress, backups, skipped)
        else:
            results = _score_based(model, selected, pat, sparsity, calib, loss_fn, crit, progress, skipped)
    except BaseException:
        with torch.no_grad():
            for name, saved in backups.items():
                selected[name].weight.copy_(saved)
        raise

    # ---- commit ---------------------------------------------------------------------------------
    layers = []
    for name, (new_weight, keep) in results.items():
        module = selected[name]
        with torch.no_grad():
            module.weight.copy_(new_weight)
        attach_mask(module, keep, pattern=str(pat), importance=crit.name)
        layers.append(
            LayerPruning(
                name,
                type(module).__name__,
                tuple(module.weight.shape),
                str(pat),
                crit.name,
                keep.numel(),
                int((~keep).sum()),
            )
        )
    order = {n: i for i, n in enumerate(all_names)}
    skipped.sort(key=lambda s: order.get(s.name, -1))
    return PruningReport(str(pat), crit.name, tuple(layers), tuple(skipped))


def _unsupported_reason(module: nn.Module) -> str | None:
    """Why a weight-bearing layer that ``prune_weights`` does not handle is left dense, or ``None`` for
    modules that are not such layers (embeddings, norms, containers...)."""
    weight = module._parameters.get("weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return None
    kind = type(module).__name__
    if kind == "Conv1D" and hasattr(module, "nf"):
        return (
            "transformers Conv1D (weight stored [in, out]) is not supported; only nn.Linear and nn.Conv2d "
            "are pruned (convert it to nn.Linear with weight.t() first)"
        )
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{kind} is not supported; only nn.Linear and nn.Conv2d are pruned"
    return None


def _select_layers(model, pat, crit, filter_fn, sparsity):
    """The eligible Linear / Conv2d layers, the skipped ones with reasons, and every candidate's name."""
    selected: dict[str, nn.Module] = {}
    skipped: list[SkippedLayer] = []
    owners: dict[int, str] = {}
    all_names = []
    candidates = []  # the Linear / Conv2d layers
    # Parameters held by other modules (e.g. a token embedding tied to an LM head): pruning a layer that
    # shares one would silently zero entries of that module too.
    foreign: dict[int, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            for p in module._parameters.values():
                if p is not None:
                    foreign.setdefault(id(p), f"{name!r} ({type(module).__name__})")
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            why = _unsupported_reason(module)
            if why is not None and (filter_fn is None or filter_fn(name, module)):
                # Listed so that a model made of such layers (GPT-2's Conv1D) is not pruned silently.
                all_names.append(name)
                skipped.append(SkippedLayer(name, type(module).__name__, why))
            continue
        all_names.append(name)
        candidates.append(name)
        kind = type(module).__name__
        if filter_fn is not None and not filter_fn(name, module):
            skipped.append(SkippedLayer(name, kind, "excluded by filter_fn"))
            continue
        reason = _eligibility(module, pat, crit)
        if reason is None and id(module.weight) in foreign:
            reason = (
                f"shares its weight with {foreign[id(module.weight)]}, which is not pruned; pruning it would zero "
                "entries there too (untie the weights to prune it)"
            )
        if reason is None and id(module.weight) in owners:
            reason = f"shares its weight with {owners[id(module.weight)]!r} (pruned there)"
        if reason is None and isinstance(sparsity, Mapping) and name not in sparsity:
            reason = "no entry in the per-layer sparsity mapping"
        if reason is not None:
            skipped.append(SkippedLayer(name, kind, reason))
            continue
        owners[id(module.weight)] = name
        selected[name] = module
    if isinstance(sparsity, Mapping):
        unknown = sorted(set(sparsity) - set(candidates))
        if unknown:
            raise ValueError(
                f"prune_weights(): sparsity mapping names layers that are not Linear/Conv2d in the model: {unknown}"
            )
    return selected, skipped, all_names


def _compute_scores(model, selected, crit, calib, loss_fn, progress, skipped) -> dict[str, torch.Tensor]:
    """Score matrices (GEMM view) of the selected layers; layers never called during calibration are
    moved from ``selected`` to ``skipped``."""
    stats = {}
    taylor = {}
    if isinstance(crit, Wanda) and selected:
        stats = collect_input_statistics(model, selected, calib, progress=progress)
    if isinstance(crit, Taylor) and selected:
        taylor = taylor_scores(model, {n: m.weight for n, m in selected.items()}, calib, loss_fn, progress=progress)
    scores = {}
    for name, module in list(selected.items()):
        matrix = weight_matrix(module.weight.detach())
        if isinstance(crit, Magnitude):
            scores[name] = magnitude_scores(matrix)
        elif isinstance(crit, Taylor):
            scores[name] = weight_matrix(taylor[name])
        else:
            if name not in stats:
                skipped.append(
                    SkippedLayer(name, type(module).__name__, "received no input during calibration (not called?)")
                )
                del selected[name]
                continue
            scores[name] = wanda_scores(matrix, stats[name].sq_norms)
    return scores


def _score_based(model, selected, pat, sparsity, calib, loss_fn, crit, progress, skipped):
    from tqdm.auto import tqdm

    scores = _compute_scores(model, selected, crit, calib, loss_fn, progress, skipped)
    if pat.kind == "global":
        masks = global_unstructured_masks(scores, sparsity) if scores else {}
    else:
        masks = {}
        for name in tqdm(list(scores), desc="masks", disable=not progress, leave=False):
            layer_sparsity = _layer_sparsity(name, sparsity)
            masks[name] = _scores_to_mask(scores[name], pat, layer_sparsity, row_budget=isinstance(crit, Wanda))
    results = {}
    for name, mask in masks.items():
        weight = selected[name].weight.detach()
        keep = matrix_to_weight(mask, weight.shape)
        results[name] = (weight * keep, keep)
    return results


def _sparsegpt_all(model, selected, pat, sparsity, calib, crit: SparseGPT, progress, backups, skipped):
    from tqdm.auto import tqdm

    n, m = (pat.n, pat.m) if pat.kind == "nm" else (0, 0)
    results = {}
    stats = {}
    if not crit.sequential and selected:
        stats = collect_input_statistics(model, selected, calib, hessian=True, dtype=crit.dtype, progress=progress)
    for name, module in tqdm(list(selected.items()), desc="sparsegpt", disable=not progress, leave=False):
        if crit.sequential:
            stats = collect_input_statistics(
                model, {name: module}, calib, hessian=True, dtype=crit.dtype, progress=False, stop_after=name
            )
        if name not in stats:
            skipped.append(SkippedLayer(name, type(module).__name__, "received no input during calibration (not called?)"))
            continue
        weight = module.weight.detach()
        layer_sparsity = None if m else _layer_sparsity(name, sparsity)
        new_matrix, keep_matrix = sparsegpt_prune(
            weight_matrix(weight),
            stats[name].hessian,
            n=n,
            m=m,
            sparsity=layer_sparsity,
            blocksize=crit.blocksize,
            damp=crit.damp,
            dtype=crit.dtype,
        )
        new_weight = matrix_to_weight(new_matrix, weight.shape).to(weight.device)
        keep = matrix_to_weight(keep_matrix, weight.shape).to(weight.device)
        results[name] = (new_weight, keep)
        if crit.sequential:
            # Later layers calibrate on this layer's pruned output; restored if anything fails.
            backups[name] = weight.clone()
            with torch.no_grad():
                module.weight.copy_(new_weight)
        del stats[name]
    return results
