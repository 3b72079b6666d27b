"""2:4 sparse Linear: ``y = x @ W.T + bias`` with ``W`` stored 2:4-compressed.

One file, following the project layout (see ``shared/STYLE.md``):

1. ``_sparse24_linear_kernel`` -- the Triton kernel. It streams the compressed weight (values + packed
   2-bit positions, 0.5625 of the dense bytes in fp16/bf16), expands each tile in registers and feeds
   ``tl.dot`` with fp32 accumulation; the bias is fused.
2. ``_launch_triton`` -- the launcher (allocates the output, picks the regime, split-K and grid).
3. ``torch.ops.sparsekernels.sparse24_linear`` -- the ``torch.library`` custom op with a fake
   implementation, so ``torch.compile`` / ``torch.export`` see one opaque node.
4. :func:`sparse24_linear_reference` -- the pure-PyTorch reference used by tests and benchmarks.
5. :func:`sparse24_linear` -- the public entry point: checks inputs, resolves the backend, calls the op.

Kernel layout. The weight is ``[N = out, K = in]``. A program computes the tile ``W[n-block] @ x[m-block].T``
(operands swapped: the weight's out-dimension fills the MMA's M dimension, so a decode step with one
token still uses a full 16-wide MMA tile on the token side instead of wasting 15/16 of the weight side).
At few tokens and large K, split-K adds programs along K so every SM streams weight bytes; the fp32
partial sums land in a workspace that one epilogue kernel sums, biases and casts.

Triton is imported only inside the functions that launch kernels: importing this module never needs it.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..formats.sparse24 import SUPPORTED_DTYPES, Sparse24Weight
from ._backend import (  # noqa: F401  (backend_forced: imported from here by older callers)
    backend_forced,
    check_x_like_weight,
    cpu_fast_path_applies,
    interpreter_enabled,
    pow2_bucket,
    resolve_backend,
)
from ._cache import _cached as cached

__all__ = ["sparse24_linear", "sparse24_linear_reference", "expand_24"]

_OP_NAME = "sparsekernels::sparse24_linear"

# Debug/benchmark knob: force the split-K factor of the Triton launch (an int >= 1).
SPLIT_K_ENV_VAR = "SPARSEKERNELS_SPLIT_K"


# ----------------------------------------------------------------------------------------------------
# Pure-PyTorch pieces
# ----------------------------------------------------------------------------------------------------


def expand_24(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """Dense ``[out, in]`` weight from 2:4 ``values`` ``[out, in/2]`` and packed ``meta`` ``[out, ceil(in/8)]``.

    Equivalent to ``Sparse24Weight(values, meta, (out, in)).to_dense()``.
    """
    return Sparse24Weight(values, meta, (values.shape[0], in_features)).to_dense()


def sparse24_linear_reference(
    x: torch.Tensor, w24: Sparse24Weight, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Pure-PyTorch reference: expand the weight and call ``F.linear`` in ``x``'s dtype.

    Args:
        x: ``[..., in]`` floating tensor (any float dtype, float64 included, for reference computations).
        w24: the compressed ``[out, in]`` weight; its values are cast to ``x.dtype``.
        bias: optional ``[out]`` tensor, cast to ``x.dtype``.

    Returns:
        ``[..., out]`` tensor in ``x.dtype``.
    """
    weight = w24.to_dense().to(x.dtype)
    if bias is not None:
        bias = bias.to(x.dtype)
    return F.linear(x, weight, bias)


