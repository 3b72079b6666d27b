"""The public ops: ``sparse24_linear``, ``sparse24_conv2d``, ``block_sparse_linear``.

Each checks its inputs (:mod:`sparsekernels.ops.checks`), resolves the backend
(:func:`sparsekernels.ops.routing.resolve`) and calls the op's ``torch.library`` custom op, which the op's kernel
module registers. Kernel modules import Triton, so they are imported here, on the first call of their op, never
by ``import sparsekernels``.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from ..formats.blocksparse import BlockSparseWeight
from ..formats.sparse24 import Sparse24Weight
from . import checks, routing

__all__ = ["sparse24_linear", "sparse24_conv2d", "block_sparse_linear", "custom_op"]

_OPS: dict[str, object] = {}


def _import_kernel_module(name: str):
    importlib.import_module(routing.ROUTES[name].module)
    op = _OPS[name] = getattr(torch.ops.sparsekernels, name)
    return op


def custom_op(name: str):
    """The registered ``torch.ops.sparsekernels.<name>`` op, importing its kernel module on first use.

    ``torch.compile`` cannot trace an import: a first use while it traces runs the import outside the graph (one
    graph break; an error under ``fullgraph=True``). The sparse modules import their op when they are built,
    moved or loaded, so a model never meets this; a compiled function that calls the functional op before any
    eager call does.
    """
    op = _OPS.get(name)
    if op is not None:
        return op
    if routing.is_compiling():
        return torch.compiler.disable(_import_kernel_module)(name)
    return _import_kernel_module(name)


def _eager_cpu_auto(name: str, x: torch.Tensor, backend: str) -> bool:
    """May the call skip the custom op's ~20 us of dispatch (more than a small CPU layer takes)? Yes for eager
    ``"auto"`` on CPU tensors: the op would run the same CPU rule, and PyTorch's own ops give the gradients."""
    if backend == "auto" and x.is_cpu and not routing.is_compiling():
        custom_op(name)  # the CPU rule may run the op's reference, which its kernel module registers
        return True
    return False


def sparse24_linear(
    x: torch.Tensor, w24: Sparse24Weight, bias: Optional[torch.Tensor] = None, *, backend: str = "auto"
) -> torch.Tensor:
    """``y = x @ W.T + bias`` for a 2:4-compressed weight ``W`` (backward: gradients of ``x`` and ``bias`` only).

    Args:
        x: ``[..., in]`` float16 / bfloat16 / float32 activations, same dtype and device as ``w24``; any
            strides (the Triton kernel reads through them).
        w24: the compressed ``[out, in]`` weight (:func:`sparsekernels.compress_24`). When it carries an
            ``input_perm`` (stored in a permuted input order), every backend gathers ``x`` by it (the Triton kernel
            in its activation load, ``"dense"`` / ``"reference"`` / ``"cusparselt"`` in PyTorch) or multiplies by
            the weight in its original order (the cached dense copy of ``"auto"``): ``W`` is ``w24.to_dense()``.
        bias: optional ``[out]`` tensor, same dtype and device.
        backend: ``"auto"`` (CPU: ``F.linear`` on a dense copy cached per weight, see ``docs/sparse24.md``;
            CUDA: the measured fastest of ``"triton"``, ``"dense"`` and ``"cusparselt"`` per shape),
            ``"triton"``, ``"reference"``, ``"dense"`` or ``"cusparselt"``. ``SPARSEKERNELS_BACKEND`` overrides it.

    Returns:
        ``[..., out]`` tensor in ``x.dtype`` on ``x.device``.

    Raises:
        TypeError: ``x`` / ``bias`` not tensors, ``w24`` not a :class:`Sparse24Weight`, or dtype mismatch.
        ValueError: ``x.shape[-1] != in``, bias shape, device mismatch, unknown backend name (argument or
            environment), ``"cusparselt"`` on an unsupported dtype / shape, or an ``input_perm`` that is not a
            permutation of ``0..in-1`` (checked once per tensor, see :func:`sparsekernels.ops.checks.check_input_perm`).
        RuntimeError: ``"triton"`` on CPU tensors without ``TRITON_INTERPRET=1`` or on bfloat16 CPU tensors;
            ``"cusparselt"`` off CUDA.
    """
    fn = "sparse24_linear()"
    checks.check_sparse24_linear(fn, x, w24, bias)
    backend = routing.resolve("sparse24_linear", fn, backend, x, w24.shape[0])
    args = (w24.values, w24.meta, bias, w24.shape[1])
    if _eager_cpu_auto("sparse24_linear", x, backend):
        # the CPU rule is F.linear on the cached dense weight, which takes x's leading dimensions as they are
        return routing.run("sparse24_linear", backend, x, *args, *routing.perm_args(w24.input_perm))
    return custom_op("sparse24_linear")(x, *args, backend, w24.input_perm)


