"""Filter pruning pays off in latency: ResNet-50 with 2x fewer MACs against the dense ResNet-50.

Run: ``python benchmarks/channel_latency.py [--quick]`` (CPU, batch 8, 224x224, fp32), or on a GPU
``python benchmarks/channel_latency.py --device cuda --batch 64`` (cuDNN, fp16 by default on CUDA).
Writes ``benchmarks/results/<device>/channel_latency.{json,md}`` with the environment stamp.

The pruning ratio that gives 2.0x fewer MACs is found by bisection on ``prune_channels``' own MAC count
(``torch.utils.flop_counter``). Dense and pruned models are timed in alternating rounds with
``sparsekernels.bench.timing.time_fn``; the speedup is the median over rounds of dense / pruned. The target
(TARGETS.md): speedup >= 0.8 x the MAC reduction, i.e. >= 1.6x at 2x fewer MACs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from pruning.channels import prune_channels
from sparsekernels.bench.report import Column, results_dir, write_report
from sparsekernels.bench.timing import time_fn


def find_ratio(model, x, target: float, round_to, iters: int, progress: bool):
    """Bisect the channel ratio until ``prune_channels`` reports ``target`` x fewer MACs (within 1 %)."""
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--quick", action="store_true", help="fewer search steps and timing rounds (smoke run)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    import torchvision

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("channel_latency: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    if args.quick:
        args.rounds, args.rep = 2, 3
    progress = not args.no_progress
    round_to = args.round_to or None
    torch.manual_seed(0)
    dense = torchvision.models.resnet50(weights=None).eval()
    probe = torch.randn(1, 3, args.size, args.size)
    t0 = time.perf_counter()
    ratio, pruned, rep = find_ratio(dense, probe, args.target, round_to, 6 if args.quick else 10, progress)
    search_s = time.perf_counter() - t0
    if progress:
        print(f"ratio {ratio:.4f}: MACs {rep.macs_before / 1e9:.2f} G -> {rep.macs_after / 1e9:.2f} G "
              f"({rep.mac_reduction:.3f}x), params {rep.params_before / 1e6:.2f} M -> {rep.params_after / 1e6:.2f} M",
              flush=True)

    dense = dense.to(device, dtype)
    pruned = pruned.to(device, dtype).eval()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    x = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype)

    def runner(m):
        def fn():
            with torch.no_grad():
                return m(x)
        return fn

    samples = {"dense": [], "pruned": []}
    timings = {"dense": [], "pruned": []}
    for r in range(args.rounds):
        for name, m in (("dense", dense), ("pruned", pruned)):
            t = time_fn(runner(m), device=device, warmup=2 if r == 0 else 1, rep=args.rep, max_time_s=60)
            timings[name].append(t)
            samples[name].append(t.median_ms)
        if progress:
            print(f"  round {r + 1}/{args.rounds}: dense {samples['dense'][-1]:.1f} ms, pruned "
                  f"{samples['pruned'][-1]:.1f} ms", flush=True)
    speedups = [d / p for d, p in zip(samples["dense"], samples["pruned"])]
    speedup = statistics.median(speedups)

    def summary(name):
        meds = samples[name]
        p25 = statistics.median(t.p25_ms for t in timings[name])
        p75 = statistics.median(t.p75_ms for t in timings[name])
        return statistics.median(meds), p75 - p25

    d_med, d_iqr = summary("dense")
    p_med, p_iqr = summary("pruned")
    rows = [
        {"model": "ResNet-50 dense", "macs_g": rep.macs_before / 1e9, "params_m": rep.params_before / 1e6,
         "median_ms": d_med, "iqr_ms": d_iqr, "speedup": 1.0, "mac_reduction": 1.0},
        {"model": f"ResNet-50 pruned (ratio {ratio:.3f}, round_to {round_to})", "macs_g": rep.macs_after / 1e9,
         "params_m": rep.params_after / 1e6, "median_ms": p_med, "iqr_ms": p_iqr, "speedup": speedup,
         "mac_reduction": rep.mac_reduction},
    ]
    target = 0.8 * rep.mac_reduction
    notes = (
        f"{device.type.upper()} {str(dtype).replace('torch.', '')}, batch {args.batch}, {args.size}x{args.size}, "
        f"{torch.get_num_threads() if device.type == 'cpu' else 'cuDNN'} "
        f"{'thread(s)' if device.type == 'cpu' else ''}; MACs counted per image by torch.utils.flop_counter. "
        f"Dense and pruned timed in {args.rounds} alternating rounds of >= {args.rep} calls (time_fn: warmed-up "
        f"median, IQR = p75 - p25); speedup = median over rounds of dense / pruned = {speedup:.2f}x "
        f"(per round: {', '.join(f'{s:.2f}' for s in speedups)}). Target: >= 0.8 x MAC reduction = {target:.2f}x: "
        f"{'met' if speedup >= target else 'NOT met'}."
        + (" Quick run (--quick): few samples." if args.quick else "")
    )
    files = write_report(
        "channel_latency",
        rows,
        [Column("model", "model"), Column("macs_g", "GMACs / image", ".2f"), Column("params_m", "params (M)", ".2f"),
         Column("mac_reduction", "MAC reduction", ".2f"), Column("median_ms", "median (ms)", ".1f"),
         Column("iqr_ms", "IQR (ms)", ".1f"), Column("speedup", "speedup", ".2f")],
        out_dir=results_dir(device),
        device=device,
        title=f"Filter-pruned ResNet-50 at {rep.mac_reduction:.2f}x fewer MACs: latency against dense",
        notes=notes,
        meta={"ratio": ratio, "round_to": round_to, "batch": args.batch, "size": args.size,
              "dtype": str(dtype), "speedups_per_round": speedups, "search_s": search_s, "quick": args.quick,
              "dense_samples_ms": samples["dense"], "pruned_samples_ms": samples["pruned"]},
    )
    print(notes)
    print(files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
