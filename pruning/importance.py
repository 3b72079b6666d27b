"""Importance criteria behind one protocol, shared by weight pruning and channel pruning, and their registry.

============  ===========================================================  ===================  ===========
criterion     score                                                        needs                pruning
============  ===========================================================  ===================  ===========
magnitude     ``|w|``; per channel the L1 norm of its slice (name ``l1``,  nothing              weights,
              or ``l2``: ``Magnitude(norm=2)``, the L2 norm)                                    channels
taylor        ``sum_b |w * dL_b/dw|`` per weight; per channel              ``calib``, a loss    weights,
              ``sum_b |sum_slice w * dL_b/dw|``                                                  channels
wanda         ``|w_ij| * ||x_j||_2`` (``x_j``: input feature ``j`` over    ``calib``            weights,
              all calibration tokens / pixels); compared within each                            channels
              output row (unstructured) or each group of ``m`` (N:M)
bn_scale      ``|gamma|`` of normalisation scales; channels without one    nothing              channels
              fall back to ``l1``
sparsegpt     OBS: mask chosen by ``w_ij^2 / [H^-1]_jj^2`` and the          ``calib``            weights
              remaining weights updated to reconstruct the layer output,
              ``H = X^T X``
============  ===========================================================  ===================  ===========

The protocol
------------
:class:`ImportanceCriterion` declares what a criterion needs (calibration batches, a loss) and where it
applies (which weight patterns, weight and / or channel pruning). Two kinds implement it:

* a :class:`ScoreCriterion` produces per-element scores shaped like each parameter (:meth:`~ScoreCriterion.scores`);
  weight pruning turns them into masks, channel pruning reduces them over every channel's slice
  (:meth:`~ScoreCriterion.channel_scores`; Taylor overrides it to reduce each batch before summing);
* a :class:`ReconstructingCriterion` chooses the masks itself and rewrites the kept weights
  (:meth:`~ReconstructingCriterion.reconstruct`; SparseGPT).

One layer at a time: a criterion that can prune a layer from that layer's own input statistics declares which
(``layer_inputs``: ``"none"``, ``"norms"``, ``"hessian"``) and implements :meth:`~ImportanceCriterion.prune_layer`;
the block-sequential pipeline (:mod:`pruning.sequential`) then runs it block by block on a language model.

Names resolve through one registry: :func:`register_criterion` adds a criterion that ``prune_weights``,
``prune_channels`` and ``sensitivity_analysis`` then accept by name. Calibration batches follow
:mod:`pruning.batches`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .batches import progress_bar
from .calibration import accumulate_taylor, collect_input_statistics, taylor_scores
from .patterns import (
    Pattern,
    in_column_order,
    input_column_order,
    is_conv1d,
    matrix_to_weight,
    scores_to_mask,
    weight_matrix,
)
from .registry import Registration, Registry
from .sparsegpt import sparsegpt_prune

__all__ = [
    "ImportanceCriterion",
    "ScoreCriterion",
    "ReconstructingCriterion",
    "Magnitude",
    "Taylor",
    "Wanda",
    "BNScale",
    "SparseGPT",
    "register_criterion",
    "resolve_importance",
    "criterion_names",
    "NORM_LAYERS",
    "is_norm_scale",
    "pattern_labels",
    "magnitude_scores",
    "wanda_scores",
    "check_finite_scores",
    "prune_layer_in_order",
]

# Layers whose ``weight`` is a per-channel scale (network slimming's gamma).
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)

# How error messages name each pattern kind.
_PATTERN_LABELS = {"nm": "'n:m'", "unstructured": "'unstructured'", "global": "'global'", "block": "'block<R>x<C>'"}


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer ``name`` (a qualified name such as ``"layer1.0.conv1.weight"``) of ``model``."""
    mod_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(mod_name), attr)


