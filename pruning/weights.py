"""One-shot weight pruning of ``nn.Linear`` / ``nn.Conv2d`` / Hugging Face ``Conv1D`` layers: :func:`prune_weights`
and its report.

Masks live on the model as described in :mod:`pruning.masks` (a ``weight_mask`` buffer per pruned layer).
The criterion is any :class:`pruning.importance.ImportanceCriterion`: a scoring one gives per-element scores
that become masks here; a reconstructing one (SparseGPT) returns each layer's new weight and mask.

Two routes: a model with a stack of repeated blocks (a language model's decoder layers) is pruned block by block
(:mod:`pruning.sequential`: time linear in depth, memory flat); any other model, or a criterion without a per-layer
rule that rewrites weights, on the whole model at once.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .batches import check_batches, progress_bar
from .blocks import NotAChain, resolve_block_stack
from .importance import (
    ImportanceCriterion,
    ReconstructingCriterion,
    ScoreCriterion,
    check_finite_scores,
    resolve_importance,
)
from .masks import attach_mask
from . import nm_criteria  # noqa: F401  (registers importance="ria" and "alps")
from .offload import UNDO_PLACES
from .patterns import (
    Pattern,
    global_unstructured_masks,
    in_column_order,
    input_column_order,
    is_conv1d,
    matrix_to_weight,
    parse_pattern,
    scores_to_mask,
    weight_matrix,
)
from .selection import (
    LayerSelection,
    SkippedLayer,
    check_pattern_support,
    layer_sparsity,
    output_head,
    select_layers,
    validate_sparsity,
)
from .sequential import SequentialConfig, prune_sequentially
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
    "output_head",
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
class PruningReport:
    """What :func:`prune_weights` (or :func:`pruning.apply_plan`) did: every pruned layer and every skipped one, and
    the ``route`` ``prune_weights`` took (block-sequential, layer by layer, or the whole model at once, and why)."""

    pattern: str
    importance: str
    layers: tuple[LayerPruning, ...]
    skipped: tuple[SkippedLayer, ...]
    route: str = ""

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
            "route": self.route,
        }

    def __str__(self) -> str:
        lines = [
            f"PruningReport: pattern={self.pattern}, importance={self.importance}, {len(self.layers)} layer(s) pruned "
            f"(overall sparsity {self.overall_sparsity:.4f}), {len(self.skipped)} skipped"
            + (f"; {self.route}" if self.route else "")
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
            module = sel.selected[name]
            shape = tuple(module.weight.shape)
            if not isinstance(score, torch.Tensor) or tuple(score.shape) != shape:
                got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
                raise ValueError(f"importance {crit.name!r}: expected scores of layer {name or '<model>'!r} shaped "
                                 f"like its weight {shape}, got {got}")
            check_finite_scores(crit.name, f"layer {name or '<model>'!r}", score)
            out[name] = weight_matrix(score, transposed=is_conv1d(module))
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
    blocks="auto",
    prune_head: bool = False,
    device: torch.device | str | None = None,
    offload: bool = False,
    undo: str | os.PathLike = "disk",
    progress: bool = True,
) -> PruningReport:
    """Attach masks to every selected ``nn.Linear`` / ``nn.Conv2d`` / Hugging Face ``Conv1D`` of ``model`` and zero
    the pruned weights.

    Args:
        model: any ``nn.Module``; its Linear / Conv2d / ``Conv1D`` layers (including ``model`` itself) are
            candidates. It may be dispatched by Accelerate (``device_map``, CPU or disk offload).
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
            runs in eval mode on it; modes are restored afterwards. Padded positions (a dict batch's 2-D
            ``attention_mask`` == 0) are left out of every statistic.
        loss_fn: ``loss_fn(model, batch) -> scalar`` (taylor only).
        filter_fn: ``filter_fn(name, module) -> bool`` selects the layers; others are reported as skipped.
        blocks: the stack of repeated blocks to prune one block at a time (:mod:`pruning.sequential`):
            ``"auto"`` finds it (the ``nn.ModuleList`` of same-class modules that holds the most selected layers;
            a model whose forward does not run it as a chain of blocks is then pruned whole, and the report's
            ``route`` says why), a qualified name (``"model.layers"``) or the list of blocks (an error if
            it is not a chain), or ``None``: prune on the whole model at once.
        prune_head: also prune the model's output head (``get_output_embeddings()``); by default it is left
            dense and reported.
        device: block-sequential only: where each block computes; it is moved there for its passes and back
            (a model on the CPU pruned with one block at a time on a GPU). ``None``: where its weights are.
        offload: block-sequential only: keep the captured activations on the CPU between passes.
        undo: block-sequential only: where the weights to put back on failure are kept while the layers are
            committed block by block: ``"disk"`` (a temporary folder: memory stays flat), ``"memory"``, or a
            folder to make the temporary folder in.
        progress: show progress bars.

    Returns:
        A :class:`PruningReport` with each pruned layer's achieved sparsity, every skipped layer's reason and the
        route taken.

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
    validate_sparsity(fn, sparsity, pat)
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
    config = _sequential_config(fn, device, offload, undo, prune_head)

    sel = select_layers(fn, model, pat, crit, filter_fn, sparsity, conv1d=True, keep_head_dense=not prune_head)
    stack = resolve_block_stack(fn, model, blocks, sel.selected) if sel.selected else None
    route, why = _route(crit, pat, stack)
    if route == "blocks":
        report = _prune_by_blocks(fn, model, sel, pat, crit, sparsity, calib, loss_fn, stack, config,
                                  explicit=not isinstance(blocks, str) or blocks != "auto", progress=progress)
        if report is not None:
            return report
        route, why = "whole", f"{stack.label!r} is not run as a chain of blocks"
    if config.device is not None or config.offload:
        raise ValueError(f"{fn}: device= and offload= apply to block-sequential pruning; expected neither, since this "
                         f"call prunes the whole model at once ({why})")
    _refuse_offloaded(fn, sel, f"pruning the whole model at once ({why})")
    return _prune_whole(model, sel, pat, crit, sparsity, calib, loss_fn, f"whole model ({why})", progress)


