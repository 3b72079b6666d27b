"""The input contract of every op: what each public op accepts, checked once at the boundary so that every
backend sees the same, valid inputs and the same inputs get the same verdict on every backend.

Each ``check_*`` raises ``TypeError`` (wrong types or dtypes) or ``ValueError`` (wrong shapes, devices or
geometry) with what was expected and what was given, naming the public function ``fn`` the user called.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ..formats.blocksparse import BlockSparseWeight
from ..formats.sparse24 import SUPPORTED_DTYPES, Sparse24Weight

__all__ = ["IntPair", "pair", "check_sparse24_linear", "check_sparse24_conv2d", "check_block_sparse_linear"]

IntPair = Union[int, Sequence[int]]


def pair(fn: str, name: str, v, minimum: int) -> tuple[int, int]:
    """``v`` (an int or a pair of ints, each ``>= minimum``) as a pair; else ``TypeError`` / ``ValueError``."""
    if isinstance(v, bool) or not isinstance(v, (int, Sequence)) or isinstance(v, str):
        raise TypeError(f"{fn}: expected {name} to be an int or a pair of ints, got {v!r}")
    pair_ = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair_) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair_):
        raise TypeError(f"{fn}: expected {name} to be an int or a pair of ints, got {v!r}")
    if min(pair_) < minimum:
        raise ValueError(f"{fn}: expected {name} >= {minimum}, got {v!r}")
    return pair_


def _check_x(fn: str, x, dtype: torch.dtype, device: torch.device, any_float: bool = False) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: expected x to be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES and not (any_float and x.dtype.is_floating_point):
        raise TypeError(f"{fn}: expected x of dtype float16, bfloat16 or float32, got {x.dtype}")
    if x.dtype != dtype:
        raise TypeError(f"{fn}: expected x of the weight's dtype {dtype}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{fn}: expected x on the weight's device {device}, got {x.device}")


def _check_bias(fn: str, bias, n: int, dtype: torch.dtype, device: torch.device) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{fn}: expected bias to be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (n,):
        raise ValueError(f"{fn}: expected bias of shape ({n},), got {tuple(bias.shape)}")
    if bias.dtype != dtype:
        raise TypeError(f"{fn}: expected bias of the weight's dtype {dtype}, got {bias.dtype}")
    if bias.device != device:
        raise ValueError(f"{fn}: expected bias on the weight's device {device}, got {bias.device}")


def check_sparse24_linear(fn: str, x, w24, bias, *, any_float: bool = False) -> None:
    """``x`` ``[..., in]`` of ``w24``'s dtype and device, ``bias`` None or ``[out]`` likewise.

    ``any_float`` admits every floating dtype (the float64 references), not only the kernels' three.
    """
    if not isinstance(w24, Sparse24Weight):
        raise TypeError(f"{fn}: expected w24 to be a Sparse24Weight (see compress_24), got {type(w24).__name__}")
    _check_x(fn, x, w24.dtype, w24.device, any_float)
    if x.dim() < 1 or x.shape[-1] != w24.shape[1]:
        raise ValueError(
            f"{fn}: expected x of shape [..., {w24.shape[1]}] (in_features of the weight), got {tuple(x.shape)}"
        )
    _check_bias(fn, bias, w24.shape[0], w24.dtype, w24.device)


def check_block_sparse_linear(fn: str, x, wb, bias, *, any_float: bool = False) -> None:
    """``x`` ``[..., in]`` of ``wb``'s dtype and device, ``bias`` None or ``[out]`` likewise (``any_float``: as
    :func:`check_sparse24_linear`)."""
    if not isinstance(wb, BlockSparseWeight):
        raise TypeError(f"{fn}: expected wb to be a BlockSparseWeight (see compress_blocks), got {type(wb).__name__}")
    _check_x(fn, x, wb.dtype, wb.device, any_float)
    n, k = wb.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{fn}: expected x of shape [..., {k}] (the weight's in_features), got {tuple(x.shape)}")
    _check_bias(fn, bias, n, wb.dtype, wb.device)


def check_sparse24_conv2d(
    fn: str, x, w24, bias, stride: IntPair, padding: IntPair, dilation: IntPair, kernel_size: Optional[IntPair],
    *, any_float: bool = False,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    """The conv contract; returns ``(stride, padding, dilation, kernel_size)`` as pairs of ints.

    ``kernel_size`` None means square: ``kh = kw = sqrt(taps)`` where ``taps = in_features(w24) / C``.
    ``any_float``: as :func:`check_sparse24_linear`.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: expected x to be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(w24, Sparse24Weight):
        raise TypeError(f"{fn}: expected w24 to be a Sparse24Weight (see compress_24), got {type(w24).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{fn}: expected x of shape [B, C, H, W], got {x.dim()}-D with shape {tuple(x.shape)}")
    stride = pair(fn, "stride", stride, 1)
    padding = pair(fn, "padding", padding, 0)
    dilation = pair(fn, "dilation", dilation, 1)
    n, k = w24.shape
    c = x.shape[1]
    if c == 0 or c % 4 != 0 or k % c != 0:
        raise ValueError(
            f"{fn}: expected x's channel count C to be a multiple of 4 that divides the weight's "
            f"kh * kw * in = {k}, got C={c}"
        )
    taps = k // c
    if kernel_size is None:
        side = math.isqrt(taps)
        if side * side != taps:
            raise ValueError(
                f"{fn}: the weight has kh * kw = {taps} kernel positions, which is not a square; pass kernel_size=(kh, kw)"
            )
        kernel_size = (side, side)
    else:
        kernel_size = pair(fn, "kernel_size", kernel_size, 1)
        if kernel_size[0] * kernel_size[1] != taps:
            raise ValueError(
                f"{fn}: expected kernel_size with kh * kw = {taps} (weight {w24.shape} over C={c}), got {kernel_size}"
            )
    _check_x(fn, x, w24.dtype, w24.device, any_float)
    for axis, size in ((0, x.shape[2]), (1, x.shape[3])):
        span = dilation[axis] * (kernel_size[axis] - 1) + 1
        if size + 2 * padding[axis] < span:
            raise ValueError(
                f"{fn}: input {tuple(x.shape[2:])} is smaller than the dilated kernel {kernel_size} "
                f"(padding {padding}, dilation {dilation}): the output would be empty"
            )
    _check_bias(fn, bias, n, w24.dtype, w24.device)
    return stride, padding, dilation, kernel_size
