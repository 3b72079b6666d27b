"""Block-sparse Linear, ``y = x @ W.T + bias`` with ``W`` stored as square blocks
(:mod:`sparsekernels.formats.blocksparse`): the Triton kernel, its launcher, the pure-PyTorch reference and the
``sparsekernels::block_sparse_linear`` custom op.

The kernel gives each program one tile of ``BLOCK_M`` rows of ``x`` and one output block row (``bs`` output
features) and walks only the non-zero blocks of that block row (CSR ``row_ptr`` / ``col_idx``): zero blocks cost
neither loads nor FLOPs, an all-zero block row only writes the bias.

Triton is imported at the top: this module is imported by :mod:`sparsekernels.ops.functional` when the op is
first called. Which backend runs is decided by :mod:`sparsekernels.ops.routing`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..formats.blocksparse import BlockSparseWeight
from . import checks, routing

__all__ = ["launch_block_sparse_linear", "block_sparse_linear_reference", "autotune_configs"]

OP_NAME = "sparsekernels::block_sparse_linear"


# ----------------------------------------------------------------------------------------------------
# Triton kernel


@triton.jit
def _block_sparse_linear_kernel(
    x_ptr, vals_ptr, row_ptr_ptr, col_idx_ptr, bias_ptr, out_ptr,
    M, N, K, NNZ, M_BUCKET,
    stride_xm, stride_xk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr,
    BS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    block_row = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BS)
    offs_n = block_row * BS + offs_b
    m_mask = offs_m < M
    n_mask = offs_n < N
    # The index arrays are data: clamp the block range to [0, NNZ] and skip a block column outside the weight, so
    # no row_ptr / col_idx content can make the kernel read outside values or x (loaders validate the structure;
    # this holds even for tensors that bypassed them).
    start = tl.minimum(tl.maximum(tl.load(row_ptr_ptr + block_row), 0), NNZ)
    end = tl.minimum(tl.maximum(tl.load(row_ptr_ptr + block_row + 1), start), NNZ)
    n_block_cols = tl.cdiv(K, BS)
    acc = tl.zeros((BLOCK_M, BS), dtype=tl.float32)
    # values[j, n, k] read as a [k, n] tile; 64-bit block offset (nnz * BS * BS may pass 2**31).
    w_ptrs = vals_ptr + start.to(tl.int64) * (BS * BS) + offs_b[None, :] * BS + offs_b[:, None]
    for j in range(start, end):
        block_col = tl.load(col_idx_ptr + j)
        col_ok = (block_col >= 0) & (block_col < n_block_cols)
        offs_k = tl.where(col_ok, block_col, 0) * BS + offs_b
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & (offs_k[None, :] < K) & col_ok,
            other=0.0,
        )
        w = tl.load(w_ptrs)  # padded elements of edge blocks are stored zeros: no mask
        acc += tl.dot(a, w, input_precision=INPUT_PRECISION)
        w_ptrs += BS * BS
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


def autotune_configs() -> list[tuple[int, int, int]]:
    """GPU configs over (BLOCK_M, warps, stages); the block size is fixed by the weight."""
    return [(16, 4, 3), (32, 4, 3), (64, 4, 3), (128, 4, 3), (128, 8, 3), (64, 8, 4)]


_TUNED = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s) for bm, w, s in autotune_configs()],
    key=["M_BUCKET", "N", "K", "NNZ", "BS", "HAS_BIAS"],
)(_block_sparse_linear_kernel)
# Under TRITON_INTERPRET=1 there is no GPU driver to autotune with: one fixed, small config.
INTERPRETER_CONFIG = (16, 4, 1)


def launch_block_sparse_linear(x2d, values, row_ptr, col_idx, bias, n: int, *, out=None) -> torch.Tensor:
    """Run the Triton kernel: ``x2d`` ``[M, K]``; returns ``[M, n]`` in ``x2d.dtype``.

    The inputs are checked against the op's contract
    (:func:`sparsekernels.ops.checks.check_block_sparse_linear_tensors`, shapes and dtypes only); the kernel bounds every index it reads from ``row_ptr`` / ``col_idx``, so no content of
    theirs makes it read outside a tensor. ``out`` is a knob for tests (they poison it to check every element is
    written).

    Raises:
        TypeError / ValueError: inputs outside the op's contract, or an ``out`` of the wrong shape.
        RuntimeError: a device / dtype the Triton kernel cannot compute (:func:`routing.check_triton_runs`).
    """
    fn = "launch_block_sparse_linear()"
    checks.check_block_sparse_linear_tensors(fn, x2d, values, row_ptr, col_idx, bias, n)
    if x2d.dim() != 2:
        raise ValueError(f"{fn}: expected a 2-D x2d [M, K], got shape {tuple(x2d.shape)}")
    routing.check_triton_runs(fn, x2d.device, x2d.dtype)
    m, k = x2d.shape
    bs = values.shape[1]
    if out is None:
        out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    elif not isinstance(out, torch.Tensor) or tuple(out.shape) != (m, n) or out.dtype != x2d.dtype \
            or out.device != x2d.device:
        raise ValueError(f"{fn}: expected out to be None or a {x2d.dtype} tensor of shape {(m, n)} on {x2d.device}")
    if m == 0:
        return out
    values, row_ptr, col_idx = values.contiguous(), row_ptr.contiguous(), col_idx.contiguous()
    args = (
        x2d, values, row_ptr, col_idx, bias if bias is not None else x2d, out,
        m, n, k, values.shape[0], routing.pow2_bucket(m),
        x2d.stride(0), x2d.stride(1), out.stride(0), out.stride(1),
    )
    meta_args = dict(HAS_BIAS=bias is not None, BS=bs, INPUT_PRECISION="ieee" if x2d.dtype == torch.float32 else "tf32")
    block_rows = row_ptr.numel() - 1
    if routing.interpreter_enabled() and x2d.device.type == "cpu":
        bm, warps, stages = INTERPRETER_CONFIG
        _block_sparse_linear_kernel[(triton.cdiv(m, bm), block_rows)](
            *args, **meta_args, BLOCK_M=bm, num_warps=warps, num_stages=stages
        )
    else:
        def grid(cfg):
            return (triton.cdiv(m, cfg["BLOCK_M"]), block_rows)

        with torch.cuda.device(x2d.device):
            _TUNED[grid](*args, **meta_args)
    return out


# ----------------------------------------------------------------------------------------------------
# Reference (pure PyTorch): one batched GEMM over the kept blocks, scattered into block rows


def _reference_2d(x2d, values, row_ptr, col_idx, bias, n: int) -> torch.Tensor:
    m, k = x2d.shape
    nnz, bs, _ = values.shape
    nbr = row_ptr.numel() - 1
    nbc = -(-k // bs)
    xb = F.pad(x2d, (0, nbc * bs - k)).reshape(m, nbc, bs).transpose(0, 1)  # [nbc, M, bs]
    gathered = xb.index_select(0, col_idx.to(torch.int64))  # [nnz, M, bs]
    prod = torch.bmm(gathered, values.transpose(1, 2))  # [nnz, M, bs(out)]
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(nbr, device=x2d.device), counts)
    out = torch.zeros(nbr, m, bs, dtype=prod.dtype, device=x2d.device).index_add_(0, rows, prod)
    out = out.transpose(0, 1).reshape(m, nbr * bs)[:, :n]
    if bias is not None:
        out = out + bias
    return out.contiguous()


def block_sparse_linear_reference(
    x: torch.Tensor, wb: BlockSparseWeight, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Pure-PyTorch block-sparse Linear: one batched GEMM over the kept blocks, scattered into block rows.

    Same arguments and result as :func:`sparsekernels.block_sparse_linear`; computes in ``x``'s dtype, any
    floating dtype (pass float64 tensors for a float64 reference).
    """
    checks.check_block_sparse_linear("block_sparse_linear_reference()", x, wb, bias, any_float=True)
    k = wb.shape[1]
    out = _reference_2d(x.reshape(-1, k), wb.values, wb.row_ptr, wb.col_idx, bias, wb.shape[0])
    return out.reshape(*x.shape[:-1], wb.shape[0])


