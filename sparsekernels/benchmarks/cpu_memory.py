"""Resident memory of a 2:4 ``SparseLinear`` on the CPU against ``nn.Linear``, and its latency.

A CPU ``SparseLinear`` keeps one weight copy, the dense weight (its state dict stays compressed; see
:mod:`sparsekernels.nn.sparse24_module`). This measures what that costs and saves, per layer size, after a first
forward pass of a ``[tokens, in_features]`` input:

* **tensor bytes** the module holds: parameters, buffers and every value the runtime cached for them
  (:func:`~sparsekernels.benchmarks.measure.resident_bytes`), and the state dict's bytes for reference;
* **RSS growth**: the process's resident set (``/proc/self/statm``) after building the layer and running the
  forward, minus the resident set before building it -- in a fresh Python process per case, so no allocator
  state or cache of another case counts; the median of ``repeats`` processes. Then again after glibc's
  ``malloc_trim(0)``: the first number is what a process sees, the second what the layer keeps once the
  allocator has returned the free heap that building it left behind;
* **latency** against ``nn.Linear`` with the same weights: the median of interleaved rounds of
  :func:`sparsekernels.timing.time_fn`, one CPU thread.

Run: ``sparsekernels bench memory [--quick]`` or ``python -m sparsekernels.benchmarks.cpu_memory``. Writes
``benchmarks/results/cpu/cpu_memory.{json,md}`` (``cpu_memory_quick`` for a quick run). Linux only (the
resident set is read from ``/proc``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from .report import ReportFiles, results_dir, write_report

__all__ = [
    "LAYER_SIZES",
    "QUICK_LAYER_SIZES",
    "TOKENS",
    "KINDS",
    "COMPARED",
    "MEMORY_COLUMNS",
    "BEFORE_NOTE",
    "build_layer",
    "resident_set_bytes",
    "release_free_heap",
    "rss_growth_here",
    "rss_growth",
    "measure_cpu_memory",
    "run_cpu_memory",
    "main",
]

# (in_features, out_features): a 1024-wide layer, a LLaMA attention projection, a LLaMA MLP up-projection.
LAYER_SIZES = ((1024, 1024), (4096, 4096), (4096, 14336))
QUICK_LAYER_SIZES = ((256, 256), (1024, 1024))
TOKENS = 8
KINDS = ("nn.Linear", "SparseLinear")


def _side_by_side(quantity: str, header: str, fmt: str) -> tuple:
    """The columns of one quantity: nn.Linear's, SparseLinear's and their ratio (keys ``dense_<quantity>``,
    ``sparse_<quantity>``, ``<quantity>_ratio``)."""
    name = header.rsplit(" (", 1)[0]  # the header without its unit
    return ((f"dense_{quantity}", f"nn.Linear {header}", fmt), (f"sparse_{quantity}", f"SparseLinear {header}", fmt),
            (f"{quantity}_ratio", f"{name} ratio", ".2f"))


# The quantities compared side by side, SparseLinear / nn.Linear.
COMPARED = ("tensor_mb", "rss_mb", "rss_trimmed_mb", "ms")
MEMORY_COLUMNS = (
    ("layer", "layer (in x out)"), *_side_by_side("tensor_mb", "tensors (MB)", ".1f"),
    ("sparse_state_dict_mb", "SparseLinear state dict (MB)", ".1f"), *_side_by_side("rss_mb", "RSS growth (MB)", ".1f"),
    *_side_by_side("rss_trimmed_mb", "RSS growth, trimmed (MB)", ".1f"), *_side_by_side("ms", "latency (ms)", ".3f"),
)

BEFORE_NOTE = (
    "Before the redesign (commit 75ab588, measured by the lead): a 4096x4096 fp32 layer, RSS growth after one "
    "forward of an [8, 4096] input: nn.Linear 71.6 MB, SparseLinear 111-142 MB (the compressed values and "
    "metadata plus a dense copy cached at the first forward, ~1.5x of dense); median forward 30 ms against "
    "32-41 ms."
)

_ROW_CHUNK = 64  # rows masked at a time: the mask's temporaries stay a few MB whatever the layer size


def build_layer(kind: str, in_features: int, out_features: int, *, dtype: torch.dtype = torch.float32,
                seed: int = 0) -> nn.Module:
    """An ``nn.Linear`` (with bias) whose weight has exactly 2 non-zeros in every group of 4 (random positions,
    masked a few rows at a time so that building it needs little memory besides the layer), as ``kind``:
    ``"nn.Linear"`` or ``"SparseLinear"`` (converted with ``SparseLinear.from_dense``, the ``nn.Linear`` freed).

    Raises:
        ValueError: an unknown ``kind``, or ``in_features`` not a multiple of 4.
    """
    if kind not in KINDS:
        raise ValueError(f"build_layer(): expected kind in {KINDS}, got {kind!r}")
    if in_features % 4:
        raise ValueError(f"build_layer(): expected in_features to be a multiple of 4, got {in_features}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, dtype=dtype).eval()
    with torch.no_grad():
        groups = linear.weight.view(out_features, in_features // 4, 4)
        for start in range(0, out_features, _ROW_CHUNK):
            rows = groups[start:start + _ROW_CHUNK]
            keep = torch.rand(rows.shape, generator=gen).argsort(-1) < 2
            rows.mul_(keep)
    if kind == "nn.Linear":
        return linear
    from ..nn.linear import SparseLinear

    return SparseLinear.from_dense(linear).eval()


def resident_set_bytes() -> int:
    """This process's resident set size in bytes (``/proc/self/statm``, Linux).

    Raises:
        OSError: no ``/proc/self/statm`` (not Linux).
    """
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def release_free_heap() -> bool:
    """Return the free memory of the C heap to the OS (glibc's ``malloc_trim(0)``); False where there is none."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is None:
        return False
    trim(0)
    return True


def rss_growth_here(kind: str, in_features: int, out_features: int, tokens: int = TOKENS,
                    dtype: str = "float32") -> dict:
    """In this process: the resident-set growth of building one layer (:func:`build_layer`) and running one
    forward of a ``[tokens, in_features]`` input, then after :func:`release_free_heap`. Meant for a fresh
    process (see :func:`rss_growth`). The baseline is taken once a tiny layer of the same kind has been built and
    run and the input exists, so what a process pays once (imports, lazy initialisation of the BLAS) does not
    count as the layer's.

    Returns:
        ``{"baseline_bytes", "after_build_bytes", "after_forward_bytes", "growth_bytes", "trimmed_growth_bytes"}``;
        ``trimmed_growth_bytes`` is None without glibc.
    """
    torch.set_num_threads(1)
    dt = getattr(torch, dtype)
    with torch.inference_mode():
        build_layer(kind, 8, 8, dtype=dt)(torch.randn(tokens, 8, dtype=dt))
    x = torch.randn(tokens, in_features, dtype=dt)
    release_free_heap()
    baseline = resident_set_bytes()
    layer = build_layer(kind, in_features, out_features, dtype=dt)
    after_build = resident_set_bytes()
    with torch.inference_mode():
        layer(x)
    after = resident_set_bytes()
    trimmed = resident_set_bytes() - baseline if release_free_heap() else None
    return {"baseline_bytes": baseline, "after_build_bytes": after_build, "after_forward_bytes": after,
            "growth_bytes": after - baseline, "trimmed_growth_bytes": trimmed}


def rss_growth(kind: str, in_features: int, out_features: int, tokens: int = TOKENS,
               dtype: torch.dtype = torch.float32, *, timeout_s: float = 600.0) -> dict:
    """:func:`rss_growth_here` run in a fresh Python process (this interpreter, this copy of ``sparsekernels``).

    Raises:
        RuntimeError: the process failed (its last stderr lines are in the message).
    """
    import sparsekernels

    source_root = str(Path(sparsekernels.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([source_root, *filter(None, [env.get("PYTHONPATH")])])
    code = ("import json, sys\n"
            "from sparsekernels.benchmarks.cpu_memory import rss_growth_here\n"
            f"json.dump(rss_growth_here({kind!r}, {in_features}, {out_features}, {tokens}, "
            f"{str(dtype).replace('torch.', '')!r}), sys.stdout)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"rss_growth(): the measuring process for {kind} {in_features}x{out_features} failed "
                           f"with exit code {proc.returncode}: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_mb(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) / 1e6 if values else None


def _ratio(sparse: float | None, dense: float | None) -> float | None:
    return sparse / dense if sparse is not None and dense else None


def measure_cpu_memory(
    sizes=LAYER_SIZES,
    *,
    tokens: int = TOKENS,
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    rounds: int = 7,
    rep: int = 10,
    progress: bool = True,
) -> list[dict]:
    """Measure every ``(in_features, out_features)`` of ``sizes``: tensor bytes, RSS growth, latency (see the
    module docstring). No files written.

    Args:
        sizes: the layers, ``(in_features, out_features)`` each (in_features a multiple of 4).
        tokens: rows of the input.
        dtype: the layers' dtype.
        repeats: fresh processes per (layer, kind) for the RSS growth; the median is reported.
        rounds, rep: interleaved timing rounds, and timed calls per layer and round.
        progress: a progress bar over the layers.

    Returns:
        One row (dict) per layer: the columns of :data:`MEMORY_COLUMNS` plus the raw bytes and the RSS growth of
        every process.

    Raises:
        ValueError: ``tokens``, ``repeats``, ``rounds`` or ``rep`` < 1, or a bad layer size.
    """
    from tqdm.auto import tqdm

    from .measure import cpu_timing_threads, resident_bytes, stored_bytes, time_interleaved

    if min(tokens, repeats, rounds, rep) < 1:
        raise ValueError(f"measure_cpu_memory(): expected tokens, repeats, rounds and rep >= 1, got {tokens}, "
                         f"{repeats}, {rounds}, {rep}")
    rows = []
    for k, n in tqdm(sizes, desc="cpu memory", disable=not progress):
        row: dict = {"layer": f"{k}x{n}", "in_features": k, "out_features": n, "tokens": tokens,
                     "dtype": str(dtype).replace("torch.", "")}
        runs = {kind: [rss_growth(kind, k, n, tokens, dtype) for _ in range(repeats)] for kind in KINDS}
        dense, sparse = (build_layer(kind, k, n, dtype=dtype) for kind in KINDS)
        x = torch.randn(tokens, k, dtype=dtype)
        with torch.inference_mode():
            dense(x), sparse(x)  # the first forward: whatever a layer caches, it has cached now
        tensors = {"nn.Linear": resident_bytes(dense), "SparseLinear": resident_bytes(sparse)}

        def runner(m):
            def call():
                with torch.inference_mode():
                    return m(x)
            return call

        with cpu_timing_threads("cpu", 1):
            timings = time_interleaved({kind: runner(m) for kind, m in zip(KINDS, (dense, sparse))}, rounds=rounds,
                                       rep=rep, progress=False)
        row.update(
            dense_tensor_bytes=tensors["nn.Linear"], sparse_tensor_bytes=tensors["SparseLinear"],
            dense_tensor_mb=tensors["nn.Linear"] / 1e6, sparse_tensor_mb=tensors["SparseLinear"] / 1e6,
            sparse_state_dict_mb=stored_bytes(sparse) / 1e6, dense_state_dict_mb=stored_bytes(dense) / 1e6,
            rss_runs=runs,
            dense_rss_mb=_median_mb(runs["nn.Linear"], "growth_bytes"),
            sparse_rss_mb=_median_mb(runs["SparseLinear"], "growth_bytes"),
            dense_rss_trimmed_mb=_median_mb(runs["nn.Linear"], "trimmed_growth_bytes"),
            sparse_rss_trimmed_mb=_median_mb(runs["SparseLinear"], "trimmed_growth_bytes"),
            dense_ms=timings["nn.Linear"].median_ms, sparse_ms=timings["SparseLinear"].median_ms,
            dense_iqr_ms=timings["nn.Linear"].iqr_ms, sparse_iqr_ms=timings["SparseLinear"].iqr_ms,
        )
        row.update({f"{q}_ratio": _ratio(row[f"sparse_{q}"], row[f"dense_{q}"]) for q in COMPARED})
        rows.append(row)
        del dense, sparse
    return rows


def run_cpu_memory(
    *,
    quick: bool = False,
    dtype: torch.dtype = torch.float32,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> ReportFiles:
    """Run :func:`measure_cpu_memory` over :data:`LAYER_SIZES` and write ``cpu_memory.{json,md}``.

    Args:
        quick: :data:`QUICK_LAYER_SIZES`, one process per RSS case and fewer timing rounds; files named
            ``cpu_memory_quick``.
        dtype: the layers' dtype.
        out_dir: output folder (default ``benchmarks/results/cpu/``).
        progress: a progress bar.

    Returns:
        The :class:`~sparsekernels.benchmarks.report.ReportFiles` written.
    """
    from ..environment import environment_stamp
    from .measure import cpu_timing_threads

    sizes = QUICK_LAYER_SIZES if quick else LAYER_SIZES
    repeats, rounds = (1, 3) if quick else (3, 7)
    rows = measure_cpu_memory(sizes, dtype=dtype, repeats=repeats, rounds=rounds, progress=progress)
    with cpu_timing_threads("cpu", 1):
        env = environment_stamp("cpu")  # stamped with the thread count the timing ran with
    notes = (
        f"{str(dtype).replace('torch.', '')}, bias included, after one forward of a [{TOKENS}, in] input. Tensors: "
        "parameters + buffers + values the runtime cached for them (sparsekernels.ops.cache), each storage once. "
        "RSS growth: resident set (/proc/self/statm) after building the layer and its first forward minus before "
        "building it (after a tiny layer of the same kind was built and run: imports and BLAS start-up are not "
        f"the layer's), in a fresh process per case, median of {repeats} process(es); trimmed: the same after "
        "glibc's malloc_trim(0) returned the free heap to the OS (what the layer itself keeps). Latency: median of "
        f"{rounds} interleaved rounds of sparsekernels.timing.time_fn, 1 CPU thread. Ratios are "
        "SparseLinear / nn.Linear (lower is better). " + BEFORE_NOTE
    )
    return write_report(
        "cpu_memory_quick" if quick else "cpu_memory", rows, MEMORY_COLUMNS,
        out_dir=Path(out_dir) if out_dir is not None else results_dir("cpu"), device="cpu",
        title="2:4 SparseLinear on the CPU: resident memory and latency against nn.Linear",
        notes=notes, environment=env,
        meta={"sizes": [list(s) for s in sizes], "tokens": TOKENS, "before": BEFORE_NOTE},
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsekernels.benchmarks.cpu_memory",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small layers, one process per case")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results/cpu/)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    args = parser.parse_args(argv)
    files = run_cpu_memory(quick=args.quick, out_dir=args.out, progress=args.progress)
    print(f"wrote {files.json} and {files.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
