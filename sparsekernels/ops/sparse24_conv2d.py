"""2:4 sparse Conv2d as an implicit GEMM over channels-last activations.

The weight ``[out, in, kh, kw]`` is viewed as ``[out, kh * kw * in]`` in channels-last order
(``weight.permute(0, 2, 3, 1).reshape(out, -1)``) and compressed with
:func:`sparsekernels.formats.sparse24.compress_24`, so each group of 4 runs along input channels at one
kernel position (``in`` must be a multiple of 4). The convolution is then a GEMM
``out[pixel, o] = sum_k im2col(x)[pixel, k] * W[o, k]`` whose A operand is gathered on the fly from the
channels-last input (never materialised) and whose B operand is expanded from the 2:4 values and
metadata tile by tile in registers.

One file, as every op: the Triton kernel, its launcher, the ``sparsekernels::sparse24_conv2d`` custom op
with a fake implementation, a pure-PyTorch reference (explicit im2col + GEMM), and the public function.

Output memory format: channels-last when ``x`` is channels-last (and not also NCHW-contiguous), else
contiguous NCHW -- the rule ``nn.Conv2d`` follows, for every backend.
"""
from __future__ import annotations

import math
# typing.Sequence (not collections.abc): torch < 2.8 evaluates the custom op's string annotations in
# its own namespace, where only typing's names exist.
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..formats.sparse24 import Sparse24Weight, unpack_indices
from ._backend import (
    check_bias_like_x,
    check_x_like_weight,
    cpu_fast_path_applies,
    interpreter_enabled,
    pow2_bucket,
    resolve_backend,
)
from ._cache import _cached as cached

__all__ = ["sparse24_conv2d", "sparse24_conv2d_reference", "conv_weight_to_2d", "conv_weight_from_2d"]

OP_NAME = "sparsekernels::sparse24_conv2d"

IntPair = Union[int, Sequence[int]]


