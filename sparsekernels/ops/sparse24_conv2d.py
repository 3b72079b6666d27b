"""2:4 sparse Conv2d as an implicit GEMM over channels-last activations: the Triton kernel, its launcher, the
pure-PyTorch reference and the ``sparsekernels::sparse24_conv2d`` custom op.

The weight ``[out, in, kh, kw]`` is viewed as ``[out, kh * kw * in]`` in channels-last order
(:func:`sparsekernels.formats.sparse24.conv_weight_to_2d`) and compressed with
:func:`~sparsekernels.formats.sparse24.compress_24`, so each group of 4 runs along input channels at one kernel
position (``in`` must be a multiple of 4). The convolution is then a GEMM
``out[pixel, o] = sum_k im2col(x)[pixel, k] * W[o, k]`` whose A operand is gathered on the fly from the
channels-last input (never materialised) and whose B operand is expanded from the 2:4 values and metadata tile
by tile in registers.

Input permutation: a weight stored with its input channels permuted (``Sparse24Weight.input_perm`` of length ``C``,
the same at every kernel position) is applied in the activation load. With the constexpr ``HAS_PERM`` the program
loads the channel tile's slice of the permutation and gathers the input channels through it, masking any index
outside ``[0, C)``; without it the load is the plain one.

Output memory format: channels-last when ``x`` is channels-last (and not also NCHW-contiguous), else contiguous
NCHW -- the rule ``nn.Conv2d`` follows, for every backend (:func:`sparsekernels.ops.routing.conv_output_format`).

Triton is imported at the top: this module is imported by :mod:`sparsekernels.ops.functional` when the op is
first called. Which backend runs is decided by :mod:`sparsekernels.ops.routing`.
"""
from __future__ import annotations

# typing.Sequence (not collections.abc): torch < 2.8 evaluates the custom op's string annotations in
# its own namespace, where only typing's names exist.
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..formats.sparse24 import Sparse24Weight, conv_weight_from_2d
from . import checks, routing
from .sparse24_linear import gather_index, select_24

__all__ = ["launch_sparse24_conv2d", "sparse24_conv2d_reference", "conv_output_size", "autotune_configs"]

OP_NAME = "sparsekernels::sparse24_conv2d"


def conv_output_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Output length of a convolution along one axis (input ``size``, kernel ``k``, stride, padding, dilation)."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


# ----------------------------------------------------------------------------------------------------
# Triton kernel


