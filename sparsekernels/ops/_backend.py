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