# --------------------------------------------------------------------------------------------------
# Weight layout helpers
# --------------------------------------------------------------------------------------------------
def conv_weight_to_2d(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in, kh, kw]`` -> ``[out, kh * kw * in]`` (channels-last order, groups along ``in``)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def conv_weight_from_2d(weight2d: torch.Tensor, in_channels: int, kernel_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`conv_weight_to_2d`: ``[out, kh * kw * in]`` -> contiguous ``[out, in, kh, kw]``."""
    kh, kw = kernel_size
    # clone(contiguous_format), not .contiguous(): a permuted 1x1 weight already counts as contiguous but
    # keeps channels-last strides, which would make F.conv2d pick (and return) channels-last.
    return weight2d.reshape(weight2d.shape[0], kh, kw, in_channels).permute(0, 3, 1, 2).clone(
        memory_format=torch.contiguous_format
    )


def _dense_conv_weight(values, meta, in_channels: int, kernel_size) -> torch.Tensor:
    n, k = values.shape[0], values.shape[1] * 2
    return conv_weight_from_2d(Sparse24Weight(values, meta, (n, k)).to_dense(), in_channels, kernel_size)


def _cached_dense_conv_weight(values, meta, in_channels: int, kernel_size) -> torch.Tensor:
    """The dense conv weight for ``values``/``meta``, expanded once and kept while ``values`` lives
    (rebuilt when either tensor changes: see :func:`~sparsekernels.ops._cache.cached`). Kept in a side
    table, not on the tensor, so ``torch.save`` never pickles the dense copy."""
    return cached(
        values, ("conv_dense", in_channels, kernel_size), (meta,), _dense_conv_weight, values, meta, in_channels,
        kernel_size,
    )


def _cpu_auto(x, values, meta, bias, stride, padding, dilation, kernel_size) -> torch.Tensor:
    """CPU ``"auto"``: ``F.conv2d`` (oneDNN) on the cached dense copy.

    Neither the im2col reference (1.5-7.9x the time of nn.Conv2d) nor expanding per call (1.07-1.77x)
    keeps up with nn.Conv2d; the cached copy is nn.Conv2d plus the per-call Python work, which the
    eager fast path (SparseConv2d.forward, sparse24_conv2d) keeps small by skipping the custom op
    (~20 us of dispatch per call). Measured 2026-11-25, shared 2-core EPYC, torch.set_num_threads(1),
    fp32, batch 1, best of 7 alternating rounds of 30 calls, time(dense) / time(sparse):

        shape (ResNet-50)      before (through the custom op)     now (fast path)
                               module    sparse24_conv2d          module    sparse24_conv2d
        64->64   1x1 @56x56    0.92x     0.89x                    0.99x     0.95x
        64->64   3x3 @56x56    0.98x     0.95x                    1.00x     0.99x
        64->256  1x1 @56x56    0.96x     0.95x                    1.00x     0.98x
        256->64  1x1 @56x56    0.96x     0.95x                    0.99x     0.98x

    (module: SparseConv2d vs nn.Conv2d; sparse24_conv2d, which also checks its arguments (~7 us), vs
    F.conv2d.) bench.layers' quick CPU suite (5 interleaved rounds) gives auto 1.18x / 0.98x of dense
    on the first two rows (1.10x / 0.97x before). The reported 0.4-0.5x did not reproduce; it matches
    that suite's "reference" (im2col) rows, 0.43x / 0.26x, not "auto".
    """
    weight = _cached_dense_conv_weight(values, meta, x.shape[1], kernel_size)
    return _dense(x, weight, bias, stride, padding, dilation)


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _output_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# --------------------------------------------------------------------------------------------------
# Triton kernel (triton is imported lazily: only when a kernel is launched)
# --------------------------------------------------------------------------------------------------
_KERNEL = None
_select_24 = None  # the shared @triton.jit 2:4 selection (sparse24_linear._select_24_jit), bound lazily


def _autotune_configs():
    """GPU configs over (BLOCK_M pixels, BLOCK_N out channels, BLOCK_K in channels per step)."""
    import triton

    shapes = (
        (64, 64, 32, 4, 3),
        (128, 64, 32, 4, 3),
        (64, 128, 32, 4, 3),
        (128, 128, 32, 8, 3),
        (128, 64, 64, 4, 3),
        (64, 64, 64, 4, 4),
        (32, 64, 64, 4, 4),
        (32, 32, 32, 2, 4),
    )
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def _interpreter_config():
    """One fixed config: autotuning needs a GPU driver, the interpreter has none."""
    import triton

    return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]


def _get_kernel():
    global _KERNEL, _select_24
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    from .sparse24_linear import _select_24_jit

    _select_24 = _select_24_jit()
    configs = _interpreter_config() if interpreter_enabled() else _autotune_configs()

    @triton.autotune(configs=configs, key=["M_BUCKET", "N", "C", "H", "W", "KH", "KW", "IS_GEMM", "HAS_BIAS"])
    @triton.jit
    def _sparse24_conv2d_kernel(
        x_ptr, vals_ptr, meta_ptr, bias_ptr, out_ptr,
        M, N, C, H, W, OH, OW, M_BUCKET,
        stride_xb, stride_xh, stride_xw, stride_xc,
        stride_ob, stride_oh, stride_ow, stride_on,
        stride_vn, stride_mn,
        SH, SW, PH, PW, DH, DW,
        KH: tl.constexpr,
        KW: tl.constexpr,
        IS_GEMM: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_c = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N
        # output pixel -> (batch, oh, ow)
        ow = offs_m % OW
        oh = (offs_m // OW) % OH
        b = offs_m // (OW * OH)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        vals_rows = vals_ptr + offs_n[None, :] * stride_vn
        meta_rows = meta_ptr + offs_n[None, :] * stride_mn
        for r in tl.static_range(KH):
            for s in tl.static_range(KW):
                if IS_GEMM:
                    # 1x1, stride 1, no padding on a channels-last contiguous input: a plain GEMM whose
                    # rows are pixels, so no window arithmetic and no bounds beyond M.
                    # (pixel stride is C: strides of size-1 dims may be anything, so not stride_xw)
                    x_rows = x_ptr + offs_m.to(tl.int64) * C
                    pix_ok = m_mask
                else:
                    ih = oh * SH - PH + r * DH
                    iw = ow * SW - PW + s * DW
                    pix_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    x_rows = x_ptr + b.to(tl.int64) * stride_xb + ih * stride_xh + iw * stride_xw
                k_base = (r * KW + s) * C
                for c0 in range(0, C, BLOCK_K):
                    c = c0 + offs_c
                    c_ok = c < C
                    a = tl.load(
                        x_rows[:, None] + c[None, :] * stride_xc,
                        mask=pix_ok[:, None] & c_ok[None, :],
                        other=0.0,
                    )
                    # Expand the 2:4 weight tile [BLOCK_K, BLOCK_N]: dense column k of group g = k // 4
                    # holds value 2g or 2g + 1 (or zero) by its in-group position k % 4. Gathered per
                    # column: a K tile here need not start on a metadata byte (C may be 4 mod 8).
                    k = k_base + c
                    g = k // 4
                    w_mask = c_ok[:, None] & n_mask[None, :]
                    v0 = tl.load(vals_rows + (2 * g)[:, None], mask=w_mask, other=0.0)
                    v1 = tl.load(vals_rows + (2 * g + 1)[:, None], mask=w_mask, other=0.0)
                    byte = tl.load(meta_rows + (g // 2)[:, None], mask=w_mask, other=0).to(tl.int32)
                    nibble = (byte >> ((g % 2) * 4)[:, None]) & 0xF
                    pos = (k % 4)[:, None]
                    w = _select_24(pos, nibble, v0, v1)
                    acc += tl.dot(a, w.to(a.dtype), input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out_rows = out_ptr + b.to(tl.int64) * stride_ob + oh * stride_oh + ow * stride_ow
        tl.store(
            out_rows[:, None] + offs_n[None, :] * stride_on,
            acc.to(out_ptr.dtype.element_ty),
            mask=m_mask[:, None] & n_mask[None, :],
        )

    _KERNEL = _sparse24_conv2d_kernel
    return _KERNEL


def _new_output(shape, dtype, device, memory_format) -> torch.Tensor:
    """The kernel's output buffer, uninitialised (tests replace this to poison it)."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def _launch_triton(x, values, meta, bias, stride, padding, dilation, kernel_size) -> torch.Tensor:
    import triton

    bsz, c, h, w = x.shape
    n = values.shape[0]
    kh, kw = kernel_size
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh, ow = _out_size(h, kh, sh, ph, dh), _out_size(w, kw, sw, pw, dw)
    out = _new_output((bsz, n, oh, ow), x.dtype, x.device, _output_format(x))
    m = bsz * oh * ow
    if m == 0:
        return out
    # Channels-last activations: consecutive input channels are contiguous, so the A tile's K axis
    # is coalesced.
    x = x.contiguous(memory_format=torch.channels_last)
    values, meta = values.contiguous(), meta.contiguous()
    is_gemm = (kh, kw) == (1, 1) and (sh, sw) == (1, 1) and (ph, pw) == (0, 0)
    kernel = _get_kernel()
    grid = lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))  # noqa: E731
    kernel[grid](
        x, values, meta, bias if bias is not None else values, out,
        m, n, c, h, w, oh, ow, pow2_bucket(m),
        x.stride(0), x.stride(2), x.stride(3), x.stride(1),
        out.stride(0), out.stride(2), out.stride(3), out.stride(1),
        values.stride(0), meta.stride(0),
        sh, sw, ph, pw, dh, dw,
        KH=kh,
        KW=kw,
        IS_GEMM=is_gemm,
        HAS_BIAS=bias is not None,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )
    return out