def sparse24_conv2d(
    x: torch.Tensor,
    w24: Sparse24Weight,
    bias: Optional[torch.Tensor] = None,
    stride: checks.IntPair = 1,
    padding: checks.IntPair = 0,
    dilation: checks.IntPair = 1,
    *,
    kernel_size: checks.IntPair,
    backend: str = "auto",
) -> torch.Tensor:
    """2-D convolution (groups = 1, zero padding) with a 2:4-compressed weight.

    Args:
        x: ``[B, C, H, W]`` float16 / bfloat16 / float32 in any memory format; the weight's dtype and
            device. ``C`` a positive multiple of 4 with ``kh * kw * C`` the weight's ``in``; ``B = 0`` gives an
            empty output.
        w24: ``compress_24(conv_weight_to_2d(weight))`` for a ``[out, C, kh, kw]`` weight whose every
            group of 4 consecutive input channels at each kernel position has at most 2 non-zeros; or
            ``compress_24(conv_weight_to_2d(weight), input_perm=p)`` with ``p`` an ``int64 [C]`` permutation of the
            input channels (2:4 in the order ``weight[:, p]``), which every backend applies to ``x``'s channels.
        bias: optional ``[out]``, same dtype and device as ``x``.
        stride, padding, dilation: ints or pairs, as in ``F.conv2d`` (numeric padding only).
        backend: ``"auto"`` (GPU: the dispatcher measures Triton vs cuDNN on a cached dense copy once per
            shape; CPU: ``F.conv2d`` on a dense copy cached per weight), ``"triton"``, ``"reference"`` or
            ``"dense"`` (expand, then ``F.conv2d``). ``SPARSEKERNELS_BACKEND`` overrides it.
        kernel_size: ``(kh, kw)`` (or one int), required: the compressed weight does not record it, and
            inferring it from ``x``'s channel count would silently run another convolution for an input whose
            channel count divides the weight differently (36 inputs per output are a 3x3 kernel over 4 channels
            or a 1x1 kernel over 36).

    Returns:
        ``[B, out, OH, OW]`` of ``x``'s dtype; channels-last memory format when ``x`` is channels-last,
        else contiguous.

    Raises:
        TypeError: wrong argument types or dtypes, ``kernel_size=None``.
        ValueError: wrong shapes, channel count, kernel size, devices, empty spatial dimensions or an empty
            output, an unknown backend or one the op does not have (``"cusparselt"``), an ``input_perm`` that is
            not a permutation of the ``C`` channels.
        RuntimeError: ``"triton"`` on a CPU tensor without ``TRITON_INTERPRET=1``, or on bfloat16 CPU tensors.
    """
    fn = "sparse24_conv2d()"
    geometry = checks.check_sparse24_conv2d(fn, x, w24, bias, stride, padding, dilation, kernel_size)
    backend = routing.resolve("sparse24_conv2d", fn, backend, x)
    if _eager_cpu_auto("sparse24_conv2d", x, backend):
        return routing.run("sparse24_conv2d", backend, x, w24.values, w24.meta, bias, *geometry,
                           *routing.perm_args(w24.input_perm))
    return custom_op("sparse24_conv2d")(x, w24.values, w24.meta, bias, *geometry, backend, w24.input_perm)


def block_sparse_linear(
    x: torch.Tensor, wb: BlockSparseWeight, bias: Optional[torch.Tensor] = None, *, backend: str = "auto"
) -> torch.Tensor:
    """``y = x @ W.T + bias`` for a block-sparse ``W``.

    Args:
        x: ``[..., in]`` float16 / bfloat16 / float32, the weight's dtype and device.
        wb: the weight, from :func:`sparsekernels.compress_blocks` (``shape == (out, in)``).
        bias: optional ``[out]``, same dtype and device as ``x``.
        backend: ``"auto"`` (GPU: the dispatcher measures Triton vs dense once per shape bucket; CPU: the
            batched-block reference when ``x`` has at least
            :data:`~sparsekernels.ops.routing.CPU_BLOCK_MIN_ROWS` rows and at most
            :data:`~sparsekernels.ops.routing.CPU_BLOCK_MAX_DENSITY` of the blocks are kept, else ``F.linear`` on
            a dense copy cached per weight), ``"triton"``, ``"reference"`` or ``"dense"``.
            ``SPARSEKERNELS_BACKEND`` overrides it.

    Returns:
        ``[..., out]`` tensor of ``x``'s dtype (contiguous); zero rows give an empty output.

    Raises:
        TypeError: wrong argument types or dtypes.
        ValueError: wrong shapes or devices, an unknown backend or one the op does not have (``"cusparselt"``).
        RuntimeError: ``"triton"`` on a CPU tensor without ``TRITON_INTERPRET=1``, or on bfloat16 CPU tensors.
    """
    fn = "block_sparse_linear()"
    checks.check_block_sparse_linear(fn, x, wb, bias)
    backend = routing.resolve("block_sparse_linear", fn, backend, x)
    n, k = wb.shape
    args = (wb.values, wb.row_ptr, wb.col_idx, bias, n)
    if _eager_cpu_auto("block_sparse_linear", x, backend):
        return routing.run("block_sparse_linear", backend, x.reshape(-1, k), *args).reshape(*x.shape[:-1], n)
    return custom_op("block_sparse_linear")(x, *args, backend)
