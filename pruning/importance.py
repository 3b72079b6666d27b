"""Weight importance criteria behind one interface.

=============  ============================================================  =================================
criterion      score of weight ``w_ij`` (output row ``i``, input column ``j``)  needs
=============  ============================================================  =================================
magnitude      ``|w_ij|``                                                      nothing
taylor         ``sum_b |w_ij * dL_b/dw_ij|`` over calibration batches ``b``    ``calib`` and ``loss_fn``
wanda          ``|w_ij| * ||x_j||_2`` (``x_j``: input feature ``j`` over all   ``calib``
               calibration tokens / pixels); compared within each output row
               (unstructured) or each group of ``m`` (N:M)
sparsegpt      OBS: mask chosen by ``w_ij^2 / [H^-1]_jj^2`` and the remaining  ``calib``
               weights updated to reconstruct the layer output, ``H = X^T X``
=============  ============================================================  =================================

Every criterion works on the GEMM view of a weight (:func:`pruning.patterns.weight_matrix`); for
``nn.Conv2d`` the layer input is unfolded (im2col) with the same channels-last column order
(kernel row, kernel column, input channel), so Wanda norms and SparseGPT Hessians line up with the
N:M groups ``sparsekernels`` executes.

Calibration batches are a tensor (``model(x)``), a tuple/list of positional arguments
(``model(*batch)``) or a dict of keyword arguments (``model(**batch)``, Hugging Face style). Tensors
inside are moved to the model's device. While statistics are collected the model runs in eval mode
under ``torch.no_grad()`` (so BatchNorm running statistics are not touched) and every hook is removed
afterwards, even on error.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ImportanceCriterion",
    "Magnitude",
    "Taylor",
    "Wanda",
    "SparseGPT",
    "resolve_importance",
    "IMPORTANCE_NAMES",
    "forward_batch",
    "move_batch",
    "model_device",
    "layer_input_columns",
    "InputStatistics",
    "collect_input_statistics",
    "magnitude_scores",
    "taylor_scores",
    "wanda_scores",
    "sparsegpt_prune",
]


# ---------------------------------------------------------------------------------------------------
# The criteria (configuration objects; the algorithms are the functions below)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportanceCriterion:
    """Base of every criterion. ``prune_weights(importance=...)`` takes an instance or its name."""

    name = "base"
    needs_calibration = False
    needs_loss = False


@dataclass(frozen=True)
class Magnitude(ImportanceCriterion):
    """``|w|``. Needs no data."""

    name = "magnitude"


@dataclass(frozen=True)
class Taylor(ImportanceCriterion):
    """First-order Taylor sensitivity ``|w * dL/dw|`` accumulated over calibration batches.

    Needs ``calib`` and ``loss_fn(model, batch) -> scalar``. Gradients are taken with
    ``torch.autograd.grad``, so the parameters' ``.grad`` fields are left untouched.
    """

    name = "taylor"
    needs_calibration = True
    needs_loss = True


@dataclass(frozen=True)
class Wanda(ImportanceCriterion):
    """Activation-aware ``|w| * ||x||_2`` (Sun et al., 2023). Needs ``calib``."""

    name = "wanda"
    needs_calibration = True


@dataclass(frozen=True)
class SparseGPT(ImportanceCriterion):
    """Second-order pruning with weight reconstruction (Frantar & Alistarh, 2023). Needs ``calib``.

    Attributes:
        blocksize: columns processed per lazy-update block (rounded down to a multiple of ``m`` for N:M).
        damp: dampening added to the Hessian diagonal, as a fraction of its mean diagonal.
        dtype: precision of the Hessian and the OBS updates (``torch.float64`` or ``torch.float32``).
        sequential: prune layers one after another, collecting each layer's Hessian with the earlier
            layers already pruned (as in the paper; one calibration pass per layer, one Hessian in
            memory at a time). ``False``: one pass, every Hessian from the dense model.
    """

    name = "sparsegpt"
    needs_calibration = True
    # The paper's defaults (Frantar & Alistarh 2023, sec. 3.3 / 4); blocksize only trades speed for
    # memory of the lazy updates, damp only matters for ill-conditioned Hessians.
    blocksize: int = 128
    damp: float = 0.01
    dtype: torch.dtype = torch.float64
    sequential: bool = True

    def __post_init__(self):
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"SparseGPT: expected blocksize >= 1, got {self.blocksize!r}")
        if not isinstance(self.damp, (int, float)) or not 0.0 < self.damp < 10.0 or math.isnan(self.damp):
            raise ValueError(f"SparseGPT: expected 0 < damp < 10, got {self.damp!r}")
        if self.dtype not in (torch.float64, torch.float32):
            raise ValueError(f"SparseGPT: expected dtype torch.float64 or torch.float32, got {self.dtype}")


IMPORTANCE_NAMES = {"magnitude": Magnitude, "taylor": Taylor, "wanda": Wanda, "sparsegpt": SparseGPT}


def resolve_importance(importance) -> ImportanceCriterion:
    """A criterion instance from a name (``"magnitude"``, ``"taylor"``, ``"wanda"``, ``"sparsegpt"``) or instance.

    Raises:
        TypeError: neither a string nor an :class:`ImportanceCriterion`.
        ValueError: unknown name.
    """
    if isinstance(importance, ImportanceCriterion):
        return importance
    if isinstance(importance, type) and issubclass(importance, ImportanceCriterion):
        return importance()
    if not isinstance(importance, str):
        raise TypeError(
            f"importance: expected one of {sorted(IMPORTANCE_NAMES)} or an ImportanceCriterion, "
            f"got {type(importance).__name__}"
        )
    key = importance.strip().lower()
    if key not in IMPORTANCE_NAMES:
        raise ValueError(f"importance: expected one of {sorted(IMPORTANCE_NAMES)}, got {importance!r}")
    return IMPORTANCE_NAMES[key]()


# ---------------------------------------------------------------------------------------------------
# Running a model on calibration batches
# ---------------------------------------------------------------------------------------------------


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a model without tensors."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def move_batch(batch, device: torch.device):
    """``batch`` with every tensor inside (tuples, lists, dicts, nested) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(move_batch(v, device) for v in batch)
    if isinstance(batch, list):
        return [move_batch(v, device) for v in batch]
    return batch