# --------------------------------------------------------------------------------------------------
# Reference (pure PyTorch): explicit channels-last im2col, then a GEMM with the expanded 2:4 weight
# --------------------------------------------------------------------------------------------------
def _reference(x, values, meta, bias, stride, padding, dilation, kernel_size) -> torch.Tensor:
    bsz, c, h, w = x.shape
    n, k = values.shape[0], values.shape[1] * 2
    kh, kw = kernel_size
    oh = _out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _out_size(w, kw, stride[1], padding[1], dilation[1])
    # unfold gives [B, C * kh * kw, L] ordered (c, r, s); the 2:4 weight is ordered (r, s, c).
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.reshape(bsz, c, kh * kw, oh * ow).permute(0, 3, 2, 1).reshape(bsz * oh * ow, k)
    # Expand the 2:4 weight by scattering values to their positions (same as Sparse24Weight.to_dense).
    pos = unpack_indices(meta, k // 4)
    idx = (torch.arange(0, k, 4, device=meta.device).view(1, -1, 1) + pos).reshape(n, k // 2)
    dense = torch.zeros(n, k, dtype=values.dtype, device=values.device).scatter_(1, idx, values)
    out = cols @ dense.t()
    if bias is not None:
        out = out + bias
    out = out.reshape(bsz, oh, ow, n).permute(0, 3, 1, 2)
    return out.contiguous(memory_format=_output_format(x))


def _dense(x, weight4d, bias, stride, padding, dilation) -> torch.Tensor:
    out = F.conv2d(x, weight4d, bias, stride, padding, dilation)
    return out.contiguous(memory_format=_output_format(x))


# --------------------------------------------------------------------------------------------------
# Custom op
# --------------------------------------------------------------------------------------------------
def _dispatch_key(x, n, stride, padding, dilation, kernel_size, has_bias) -> tuple:
    bsz, c, h, w = x.shape
    fmt = "channels_last" if _output_format(x) == torch.channels_last else "contiguous"
    # batch bucketed to powers of two (B=3 and B=4 share a decision)
    return (pow2_bucket(bsz), c, h, w, n, *kernel_size, *stride, *padding, *dilation, fmt, str(x.dtype), has_bias)


@torch.library.custom_op(OP_NAME, mutates_args=())
def _sparse24_conv2d_op(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    kernel_size: Sequence[int],
    backend: str,
) -> torch.Tensor:
    stride, padding, dilation, kernel_size = tuple(stride), tuple(padding), tuple(dilation), tuple(kernel_size)
    c = x.shape[1]
    choice = resolve_backend("sparse24_conv2d()", backend, x.device)
    if choice == "cusparselt":
        raise RuntimeError("sparse24_conv2d(): backend 'cusparselt' supports Linear layers only; use 'triton' or 'dense'")
    if choice == "auto" and x.device.type == "cuda":
        from . import dispatch

        candidates = {
            "triton": lambda: _launch_triton(x, values, meta, bias, stride, padding, dilation, kernel_size),
            "dense": lambda: _cpu_auto(x, values, meta, bias, stride, padding, dilation, kernel_size),
        }
        choice = dispatch.select(
            "sparse24_conv2d", _dispatch_key(x, values.shape[0], stride, padding, dilation, kernel_size, bias is not None),
            candidates, default="dense", device=x.device,
        )
        return candidates[choice]()
    if choice == "auto":  # CPU: see _cpu_auto
        return _cpu_auto(x, values, meta, bias, stride, padding, dilation, kernel_size)
    if choice == "triton":
        return _launch_triton(x, values, meta, bias, stride, padding, dilation, kernel_size)
    if choice == "reference":
        return _reference(x, values, meta, bias, stride, padding, dilation, kernel_size)
    return _dense(x, _dense_conv_weight(values, meta, c, kernel_size), bias, stride, padding, dilation)


@_sparse24_conv2d_op.register_fake
def _(x, values, meta, bias, stride, padding, dilation, kernel_size, backend):
    bsz, _, h, w = x.shape
    oh = _out_size(h, kernel_size[0], stride[0], padding[0], dilation[0])
    ow = _out_size(w, kernel_size[1], stride[1], padding[1], dilation[1])
    return torch.empty(
        (bsz, values.shape[0], oh, ow), dtype=x.dtype, device=x.device, memory_format=_output_format(x)
    )


def _sparse24_conv2d_setup(ctx, inputs, output):
    x, values, meta, bias, stride, padding, dilation, kernel_size, backend = inputs
    ctx.save_for_backward(values, meta)
    ctx.x_shape = tuple(x.shape)
    ctx.geometry = (tuple(stride), tuple(padding), tuple(dilation), tuple(kernel_size))


def _sparse24_conv2d_backward(ctx, grad):
    """Input (and bias) gradient, so a frozen sparse conv can sit inside a model that trains: the same on
    every backend (the CPU fast path gets it from F.conv2d; this covers the custom op)."""
    values, meta = ctx.saved_tensors
    if ctx.needs_input_grad[1]:
        raise RuntimeError(
            "sparsekernels::sparse24_conv2d: no gradient for the compressed weight (sparse layers are "
            "inference-only; gradients flow to the input and the bias only)"
        )
    stride, padding, dilation, kernel_size = ctx.geometry
    grad_x = None
    if ctx.needs_input_grad[0]:
        weight = _dense_conv_weight(values, meta, ctx.x_shape[1], kernel_size).to(grad.dtype)
        grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, weight, grad, stride, padding, dilation)
    grad_b = grad.sum((0, 2, 3)) if ctx.needs_input_grad[3] else None
    return grad_x, None, None, grad_b, None, None, None, None, None


_sparse24_conv2d_op.register_autograd(_sparse24_conv2d_backward, setup_context=_sparse24_conv2d_setup)


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------
def _pair(fn: str, name: str, v, minimum: int) -> tuple[int, int]:
    if isinstance(v, bool) or not isinstance(v, (int, Sequence)) or isinstance(v, str):
        raise TypeError(f"{fn}: expected {name} to be an int or a pair of ints, got {v!r}")
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair):
        raise TypeError(f"{fn}: expected {name} to be an int or a pair of ints, got {v!r}")
    if min(pair) < minimum:
        raise ValueError(f"{fn}: expected {name} >= {minimum}, got {v!r}")
    return pair


