"""Backend selection shared by every op.

``backend`` arguments take one of :data:`BACKENDS`:

* ``"triton"``    -- our Triton kernel (a CUDA device, or CPU tensors under ``TRITON_INTERPRET=1``);
* ``"reference"`` -- the pure-PyTorch reference beside the kernel (the ``"auto"`` choice on the CPU);
* ``"dense"``     -- expand the weight and call the dense PyTorch op (cuBLAS / cuDNN / MKL);
* ``"cusparselt"``-- PyTorch's semi-structured sparse tensors (2:4 Linear on a supporting GPU only);
* ``"auto"``      -- let the dispatcher decide from measured times (see ``sparsekernels.ops.dispatch``).

The environment variable ``SPARSEKERNELS_BACKEND`` forces one backend for every call, whatever the
argument says (debugging, tests, benchmarks).
"""
from __future__ import annotations

import os

import torch

from ..formats.sparse24 import SUPPORTED_DTYPES

__all__ = ["BACKENDS", "ENV_VAR", "resolve_backend", "interpreter_enabled", "triton_usable"]

BACKENDS = ("auto", "triton", "reference", "dense", "cusparselt")
ENV_VAR = "SPARSEKERNELS_BACKEND"


def interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device) -> bool:
    """Can a Triton kernel run on tensors living on ``device``?"""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def check_backend(fn: str, backend: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{fn}: expected backend to be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(fn: str, backend: str, device: torch.device) -> str:
    """Apply the environment override and validate ``backend`` for tensors on ``device``.

    Returns the requested backend, or ``"auto"`` (the caller then asks the dispatcher, or on the CPU
    uses the reference). Raises ``ValueError`` for an unknown backend name (argument or environment)
    and ``RuntimeError`` for a backend that cannot run on ``device``.
    """
    forced = os.environ.get(ENV_VAR)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{fn}: expected {ENV_VAR} to be one of {BACKENDS}, got {forced!r}")
        backend = forced
    check_backend(fn, backend)
    if backend == "triton" and not triton_usable(device):
        raise RuntimeError(
            f"{fn}: backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported), got tensors on {device}"
        )
    if backend == "cusparselt" and device.type != "cuda":
        raise RuntimeError(f"{fn}: backend 'cusparselt' needs CUDA tensors, got tensors on {device}")
    return backend


# ----------------------------------------------------------------------------------------------------
# Launcher and boundary helpers shared by the ops


def pow2_bucket(m: int) -> int:
    """Autotune / dispatch key for a row or pixel count: the next power of two, so each bucket is tuned once."""
    return 1 << max(m - 1, 0).bit_length()


def check_x_like_weight(fn: str, x: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    """``x`` must have the weight's dtype (TypeError) and live on its device (ValueError)."""
    if x.dtype != dtype:
        raise TypeError(f"{fn}: expected x of the weight's dtype {dtype}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{fn}: expected x on the weight's device {device}, got {x.device}")


def check_bias_like_x(fn: str, bias, n: int, x: torch.Tensor) -> None:
    """``bias`` must be None or an ``[n]`` tensor of ``x``'s dtype on ``x``'s device."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{fn}: expected bias to be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (n,):
        raise ValueError(f"{fn}: expected bias of shape ({n},), got {tuple(bias.shape)}")
    if bias.dtype != x.dtype or bias.device != x.device:
        raise TypeError(f"{fn}: expected bias {x.dtype} on {x.device}, got {bias.dtype} on {bias.device}")


def _is_compiling() -> bool:
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


def cpu_fast_path_applies(x, backend: str) -> bool:
    """May this call skip the checks and the custom op (10-25 us: a third of a 1024x1024 GEMV at M=1,
    more than a small layer)? Yes for eager CPU ``"auto"``: a plain CPU tensor of a supported dtype, no
    ``SPARSEKERNELS_BACKEND`` override, not tracing."""
    return (
        backend == "auto"
        and type(x) is torch.Tensor
        and x.is_cpu
        and x.dtype in SUPPORTED_DTYPES
        and not backend_forced()
        and not _is_compiling()
    )
