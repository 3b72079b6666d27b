"""Group importance for channel pruning, and the network-slimming regulariser.

Every parameter attached to a unit contributes a per-index score (the L1 or L2 norm of its slice, the
first-order Taylor term, or the BatchNorm scale), normalised by that parameter's mean score so that layers
of different sizes weigh the same; a unit's importance is the mean of its parameters' contributions. Only
weights (>= 2-D: convs, linears) and normalisation scales vote, never biases or running statistics.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .graph import DependencyGraph, normalize_inputs

__all__ = ["IMPORTANCES", "group_importance", "bn_scale_penalty"]

IMPORTANCES = ("l1", "l2", "taylor", "bn_scale")

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


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
             if isinstance(m, _NORM_TYPES) and getattr(m, "weight", None) is not None]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else "cpu")
    return strength * torch.stack(terms).sum()


def _default_loss(model: nn.Module, batch) -> torch.Tensor:
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        args, kwargs = normalize_inputs(batch[0], "prune_channels")
        out = model(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            out = getattr(out, "logits", None)
            if out is None:
                raise TypeError("prune_channels(): importance='taylor' with the default loss needs a model that "
                                "returns logits; pass loss_fn(model, batch) -> scalar")
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), batch[1].reshape(-1))
    raise TypeError("prune_channels(): importance='taylor' with the default loss needs (inputs, targets) batches; "
                    f"got a {type(batch).__name__}; pass loss_fn(model, batch) -> scalar")


def _taylor_terms(model: nn.Module, names: set, calib: Iterable, loss_fn: Callable | None, progress: bool):
    """Per-parameter ``w * grad`` summed over the calibration batches (each batch's product kept signed per
    element, the absolute value taken per channel later)."""
    from tqdm.auto import tqdm

    params = dict(model.named_parameters())
    acc = {n: [] for n in names if n in params}
    req = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    loss_fn = loss_fn or _default_loss
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        for batch in tqdm(calib, desc="taylor", disable=not progress, leave=False):
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise TypeError(f"prune_channels(): expected loss_fn to return a scalar tensor, got {got}")
            if not loss.requires_grad:
                raise ValueError("prune_channels(): expected a loss computed from the model's weights "
                                 "(requires_grad=True), got a loss without a gradient (detached?)")
            loss.reshape(()).backward()
            for n in acc:
                g = params[n].grad
                acc[n].append((params[n].detach() * g).double() if g is not None
                              else torch.zeros_like(params[n], dtype=torch.float64))
            n_batches += 1
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(req[n])
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("prune_channels(): importance='taylor' got an empty calib iterable")
    return acc


def group_importance(
    model: nn.Module,
    graph: DependencyGraph,
    importance: str = "l1",
    *,
    calib: Iterable | None = None,
    loss_fn: Callable | None = None,
    progress: bool = True,
) -> dict[int, float]:
    """Importance of every unit (root slot) of ``graph``.

    Args:
        model: the model the graph was built on.
        graph: its :class:`DependencyGraph`.
        importance: ``"l1"`` / ``"l2"`` (norm of every attached weight slice), ``"taylor"`` (first-order
            Taylor ``|sum(w * dL/dw)|`` per channel, summed over ``calib`` batches, on weights and norm
            scales), ``"bn_scale"`` (``|gamma|`` of the attached normalisation layers; groups without one
            fall back to ``"l1"``).
        calib: for ``"taylor"``: an iterable of batches, ``(inputs, targets)`` for the default loss.
        loss_fn: for ``"taylor"``: ``loss_fn(model, batch) -> scalar``; default cross-entropy.
        progress: progress bar over the calibration batches.

    Returns:
        ``{unit root: score}``; higher means more important.
    """
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    mods = dict(model.named_modules())

    def is_norm_scale(pname):
        mod_name, _, attr = pname.rpartition(".")
        return attr == "weight" and isinstance(mods.get(mod_name), _NORM_TYPES)

    def voters(kind_filter):
        for pname, lst in graph.attachments.items():
            t = state.get(pname)
            if t is None or not t.is_floating_point():
                continue
            for a in lst:
                if kind_filter(pname, t, a):
                    yield pname, t, a

    weight_filter = lambda n, t, a: t.dim() >= 2 and a.kind in ("out", "in")  # noqa: E731
    norm_filter = lambda n, t, a: is_norm_scale(n)  # noqa: E731

    taylor = None
    if importance == "taylor":
        names = {n for n, _, _ in voters(lambda n, t, a: weight_filter(n, t, a) or norm_filter(n, t, a))}
        taylor = _taylor_terms(model, names, calib, loss_fn, progress)

    def accumulate(kind_filter, score_fn):
        total: dict[int, float] = {}
        count: dict[int, int] = {}
        for pname, t, a in voters(kind_filter):
            per = score_fn(pname, t, a)
            if per is None:
                continue
            mean = float(per.mean())
            per = per / mean if mean > 0 else per
            roots = graph.root_of(a.labels)
            uniq, inv = np.unique(roots, return_inverse=True)
            sums = np.bincount(inv, weights=per, minlength=len(uniq))
            cnts = np.bincount(inv, minlength=len(uniq))
            for u, s, c in zip(uniq.tolist(), sums.tolist(), cnts.tolist()):
                total[u] = total.get(u, 0.0) + s / c
                count[u] = count.get(u, 0) + 1
        return {u: total[u] / count[u] for u in total}

    def reduce_slice(x: torch.Tensor, dim: int, how: str) -> np.ndarray:
        x = x.detach().double().movedim(dim, 0).reshape(x.shape[dim], -1)
        if how == "l1":
            return x.abs().sum(1).cpu().numpy()
        if how == "l2":
            return x.pow(2).sum(1).sqrt().cpu().numpy()
        return x.sum(1).abs().cpu().numpy()

    def norm_score(pname, t, a):
        if importance == "taylor":
            return sum(reduce_slice(term, a.dim, "abs") for term in taylor[pname]) if pname in taylor else None
        if importance == "bn_scale":
            return t.detach().double().abs().cpu().numpy()
        return None

    if importance in ("l1", "l2"):
        return accumulate(weight_filter, lambda n, t, a: reduce_slice(t, a.dim, importance))
    if importance == "bn_scale":
        scores = accumulate(weight_filter, lambda n, t, a: reduce_slice(t, a.dim, "l1"))
        scores.update(accumulate(norm_filter, norm_score))
        return scores
    if importance == "taylor":
        return accumulate(lambda n, t, a: weight_filter(n, t, a) or norm_filter(n, t, a),
                          lambda n, t, a: (sum(reduce_slice(term, a.dim, "abs") for term in taylor[n])
                                           if n in taylor else None))
    raise ValueError(f"group_importance(): expected importance in {IMPORTANCES}, got {importance!r}")
