"""``sparsekernels bench kernels|layers|models|all|gpu``.

* ``kernels`` -- the 2:4 Linear sweep of :mod:`sparsekernels.bench.linear24` (our op vs dense ``F.linear``
  and cuSPARSELt where supported);
* ``layers``  -- the per-layer suite of :mod:`sparsekernels.bench.layers` (dispatched sparse layers of
  ResNet-50 / BERT / LLaMA vs dense);
* ``models``  -- the model suites of :mod:`sparsekernels.app.suites`;
* ``all``     -- the three above, in that order;
* ``gpu``     -- :mod:`sparsekernels.app.gpu_suite`, the one-call GPU refresh (flat folder, <= 8 files).

Results are written under ``--out`` (default ``benchmarks/results/<device>/``) with the report writer of
:mod:`sparsekernels.bench.report`, so ``sparsekernels.app.readme`` can put them in the README.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from . import UsageError, parse_dtype, resolve_device

__all__ = ["run_bench", "run_kernels", "run_layers", "KERNEL_COLUMNS"]

KERNEL_COLUMNS = (
    ("in_features", "in", "d"),
    ("out_features", "out", "d"),
    ("tokens", "M", "d"),
    ("dtype", "dtype"),
    ("backend", "backend"),
    ("median_ms", "median (ms)", ".4f"),
    ("iqr_ms", "± IQR", ".4f"),
    ("speedup_vs_dense", "speedup", ".2f"),
    ("gb_per_s", "GB/s", ".1f"),
    ("tflop_per_s", "TFLOP/s", ".3f"),
    ("roofline_pct", "% roofline", ".1f"),
    ("rel_err_vs_dense", "rel. err", ".1e"),
)


def _add_roofline(rows: list[dict], device: torch.device) -> None:
    from .measure import device_peak

    peak = device_peak(device)
    for r in rows:
        r["roofline_pct"] = None
        if peak is None or not r.get("median_ms"):
            continue
        flops = r["tflop_per_s"] * 1e12 * r["median_ms"] / 1e3
        nbytes = r["gb_per_s"] * 1e9 * r["median_ms"] / 1e3
        if nbytes > 0:
            attainable = min(peak.tflops_fp16 * 1e12, flops / nbytes * peak.tbps * 1e12)
            r["roofline_pct"] = 100.0 * r["tflop_per_s"] * 1e12 / attainable


def run_kernels(device: torch.device, dtypes, *, quick: bool, out_dir: Path, progress: bool,
                layers=None, tokens=None, stem: str = "kernels_linear24") -> tuple[list[dict], list[Path]]:
    """Run the issue-2 sweep (``run_linear24_sweep``) and write it as ``<stem>.json|md`` + a plot in ``out_dir``.

    Returns the rows (dicts, with ``% roofline`` added on known GPUs) and the paths written.
    """
    from ..bench.environment import environment_stamp
    from ..bench.linear24 import run_linear24_sweep
    from ..bench.report import plot_lines, write_report

    rows = [r.as_dict() for r in run_linear24_sweep(device, quick=quick, dtypes=dtypes, layers=layers,
                                                       tokens=tokens, out_dir=None, progress=progress)]
    _add_roofline(rows, device)
    series = {}
    for r in rows:
        if r["backend"] == "dense":
            continue
        label = f"{r['in_features']}x{r['out_features']} {r['dtype']} {r['backend']}"
        series.setdefault(label, []).append((r["tokens"], r["speedup_vs_dense"]))
    paths = []
    plots = []
    if series:
        plots.append(plot_lines(out_dir / f"{stem}_speedup.png", series, title="2:4 Linear: speedup over dense vs tokens",
                                subtitle=environment_stamp(device)["device"], xlabel="tokens (M)",
                                ylabel="speedup over dense (x)", logx=True, hline=1.0, hline_label="dense"))
    files = write_report(stem, rows, KERNEL_COLUMNS, out_dir=out_dir, device=device,
                         title="2:4 Linear sweep: our op vs dense F.linear (and cuSPARSELt)", plots=plots,
                         notes="speedup = dense median / this median; GB/s counts the weight as stored; TFLOP/s "
                         "is dense-equivalent 2*M*N*K.")
    paths += [files.json, files.markdown, *plots]
    return rows, paths


def run_layers(device: torch.device, dtype: torch.dtype, *, quick: bool, out_dir: Path, progress: bool) -> list[Path]:
    """Run the issue-5 per-layer suite (:mod:`sparsekernels.bench.layers`) into ``out_dir``."""
    try:
        from ..bench import layers
    except ImportError as e:
        raise UsageError(f"the layer suite (sparsekernels.bench.layers) is not available: {e}") from e
    return list(layers.run_layer_suite(device, dtype=dtype, quick=quick, out_dir=out_dir, progress=progress))


def run_bench(
    which: str = "all",
    *,
    device: str | torch.device | None = "auto",
    dtype: str | None = "auto",
    quick: bool = False,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    budget_s: float | None = None,
    stream=None,
) -> list[Path]:
    """Run a benchmark selection and return the files written.

    Args:
        which: ``kernels``, ``layers``, ``models``, ``all`` or ``gpu``.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        dtype: ``auto`` (fp16 on a GPU, fp32 on the CPU), ``fp32``, ``fp16``, ``bf16``.
        quick: tiny sizes (about a minute on a CPU).
        out_dir: output folder (default ``benchmarks/results/<device>/``; for ``gpu`` it is required to be
            a folder the caller chose, or defaults the same way).
        progress: progress bars.
        budget_s: ``gpu`` only: the time budget (default 480 s).

    Raises:
        UsageError: unknown ``which``, a bad device / dtype, ``gpu`` without a GPU, ``budget_s`` with another
            selection.
    """
    from ..bench.report import results_dir

    stream = stream or sys.stdout
    choices = ("kernels", "layers", "models", "all", "gpu")
    if which not in choices:
        raise UsageError(f"expected one of {', '.join(choices)}, got {which!r}")
    if budget_s is not None and which != "gpu":
        raise UsageError(f"--budget-s only applies to 'bench gpu', got 'bench {which}'")
    dev = resolve_device(device)
    if which == "gpu":
        if dev.type != "cuda":
            raise UsageError("'bench gpu' needs a CUDA GPU (none here); run 'bench all --quick' on a CPU")
        from .gpu_suite import run_gpu_suite

        out = Path(out_dir) if out_dir is not None else results_dir(dev)
        return run_gpu_suite(out, device=dev, budget_s=budget_s if budget_s is not None else 480.0,
                             progress=progress, stream=stream).files
    dt = parse_dtype(dtype, dev)
    out = Path(out_dir) if out_dir is not None else results_dir(dev)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if which in ("kernels", "all"):
        dtypes = None if dtype in (None, "auto") else [dt]
        paths += run_kernels(dev, dtypes, quick=quick, out_dir=out, progress=progress,
                             stem="kernels_linear24_quick" if quick else "kernels_linear24")[1]
    if which in ("layers", "all"):
        paths += run_layers(dev, dt, quick=quick, out_dir=out, progress=progress)
    if which in ("models", "all"):
        from .suites import run_model_suites

        paths += run_model_suites(dev, dt, quick=quick, out_dir=out, progress=progress)
    for p in paths:
        print(f"wrote {p}", file=stream)
    return paths
