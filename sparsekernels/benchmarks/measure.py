"""What the benchmarks measure: MACs (PyTorch's own ``torch.utils.flop_counter``), non-zero parameters, real
stored and resident bytes, relative error, latency timed in interleaved rounds, and the roofline of known GPUs -- with the
report columns of those quantities, so every table heads them alike."""
from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, fields, is_dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from ..timing import Timing, time_fn

__all__ = [
    "MacCount",
    "call_model",
    "count_macs",
    "nonzero_params",
    "stored_bytes",
    "resident_bytes",
    "relative_error",
    "time_rounds",
    "least_disturbed",
    "middle_round",
    "median_of_rounds",
    "time_interleaved",
    "cpu_timing_threads",
    "GpuPeak",
    "GPU_PEAKS",
    "device_peak",
    "peak_for_name",
    "roofline_columns",
    "add_roofline",
    "latency_columns",
    "ROOFLINE_COLUMNS",
]


@dataclass(frozen=True)
class MacCount:
    """Multiply-accumulates of one forward pass.

    Attributes:
        total: every MAC PyTorch executes (``FlopCounterMode`` flops / 2).
        effective: MACs with a non-zero weight: each Conv2d / Linear's count times the fraction of its
            weight that is non-zero (what 2:4 or unstructured sparsity can skip; equal to ``total`` for a
            dense or filter-pruned model).
        per_layer: ``{module name: (macs, effective macs)}`` for every Conv2d / Linear.
    """

    total: int
    effective: int
    per_layer: Mapping[str, tuple[int, int]]


def call_model(model: nn.Module, example):
    """``model(example)``: a tensor as the one input, a tuple as positional inputs, a dict as keyword inputs."""
    if isinstance(example, Mapping):
        return model(**example)
    if isinstance(example, tuple):
        return model(*example)
    return model(example)


@torch.no_grad()
def count_macs(model: nn.Module, example) -> MacCount:
    """Count MACs of ``model(example)`` (a tensor, a tuple of positional args or a dict of kwargs).

    Uses ``torch.utils.flop_counter.FlopCounterMode`` (no hand-written formulas). Run it on the dense or
    masked-dense form of a model: a swapped model's custom ops are not counted by PyTorch.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            call_model(model, example)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    per_layer = {}
    effective_total = 0
    counted = 0
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or not name:
            continue
        flops = sum(counts.get(f"{root}.{name}", {}).values())
        macs = int(flops // 2)
        w = module.weight
        density = float((w != 0).sum()) / max(w.numel(), 1)
        eff = int(round(macs * density))
        per_layer[name] = (macs, eff)
        effective_total += eff
        counted += macs
    total = int(counter.get_total_flops() // 2)
    # MACs outside Conv2d / Linear (attention matmuls, ...) are dense whatever the weights are.
    effective_total += max(total - counted, 0)
    return MacCount(total, effective_total, per_layer)


def nonzero_params(model: nn.Module) -> int:
    """Non-zero entries of the model's parameters (a 2:4 layer counts half, a filter-pruned one its new size)."""
    return int(sum(int((p != 0).sum()) for p in model.parameters()))


def stored_bytes(model: nn.Module) -> int:
    """Bytes of everything the model stores: its ``state_dict`` tensors (parameters, buffers, compressed
    2:4 values and metadata), each storage counted once."""
    seen = set()
    total = 0
    for t in model.state_dict().values():
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.device, t.data_ptr(), t.nbytes) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.nbytes
    return int(total)


