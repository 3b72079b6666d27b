"""SparseGPT's solver (Frantar & Alistarh, 2023): mask selection and OBS weight reconstruction for one layer.

Pure tensor math on a GEMM-view weight and its input Hessian ``H = X^T X``; the criterion that runs it over
a model's layers is :class:`pruning.importance.SparseGPT`.
"""
from __future__ import annotations

import torch

__all__ = ["sparsegpt_prune"]


def _inverse_cholesky_upper(fresh, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, dampening more if H is too ill-conditioned.

    ``fresh()`` returns a new copy of ``H``; the factorisation, the inverse and the factor of the inverse are all
    computed in that one matrix (LAPACK works in place), so a wide layer costs two ``[cols, cols]`` matrices (the
    caller's Hessian and this one), which sets SparseGPT's peak memory.
    """
    h = fresh()
    base = h.diagonal().mean().clamp_min(torch.finfo(h.dtype).tiny)
    info = torch.zeros((), dtype=torch.int32, device=h.device)
    for attempt in range(6):
        if attempt:
            h = fresh()  # a failed factorisation leaves h overwritten
        h.diagonal().add_((damp * 10**attempt) * base)
        torch.linalg.cholesky_ex(h, out=(h, info))
        if int(info) == 0:
            torch.cholesky_inverse(h, out=h)
            torch.linalg.cholesky_ex(h, upper=True, out=(h, info))
            if int(info) == 0:
                return h
    raise ValueError("sparsegpt_prune(): the calibration Hessian is not positive definite even with 1e5x dampening")


def sparsegpt_prune(
    matrix: torch.Tensor,
    hessian: torch.Tensor,
    *,
    n: int = 0,
    m: int = 0,
    sparsity: float | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune a GEMM-view weight with SparseGPT's OBS updates (mask selection + reconstruction).

    Columns are processed left to right in blocks of ``blocksize``; inside a block the mask is chosen
    by ``w^2 / [H^-1]_jj^2`` (per group of ``m`` columns for N:M, keeping ``n``; for unstructured
    an exact per-block share of the budget so the layer loses exactly ``round(sparsity * numel)``),
    and every pruned weight's error is spread onto the not-yet-processed columns through the inverse
    Hessian's Cholesky factor. Input columns that never saw a non-zero activation are pruned first.

    Args:
        matrix: ``[out, cols]`` weight (any float dtype, any device). Not modified.
        hessian: ``[cols, cols]`` ``X^T X`` of the layer input (any positive scaling).
        n, m: N:M pattern (keep ``n`` of every ``m``); ``m=0`` for unstructured.
        sparsity: fraction pruned for unstructured (required iff ``m == 0``).
        blocksize: lazy-update block width (rounded down to a multiple of ``m``).
        damp: Hessian dampening as a fraction of its mean diagonal.
        dtype: precision of the computation (float64 or float32).

    Returns:
        ``(new_matrix, mask)``: the updated weight in ``matrix.dtype`` with zeros where ``mask`` is False.

    Raises:
        ValueError: inconsistent shapes / pattern, or a Hessian that cannot be factorised.
    """
    fn = "sparsegpt_prune()"
    if matrix.dim() != 2:
        raise ValueError(f"{fn}: expected a 2-D weight, got shape {tuple(matrix.shape)}")
    rows, cols = matrix.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"{fn}: expected a [{cols}, {cols}] Hessian, got {tuple(hessian.shape)}")
    if m:
        if not 0 <= n <= m or cols % m:
            raise ValueError(f"{fn}: expected 0 <= n <= m and cols % m == 0, got n={n}, m={m}, cols={cols}")
        if sparsity is not None:
            raise ValueError(f"{fn}: sparsity is implied by n:m; got sparsity={sparsity}")
        blocksize = max(m, blocksize - blocksize % m)
    elif sparsity is None or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"{fn}: expected 0 <= sparsity <= 1 for unstructured pruning, got {sparsity}")
    if blocksize < 1:
        raise ValueError(f"{fn}: expected blocksize >= 1, got {blocksize}")

    w = matrix.detach().to(dtype).clone()
    dead = hessian.detach().diagonal().to(w.device) == 0
    w[:, dead] = 0.0

    def fresh() -> torch.Tensor:
        h = hessian.detach().to(device=w.device, dtype=dtype, copy=True)
        h[dead, dead] = 1.0
        return h

    hinv = _inverse_cholesky_upper(fresh, damp)
    # Dead columns carry no information: make them the first to go.
    prefer_dead = dead.to(dtype) * torch.finfo(dtype).max / 4

    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)  # True = pruned
    total_pruned = 0 if m else int(round(sparsity * rows * cols))
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = hinv1.diagonal()
        if not m:
            # This block's exact share of the budget (cumulative rounding, so the total is exact).
            budget = int(round(total_pruned * i2 / cols)) - int(round(total_pruned * i1 / cols))
            score = w1.square() / d.square().unsqueeze(0) - prefer_dead[i1:i2].unsqueeze(0)
            if budget > 0:
                flat = score.reshape(-1).topk(budget, largest=False, sorted=False).indices
                mask1 = torch.zeros(rows * count, dtype=torch.bool, device=w.device)
                mask1[flat] = True
                mask1 = mask1.reshape(rows, count)
            else:
                mask1 = torch.zeros(rows, count, dtype=torch.bool, device=w.device)
        else:
            mask1 = torch.zeros(rows, count, dtype=torch.bool, device=w.device)
        d2 = d.square()
        dead1 = prefer_dead[i1:i2]
        for i in range(count):
            if m and i % m == 0 and m - n > 0:
                score = w1[:, i : i + m].square().div_(d2[i : i + m]).sub_(dead1[i : i + m])
                idx = score.topk(m - n, dim=1, largest=False, sorted=False).indices
                mask1.scatter_(1, i + idx, True)
            col, pruned = w1[:, i], mask1[:, i]
            q1[:, i] = col.masked_fill(pruned, 0.0)
            e = col.masked_fill(~pruned, 0.0).div_(d[i])
            err1[:, i] = e
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1)  # spread the error over the columns not yet processed
        w[:, i1:i2] = q1
        mask[:, i1:i2] = mask1
        if i2 < cols:
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    keep = ~mask
    w = w * keep
    return w.to(matrix.dtype), keep