@triton.jit
def _sparse24_conv2d_kernel(
    x_ptr, vals_ptr, meta_ptr, bias_ptr, perm_ptr, out_ptr,
    M, N, C, H, W, OH, OW, M_BUCKET,
    stride_xb, stride_xh, stride_xw, stride_xc,
    stride_ob, stride_oh, stride_ow, stride_on,
    stride_vn, stride_mn,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr,
    KW: tl.constexpr,
    IS_GEMM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_PERM: tl.constexpr,
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
                if HAS_PERM:  # stored channel c reads input channel perm[c]
                    src, src_ok = gather_index(perm_ptr, c, c_ok, C)
                else:
                    src = c
                    src_ok = c_ok
                a = tl.load(
                    x_rows[:, None] + src[None, :] * stride_xc,
                    mask=pix_ok[:, None] & src_ok[None, :],
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
                w = select_24(pos, nibble, v0, v1)
                acc += tl.dot(a, w.to(a.dtype), input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_rows = out_ptr + b.to(tl.int64) * stride_ob + oh * stride_oh + ow * stride_ow
    tl.store(
        out_rows[:, None] + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


def autotune_configs() -> list[tuple[int, int, int, int, int]]:
    """GPU configs: (BLOCK_M pixels, BLOCK_N out channels, BLOCK_K in channels per step, warps, stages)."""
    return (
    (64, 64, 32, 4, 3),
    (128, 64, 32, 4, 3),
    (64, 128, 32, 4, 3),
    (128, 128, 32, 8, 3),
    (128, 64, 64, 4, 3),
    (64, 64, 64, 4, 4),
    (32, 64, 64, 4, 4),
    (32, 32, 32, 2, 4),
)


_AUTOTUNE_KEY = ["M_BUCKET", "N", "C", "H", "W", "KH", "KW", "IS_GEMM", "HAS_BIAS", "HAS_PERM"]
_TUNED = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in autotune_configs()
    ],
    key=_AUTOTUNE_KEY,
)(_sparse24_conv2d_kernel)
# Under TRITON_INTERPRET=1 there is no GPU driver to autotune with: one fixed, small config.
INTERPRETER_CONFIG = (16, 16, 16, 4, 1)


def launch_sparse24_conv2d(x, values, meta, bias, stride, padding, dilation, kernel_size, input_perm=None, *,
                           out=None) -> torch.Tensor:
    """Run the Triton kernel (``x`` ``[B, C, H, W]``, geometry as ints or pairs of ints; ``input_perm`` None or the
    weight's ``int64 [C]`` input-channel permutation, gathered in the kernel's activation load).

    The inputs are checked against the op's contract (:func:`sparsekernels.ops.checks.check_sparse24_conv2d_tensors`:
    shapes and dtypes, and that ``input_perm`` is a permutation), so no tensor is read out of bounds whatever the
    metadata holds; the kernel masks the gathered channel indices besides.
    ``out`` is a knob for tests (they poison it to check every element is written); by default it is allocated
    here, in the output memory format of :func:`sparsekernels.ops.routing.conv_output_format`.

    Raises:
        TypeError / ValueError: inputs outside the op's contract, or an ``out`` of the wrong shape.
        RuntimeError: a device / dtype the Triton kernel cannot compute (:func:`routing.check_triton_runs`).
    """
    fn = "launch_sparse24_conv2d()"
    stride, padding, dilation, kernel_size = checks.check_sparse24_conv2d_tensors(
        fn, x, values, meta, bias, stride, padding, dilation, kernel_size, input_perm)
    routing.check_triton_runs(fn, x.device, x.dtype)
    bsz, c, h, w = x.shape
    n = values.shape[0]
    kh, kw = kernel_size
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh, ow = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
    if out is None:
        out = torch.empty((bsz, n, oh, ow), dtype=x.dtype, device=x.device,
                          memory_format=routing.conv_output_format(x))
    elif not isinstance(out, torch.Tensor) or tuple(out.shape) != (bsz, n, oh, ow) or out.dtype != x.dtype \
            or out.device != x.device:
        raise ValueError(
            f"{fn}: expected out to be None or a {x.dtype} tensor of shape {(bsz, n, oh, ow)} on {x.device}")
    m = bsz * oh * ow
    if m == 0:
        return out
    # Channels-last activations: consecutive input channels are contiguous, so the A tile's K axis is coalesced.
    x = x.contiguous(memory_format=torch.channels_last)
    values, meta = values.contiguous(), meta.contiguous()
    perm = input_perm.contiguous() if input_perm is not None else None  # the kernel reads it with stride 1
    args = (
        x, values, meta, bias if bias is not None else values, perm if perm is not None else meta, out,
        m, n, c, h, w, oh, ow, routing.pow2_bucket(m),
        x.stride(0), x.stride(2), x.stride(3), x.stride(1),
        out.stride(0), out.stride(2), out.stride(3), out.stride(1),
        values.stride(0), meta.stride(0),
        sh, sw, ph, pw, dh, dw,
    )
    meta_args = dict(
        KH=kh, KW=kw, IS_GEMM=(kh, kw) == (1, 1) and (sh, sw) == (1, 1) and (ph, pw) == (0, 0),
        HAS_BIAS=bias is not None, HAS_PERM=perm is not None,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )
    if routing.interpreter_enabled() and x.device.type == "cpu":
        bm, bn, bk, warps, stages = INTERPRETER_CONFIG
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        _sparse24_conv2d_kernel[grid](*args, **meta_args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                      num_warps=warps, num_stages=stages)
    else:
        def grid(cfg):
            return (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))

        with torch.cuda.device(x.device):
            _TUNED[grid](*args, **meta_args)
    return out


# ----------------------------------------------------------------------------------------------------
# Reference (pure PyTorch): explicit channels-last im2col, then a GEMM with the expanded 2:4 weight


def _reference(x, values, meta, bias, stride, padding, dilation, kernel_size, input_perm=None) -> torch.Tensor:
    bsz, c, h, w = x.shape
    n, k = values.shape[0], values.shape[1] * 2
    kh, kw = kernel_size
    oh = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    ow = conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    output_format = routing.conv_output_format(x)
    if input_perm is not None:  # gather the input channels, as the kernel does
        x = x.index_select(1, input_perm)
    # unfold gives [B, C * kh * kw, L] ordered (c, r, s); the 2:4 weight is ordered (r, s, c).
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.reshape(bsz, c, kh * kw, oh * ow).permute(0, 3, 2, 1).reshape(bsz * oh * ow, k)
    out = cols @ Sparse24Weight(values, meta, (n, k)).stored_dense().t()
    if bias is not None:
        out = out + bias
    out = out.reshape(bsz, oh, ow, n).permute(0, 3, 1, 2)
    return out.contiguous(memory_format=output_format)


def sparse24_conv2d_reference(
    x: torch.Tensor,
    w24: Sparse24Weight,
    bias: Optional[torch.Tensor] = None,
    stride: checks.IntPair = 1,
    padding: checks.IntPair = 0,
    dilation: checks.IntPair = 1,
    *,
    kernel_size: checks.IntPair,
) -> torch.Tensor:
    """Pure-PyTorch 2:4 Conv2d: channels-last im2col (``F.unfold``) times the expanded weight (in its stored order,
    on the input channels gathered by ``w24.input_perm`` when it has one).

    Same arguments (``kernel_size`` required) and result as :func:`sparsekernels.sparse24_conv2d`; computes in
    ``x``'s dtype, any floating dtype (pass float64 tensors, e.g. ``w24.to(torch.float64)``, for a float64
    reference).
    """
    geometry = checks.check_sparse24_conv2d("sparse24_conv2d_reference()", x, w24, bias, stride, padding, dilation,
                                            kernel_size, any_float=True)
    return _reference(x, w24.values, w24.meta, bias, *geometry, w24.input_perm)


# ----------------------------------------------------------------------------------------------------
# The custom op


@torch.library.custom_op(OP_NAME, mutates_args=())
def sparse24_conv2d_op(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    kernel_size: Sequence[int],
    backend: str,
    input_perm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``sparsekernels::sparse24_conv2d``: the contract of :func:`sparsekernels.sparse24_conv2d` on its tensors,
    checked again here (the op can be called directly), then the backend resolved by
    :func:`sparsekernels.ops.routing.resolve`. ``input_perm``: the weight's input-channel permutation (or None)."""
    geometry = checks.check_sparse24_conv2d_tensors(OP_NAME, x, values, meta, bias, stride, padding, dilation,
                                                    kernel_size, input_perm)
    backend = routing.resolve("sparse24_conv2d", OP_NAME, backend, x)
    return routing.run("sparse24_conv2d", backend, x, values, meta, bias, *geometry, *routing.perm_args(input_perm))


@sparse24_conv2d_op.register_fake
def _sparse24_conv2d_fake(x, values, meta, bias, stride, padding, dilation, kernel_size, backend, input_perm=None):
    checks.check_sparse24_conv2d_tensors(OP_NAME, x, values, meta, bias, stride, padding, dilation, kernel_size,
                                         input_perm, contents=False)
    bsz, _, h, w = x.shape
    oh = conv_output_size(h, kernel_size[0], stride[0], padding[0], dilation[0])
    ow = conv_output_size(w, kernel_size[1], stride[1], padding[1], dilation[1])
    return torch.empty((bsz, values.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=routing.conv_output_format(x))


def _sparse24_conv2d_setup(ctx, inputs, output):
    x, values, meta, bias, stride, padding, dilation, kernel_size, backend, input_perm = inputs
    ctx.save_for_backward(values, meta, input_perm)
    ctx.x_shape = tuple(x.shape)
    ctx.geometry = (tuple(stride), tuple(padding), tuple(dilation), tuple(kernel_size))


def _sparse24_conv2d_backward(ctx, grad):
    """Input (and bias) gradient, so a frozen sparse conv can sit inside a model that trains; the compressed
    weight gets none (sparse layers are for inference)."""
    values, meta, input_perm = ctx.saved_tensors
    if ctx.needs_input_grad[1]:
        raise RuntimeError(
            "sparsekernels::sparse24_conv2d: no gradient for the compressed weight (sparse layers are "
            "inference-only; gradients flow to the input and the bias only)"
        )
    stride, padding, dilation, kernel_size = ctx.geometry
    grad_x = None
    if ctx.needs_input_grad[0]:
        w24 = Sparse24Weight(values, meta, (values.shape[0], values.shape[1] * 2), input_perm)
        weight = conv_weight_from_2d(w24.to_dense(), ctx.x_shape[1], kernel_size).to(grad.dtype)  # original order
        grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, weight, grad, stride, padding, dilation)
    grad_b = grad.sum((0, 2, 3)) if ctx.needs_input_grad[3] else None
    return grad_x, None, None, grad_b, None, None, None, None, None, None


sparse24_conv2d_op.register_autograd(_sparse24_conv2d_backward, setup_context=_sparse24_conv2d_setup)

routing.register_kernel("sparse24_conv2d", "triton", launch_sparse24_conv2d)
routing.register_kernel("sparse24_conv2d", "reference", _reference)
