"""2:4 sparse Linear, ``y = x @ W.T + bias`` with ``W`` stored 2:4-compressed: the Triton kernel, its launcher,
the pure-PyTorch reference and the ``sparsekernels::sparse24_linear`` custom op.

Kernel layout. The weight is ``[N = out, K = in]``. A program computes the tile ``W[n-block] @ x[m-block].T``
(operands swapped: the weight's out-dimension fills the MMA's M dimension, so a decode step with one token
still uses a full 16-wide MMA tile on the token side instead of wasting 15/16 of the weight side). It streams
the compressed weight (values + packed 2-bit positions, 0.5625 of the dense bytes in fp16/bf16), expands each
tile in registers and feeds ``tl.dot`` with fp32 accumulation; the bias is fused. At few tokens and large K,
split-K adds programs along K so every SM streams weight bytes; the fp32 partial sums land in a workspace that
one epilogue kernel sums, biases and casts.

Input permutation. A weight stored in a permuted input order (``Sparse24Weight.input_perm``: stored column ``i`` is
the layer's input ``perm[i]``) is applied in the activation load: with the constexpr ``HAS_PERM`` the program
loads the K tile's slice of ``perm`` and gathers ``x`` columns through it, masking any index outside ``[0, K)``
(a zero input), so no permutation value can make it read out of bounds. Without it the load is the plain one.

Triton is imported at the top: this module is imported by :mod:`sparsekernels.ops.functional` when the op is
first called, never by ``import sparsekernels``. Which backend runs is decided by :mod:`sparsekernels.ops.routing`.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..formats.sparse24 import Sparse24Weight
from . import checks, routing

__all__ = [
    "select_24",
    "gather_index",
    "launch_sparse24_linear",
    "sparse24_linear_reference",
    "choose_split_k",
    "few_token_configs",
    "many_token_configs",
    "INTERPRETER_CONFIG",
    "SPLIT_K_ENV_VAR",
]

OP_NAME = "sparsekernels::sparse24_linear"

# Debug/benchmark knob: force the split-K factor of the Triton launch (an int >= 1).
SPLIT_K_ENV_VAR = "SPARSEKERNELS_SPLIT_K"


# ----------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def select_24(pos, nibble, v0, v1):
    """Dense in-group position ``pos`` holds v0 if it is the nibble's first stored position (bits 0-1), plus v1
    if it is the second (bits 2-3): zero when neither. The in-register 2:4 expansion, shared with the conv
    kernel; two values stored at one position add, as in ``Sparse24Weight.to_dense``, so even metadata that
    bypassed validation gives every backend the same weight."""
    zero = tl.zeros_like(v0)
    return tl.where(pos == (nibble & 0x3), v0, zero) + tl.where(pos == (nibble >> 2), v1, zero)


@triton.jit
def gather_index(perm_ptr, idx, ok, size):
    """The input index a stored index ``idx`` reads through an input permutation, and where it may be read: stored
    index ``i`` reads input ``perm[i]``; an entry outside ``[0, size)`` is masked (reads a zero), so no permutation
    value moves a load out of bounds. Shared with the conv kernel."""
    src = tl.load(perm_ptr + idx, mask=ok, other=0)
    src_ok = ok & (src >= 0) & (src < size)
    return tl.where(src_ok, src, 0).to(tl.int32), src_ok


@triton.jit
def _sparse24_linear_kernel(
    x_ptr, v_ptr, meta_ptr, bias_ptr, perm_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk,
    stride_vn, stride_vk,
    stride_mn, stride_mk,
    stride_ys, stride_ym, stride_yn,
    M_BUCKET,  # only an autotune key (bucketed token count)
    HAS_BIAS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # acc[n, m] = sum_k W[n, k] * x[m, k]: the weight's rows fill the MMA's M dimension.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_K // 2)
    offs_b = tl.arange(0, BLOCK_K // 8)
    n_mask = offs_n < N
    m_mask = offs_m < M
    kv_total = K // 2
    kb_total = (K + 7) // 8

    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    tile_lo = pid_k * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, k_tiles)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in range(tile_lo, tile_hi):
        k0 = t * BLOCK_K
        # Compressed tile: BLOCK_K/2 values and BLOCK_K/8 metadata bytes per weight row.
        kv = k0 // 2 + offs_v
        vals = tl.load(
            v_ptr + offs_n[:, None] * stride_vn + kv[None, :] * stride_vk,
            mask=n_mask[:, None] & (kv[None, :] < kv_total),
            other=0.0,
        )
        kb = k0 // 8 + offs_b
        mbyte = tl.load(
            meta_ptr + offs_n[:, None] * stride_mn + kb[None, :] * stride_mk,
            mask=n_mask[:, None] & (kb[None, :] < kb_total),
            other=0,
        ).to(tl.int32)
        # byte b -> groups 2b (low nibble), 2b+1 (high nibble); nibble -> two 2-bit positions.
        nib = tl.reshape(tl.join(mbyte & 0xF, (mbyte >> 4) & 0xF), (BLOCK_N, BLOCK_K // 4))
        v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, BLOCK_K // 4, 2)))
        d0 = select_24(0, nib, v0, v1)
        d1 = select_24(1, nib, v0, v1)
        d2 = select_24(2, nib, v0, v1)
        d3 = select_24(3, nib, v0, v1)
        # join(join(d0, d2), join(d1, d3))[..., j, i] = d[2j + i]: column 4g + p holds d_p of group g.
        w = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_N, BLOCK_K))
        kx = k0 + offs_k
        k_ok = kx < K
        if HAS_PERM:  # stored column kx multiplies input perm[kx]: gather x through the loaded index tile
            src, k_ok = gather_index(perm_ptr, kx, k_ok, K)
        else:
            src = kx
        xt = tl.load(
            x_ptr + src[:, None] * stride_xk + offs_m[None, :] * stride_xm,
            mask=k_ok[:, None] & m_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc + b[:, None]
    y_ptrs = y_ptr + pid_k * stride_ys + offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


# The split-K epilogue as one kernel: sum the fp32 partials, add the bias, cast, store. At few tokens the weight
# streams in a few microseconds, so the epilogue must be one launch, not the three of ``workspace.sum(0)``,
# ``+= bias`` and ``out.copy_()``.
@triton.jit
def _sparse24_splitk_reduce_kernel(
    ws_ptr, bias_ptr, y_ptr,
    MN, N,
    stride_ws,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(ws_ptr + s * stride_ws + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# Autotune configurations: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). BLOCK_N is the weight-row
# tile (the MMA's M side), BLOCK_K a multiple of 8 (one metadata byte covers 8 input columns).
# No GPU was available while writing these; they are the usual Triton GEMM/GEMV shapes, and the
# autotuner measures them per (M bucket, N, K, split-K, dtypes, bias) on the first call.


def few_token_configs() -> list[tuple[int, int, int, int, int]]:
    """Configs for M <= 16 tokens: one 16-wide token tile, long K tiles to keep many bytes in flight."""
    cfgs = []
    for bn in (32, 64, 128):
        for bk in (128, 256):
            for warps, stages in ((4, 3), (4, 4), (8, 3)):
                cfgs.append((16, bn, bk, warps, stages))
    cfgs.append((16, 16, 512, 4, 3))
    return cfgs


def many_token_configs() -> list[tuple[int, int, int, int, int]]:
    """Configs for M > 16 tokens: square-ish GEMM tiles (the compute-bound regime)."""
    return [
        (32, 64, 128, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (128, 128, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (64, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
    ]


# Under TRITON_INTERPRET=1 autotuning cannot run; this one small config is used instead.
INTERPRETER_CONFIG = (16, 16, 32, 4, 1)

_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "SPLIT_K", "HAS_BIAS", "HAS_PERM"]  # + tensor dtypes, added by triton


def _autotuned(configs: list[tuple[int, int, int, int, int]]):
    return triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in configs
        ],
        key=_AUTOTUNE_KEY,
    )(_sparse24_linear_kernel)


# M <= 16 tokens and M > 16 tokens are tuned over separate config sets.
_TUNED_FEW = _autotuned(few_token_configs())
_TUNED_MANY = _autotuned(many_token_configs())
_REDUCE_BLOCK = 1024


# ----------------------------------------------------------------------------------------------------
# Launcher


def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """Split K when too few (N, M) tiles exist to occupy every SM with weight streaming.

    Aim for ~2 programs per SM at a nominal 64-row weight tile, keep >= 512 input columns per split.
    ``SPARSEKERNELS_SPLIT_K`` forces the factor.
    """
    forced = os.environ.get(SPLIT_K_ENV_VAR)
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"sparse24_linear(): expected {SPLIT_K_ENV_VAR} to be an integer >= 1, got {forced!r}")
        return int(forced)
    if device.type != "cuda" or m > 64:
        return 1
    tiles = -(-n // 64) * -(-m // 16)
    index = device.index if device.index is not None else torch.cuda.current_device()
    want = (2 * _sm_count(index)) // max(tiles, 1)
    return int(max(1, min(want, 8, k // 512)))


def _launch_splitk_reduce(workspace: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """``out = workspace.sum(0) + bias`` in one launch (``workspace`` fp32 ``[S, M, N]`` contiguous)."""
    split_k, m, n = workspace.shape
    if not (workspace.is_contiguous() and out.is_contiguous()):
        total = workspace.sum(0)
        if bias is not None:
            total += bias
        out.copy_(total)
        return
    mn = m * n
    grid = (triton.cdiv(mn, _REDUCE_BLOCK),)
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        _sparse24_splitk_reduce_kernel[grid](
            workspace, bias if bias is not None else workspace, out, mn, n, workspace.stride(0),
            SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=_REDUCE_BLOCK,
        )


def _check_buffer(fn: str, name: str, t, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """A caller-given output buffer must be exactly what the launcher would allocate (the kernel writes all of it)."""
    if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype
                          or t.device != device):
        got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(
            f"{fn}: expected {name} to be None or a {dtype} tensor of shape {shape} on {device}, got {got}")


def launch_sparse24_linear(
    x2d: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: Optional[torch.Tensor],
    in_features: int,
    input_perm: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
    split_k: Optional[int] = None,
    workspace: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run the Triton kernel: ``x2d`` ``[M, K]``; returns ``[M, N]`` in ``x2d.dtype``: ``x2d[:, input_perm] @ W.T``
    with ``W`` the stored (permuted-order) weight, or ``x2d @ W.T`` without ``input_perm``.

    The inputs are checked against the op's contract (:func:`sparsekernels.ops.checks.check_sparse24_linear_tensors`:
    shapes and dtypes, and that ``input_perm`` is a permutation), so no tensor is read out of bounds whatever the
    metadata holds; the kernel masks the gathered indices besides.
    ``out`` / ``workspace`` (tests poison them to check every element is written) and ``split_k`` are
    knobs; by default they are allocated / chosen here.

    Raises:
        TypeError / ValueError: inputs outside the op's contract, or knobs of the wrong shape.
        RuntimeError: a device / dtype the Triton kernel cannot compute (:func:`routing.check_triton_runs`).
    """
    fn = "launch_sparse24_linear()"
    checks.check_sparse24_linear_tensors(fn, x2d, values, meta, bias, in_features, input_perm)
    if x2d.dim() != 2:
        raise ValueError(f"{fn}: expected a 2-D x2d [M, {in_features}], got shape {tuple(x2d.shape)}")
    routing.check_triton_runs(fn, x2d.device, x2d.dtype)
    m, k = x2d.shape
    n = values.shape[0]
    _check_buffer(fn, "out", out, (m, n), x2d.dtype, x2d.device)
    if out is None:
        out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return out
    if split_k is None:
        split_k = choose_split_k(m, n, k, x2d.device)
    if isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"{fn}: expected split_k to be an int >= 1, got {split_k!r}")
    dot_precision = "ieee" if x2d.dtype == torch.float32 else "tf32"
    if split_k > 1:
        _check_buffer(fn, "workspace", workspace, (split_k, m, n), torch.float32, x2d.device)
        if workspace is None:
            workspace = torch.empty((split_k, m, n), dtype=torch.float32, device=x2d.device)
        target, has_bias = workspace, False
    else:
        target, has_bias = out, bias is not None
    stride_ys = target.stride(0) if split_k > 1 else 0
    perm = input_perm.contiguous() if input_perm is not None else None  # the kernel reads it with stride 1
    args = (
        x2d, values, meta, bias if has_bias else values, perm if perm is not None else meta, target,
        m, n, k,
        x2d.stride(0), x2d.stride(1),
        values.stride(0), values.stride(1),
        meta.stride(0), meta.stride(1),
        stride_ys, target.stride(-2), target.stride(-1),
        min(routing.pow2_bucket(m), 8192),
    )
    if routing.interpreter_enabled() and x2d.device.type == "cpu":
        # the interpreter has no GPU driver to autotune with: one fixed, small config
        bm, bn, bk, warps, stages = INTERPRETER_CONFIG
        grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), split_k)
        _sparse24_linear_kernel[grid](
            *args, HAS_BIAS=has_bias, HAS_PERM=perm is not None, SPLIT_K=split_k, DOT_PRECISION=dot_precision,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )
    else:
        kernel = _TUNED_FEW if m <= 16 else _TUNED_MANY

        def grid(meta_):
            return (triton.cdiv(n, meta_["BLOCK_N"]), triton.cdiv(m, meta_["BLOCK_M"]), split_k)

        with torch.cuda.device(x2d.device):
            kernel[grid](*args, HAS_BIAS=has_bias, HAS_PERM=perm is not None, SPLIT_K=split_k,
                         DOT_PRECISION=dot_precision)
    if split_k > 1:
        _launch_splitk_reduce(workspace, bias, out)
    return out


