"""Which backend computes an op: the one module that decides.

Every op takes a ``backend`` argument, one of :data:`BACKENDS`:

* ``"triton"``     -- our Triton kernel (a CUDA device, or CPU tensors under ``TRITON_INTERPRET=1``);
* ``"reference"``  -- the pure-PyTorch reference beside the kernel;
* ``"dense"``      -- expand the weight and call the dense PyTorch op (cuBLAS / cuDNN / MKL / oneDNN);
* ``"cusparselt"`` -- PyTorch's semi-structured sparse tensors (2:4 Linear on a supporting GPU only);
* ``"auto"``       -- on a GPU, the dispatcher's measured choice among the op's candidates (see
  :data:`ROUTES` and :mod:`sparsekernels.ops.dispatch`); on the CPU, the op's measured CPU rule.

The environment variable ``SPARSEKERNELS_BACKEND`` forces one backend for every call, whatever the argument
says (debugging, tests, benchmarks).

How an op call flows: the public function (:mod:`sparsekernels.ops.functional`) checks the inputs
(:mod:`sparsekernels.ops.checks`), resolves the backend name here (:func:`resolve`) and calls the
``torch.library`` op registered by the op's kernel module; the op's implementation calls :func:`run`, which
picks the implementation. The kernel modules register their Triton launcher and their reference with
:func:`register_kernel` when they are imported, so this module never imports them: the layers only look down.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..formats.blocksparse import BlockSparseWeight
from ..formats.sparse24 import Sparse24Weight, conv_weight_from_2d
from . import dispatch
from .cache import cached

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "ROUTES",
    "OpRoute",
    "resolve",
    "run",
    "run_dispatched",
    "register_kernel",
    "implementation",
    "backend_forced",
    "is_compiling",
    "interpreter_enabled",
    "triton_usable",
    "check_triton_runs",
    "check_backend_name",
    "cusparselt_unsupported_reason",
    "pow2_bucket",
    "perm_args",
    "CPU_BLOCK_MAX_DENSITY",
    "CPU_BLOCK_MIN_ROWS",
]

BACKENDS = ("auto", "triton", "reference", "dense", "cusparselt")
ENV_VAR = "SPARSEKERNELS_BACKEND"

# On the CPU, block-sparse "auto" runs the reference (one batched GEMM over the kept blocks) when the input has
# at least CPU_BLOCK_MIN_ROWS rows and at most CPU_BLOCK_MAX_DENSITY of the blocks are kept, and F.linear on a
# cached dense copy otherwise. Measured in benchmarks/results/cpu/blocksparse_cpu_auto.md (1024x1024 fp32, 1
# thread of a shared 2-core EPYC, torch 2.14, 2026-11-25): at M=1 the block path is 0.44-0.81x of nn.Linear at
# every density (call overhead dominates a 0.08 ms GEMV); with up to ~13 % of blocks kept it is 2.4-29x faster at
# M=32 and M=256; at ~25 % kept it still wins at M=32 (~2x) but fell to 0.58x at M=256 with 32x32 blocks
# (small-matrix bmm), so the cut is 12.5 %.
CPU_BLOCK_MAX_DENSITY = 0.125
CPU_BLOCK_MIN_ROWS = 16


# ----------------------------------------------------------------------------------------------------
# Backend names and the environment override


def interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device) -> bool:
    """Can a Triton kernel run on tensors living on ``device``?"""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def check_triton_runs(fn: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ``RuntimeError`` naming ``fn`` when a Triton kernel cannot compute ``dtype`` tensors on ``device``
    correctly: not a CUDA device (or CPU tensors without the interpreter), or bfloat16 on the interpreter, whose
    ``tl.dot`` has no bfloat16 and returns wrong numbers instead of failing."""
    if not triton_usable(device):
        raise RuntimeError(
            f"{fn}: backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported), got tensors on {device}"
        )
    if device.type == "cpu" and dtype == torch.bfloat16:
        raise RuntimeError(
            f"{fn}: backend 'triton' cannot compute bfloat16 on the CPU: Triton's interpreter has no bfloat16 dot "
            "(it would return wrong numbers); use float16 / float32, backend 'reference' or 'dense', or a GPU"
        )


