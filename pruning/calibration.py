"""Running a model on calibration batches: layer-input statistics (Wanda, SparseGPT) and Taylor gradients.

Calibration batches follow :mod:`pruning.batches` (a classification ``DataLoader`` of ``(inputs, targets)``
works as it is; statistics ignore the targets). Tensors are moved to the model's device. While statistics
are collected the model runs in eval mode under ``torch.no_grad()`` (so BatchNorm running statistics are
not touched) and every hook is removed afterwards, even on error.

Layer inputs are seen as the rows of the layer's GEMM (:func:`layer_input_columns`); for ``nn.Conv2d`` the
input is unfolded (im2col) with the channels-last column order of :func:`pruning.patterns.weight_matrix`
(kernel row, kernel column, input channel), so Wanda norms and SparseGPT Hessians line up with the N:M
groups ``sparsekernels`` executes. A Hugging Face ``Conv1D`` reads its input like a Linear.

Padded positions never enter a statistic: when a batch is a mapping with a 2-D ``attention_mask``
(:func:`pruning.batches.token_mask`), a layer whose input has one row per token (``[batch, seq, features]``
matching the mask, or ``[batch * seq, features]``) contributes only the rows of real tokens, to the Hessian, the
Wanda norms and the row count alike. A layer whose rows are not tokens (a pooler's ``[batch, features]``, a
convolution's pixels, experts fed a gathered subset of tokens) cannot be matched to the mask and counts every row.

Taylor importance, for weights and for channels, takes its gradients from :func:`accumulate_taylor`, the
one loop that runs ``loss_fn`` on every batch and hands ``w * dL/dw`` to the caller's reduction.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .batches import (
    StopForward,
    call_model,
    check_batches,
    eval_mode,
    model_device,
    move_batch,
    progress_bar,
    split_batch,
    token_mask,
)
from .patterns import is_conv1d

__all__ = [
    "layer_input_columns",
    "real_token_rows",
    "InputStatistics",
    "InputRecorder",
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
    """The rows of the layer's GEMM: ``[tokens, in]`` for Linear and ``Conv1D``, ``[N * L, kh * kw * in]`` for Conv2d.

    The conv columns follow the channels-last order of :func:`pruning.patterns.weight_matrix`
    (kernel row, kernel column, input channel), so ``columns @ weight_matrix(conv).T`` is the
    convolution's output (without bias). Grouped convolutions are not supported here.

    Raises:
        TypeError: not a Linear / Conv2d / ``Conv1D``.
        ValueError: grouped convolution, or an input of the wrong shape.
    """
    if isinstance(module, nn.Linear) or is_conv1d(module):
        features = module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]
        if x.shape[-1] != features:
            raise ValueError(f"layer_input_columns(): expected input [..., {features}], got {tuple(x.shape)}")
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
    raise TypeError(f"layer_input_columns(): expected nn.Linear, nn.Conv2d or Conv1D, got {type(module).__name__}")


def real_token_rows(cols: torch.Tensor, x: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``cols`` (``layer_input_columns(module, x)``) that belong to real tokens.

    Args:
        cols: ``[rows, k]``, one row per position of ``x`` but its last dimension.
        x: the layer input the rows come from.
        tokens: ``torch.bool`` ``[batch, seq]`` (:func:`pruning.batches.token_mask`), or ``None``.

    Returns:
        ``cols`` without the padded rows when ``x`` is ``[batch, seq, features]`` with ``[batch, seq]`` the mask's
        shape, or ``[batch * seq, features]``; otherwise (no mask, rows that are not tokens) ``cols`` itself.
    """
    if tokens is None or x.dim() < 2:
        return cols
    if tuple(x.shape[:-1]) == tuple(tokens.shape) or (x.dim() == 2 and x.shape[0] == tokens.numel()):
        return cols[tokens.reshape(-1).to(cols.device)]
    return cols


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


class InputRecorder:
    """Forward pre-hooks that accumulate the :class:`InputStatistics` of layers' inputs; a context manager that
    registers them on entry and removes them on exit (also on error).

    Args:
        layers: statistics key (the layer's name) -> Linear / Conv2d / ``Conv1D``.
        hessian: also accumulate ``X^T X``.
        dtype: accumulation precision.
        stop_after: a key after whose input the forward pass may end: its hook raises
            :class:`pruning.batches.StopForward` once it has recorded.
        fn: how error messages start.

    Attributes:
        stats: key -> :class:`InputStatistics`, for every layer called so far.
        tokens: the current batch's real tokens (:func:`pruning.batches.token_mask`), set by the caller before each
            forward; ``None`` counts every row.
        batch: the current batch's number, for error messages.
    """

    def __init__(self, layers: Mapping[str, nn.Module], *, hessian: bool = False, dtype: torch.dtype = torch.float64,
                 stop_after: str | None = None, fn: str = "calibration"):
        self.layers = dict(layers)
        self.hessian = hessian
        self.dtype = dtype
        self.stop_after = stop_after
        self.fn = fn
        self.stats: dict[str, InputStatistics] = {}
        self.tokens: torch.Tensor | None = None
        self.batch = 0
        self._handles = []

    def _hook(self, name: str, module: nn.Module):
        def hook(mod, args, kwargs=None):
            x = args[0] if args else next(iter((kwargs or {}).values()))
            x = x.detach()
            cols = real_token_rows(layer_input_columns(module, x), x, self.tokens).to(self.dtype)
            if not bool(torch.isfinite(cols).all()):
                raise ValueError(f"{self.fn}: layer {name or '<model>'!r} received NaN or inf inputs in calibration "
                                 f"batch {self.batch} (non-finite calibration data, or an earlier layer overflowed); "
                                 "refusing to compute statistics from them")
            st = self.stats.get(name)
            if st is None:
                k = cols.shape[1]
                st = self.stats[name] = InputStatistics(
                    0, torch.zeros(k, dtype=self.dtype, device=cols.device),
                    torch.zeros(k, k, dtype=self.dtype, device=cols.device) if self.hessian else None)
            st.rows += cols.shape[0]
            st.sq_norms += cols.square().sum(0)
            if st.hessian is not None:
                st.hessian.addmm_(cols.T, cols)
            if name == self.stop_after:
                raise StopForward

        return hook

    def __enter__(self) -> "InputRecorder":
        try:
            for name, module in self.layers.items():
                self._handles.append(module.register_forward_pre_hook(self._hook(name, module), with_kwargs=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


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
        modules: name -> Linear / Conv2d / ``Conv1D`` inside ``model`` to observe.
        calib: iterable of batches (:mod:`pruning.batches`; targets are ignored; a mapping's 2-D
            ``attention_mask`` keeps padded positions out of the statistics, see the module docstring).
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
    device = model_device(model)
    with InputRecorder(modules, hessian=hessian, dtype=dtype, stop_after=stop_after, fn=fn) as recorder:
        with eval_mode(model), torch.no_grad():
            for batch in progress_bar(calib, desc="calibration", enabled=progress):
                recorder.batch += 1
                inputs, _ = split_batch(batch, "calibration batch")
                recorder.tokens = token_mask(inputs)
                try:
                    call_model(model, move_batch(inputs, device), "calibration batch inputs")
                except StopForward:
                    pass
    if recorder.batch == 0:
        raise ValueError(f"{fn}: expected at least one calibration batch, got an empty iterable")
    return recorder.stats


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
