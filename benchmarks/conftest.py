"""pytest-benchmark setup for ``pytest benchmarks/`` (the normal test run only collects ``tests/``).

* Collects every ``bench_*.py`` file here (pytest's default pattern is ``test_*.py``), so ``pytest benchmarks/``
  runs them all; naming one file on the command line works as well.
* Fixtures shared by the benchmark files, set from the environment so that one command runs the same
  benchmarks anywhere:

  ``SPARSEKERNELS_BENCH_DEVICE``  ``auto`` (default: the GPU if there is one), ``cpu``, ``cuda``, ``cuda:1``
  ``SPARSEKERNELS_BENCH_DTYPE``   ``auto`` (default: fp16 on a GPU, fp32 on the CPU), ``fp32``, ``fp16``, ``bf16``
  ``SPARSEKERNELS_BENCH_QUICK``   ``1``: the small sizes (about a minute on a CPU)
  ``SPARSEKERNELS_RESULTS_DIR``   where results go (default ``benchmarks/results/<device>/``; ``cpu/`` for the
  CPU-only benchmarks)

pyproject's ``addopts`` passes ``--benchmark-disable``; the suites time themselves with
:func:`sparsekernels.timing.time_fn` (CUDA events on a GPU, a warmed median on the CPU) and write their
tables, so they produce results either way. Add ``--benchmark-enable`` for pytest-benchmark's own statistics.
"""
import os
from pathlib import Path

import pytest
import torch


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    from sparsekernels.app import resolve_device

    return resolve_device(os.environ.get("SPARSEKERNELS_BENCH_DEVICE", "auto"))


@pytest.fixture(scope="session")
def bench_dtype(bench_device) -> torch.dtype:
    from sparsekernels.app import parse_dtype

    return parse_dtype(os.environ.get("SPARSEKERNELS_BENCH_DTYPE", "auto"), bench_device)


@pytest.fixture(scope="session")
def bench_quick() -> bool:
    return os.environ.get("SPARSEKERNELS_BENCH_QUICK", "0") not in ("", "0")


def _results_out(device) -> Path:
    from sparsekernels.benchmarks.report import results_dir

    out = os.environ.get("SPARSEKERNELS_RESULTS_DIR")
    path = Path(out) if out else results_dir(device)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def results_out(bench_device) -> Path:
    return _results_out(bench_device)


@pytest.fixture(scope="session")
def cpu_results_out() -> Path:
    """Where the CPU-only benchmarks write, whatever ``SPARSEKERNELS_BENCH_DEVICE`` says."""
    return _results_out("cpu")
