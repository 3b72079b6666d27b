"""One-shot weight pruning of ``nn.Linear`` / ``nn.Conv2d`` layers: :func:`prune_weights` and its report.

Masks live on the model as described in :mod:`pruning.masks` (a ``weight_mask`` buffer per pruned layer).
The criterion is any :class:`pruning.importance.ImportanceCriterion`: a scoring one gives per-element scores
that become masks here; a reconstructing one (SparseGPT) returns each layer's new weight and mask.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .batches import check_batches, progress_bar
from .importance import (
    ImportanceCriterion,
    ReconstructingCriterion,
    ScoreCriterion,
    check_finite_scores,
    criterion_names,
    pattern_labels,
    resolve_importance,
)
from .masks import attach_mask
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
from .transaction import all_or_nothing

__all__ = [
    "prune_weights",
    "PruningReport",
    "LayerPruning",
    "SkippedLayer",
    "LayerSelection",
    "select_layers",
    "check_pattern_support",
    "layer_scores",
    "scores_to_mask",
]


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

    @classmethod
    def of(cls, name: str, module: nn.Module, keep: torch.Tensor, pattern: str, importance: str) -> "LayerPruning":
        """The record of ``module`` (named ``name``) pruned to the boolean ``keep`` mask."""
        return cls(name, type(module).__name__, tuple(keep.shape), str(pattern), str(importance), keep.numel(),
                   int((~keep).sum()))


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
# Layer selection and scores (shared with sensitivity analysis)
# ---------------------------------------------------------------------------------------------------


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


def check_pattern_support(fn: str, pat: Pattern, crit: ImportanceCriterion) -> None:
    """Raise ``ValueError`` (naming ``fn``) when ``crit`` does not support the pattern kind of ``pat``."""
    if pat.kind in crit.patterns:
        return
    if pat.kind == "global":
        raise ValueError(
            f"{fn}: pattern 'global' compares scores across layers; expected importance in "
            f"{criterion_names('weights', 'global')}, got {crit.name!r} (use 'unstructured' with a per-layer "
            "sparsity mapping instead)"
        )
    raise ValueError(f"{fn}: importance {crit.name!r} supports {pattern_labels(crit.patterns)} patterns, got {pat}")


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
    if crit.reads_layer_inputs and isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"{crit.name} needs im2col statistics; grouped convolutions (groups={module.groups}) are not supported"
    return None


def scores_to_mask(scores: torch.Tensor, pat: Pattern, sparsity: float | None, row_budget: bool) -> torch.Tensor:
    """The keep mask of one layer's GEMM-view ``scores`` under ``pat`` (``sparsity``: its budget, ``None``
    for N:M); ``row_budget``: an unstructured budget applies to each output row."""
    if pat.kind == "nm":
        return nm_mask(scores, pat.n, pat.m)
    if pat.kind == "block":
        return block_mask(scores, pat.block, sparsity)
    return unstructured_mask(scores, sparsity, dim=-1 if row_budget else None)


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


@dataclass
class LayerSelection:
    """The layers one pruning call works on.

    Attributes:
        selected: name -> Linear / Conv2d to prune, in module order.
        skipped: the candidates left dense, with the reason.
        order: every candidate's name in module order (to sort ``skipped``).
    """

    selected: dict[str, nn.Module] = field(default_factory=dict)
    skipped: list[SkippedLayer] = field(default_factory=list)
    order: list[str] = field(default_factory=list)

    def skip(self, name: str, reason: str) -> None:
        """Move a selected layer to ``skipped`` with ``reason``."""
        module = self.selected.pop(name)
        self.skipped.append(SkippedLayer(name, type(module).__name__, reason))

    def sorted_skipped(self) -> tuple[SkippedLayer, ...]:
        """``skipped`` in module order."""
        rank = {n: i for i, n in enumerate(self.order)}
        return tuple(sorted(self.skipped, key=lambda s: rank.get(s.name, -1)))


def select_layers(
    fn: str,
    model: nn.Module,
    pat: Pattern,
    crit: ImportanceCriterion,
    filter_fn: Callable[[str, nn.Module], bool] | None,
    sparsity,
) -> LayerSelection:
    """The eligible Linear / Conv2d layers of ``model`` for this pattern, criterion, filter and budget, and the
    candidates left dense with the reason (other weight layers such as ``nn.Conv1d`` are listed too).

    Raises:
        ValueError: a per-layer ``sparsity`` mapping names a layer that is not a Linear / Conv2d of the model.
    """
    sel = LayerSelection()
    owners: dict[int, str] = {}
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
        kind = type(module).__name__
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            why = _unsupported_reason(module)
            if why is not None and (filter_fn is None or filter_fn(name, module)):
                # Listed so that a model made of such layers (GPT-2's Conv1D) is not pruned silently.
                sel.order.append(name)
                sel.skipped.append(SkippedLayer(name, kind, why))
            continue
        sel.order.append(name)
        candidates.append(name)
        if filter_fn is not None and not filter_fn(name, module):
            sel.skipped.append(SkippedLayer(name, kind, "excluded by filter_fn"))
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
            sel.skipped.append(SkippedLayer(name, kind, reason))
            continue
        owners[id(module.weight)] = name
        sel.selected[name] = module
    if isinstance(sparsity, Mapping):
        unknown = sorted(set(sparsity) - set(candidates))
        if unknown:
            raise ValueError(f"{fn}: sparsity mapping names layers that are not Linear/Conv2d in the model: {unknown}")
    return sel


def _unscored_reason(crit: ImportanceCriterion) -> str:
    if crit.needs_calibration:
        return "received no input during calibration (not called?)"
    return f"importance {crit.name!r} gave it no scores"


def layer_scores(
    model: nn.Module,
    sel: LayerSelection,
    crit: ScoreCriterion,
    calib: Iterable | None,
    loss_fn: Callable | None,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """GEMM-view scores (:func:`pruning.patterns.weight_matrix`) of every selected layer, by layer name; a
    layer the criterion gives no scores (e.g. never called during calibration) is moved to ``sel.skipped``.

    Raises:
        ValueError: a layer's scores are not shaped like its weight, or hold NaN / inf (the error names it).
    """
    weights = {f"{name}.weight" if name else "weight": name for name in sel.selected}
    scores = crit.scores(model, list(weights), calib, loss_fn, progress=progress) if weights else {}
    out = {}
    for pname, name in weights.items():
        if pname in scores:
            score = scores[pname]
            shape = tuple(sel.selected[name].weight.shape)
            if not isinstance(score, torch.Tensor) or tuple(score.shape) != shape:
                got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
                raise ValueError(f"importance {crit.name!r}: expected scores of layer {name or '<model>'!r} shaped "
                                 f"like its weight {shape}, got {got}")
            check_finite_scores(crit.name, f"layer {name or '<model>'!r}", score)
            out[name] = weight_matrix(score)
        else:
            sel.skip(name, _unscored_reason(crit))
    return out


# ---------------------------------------------------------------------------------------------------
# prune_weights
# ---------------------------------------------------------------------------------------------------


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
        importance: a registered name (``"magnitude"``, ``"taylor"``, ``"wanda"``, ``"sparsegpt"``, or one
            added with :func:`pruning.importance.register_criterion`) or an
            :class:`pruning.importance.ImportanceCriterion` (e.g. ``SparseGPT(blocksize=64)``).
            With ``"unstructured"``, Wanda compares weights within each output row (its paper's rule:
            every row loses the same share); the others use one budget per layer.
        sparsity: fraction of weights to prune (``None`` for N:M, which fixes it at ``1 - n/m``); a float
            or a mapping layer name -> float (layers missing from the mapping are skipped and reported).
        calib: iterable of calibration batches (:mod:`pruning.batches`: a tensor, a dict of keyword inputs,
            or ``(inputs, targets)``, so a classification ``DataLoader`` works as it is), needed by taylor,
            wanda and sparsegpt. Must be re-iterable (list, DataLoader) for sequential SparseGPT. The model
            runs in eval mode on it; modes are restored afterwards.
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
    crit = resolve_importance(importance, use="weights")
    _validate_sparsity(fn, sparsity, pat)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"{fn}: expected filter_fn(name, module) -> bool, got {type(filter_fn).__name__}")
    if crit.needs_calibration:
        if calib is None:
            raise ValueError(f"{fn}: importance={crit.name!r} needs calib (an iterable of calibration batches)")
        reiterated_by = f"importance {crit.name!r} (more than one calibration pass)" if crit.reiterates_calib else None
        check_batches(fn, calib, reiterated_by=reiterated_by)
    if crit.needs_loss and not callable(loss_fn):
        raise ValueError(f"{fn}: importance={crit.name!r} needs loss_fn(model, batch) -> scalar, got {loss_fn!r}")
    check_pattern_support(fn, pat, crit)

    sel = select_layers(fn, model, pat, crit, filter_fn, sparsity)
    # The masks are computed first (the model is only read, except by a reconstructing criterion, which writes
    # the weights it reconstructs for a while), then every layer is committed: an error (or Ctrl-C) in either
    # phase leaves the model exactly as it was (pruning.transaction).
    reconstructing = isinstance(crit, ReconstructingCriterion)
    with all_or_nothing(model, tensors=[m.weight for m in sel.selected.values()] if reconstructing else ()):
        if reconstructing:
            budgets = {name: _layer_sparsity(name, sparsity) for name in sel.selected}
            results = crit.reconstruct(model, sel.selected, pat, budgets, calib, progress=progress)
            results = _checked_reconstruction(crit, sel, results)
        else:
            results = {name: (None, keep) for name, keep in
                       _masks(model, sel, pat, sparsity, calib, loss_fn, crit, progress).items()}
    layers = []
    with all_or_nothing(model, tensors=[sel.selected[name].weight for name in results]):
        for name, (new_weight, keep) in results.items():
            module = sel.selected[name]
            if new_weight is not None:
                with torch.no_grad():
                    module.weight.copy_(new_weight)
            attach_mask(module, keep, pattern=str(pat), importance=crit.name)
            layers.append(LayerPruning.of(name, module, keep, str(pat), crit.name))
    return PruningReport(str(pat), crit.name, tuple(layers), sel.sorted_skipped())


def _checked_reconstruction(crit: ReconstructingCriterion, sel: LayerSelection, results) -> dict:
    """``results`` of ``crit.reconstruct`` in module order, each checked before anything is committed; a
    selected layer it left out is moved to ``sel.skipped``."""
    if not isinstance(results, Mapping):
        raise TypeError(f"importance {crit.name!r}: expected reconstruct() to return a dict name -> (weight, mask), "
                        f"got {type(results).__name__}")
    unknown = sorted(set(results) - set(sel.selected), key=str)
    if unknown:
        raise ValueError(f"importance {crit.name!r}: reconstruct() returned layers that were not selected: {unknown}")
    checked = {}
    for name in list(sel.selected):
        if name not in results:
            sel.skip(name, _unscored_reason(crit))
            continue
        weight = sel.selected[name].weight
        entry = results[name]
        label = f"importance {crit.name!r}: layer {name or '<model>'!r}"
        if not (isinstance(entry, tuple) and len(entry) == 2 and all(isinstance(t, torch.Tensor) for t in entry)):
            raise TypeError(f"{label}: expected a (weight, mask) pair of tensors, got {type(entry).__name__}")
        new_weight, keep = entry
        if tuple(new_weight.shape) != tuple(weight.shape) or tuple(keep.shape) != tuple(weight.shape):
            raise ValueError(f"{label}: expected a weight and a mask of shape {tuple(weight.shape)}, got "
                             f"{tuple(new_weight.shape)} and {tuple(keep.shape)}")
        if keep.dtype != torch.bool:
            raise TypeError(f"{label}: expected a torch.bool mask, got {keep.dtype}")
        check_finite_scores(crit.name, f"layer {name or '<model>'!r} (its reconstructed weight)", new_weight)
        checked[name] = (new_weight * keep.to(new_weight.device), keep)
    return checked


def _masks(model, sel, pat, sparsity, calib, loss_fn, crit: ScoreCriterion, progress) -> dict[str, torch.Tensor]:
    """``name -> keep`` (shaped like the weight) of every selected layer scored by ``crit``."""
    scores = layer_scores(model, sel, crit, calib, loss_fn, progress)
    if pat.kind == "global":
        masks = global_unstructured_masks(scores, sparsity) if scores else {}
    else:
        masks = {
            name: scores_to_mask(scores[name], pat, _layer_sparsity(name, sparsity), crit.row_budget)
            for name in progress_bar(list(scores), desc="masks", enabled=progress)
        }
    return {name: matrix_to_weight(mask, sel.selected[name].weight.shape) for name, mask in masks.items()}
