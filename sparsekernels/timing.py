"""Timers. On a GPU: ``triton.testing.do_bench`` semantics (CUDA events, L2 flush, warm-up) via CUDA
events; on the CPU: warmed-up repeated wall-clock timing. Both return a :class:`Timing` with the median
and the spread (interquartile range), never a single sample."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

__all__ = ["Timing", "time_fn"]


@dataclass(frozen=True)
class Timing:
    """Latency statistics in milliseconds."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    n: int

    @property
    def iqr_ms(self) -> float:
        return self.p75_ms - self.p25_ms

    def as_dict(self) -> dict:
        return {**asdict(self), "iqr_ms": self.iqr_ms}


def _stats(samples: list[float]) -> Timing:
    samples = sorted(samples)
    if len(samples) >= 4:
        q = statistics.quantiles(samples, n=4)
        p25, p75 = q[0], q[2]
    else:
        p25, p75 = samples[0], samples[-1]
    return Timing(statistics.median(samples), p25, p75, samples[0], len(samples))


def time_fn(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 3,
    rep: int = 20,
    min_time_s: float = 0.0,
    max_time_s: float = 10.0,
) -> Timing:
    """Time ``fn()`` on ``device``.

    Args:
        fn: the callable to time (no arguments).
        device: where ``fn`` runs; on CUDA, events with synchronisation and an L2 flush between runs.
        warmup: untimed calls first (compilation, autotuning, caches).
        rep: timed calls (at least); on the CPU more are taken until ``min_time_s`` has passed.
        max_time_s: stop taking samples once this much time has been spent (at least 3 samples).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _time_cuda(fn, warmup=warmup, rep=rep)
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        spent = time.perf_counter() - start
        if len(samples) >= 3 and spent > max_time_s:
            break
        if len(samples) >= rep and spent >= min_time_s:
            break
    return _stats(samples)


_FLUSH_BUFFERS: dict[int, torch.Tensor] = {}


def _flush_buffer() -> torch.Tensor:
    """A 256 MB buffer per GPU, zeroed between runs to flush L2 (larger than any L2 today: H100 50 MB,
    H200 60 MB) so every timed run reads its weights from HBM. Allocated once, not per timing."""
    index = torch.cuda.current_device()
    buf = _FLUSH_BUFFERS.get(index)
    if buf is None:
        buf = _FLUSH_BUFFERS[index] = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    return buf


def _time_cuda(fn: Callable[[], object], *, warmup: int, rep: int) -> Timing:
    cache = _flush_buffer()
    for _ in range(max(warmup, 1)):
        fn()
    torch.cuda.synchronize()
    # Estimate one call to choose how many repetitions fit in ~100 ms.
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(5):
        cache.zero_()
        fn()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / 5, 1e-3)
    n = max(rep, min(1000, int(100 / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return _stats([a.elapsed_time(b) for a, b in zip(starts, ends)])