# ----------------------------------------------------------------------------------------------------
# A dense copy of the weight, cached per compressed-values tensor (the CPU "auto" path)
# ----------------------------------------------------------------------------------------------------
#
# CPU design, measured 2026-11-25 on "AMD EPYC" (2 cores shared with other jobs, measured with 1 thread),
# torch 2.14.1, fp32; median ms and, in brackets, the paired speedup over dense F.linear (median over
# back-to-back call pairs); full table: benchmarks/results/cpu/cpu_design_study.md.
#
#     layer       M    dense     expand per call   cached dense copy   torch.sparse CSR   gather
#     256x256       1  0.00623   0.117  (0.06x)    0.00718 (0.85x)     0.0391 (0.21x)    0.13 (0.07x)
#     256x256     256  0.331     0.455  (0.72x)    0.334   (0.99x)     0.775  (0.43x)      -
#     1024x1024     1  0.0742    1.33   (0.18x)    0.0779  (0.96x)     0.539  (0.17x)    2.01 (0.10x)
#     1024x1024   256  5.83      7.62   (0.77x)    5.93    (1.01x)     16.7   (0.36x)      -
#     4096x4096     1  3.18    139      (0.02x)    3.26    (1.00x)     20.5   (0.27x)   35.9  (0.07x)
#     4096x4096   256  103     253      (0.41x)    104     (1.00x)     334    (0.30x)      -
#
#     SparseLinear (this path) vs nn.Linear, same weights and bias, paired: 0.97x (256x256, M=1), 0.99x,
#     1.00x, 0.98x, 1.00x, 0.99x (rows in the order above). Since the cache also checks dtype, shape and
#     the metadata and keeps its source alive (ops._cache, +0.35 us per call): 0.94-0.95x at 256x256 M=1,
#     0.95-0.99x at 1024x1024 M=1 (best of 7 rounds of 2000 calls, 1 thread, same machine, 2026-11-25).
#
# Only the cached dense copy stays within 1.1x of dense: it *is* the dense GEMM once the copy exists
# (the 256x256 M=1 gap against a bare F.linear is ~1 us of per-call Python work, which nn.Linear pays
# too). Expanding per call costs 5-50x the GEMV at M=1; MKL's CSR (an int64 column per value: more
# bytes than dense at 50 % density) is 2-6x slower and a gather formulation 10-15x. So on the CPU
# "auto" expands once per compressed tensor and keeps the dense copy beside it (memory: 1.53x of the
# dense fp32 layer; the state_dict stays compressed). `bench.linear24.cpu_design_study()` re-measures.