def _tensors_in(value):
    """The tensors in a cached value: a tensor, or tensors inside tuples, lists, dicts and dataclasses."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors_in(v)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors_in(v)
    elif is_dataclass(value) and not isinstance(value, type):
        for f in fields(value):
            yield from _tensors_in(getattr(value, f.name))


def resident_bytes(module: nn.Module) -> int:
    """Bytes of the tensors ``module`` holds in memory: its parameters and buffers, and every value the runtime
    cached for one of them (:func:`sparsekernels.ops.cache.cached_entries`, e.g. a dense copy of a compressed
    weight). Each storage is counted once and whole, views included.

    Unlike :func:`stored_bytes` (the state dict, what a checkpoint holds) this is what a loaded model costs.
    """
    from ..ops.cache import cached_entries

    tensors = [*module.parameters(), *module.buffers()]
    for t in list(tensors):
        for value in cached_entries(t).values():
            tensors.extend(_tensors_in(value))
    seen = set()
    total = 0
    for t in tensors:
        try:
            storage = t.untyped_storage()
            key, nbytes = (t.device, storage.data_ptr()), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without one storage (semi-structured)
            key, nbytes = id(t), t.numel() * t.element_size()
        if key not in seen:
            seen.add(key)
            total += nbytes
    return int(total)


@contextlib.contextmanager
def cpu_timing_threads(device: torch.device | str, threads: int | None):
    """Run the block with ``torch.set_num_threads(threads)`` when timing on the CPU (restored afterwards);
    a no-op on a GPU or with ``threads=None``.

    Why one thread is the default for CPU timings here: on a shared or busy CPU a multi-threaded op waits for
    the time slice of its slowest thread, and the timing measures the scheduler (2 busy cores, DigitsCNN at
    batch 256: IQR 120-230 ms with 2 threads against 30 ms with one, for a 250 ms call).
    """
    device = torch.device(device)
    if device.type != "cpu" or threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` computed in float64 (0-safe: a zero reference divides by 1e-30)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def time_rounds(
    fns: Mapping[str, Callable[[], object]],
    *,
    device: torch.device | str = "cpu",
    rounds: int = 5,
    progress: bool = False,
    desc: str = "timing",
    **time_fn_kwargs,
) -> dict[str, list[Timing]]:
    """Time every callable once per round, round-robin (A B C, A B C, ...), with :func:`time_fn`.

    On a shared CPU the load changes from second to second; interleaving exposes every variant to the same
    conditions, so their ratio is fair. Reduce each list with :func:`median_of_rounds`,
    :func:`least_disturbed` or :func:`middle_round`, or pair the rounds up for per-round ratios.

    Args:
        fns: name -> the callable to time (no arguments).
        device: where they run (CUDA events on a GPU).
        rounds: how many rounds.
        progress: a progress bar over the rounds.
        **time_fn_kwargs: passed to every :func:`time_fn` call (``warmup``, ``rep``, ``max_time_s``, ...).

    Returns:
        name -> one :class:`Timing` per round, in round order.

    Raises:
        ValueError: ``rounds`` < 1.
    """
    from tqdm.auto import tqdm

    if rounds < 1:
        raise ValueError(f"time_rounds(): expected rounds >= 1, got {rounds}")
    per: dict[str, list[Timing]] = {k: [] for k in fns}
    for _ in tqdm(range(rounds), desc=desc, disable=not progress, leave=False):
        for name, fn in fns.items():
            per[name].append(time_fn(fn, device=device, **time_fn_kwargs))
    return per


def least_disturbed(timings: list[Timing]) -> Timing:
    """The round with the lowest median: other processes on a shared CPU only ever add time, so the
    least-disturbed round is the best estimate of a candidate's own cost."""
    return min(timings, key=lambda t: t.median_ms)


def middle_round(timings: list[Timing]) -> Timing:
    """The round whose median is the middle one (the upper middle for an even count)."""
    return sorted(timings, key=lambda t: t.median_ms)[len(timings) // 2]


def median_of_rounds(timings: list[Timing]) -> Timing:
    """The median over rounds of each statistic (median, quartiles), the overall minimum and the sample count."""
    return Timing(
        median_ms=statistics.median(t.median_ms for t in timings),
        p25_ms=statistics.median(t.p25_ms for t in timings),
        p75_ms=statistics.median(t.p75_ms for t in timings),
        min_ms=min(t.min_ms for t in timings),
        n=sum(t.n for t in timings),
    )


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    device: torch.device | str = "cpu",
    rounds: int = 5,
    rep: int = 5,
    warmup: int = 2,
    progress: bool = True,
    desc: str = "timing",
) -> dict[str, Timing]:
    """Warm every callable ``warmup`` times, then :func:`time_rounds` (``rep`` samples per variant and round)
    reduced by :func:`median_of_rounds`.

    Raises:
        ValueError: ``rounds`` or ``rep`` < 1.
    """
    if rounds < 1 or rep < 1:
        raise ValueError(f"time_interleaved(): expected rounds >= 1 and rep >= 1, got {rounds}, {rep}")
    for fn in fns.values():  # warm every variant before the first timed round
        for _ in range(warmup):
            fn()
    per = time_rounds(fns, device=device, rounds=rounds, progress=progress, desc=desc, warmup=1, rep=rep,
                      max_time_s=5.0)
    return {name: median_of_rounds(ts) for name, ts in per.items()}


