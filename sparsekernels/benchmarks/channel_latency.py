"""Filter pruning pays off in latency: ResNet-50 with 2x fewer MACs against the dense ResNet-50.

Run: ``sparsekernels bench channel-latency [--quick]`` (CPU, batch 8, 224x224, fp32), or on a GPU
``python -m sparsekernels.benchmarks.channel_latency --device cuda --batch 64`` (cuDNN, fp16 by default on
CUDA). Writes ``benchmarks/results/<device>/channel_latency.{json,md}`` (``channel_latency_quick`` for a quick
run) with the environment stamp.

The pruning ratio that gives 2.0x fewer MACs is found by bisection on ``prune_channels``' own MAC count
(``torch.utils.flop_counter``). Dense and pruned models are timed in alternating rounds with
:func:`sparsekernels.timing.time_fn`; the speedup is the median over rounds of dense / pruned. The target
(TARGETS.md): speedup >= 0.8 x the MAC reduction, i.e. >= 1.6x at 2x fewer MACs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from .report import Column, ReportFiles, results_dir, write_report

__all__ = ["find_ratio", "run_channel_latency", "main"]

COLUMNS = (
    Column("model", "model"), Column("macs_g", "GMACs / image", ".2f"), Column("params_m", "params (M)", ".2f"),
    Column("mac_reduction", "MAC reduction", ".2f"), Column("median_ms", "median (ms)", ".1f"),
    Column("iqr_ms", "IQR (ms)", ".1f"), Column("speedup", "speedup", ".2f"),
)


def find_ratio(model, x, target: float, round_to, iters: int, progress: bool):
    """Bisect the channel ratio until ``prune_channels`` reports ``target`` x fewer MACs (within 1 %).

    Returns ``(ratio, pruned model, report)`` of the closest ratio tried.
    """
    from pruning.channels import prune_channels

    lo, hi = 0.05, 0.8
    best = None
    for i in range(iters):
        mid = (lo + hi) / 2
        pruned, rep = prune_channels(model, x, ratio=mid, round_to=round_to, return_report=True, progress=False)
        if progress:
            print(f"  search {i + 1}/{iters}: ratio {mid:.4f} -> {rep.mac_reduction:.3f}x fewer MACs", flush=True)
        if best is None or abs(rep.mac_reduction - target) < abs(best[2].mac_reduction - target):
            best = (mid, pruned, rep)
        if abs(rep.mac_reduction - target) <= 0.01 * target:
            break
        if rep.mac_reduction < target:
            lo = mid
        else:
            hi = mid
    return best


def run_channel_latency(
    device: torch.device | str = "cpu",
    *,
    dtype: torch.dtype | None = None,
    batch: int = 8,
    size: int = 224,
    target: float = 2.0,
    round_to: int | None = 8,
    rounds: int = 5,
    rep: int = 10,
    quick: bool = False,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> ReportFiles:
    """Prune ResNet-50 (random init) to ``target`` x fewer MACs, time it against dense, write the report.

    Args:
        device: where the models are timed (the search runs on the CPU).
        dtype: default float32 on the CPU, float16 on CUDA.
        batch, size: the timed input is ``[batch, 3, size, size]``.
        target: the MAC reduction to search for.
        round_to: keep channel counts multiples of this (``None``: any count).
        rounds, rep: alternating dense / pruned timing rounds, and timed calls per model and round.
        quick: fewer search steps and timing rounds (a smoke run); files named ``channel_latency_quick``.
        out_dir: output folder (default ``benchmarks/results/<device>/``).
        progress: print the search steps, show a progress bar over the rounds.

    Returns:
        The :class:`~sparsekernels.benchmarks.report.ReportFiles` written.

    Raises:
        ValueError: ``batch``, ``size``, ``rounds`` or ``rep`` < 1, or ``target`` <= 1.
    """
    import torchvision

    from .measure import time_rounds

    if min(batch, size, rounds, rep) < 1 or not target > 1.0:
        raise ValueError(f"run_channel_latency(): expected batch, size, rounds, rep >= 1 and target > 1, got "
                         f"{batch}, {size}, {rounds}, {rep} and {target}")
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if quick:
        rounds, rep = 2, 3
    torch.manual_seed(0)
    dense = torchvision.models.resnet50(weights=None).eval()
    probe = torch.randn(1, 3, size, size)
    t0 = time.perf_counter()
    ratio, pruned, report = find_ratio(dense, probe, target, round_to, 6 if quick else 10, progress)
    search_s = time.perf_counter() - t0
    if progress:
        print(f"ratio {ratio:.4f}: MACs {report.macs_before / 1e9:.2f} G -> {report.macs_after / 1e9:.2f} G "
              f"({report.mac_reduction:.3f}x), params {report.params_before / 1e6:.2f} M -> "
              f"{report.params_after / 1e6:.2f} M", flush=True)

    dense = dense.to(device, dtype)
    pruned = pruned.to(device, dtype).eval()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)

    def runner(m):
        def fn():
            with torch.no_grad():
                return m(x)
        return fn

    fns = {"dense": runner(dense), "pruned": runner(pruned)}
    for fn in fns.values():  # one extra warm-up call before the first round (cuDNN autotuning, allocator)
        fn()
    timings = time_rounds(fns, device=device, rounds=rounds, progress=progress, desc="dense / pruned", warmup=1,
                          rep=rep, max_time_s=60)
    samples = {name: [t.median_ms for t in ts] for name, ts in timings.items()}
    speedups = [d / p for d, p in zip(samples["dense"], samples["pruned"])]
    speedup = statistics.median(speedups)

    def summary(name):
        p25 = statistics.median(t.p25_ms for t in timings[name])
        p75 = statistics.median(t.p75_ms for t in timings[name])
        return statistics.median(samples[name]), p75 - p25

    d_med, d_iqr = summary("dense")
    p_med, p_iqr = summary("pruned")
    rows = [
        {"model": "ResNet-50 dense", "macs_g": report.macs_before / 1e9, "params_m": report.params_before / 1e6,
         "median_ms": d_med, "iqr_ms": d_iqr, "speedup": 1.0, "mac_reduction": 1.0},
        {"model": f"ResNet-50 pruned (ratio {ratio:.3f}, round_to {round_to})", "macs_g": report.macs_after / 1e9,
         "params_m": report.params_after / 1e6, "median_ms": p_med, "iqr_ms": p_iqr, "speedup": speedup,
         "mac_reduction": report.mac_reduction},
    ]
    goal = 0.8 * report.mac_reduction
    notes = (
        f"{device.type.upper()} {str(dtype).replace('torch.', '')}, batch {batch}, {size}x{size}, "
        f"{torch.get_num_threads() if device.type == 'cpu' else 'cuDNN'} "
        f"{'thread(s)' if device.type == 'cpu' else ''}; MACs counted per image by torch.utils.flop_counter. "
        f"Dense and pruned timed in {rounds} alternating rounds of >= {rep} calls (time_fn: warmed-up "
        f"median, IQR = p75 - p25); speedup = median over rounds of dense / pruned = {speedup:.2f}x "
        f"(per round: {', '.join(f'{s:.2f}' for s in speedups)}). Target: >= 0.8 x MAC reduction = {goal:.2f}x: "
        f"{'met' if speedup >= goal else 'NOT met'}."
        + (" Quick run (--quick): few samples." if quick else "")
    )
    if progress:
        print(notes)
    return write_report(
        "channel_latency_quick" if quick else "channel_latency",
        rows,
        COLUMNS,
        out_dir=Path(out_dir) if out_dir is not None else results_dir(device),
        device=device,
        title=f"Filter-pruned ResNet-50 at {report.mac_reduction:.2f}x fewer MACs: latency against dense",
        notes=notes,
        meta={"ratio": ratio, "round_to": round_to, "batch": batch, "size": size,
              "dtype": str(dtype), "speedups_per_round": speedups, "search_s": search_s, "quick": quick,
              "dense_samples_ms": samples["dense"], "pruned_samples_ms": samples["pruned"]},
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsekernels.benchmarks.channel_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="default: float32 on the CPU, float16 on CUDA")
    parser.add_argument("--target", type=float, default=2.0, help="MAC reduction to search for")
    parser.add_argument("--round-to", type=int, default=8, help="keep channel counts multiples of this (0: off)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating dense / pruned timing rounds")
    parser.add_argument("--rep", type=int, default=10, help="timed calls per model per round")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<device>/)")
    parser.add_argument("--quick", action="store_true", help="fewer search steps and timing rounds (smoke run)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is available on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        files = run_channel_latency(device, dtype=getattr(torch, args.dtype) if args.dtype else None, batch=args.batch,
                                    size=args.size, target=args.target, round_to=args.round_to or None,
                                    rounds=args.rounds, rep=args.rep, quick=args.quick, out_dir=args.out,
                                    progress=args.progress)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {files.json} and {files.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