def _dense_copy(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense weight for ``values``/``meta``, expanded once and kept while ``values`` lives
    (rebuilt when either tensor changes: see :func:`~sparsekernels.ops._cache.cached`)."""
    return cached(values, "sparse24_dense", (meta,), expand_24, values, meta, in_features)


# ----------------------------------------------------------------------------------------------------
# Triton kernel and launcher
# ----------------------------------------------------------------------------------------------------


def _bucket_m(m: int) -> int:
    """Token-count bucket for tuning keys: 1, 2, 4, ..., capped at 8192 (next power of two)."""
    return min(pow2_bucket(m), 8192)


# The @triton.jit helper below, bound by the kernel factory: a kernel finds the jit functions it calls
# among its module's globals (Triton's interpreter does not see a factory's local names).
_select_24 = None


@functools.lru_cache(maxsize=1)
def _select_24_jit():
    """The ``@triton.jit`` core of the in-register 2:4 expansion, shared with the conv kernel (whose
    kernel factory calls this one, so triton stays imported lazily in both files)."""
    global tl  # Triton's interpreter looks for triton.language among a jit function's module globals
    import triton
    import triton.language as tl

    @triton.jit
    def _select_24(pos, nibble, v0, v1):
        # Dense in-group position ``pos`` holds v0 if it is the nibble's first stored position (bits 0-1),
        # v1 if the second (bits 2-3), else zero (compress_24 always stores two distinct positions).
        return tl.where(pos == (nibble & 0x3), v0, tl.where(pos == (nibble >> 2), v1, tl.zeros_like(v0)))

    return _select_24


@functools.lru_cache(maxsize=1)
def _kernel():
    """Compile-once holder of the ``@triton.jit`` kernel (imports triton on first use only)."""
    import triton
    import triton.language as tl

    global _select_24
    _select_24 = _select_24_jit()

    @triton.jit
    def _sparse24_linear_kernel(
        x_ptr, v_ptr, meta_ptr, bias_ptr, y_ptr,
        M, N, K,
        stride_xm, stride_xk,
        stride_vn, stride_vk,
        stride_mn, stride_mk,
        stride_ys, stride_ym, stride_yn,
        M_BUCKET,  # only an autotune key (bucketed token count)
        HAS_BIAS: tl.constexpr,
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
            d0 = _select_24(0, nib, v0, v1)
            d1 = _select_24(1, nib, v0, v1)
            d2 = _select_24(2, nib, v0, v1)
            d3 = _select_24(3, nib, v0, v1)
            # join(join(d0, d2), join(d1, d3))[..., j, i] = d[2j + i]: column 4g + p holds d_p of group g.
            w = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_N, BLOCK_K))
            kx = k0 + offs_k
            xt = tl.load(
                x_ptr + kx[:, None] * stride_xk + offs_m[None, :] * stride_xm,
                mask=(kx[:, None] < K) & m_mask[None, :],
                other=0.0,
            )
            acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)

        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc = acc + b[:, None]
        y_ptrs = y_ptr + pid_k * stride_ys + offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])

    return _sparse24_linear_kernel


@functools.lru_cache(maxsize=1)
def _reduce_kernel():
    """The split-K epilogue as one kernel: sum the fp32 partials, add the bias, cast, store.

    At few tokens the weight streams in a few microseconds, so the epilogue must be one launch, not the
    three of ``workspace.sum(0)``, ``+= bias`` and ``out.copy_()``.
    """
    import triton
    import triton.language as tl

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

    return _sparse24_splitk_reduce_kernel


_REDUCE_BLOCK = 1024


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
    grid = (-(-mn // _REDUCE_BLOCK),)
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        _reduce_kernel()[grid](
            workspace, bias if bias is not None else workspace, out, mn, n, workspace.stride(0),
            SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=_REDUCE_BLOCK,
        )


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

_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "SPLIT_K", "HAS_BIAS"]  # + tensor dtypes, added by triton


@functools.lru_cache(maxsize=2)
def _tuned_kernel(regime: str):
    import triton

    source = few_token_configs() if regime == "few" else many_token_configs()
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in source
    ]
    return triton.autotune(configs=configs, key=_AUTOTUNE_KEY)(_kernel())


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _choose_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """Split K when too few (N, M) tiles exist to occupy every SM with weight streaming.

    Aim for ~2 programs per SM at a nominal 64-row weight tile, keep >= 512 input columns per split.
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


def _launch_triton(
    x2d: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: Optional[torch.Tensor],
    in_features: int,
    *,
    out: Optional[torch.Tensor] = None,
    split_k: Optional[int] = None,
    workspace: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run the Triton kernel on ``x2d`` ``[M, K]``; returns ``[M, N]`` in ``x2d.dtype``.

    ``out`` / ``workspace`` (tests poison them to check every element is written) and ``split_k`` are
    internal knobs; by default they are allocated / chosen here.
    """
    m, k = x2d.shape
    n = values.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        out.zero_()
        if bias is not None:
            out += bias
        return out
    if split_k is None:
        split_k = _choose_split_k(m, n, k, x2d.device)
    dot_precision = "ieee" if x2d.dtype == torch.float32 else "tf32"
    if split_k > 1:
        if workspace is None:
            workspace = torch.empty((split_k, m, n), dtype=torch.float32, device=x2d.device)
        target, has_bias = workspace, False
    else:
        target, has_bias = out, bias is not None
    stride_ys = target.stride(0) if split_k > 1 else 0
    stride_ym, stride_yn = target.stride(-2), target.stride(-1)
    args = (
        x2d, values, meta, bias if has_bias else values, target,
        m, n, k,
        x2d.stride(0), x2d.stride(1),
        values.stride(0), values.stride(1),
        meta.stride(0), meta.stride(1),
        stride_ys, stride_ym, stride_yn,
        _bucket_m(m),
    )
    if interpreter_enabled() and x2d.device.type == "cpu":
        bm, bn, bk, warps, stages = INTERPRETER_CONFIG
        grid = (-(-n // bn), -(-m // bm), split_k)
        _kernel()[grid](
            *args, HAS_BIAS=has_bias, SPLIT_K=split_k, DOT_PRECISION=dot_precision,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )
    else:
        kernel = _tuned_kernel("few" if m <= 16 else "many")

        def grid(meta_):
            return (-(-n // meta_["BLOCK_N"]), -(-m // meta_["BLOCK_M"]), split_k)

        with torch.cuda.device(x2d.device):
            kernel[grid](*args, HAS_BIAS=has_bias, SPLIT_K=split_k, DOT_PRECISION=dot_precision)
    if split_k > 1:
        _launch_splitk_reduce(workspace, bias, out)
    return out


# ----------------------------------------------------------------------------------------------------
# cuSPARSELt (PyTorch semi-structured sparse tensors)
# ----------------------------------------------------------------------------------------------------


def cusparselt_unsupported_reason(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> Optional[str]:
    """None if PyTorch's semi-structured 2:4 GEMM can run this layer, else why not."""
    if device.type != "cuda":
        return f"needs a CUDA device, got {device}"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"this torch ({torch.__version__}) has no torch.sparse.to_sparse_semi_structured"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"needs compute capability >= 8.0, got {torch.cuda.get_device_capability(device)}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"expected float16 or bfloat16, got {dtype}"
    if out_features % 32 or in_features % 64:
        return f"expected out % 32 == 0 and in % 64 == 0, got out={out_features}, in={in_features}"
    return None


def _cusparselt_weight(values: torch.Tensor, meta: torch.Tensor, in_features: int):
    """PyTorch's semi-structured tensor for the weight, built once per compressed tensor."""
    return cached(
        values, "sparse24_cusparselt", (meta,),
        lambda: torch.sparse.to_sparse_semi_structured(expand_24(values, meta, in_features)),
    )


# ----------------------------------------------------------------------------------------------------
# The custom op
# ----------------------------------------------------------------------------------------------------


def _cpu_auto(x2d, values, meta, bias, in_features):
    return F.linear(x2d, _dense_copy(values, meta, in_features), bias)


def _dispatched(x2d, values, meta, bias, in_features):
    """``"auto"`` on CUDA: the dispatcher's measured choice among Triton, dense cuBLAS and cuSPARSELt.

    The dense copy and the cuSPARSELt tensor are built once per weight (``dispatch.cached``). The
    dispatcher is device-agnostic, so tests drive this function with CPU tensors under the interpreter.
    """
    from .dispatch import select

    n = values.shape[0]
    candidates: dict[str, Callable[[], torch.Tensor]] = {
        "triton": lambda: _launch_triton(x2d, values, meta, bias, in_features),
        "dense": lambda: F.linear(x2d, _dense_copy(values, meta, in_features), bias),
    }
    if cusparselt_unsupported_reason(x2d.device, x2d.dtype, n, in_features) is None:
        candidates["cusparselt"] = lambda: F.linear(x2d, _cusparselt_weight(values, meta, in_features), bias)
    key = (_bucket_m(x2d.shape[0]), n, in_features, x2d.dtype, bias is not None)
    # Without a measurement (torch.compile tracing, CUDA-graph capture) run dense: never slower than dense.
    choice = select("sparse24_linear", key, candidates, default="dense", device=x2d.device)
    return candidates[choice]()


@torch.library.custom_op(_OP_NAME, mutates_args=())
def _sparse24_linear_op(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: Optional[torch.Tensor],
    in_features: int,
    backend: str,
) -> torch.Tensor:
    """``sparsekernels::sparse24_linear``: inputs already checked by :func:`sparse24_linear`;
    ``backend`` already resolved (environment override applied)."""
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    n = values.shape[0]
    if backend == "triton":
        y = _launch_triton(x2d, values, meta, bias, in_features)
    elif backend == "reference":
        y = sparse24_linear_reference(x2d, Sparse24Weight(values, meta, (n, in_features)), bias)
    elif backend == "dense":
        y = F.linear(x2d, expand_24(values, meta, in_features), bias)
    elif backend == "cusparselt":  # CUDA only (checked at the boundary)
        y = F.linear(x2d, _cusparselt_weight(values, meta, in_features), bias)
    elif x.device.type == "cuda":
        y = _dispatched(x2d, values, meta, bias, in_features)
    else:
        y = _cpu_auto(x2d, values, meta, bias, in_features)
    return y.reshape(*lead, n)


@_sparse24_linear_op.register_fake
def _sparse24_linear_fake(x, values, meta, bias, in_features, backend):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _no_weight_grad(op: str) -> RuntimeError:
    return RuntimeError(
        f"{op}: no gradient for the compressed weight (sparse layers are inference-only; gradients flow to "
        "the input and the bias only)"
    )


def _sparse24_linear_setup(ctx, inputs, output):
    x, values, meta, bias, in_features, backend = inputs
    ctx.save_for_backward(values, meta)
    ctx.in_features = in_features


def _sparse24_linear_backward(ctx, grad):
    """Input (and bias) gradient, so a frozen sparse layer can sit inside a model that trains: the same
    on every backend (the CPU fast path gets it from F.linear; this covers the custom op)."""
    values, meta = ctx.saved_tensors
    if ctx.needs_input_grad[1]:
        raise _no_weight_grad("sparsekernels::sparse24_linear")
    grad_x = grad @ expand_24(values, meta, ctx.in_features).to(grad.dtype) if ctx.needs_input_grad[0] else None
    grad_b = grad.reshape(-1, values.shape[0]).sum(0) if ctx.needs_input_grad[3] else None
    return grad_x, None, None, grad_b, None, None


_sparse24_linear_op.register_autograd(_sparse24_linear_backward, setup_context=_sparse24_linear_setup)


# ----------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------


def check_linear_inputs(
    fn: str, x, values: torch.Tensor, meta: torch.Tensor, in_features: int, bias
) -> None:
    """Boundary checks shared by :func:`sparse24_linear` and ``SparseLinear``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: expected x to be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"{fn}: expected x of shape [..., {in_features}] (in_features of the weight), got {tuple(x.shape)}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: expected x of dtype float16, bfloat16 or float32, got {x.dtype}")
    check_x_like_weight(fn, x, values.dtype, values.device)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{fn}: expected bias to be a torch.Tensor or None, got {type(bias).__name__}")
        n = values.shape[0]
        if bias.shape != (n,):
            raise ValueError(f"{fn}: expected bias of shape ({n},), got {tuple(bias.shape)}")
        if bias.dtype != values.dtype:
            raise TypeError(f"{fn}: expected bias of the weight's dtype {values.dtype}, got {bias.dtype}")
        if bias.device != values.device:
            raise ValueError(f"{fn}: expected bias on the weight's device {values.device}, got {bias.device}")


def sparse24_linear_tensors(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    in_features: int,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
    fn: str = "sparse24_linear()",
) -> torch.Tensor:
    """:func:`sparse24_linear` on the raw compressed tensors (what ``SparseLinear`` stores)."""
    y = cpu_fast_path(x, values, meta, in_features, bias, backend)
    if y is not None:
        return y
    return sparse24_linear_checked(x, values, meta, in_features, bias, backend=backend, fn=fn)


def sparse24_linear_checked(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    in_features: int,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
    fn: str = "sparse24_linear()",
) -> torch.Tensor:
    """:func:`sparse24_linear_tensors` without the CPU fast path: full checks, backend resolution, custom op."""
    check_linear_inputs(fn, x, values, meta, in_features, bias)
    backend = resolve_backend(fn, backend, x.device)
    if backend == "cusparselt":
        reason = cusparselt_unsupported_reason(x.device, x.dtype, values.shape[0], in_features)
        if reason is not None:
            raise ValueError(f"{fn}: backend 'cusparselt' cannot run this layer: {reason}")
    return torch.ops.sparsekernels.sparse24_linear(x, values, meta, bias, in_features, backend)


def cpu_fast_path(x, values: torch.Tensor, meta: torch.Tensor, in_features: int, bias, backend: str):
    """Eager CPU ``"auto"`` (see :func:`~sparsekernels.ops._backend.cpu_fast_path_applies`): ``F.linear``
    on the cached dense copy, or None when it does not apply. If ``F.linear`` refuses the inputs, None is
    returned and the caller's checks raise the clear error."""
    if cpu_fast_path_applies(x, backend):
        try:
            return F.linear(x, _dense_copy(values, meta, in_features), bias)
        except (RuntimeError, TypeError, ValueError):
            return None
    return None


def sparse24_linear(
    x: torch.Tensor,
    w24: Sparse24Weight,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = x @ W.T + bias`` for a 2:4-compressed weight ``W`` (backward: gradients of ``x`` and ``bias`` only).

    Args:
        x: ``[..., in]`` float16 / bfloat16 / float32 activations, same dtype and device as ``w24``; any
            strides (the Triton kernel reads through them).
        w24: the compressed ``[out, in]`` weight (:func:`sparsekernels.compress_24`).
        bias: optional ``[out]`` tensor, same dtype and device.
        backend: ``"auto"`` (CPU: a dense copy cached per weight, see ``docs/sparse24.md``; CUDA: the
            measured fastest of ``"triton"``, ``"dense"`` and ``"cusparselt"`` per shape, via
            ``sparsekernels.ops.dispatch``), ``"triton"``, ``"reference"``, ``"dense"`` or ``"cusparselt"``.
            The environment variable ``SPARSEKERNELS_BACKEND`` overrides it.

    Returns:
        ``[..., out]`` tensor in ``x.dtype`` on ``x.device``.

    Raises:
        TypeError: ``x`` / ``bias`` not tensors, ``w24`` not a :class:`Sparse24Weight`, or dtype mismatch.
        ValueError: ``x.shape[-1] != in``, bias shape, device mismatch, unknown backend name (argument or
            environment), or ``"cusparselt"`` on an unsupported dtype / shape.
        RuntimeError: ``"triton"`` on CPU tensors without ``TRITON_INTERPRET=1``; ``"cusparselt"`` off CUDA.
    """
    if not isinstance(w24, Sparse24Weight):
        raise TypeError(
            f"sparse24_linear(): expected w24 to be a Sparse24Weight (see compress_24), got {type(w24).__name__}"
        )
    values, meta, in_features = w24.values, w24.meta, w24.shape[1]
    y = cpu_fast_path(x, values, meta, in_features, bias, backend)
    if y is not None:
        return y
    return sparse24_linear_checked(x, values, meta, in_features, bias, backend=backend)