def forward_batch(model: nn.Module, batch):
    """Call ``model`` on one batch: a tensor -> ``model(x)``, tuple/list -> ``model(*batch)``, dict -> ``model(**batch)``.

    Raises:
        TypeError: any other batch type.
    """
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        try:
            return model(*batch)
        except TypeError as err:
            if "positional argument" not in str(err):
                raise
            # The usual cause: an (inputs, targets) batch from a classification DataLoader.
            raise TypeError(
                f"calibration batch: a {type(batch).__name__} of {len(batch)} is passed as positional arguments, "
                f"model(*batch), and the model rejected them ({err}); if the batches are (inputs, targets), "
                "pass the inputs only, e.g. calib=[x for x, _ in loader]"
            ) from err
    raise TypeError(
        f"calibration batch: expected a tensor, a tuple of positional arguments or a dict of keyword arguments, "
        f"got {type(batch).__name__}"
    )


def _check_iterable(fn: str, calib) -> None:
    if calib is None or isinstance(calib, (torch.Tensor, str, bytes)) or not isinstance(calib, Iterable):
        raise TypeError(
            f"{fn}: expected calib as an iterable of batches (e.g. a list of tensors or a DataLoader), "
            f"got {type(calib).__name__}"
        )


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the duration, restoring every submodule's own ``training`` flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _progress(iterable, desc: str, progress: bool):
    from tqdm.auto import tqdm

    total = len(iterable) if hasattr(iterable, "__len__") else None
    return tqdm(iterable, desc=desc, total=total, disable=not progress, leave=False)


# ---------------------------------------------------------------------------------------------------
# Layer inputs as GEMM columns
# ---------------------------------------------------------------------------------------------------