def is_compiling() -> bool:
    """True while ``torch.compile`` traces (no measuring then, and no eager-only shortcuts)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


# ``ENV_VAR in os.environ`` costs ~0.8 us (os.environ encodes the key on every lookup), 5 % of a small CPU
# layer. On POSIX CPython os.environ keeps its encoded keys in ``_data``; look there when it exists.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else ENV_VAR


def backend_forced() -> bool:
    """True when ``SPARSEKERNELS_BACKEND`` is set (cheap enough for every forward call)."""
    if isinstance(_ENV_DATA, dict):
        return _ENV_KEY in _ENV_DATA
    return ENV_VAR in os.environ


def check_backend_name(fn: str, backend) -> str:
    """``backend`` if it is one of :data:`BACKENDS`, else ``ValueError`` naming ``fn``."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{fn}: expected backend to be one of {BACKENDS}, got {backend!r}")
    return backend


def cusparselt_unsupported_reason(
    device: torch.device, dtype: torch.dtype, out_features: int, in_features: int
) -> Optional[str]:
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


def resolve(op: str, fn: str, backend: str, x: torch.Tensor, out_features: int = 0) -> str:
    """The backend that will compute ``op`` on ``x``: the environment override applied, then validated.

    Args:
        op: a key of :data:`ROUTES`.
        fn: the public function's name, for error messages.
        backend: the requested backend (one of :data:`BACKENDS`).
        x: the input (its device and dtype decide what can run).
        out_features: the layer's output size (cuSPARSELt's shape rule), 2:4 Linear only.

    Returns:
        A name of :data:`BACKENDS`; ``"auto"`` is left for :func:`run` to settle per call.

    Raises:
        ValueError: an unknown backend name (argument or environment), or a backend this op does not have,
            or ``"cusparselt"`` on a dtype / shape it cannot run.
        RuntimeError: ``"triton"`` or ``"cusparselt"`` on a device that cannot run it, or ``"triton"`` on
            bfloat16 CPU tensors (see :func:`check_triton_runs`).
    """
    if backend_forced():
        forced = os.environ.get(ENV_VAR, "")
        if forced not in BACKENDS:
            raise ValueError(f"{fn}: expected {ENV_VAR} to be one of {BACKENDS}, got {forced!r}")
        backend = forced
    check_backend_name(fn, backend)
    route = ROUTES[op]
    if backend not in route.backends:
        others = ", ".join(repr(b) for b in route.backends)
        raise ValueError(f"{fn}: backend {backend!r} does not compute {op}; expected one of {others}")
    if backend == "triton":
        check_triton_runs(fn, x.device, x.dtype)
    if backend == "cusparselt":
        if x.device.type != "cuda":
            raise RuntimeError(f"{fn}: backend 'cusparselt' needs CUDA tensors, got tensors on {x.device}")
        reason = cusparselt_unsupported_reason(x.device, x.dtype, out_features, x.shape[-1])
        if reason is not None:
            raise ValueError(f"{fn}: backend 'cusparselt' cannot run this layer: {reason}")
    return backend


# ----------------------------------------------------------------------------------------------------
# Implementations that are not kernels: dense PyTorch ops on an expanded weight, cuSPARSELt


def pow2_bucket(m: int) -> int:
    """Dispatch / autotune key for a row or pixel count: the next power of two, so each bucket is tuned once."""
    return 1 << max(m - 1, 0).bit_length()


def _expand_24(values: torch.Tensor, meta: torch.Tensor, k: int, input_perm=None) -> torch.Tensor:
    """The dense weight: in the stored order without ``input_perm``, in the original input order with it (the
    permutation folded in, so ``F.linear`` on it needs no gather)."""
    return Sparse24Weight(values, meta, (values.shape[0], k), input_perm).to_dense()


