"""Block-sparse Linear: ``y = x @ W.T + bias`` with ``W`` stored as square blocks (see
:mod:`sparsekernels.formats.blocksparse`).

One file, as every op: the Triton kernel, its launcher, the ``sparsekernels::block_sparse_linear``
custom op with a fake implementation, a pure-PyTorch reference, and the public function.

The kernel gives each program one tile of ``BLOCK_M`` rows of ``x`` and one output block row
(``bs`` output features) and walks only the non-zero blocks of that block row (CSR ``row_ptr`` /
``col_idx``): zero blocks cost neither loads nor FLOPs, an all-zero block row only writes the bias.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..formats.blocksparse import BlockSparseWeight
from ._backend import (
    check_bias_like_x,
    check_x_like_weight,
    cpu_fast_path_applies,
    interpreter_enabled,
    pow2_bucket,
    resolve_backend,
)
from ._cache import _cached as cached

__all__ = [
    "block_sparse_linear",
    "block_sparse_linear_reference",
    "block_sparse_linear_dense",
    "CPU_AUTO_MAX_DENSITY",
    "CPU_AUTO_MIN_ROWS",
]

OP_NAME = "sparsekernels::block_sparse_linear"

# On the CPU, "auto" runs the reference (one batched GEMM over the kept blocks) when the input has at
# least CPU_AUTO_MIN_ROWS rows and at most CPU_AUTO_MAX_DENSITY of the blocks are kept, and F.linear on
# a cached dense copy otherwise. Measured in benchmarks/results/cpu/blocksparse_cpu_auto.md (1024x1024
# fp32, 1 thread of a shared 2-core EPYC, torch 2.14, 2026-11-25): at M=1 the block path is 0.44-0.81x
# of nn.Linear at every density (call overhead dominates a 0.08 ms GEMV); with up to ~13 % of blocks
# kept it is 2.4-29x faster at M=32 and M=256; at ~25 % kept it still wins at M=32 (~2x) but fell to
# 0.58x at M=256 with 32x32 blocks (small-matrix bmm), so the cut is 12.5 %.
CPU_AUTO_MAX_DENSITY = 0.125
CPU_AUTO_MIN_ROWS = 16


# --------------------------------------------------------------------------------------------------
# Triton kernel (triton is imported lazily: only when a kernel is launched)
# --------------------------------------------------------------------------------------------------
_KERNEL = None


def _autotune_configs():
    """Configs for the GPU; the block size is fixed by the weight, BLOCK_M and warps are tuned."""
    import triton

    return [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bm, w, s in ((16, 4, 3), (32, 4, 3), (64, 4, 3), (128, 4, 3), (128, 8, 3), (64, 8, 4))
    ]


def _interpreter_config():
    """One fixed config: autotuning needs a GPU driver, the interpreter has none."""
    import triton

    return [triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)]


def _get_kernel():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    configs = _interpreter_config() if interpreter_enabled() else _autotune_configs()

    @triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "NNZ", "BS", "HAS_BIAS"])
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
        start = tl.load(row_ptr_ptr + block_row)
        end = tl.load(row_ptr_ptr + block_row + 1)
        acc = tl.zeros((BLOCK_M, BS), dtype=tl.float32)
        # values[j, n, k] read as a [k, n] tile; 64-bit block offset (nnz * BS * BS may pass 2**31).
        w_ptrs = vals_ptr + start.to(tl.int64) * (BS * BS) + offs_b[None, :] * BS + offs_b[:, None]
        for j in range(start, end):
            block_col = tl.load(col_idx_ptr + j)
            offs_k = block_col * BS + offs_b
            a = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=m_mask[:, None] & (offs_k[None, :] < K),
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

    _KERNEL = _block_sparse_linear_kernel
    return _KERNEL


def _new_output(shape, dtype, device) -> torch.Tensor:
    """The kernel's output buffer, uninitialised (tests replace this to poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch_triton(x2d: torch.Tensor, values, row_ptr, col_idx, bias, n: int) -> torch.Tensor:
    import triton

    m, k = x2d.shape
    bs = values.shape[1]
    out = _new_output((m, n), x2d.dtype, x2d.device)
    if m == 0:
        return out
    values, row_ptr, col_idx = values.contiguous(), row_ptr.contiguous(), col_idx.contiguous()
    kernel = _get_kernel()
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), row_ptr.numel() - 1)  # noqa: E731
    kernel[grid](
        x2d, values, row_ptr, col_idx, bias if bias is not None else x2d, out,
        m, n, k, values.shape[0], pow2_bucket(m),
        x2d.stride(0), x2d.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None,
        BS=bs,
        INPUT_PRECISION="ieee" if x2d.dtype == torch.float32 else "tf32",
    )
    return out


