"""The 2:4 Linear sweep: our op against dense ``F.linear`` and PyTorch's semi-structured sparse GEMM.

Used by ``benchmarks/bench_sparse24_linear.py`` (pytest-benchmark), ``sparsekernels bench kernels`` and the
GPU suite.

On a GPU: tokens M in :data:`TOKENS`, the LLM layers in :data:`LAYERS`, float16 and bfloat16; columns
``dense`` (cuBLAS through ``F.linear`` on a prebuilt dense weight), ``triton`` (our kernel), ``cusparselt``
(``torch.sparse.to_sparse_semi_structured`` weight, prebuilt; where the GPU / torch support it) and ``auto``
(the dispatcher's choice).
On the CPU: a small float32 sweep (:data:`CPU_LAYERS`, :data:`CPU_TOKENS`) of the CPU path
(``backend="auto"``, column ``cpu_auto``) against dense ``F.linear``, and :func:`cpu_design_study`, the
measurement behind the CPU design.

Every row: median and interquartile range (ms), speedup over dense (dense median / this median), GB/s
(bytes of weight + activations + output moved, the weight counted compressed for the sparse columns) and
TFLOP/s (dense-equivalent ``2 * M * N * K``); on a GPU of known peak also the % of the roofline. Results are
written as JSON and Markdown with :func:`~sparsekernels.environment.environment_stamp` under
``benchmarks/results/<device_slug>/``.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..formats.sparse24 import Sparse24Weight, compress_24
from .measure import add_roofline, middle_round, relative_error, time_rounds

__all__ = [
    "TOKENS",
    "LAYERS",
    "QUICK_TOKENS",
    "QUICK_LAYERS",
    "Linear24Row",
    "random_24_weight",
    "run_linear24_sweep",
    "cpu_design_study",
    "SWEEP_TIMING_COLUMNS",
    "kernel_columns",
    "write_results",
    "results_dir_for",
    "DEFAULT_RESULTS",
]

TOKENS = (1, 4, 16, 64, 256, 2048, 8192)
# (in_features K, out_features N): attention/square, MLP up (4096 -> 14336), MLP down (14336 -> 4096).
LAYERS = ((4096, 4096), (4096, 14336), (14336, 4096))
QUICK_TOKENS = (1, 16, 256)
QUICK_LAYERS = ((1024, 1024), (1024, 4096))
CPU_TOKENS = (1, 16, 256)
CPU_LAYERS = ((256, 256), (1024, 1024), (4096, 4096))
CPU_QUICK_TOKENS = (1, 256)
CPU_QUICK_LAYERS = ((1024, 1024),)
# Default results root: resolved by the report writer to the checkout's benchmarks/results.
DEFAULT_RESULTS = "<benchmarks/results>"
# The CPU is usually shared: candidates are timed round-robin this many times (middle round kept).
CPU_ROUNDS = 5


@dataclass(frozen=True)
class Linear24Row:
    """One measured (layer, tokens, dtype, backend) point."""

    in_features: int
    out_features: int
    tokens: int
    dtype: str
    backend: str
    median_ms: float
    iqr_ms: float
    p25_ms: float
    p75_ms: float
    n: int
    speedup_vs_dense: float
    gb_per_s: float
    tflop_per_s: float
    rel_err_vs_dense: Optional[float]
    # CPU only: median over back-to-back (dense, this) call pairs of dense time / this time. On a shared
    # CPU, neighbouring calls see the same load, so this ratio is steadier than the ratio of medians.
    paired_speedup: Optional[float] = None

    def as_dict(self) -> dict:
        return asdict(self)


def random_24_weight(out_features: int, in_features: int, dtype: torch.dtype, device, *, generator=None) -> torch.Tensor:
    """A random dense ``[out, in]`` weight with exactly 2 non-zeros in every group of 4 (random positions)."""
    w = torch.randn(out_features, in_features, generator=generator, device="cpu")
    keep = torch.rand(out_features, in_features // 4, 4, generator=generator).argsort(-1) < 2
    w = w * keep.reshape(out_features, in_features)
    return w.to(device=device, dtype=dtype)


def _bytes(m: int, n: int, k: int, elt: int, weight_bytes: int) -> int:
    return weight_bytes + m * k * elt + m * n * elt


def _paired_speedup(dense_fn: Callable[[], object], fn: Callable[[], object], *, pairs: int = 41, max_time_s: float = 5.0) -> float:
    """Median of dense/candidate time ratios over back-to-back call pairs (order alternated), CPU only."""
    import statistics
    import time

    dense_fn(), fn()
    ratios: list[float] = []
    start = time.perf_counter()
    for i in range(pairs):
        first, second = (dense_fn, fn) if i % 2 == 0 else (fn, dense_fn)
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        d, c = (t1 - t0, t2 - t1) if i % 2 == 0 else (t2 - t1, t1 - t0)
        ratios.append(d / c)
        if len(ratios) >= 5 and time.perf_counter() - start > max_time_s:
            break
    return statistics.median(ratios)


def run_linear24_sweep(
    device: torch.device | str | None = None,
    *,
    quick: bool = False,
    tokens: Optional[Sequence[int]] = None,
    layers: Optional[Sequence[tuple[int, int]]] = None,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    out_dir: str | os.PathLike | None = DEFAULT_RESULTS,
    name: Optional[str] = None,
    progress: bool = True,
) -> list[Linear24Row]:
    """Run the 2:4 Linear sweep and write its JSON + Markdown results.

    Args:
        device: ``"cuda"`` / ``"cpu"``; default the GPU if there is one.
        quick: small shapes (GPU: 1024x1024 and 1024->4096 at M in {1, 16, 256}; CPU: 1024x1024 at
            M in {1, 256}) for a smoke run. Full CPU grid: 256x256, 1024x1024, 4096x4096 at M in {1, 16, 256}.
        tokens, layers, dtypes: override the grid (layers as ``(in_features, out_features)``).
        out_dir: results root, files go to ``<out_dir>/<device_slug>/<name>.{json,md}``; default
            :data:`DEFAULT_RESULTS` (the checkout's ``benchmarks/results``); ``None``: write nothing.
        name: file stem, default ``linear24`` (``linear24_quick`` when quick).
        progress: show a tqdm progress bar.

    Returns:
        The measured rows (dense rows included, speedup 1.0).

    Raises:
        ValueError: a layer's in_features not a multiple of 4, or tokens < 1.
    """
    from ..ops.functional import sparse24_linear
    from ..ops.routing import cusparselt_unsupported_reason

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if on_gpu:
        tokens = tokens or (QUICK_TOKENS if quick else TOKENS)
        layers = layers or (QUICK_LAYERS if quick else LAYERS)
        dtypes = dtypes or (torch.float16, torch.bfloat16)
    else:
        tokens = tokens or (CPU_QUICK_TOKENS if quick else CPU_TOKENS)
        layers = layers or (CPU_QUICK_LAYERS if quick else CPU_LAYERS)
        dtypes = dtypes or (torch.float32,)
    for k, n in layers:
        if k % 4:
            raise ValueError(f"run_linear24_sweep(): expected in_features to be a multiple of 4, got layer {(k, n)}")
    if any(m < 1 for m in tokens):
        raise ValueError(f"run_linear24_sweep(): expected tokens >= 1, got {tuple(tokens)}")

    from tqdm.auto import tqdm

    cases = [(k, n, dt) for (k, n) in layers for dt in dtypes]
    rows: list[Linear24Row] = []
    failures: list[str] = []
    gen = torch.Generator().manual_seed(0)
    bar = tqdm(total=len(cases) * len(tokens), desc="linear24", disable=not progress)
    for k, n, dt in cases:
        dense_w = random_24_weight(n, k, dt, device, generator=gen)
        w24 = compress_24(dense_w)
        elt = dense_w.element_size()
        sparse_bytes = w24.nbytes
        ss_weight = None
        if on_gpu and cusparselt_unsupported_reason(device, dt, n, k) is None:
            ss_weight = torch.sparse.to_sparse_semi_structured(dense_w)
        for m in tokens:
            x = torch.randn(m, k, generator=gen).to(device=device, dtype=dt)
            fns: dict[str, Callable[[], torch.Tensor]] = {"dense": lambda: F.linear(x, dense_w)}
            if on_gpu:
                fns["triton"] = lambda: sparse24_linear(x, w24, backend="triton")
                if ss_weight is not None:
                    fns["cusparselt"] = lambda: F.linear(x, ss_weight)
                fns["auto"] = lambda: sparse24_linear(x, w24, backend="auto")
            else:
                fns["cpu_auto"] = lambda: sparse24_linear(x, w24, backend="auto")
            with torch.inference_mode():
                ref = fns["dense"]()
                errs: dict[str, Optional[float]] = {"dense": None}
                for b, fn in list(fns.items())[1:]:
                    try:
                        errs[b] = relative_error(fn(), ref)
                    except Exception as exc:  # a backend that cannot run this case is reported, not hidden
                        failures.append(f"{b} at in={k}, out={n}, M={m}, {dt}: {type(exc).__name__}: {exc}")
                        warnings.warn(f"run_linear24_sweep(): {failures[-1]}", stacklevel=2)
                        del fns[b]
                rounds = time_rounds(fns, device=device, rounds=1 if on_gpu else CPU_ROUNDS, rep=20, max_time_s=5.0)
                timings = {b: middle_round(ts) for b, ts in rounds.items()}
                paired = {} if on_gpu else {b: _paired_speedup(fns["dense"], fn) for b, fn in fns.items()}
            dense_ms = timings["dense"].median_ms
            for backend, t in timings.items():
                wbytes = n * k * elt if backend == "dense" else sparse_bytes
                rows.append(
                    Linear24Row(
                        in_features=k,
                        out_features=n,
                        tokens=m,
                        dtype=str(dt).replace("torch.", ""),
                        backend=backend,
                        median_ms=t.median_ms,
                        iqr_ms=t.iqr_ms,
                        p25_ms=t.p25_ms,
                        p75_ms=t.p75_ms,
                        n=t.n,
                        speedup_vs_dense=dense_ms / t.median_ms,
                        gb_per_s=_bytes(m, n, k, elt, wbytes) / (t.median_ms * 1e-3) / 1e9,
                        tflop_per_s=2.0 * m * n * k / (t.median_ms * 1e-3) / 1e12,
                        rel_err_vs_dense=errs[backend],
                        paired_speedup=paired.get(backend),
                    )
                )
            bar.update(1)
        del dense_w, w24, ss_weight
    bar.close()
    if out_dir is not None:
        stem = name or ("linear24_quick" if quick else "linear24")
        write_results(rows, device, out_dir, stem, title="2:4 sparse Linear vs dense", failures=failures)
    return rows


def cpu_design_study(
    *,
    layers: Sequence[tuple[int, int]] = ((256, 256), (1024, 1024), (4096, 4096)),
    tokens: Sequence[int] = (1, 256),
    out_dir: str | os.PathLike | None = DEFAULT_RESULTS,
    progress: bool = True,
) -> list[Linear24Row]:
    """Measure the candidate CPU designs for a 2:4 Linear against dense ``F.linear`` (float32).

    Candidates: ``expand_per_call`` (expand the compressed weight, then ``F.linear``), ``cached_dense``
    (what ``backend="auto"`` does on the CPU: a dense copy expanded once per weight), ``torch_sparse_csr``
    (MKL CSR x dense) and, at M = 1, ``gather`` (gather ``x`` at the kept columns, multiply, sum); then the
    modules as users call them: ``sparse_linear`` (``SparseLinear``, ``backend="auto"``) against ``nn_linear``
    (``nn.Linear`` with the same weights and bias) -- for those two rows the speedup is over ``nn_linear``.
    Writes ``cpu_design_study.{json,md}`` under ``<out_dir>/cpu/`` (``out_dir`` as in
    :func:`run_linear24_sweep`; ``None``: write nothing). Returns the rows.
    """
    from tqdm.auto import tqdm

    from ..nn.linear import SparseLinear
    from ..ops.functional import sparse24_linear

    device = torch.device("cpu")
    rows: list[Linear24Row] = []
    gen = torch.Generator().manual_seed(0)
    bar = tqdm(total=len(layers) * len(tokens), desc="cpu designs", disable=not progress)
    for k, n in layers:
        dense_w = random_24_weight(n, k, torch.float32, device, generator=gen)
        w24 = compress_24(dense_w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Sparse CSR tensor support is in beta state"
            csr = dense_w.to_sparse_csr()
        cols = w24.indices()
        lin = torch.nn.Linear(k, n)
        with torch.no_grad():
            lin.weight.copy_(dense_w)
        slin = SparseLinear.from_dense(lin)
        for m in tokens:
            x = torch.randn(m, k, generator=gen)
            fns: dict[str, Callable[[], torch.Tensor]] = {
                "dense": lambda: F.linear(x, dense_w),
                "expand_per_call": lambda: F.linear(x, Sparse24Weight(w24.values, w24.meta, (n, k)).to_dense()),
                "cached_dense": lambda: sparse24_linear(x, w24, backend="auto"),
                "torch_sparse_csr": lambda: torch.mm(csr, x.t()).t(),
            }
            if m == 1:
                fns["gather"] = lambda: (x[0][cols] * w24.values).sum(-1, keepdim=True).t()
            # The modules as users call them (bias included): SparseLinear is compared with nn.Linear.
            fns["nn_linear"] = lambda: lin(x)
            fns["sparse_linear"] = lambda: slin(x)
            with torch.inference_mode():
                ref = fns["dense"]()
                errs = {nm: (None if nm in ("dense", "nn_linear") else relative_error(fn(), ref)) for nm, fn in fns.items()}
                errs["sparse_linear"] = relative_error(slin(x), lin(x))
                rounds = time_rounds(fns, device=device, rounds=CPU_ROUNDS, rep=20, max_time_s=5.0)
                timings = {nm: middle_round(ts) for nm, ts in rounds.items()}
                paired = {nm: _paired_speedup(fns["dense"], fn) for nm, fn in fns.items() if nm != "sparse_linear"}
                paired["nn_linear"] = 1.0
                paired["sparse_linear"] = _paired_speedup(fns["nn_linear"], fns["sparse_linear"])
            for nm, t in timings.items():
                base_ms = timings["nn_linear" if nm in ("nn_linear", "sparse_linear") else "dense"].median_ms
                wbytes = n * k * 4 if nm in ("dense", "cached_dense", "nn_linear", "sparse_linear") else w24.nbytes
                rows.append(
                    Linear24Row(
                        k, n, m, "float32", nm, t.median_ms, t.iqr_ms, t.p25_ms, t.p75_ms, t.n,
                        base_ms / t.median_ms,
                        _bytes(m, n, k, 4, wbytes) / (t.median_ms * 1e-3) / 1e9,
                        2.0 * m * n * k / (t.median_ms * 1e-3) / 1e12,
                        errs[nm],
                        paired.get(nm),
                    )
                )
            bar.update(1)
    bar.close()
    if out_dir is not None:
        write_results(
            rows, device, out_dir, "cpu_design_study", title="2:4 Linear: CPU design candidates vs dense",
            extra_notes="Rows `nn_linear` and `sparse_linear` compare the modules: speedup and paired speedup of "
            "`sparse_linear` are over `nn_linear` (same weights and bias).",
        )
    return rows


# The timing columns of a sweep row (Linear24Row here, LayerRow in the layer suite).
SWEEP_TIMING_COLUMNS = (
    ("median_ms", "median (ms)", ".4f"),
    ("iqr_ms", "± IQR (ms)", ".4f"),
    ("speedup_vs_dense", "speedup vs dense", ".2f"),
)


def kernel_columns(device: torch.device | str) -> tuple:
    """The report columns of :class:`Linear24Row` dicts measured on ``device``: the % of the roofline on a GPU
    (rows given ``roofline_pct`` by :func:`~sparsekernels.benchmarks.measure.add_roofline`), the paired
    speedup on the CPU (where it is measured)."""
    on_gpu = torch.device(device).type == "cuda"
    return (
        ("in_features", "in", "d"), ("out_features", "out", "d"), ("tokens", "M", "d"), ("dtype", "dtype"),
        ("backend", "backend"), *SWEEP_TIMING_COLUMNS, ("gb_per_s", "GB/s", ".1f"), ("tflop_per_s", "TFLOP/s", ".3f"),
        ("roofline_pct", "% roofline", ".1f") if on_gpu else ("paired_speedup", "paired speedup", ".2f"),
        ("rel_err_vs_dense", "rel. err vs dense", ".1e"),
    )


_NOTES = (
    "Speedup = dense median / this median (higher is better). GB/s counts the weight (compressed for the "
    "sparse columns; dense for `dense` and `cached_dense`) + activations + output; TFLOP/s is dense-equivalent "
    "2*M*N*K. CPU timings are the middle of 5 interleaved rounds of warmed-up medians; on a shared CPU the "
    "paired speedup (median of dense/this over back-to-back call pairs) is the steadier comparison."
)


def write_results(
    rows: Iterable[Linear24Row],
    device: torch.device | str,
    out_dir: str | os.PathLike,
    stem: str,
    *,
    title: str,
    failures: Sequence[str] = (),
    extra_notes: str = "",
) -> tuple[Path, Path]:
    """Write ``rows`` with the environment stamp to ``<out_dir>/<device_slug>/<stem>.json`` and ``.md``.

    Uses the project's report writer (:func:`sparsekernels.benchmarks.report.write_report`).
    """
    from .report import write_report

    dicts = [r.as_dict() for r in rows]
    add_roofline(dicts, device)
    files = write_report(
        stem,
        dicts,
        kernel_columns(device),
        out_dir=results_dir_for(device, out_dir),
        device=device,
        title=title,
        notes=_NOTES + (f"\n\n{extra_notes}" if extra_notes else "") + "".join(f"\n\nNot measured: {f}" for f in failures),
        meta={"failures": list(failures)},
    )
    return files.json, files.markdown


def results_dir_for(device: torch.device | str, out_dir: str | os.PathLike = DEFAULT_RESULTS) -> Path:
    """Where :func:`write_results` puts files for ``device``: ``<out_dir>/<device_slug>``."""
    from .report import results_dir

    return results_dir(device, None if out_dir == DEFAULT_RESULTS else out_dir)