def _check_inputs(fn, x, w24, bias, stride, padding, dilation, kernel_size):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: expected x to be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(w24, Sparse24Weight):
        raise TypeError(f"{fn}: expected w24 to be a Sparse24Weight (see compress_24), got {type(w24).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{fn}: expected x of shape [B, C, H, W], got {x.dim()}-D with shape {tuple(x.shape)}")
    stride = _pair(fn, "stride", stride, 1)
    padding = _pair(fn, "padding", padding, 0)
    dilation = _pair(fn, "dilation", dilation, 1)
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
        kernel_size = _pair(fn, "kernel_size", kernel_size, 1)
        if kernel_size[0] * kernel_size[1] != taps:
            raise ValueError(
                f"{fn}: expected kernel_size with kh * kw = {taps} (weight {w24.shape} over C={c}), got {kernel_size}"
            )
    check_x_like_weight(fn, x, w24.dtype, w24.device)
    for axis, size in ((0, x.shape[2]), (1, x.shape[3])):
        if _out_size(size, kernel_size[axis], stride[axis], padding[axis], dilation[axis]) < 1:
            raise ValueError(
                f"{fn}: input {tuple(x.shape[2:])} is smaller than the dilated kernel {kernel_size} "
                f"(padding {padding}, dilation {dilation}): the output would be empty"
            )
    check_bias_like_x(fn, bias, n, x)
    return stride, padding, dilation, kernel_size


