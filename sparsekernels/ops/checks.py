"""The input contract of every op: what each op accepts, checked once at the boundary so that every backend sees
the same, valid inputs and the same inputs get the same verdict on every backend.

Two entry points per op, one contract: ``check_<op>`` for the public function (a compressed-weight object) and
``check_<op>_tensors`` for the ``torch.library`` custom op and the Triton launcher (the raw tensors the weight is
made of). The first checks the object's type and calls the second, so a call through ``torch.ops.sparsekernels.*``
is refused exactly as the public function refuses it.

The checks look at types, dtypes, shapes and devices: O(1) per call. The contents of compressed weights (2:4
metadata, block indices) are checked where weights are built or loaded
(:meth:`~sparsekernels.formats.sparse24.Sparse24Weight.validate`,
:meth:`~sparsekernels.formats.blocksparse.BlockSparseWeight.validate`); the kernels never read outside their
tensors whatever those contents are. An input permutation (``input_perm``) is checked here in full -- a
permutation of the right length -- but once per tensor: the verdict is cached while the tensor lives unchanged
(:func:`sparsekernels.ops.cache.cached`), so a layer pays it on its first call (one device sync on a GPU), not
per call; tracing (``torch.compile``, ``torch.export``, fake tensors) and CUDA-graph capture check only its
dtype, shape and device, and the kernels mask every gathered index, so no value can make them read out of bounds.

Each ``check_*`` raises ``TypeError`` (wrong types or dtypes) or ``ValueError`` (wrong shapes, devices or geometry)
with what was expected and what was given, naming the function ``fn`` the user called. Zero-size dimensions: a
batch of zero rows (or zero images) is accepted and gives an empty output on every backend; an empty weight, an
empty channel or spatial dimension is refused.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..formats.blocksparse import BLOCK_SIZES, INDEX_DTYPE, BlockSparseWeight, cdiv
from ..formats.permutation import check_permutation, check_permutation_tensor
from ..formats.sparse24 import SUPPORTED_DTYPES, Sparse24Weight
from .cache import cached

__all__ = [
    "IntPair",
    "pair",
    "check_sparse24_linear",
    "check_sparse24_linear_tensors",
    "check_sparse24_conv2d",
    "check_sparse24_conv2d_tensors",
    "check_block_sparse_linear",
    "check_block_sparse_linear_tensors",
    "check_input_perm",
]

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


def _check_tensor(fn: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: expected {name} to be a torch.Tensor, got {type(t).__name__}")


def _check_int(fn: str, name: str, v, minimum: int, multiple: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{fn}: expected {name} to be an int, got {type(v).__name__}")
    if v < minimum or v % multiple:
        what = f">= {minimum}" if multiple == 1 else f"a positive multiple of {multiple}"
        raise ValueError(f"{fn}: expected {name} {what}, got {v}")


def _check_x(fn: str, x, dtype: torch.dtype, device: torch.device, any_float: bool) -> None:
    _check_tensor(fn, "x", x)
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


def _check_24_parts(fn: str, values, meta, k: int) -> int:
    """2:4 ``values`` ``[N, k / 2]`` (floating) and ``meta`` ``uint8 [N, ceil(k / 8)]`` on one device; returns N."""
    _check_tensor(fn, "values", values)
    _check_tensor(fn, "meta", meta)
    if not values.dtype.is_floating_point:
        raise TypeError(f"{fn}: expected floating-point weight values, got {values.dtype}")
    if meta.dtype != torch.uint8:
        raise TypeError(f"{fn}: expected uint8 weight metadata, got {meta.dtype}")
    if values.dim() != 2 or values.shape[0] < 1 or values.shape[1] != k // 2:
        raise ValueError(f"{fn}: expected weight values of shape [out >= 1, {k // 2}], got {tuple(values.shape)}")
    n = values.shape[0]
    if tuple(meta.shape) != (n, (k + 7) // 8):
        raise ValueError(f"{fn}: expected weight metadata of shape ({n}, {(k + 7) // 8}), got {tuple(meta.shape)}")
    if meta.device != values.device:
        raise ValueError(f"{fn}: expected the weight metadata on the values' device {values.device}, got {meta.device}")
    return n


def _permutation_checked(fn: str, perm: torch.Tensor) -> bool:
    check_permutation(fn, perm, perm.shape[0])
    return True


def _has_values(t: torch.Tensor) -> bool:
    """Whether ``t``'s contents can be read now: not while tracing, capturing a CUDA graph or on the meta device."""
    if t.device.type == "meta" or torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_input_perm(fn: str, input_perm, length: int, device: torch.device, *, contents: bool = True) -> None:
    """``input_perm`` is None or an ``int64 [length]`` permutation of ``0..length-1`` on ``device``.

    The contents are checked once per tensor and version (the verdict is cached while the tensor lives unchanged),
    and only where they can be read (see the module docstring); ``contents=False`` checks dtype, shape and device
    only (the fake implementations).

    Raises:
        TypeError: not a tensor, or not ``int64``.
        ValueError: another shape or device, or not a permutation (naming the first bad position or value).
    """
    if input_perm is None:
        return
    check_permutation_tensor(fn, input_perm, length)
    if input_perm.device != device:
        raise ValueError(f"{fn}: expected input_perm on the weight's device {device}, got {input_perm.device}")
    if contents and _has_values(input_perm):
        cached(input_perm, "input_perm_checked", (), _permutation_checked, fn, input_perm)