def _expand_conv(values: torch.Tensor, meta: torch.Tensor, in_channels: int, kernel_size,
                 input_perm=None) -> torch.Tensor:
    return conv_weight_from_2d(_expand_24(values, meta, values.shape[1] * 2, input_perm), in_channels, kernel_size)


def _gather_columns(x2d: torch.Tensor, input_perm) -> torch.Tensor:
    """``x2d[:, input_perm]`` (the input the stored order multiplies), or ``x2d`` without a permutation."""
    return x2d if input_perm is None else x2d.index_select(1, input_perm)


def _expand_blocks(values, row_ptr, col_idx, n: int, k: int) -> torch.Tensor:
    return BlockSparseWeight(values, row_ptr, col_idx, (n, k), values.shape[1]).to_dense()


def conv_output_format(x: torch.Tensor) -> torch.memory_format:
    """The output memory format of a conv on ``x``: channels-last when ``x`` is (and is not also contiguous),
    the rule ``nn.Conv2d`` follows, for every backend."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _conv(x, weight4d, bias, stride, padding, dilation, output_format=None) -> torch.Tensor:
    y = F.conv2d(x, weight4d, bias, stride, padding, dilation)
    return y.contiguous(memory_format=output_format or conv_output_format(x))


# The 2:4 Linear implementations below take (x2d, values, meta, bias, k, input_perm=None). With an input permutation
# the stored matrix multiplies x gathered by it ("dense", "cusparselt": a gather in PyTorch per call), or the cached
# dense copy holds the weight in its original order, the permutation folded in ("cached dense": no gather at all).


def _linear24_dense(x2d, values, meta, bias, k, input_perm=None):
    return F.linear(_gather_columns(x2d, input_perm), _expand_24(values, meta, k), bias)


def _linear24_cached(x2d, values, meta, bias, k, input_perm=None):
    depends = (meta,) if input_perm is None else (meta, input_perm)
    return F.linear(x2d, cached(values, "sparse24_dense", depends, _expand_24, values, meta, k, input_perm), bias)


def _semi_structured(values, meta, k):
    return torch.sparse.to_sparse_semi_structured(_expand_24(values, meta, k))


def _linear24_cusparselt(x2d, values, meta, bias, k, input_perm=None):
    weight = cached(values, "sparse24_cusparselt", (meta,), _semi_structured, values, meta, k)  # the stored 2:4 order
    return F.linear(_gather_columns(x2d, input_perm), weight, bias)


def _conv24_dense(x, values, meta, bias, stride, padding, dilation, kernel_size, input_perm=None):
    output_format = conv_output_format(x)
    if input_perm is not None:
        x = x.index_select(1, input_perm)
    return _conv(x, _expand_conv(values, meta, x.shape[1], kernel_size), bias, stride, padding, dilation,
                 output_format)


def _conv24_cached(x, values, meta, bias, stride, padding, dilation, kernel_size, input_perm=None):
    depends = (meta,) if input_perm is None else (meta, input_perm)
    weight = cached(values, ("conv_dense", x.shape[1], kernel_size), depends, _expand_conv, values, meta,
                    x.shape[1], kernel_size, input_perm)
    return _conv(x, weight, bias, stride, padding, dilation)


def _block_dense(x2d, values, row_ptr, col_idx, bias, n):
    return F.linear(x2d, _expand_blocks(values, row_ptr, col_idx, n, x2d.shape[1]), bias)


def _block_cached(x2d, values, row_ptr, col_idx, bias, n):
    k = x2d.shape[1]
    weight = cached(values, ("block_dense", n, k), (row_ptr, col_idx), _expand_blocks, values, row_ptr, col_idx, n, k)
    return F.linear(x2d, weight, bias)


def _block_cpu_auto(x2d, values, row_ptr, col_idx, bias, n):
    """The batched-block reference for tall enough inputs of a sparse enough weight, else the cached dense copy."""
    m, k = x2d.shape
    nbr, nbc = row_ptr.numel() - 1, -(-k // values.shape[1])
    if values.shape[0] <= CPU_BLOCK_MAX_DENSITY * nbr * nbc and m >= CPU_BLOCK_MIN_ROWS:
        return _KERNELS["block_sparse_linear"]["reference"](x2d, values, row_ptr, col_idx, bias, n)
    return _block_cached(x2d, values, row_ptr, col_idx, bias, n)


# ----------------------------------------------------------------------------------------------------
# The table of ops


def _linear24_candidates(x2d, values, meta, bias, k, input_perm=None) -> tuple[str, ...]:
    if cusparselt_unsupported_reason(x2d.device, x2d.dtype, values.shape[0], k) is None:
        return ("triton", "dense", "cusparselt")
    return ("triton", "dense")


def _perm_key(input_perm) -> tuple:
    # a permuted layer is measured apart (its Triton and cuSPARSELt paths gather x); unpermuted keys are unchanged
    return () if input_perm is None else ("input_perm",)


def _linear24_key(x2d, values, meta, bias, k, input_perm=None) -> tuple:
    # tokens bucketed to powers of two up to 8192 (one decision per bucket)
    return (min(pow2_bucket(x2d.shape[0]), 8192), values.shape[0], k, x2d.dtype, bias is not None,
            *_perm_key(input_perm))


def _conv24_key(x, values, meta, bias, stride, padding, dilation, kernel_size, input_perm=None) -> tuple:
    bsz, c, h, w = x.shape
    fmt = "channels_last" if conv_output_format(x) == torch.channels_last else "contiguous"
    return (pow2_bucket(bsz), c, h, w, values.shape[0], *kernel_size, *stride, *padding, *dilation, fmt,
            str(x.dtype), bias is not None, *_perm_key(input_perm))


def _block_key(x2d, values, row_ptr, col_idx, bias, n) -> tuple:
    # the number of kept blocks is in the key: the kernel's work scales with it, dense's does not
    return (pow2_bucket(x2d.shape[0]), n, x2d.shape[1], values.shape[1], values.shape[0], str(x2d.dtype),
            bias is not None)


def _triton_or_dense(*args) -> tuple[str, ...]:
    return ("triton", "dense")


KERNEL_BACKENDS = ("auto", "triton", "reference", "dense")


@dataclass(frozen=True)
class OpRoute:
    """How one op is routed.

    Attributes:
        module: the kernel module that registers the op's ``torch.library`` op, Triton launcher and reference.
        backends: the names a caller may force.
        candidates: the backends the dispatcher measures on a GPU, given the op's arguments.
        dense: the ``"dense"`` backend (expands the weight on every call).
        cached_dense: the dense candidate the dispatcher measures (a dense copy cached per weight).
        cpu_auto: ``"auto"`` on the CPU.
        key: the dispatch key (shape bucket) of a call.
        extra: implementations other than the kernel module's, by backend name (cuSPARSELt).
    """

    module: str
    dense: Callable[..., torch.Tensor]
    cached_dense: Callable[..., torch.Tensor]
    cpu_auto: Callable[..., torch.Tensor]
    key: Callable[..., tuple]
    backends: tuple[str, ...] = KERNEL_BACKENDS
    candidates: Callable[..., tuple[str, ...]] = _triton_or_dense
    extra: tuple[tuple[str, Callable[..., torch.Tensor]], ...] = ()


# Argument conventions of the implementations (what the custom ops pass to run()):
#   sparse24_linear:     (x2d [M, K], values [N, K/2], meta [N, ceil(K/8)] uint8, bias [N] | None, K
#                         [, input_perm int64 [K]]); its CPU rule (F.linear) also takes x [..., K] as it is
#   sparse24_conv2d:     (x [B, C, H, W], values, meta, bias, stride, padding, dilation, kernel_size
#                         [, input_perm int64 [C]])
#   block_sparse_linear: (x2d [M, K], values [nnz, bs, bs], row_ptr, col_idx, bias, N)
# The permutation is passed only when there is one (perm_args), so an implementation registered for unpermuted
# weights keeps its signature; every built-in one takes it as an optional last argument.


def perm_args(input_perm) -> tuple:
    """The trailing implementation argument for an input permutation: ``(input_perm,)``, or ``()`` without one."""
    return () if input_perm is None else (input_perm,)


ROUTES: dict[str, OpRoute] = {
    "sparse24_linear": OpRoute(
        module="sparsekernels.ops.sparse24_linear",
        backends=BACKENDS,
        candidates=_linear24_candidates,
        dense=_linear24_dense,
        cached_dense=_linear24_cached,
        cpu_auto=_linear24_cached,
        key=_linear24_key,
        extra=(("cusparselt", _linear24_cusparselt),),
    ),
    "sparse24_conv2d": OpRoute(
        module="sparsekernels.ops.sparse24_conv2d",
        dense=_conv24_dense,
        cached_dense=_conv24_cached,
        cpu_auto=_conv24_cached,
        key=_conv24_key,
    ),
    "block_sparse_linear": OpRoute(
        module="sparsekernels.ops.blocksparse_linear",
        dense=_block_dense,
        cached_dense=_block_cached,
        cpu_auto=_block_cpu_auto,
        key=_block_key,
    ),
}

# op -> backend -> implementation, filled by the kernel modules when they are imported
_KERNELS: dict[str, dict[str, Callable[..., torch.Tensor]]] = {op: {} for op in ROUTES}


def register_kernel(op: str, backend: str, impl: Callable[..., torch.Tensor]) -> None:
    """Make ``impl`` the ``backend`` implementation of ``op`` (the kernel modules call this at import).

    Raises:
        ValueError: an op that is not in :data:`ROUTES`, or a backend the op does not have.
    """
    if op not in ROUTES:
        raise ValueError(f"register_kernel(): expected op to be one of {sorted(ROUTES)}, got {op!r}")
    if backend not in ROUTES[op].backends or backend in ("auto", "dense"):
        raise ValueError(f"register_kernel(): expected a kernel backend of {op}, got {backend!r}")
    _KERNELS[op][backend] = impl


def implementation(op: str, backend: str) -> Callable[..., torch.Tensor]:
    """The function that computes ``op`` with the concrete ``backend`` (its kernel module must be imported)."""
    route = ROUTES[op]
    if backend == "dense":
        return route.dense
    impl = _KERNELS[op].get(backend) or dict(route.extra).get(backend)
    if impl is None:
        raise RuntimeError(f"{op}: no {backend!r} implementation is registered (import {route.module} first)")
    return impl


def run(op: str, backend: str, *args) -> torch.Tensor:
    """Compute ``op`` on ``args`` (the op's argument convention above) with ``backend`` (already resolved).

    ``"auto"`` on a GPU asks the dispatcher to choose among the op's candidates, measuring each the first time
    a shape bucket is seen and keeping dense unless beaten by more than noise; with no decision possible yet
    (``torch.compile`` tracing, CUDA-graph capture) it runs dense. ``"auto"`` elsewhere runs the op's CPU rule.
    """
    if backend != "auto":
        return implementation(op, backend)(*args)
    if args[0].is_cuda:  # (not .device.type: a device object costs a microsecond, which small CPU layers feel)
        return run_dispatched(op, *args)
    return ROUTES[op].cpu_auto(*args)


def run_dispatched(op: str, *args) -> torch.Tensor:
    """``"auto"`` on a GPU: the dispatcher's measured choice among the op's candidates for this shape bucket.

    The dispatcher is device-agnostic, so tests drive this with CPU tensors under the Triton interpreter.
    """
    route = ROUTES[op]
    device = args[0].device
    candidates = {
        name: functools.partial(route.cached_dense if name == "dense" else implementation(op, name), *args)
        for name in route.candidates(*args)
    }
    choice = dispatch.select(op, route.key(*args), candidates, default="dense", device=device)
    return candidates[choice]()
