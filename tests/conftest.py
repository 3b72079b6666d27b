"""Test setup. Without a CUDA GPU, Triton kernels run through Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at collection time.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The benchmark-backend override must never leak into the test-suite from the user's shell.
os.environ.pop("SPARSEKERNELS_BACKEND", None)

# Dispatcher decisions made by tests go to a throw-away tuning cache, never the user's ~/.cache.
if "SPARSEKERNELS_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache_dir = tempfile.mkdtemp(prefix="sparsekernels-test-cache-")
    os.environ["SPARSEKERNELS_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)


@pytest.fixture
def kernel_device() -> torch.device:
    """Where Triton kernels run in this session: the GPU if there is one, else the CPU interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def kernel_override():
    """Replace a registered kernel implementation for one test: ``kernel_override(op, backend, make)``
    registers ``make(real)`` in place of the real implementation, which is registered again afterwards."""
    from sparsekernels.ops import functional, routing

    saved = []

    def override(op: str, backend: str, make):
        functional.custom_op(op)  # the kernel module registers its implementations when imported
        real = routing.implementation(op, backend)
        saved.append((op, backend, real))
        routing.register_kernel(op, backend, make(real))
        return real

    yield override
    for op, backend, real in reversed(saved):
        routing.register_kernel(op, backend, real)


def spy(kernel_override, op: str, backend: str) -> list:
    """Calls of ``op``'s ``backend`` implementation during the test, recorded as the backend name."""
    calls: list = []
    kernel_override(op, backend, lambda real: lambda *a, **k: calls.append(backend) or real(*a, **k))
    return calls


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
