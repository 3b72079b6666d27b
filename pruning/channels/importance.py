"""Group importance for channel pruning, and the network-slimming regulariser.

Channel pruning uses the same criteria as weight pruning (:mod:`pruning.importance`): each criterion scores
the parameters attached to a unit, reduced to one score per channel slice
(:meth:`pruning.importance.ScoreCriterion.channel_scores`). Each attached parameter's per-index scores are
normalised by that parameter's mean, so layers of different sizes weigh the same; a unit's importance is
the mean of its parameters' contributions. Only the parameters the criterion's ``channel_voters`` name
vote: conv / linear weights (>= 2-D, never biases or running statistics) and / or normalisation scales.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from ..batches import default_loss
from ..importance import NORM_LAYERS, ScoreCriterion, check_finite_scores, is_norm_scale, resolve_importance
from .graph import DependencyGraph

__all__ = ["group_importance", "bn_scale_penalty"]


def bn_scale_penalty(model: nn.Module, strength: float = 1e-4) -> torch.Tensor:
    """Network-slimming regulariser: ``strength * sum(|gamma|)`` over every BatchNorm / GroupNorm /
    LayerNorm / InstanceNorm scale. Add it to the training loss so that unimportant channels' scales shrink
    towards zero before pruning with ``importance="bn_scale"``.

    Args:
        model: any module (scales are found among its submodules).
        strength: the coefficient (>= 0; about 1e-5 to 1e-4 in the network-slimming paper).

    Returns:
        A scalar tensor on the model's device, differentiable with respect to the scales (zero if none).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``strength`` is negative or not finite.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"bn_scale_penalty(): expected an nn.Module, got {type(model).__name__}")
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not np.isfinite(strength) \
            or strength < 0:
        raise ValueError(f"bn_scale_penalty(): expected a finite strength >= 0, got {strength!r}")
    terms = [m.weight.abs().sum() for m in model.modules()
             if isinstance(m, NORM_LAYERS) and getattr(m, "weight", None) is not None]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else "cpu")
    return strength * torch.stack(terms).sum()


def _role(model: nn.Module, state: dict, pname: str, kind: str) -> str | None:
    """``"weight"``, ``"norm_scale"`` or ``None``: how an attached parameter may vote."""
    t = state.get(pname)
    if t is None or not t.is_floating_point():
        return None
    if t.dim() >= 2 and kind in ("out", "in"):
        return "weight"
    if is_norm_scale(model, pname):
        return "norm_scale"
    return None


def _unit_scores(model, graph, crit: ScoreCriterion, calib, loss_fn, progress) -> dict[int, float]:
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    voters = [(pname, a) for pname, lst in graph.attachments.items() for a in lst
              if _role(model, state, pname, a.kind) in crit.channel_voters]
    slices: dict[str, list[int]] = {}
    for pname, a in voters:
        slices.setdefault(pname, []).append(a.dim)
    per_channel = crit.channel_scores(model, slices, calib, loss_fn, progress=progress) if slices else {}
    total: dict[int, float] = {}
    count: dict[int, int] = {}
    for pname, a in voters:
        per = per_channel.get((pname, a.dim))
        if per is None:
            continue
        check_finite_scores(crit.name, f"parameter {pname!r} (dim {a.dim})", per)
        per = per.numpy()
        mean = float(per.mean())
        per = per / mean if mean > 0 else per
        uniq, inv = np.unique(graph.root_of(a.labels), return_inverse=True)
        sums = np.bincount(inv, weights=per, minlength=len(uniq))
        cnts = np.bincount(inv, minlength=len(uniq))
        for u, s, c in zip(uniq.tolist(), sums.tolist(), cnts.tolist()):
            total[u] = total.get(u, 0.0) + s / c
            count[u] = count.get(u, 0) + 1
    return {u: total[u] / count[u] for u in total}


def group_importance(
    model: nn.Module,
    graph: DependencyGraph,
    importance="l1",
    *,
    calib: Iterable | None = None,
    loss_fn: Callable | None = None,
    progress: bool = True,
) -> dict[int, float]:
    """Importance of every unit (root slot) of ``graph``.

    Args:
        model: the model the graph was built on.
        graph: its :class:`DependencyGraph`.
        importance: a scoring criterion or its registered name (``"l1"``, ``"l2"``, ``"taylor"``,
            ``"bn_scale"``, ``"wanda"``, ...); units none of its voters reach are scored by its
            ``channel_fallback``, if any.
        calib: calibration batches, for criteria that need them (:mod:`pruning.batches`).
        loss_fn: ``loss_fn(model, batch) -> scalar``, for criteria that need a loss; default
            :func:`pruning.batches.default_loss`.
        progress: progress bar over the calibration batches.

    Returns:
        ``{unit root: score}``; higher means more important.

    Raises:
        TypeError / ValueError: an unknown importance, or one that does not score channels (e.g.
            ``"sparsegpt"``, which reconstructs weights instead).
    """
    criterion = resolve_importance(importance, use="channels")
    if not isinstance(criterion, ScoreCriterion):
        raise ValueError(f"group_importance(): expected a scoring importance, got {criterion.name!r}")
    if criterion.needs_loss and loss_fn is None:
        loss_fn = default_loss
    scores = {}
    if criterion.channel_fallback is not None:
        scores = _unit_scores(model, graph, criterion.channel_fallback, calib, loss_fn, progress)
    scores.update(_unit_scores(model, graph, criterion, calib, loss_fn, progress))
    return scores
