"""What ``sparsekernels bench <selection>`` runs (:data:`sparsekernels.benchmarks.SELECTIONS`).

* ``kernels``         -- the 2:4 Linear sweep of :mod:`~sparsekernels.benchmarks.kernels` (our op vs dense
  ``F.linear`` and cuSPARSELt where supported), with a speedup plot;
* ``layers``          -- the per-layer suite of :mod:`~sparsekernels.benchmarks.layers` (dispatched sparse
  layers of ResNet-50 / BERT / LLaMA vs dense);
* ``models``          -- the model suites of :mod:`~sparsekernels.benchmarks.models`;
* ``all``             -- the three above, in that order;
* ``gpu``             -- :mod:`~sparsekernels.benchmarks.gpu_suite`, the one-call GPU refresh (flat folder,
  <= 8 files);
* ``memory``          -- :mod:`~sparsekernels.benchmarks.cpu_memory`: resident memory of a CPU SparseLinear
  against nn.Linear;
* ``channel-latency`` -- :mod:`~sparsekernels.benchmarks.channel_latency`: filter-pruned ResNet-50 against dense;
* ``pruning-quality`` -- :mod:`~sparsekernels.benchmarks.pruning_quality`: accuracy and output fidelity of 2:4
  pruning per criterion;
* ``nm-quality``      -- :mod:`~sparsekernels.benchmarks.nm_quality`: one-shot 2:4 quality of every criterion with
  and without channel permutation (sentence encoder, digits CNN, a Llama-style model) and the permutation search time
* ``llm-scaling``     -- :mod:`~sparsekernels.benchmarks.llm_scaling`: one-shot 2:4 pruning time, peak memory and
  logits fidelity of a Llama-style model against depth, ours beside llm-compressor's (when installed);
* ``decode``          -- :mod:`~sparsekernels.benchmarks.decode`: end-to-end greedy decode tokens/s of a Llama-style
  model, dense against 2:4 (1.1 B parameters on a GPU, a small model on the CPU);
* ``cpu-auto``        -- :mod:`~sparsekernels.benchmarks.cpu_auto`: the CPU design study of SparseConv2d and
  BlockSparseLinear.

Results are written under ``--out`` (default ``benchmarks/results/<device>/``) with the report writer of
:mod:`sparsekernels.benchmarks.report`, so :mod:`sparsekernels.benchmarks.readme` can put them in the README.
Each suite's files (JSON, Markdown, plots) are published together when it ends, or not at all: an error or
Ctrl-C leaves the files of earlier runs as they were.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from . import SELECTIONS

__all__ = ["CPU_ONLY", "FLOAT32_ONLY", "check_selection", "run_bench", "run_kernels"]

# Selections that measure the CPU whatever the machine has (no device given means the CPU for them).
CPU_ONLY = ("memory", "pruning-quality", "nm-quality", "llm-scaling", "cpu-auto")
# Selections measured in float32 by design.
FLOAT32_ONLY = ("pruning-quality", "nm-quality", "llm-scaling", "cpu-auto")


def run_kernels(device: torch.device, dtypes, *, quick: bool, out_dir: Path, progress: bool,
                layers=None, tokens=None, stem: str = "kernels_linear24") -> tuple[list[dict], list[Path]]:
    """Run the 2:4 Linear sweep (``run_linear24_sweep``) and write it as ``<stem>.json|md`` + a plot in ``out_dir``.

    Returns the rows (dicts, with ``% roofline`` added: ``None`` off known GPUs) and the paths written.
    """
    from ..environment import environment_stamp
    from .kernels import kernel_columns, run_linear24_sweep
    from .measure import add_roofline
    from .report import plot_lines, write_report

    rows = [r.as_dict() for r in run_linear24_sweep(device, quick=quick, dtypes=dtypes, layers=layers,
                                                       tokens=tokens, out_dir=None, progress=progress)]
    add_roofline(rows, device)
    series = {}
    for r in rows:
        if r["backend"] == "dense":
            continue
        label = f"{r['in_features']}x{r['out_features']} {r['dtype']} {r['backend']}"
        series.setdefault(label, []).append((r["tokens"], r["speedup_vs_dense"]))
    plots = []
    if series:
        plots.append(plot_lines(out_dir / f"{stem}_speedup.png", series, title="2:4 Linear: speedup over dense vs tokens",
                                subtitle=environment_stamp(device)["device"], xlabel="tokens (M)",
                                ylabel="speedup over dense (x)", logx=True, hline=1.0, hline_label="dense"))
    files = write_report(stem, rows, kernel_columns(device), out_dir=out_dir, device=device,
                         title="2:4 Linear sweep: our op vs dense F.linear (and cuSPARSELt)", plots=plots,
                         notes="speedup = dense median / this median; GB/s counts the weight as stored; TFLOP/s "
                         "is dense-equivalent 2*M*N*K.")
    return rows, [files.json, files.markdown, *plots]


def check_selection(which: str, device: torch.device | None = None, dtype: torch.dtype | None = None,
                    budget_s: float | None = None) -> torch.device:
    """Check that selection ``which`` can run with these arguments; return the device it measures.

    Args:
        which: one of :data:`sparsekernels.benchmarks.SELECTIONS`.
        device: ``None``: the CPU for :data:`CPU_ONLY` selections, else the GPU if there is one.
        dtype: ``None``: the selection's default.
        budget_s: the time budget of ``gpu``.

    Raises:
        ValueError: an unknown selection, ``budget_s`` for another selection than ``gpu``, ``gpu`` without a CUDA
            device, a CUDA device for a :data:`CPU_ONLY` selection, a dtype other than float32 for a
            :data:`FLOAT32_ONLY` one. The messages name the command-line options, as the CLI prints them.
    """
    if which not in SELECTIONS:
        raise ValueError(f"expected one of {', '.join(SELECTIONS)}, got {which!r}")
    if budget_s is not None and which != "gpu":
        raise ValueError(f"--budget-s only applies to 'bench gpu', got 'bench {which}'")
    if which in FLOAT32_ONLY and dtype not in (None, torch.float32):
        raise ValueError(f"'bench {which}' measures float32 only, got --dtype {str(dtype).replace('torch.', '')}")
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() and which not in CPU_ONLY else "cpu")
    if which in CPU_ONLY and device.type != "cpu":
        raise ValueError(f"'bench {which}' measures the CPU, got --device {device}")
    if which == "gpu" and device.type != "cuda":
        raise ValueError("'bench gpu' needs a CUDA GPU (none here); run 'bench all --quick' on a CPU")
    return device


def run_bench(
    which: str = "all",
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    quick: bool = False,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    budget_s: float | None = None,
    stream=None,
) -> list[Path]:
    """Run a benchmark selection and return the files written.

    Args:
        which: one of :data:`sparsekernels.benchmarks.SELECTIONS`.
        device: where to measure (``None``: see :func:`check_selection`).
        dtype: ``None``: fp16 on a GPU and fp32 on the CPU (``kernels``: fp16 and bf16 on a GPU).
        quick: tiny sizes (about a minute on a CPU); the files are named ``*_quick`` (the GPU suite excepted).
        out_dir: output folder (default ``benchmarks/results/<device>/``; for ``gpu`` it is required to be
            a folder the caller chose, or defaults the same way).
        progress: progress bars.
        budget_s: ``gpu`` only: the time budget (default 480 s).
        stream: where the paths written are printed (default ``sys.stdout``).

    Raises:
        ValueError: the arguments do not fit the selection (:func:`check_selection`).
    """
    from .report import publishing, results_dir

    stream = stream or sys.stdout
    dev = check_selection(which, device, dtype, budget_s)
    out = Path(out_dir) if out_dir is not None else results_dir(dev)
    if which == "gpu":
        from .gpu_suite import run_gpu_suite

        return run_gpu_suite(out, device=dev, budget_s=budget_s if budget_s is not None else 480.0,
                             progress=progress, stream=stream).files
    dt = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    paths: list[Path] = []
    # Each suite's files are one set: published together when the suite ends, or not at all (report.publishing).
    if which in ("kernels", "all"):
        with publishing():
            paths += run_kernels(dev, None if dtype is None else [dtype], quick=quick, out_dir=out, progress=progress,
                                 stem="kernels_linear24_quick" if quick else "kernels_linear24")[1]
    if which in ("layers", "all"):
        from .layers import run_layer_suite

        with publishing():
            paths += run_layer_suite(dev, dtype=dt, quick=quick, out_dir=out, progress=progress)
    if which in ("models", "all"):
        from .models import run_model_suites

        with publishing():
            paths += run_model_suites(dev, dt, quick=quick, out_dir=out, progress=progress)
    if which == "memory":
        from .cpu_memory import run_cpu_memory

        with publishing():
            files = run_cpu_memory(quick=quick, dtype=dt, out_dir=out, progress=progress)
        paths += [files.json, files.markdown]
    if which == "channel-latency":
        from .channel_latency import run_channel_latency

        with publishing():
            files = run_channel_latency(dev, dtype=dt, quick=quick, out_dir=out, progress=progress)
        paths += [files.json, files.markdown]
    if which == "pruning-quality":
        from .pruning_quality import run_pruning_quality

        with publishing():
            paths += run_pruning_quality(quick=quick, out_dir=out, progress=progress)[1:]
    if which == "nm-quality":
        from .nm_quality import run_nm_quality

        with publishing():
            files = run_nm_quality(quick=quick, out_dir=out, progress=progress)[2]
        paths += [files.json, files.markdown]
    if which == "llm-scaling":
        from .llm_scaling import run_llm_scaling

        with publishing():
            files = run_llm_scaling(quick=quick, out_dir=out, progress=progress)[1]
        paths += [files.json, files.markdown]
    if which == "decode":
        from .decode import run_decode

        with publishing():
            files = run_decode(dev, quick=quick, out_dir=out, progress=progress)[1]
        paths += [files.json, files.markdown]
    if which == "cpu-auto":
        from .cpu_auto import run_cpu_auto

        with publishing():
            paths += [p for files in run_cpu_auto(quick=quick, out_dir=out, progress=progress)
                      for p in (files.json, files.markdown)]
    for p in paths:
        print(f"wrote {p}", file=stream)
    return paths