def _conv_pad(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded exactly as ``module`` pads it, so unfold can run with ``padding=0``."""
    kh, kw = module.kernel_size
    dh, dw = module.dilation
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return x
        # 'same': total = dilation * (k - 1), the extra element on the right / bottom (as PyTorch does).
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        ph, pw = module.padding
        pads = (pw, pw, ph, ph)
    if not any(pads):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pads, mode=mode)


def layer_input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows of the layer's GEMM: ``[tokens, in]`` for Linear, ``[N * L, kh * kw * in]`` for Conv2d.

    The conv columns follow the channels-last order of :func:`pruning.patterns.weight_matrix`
    (kernel row, kernel column, input channel), so ``columns @ weight_matrix(conv).T`` is the
    convolution's output (without bias). Grouped convolutions are not supported here.

    Raises:
        TypeError: not a Linear / Conv2d.
        ValueError: grouped convolution, or an input of the wrong shape.
    """
    if isinstance(module, nn.Linear):
        if x.shape[-1] != module.in_features:
            raise ValueError(f"layer_input_columns(): expected input [..., {module.in_features}], got {tuple(x.shape)}")
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"layer_input_columns(): grouped convolutions (groups={module.groups}) are not supported")
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != module.in_channels:
            raise ValueError(
                f"layer_input_columns(): expected input [N, {module.in_channels}, H, W], got {tuple(x.shape)}"
            )
        kh, kw = module.kernel_size
        cols = F.unfold(_conv_pad(module, x), (kh, kw), dilation=module.dilation, stride=module.stride)
        n, _, length = cols.shape  # [N, C * kh * kw, L], channel-major
        cols = cols.reshape(n, module.in_channels, kh * kw, length).permute(0, 3, 2, 1)  # [N, L, kh*kw, C]
        return cols.reshape(n * length, kh * kw * module.in_channels)
    raise TypeError(f"layer_input_columns(): expected nn.Linear or nn.Conv2d, got {type(module).__name__}")


@dataclass
class InputStatistics:
    """Calibration statistics of one layer's GEMM input columns ``X`` (``[rows, cols]``).

    Attributes:
        rows: number of input rows (tokens / output pixels) seen.
        sq_norms: ``[cols]``, ``sum_rows X^2`` per column (Wanda's ``||x_j||_2^2``).
        hessian: ``[cols, cols]`` ``X^T X`` (unnormalised) if requested, else ``None``.
    """

    rows: int
    sq_norms: torch.Tensor
    hessian: torch.Tensor | None = None


def collect_input_statistics(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    calib: Iterable,
    *,
    hessian: bool = False,
    dtype: torch.dtype = torch.float64,
    progress: bool = True,
    stop_after: str | None = None,
) -> dict[str, InputStatistics]:
    """Run ``model`` on every calibration batch and accumulate each layer's input statistics.

    Args:
        model: the model; run in eval mode under ``torch.no_grad()`` (modes restored afterwards).
        modules: name -> Linear / Conv2d inside ``model`` to observe.
        calib: iterable of batches (tensor, tuple of positional args or dict of kwargs).
        hessian: also accumulate ``X^T X`` (SparseGPT).
        dtype: accumulation precision.
        progress: show a progress bar.
        stop_after: name of a module after which the forward pass may stop (its input is all that is
            needed); used by sequential SparseGPT to avoid running the rest of the model.

    Returns:
        name -> :class:`InputStatistics`. A layer the model never called is absent from the result.

    Raises:
        TypeError: ``calib`` is not an iterable of batches.
        ValueError: ``calib`` is empty.
    """
    fn = "collect_input_statistics()"
    _check_iterable(fn, calib)
    stats: dict[str, InputStatistics] = {}

    class _Stop(Exception):
        pass

    def make_hook(name: str, module: nn.Module):
        def hook(mod, args, kwargs=None):
            x = args[0] if args else next(iter((kwargs or {}).values()))
            cols = layer_input_columns(module, x.detach()).to(dtype)
            st = stats.get(name)
            if st is None:
                st = stats[name] = InputStatistics(
                    0,
                    torch.zeros(cols.shape[1], dtype=dtype, device=cols.device),
                    torch.zeros(cols.shape[1], cols.shape[1], dtype=dtype, device=cols.device) if hessian else None,
                )
            st.rows += cols.shape[0]
            st.sq_norms += cols.square().sum(0)
            if st.hessian is not None:
                st.hessian.addmm_(cols.T, cols)
            if name == stop_after:
                raise _Stop

        return hook

    handles = []
    device = model_device(model)
    seen = 0
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(make_hook(name, module), with_kwargs=True))
        with _eval_mode(model), torch.no_grad():
            for batch in _progress(calib, "calibration", progress):
                seen += 1
                try:
                    forward_batch(model, move_batch(batch, device))
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError(f"{fn}: expected at least one calibration batch, got an empty iterable")
    return stats


