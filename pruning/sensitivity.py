"""Per-layer sensitivity analysis and sensitivity-aware sparsity allocation.

For every selected layer and every sparsity level, only that layer is pruned (temporarily) and the model
is run on the calibration batches. Two metrics:

* ``"output_error"`` (default, no labels needed): ``||y - y_dense|| / ||y_dense||`` over all calibration
  outputs, where ``y_dense`` is the unpruned model's output;
* ``"loss_increase"`` (when ``loss_fn`` is given): mean calibration loss with the layer pruned minus the
  dense model's mean loss.

Automatic allocation (:meth:`SensitivityResult.allocate`) — equal-damage thresholding: each layer's
measured curve ``e_l(s)`` (with ``e_l(0) = 0``, made non-decreasing, linear between measured levels) is
inverted at a common damage threshold ``lambda``: ``s_l(lambda) = max{s : e_l(s) <= lambda}``, clipped to
``[min_sparsity, max_sparsity]``. Sensitive layers hit ``lambda`` early and so get less sparsity. A
bisection on ``lambda`` finds the threshold at which the parameter-weighted mean of ``s_l`` equals the
target; the last gap is closed by interpolating between the two bracketing allocations, so the target
is met exactly (up to each layer's rounding to whole weights when pruned).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .batches import (
    call_model,
    check_batches,
    eval_mode,
    model_device,
    move_batch,
    output_tensor,
    progress_bar,
    split_batch,
)
from .importance import ScoreCriterion, criterion_names, resolve_importance
from .patterns import matrix_to_weight, parse_pattern
from .transaction import read_only
from .weights import layer_scores, scores_to_mask, select_layers

__all__ = ["sensitivity_analysis", "SensitivityResult"]


@dataclass(frozen=True)
class SensitivityResult:
    """Per-layer sensitivity curves.

    Attributes:
        metric: ``"output_error"`` or ``"loss_increase"``.
        pattern, importance: what each layer was pruned with.
        sparsities: the measured levels (ascending).
        curves: layer name -> metric value at each level.
        numels: layer name -> number of weights (for parameter-weighted budgets).
        dense_loss: mean calibration loss of the dense model (``None`` for ``"output_error"``).
        skipped: layer name -> reason, for candidate layers that were not analysed.
    """

    metric: str
    pattern: str
    importance: str
    sparsities: tuple[float, ...]
    curves: dict[str, tuple[float, ...]]
    numels: dict[str, int]
    dense_loss: float | None
    skipped: dict[str, str]

    def ranking(self) -> list[str]:
        """Layer names from the least to the most sensitive (by the value at the highest level, then the mean)."""
        return sorted(self.curves, key=lambda n: (self.curves[n][-1], sum(self.curves[n])))

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "pattern": self.pattern,
            "importance": self.importance,
            "sparsities": list(self.sparsities),
            "curves": {k: list(v) for k, v in self.curves.items()},
            "numels": dict(self.numels),
            "dense_loss": self.dense_loss,
            "skipped": dict(self.skipped),
        }

    def _inverse(self, name: str, lam: float, lo: float, hi: float) -> float:
        levels = (0.0, *self.sparsities)
        values, running = [0.0], 0.0
        for v in self.curves[name]:
            running = max(running, v)
            values.append(running)
        best = 0.0
        for i in range(1, len(levels)):
            s0, s1, e0, e1 = levels[i - 1], levels[i], values[i - 1], values[i]
            if e1 <= lam:
                best = s1
                continue
            if e0 <= lam:  # crosses inside this segment
                best = s0 + (s1 - s0) * (lam - e0) / (e1 - e0)
            break
        return min(max(best, lo), hi)

    def allocate(
        self, target_sparsity: float, *, min_sparsity: float = 0.0, max_sparsity: float | None = None
    ) -> dict[str, float]:
        """Per-layer sparsities whose parameter-weighted mean is ``target_sparsity``, sensitive layers getting less.

        See the module docstring for the algorithm. The result can be passed straight to
        ``pruning.prune_weights(model, "unstructured", sparsity=...)``.

        Args:
            target_sparsity: overall sparsity over the analysed layers.
            min_sparsity: every layer gets at least this much.
            max_sparsity: no layer gets more (default and upper limit: the highest measured level; curves
                are not extrapolated).

        Raises:
            ValueError: N:M results (their sparsity is fixed; use :meth:`ranking`), or a target outside
                ``[min_sparsity, max_sparsity]``.
        """
        fn = "SensitivityResult.allocate()"
        if ":" in self.pattern:
            raise ValueError(f"{fn}: pattern {self.pattern} has a fixed sparsity; use ranking() to choose layers")
        hi = self.sparsities[-1] if max_sparsity is None else float(max_sparsity)
        lo = float(min_sparsity)
        if not 0.0 <= lo <= hi <= self.sparsities[-1]:
            raise ValueError(
                f"{fn}: expected 0 <= min_sparsity <= max_sparsity <= {self.sparsities[-1]} (the highest measured "
                f"level; curves are not extrapolated), got {lo}, {hi}"
            )
        if not lo <= target_sparsity <= hi:
            raise ValueError(f"{fn}: expected min_sparsity <= target_sparsity <= max_sparsity ({lo}..{hi}), got {target_sparsity}")
        if not self.curves:
            raise ValueError(f"{fn}: no layer was analysed")
        names = list(self.curves)
        total = sum(self.numels[n] for n in names)

        def alloc(lam):
            return {n: self._inverse(n, lam, lo, hi) for n in names}

        def overall(a):
            return sum(a[n] * self.numels[n] for n in names) / total

        lam_lo, lam_hi = -1.0, max(max(v) for v in self.curves.values()) + 1.0  # all at lo / all at hi
        for _ in range(100):
            mid = 0.5 * (lam_lo + lam_hi)
            if overall(alloc(mid)) >= target_sparsity:
                lam_hi = mid
            else:
                lam_lo = mid
        a_lo, a_hi = alloc(lam_lo), alloc(lam_hi)
        o_lo, o_hi = overall(a_lo), overall(a_hi)
        t = 0.0 if o_hi - o_lo <= 1e-15 else (target_sparsity - o_lo) / (o_hi - o_lo)
        t = min(max(t, 0.0), 1.0)
        return {n: a_lo[n] + t * (a_hi[n] - a_lo[n]) for n in names}


def sensitivity_analysis(
    model: nn.Module,
    calib: Iterable,
    *,
    sparsities: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9),
    pattern: str = "unstructured",
    importance="magnitude",
    loss_fn: Callable | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    progress: bool = True,
) -> SensitivityResult:
    """Measure how much each Linear / Conv2d layer, pruned alone, hurts the model.

    Args:
        model: the dense (or partly pruned) model; left unchanged (weights and masks restored).
        calib: re-iterable of batches (list / DataLoader; :mod:`pruning.batches`), as for
            :func:`pruning.prune_weights`.
        sparsities: levels in ``(0, 1]``, for ``"unstructured"`` / ``"block<R>x<C>"``; ignored for N:M,
            which has the single level ``1 - n/m``.
        pattern: ``"unstructured"``, ``"n:m"`` or ``"block<R>x<C>"``.
        importance: a scoring criterion, e.g. ``"magnitude"``, ``"wanda"`` or ``"taylor"`` (scores computed once
            on the dense model); a reconstructing one (``"sparsegpt"``) is rejected, since it changes the
            kept weights too.
        loss_fn: ``loss_fn(model, batch) -> scalar``; if given the metric is the loss increase, else the
            relative output error against the dense model.
        filter_fn: ``filter_fn(name, module) -> bool`` selects the layers.
        progress: show a progress bar.

    Returns:
        A :class:`SensitivityResult` (``.curves``, ``.ranking()``, ``.allocate(target)``).

    Raises:
        TypeError / ValueError: bad arguments (``calib`` missing or a one-shot iterator, unsorted or
            out-of-range sparsities, ``"global"`` pattern, a reconstructing importance such as ``"sparsegpt"``).
    """
    fn = "sensitivity_analysis()"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module, got {type(model).__name__}")
    check_batches(fn, calib, reiterated_by="sensitivity analysis (one calibration pass per layer and level)")
    pat = parse_pattern(pattern)
    crit = resolve_importance(importance, use="weights")
    if pat.kind == "global":
        raise ValueError(f"{fn}: pattern 'global' has no per-layer budget; expected 'unstructured', 'n:m' or 'block<R>x<C>'")
    if not isinstance(crit, ScoreCriterion):
        scoring = [n for n in criterion_names("weights") if isinstance(resolve_importance(n), ScoreCriterion)]
        raise ValueError(f"{fn}: expected a scoring importance in {scoring}, got {crit.name!r} (it rewrites the kept "
                         "weights, so pruning one layer by its mask alone does not measure it)")
    if crit.needs_loss and not callable(loss_fn):
        raise ValueError(f"{fn}: importance={crit.name!r} needs loss_fn(model, batch) -> scalar")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"{fn}: expected loss_fn(model, batch) -> scalar, got {type(loss_fn).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"{fn}: expected filter_fn(name, module) -> bool, got {type(filter_fn).__name__}")
    if pat.kind == "nm":
        levels = (pat.fixed_sparsity,)
    else:
        if not isinstance(sparsities, (tuple, list)) or not sparsities:
            raise ValueError(f"{fn}: expected a non-empty tuple of sparsities, got {sparsities!r}")
        levels = tuple(float(s) for s in sparsities)
        if any(not 0.0 < s <= 1.0 for s in levels) or list(levels) != sorted(set(levels)):
            raise ValueError(f"{fn}: expected strictly increasing sparsities in (0, 1], got {sparsities!r}")

    sel = select_layers(fn, model, pat, crit, filter_fn, None)
    scores = layer_scores(model, sel, crit, calib, loss_fn, progress)
    device = model_device(model)

    def run() -> list[torch.Tensor] | float:
        with eval_mode(model), torch.no_grad():
            if loss_fn is not None:
                values = [float(loss_fn(model, move_batch(b, device))) for b in calib]
                return sum(values) / len(values)
            outputs = []
            for b in calib:
                inputs, _ = split_batch(b, "calibration batch")
                outputs.append(output_tensor(call_model(model, move_batch(inputs, device)), fn).detach().double())
            return outputs

    dense = run()
    if loss_fn is None:
        if not dense:
            raise ValueError(f"{fn}: expected at least one calibration batch, got an empty iterable")
        dense_sq = sum(float(y.square().sum()) for y in dense)

    curves: dict[str, tuple[float, ...]] = {}
    bar = progress_bar(total=len(scores) * len(levels), desc="sensitivity", enabled=progress)
    for name, score in scores.items():
        module = sel.selected[name]
        values = []
        with read_only(model, tensors=[module.weight]):  # the layer's weight is put back after its levels
            saved = module.weight.detach().clone()
            for level in levels:
                level_mask = scores_to_mask(score, pat, None if pat.kind == "nm" else level, False)
                keep = matrix_to_weight(level_mask, saved.shape)
                with torch.no_grad():
                    module.weight.copy_(saved * keep.to(saved.device))
                out = run()
                if loss_fn is not None:
                    values.append(out - dense)
                else:
                    err = sum(float((y - y0).square().sum()) for y, y0 in zip(out, dense))
                    values.append(math.sqrt(err / max(dense_sq, 1e-300)))
                bar.update(1)
        curves[name] = tuple(values)
    bar.close()
    return SensitivityResult(
        metric="loss_increase" if loss_fn is not None else "output_error",
        pattern=str(pat),
        importance=crit.name,
        sparsities=levels,
        curves=curves,
        numels={n: sel.selected[n].weight.numel() for n in curves},
        dense_loss=dense if loss_fn is not None else None,
        skipped={s.name: s.reason for s in sel.sorted_skipped()},
    )
