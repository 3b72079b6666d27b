"""CPU design study behind ``backend="auto"`` on the CPU for ``SparseConv2d`` and ``BlockSparseLinear``.

Run: ``sparsekernels bench cpu-auto [--quick]``, or with every option
``python -m sparsekernels.benchmarks.cpu_auto [--threads 1] [--only conv|block] [--quick]``. Writes
``benchmarks/results/cpu/sparse24_conv2d_cpu_auto.{json,md}`` and ``blocksparse_cpu_auto.{json,md}``
(``_quick`` before the suffix for a quick run).

* Conv: ``nn.Conv2d`` (dense, the baseline) against ``SparseConv2d`` with each CPU backend on ResNet-50
  conv shapes -- "auto" (F.conv2d on the resident dense weight), "dense" (expand the compressed weight every
  call), "reference" (im2col + GEMM). The design rule: auto never more than 1.1x slower than nn.Conv2d.
* Block-sparse: ``nn.Linear`` against ``BlockSparseLinear`` "reference" (one batched GEMM over the kept
  blocks) and "auto" over block densities, to place ``CPU_BLOCK_MAX_DENSITY``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from .report import Column, ReportFiles, results_dir, write_report

__all__ = ["CONV_SHAPES", "paired", "conv_study", "block_study", "run_cpu_auto", "main"]

# (name, batch, C_in, C_out, H=W, k, stride, padding): ResNet-50 layers (batch kept small: 2-core CPU)
CONV_SHAPES = (
    ("layer1 conv2 3x3", 1, 64, 64, 56, 3, 1, 1),
    ("layer1 conv1 1x1", 1, 256, 64, 56, 1, 1, 0),
    ("layer2 conv2 3x3 s2", 1, 128, 128, 56, 3, 2, 1),
    ("layer2 downsample 1x1 s2", 1, 256, 512, 56, 1, 2, 0),
    ("layer3 conv2 3x3", 4, 256, 256, 14, 3, 1, 1),
    ("layer4 conv3 1x1", 4, 512, 2048, 7, 1, 1, 0),
)


def _mask_24_conv(conv: nn.Conv2d) -> None:
    from ..formats.sparse24 import conv_weight_from_2d, conv_weight_to_2d

    w2 = conv_weight_to_2d(conv.weight.detach())
    scores = torch.rand(w2.shape[0], w2.shape[1] // 4, 4)
    mask = torch.zeros_like(scores).scatter_(-1, scores.topk(2, -1).indices, 1.0).reshape(w2.shape)
    with torch.no_grad():
        conv.weight.copy_(conv_weight_from_2d(w2 * mask, conv.in_channels, conv.kernel_size))


def paired(base: Callable[[], object], candidates: Mapping[str, Callable[[], object]], rounds: int, rep: int) -> dict:
    """Time ``base`` and every candidate in alternating rounds (the machine is shared: load drifts).

    Returns name -> {"ms": median of the round medians, "iqr_ms": its spread, "ratio": median over rounds
    of candidate / base, "min_ms": the fastest run of all rounds}; the base is under "base".
    """
    from .measure import time_rounds

    per = time_rounds({"base": base, **candidates}, rounds=rounds, rep=rep, max_time_s=2.0)
    out = {}
    for name, ts in per.items():
        out[name] = {
            "ms": statistics.median(t.median_ms for t in ts),
            "iqr_ms": statistics.median(t.iqr_ms for t in ts),
            "ratio": statistics.median(t.median_ms / b.median_ms for t, b in zip(ts, per["base"])),
            # fastest run of all rounds: the least disturbed by other jobs on a shared CPU
            "min_ms": min(t.min_ms for t in ts),
        }
    return out


def conv_study(rounds: int, rep: int, progress: bool = True, shapes=CONV_SHAPES) -> list[dict]:
    """``nn.Conv2d`` against ``SparseConv2d`` with each CPU backend, NCHW and channels-last inputs; one row per
    (shape, input format)."""
    from tqdm.auto import tqdm

    from ..nn.conv import SparseConv2d

    rows = []
    for name, b, cin, cout, hw, k, s, p in tqdm(shapes, desc="conv", disable=not progress):
        conv = nn.Conv2d(cin, cout, k, stride=s, padding=p).eval()
        _mask_24_conv(conv)
        layers = {backend: SparseConv2d.from_dense(conv, backend=backend) for backend in ("auto", "dense", "reference")}
        for fmt in ("nchw", "channels_last"):
            x = torch.randn(b, cin, hw, hw)
            if fmt == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            backends = ("auto", "dense", "reference") if fmt == "nchw" else ("auto", "dense")
            with torch.inference_mode():
                res = paired(lambda: conv(x), {be: (lambda m=layers[be]: m(x)) for be in backends}, rounds, rep)
            row = {"layer": name, "format": fmt, "batch": b, "conv2d_ms": res["base"]["ms"],
                   "conv2d_iqr_ms": res["base"]["iqr_ms"]}
            for be in backends:
                row[f"{be}_ms"] = res[be]["ms"]
                row[f"{be}_iqr_ms"] = res[be]["iqr_ms"]
                row[f"{be}_vs_dense"] = res[be]["ratio"]
                row[f"{be}_min_vs_dense"] = res[be]["min_ms"] / res["base"]["min_ms"]
            rows.append(row)
    return rows


def block_study(rounds: int, rep: int, progress: bool = True, n: int = 1024, k: int = 1024,
                densities=(0.05, 0.125, 0.25, 0.5)) -> list[dict]:
    """``nn.Linear`` against ``BlockSparseLinear`` ("reference" and "auto") over block sizes 32 and 64, the
    given block densities and M in (1, 32, 256); one row per case."""
    from tqdm.auto import tqdm

    from ..nn.blocksparse import BlockSparseLinear

    rows = []
    cases = [(bs, d, m) for bs in (32, 64) for d in densities for m in (1, 32, 256)]
    for bs, density, m in tqdm(cases, desc="block", disable=not progress):
        lin = nn.Linear(k, n).eval()
        keep = torch.rand(n // bs, k // bs) < density
        with torch.no_grad():
            lin.weight.mul_(keep.repeat_interleave(bs, 0).repeat_interleave(bs, 1))
        ref_layer = BlockSparseLinear.from_dense(lin, block_size=bs, min_block_sparsity=0.0, backend="reference")
        auto_layer = BlockSparseLinear.from_dense(lin, block_size=bs, min_block_sparsity=0.0, backend="auto")
        x = torch.randn(m, k)
        with torch.inference_mode():
            res = paired(lambda: lin(x), {"reference": lambda: ref_layer(x), "auto": lambda: auto_layer(x)}, rounds, rep)
        actual = ref_layer.nnz_blocks / ((n // bs) * (k // bs))
        rows.append({
            "block": bs, "density": actual, "M": m,
            "dense_ms": res["base"]["ms"], "reference_ms": res["reference"]["ms"], "auto_ms": res["auto"]["ms"],
            "reference_speedup": 1 / res["reference"]["ratio"], "auto_speedup": 1 / res["auto"]["ratio"],
            "dense_iqr_ms": res["base"]["iqr_ms"], "reference_iqr_ms": res["reference"]["iqr_ms"],
            "auto_iqr_ms": res["auto"]["iqr_ms"],
        })
    return rows


def run_cpu_auto(
    *,
    only: str | None = None,
    threads: int = 1,
    rounds: int = 5,
    rep: int = 15,
    quick: bool = False,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[ReportFiles]:
    """Run the conv and / or block study on the CPU and write their reports.

    Args:
        only: ``"conv"`` or ``"block"`` for one study; ``None``: both.
        threads: torch CPU threads while measuring (restored afterwards).
        rounds: alternating rounds per case; ``rep``: timed calls per case, split over the rounds (>= 3 a round).
        quick: a smoke run (2 conv shapes, 2 block densities, 2 rounds), files named ``*_quick``.
        out_dir: output folder (default ``benchmarks/results/cpu/``).
        progress: progress bars.

    Returns:
        The files written, conv study first.

    Raises:
        ValueError: ``only`` not ``None``, ``"conv"`` or ``"block"``; ``threads``, ``rounds`` or ``rep`` < 1.
    """
    from ..ops.routing import CPU_BLOCK_MAX_DENSITY, CPU_BLOCK_MIN_ROWS
    from .measure import cpu_timing_threads

    if only not in (None, "conv", "block"):
        raise ValueError(f"run_cpu_auto(): expected only to be None, 'conv' or 'block', got {only!r}")
    if min(threads, rounds, rep) < 1:
        raise ValueError(f"run_cpu_auto(): expected threads, rounds and rep >= 1, got {threads}, {rounds}, {rep}")
    if quick:
        rounds = 2
    out = Path(out_dir) if out_dir is not None else results_dir("cpu")
    suffix = "_quick" if quick else ""
    per_round = max(3, rep // rounds)
    files = []
    torch.manual_seed(0)
    with cpu_timing_threads("cpu", threads):
        if only in (None, "conv"):
            rows = conv_study(rounds, per_round, progress, shapes=CONV_SHAPES[:2] if quick else CONV_SHAPES)
            worst = max(r["auto_vs_dense"] for r in rows)
            worst_min = max(r["auto_min_vs_dense"] for r in rows)
            files.append(write_report(
                f"sparse24_conv2d_cpu_auto{suffix}",
                rows,
                [
                    Column("layer", "layer"), Column("format", "input"), Column("batch", "B"),
                    Column("conv2d_ms", "nn.Conv2d (ms)", ".3f"), Column("auto_ms", "auto (ms)", ".3f"),
                    Column("auto_vs_dense", "auto / dense (median)", ".3f"),
                    Column("auto_min_vs_dense", "auto / dense (min)", ".3f"),
                    Column("dense_vs_dense", "expand-per-call / dense", ".3f"),
                    Column("reference_vs_dense", "reference / dense", ".3f"),
                ],
                out_dir=out,
                title="SparseConv2d on the CPU: backend choices against nn.Conv2d (fp32, 2:4 weights)",
                notes=(
                    f"Median latency, {threads} thread(s); nn.Conv2d and every backend timed in {rounds} alternating "
                    "rounds, ratios are the median of the per-round ratios. 'auto' = F.conv2d on the resident dense "
                    f"weight (the one copy a CPU SparseConv2d keeps); worst auto / dense ratio in this run: "
                    f"{worst:.3f} by median, {worst_min:.3f} by fastest run (design rule: <= 1.1). Ratios > 1 are "
                    "slower than dense."
                ),
            ))
        if only in (None, "block"):
            rows = block_study(rounds, per_round, progress, densities=(0.05, 0.25) if quick else (0.05, 0.125, 0.25, 0.5))
            files.append(write_report(
                f"blocksparse_cpu_auto{suffix}",
                rows,
                [
                    Column("block", "block"), Column("density", "blocks kept", ".3f"), Column("M", "M"),
                    Column("dense_ms", "nn.Linear (ms)", ".3f"), Column("reference_ms", "block GEMMs (ms)", ".3f"),
                    Column("reference_speedup", "block speedup", ".2f"), Column("auto_speedup", "auto speedup", ".2f"),
                ],
                out_dir=out,
                title="BlockSparseLinear on the CPU: batched block GEMMs against nn.Linear (fp32, 1024x1024)",
                notes=(
                    f"Median latency, {threads} thread(s); nn.Linear and both backends timed in {rounds} alternating "
                    "rounds; speedup = median over rounds of nn.Linear time / ours (> 1 is faster). "
                    f"'auto' runs the block GEMMs when M >= CPU_BLOCK_MIN_ROWS={CPU_BLOCK_MIN_ROWS} and at most "
                    f"CPU_BLOCK_MAX_DENSITY={CPU_BLOCK_MAX_DENSITY} of the blocks are kept, else F.linear on a cached "
                    "dense copy. The machine is shared with other jobs: compare ratios within a row."
                ),
            ))
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsekernels.benchmarks.cpu_auto",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machines)")
    parser.add_argument("--rep", type=int, default=15, help="timed calls per case, split over the rounds")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per case")
    parser.add_argument("--quick", action="store_true", help="a smoke run; files named *_quick")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results/cpu/)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    parser.add_argument("--only", choices=("conv", "block"), default=None)
    args = parser.parse_args(argv)
    try:
        files = run_cpu_auto(only=args.only, threads=args.threads, rounds=args.rounds, rep=args.rep, quick=args.quick,
                             out_dir=args.out, progress=args.progress)
    except ValueError as e:
        parser.error(str(e))
    for f in files:
        print(f"wrote {f.json} and {f.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