# ---------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``|weight|`` in float32 (any shape)."""
    return weight.detach().abs().float()


def wanda_scores(matrix: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda scores ``|W| * ||x||_2`` for a GEMM-view weight ``[out, cols]`` and per-column ``sum x^2`` ``[cols]``.

    Raises:
        ValueError: ``sq_norms`` does not have ``cols`` entries.
    """
    if sq_norms.shape != (matrix.shape[1],):
        raise ValueError(f"wanda_scores(): expected sq_norms of shape ({matrix.shape[1]},), got {tuple(sq_norms.shape)}")
    return matrix.detach().abs().to(torch.float64) * sq_norms.to(torch.float64).clamp_min(0).sqrt().unsqueeze(0)


def taylor_scores(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    calib: Iterable,
    loss_fn,
    *,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """First-order Taylor importance ``sum_b |w * dL_b/dw|`` over calibration batches.

    Args:
        model: the model, run in eval mode (BatchNorm statistics untouched; modes restored afterwards).
        weights: name -> weight parameter of ``model`` to score.
        calib: iterable of batches.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        progress: show a progress bar.

    Returns:
        name -> float32 scores shaped like the weight. A weight the loss does not depend on gets zeros.

    Raises:
        TypeError: ``calib`` not iterable, ``loss_fn`` not callable, or the loss is not a scalar tensor.
        ValueError: ``calib`` is empty, or the loss carries no gradient (computed under ``no_grad`` / detached).
    """
    fn = "taylor_scores()"
    _check_iterable(fn, calib)
    if not callable(loss_fn):
        raise TypeError(f"{fn}: expected loss_fn(model, batch) -> scalar, got {type(loss_fn).__name__}")
    names = list(weights)
    params = [weights[n] for n in names]
    flags = [p.requires_grad for p in params]
    scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in weights.items()}
    device = model_device(model)
    seen = 0
    try:
        for p in params:
            p.requires_grad_(True)
        with _eval_mode(model), torch.enable_grad():
            for batch in _progress(calib, "taylor", progress):
                seen += 1
                loss = loss_fn(model, move_batch(batch, device))
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
                    raise TypeError(f"{fn}: expected loss_fn to return a scalar tensor, got {got}")
                if not loss.requires_grad:
                    raise ValueError(
                        f"{fn}: expected a loss computed from the model's weights (requires_grad=True), got a loss "
                        "without a gradient (computed under torch.no_grad() or detached?)"
                    )
                grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
                for n, p, g in zip(names, params, grads):
                    if g is not None:
                        scores[n] += (p.detach() * g).abs().float()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    if seen == 0:
        raise ValueError(f"{fn}: expected at least one calibration batch, got an empty iterable")
    return scores


# ---------------------------------------------------------------------------------------------------
# SparseGPT
# ---------------------------------------------------------------------------------------------------


def _inverse_cholesky_upper(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, dampening more if H is too ill-conditioned."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    base = hessian.diagonal().mean().clamp_min(torch.finfo(hessian.dtype).tiny)
    for attempt in range(6):
        h = hessian + (damp * 10**attempt) * base * eye
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
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
    h = hessian.detach().to(device=w.device, dtype=dtype).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_cholesky_upper(h, damp)
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
        for i in range(count):
            col = w1[:, i]
            if m and i % m == 0:
                score = w1[:, i : i + m].square() / d[i : i + m].square().unsqueeze(0)
                score = score - prefer_dead[i1 + i : i1 + i + m].unsqueeze(0)
                if m - n > 0:
                    idx = score.topk(m - n, dim=1, largest=False, sorted=False).indices
                    mask1.scatter_(1, i + idx, True)
            q = col.clone()
            q[mask1[:, i]] = 0.0
            e = (col - q) / d[i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            q1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = q1
        mask[:, i1:i2] = mask1
        if i2 < cols:
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    keep = ~mask
    w = w * keep
    return w.to(matrix.dtype), keep