# ----------------------------------------------------------------------------------------------------
# The custom op


@torch.library.custom_op(OP_NAME, mutates_args=())
def block_sparse_linear_op(
    x: torch.Tensor,
    values: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_features: int,
    backend: str,
) -> torch.Tensor:
    """``sparsekernels::block_sparse_linear``: the contract of :func:`sparsekernels.block_sparse_linear` on its
    tensors, checked again here (the op can be called directly), then the backend resolved by
    :func:`sparsekernels.ops.routing.resolve`."""
    checks.check_block_sparse_linear_tensors(OP_NAME, x, values, row_ptr, col_idx, bias, out_features)
    backend = routing.resolve("block_sparse_linear", OP_NAME, backend, x)
    y = routing.run("block_sparse_linear", backend, x.reshape(-1, x.shape[-1]), values, row_ptr, col_idx, bias,
                    out_features)
    return y.reshape(*x.shape[:-1], out_features)


@block_sparse_linear_op.register_fake
def _block_sparse_linear_fake(x, values, row_ptr, col_idx, bias, out_features, backend):
    checks.check_block_sparse_linear_tensors(OP_NAME, x, values, row_ptr, col_idx, bias, out_features)
    return x.new_empty((*x.shape[:-1], out_features))


def _block_sparse_linear_setup(ctx, inputs, output):
    x, values, row_ptr, col_idx, bias, out_features, backend = inputs
    ctx.save_for_backward(values, row_ptr, col_idx)
    ctx.n, ctx.k = out_features, x.shape[-1]


def _block_sparse_linear_backward(ctx, grad):
    """Input (and bias) gradient; the block values get none (inference-only weights)."""
    values, row_ptr, col_idx = ctx.saved_tensors
    if ctx.needs_input_grad[1]:
        raise RuntimeError(
            "sparsekernels::block_sparse_linear: no gradient for the block-sparse weight (sparse layers are "
            "inference-only; gradients flow to the input and the bias only)"
        )
    grad_x = None
    if ctx.needs_input_grad[0]:
        weight = BlockSparseWeight(values, row_ptr, col_idx, (ctx.n, ctx.k), values.shape[1]).to_dense()
        grad_x = grad @ weight.to(grad.dtype)
    grad_b = grad.reshape(-1, ctx.n).sum(0) if ctx.needs_input_grad[4] else None
    return grad_x, None, None, None, grad_b, None, None


block_sparse_linear_op.register_autograd(_block_sparse_linear_backward, setup_context=_block_sparse_linear_setup)

routing.register_kernel("block_sparse_linear", "triton", launch_block_sparse_linear)
routing.register_kernel("block_sparse_linear", "reference", _reference_2d)