def _rows(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """``scores`` as float64 rows, one per index of ``dim`` (the slice of that channel), on the CPU."""
    return scores.detach().to("cpu", torch.float64).movedim(dim, 0).reshape(scores.shape[dim], -1)


def check_finite_scores(criterion: str, what: str, scores: torch.Tensor) -> None:
    """Refuse scores that hold NaN or inf: ranking them would give an arbitrary mask.

    Args:
        criterion: the criterion's name; what: the layer or parameter, as the message names it.
        scores: any real tensor.

    Raises:
        ValueError: ``scores`` holds NaN or inf (the message counts them and names ``what``).
    """
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"importance {criterion!r}: {what} has {bad} NaN/inf score(s) of {scores.numel()}; its "
                         "weights or the calibration data (inputs, loss) hold NaN or inf, so no mask can be chosen")


def is_norm_scale(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` is the ``weight`` (scale) of a normalisation layer of ``model``."""
    mod_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(mod_name)
    except AttributeError:
        return False
    return attr == "weight" and isinstance(module, NORM_LAYERS)


# ---------------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportanceCriterion:
    """What every criterion declares. Subclass :class:`ScoreCriterion` or :class:`ReconstructingCriterion`.

    Class attributes:
        name: the name reports record.
        needs_calibration: needs ``calib`` batches.
        needs_loss: needs ``loss_fn(model, batch) -> scalar`` (``prune_channels`` falls back to
            :func:`pruning.batches.default_loss`; ``prune_weights`` requires one).
        patterns: the weight-pruning pattern kinds it supports (``"nm"``, ``"unstructured"``, ``"global"``,
            ``"block"``); ``"global"`` means its scores compare across layers.
        reads_layer_inputs: scores from im2col statistics of each layer's input (grouped convolutions are
            then left dense).
        row_budget: with ``"unstructured"``, every output row loses the same share.
        reiterates_calib: runs more than one pass over ``calib`` (which must then be re-iterable).
        weight_pruning, channel_pruning: where it can be used.
        layer_inputs: what :meth:`prune_layer` needs of a layer's input to prune that layer alone: ``"none"`` (its
            weight only), ``"norms"`` (``sum x^2`` per column), ``"hessian"`` (``X^T X`` and the norms), or ``None``:
            no per-layer rule (the criterion's scores come from the whole model, e.g. Taylor's loss gradient).
        true_sequential: each group of layers of a block that share an input is calibrated on the output of the
            groups before it, already pruned (else every group of a block from the block's input at once).
    """

    name = "base"
    needs_calibration = False
    needs_loss = False
    patterns = ("nm", "unstructured", "global", "block")
    reads_layer_inputs = False
    row_budget = False
    reiterates_calib = False
    weight_pruning = True
    channel_pruning = True
    layer_inputs = None
    true_sequential = False

    def prune_layer(self, matrix: torch.Tensor, stats, pattern: Pattern,
                    sparsity: float | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Prune one layer by itself (criteria with ``layer_inputs``).

        Args:
            matrix: the GEMM-view weight ``[out, cols]`` (:func:`pruning.patterns.weight_matrix`); not modified.
            stats: the layer's :class:`pruning.calibration.InputStatistics` (``None`` when ``layer_inputs == "none"``).
            pattern: an ``"nm"``, ``"unstructured"`` or ``"block"`` pattern; sparsity: its budget (``None`` for N:M).

        Returns:
            ``(new_matrix, keep)``: the rewritten GEMM-view weight (``None`` when the kept weights are kept as they
            are) and the ``torch.bool`` keep mask, both ``[out, cols]``.
        """
        raise NotImplementedError(f"{type(self).__name__} has no per-layer rule (layer_inputs is None)")


@dataclass(frozen=True)
class ScoreCriterion(ImportanceCriterion):
    """A criterion that scores every element of a parameter (higher = more important).

    Subclasses implement :meth:`scores`; channel pruning sums the scores over each channel's slice
    (:meth:`reduce_slices`, which a subclass may override, or :meth:`channel_scores` as a whole).

    Class attributes:
        channel_voters: which attached parameters vote on a channel's importance: ``"weight"`` (conv /
            linear weights, >= 2-D) and / or ``"norm_scale"`` (normalisation scales).
        channel_fallback: the criterion that scores channels none of the voters reach (``None``: such
            channels get no score and are removed first).
    """

    channel_voters = ("weight",)
    channel_fallback = None

    def scores(
        self,
        model: nn.Module,
        names: Sequence[str],
        calib: Iterable | None = None,
        loss_fn: Callable | None = None,
        *,
        progress: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Per-element scores of the parameters ``names`` (qualified names in ``model``).

        Returns:
            name -> real tensor shaped like the parameter (any float dtype, any device). A parameter the
            criterion cannot score (e.g. a layer the model never called during calibration) is absent.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement scores()")

    def reduce_slices(self, scores: torch.Tensor, dim: int) -> torch.Tensor:
        """One score per index of ``dim`` from a parameter's element scores: float64 ``[size(dim)]`` on the
        CPU. Default: the sum over the slice."""
        return _rows(scores, dim).sum(1)

    def channel_scores(
        self,
        model: nn.Module,
        slices: Mapping[str, Sequence[int]],
        calib: Iterable | None = None,
        loss_fn: Callable | None = None,
        *,
        progress: bool = True,
    ) -> dict[tuple[str, int], torch.Tensor]:
        """Per-channel scores: for every parameter name and each of its channel dims in ``slices``, one
        float64 score per index (``[size(dim)]``, CPU). Parameters :meth:`scores` leaves out are absent."""
        elements = self.scores(model, list(slices), calib, loss_fn, progress=progress)
        return {(n, d): self.reduce_slices(elements[n], d) for n, dims in slices.items() if n in elements for d in dims}


@dataclass(frozen=True)
class ReconstructingCriterion(ImportanceCriterion):
    """A criterion that chooses each layer's mask itself and rewrites the kept weights (it has no scores of
    its own, so it serves neither channel pruning nor sensitivity analysis)."""

    patterns = ("nm", "unstructured")
    channel_pruning = False

    def reconstruct(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        pattern: Pattern,
        sparsity: Mapping[str, float | None],
        calib: Iterable,
        *,
        progress: bool = True,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """New weights and keep masks of the Linear / Conv2d ``layers`` (name -> module of ``model``).

        Args:
            pattern: an ``"nm"`` or ``"unstructured"`` :class:`pruning.patterns.Pattern`.
            sparsity: layer name -> its unstructured budget (``None`` for N:M).

        Returns:
            name -> ``(new weight, keep mask)``, both shaped like the weight. A layer the model never called
            is absent. The model's weights are as they were on return, and on error.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement reconstruct()")


def prune_layer_in_order(crit: ImportanceCriterion, module: nn.Module, matrix: torch.Tensor, stats,
                         pattern: Pattern, sparsity: float | None):
    """``crit.prune_layer(matrix, stats, pattern, sparsity)`` for ``module``, in the column order its N:M groups
    are formed in: a layer carrying an ``input_perm`` (:func:`pruning.patterns.input_column_order`) is pruned with
    its columns, Wanda norms and Hessian permuted, so the mask is N:M in the order the sparse runtime stores it;
    the weight and mask come back in the natural order."""
    order = input_column_order(module, pattern)
    if order is None:
        return crit.prune_layer(matrix, stats, pattern, sparsity)

    def solve(mat, sq_norms, hessian):
        moved = None if stats is None else dataclasses.replace(stats, sq_norms=sq_norms, hessian=hessian)
        return crit.prune_layer(mat, moved, pattern, sparsity)

    return in_column_order(solve, matrix, order, getattr(stats, "sq_norms", None), getattr(stats, "hessian", None))


# ---------------------------------------------------------------------------------------------------
# Scoring criteria
# ---------------------------------------------------------------------------------------------------


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``|weight|`` (any shape), in float32 or the weight's own wider float dtype."""
    return weight.detach().abs().to(torch.promote_types(weight.dtype, torch.float32))


def wanda_scores(matrix: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda scores ``|W| * ||x||_2`` for a GEMM-view weight ``[out, cols]`` and per-column ``sum x^2`` ``[cols]``.

    Raises:
        ValueError: ``sq_norms`` does not have ``cols`` entries.
    """
    if sq_norms.shape != (matrix.shape[1],):
        raise ValueError(f"wanda_scores(): expected sq_norms of shape ({matrix.shape[1]},), got {tuple(sq_norms.shape)}")
    return matrix.detach().abs().to(torch.float64) * sq_norms.to(torch.float64).clamp_min(0).sqrt().unsqueeze(0)


@dataclass(frozen=True)
class Magnitude(ScoreCriterion):
    """``|w|``. Needs no data. Per channel the L1 norm of its slice (``norm=1``) or the L2 norm (``norm=2``)."""

    norm: int = 1
    layer_inputs = "none"

    def __post_init__(self):
        if self.norm not in (1, 2) or isinstance(self.norm, bool):
            raise ValueError(f"Magnitude: expected norm 1 or 2, got {self.norm!r}")

    @property
    def name(self) -> str:
        return "magnitude" if self.norm == 1 else "l2"

    def scores(self, model, names, calib=None, loss_fn=None, *, progress=True):
        return {n: magnitude_scores(_tensor(model, n)) for n in names}

    def reduce_slices(self, scores, dim):
        rows = _rows(scores, dim)
        return rows.sum(1) if self.norm == 1 else rows.square().sum(1).sqrt()

    def prune_layer(self, matrix, stats, pattern, sparsity):
        return None, scores_to_mask(magnitude_scores(matrix), pattern, sparsity, self.row_budget)


@dataclass(frozen=True)
class Taylor(ScoreCriterion):
    """First-order Taylor sensitivity ``|w * dL/dw|`` accumulated over calibration batches.

    Needs ``calib`` and ``loss_fn(model, batch) -> scalar``. Gradients are taken with
    ``torch.autograd.grad`` (:func:`pruning.calibration.accumulate_taylor`), so the parameters' ``.grad``
    fields are left untouched. Per channel, every normalisation scale votes too.
    """

    name = "taylor"
    needs_calibration = True
    needs_loss = True
    channel_voters = ("weight", "norm_scale")

    def scores(self, model, names, calib=None, loss_fn=None, *, progress=True):
        return taylor_scores(model, {n: _tensor(model, n) for n in names}, calib, loss_fn, progress=progress)

    def channel_scores(self, model, slices, calib=None, loss_fn=None, *, progress=True):
        """Per channel ``sum_b |sum_slice w * dL_b/dw|``: within one batch the signed products of a channel's
        slice are summed before the absolute value (what removing the whole channel changes to first order)."""
        tensors = {n: _tensor(model, n) for n in slices}
        out = {(n, d): torch.zeros(tensors[n].shape[d], dtype=torch.float64)
               for n, dims in slices.items() for d in dims}

        def add(name: str, product: torch.Tensor) -> None:
            for d in slices[name]:
                out[(name, d)] += _rows(product, d).sum(1).abs()

        accumulate_taylor(model, tensors, calib, loss_fn, add, fn="importance 'taylor'", progress=progress)
        return out


@dataclass(frozen=True)
class Wanda(ScoreCriterion):
    """Activation-aware ``|w| * ||x||_2`` (Sun et al., 2023). Needs ``calib``.

    Scores the weights of ``nn.Linear`` and ungrouped ``nn.Conv2d`` layers the model calls on ``calib``.
    """

    name = "wanda"
    needs_calibration = True
    patterns = ("nm", "unstructured", "block")
    reads_layer_inputs = True
    row_budget = True
    layer_inputs = "norms"

    def prune_layer(self, matrix, stats, pattern, sparsity):
        return None, scores_to_mask(wanda_scores(matrix, stats.sq_norms), pattern, sparsity, self.row_budget)

    def scores(self, model, names, calib=None, loss_fn=None, *, progress=True):
        layers = {}
        for n in names:
            mod_name, _, attr = n.rpartition(".")
            module = model.get_submodule(mod_name)
            layer = isinstance(module, (nn.Linear, nn.Conv2d)) or is_conv1d(module)
            if attr == "weight" and layer and getattr(module, "groups", 1) == 1:
                layers[n] = module
        # statistics are keyed by layer name, so a refusal (non-finite inputs) names the layer
        by_layer = {n.rpartition(".")[0]: m for n, m in layers.items()}
        stats = collect_input_statistics(model, by_layer, calib, progress=progress) if layers else {}
        return {
            n: matrix_to_weight(wanda_scores(weight_matrix(m).detach(), stats[layer].sq_norms), m)
            for n, m in layers.items()
            if (layer := n.rpartition(".")[0]) in stats
        }


@dataclass(frozen=True)
class BNScale(ScoreCriterion):
    """Network slimming (Liu et al., 2017): a channel is as important as ``|gamma|``, the scale of the
    normalisation layer after it. Channel pruning only; channels without such a scale fall back to the L1
    norm of their weights. Train with :func:`pruning.channels.bn_scale_penalty` first."""

    name = "bn_scale"
    weight_pruning = False
    channel_voters = ("norm_scale",)
    channel_fallback = Magnitude()

    def scores(self, model, names, calib=None, loss_fn=None, *, progress=True):
        return {n: _tensor(model, n).detach().abs().double() for n in names if is_norm_scale(model, n)}


# ---------------------------------------------------------------------------------------------------
# SparseGPT
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseGPT(ReconstructingCriterion):
    """Second-order pruning with weight reconstruction (Frantar & Alistarh, 2023). Needs ``calib``.

    Attributes:
        blocksize: columns processed per lazy-update block (rounded down to a multiple of ``m`` for N:M).
        damp: dampening added to the Hessian diagonal, as a fraction of its mean diagonal.
        dtype: precision of the Hessian and the OBS updates (``torch.float32``, the reference's, or
            ``torch.float64``, which doubles the memory of the Hessian and of the solve; on the scaling benchmark's
            8-layer Llama it did not lower the logits error, docs/pruning.md "Language models").
        sequential: prune layers one after another, collecting each layer's Hessian with the earlier
            layers already pruned (one Hessian in memory at a time). On a model with a stack of blocks
            (:mod:`pruning.sequential`) that is the true-sequential order inside each block: one pass per group
            of layers that share an input. ``False``: on a stack, every layer of a block from the block's input
            (the reference implementation's order, one calibrating pass per block); on a model without one, a
            single pass and every Hessian from the dense model.
    """

    name = "sparsegpt"
    needs_calibration = True
    reads_layer_inputs = True
    # The paper's defaults (Frantar & Alistarh 2023, sec. 3.3 / 4); blocksize only trades speed for
    # memory of the lazy updates, damp only matters for ill-conditioned Hessians.
    blocksize: int = 128
    damp: float = 0.01
    dtype: torch.dtype = torch.float32
    sequential: bool = True
    layer_inputs = "hessian"

    def __post_init__(self):
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"SparseGPT: expected blocksize >= 1, got {self.blocksize!r}")
        if not isinstance(self.damp, (int, float)) or not 0.0 < self.damp < 10.0 or math.isnan(self.damp):
            raise ValueError(f"SparseGPT: expected 0 < damp < 10, got {self.damp!r}")
        if self.dtype not in (torch.float64, torch.float32):
            raise ValueError(f"SparseGPT: expected dtype torch.float64 or torch.float32, got {self.dtype}")

    @property
    def reiterates_calib(self) -> bool:
        """Sequential mode runs one calibration pass per layer, so ``calib`` must be re-iterable."""
        return self.sequential

    @property
    def true_sequential(self) -> bool:
        return self.sequential

    def prune_layer(self, matrix, stats, pattern, sparsity):
        n, m = (pattern.n, pattern.m) if pattern.kind == "nm" else (0, 0)
        return sparsegpt_prune(matrix, stats.hessian, n=n, m=m, sparsity=None if m else sparsity,
                               blocksize=self.blocksize, damp=self.damp, dtype=self.dtype)

    def reconstruct(self, model, layers, pattern, sparsity, calib, *, progress=True):
        n, m = (pattern.n, pattern.m) if pattern.kind == "nm" else (0, 0)
        results = {}
        stats = {}
        originals: dict[str, torch.Tensor] = {}
        if not self.sequential and layers:
            stats = collect_input_statistics(model, layers, calib, hessian=True, dtype=self.dtype, progress=progress)
        try:
            for name, module in progress_bar(list(layers.items()), desc="sparsegpt", enabled=progress):
                if self.sequential:
                    stats = collect_input_statistics(
                        model, {name: module}, calib, hessian=True, dtype=self.dtype, progress=False, stop_after=name
                    )
                if name not in stats:
                    continue
                weight = module.weight.detach()
                new_matrix, keep_matrix = prune_layer_in_order(self, module, weight_matrix(module).detach(),
                                                               stats.pop(name), pattern, None if m else sparsity[name])
                new_weight = matrix_to_weight(new_matrix, module).to(weight.device)
                results[name] = (new_weight, matrix_to_weight(keep_matrix, module).to(weight.device))
                if self.sequential:
                    # Later layers calibrate on this layer's pruned output.
                    originals[name] = weight.clone()
                    with torch.no_grad():
                        module.weight.copy_(new_weight)
        finally:
            with torch.no_grad():
                for name, saved in originals.items():
                    layers[name].weight.copy_(saved)
        return results


# ---------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------

_CRITERIA = Registry()


def register_criterion(name: str, factory: Callable[[], ImportanceCriterion]) -> Registration:
    """Make ``importance=name`` resolve to ``factory()`` in ``prune_weights``, ``prune_channels`` and
    ``sensitivity_analysis``.

    Args:
        name: case-insensitive; an existing name is replaced until the registration is removed.
        factory: a zero-argument callable (e.g. the criterion class) returning an :class:`ImportanceCriterion`.

    Returns:
        A :class:`pruning.registry.Registration`; ``.remove()`` (or leaving its ``with`` block) undoes it.

    Raises:
        TypeError: an empty or non-string name, or a factory that is not callable.
    """
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"register_criterion(): expected a non-empty string name, got {name!r}")
    if not callable(factory):
        raise TypeError(f"register_criterion(): expected a callable factory, got {type(factory).__name__}")
    return _CRITERIA.register(name.strip().lower(), factory)


def _usable(crit: ImportanceCriterion, use: str) -> bool:
    return crit.weight_pruning if use == "weights" else crit.channel_pruning


def criterion_names(use: str, pattern: str | None = None) -> list[str]:
    """The registered names usable for ``use`` (``"weights"`` or ``"channels"``) pruning, and, if given, with
    the weight pattern kind ``pattern``."""
    names = []
    for key in _CRITERIA.keys():
        crit = _CRITERIA.get(key)()
        if _usable(crit, use) and (pattern is None or pattern in crit.patterns):
            names.append(key)
    return names


def resolve_importance(importance, *, use: str = "weights") -> ImportanceCriterion:
    """A criterion instance from a registered name (case-insensitive), a criterion class or an instance.

    Args:
        importance: e.g. ``"magnitude"``, ``"taylor"``, ``Wanda``, ``SparseGPT(blocksize=64)``.
        use: ``"weights"`` or ``"channels"``: the pruning it is for.

    Raises:
        TypeError: neither a string nor an :class:`ImportanceCriterion` (class or instance).
        ValueError: unknown name, or a criterion that does not serve ``use``.
    """
    if use not in ("weights", "channels"):
        raise ValueError(f"resolve_importance(): expected use 'weights' or 'channels', got {use!r}")
    if isinstance(importance, type) and issubclass(importance, ImportanceCriterion):
        importance = importance()
    if isinstance(importance, ImportanceCriterion):
        crit = importance
    elif isinstance(importance, str):
        factory = _CRITERIA.get(importance.strip().lower())
        if factory is None:
            raise ValueError(f"importance: expected one of {criterion_names(use)}, got {importance!r}")
        crit = factory()
        if not isinstance(crit, ImportanceCriterion):
            raise TypeError(f"importance: the factory registered as {importance!r} returned a "
                            f"{type(crit).__name__}, not an ImportanceCriterion")
    else:
        raise TypeError(
            f"importance: expected one of {criterion_names(use)} or an ImportanceCriterion, "
            f"got {type(importance).__name__}"
        )
    if not _usable(crit, use):
        raise ValueError(
            f"importance: {crit.name!r} does not serve {use[:-1]} pruning; expected one of {criterion_names(use)}"
        )
    return crit


def pattern_labels(kinds: Iterable[str]) -> str:
    """``"'n:m', 'unstructured'"``: how messages list pattern kinds."""
    return ", ".join(_PATTERN_LABELS[k] for k in kinds)


for _name, _factory in (
    ("magnitude", Magnitude),
    ("l1", Magnitude),
    ("l2", functools.partial(Magnitude, norm=2)),
    ("taylor", Taylor),
    ("wanda", Wanda),
    ("bn_scale", BNScale),
    ("sparsegpt", SparseGPT),
):
    register_criterion(_name, _factory)