@dataclass(frozen=True)
class GpuPeak:
    """Datasheet peaks: dense fp16/bf16 tensor-core TFLOP/s and HBM TB/s."""

    name: str
    tflops_fp16: float
    tbps: float


# Datasheet figures (shared/TARGETS.md). Matched against torch.cuda.get_device_name() in this order.
GPU_PEAKS: tuple[tuple[str, GpuPeak], ...] = (
    ("h200", GpuPeak("H200", 989.0, 4.8)),
    ("h100", GpuPeak("H100 SXM", 989.0, 3.35)),
    ("a100", GpuPeak("A100 SXM", 312.0, 2.0)),
)


def device_peak(device: torch.device | str) -> GpuPeak | None:
    """The :class:`GpuPeak` of a known GPU (H100, H200, A100), else ``None`` (CPU, unknown GPU: no roofline)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return peak_for_name(name)


def peak_for_name(name: str) -> GpuPeak | None:
    """Look a GPU name (``"NVIDIA H100 80GB HBM3"``) up in :data:`GPU_PEAKS`; ``None`` if unknown."""
    name = name.lower()
    for key, peak in GPU_PEAKS:
        if key in name:
            return peak
    return None


def roofline_columns(flops: float, nbytes: float, median_ms: float, peak: GpuPeak | None) -> dict:
    """TFLOP/s, GB/s and % of the roofline for one timed call.

    ``flops`` are the dense-equivalent floating-point operations (2 x MACs of the dense layer) and
    ``nbytes`` the bytes the call must move at least (weights as stored + activations in and out). The
    roofline is ``min(peak TFLOP/s, intensity x peak bandwidth)`` with the dense tensor-core peak; without a
    known ``peak`` the percentage is ``None``.
    """
    seconds = median_ms / 1e3
    if seconds <= 0:
        return {"tflops": None, "gbps": None, "roofline_pct": None}
    tflops = flops / seconds / 1e12
    gbps = nbytes / seconds / 1e9
    pct = None
    if peak is not None and nbytes > 0:
        attainable = min(peak.tflops_fp16 * 1e12, flops / nbytes * peak.tbps * 1e12)
        pct = 100.0 * (flops / seconds) / attainable
    return {"tflops": tflops, "gbps": gbps, "roofline_pct": pct}


def add_roofline(rows: list[dict], device: torch.device | str) -> None:
    """Add ``roofline_pct`` to sweep rows that carry ``median_ms``, ``tflop_per_s`` and ``gb_per_s`` (in place);
    ``None`` where the device's peak is unknown (the CPU, an unlisted GPU) or the row was not timed."""
    peak = device_peak(device)
    for r in rows:
        r["roofline_pct"] = None
        if peak is None or not r.get("median_ms"):
            continue
        seconds = r["median_ms"] / 1e3
        flops, nbytes = r["tflop_per_s"] * 1e12 * seconds, r["gb_per_s"] * 1e9 * seconds
        r["roofline_pct"] = roofline_columns(flops, nbytes, r["median_ms"], peak)["roofline_pct"]


# Report columns of the quantities above (keys as the functions here and the suites' rows name them).
ROOFLINE_COLUMNS = (("tflops", "TFLOP/s", ".2f"), ("gbps", "GB/s", ".1f"), ("roofline_pct", "% roofline", ".1f"))


def latency_columns(label: str = "latency", fmt: str = ".3f") -> tuple:
    """Columns of a row timed against dense: ``latency_ms`` (headed ``"<label> (ms)"``), ``iqr_ms``, ``speedup``."""
    return (("latency_ms", f"{label} (ms)", fmt), ("iqr_ms", "± IQR (ms)", fmt), ("speedup", "speedup vs dense", ".2f"))