def _sequential_config(fn: str, device, offload, undo, prune_head) -> SequentialConfig:
    if device is not None:
        try:
            device = torch.device(device)
        except (TypeError, RuntimeError) as e:
            raise TypeError(f"{fn}: expected device= as a torch.device or a device string, got {device!r}") from e
    for label, flag in (("offload", offload), ("prune_head", prune_head)):
        if not isinstance(flag, bool):
            raise TypeError(f"{fn}: expected {label}= as a bool, got {type(flag).__name__}")
    if not (isinstance(undo, str) and undo in UNDO_PLACES) and not (
            isinstance(undo, (str, os.PathLike)) and os.path.isdir(undo)):
        raise ValueError(f"{fn}: expected undo= as 'disk', 'memory' or an existing folder, got {undo!r}")
    return SequentialConfig(device=device, offload=offload, undo=undo)


def _refuse_offloaded(fn: str, sel: LayerSelection, what: str) -> None:
    """Scores and reconstructions over the whole model read ``module.weight`` itself: refuse offloaded layers."""
    offloaded = [n for n, m in sel.selected.items() if m.weight.device.type == "meta"]
    if offloaded:
        raise ValueError(f"{fn}: expected weights with values for {what}, got offloaded (meta) weights in "
                         f"{offloaded[:3]}; only a criterion with a per-layer rule (magnitude, wanda, sparsegpt) on a "
                         "model with a stack of blocks reads them where they are")


def _route(crit: ImportanceCriterion, pat: Pattern, stack) -> tuple[str, str]:
    """``("blocks" | "whole", why)``: where this call prunes."""
    if stack is None:
        return "whole", "no stack of blocks"
    if crit.layer_inputs is None and isinstance(crit, ReconstructingCriterion):
        return "whole", f"importance {crit.name!r} has no per-layer rule"
    return "blocks", ""


def _prune_by_blocks(fn, model, sel, pat, crit, sparsity, calib, loss_fn, stack, config, *, explicit,
                     progress) -> PruningReport | None:
    """Block-sequential pruning (:mod:`pruning.sequential`); ``None`` when an auto-detected stack turns out not to
    be a chain (nothing changed: the caller prunes the whole model instead)."""
    masks = None
    if crit.layer_inputs is None or pat.kind == "global":
        # Scores that need the whole model (Taylor's loss gradient) or compare across layers: chosen once, then
        # committed layer by layer.
        _refuse_offloaded(fn, sel, f"scores of importance {crit.name!r} over the whole model")
        masks = _masks(model, sel, pat, sparsity, calib, loss_fn, crit, progress)
    elif crit.needs_calibration and any(stack.index_of(n) is None for n in sel.selected):
        check_batches(fn, calib, reiterated_by="pruning the selected layers outside the stack of blocks (whole-model "
                                               "passes after the block inputs are captured)")
    budgets = {name: layer_sparsity(name, sparsity) for name in sel.selected}
    try:
        result = prune_sequentially(model, sel.selected, crit, pat, budgets, calib, stack, masks=masks,
                                    config=config, progress=progress)
    except NotAChain as e:
        if explicit:
            raise ValueError(f"{fn}: blocks={stack.label!r} cannot be pruned one block at a time: {e}") from e
        return None
    for name in result.unscored:
        sel.skip(name, _unscored_reason(crit))
    layers = []
    for name, module in sel.selected.items():
        numel, pruned = result.pruned[name]
        layers.append(LayerPruning(name, type(module).__name__, tuple(module.weight.shape), str(pat), crit.name, numel,
                                   pruned))
    return PruningReport(str(pat), crit.name, tuple(layers), sel.sorted_skipped(), result.description)


def _prune_whole(model, sel, pat, crit, sparsity, calib, loss_fn, route, progress) -> PruningReport:
    """The whole model at once: masks computed while the model is only read, then committed."""
    # (A reconstructing criterion writes the weights it reconstructs for a while.) An error (or Ctrl-C) in either
    # phase leaves the model exactly as it was (pruning.transaction).
    reconstructing = isinstance(crit, ReconstructingCriterion)
    with all_or_nothing(model, tensors=[m.weight for m in sel.selected.values()] if reconstructing else ()):
        if reconstructing:
            budgets = {name: layer_sparsity(name, sparsity) for name in sel.selected}
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
    return PruningReport(str(pat), crit.name, tuple(layers), sel.sorted_skipped(), route)


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
            name: in_column_order(lambda s: scores_to_mask(s, pat, layer_sparsity(name, sparsity), crit.row_budget),
                                  scores[name], input_column_order(sel.selected[name], pat))
            for name in progress_bar(list(scores), desc="masks", enabled=progress)
        }
    return {name: matrix_to_weight(mask, sel.selected[name]) for name, mask in masks.items()}