# ----------------------------------------------------------------------------------------------------
# Reference


def sparse24_linear_reference(
    x: torch.Tensor, w24: Sparse24Weight, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Pure-PyTorch reference: expand the weight (in its stored order) and call ``F.linear`` in ``x``'s dtype, on
    ``x`` gathered by the weight's ``input_perm`` when it has one, as the kernel does.

    Args:
        x: ``[..., in]`` floating tensor (any float dtype, float64 included, for reference computations).
        w24: the compressed ``[out, in]`` weight; its values are cast to ``x.dtype``.
        bias: optional ``[out]`` tensor, cast to ``x.dtype``.

    Returns:
        ``[..., out]`` tensor in ``x.dtype``: ``x @ w24.to_dense().T + bias``.
    """
    checks.check_sparse24_linear("sparse24_linear_reference()", x, w24.to(x.dtype), bias if bias is None
                                 else bias.to(x.dtype), any_float=True)
    weight = w24.stored_dense().to(x.dtype)
    if w24.input_perm is not None:
        x = x.index_select(-1, w24.input_perm)
    if bias is not None:
        bias = bias.to(x.dtype)
    return F.linear(x, weight, bias)


def _reference_tensors(x2d, values, meta, bias, in_features, input_perm=None):
    w24 = Sparse24Weight(values, meta, (values.shape[0], in_features), input_perm)
    return sparse24_linear_reference(x2d, w24, bias)


# ----------------------------------------------------------------------------------------------------
# The custom op


@torch.library.custom_op(OP_NAME, mutates_args=())
def sparse24_linear_op(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: Optional[torch.Tensor],
    in_features: int,
    backend: str,
    input_perm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``sparsekernels::sparse24_linear``: the contract of :func:`sparsekernels.sparse24_linear` on its tensors,
    checked again here (the op can be called directly), then the backend resolved by
    :func:`sparsekernels.ops.routing.resolve`. ``input_perm``: the weight's input permutation (or None)."""
    checks.check_sparse24_linear_tensors(OP_NAME, x, values, meta, bias, in_features, input_perm)
    backend = routing.resolve("sparse24_linear", OP_NAME, backend, x, values.shape[0])
    y = routing.run("sparse24_linear", backend, x.reshape(-1, in_features), values, meta, bias, in_features,
                    *routing.perm_args(input_perm))
    return y.reshape(*x.shape[:-1], values.shape[0])


@sparse24_linear_op.register_fake
def _sparse24_linear_fake(x, values, meta, bias, in_features, backend, input_perm=None):
    checks.check_sparse24_linear_tensors(OP_NAME, x, values, meta, bias, in_features, input_perm, contents=False)
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _sparse24_linear_setup(ctx, inputs, output):
    x, values, meta, bias, in_features, backend, input_perm = inputs
    ctx.save_for_backward(values, meta, input_perm)
    ctx.in_features = in_features


def _sparse24_linear_backward(ctx, grad):
    """Input (and bias) gradient, so a frozen sparse layer can sit inside a model that trains; the compressed
    weight gets none (sparse layers are for inference)."""
    values, meta, input_perm = ctx.saved_tensors
    if ctx.needs_input_grad[1]:
        raise RuntimeError(
            f"{OP_NAME}: no gradient for the compressed weight (sparse layers are inference-only; gradients flow "
            "to the input and the bias only)"
        )
    grad_x = None
    if ctx.needs_input_grad[0]:
        w24 = Sparse24Weight(values, meta, (values.shape[0], ctx.in_features), input_perm)
        grad_x = grad @ w24.to_dense().to(grad.dtype)  # the original input order
    grad_b = grad.reshape(-1, values.shape[0]).sum(0) if ctx.needs_input_grad[3] else None
    return grad_x, None, None, grad_b, None, None, None


sparse24_linear_op.register_autograd(_sparse24_linear_backward, setup_context=_sparse24_linear_setup)

routing.register_kernel("sparse24_linear", "triton", launch_sparse24_linear)
routing.register_kernel("sparse24_linear", "reference", _reference_tensors)