# --------------------------------------------------------------------------------------------------
# Reference and dense paths (pure PyTorch)
# --------------------------------------------------------------------------------------------------
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


def _dense_weight(values, row_ptr, col_idx, n: int, k: int) -> torch.Tensor:
    return BlockSparseWeight(values, row_ptr, col_idx, (n, k), values.shape[1]).to_dense()


def _cached_dense_weight(values, row_ptr, col_idx, n: int, k: int) -> torch.Tensor:
    """The dense weight, expanded once and kept while ``values`` lives (rebuilt when any of the three
    tensors changes: see :func:`~sparsekernels.ops._cache.cached`). Kept in a side table, not on the
    tensor, so ``torch.save`` never pickles the dense copy."""
    return cached(values, ("block_dense", n, k), (row_ptr, col_idx), _dense_weight, values, row_ptr, col_idx, n, k)


def _cpu_auto(x, values, row_ptr, col_idx, bias, n: int) -> torch.Tensor:
    """CPU ``"auto"`` on ``x`` ``[..., k]``: the batched-block reference for tall enough inputs of a sparse
    enough weight (see :data:`CPU_AUTO_MAX_DENSITY`), else ``F.linear`` on the cached dense copy."""
    k = x.shape[-1]
    nbr, nbc = row_ptr.numel() - 1, -(-k // values.shape[1])
    if values.shape[0] <= CPU_AUTO_MAX_DENSITY * nbr * nbc and x.numel() >= CPU_AUTO_MIN_ROWS * k:
        return _reference_2d(x.reshape(-1, k), values, row_ptr, col_idx, bias, n).reshape(*x.shape[:-1], n)
    return F.linear(x, _cached_dense_weight(values, row_ptr, col_idx, n, k), bias)


def block_sparse_linear_reference(
    x: torch.Tensor, wb: BlockSparseWeight, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Pure-PyTorch block-sparse Linear: one batched GEMM over the kept blocks, scattered into block rows.

    Same arguments, shapes and result as :func:`block_sparse_linear`; computes in ``x``'s dtype (pass
    float64 tensors for a float64 reference).
    """
    _check_inputs("block_sparse_linear_reference()", x, wb, bias)
    k = wb.shape[1]
    out = _reference_2d(x.reshape(-1, k), wb.values, wb.row_ptr, wb.col_idx, bias, wb.shape[0])
    return out.reshape(*x.shape[:-1], wb.shape[0])


def block_sparse_linear_dense(
    x: torch.Tensor, wb: BlockSparseWeight, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``F.linear`` on the expanded dense weight (the ``"dense"`` backend, uncached)."""
    _check_inputs("block_sparse_linear_dense()", x, wb, bias)
    return F.linear(x, wb.to_dense(), bias)


# --------------------------------------------------------------------------------------------------
# Custom op
# --------------------------------------------------------------------------------------------------
def _dispatch_key(x2d: torch.Tensor, values: torch.Tensor, n: int, k: int, has_bias: bool) -> tuple:
    # nnz_blocks is in the key: the kernel's work scales with it, dense's does not.
    return (pow2_bucket(x2d.shape[0]), n, k, values.shape[1], values.shape[0], str(x2d.dtype), has_bias)


@torch.library.custom_op(OP_NAME, mutates_args=())
def _block_sparse_linear_op(
    x: torch.Tensor,
    values: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_features: int,
    backend: str,
) -> torch.Tensor:
    k = x.shape[-1]
    n = out_features
    x2d = x.reshape(-1, k)
    choice = resolve_backend("block_sparse_linear()", backend, x.device)
    if choice == "cusparselt":
        raise RuntimeError("block_sparse_linear(): backend 'cusparselt' is for 2:4 weights only; use 'triton' or 'dense'")
    if choice == "auto":
        if x.device.type != "cuda":
            return _cpu_auto(x, values, row_ptr, col_idx, bias, n)
        from . import dispatch

        dense = lambda: F.linear(x2d, _cached_dense_weight(values, row_ptr, col_idx, n, k), bias)  # noqa: E731
        candidates = {"triton": lambda: _launch_triton(x2d, values, row_ptr, col_idx, bias, n), "dense": dense}
        choice = dispatch.select(
            "block_sparse_linear", _dispatch_key(x2d, values, n, k, bias is not None), candidates,
            default="dense", device=x.device,
        )
        out = candidates[choice]()
        return out.reshape(*x.shape[:-1], n)
    if choice == "triton":
        out = _launch_triton(x2d, values, row_ptr, col_idx, bias, n)
    elif choice == "reference":
        out = _reference_2d(x2d, values, row_ptr, col_idx, bias, n)
    else:  # dense
        out = F.linear(x2d, _dense_weight(values, row_ptr, col_idx, n, k), bias)
    return out.reshape(*x.shape[:-1], n)


@_block_sparse_linear_op.register_fake
def _(x, values, row_ptr, col_idx, bias, out_features, backend):
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
        grad_x = grad @ _dense_weight(values, row_ptr, col_idx, ctx.n, ctx.k).to(grad.dtype)
    grad_b = grad.reshape(-1, ctx.n).sum(0) if ctx.needs_input_grad[4] else None
    return grad_x, None, None, None, grad_b, None, None


_block_sparse_linear_op.register_autograd(_block_sparse_linear_backward, setup_context=_block_sparse_linear_setup)


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def _check_inputs(fn: str, x, wb, bias) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: expected x to be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(wb, BlockSparseWeight):
        raise TypeError(f"{fn}: expected wb to be a BlockSparseWeight (see compress_blocks), got {type(wb).__name__}")
    n, k = wb.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{fn}: expected x of shape [..., {k}] (the weight's in_features), got {tuple(x.shape)}")
    check_x_like_weight(fn, x, wb.dtype, wb.device)
    check_bias_like_x(fn, bias, n, x)


def block_sparse_linear(
    x: torch.Tensor, wb: BlockSparseWeight, bias: Optional[torch.Tensor] = None, *, backend: str = "auto"
) -> torch.Tensor:
    """``y = x @ W.T + bias`` for a block-sparse ``W``.

    Args:
        x: ``[..., in]`` float16 / bfloat16 / float32, the weight's dtype and device.
        wb: the weight, from :func:`sparsekernels.compress_blocks` (``shape == (out, in)``).
        bias: optional ``[out]``, same dtype and device as ``x``.
        backend: ``"auto"`` (GPU: the dispatcher measures Triton vs dense once per shape bucket; CPU: the
            batched-block reference when ``x`` has at least :data:`CPU_AUTO_MIN_ROWS` rows and at most
            :data:`CPU_AUTO_MAX_DENSITY` of the blocks are kept, else
            ``F.linear`` on a dense copy cached on ``wb.values``), ``"triton"``, ``"reference"`` or
            ``"dense"``. ``SPARSEKERNELS_BACKEND`` overrides it.

    Returns:
        ``[..., out]`` tensor of ``x``'s dtype (contiguous).

    Raises:
        TypeError: wrong argument types or dtypes.
        ValueError: wrong shapes or devices, unknown backend.
        RuntimeError: ``"triton"`` on a CPU tensor without ``TRITON_INTERPRET=1``; ``"cusparselt"``.
    """
    _check_inputs("block_sparse_linear()", x, wb, bias)
    return block_sparse_linear_tensors(x, wb.values, wb.row_ptr, wb.col_idx, bias, wb.shape[0], backend)


def block_sparse_linear_tensors(x, values, row_ptr, col_idx, bias, out_features: int, backend: str) -> torch.Tensor:
    """The op on checked raw tensors (what ``BlockSparseLinear`` stores).

    Eager CPU ``"auto"`` skips the custom op's ~25 us of dispatch: BlockSparseLinear vs nn.Linear at one
    row, half the 32x32 blocks kept (cached dense copy), 1 thread, best of 7 alternating rounds,
    2026-11-25: 1024x1024 0.71x -> 0.95x, 256x256 0.28x -> 0.81x (the ~2 us left is the forward's
    checks and the cache lookup, which a 10 us GEMV still feels)."""
    if cpu_fast_path_applies(x, backend):
        return _cpu_auto(x, values, row_ptr, col_idx, bias, out_features)
    return _block_sparse_linear_op(x, values, row_ptr, col_idx, bias, out_features, backend)
