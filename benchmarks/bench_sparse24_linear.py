"""pytest-benchmark driver for the 2:4 sparse Linear (issue 2).

    pytest benchmarks/bench_sparse24_linear.py --benchmark-enable                 # the full sweep
    SPARSEKERNELS_BENCH_QUICK=1 pytest benchmarks/bench_sparse24_linear.py --benchmark-enable

On a GPU: tokens M in {1, 4, 16, 64, 256, 2048, 8192}, layers 4096->4096, 4096->14336, 14336->4096,
float16 and bfloat16; backends dense (cuBLAS), triton (ours), cusparselt (PyTorch semi-structured) and
auto (the dispatcher). On the CPU: the CPU path (``backend="auto"``) against dense, float32.

Two kinds of tests:

* ``test_linear24_case`` -- one pytest-benchmark entry per (layer, M, dtype, backend), for
  ``--benchmark-compare`` / ``--benchmark-json`` workflows;
* ``test_linear24_sweep`` -- runs :func:`sparsekernels.benchmarks.kernels.run_linear24_sweep` (the same
  timer as the dispatcher: CUDA events with L2 flush on a GPU) and writes the JSON + Markdown results
  under ``benchmarks/results/<device>/``.
"""
import functools
import os

import pytest
import torch
import torch.nn.functional as F

from sparsekernels.benchmarks import kernels
from sparsekernels.formats.sparse24 import compress_24
from sparsekernels.ops.functional import sparse24_linear
from sparsekernels.ops.routing import cusparselt_unsupported_reason

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("SPARSEKERNELS_BENCH_QUICK", "0") not in ("", "0")

if DEVICE.type == "cuda":
    TOKENS = kernels.QUICK_TOKENS if QUICK else kernels.TOKENS
    LAYERS = kernels.QUICK_LAYERS if QUICK else kernels.LAYERS
    DTYPES = (torch.float16, torch.bfloat16)
    BACKENDS = ("dense", "triton", "cusparselt", "auto")
else:
    TOKENS = kernels.CPU_QUICK_TOKENS if QUICK else kernels.CPU_TOKENS
    LAYERS = kernels.CPU_QUICK_LAYERS if QUICK else kernels.CPU_LAYERS
    DTYPES = (torch.float32,)
    BACKENDS = ("dense", "auto")


@functools.lru_cache(maxsize=2)
def _weights(k: int, n: int, dtype: torch.dtype):
    dense = kernels.random_24_weight(n, k, dtype, DEVICE, generator=torch.Generator().manual_seed(0))
    ss = None
    if cusparselt_unsupported_reason(DEVICE, dtype, n, k) is None:
        ss = torch.sparse.to_sparse_semi_structured(dense)
    return dense, compress_24(dense), ss


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layer", LAYERS, ids=lambda kn: f"{kn[0]}x{kn[1]}")
def test_linear24_case(benchmark, layer, dtype, m, backend):
    k, n = layer
    dense, w24, ss = _weights(k, n, dtype)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    if backend == "dense":
        fn = lambda: F.linear(x, dense)  # noqa: E731
    elif backend == "cusparselt":
        if ss is None:
            pytest.skip(f"cuSPARSELt: {cusparselt_unsupported_reason(DEVICE, dtype, n, k)}")
        fn = lambda: F.linear(x, ss)  # noqa: E731
    else:
        fn = lambda: sparse24_linear(x, w24, backend=backend)  # noqa: E731

    def run():
        fn()
        _sync()

    with torch.inference_mode():
        out = fn()
        ref = F.linear(x, dense)
        err = float((out.double() - ref.double()).norm() / ref.double().norm())
        benchmark.extra_info.update({"tokens": m, "in": k, "out": n, "dtype": str(dtype), "backend": backend, "rel_err": err})
        benchmark.pedantic(run, warmup_rounds=3, rounds=20, iterations=1)
    assert err < (1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_linear24_sweep():
    rows = kernels.run_linear24_sweep(DEVICE, quick=QUICK, progress=True)
    stem = "linear24_quick" if QUICK else "linear24"
    folder = kernels.results_dir_for(DEVICE)
    assert (folder / f"{stem}.json").is_file() and (folder / f"{stem}.md").is_file()
    for r in rows:
        if r.rel_err_vs_dense is not None:
            assert r.rel_err_vs_dense < (1e-2 if r.dtype == "bfloat16" else 2e-3), r