def check_sparse24_linear_tensors(fn: str, x, values, meta, bias, in_features, input_perm=None, *,
                                  any_float: bool = False, contents: bool = True) -> None:
    """The 2:4 Linear contract on the custom op's tensors: ``x`` ``[..., in_features]`` of the values' dtype and
    device (any number of rows, zero included), ``values`` ``[out, in_features / 2]``, ``meta``
    ``uint8 [out, ceil(in_features / 8)]``, ``bias`` None or ``[out]`` of the values' dtype and device,
    ``input_perm`` None or an ``int64 [in_features]`` permutation on the values' device (:func:`check_input_perm`).

    ``any_float`` admits every floating dtype (the float64 references), not only the kernels' three; ``contents``:
    see :func:`check_input_perm`.
    """
    _check_int(fn, "in_features", in_features, 4, multiple=4)
    n = _check_24_parts(fn, values, meta, in_features)
    _check_linear_io(fn, x, bias, n, in_features, values, any_float)
    check_input_perm(fn, input_perm, in_features, values.device, contents=contents)


def _check_linear_io(fn: str, x, bias, n: int, k: int, values: torch.Tensor, any_float: bool) -> None:
    """``x`` ``[..., k]`` and ``bias`` None or ``[n]``, both of the values' dtype and device."""
    dtype, device = values.dtype, values.device  # (each .device builds an object: read it once)
    _check_x(fn, x, dtype, device, any_float)
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{fn}: expected x of shape [..., {k}] (in_features of the weight), got {tuple(x.shape)}")
    _check_bias(fn, bias, n, dtype, device)


def check_sparse24_linear(fn: str, x, w24, bias, *, any_float: bool = False) -> None:
    """:func:`check_sparse24_linear_tensors` for a :class:`Sparse24Weight` ``w24`` (its ``input_perm`` included).

    The weight's own parts (shapes, dtypes, one device) were checked when it was built
    (``Sparse24Weight.__post_init__``; it is frozen), so only what comes with the call is checked here, the cost a
    small CPU layer pays on every call."""
    if not isinstance(w24, Sparse24Weight):
        raise TypeError(f"{fn}: expected w24 to be a Sparse24Weight (see compress_24), got {type(w24).__name__}")
    n, k = w24.shape
    _check_linear_io(fn, x, bias, n, k, w24.values, any_float)
    if w24.input_perm is not None:
        check_input_perm(fn, w24.input_perm, k, w24.values.device)


def check_block_sparse_linear_tensors(fn: str, x, values, row_ptr, col_idx, bias, out_features, *,
                                      any_float: bool = False) -> None:
    """The block-sparse Linear contract on the custom op's tensors: ``values`` ``[nnz, bs, bs]`` (``bs`` 16, 32 or
    64), ``row_ptr`` ``int32 [ceil(out_features / bs) + 1]``, ``col_idx`` ``int32 [nnz]`` on one device, ``x``
    ``[..., in >= 1]`` of the values' dtype and device (any number of rows), ``bias`` None or ``[out_features]``
    (``any_float``: as :func:`check_sparse24_linear_tensors`)."""
    _check_int(fn, "out_features", out_features, 1)
    for name, t in (("values", values), ("row_ptr", row_ptr), ("col_idx", col_idx)):
        _check_tensor(fn, name, t)
    if not values.dtype.is_floating_point:
        raise TypeError(f"{fn}: expected floating-point block values, got {values.dtype}")
    if values.dim() != 3 or values.shape[1] not in BLOCK_SIZES or values.shape[2] != values.shape[1]:
        raise ValueError(
            f"{fn}: expected block values of shape [nnz_blocks, bs, bs] with bs in {BLOCK_SIZES}, got "
            f"{tuple(values.shape)}"
        )
    bs, nnz = values.shape[1], values.shape[0]
    for name, t, shape in (("row_ptr", row_ptr, (cdiv(out_features, bs) + 1,)), ("col_idx", col_idx, (nnz,))):
        if t.dtype != INDEX_DTYPE:
            raise TypeError(f"{fn}: expected {name} of dtype {INDEX_DTYPE}, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{fn}: expected {name} of shape {shape}, got {tuple(t.shape)}")
        if t.device != values.device:
            raise ValueError(f"{fn}: expected {name} on the values' device {values.device}, got {t.device}")
    _check_x(fn, x, values.dtype, values.device, any_float)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{fn}: expected x of shape [..., in] with in >= 1, got {tuple(x.shape)}")
    _check_bias(fn, bias, out_features, values.dtype, values.device)


