"""Running a model on calibration batches: layer-input statistics (Wanda, SparseGPT) and Taylor gradients.

Calibration batches follow :mod:`pruning.batches` (a classification ``DataLoader`` of ``(inputs, targets)``
works as it is; statistics ignore the targets). Tensors are moved to the model's device. While statistics
are collected the model runs in eval mode under ``torch.no_grad()`` (so BatchNorm running statistics are
not touched) and every hook is removed afterwards, even on error.

Layer inputs are seen as the rows of the layer's GEMM (:func:`layer_input_columns`); for ``nn.Conv2d`` the
input is unfolded (im2col) with the channels-last column order of :func:`pruning.patterns.weight_matrix`
(kernel row, kernel column, input channel), so Wanda norms and SparseGPT Hessians line up with the N:M
groups ``sparsekernels`` executes.

Taylor importance, for weights and for channels, takes its gradients from :func:`accumulate_taylor`, the
one loop that runs ``loss_fn`` on every batch and hands ``w * dL/dw`` to the caller's reduction.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .batches import call_model, check_batches, eval_mode, model_device, move_batch, progress_bar, split_batch

__all__ = [
    "layer_input_columns",
    "InputStatistics",
    "collect_input_statistics",
    "accumulate_taylor",
    "taylor_scores",
]


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
        calib: iterable of batches (:mod:`pruning.batches`; targets are ignored).
        hessian: also accumulate ``X^T X`` (SparseGPT).
        dtype: accumulation precision.
        progress: show a progress bar.
        stop_after: name of a module after which the forward pass may stop (its input is all that is
            needed); used by sequential SparseGPT to avoid running the rest of the model.

    Returns:
        name -> :class:`InputStatistics`. A layer the model never called is absent from the result.

    Raises:
        TypeError: ``calib`` is not an iterable of batches.
        ValueError: ``calib`` is empty, or a layer's inputs hold NaN or inf (the message names the layer).
    """
    fn = "calibration"
    check_batches(fn, calib)
    stats: dict[str, InputStatistics] = {}

    class _Stop(Exception):
        pass

    def make_hook(name: str, module: nn.Module):
        def hook(mod, args, kwargs=None):
            x = args[0] if args else next(iter((kwargs or {}).values()))
            cols = layer_input_columns(module, x.detach()).to(dtype)
            if not bool(torch.isfinite(cols).all()):
                raise ValueError(f"{fn}: layer {name or '<model>'!r} received NaN or inf inputs in calibration batch "
                                 f"{seen} (non-finite calibration data, or an earlier layer overflowed); refusing "
                                 "to compute statistics from them")
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
        with eval_mode(model), torch.no_grad():
            for batch in progress_bar(calib, desc="calibration", enabled=progress):
                seen += 1
                inputs, _ = split_batch(batch, "calibration batch")
                try:
                    call_model(model, move_batch(inputs, device), "calibration batch inputs")
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError(f"{fn}: expected at least one calibration batch, got an empty iterable")
    return stats


def accumulate_taylor(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    calib: Iterable,
    loss_fn: Callable,
    add: Callable[[str, torch.Tensor], None],
    *,
    fn: str,
    progress: bool = True,
) -> None:
    """For every calibration batch, call ``add(name, w * dL/dw)`` for each parameter the loss depends on.

    Gradients come from ``torch.autograd.grad``, so no ``.grad`` field is read or written; each parameter's
    ``requires_grad`` flag and every submodule's train / eval mode are restored afterwards, even on error.

    Args:
        model: the model, run in eval mode (BatchNorm statistics untouched).
        params: name -> parameter (or buffer) of ``model``; the names are passed back to ``add``.
        calib: iterable of batches (:mod:`pruning.batches`), each moved to the model's device.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        add: receives ``(name, product)``, the signed product shaped like the parameter, in its dtype; the
            caller reduces it (per element, per channel...).
        fn: the public function named in error messages.
        progress: show a progress bar.

    Raises:
        TypeError: ``calib`` not iterable, ``loss_fn`` not callable, or the loss is not a scalar tensor.
        ValueError: ``calib`` is empty, a loss is NaN / inf, or the loss carries no gradient (computed under
            ``no_grad`` / detached).
    """
    check_batches(fn, calib)
    if not callable(loss_fn):
        raise TypeError(f"{fn}: expected loss_fn(model, batch) -> scalar, got {type(loss_fn).__name__}")
    names = list(params)
    tensors = [params[n] for n in names]
    flags = [t.requires_grad for t in tensors]
    device = model_device(model)
    seen = 0
    try:
        for t in tensors:
            t.requires_grad_(True)
        with eval_mode(model), torch.enable_grad():
            for batch in progress_bar(calib, desc="taylor", enabled=progress):
                seen += 1
                loss = loss_fn(model, move_batch(batch, device))
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
                    raise TypeError(f"{fn}: expected loss_fn to return a scalar tensor, got {got}")
                if not bool(torch.isfinite(loss.detach()).all()):
                    raise ValueError(f"{fn}: the loss of calibration batch {seen} is {float(loss.detach()):g}; Taylor "
                                     "scores need a finite loss (check the calibration data and the model's outputs)")
                if not loss.requires_grad:
                    raise ValueError(
                        f"{fn}: expected a loss computed from the model's weights (requires_grad=True), got a loss "
                        "without a gradient (computed under torch.no_grad() or detached?)"
                    )
                grads = torch.autograd.grad(loss.reshape(()), tensors, allow_unused=True)
                for name, t, g in zip(names, tensors, grads):
                    if g is not None:
                        add(name, t.detach() * g)
    finally:
        for t, flag in zip(tensors, flags):
            t.requires_grad_(flag)
    if seen == 0:
        raise ValueError(f"{fn}: expected at least one calibration batch, got an empty iterable")


def taylor_scores(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    calib: Iterable,
    loss_fn: Callable,
    *,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """First-order Taylor importance ``sum_b |w * dL_b/dw|`` per element, over calibration batches.

    Args:
        model: the model, run in eval mode (modes restored afterwards).
        weights: name -> weight parameter of ``model`` to score.
        calib: iterable of batches (:mod:`pruning.batches`).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        progress: show a progress bar.

    Returns:
        name -> float32 scores shaped like the weight. A weight the loss does not depend on gets zeros.

    Raises:
        TypeError / ValueError: as :func:`accumulate_taylor`.
    """
    scores = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}

    def add(name: str, product: torch.Tensor) -> None:
        scores[name] += product.abs().float()

    accumulate_taylor(model, weights, calib, loss_fn, add, fn="taylor_scores()", progress=progress)
    return scores