def sparse24_conv2d_reference(
    x: torch.Tensor,
    w24: Sparse24Weight,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    *,
    kernel_size: Optional[IntPair] = None,
) -> torch.Tensor:
    """Pure-PyTorch 2:4 Conv2d: channels-last im2col (``F.unfold``) times the expanded weight.

    Same arguments and result as :func:`sparse24_conv2d`; computes in ``x``'s dtype (pass float64
    tensors, e.g. ``w24.to(torch.float64)``, for a float64 reference).
    """
    stride, padding, dilation, kernel_size = _check_inputs(
        "sparse24_conv2d_reference()", x, w24, bias, stride, padding, dilation, kernel_size
    )
    return _reference(x, w24.values, w24.meta, bias, stride, padding, dilation, kernel_size)


def sparse24_conv2d(
    x: torch.Tensor,
    w24: Sparse24Weight,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    *,
    backend: str = "auto",
    kernel_size: Optional[IntPair] = None,
) -> torch.Tensor:
    """2-D convolution (groups = 1, zero padding) with a 2:4-compressed weight.

    Args:
        x: ``[B, C, H, W]`` float16 / bfloat16 / float32 in any memory format; the weight's dtype and
            device. ``C`` a multiple of 4.
        w24: ``compress_24(conv_weight_to_2d(weight))`` for a ``[out, C, kh, kw]`` weight whose every
            group of 4 consecutive input channels at each kernel position has at most 2 non-zeros.
        bias: optional ``[out]``, same dtype and device as ``x``.
        stride, padding, dilation: ints or pairs, as in ``F.conv2d`` (numeric padding only).
        backend: ``"auto"`` (GPU: the dispatcher measures Triton vs cuDNN on a cached dense copy once per
            shape; CPU: ``F.conv2d`` on a dense copy cached on ``w24.values``), ``"triton"``,
            ``"reference"`` or ``"dense"`` (expand, then ``F.conv2d``). ``SPARSEKERNELS_BACKEND`` overrides it.
        kernel_size: ``(kh, kw)``; needed only when ``kh * kw`` is not a square number's square kernel
            (e.g. 1x3); by default ``kh = kw = sqrt(in_features / C)``.

    Returns:
        ``[B, out, OH, OW]`` of ``x``'s dtype; channels-last memory format when ``x`` is channels-last,
        else contiguous.

    Raises:
        TypeError: wrong argument types or dtypes.
        ValueError: wrong shapes, channel count, kernel size, devices, an empty output, unknown backend.
        RuntimeError: ``"triton"`` on a CPU tensor without ``TRITON_INTERPRET=1``; ``"cusparselt"``.
    """
    stride, padding, dilation, kernel_size = _check_inputs(
        "sparse24_conv2d()", x, w24, bias, stride, padding, dilation, kernel_size
    )
    if cpu_fast_path_applies(x, backend):  # eager CPU "auto": skip the custom op's ~20 us dispatch
        return _cpu_auto(x, w24.values, w24.meta, bias, stride, padding, dilation, kernel_size)
    return _sparse24_conv2d_op(x, w24.values, w24.meta, bias, stride, padding, dilation, kernel_size, backend)

