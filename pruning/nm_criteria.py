"""One-shot criteria for N:M sparsity beyond SparseGPT, and per-layer score matrices for permutation searches.

============  ==================================================================  ============  =============
criterion     what it does                                                        needs         kind
============  ==================================================================  ============  =============
ria           RIA (Zhang et al., ICLR 2024): relative importance                  ``calib``     scores
              ``|w_ij| / sum_j |w_ij| + |w_ij| / sum_i |w_ij|`` times the input
              norm ``||x_j||^alpha`` (``alpha = 0.5``); no weight update
alps          ALPS (Meng et al., NeurIPS 2024): the layer-wise problem            ``calib``     reconstructs
              ``min ||X W^T - X W0^T||^2`` over N:M (or unstructured) ``W``
              solved by ADMM with a growing penalty (the support), then the
              kept weights refitted exactly by preconditioned conjugate
              gradients; layers pruned in order, each calibrated on the
              already pruned earlier ones (as SparseGPT)
============  ==================================================================  ============  =============

Both follow the protocol of :mod:`pruning.importance` and register themselves by name when this module is
imported, so ``prune_weights(model, "2:4", "alps", calib=...)`` works once ``pruning.nm_criteria`` is
imported. Both combine with channel permutation (score -> permute -> mask): permute the model first
(:func:`pruning.channels.permute.permute_for_nm`); a layer the runtime must carry then holds an ``input_perm``
buffer, and its mask is chosen in that order (:func:`pruning.patterns.input_column_order`).

Which one to use is a measurement (``python -m sparsekernels.benchmarks.nm_quality``; ``docs/pruning.md``, "Choosing a criterion").
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .batches import progress_bar
from .calibration import collect_input_statistics
from .importance import ReconstructingCriterion, ScoreCriterion, register_criterion, resolve_importance
from .patterns import in_column_order, input_column_order, matrix_to_weight, scores_to_mask, weight_matrix

__all__ = ["layer_score_matrices", "RIA", "ALPS", "ria_scores", "alps_prune", "refit_masked"]


def layer_score_matrices(
    model: nn.Module,
    names: Sequence[str],
    importance="magnitude",
    calib: Iterable | None = None,
    loss_fn: Callable | None = None,
    *,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """GEMM-view score matrices (:func:`pruning.patterns.weight_matrix` layout, ``[out, cols]``) of the
    Linear / Conv2d layers ``names`` of ``model``, from a scoring criterion.

    Args:
        importance: a registered scoring criterion name (``"magnitude"``, ``"wanda"``, ``"ria"``,
            ``"taylor"``...) or a :class:`pruning.importance.ScoreCriterion`.
        calib, loss_fn: what the criterion needs (calibration batches; a loss for Taylor).

    Returns:
        layer name -> scores; a layer the criterion cannot score (never called during calibration) is absent.

    Raises:
        ValueError: a criterion without per-weight scores (SparseGPT, ALPS: they choose masks themselves; use
            ``"wanda"`` to permute before them), or missing ``calib`` / ``loss_fn``.
    """
    fn = "layer_score_matrices()"
    crit = resolve_importance(importance, use="weights")
    if not isinstance(crit, ScoreCriterion):
        raise ValueError(f"{fn}: expected a scoring criterion (magnitude, wanda, ria, taylor...), got {crit.name!r}, "
                         "which chooses masks itself; score permutations for it with 'wanda'")
    if crit.needs_calibration and calib is None:
        raise ValueError(f"{fn}: importance {crit.name!r} needs calib (an iterable of calibration batches)")
    if crit.needs_loss and not callable(loss_fn):
        raise ValueError(f"{fn}: importance {crit.name!r} needs loss_fn(model, batch) -> scalar, got {loss_fn!r}")
    pnames = {f"{n}.weight" if n else "weight": n for n in names}
    scores = crit.scores(model, list(pnames), calib, loss_fn, progress=progress) if pnames else {}
    return {n: weight_matrix(scores[p]) for p, n in pnames.items() if p in scores}


# ---------------------------------------------------------------------------------------------------
# RIA
# ---------------------------------------------------------------------------------------------------


def ria_scores(matrix: torch.Tensor, sq_norms: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """RIA scores of a GEMM-view weight ``[out, cols]`` with per-column ``sum x^2`` ``[cols]``: float64
    ``(|W| / row sums + |W| / column sums) * ||x||^alpha``.

    Raises:
        ValueError: ``sq_norms`` does not have ``cols`` entries.
    """
    if sq_norms.shape != (matrix.shape[1],):
        raise ValueError(f"ria_scores(): expected sq_norms of shape ({matrix.shape[1]},), got {tuple(sq_norms.shape)}")
    w = matrix.detach().abs().to(torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    rel = w / w.sum(1, keepdim=True).clamp_min(tiny) + w / w.sum(0, keepdim=True).clamp_min(tiny)
    return rel * sq_norms.to(rel).clamp_min(0).sqrt().pow(alpha).unsqueeze(0)


@dataclass(frozen=True)
class RIA(ScoreCriterion):
    """Relative importance and activations (Zhang et al., "Plug-and-Play", ICLR 2024). Needs ``calib``.

    A weight counts relative to its row and to its column (so one large input channel, or one large output,
    does not take every place), times ``||x_j||_2 ** alpha``. Scores ``nn.Linear`` and ungrouped
    ``nn.Conv2d`` layers (columns in the GEMM view's order).

    Attributes:
        alpha: exponent of the input norm (the paper's 0.5).
    """

    name = "ria"
    needs_calibration = True
    patterns = ("nm", "unstructured")
    reads_layer_inputs = True
    row_budget = True
    channel_pruning = False
    layer_inputs = "norms"
    alpha: float = 0.5

    def __post_init__(self):
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0 <= self.alpha <= 4:
            raise ValueError(f"RIA: expected 0 <= alpha <= 4, got {self.alpha!r}")

    def prune_layer(self, matrix, stats, pattern, sparsity):
        return None, scores_to_mask(ria_scores(matrix, stats.sq_norms, self.alpha), pattern, sparsity,
                                    self.row_budget)

    def scores(self, model, names, calib=None, loss_fn=None, *, progress=True):
        layers = {}
        for n in names:
            mod_name, _, attr = n.rpartition(".")
            module = model.get_submodule(mod_name)
            if attr == "weight" and isinstance(module, (nn.Linear, nn.Conv2d)) and getattr(module, "groups", 1) == 1:
                layers[n] = module
        stats = collect_input_statistics(model, layers, calib, progress=progress) if layers else {}
        return {n: matrix_to_weight(ria_scores(weight_matrix(m.weight.detach()), stats[n].sq_norms, self.alpha),
                                    m.weight.shape)
                for n, m in layers.items() if n in stats}


# ---------------------------------------------------------------------------------------------------
# ALPS: ADMM for the support, preconditioned CG for the kept weights
# ---------------------------------------------------------------------------------------------------


def _keep_mask(scores: torch.Tensor, n: int, m: int, keep: int) -> torch.Tensor:
    """N:M mask of ``scores`` (``m > 0``), else the ``keep`` largest of the whole matrix. In the scores' own
    dtype (no float64 copy, unlike :func:`pruning.patterns.nm_mask`): this runs every ADMM iteration."""
    if m:
        groups = scores.reshape(-1, m)
        mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
        if n:
            mask.scatter_(1, groups.topk(n, dim=1, sorted=False).indices, True)
        return mask.reshape(scores.shape)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        mask[scores.reshape(-1).topk(keep, sorted=False).indices] = True
    return mask.reshape(scores.shape)


def refit_masked(w0: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, start: torch.Tensor | None = None,
                 *, iters: int = 60, tol: float = 1e-6) -> torch.Tensor:
    """The kept weights that best reconstruct the layer: ``argmin_W tr((W - W0) H (W - W0)^T)`` with ``W = 0``
    where ``mask`` is False, by Jacobi-preconditioned conjugate gradients run on every row at once.

    Args:
        w0: dense GEMM-view weight ``[out, cols]``; hessian: ``[cols, cols]`` (dampened, positive definite);
        mask: ``torch.bool`` ``[out, cols]``, True = kept; start: initial weights (default ``w0 * mask``).
        iters: CG iterations at most; tol: stop when the residual norm falls below ``tol`` times its start.

    Returns:
        ``[out, cols]`` weights in the dtype of ``w0``, zero off the mask.
    """
    keep = mask.to(w0.dtype)
    w = (w0 if start is None else start) * keep
    diag = hessian.diagonal().clamp_min(torch.finfo(w0.dtype).tiny).unsqueeze(0)
    r = ((w0 - w) @ hessian) * keep
    z = r / diag
    p = z.clone()
    rz = (r * z).sum(1)
    first = float(rz.sum().sqrt())
    tiny = torch.finfo(w0.dtype).tiny
    for _ in range(iters):
        if first == 0 or float(rz.sum().sqrt()) <= tol * first:
            break
        ap = (p @ hessian) * keep
        alpha = rz / (p * ap).sum(1).clamp_min(tiny)
        w += alpha.unsqueeze(1) * p
        r -= alpha.unsqueeze(1) * ap
        z = r / diag
        rz_new = (r * z).sum(1)
        p = z + (rz_new / rz.clamp_min(tiny)).unsqueeze(1) * p
        rz = rz_new
    return w * keep


def alps_prune(
    matrix: torch.Tensor,
    hessian: torch.Tensor,
    *,
    n: int = 0,
    m: int = 0,
    sparsity: float | None = None,
    damp: float = 0.01,
    rho: float = 0.02,
    iters: int = 300,
    refit_iters: int = 60,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune a GEMM-view weight by ALPS: ADMM on ``min tr((W - W0) H (W - W0)^T)`` subject to the pattern,
    with a penalty that grows as the support settles, then an exact refit of the kept weights.

    The ADMM iterates ``W = (W0 H + rho (D - V)) (H + rho I)^-1`` (one eigendecomposition of ``H`` serves
    every ``rho``), ``D = proj(W + V)`` (the pattern's largest magnitudes), ``V += W - D``. ``rho`` grows
    x1.05 per iteration while the support still changes and x1.2 once it has not, and the loop stops when the
    support has not changed for 5 iterations with ``rho > 5``. All of it runs on the problem rescaled to a
    unit-diagonal ``H`` (``w_ij * sqrt(H_jj)``; same objective), so the projection ranks Wanda's ``|w| * ||x||``
    and ``rho`` is relative to that diagonal; the start is the Wanda mask. Measured on all-MiniLM-L6-v2's
    layers (layer-wise error ``tr(dW H dW^T) / tr(W H W^T)``, query / attention output / intermediate of block
    2): SparseGPT 0.0196 / 0.0386 / 0.0096, this 0.0091 / 0.0215 / 0.0049 (1.3 / 1.3 / 5.5 s on one CPU
    thread). Choosing the schedule: slower growth gained < 1 %, ``rho = 0.5`` lost 30-40 %; without the
    rescaling, supports on inputs with outlier channels were worse than SparseGPT's.

    Args:
        matrix: ``[out, cols]`` weight (any float dtype, any device); not modified.
        hessian: ``[cols, cols]`` ``X^T X`` of the layer input.
        n, m: N:M pattern (``m = 0``: unstructured, with ``sparsity``).
        damp: ridge added to ``H``, as a fraction of its mean diagonal.
        rho: initial penalty, as a fraction of the mean diagonal.
        iters: ADMM iterations at most; refit_iters: conjugate-gradient iterations of the refit.
        dtype: precision of the iterations (the eigendecomposition runs in float64).

    Returns:
        ``(new_matrix, mask)`` in ``matrix.dtype``; zeros where ``mask`` is False.

    Raises:
        ValueError: inconsistent shapes / pattern.
    """
    fn = "alps_prune()"
    if matrix.dim() != 2 or hessian.shape != (matrix.shape[1], matrix.shape[1]):
        raise ValueError(f"{fn}: expected a [out, cols] weight and a [cols, cols] Hessian, got "
                         f"{tuple(matrix.shape)} and {tuple(hessian.shape)}")
    rows, cols = matrix.shape
    if m:
        if not 0 <= n <= m or cols % m or sparsity is not None:
            raise ValueError(f"{fn}: expected 0 <= n <= m, cols % m == 0 and no sparsity, got n={n}, m={m}, "
                             f"cols={cols}, sparsity={sparsity}")
        keep = 0
    else:
        if sparsity is None or not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"{fn}: expected 0 <= sparsity <= 1 for unstructured pruning, got {sparsity}")
        keep = rows * cols - int(round(sparsity * rows * cols))
    h = hessian.detach().to(device=matrix.device, dtype=torch.float64).clone()
    w0 = matrix.detach().to(torch.float64).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w0[:, dead] = 0.0
    h += (damp * h.diagonal().mean()) * torch.eye(cols, dtype=h.dtype, device=h.device)
    # unit-diagonal H (columns of X normalised): same objective, but the projection onto the pattern then
    # ranks |w_ij| * ||x_j|| instead of |w_ij| (tests/test_nm_criteria.py: 0.6x SparseGPT's layer error
    # with it, up to 1.25x without, on inputs with outlier channels)
    scale = h.diagonal().sqrt()
    h = h / scale.unsqueeze(0) / scale.unsqueeze(1)
    w0 = w0 * scale.unsqueeze(0)
    evals, evecs = torch.linalg.eigh(h)
    evals, evecs, hd, w0d = evals.to(dtype), evecs.to(dtype), h.to(dtype), w0.to(dtype)
    hw = w0d @ hd
    mask = _keep_mask(w0d.abs() - dead.to(dtype) * 1e30, n, m, keep)
    d = w0d * mask
    v = torch.zeros_like(w0d)
    stable = 0
    for _ in range(iters):
        w = ((hw + rho * (d - v)) @ evecs) / (evals + rho).unsqueeze(0) @ evecs.T
        z = w + v
        new_mask = _keep_mask(z.abs(), n, m, keep)
        changed = int((new_mask != mask).sum())
        d = z * new_mask
        v = z - d
        mask = new_mask
        # slow growth while the support moves (the support is what ADMM is for), fast once it has settled
        rho *= 1.2 if changed == 0 else 1.05
        stable = stable + 1 if changed == 0 else 0
        if stable >= 5 and rho > 5:
            break
    w = refit_masked(w0d, hd, mask, d, iters=refit_iters) / scale.to(dtype).unsqueeze(0)
    return w.to(matrix.dtype), mask


@dataclass(frozen=True)
class _SequentialReconstruction(ReconstructingCriterion):
    """Layers pruned one after another, each calibrated (``X^T X``) on the output of the already pruned ones,
    one Hessian in memory at a time. Subclasses implement :meth:`solve`."""

    needs_calibration = True
    reads_layer_inputs = True
    reiterates_calib = True

    def solve(self, matrix, hessian, n, m, sparsity):  # pragma: no cover - abstract
        raise NotImplementedError

    def reconstruct(self, model, layers, pattern, sparsity, calib, *, progress=True):
        n, m = (pattern.n, pattern.m) if pattern.kind == "nm" else (0, 0)
        results, originals = {}, {}
        try:
            for name, module in progress_bar(list(layers.items()), desc=self.name, enabled=progress):
                stats = collect_input_statistics(model, {name: module}, calib, hessian=True, progress=False,
                                                 stop_after=name)
                if name not in stats:
                    continue
                weight = module.weight.detach()
                budget = None if m else sparsity[name]
                new, keep = in_column_order(lambda mat, hessian: self.solve(mat, hessian, n, m, budget),
                                            weight_matrix(module).detach(), input_column_order(module, pattern),
                                            stats.pop(name).hessian)
                new_weight = matrix_to_weight(new, module).to(weight.device)
                results[name] = (new_weight, matrix_to_weight(keep, module).to(weight.device))
                originals[name] = weight.clone()
                with torch.no_grad():
                    module.weight.copy_(new_weight)  # later layers calibrate on this one's pruned output
        finally:
            with torch.no_grad():
                for name, saved in originals.items():
                    layers[name].weight.copy_(saved)
        return results


@dataclass(frozen=True)
class ALPS(_SequentialReconstruction):
    """ALPS (Meng et al., NeurIPS 2024): ADMM for the support, conjugate gradients for the kept weights.
    Needs ``calib`` (re-iterable: one pass per layer). See :func:`alps_prune`.

    Attributes:
        damp, rho, iters, refit_iters, dtype: as :func:`alps_prune`.
    """

    name = "alps"
    layer_inputs = "hessian"
    true_sequential = True
    damp: float = 0.01
    rho: float = 0.02
    iters: int = 300
    refit_iters: int = 60
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if not isinstance(self.damp, (int, float)) or not 0.0 < self.damp < 10.0 or math.isnan(self.damp):
            raise ValueError(f"ALPS: expected 0 < damp < 10, got {self.damp!r}")
        if not isinstance(self.rho, (int, float)) or not self.rho > 0:
            raise ValueError(f"ALPS: expected rho > 0, got {self.rho!r}")
        for label in ("iters", "refit_iters"):
            v = getattr(self, label)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"ALPS: expected {label} as an int >= 0, got {v!r}")
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"ALPS: expected dtype torch.float32 or torch.float64, got {self.dtype}")

    def prune_layer(self, matrix, stats, pattern, sparsity):
        n, m = (pattern.n, pattern.m) if pattern.kind == "nm" else (0, 0)
        return self.solve(matrix, stats.hessian, n, m, None if m else sparsity)

    def solve(self, matrix, hessian, n, m, sparsity):
        return alps_prune(matrix, hessian, n=n, m=m, sparsity=sparsity, damp=self.damp, rho=self.rho,
                          iters=self.iters, refit_iters=self.refit_iters, dtype=self.dtype)


def _register() -> None:
    for name, factory in (("ria", RIA), ("alps", ALPS)):
        register_criterion(name, factory)


_register()