def check_block_sparse_linear(fn: str, x, wb, bias, *, any_float: bool = False) -> None:
    """:func:`check_block_sparse_linear_tensors` for a :class:`BlockSparseWeight` ``wb``, and ``x``
    ``[..., in]`` for the weight's ``in``."""
    if not isinstance(wb, BlockSparseWeight):
        raise TypeError(f"{fn}: expected wb to be a BlockSparseWeight (see compress_blocks), got {type(wb).__name__}")
    n, k = wb.shape
    check_block_sparse_linear_tensors(fn, x, wb.values, wb.row_ptr, wb.col_idx, bias, n, any_float=any_float)
    if x.shape[-1] != k:
        raise ValueError(f"{fn}: expected x of shape [..., {k}] (the weight's in_features), got {tuple(x.shape)}")


Geometry = tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]


def check_sparse24_conv2d_tensors(
    fn: str, x, values, meta, bias, stride: IntPair, padding: IntPair, dilation: IntPair, kernel_size: IntPair,
    input_perm=None, *, any_float: bool = False, contents: bool = True,
) -> Geometry:
    """The 2:4 conv contract on the custom op's tensors; returns ``(stride, padding, dilation, kernel_size)`` as
    pairs of ints.

    ``x`` is ``[B, C, H, W]`` (``B`` may be 0: an empty output) with ``C`` a positive multiple of 4 and
    ``C * kh * kw`` the weight's ``in`` (``values.shape[1] * 2``); ``kernel_size`` is required, because the
    weight alone cannot tell a 3x3 kernel over ``C`` channels from a 1x1 kernel over ``9 C``. ``input_perm``: None
    or an ``int64 [C]`` permutation of the input channels (the same at every kernel position) on the values'
    device. ``any_float``, ``contents``: as :func:`check_sparse24_linear_tensors`.
    """
    _check_tensor(fn, "x", x)
    _check_tensor(fn, "values", values)
    if x.dim() != 4:
        raise ValueError(f"{fn}: expected x of shape [B, C, H, W], got {x.dim()}-D with shape {tuple(x.shape)}")
    stride = pair(fn, "stride", stride, 1)
    padding = pair(fn, "padding", padding, 0)
    dilation = pair(fn, "dilation", dilation, 1)
    if kernel_size is None:
        raise TypeError(
            f"{fn}: expected kernel_size=(kh, kw), got None (the compressed weight does not record it, and a "
            "channel count that divides it differently would be another convolution)"
        )
    kernel_size = pair(fn, "kernel_size", kernel_size, 1)
    k = values.shape[1] * 2 if values.dim() == 2 else -1
    c = x.shape[1]
    if c < 4 or c % 4:
        raise ValueError(f"{fn}: expected x's channel count C to be a positive multiple of 4, got C={c}")
    if k != c * kernel_size[0] * kernel_size[1]:
        raise ValueError(
            f"{fn}: expected a weight of kh * kw * C = {c * kernel_size[0] * kernel_size[1]} inputs per output "
            f"channel (kernel_size={kernel_size}, C={c}), got weight values of shape {tuple(values.shape)}"
        )
    n = _check_24_parts(fn, values, meta, k)
    _check_x(fn, x, values.dtype, values.device, any_float)
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{fn}: expected non-empty spatial dimensions, got x of shape {tuple(x.shape)}")
    for axis, size in ((0, x.shape[2]), (1, x.shape[3])):
        span = dilation[axis] * (kernel_size[axis] - 1) + 1
        if size + 2 * padding[axis] < span:
            raise ValueError(
                f"{fn}: input {tuple(x.shape[2:])} is smaller than the dilated kernel {kernel_size} "
                f"(padding {padding}, dilation {dilation}): the output would be empty"
            )
    _check_bias(fn, bias, n, values.dtype, values.device)
    check_input_perm(fn, input_perm, c, values.device, contents=contents)
    return stride, padding, dilation, kernel_size


def check_sparse24_conv2d(
    fn: str, x, w24, bias, stride: IntPair, padding: IntPair, dilation: IntPair, kernel_size: Optional[IntPair],
    *, any_float: bool = False,
) -> Geometry:
    """:func:`check_sparse24_conv2d_tensors` for a :class:`Sparse24Weight` ``w24`` (``[out, kh * kw * C]``, its
    ``input_perm`` of length ``C`` included)."""
    if not isinstance(w24, Sparse24Weight):
        raise TypeError(f"{fn}: expected w24 to be a Sparse24Weight (see compress_24), got {type(w24).__name__}")
    return check_sparse24_conv2d_tensors(fn, x, w24.values, w24.meta, bias, stride, padding, dilation, kernel_size,
                                         w24.input_perm, any_float=any_float)
