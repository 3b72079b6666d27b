"""The per-layer suite: real model layer shapes, dense against every backend and the dispatcher's choice.

* ResNet-50 convolutions: every distinct ``nn.Conv2d`` shape of torchvision's ResNet-50 at a
  224x224 input (read from the model by a forward pass on the meta device; the 3-channel stem is
  left out -- it cannot be 2:4 along input channels), at batch sizes :data:`CONV_BATCHES`.
* Linears of BERT-base (768 <-> 3072) and of a LLaMA-sized block (4096 <-> 14336) at token counts
  :data:`TOKENS`.

Columns per layer: ``dense`` (cuBLAS / cuDNN / MKL / oneDNN on a prebuilt dense weight; conv inputs
channels-last on the GPU, like our kernel), each backend of the op (GPU: ``triton``, ``cusparselt``
for Linears where supported; CPU: ``reference``) and ``auto`` (the dispatcher's choice on the GPU, the
measured CPU design on the CPU). The ``auto`` rows carry the backend the dispatcher chose. On the GPU
the issue's bar is that no ``auto`` row falls below 0.97x of dense; :func:`run_layer_suite` records
the minimum in the report's metadata.

Results go to ``benchmarks/results/<device_slug>/layers[_quick].{json,md}`` with the environment
stamp (:mod:`sparsekernels.benchmarks.report`).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..timing import Timing
from .kernels import SWEEP_TIMING_COLUMNS, random_24_weight
from .measure import least_disturbed, relative_error, time_rounds

__all__ = [
    "ConvShape",
    "LayerRow",
    "resnet50_conv_shapes",
    "LINEAR_SUITES",
    "TOKENS",
    "CONV_BATCHES",
    "CPU_TOKENS",
    "QUICK_TOKENS",
    "measure_layers",
    "run_layer_suite",
    "layer_suite_sections",
]

# (in_features, out_features) per suite
LINEAR_SUITES = {
    "bert-base": ((768, 768), (768, 3072), (3072, 768)),
    "llama": ((4096, 4096), (4096, 14336), (14336, 4096)),
}
TOKENS = (1, 16, 128, 512, 2048)
CONV_BATCHES = (1, 8, 32)
QUICK_TOKENS = (1, 16, 128)
CPU_TOKENS = (1, 16, 128)
CPU_CONV_BATCHES = (1,)


@dataclass(frozen=True)
class ConvShape:
    """One distinct convolution of a model: its parameters, its input size, and how often it occurs."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    height: int
    width: int
    count: int

    def describe(self) -> str:
        k = "x".join(map(str, self.kernel_size))
        return (f"{self.in_channels}->{self.out_channels} k{k} s{self.stride[0]} p{self.padding[0]} "
                f"@{self.height}x{self.width}")


@dataclass(frozen=True)
class LayerRow:
    """One measured (layer, tokens-or-batch, dtype, backend) point."""

    suite: str
    layer: str
    tokens: int  # Linear: rows of x; Conv2d: batch size
    dtype: str
    backend: str
    choice: Optional[str]  # the backend "auto" ran (dispatcher decision, or the CPU design)
    median_ms: float
    iqr_ms: float
    p25_ms: float
    p75_ms: float
    n: int
    speedup_vs_dense: float
    tflop_per_s: float
    rel_err_vs_dense: Optional[float]

    def as_dict(self) -> dict:
        return asdict(self)


def resnet50_conv_shapes(image_size: int = 224) -> list[ConvShape]:
    """Every distinct ``nn.Conv2d`` of torchvision's ResNet-50 with ``in_channels % 4 == 0``.

    The shapes come from the model itself: it is built on the meta device (no memory, no download)
    and run on a meta input of ``1 x 3 x image_size x image_size`` with hooks recording each conv's
    input size.
    """
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet50()
    seen: dict[tuple, list] = {}
    handles = []
    for name, conv in model.named_modules():
        if isinstance(conv, torch.nn.Conv2d):
            def hook(mod, args, _name=name):
                h, w = args[0].shape[-2:]
                key = (mod.in_channels, mod.out_channels, tuple(mod.kernel_size), tuple(mod.stride),
                       tuple(mod.padding), tuple(mod.dilation), int(h), int(w))
                seen.setdefault(key, [_name, 0])[1] += 1

            handles.append(conv.register_forward_pre_hook(hook))
    with torch.no_grad():
        model.eval()(torch.empty(1, 3, image_size, image_size, device="meta"))
    for h in handles:
        h.remove()
    return [ConvShape(name, *key, count) for key, (name, count) in seen.items() if key[0] % 4 == 0]


def _random_24_conv(shape: tuple[int, int, int, int], dtype, device, gen) -> torch.Tensor:
    """Random dense conv weight ``[out, in, kh, kw]``, exactly 2 of every 4 consecutive input channels of the
    channels-last ``[out, kh, kw, in]`` view kept (the groups the 2:4 conv runs along)."""
    out, cin, kh, kw = shape
    flat = random_24_weight(out, kh * kw * cin, dtype, device, generator=gen)
    return flat.reshape(out, kh, kw, cin).permute(0, 3, 1, 2).contiguous()


def _auto_choice(fn: Callable[[], object], device: torch.device) -> Optional[str]:
    """Run ``fn`` once (the dispatcher measures on first sight) and return the backend it chose."""
    if device.type != "cuda":
        fn()
        return "cpu: dense copy cached per weight"
    from ..ops import dispatch

    with dispatch.record() as log:
        fn()
    torch.cuda.synchronize()
    choices = {d.choice for d in (dispatch.lookup(op, key, device=dev) for op, key, dev in log) if d is not None}
    return "/".join(sorted(choices)) if choices else None


def _measure(fns, device, rounds: int, rep: int) -> tuple[dict[str, Timing], dict[str, Optional[float]], Optional[str]]:
    with torch.inference_mode():
        ref = fns["dense"]()
        choice = _auto_choice(fns["auto"], device)
        errs = {b: (None if b == "dense" else relative_error(fn(), ref)) for b, fn in fns.items()}
        per_round = time_rounds(fns, device=device, rounds=rounds, rep=rep, max_time_s=5.0)
        timings = {b: least_disturbed(ts) for b, ts in per_round.items()}
    return timings, errs, choice


def _rows(suite, layer, tokens, dtype, timings, errs, choice, flops) -> list[LayerRow]:
    dense_ms = timings["dense"].median_ms
    return [
        LayerRow(
            suite=suite, layer=layer, tokens=tokens, dtype=str(dtype).replace("torch.", ""), backend=backend,
            choice=choice if backend == "auto" else None, median_ms=t.median_ms, iqr_ms=t.iqr_ms,
            p25_ms=t.p25_ms, p75_ms=t.p75_ms, n=t.n, speedup_vs_dense=dense_ms / t.median_ms,
            tflop_per_s=flops / (t.median_ms * 1e-3) / 1e12, rel_err_vs_dense=errs[backend],
        )
        for backend, t in timings.items()
    ]


def _interleave(groups: list[list]) -> list:
    """Round-robin over the suites, so a run cut short by its time budget still covers every suite."""
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def measure_layers(
    device: torch.device | str | None = None,
    *,
    quick: bool = False,
    suites: Sequence[str] = ("resnet50", "bert-base", "llama"),
    dtypes: Optional[Sequence[torch.dtype]] = None,
    tokens: Optional[Sequence[int]] = None,
    conv_batches: Optional[Sequence[int]] = None,
    progress: bool = True,
    rep: int = 20,
    rounds: Optional[int] = None,
    budget_s: Optional[float] = None,
) -> list[LayerRow]:
    """Time every layer of the suites: dense vs each backend vs the dispatched ``auto`` (no files written).

    Args:
        device: ``"cuda"`` or ``"cpu"``; default the GPU if there is one.
        quick: a smoke run -- GPU: BERT-base Linears at tokens (1, 16, 128) and the first 4 ResNet-50
            conv shapes at batch 1; CPU: two BERT-base Linears at tokens (1, 16) and 2 conv shapes.
        suites: any of ``"resnet50"``, ``"bert-base"``, ``"llama"``. The default drops ``"llama"`` on the
            CPU and in quick runs (a 4096x14336 fp32 GEMM takes seconds per call on a small CPU).
        dtypes: default float16 and bfloat16 on the GPU, float32 on the CPU.
        tokens: Linear token counts (default :data:`TOKENS` on the GPU, :data:`CPU_TOKENS` on the CPU).
        conv_batches: conv batch sizes (default :data:`CONV_BATCHES` on the GPU, 1 on the CPU).
        progress: show a progress bar.
        rep: timed runs per measurement (at least; see :func:`~sparsekernels.timing.time_fn`).
        rounds: interleaved timing rounds per layer, the lowest median kept (default 1 on the GPU, 5 on
            the CPU).
        budget_s: stop starting new layers after this many seconds (None: no limit). Layers are visited
            round-robin over the suites, so a cut run still covers each suite.

    Returns:
        The measured rows (dense rows included, speedup 1.0).

    Raises:
        ValueError: an unknown suite, token counts / batch sizes < 1, ``rep`` or ``rounds`` < 1.
    """
    fn = "measure_layers()"
    from ..formats.sparse24 import compress_24
    from ..ops.functional import sparse24_conv2d, sparse24_linear
    from ..ops.routing import cusparselt_unsupported_reason

    known = ("resnet50", *LINEAR_SUITES)
    for s in suites:
        if s not in known:
            raise ValueError(f"{fn}: expected suites among {known}, got {s!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if (quick or not on_gpu) and tuple(suites) == ("resnet50", "bert-base", "llama"):
        suites = ("resnet50", "bert-base")
    if on_gpu:
        dtypes = tuple(dtypes or (torch.float16, torch.bfloat16))
        tokens = tuple(tokens or (QUICK_TOKENS if quick else TOKENS))
        conv_batches = tuple(conv_batches or ((1,) if quick else CONV_BATCHES))
    else:
        dtypes = tuple(dtypes or (torch.float32,))
        tokens = tuple(tokens or ((1, 16) if quick else CPU_TOKENS))
        conv_batches = tuple(conv_batches or CPU_CONV_BATCHES)
    if min(tokens) < 1 or min(conv_batches) < 1:
        raise ValueError(f"{fn}: expected tokens and batch sizes >= 1, got {tokens} and {conv_batches}")
    rounds = rounds if rounds is not None else (1 if on_gpu else 5)
    if rep < 1 or rounds < 1:
        raise ValueError(f"{fn}: expected rep >= 1 and rounds >= 1, got rep={rep}, rounds={rounds}")

    groups: list[list[tuple]] = []
    if "resnet50" in suites:
        shapes = resnet50_conv_shapes()
        if quick:
            shapes = shapes[: 4 if on_gpu else 2]
        groups.append([("resnet50-conv", s, b, dt) for s in shapes for b in conv_batches for dt in dtypes])
    for suite in suites:
        if suite in LINEAR_SUITES:
            layers = LINEAR_SUITES[suite][: 2 if quick and not on_gpu else None]
            groups.append([(f"{suite}-linear", kn, m, dt) for m in tokens for kn in layers for dt in dtypes])
    cases = _interleave(groups)
    start = time.perf_counter()

    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(0)
    rows: list[LayerRow] = []
    for suite, shape, count, dt in tqdm(cases, desc="layers", disable=not progress):
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
        if suite == "resnet50-conv":
            s: ConvShape = shape
            w = _random_24_conv((s.out_channels, s.in_channels, *s.kernel_size), dt, device, gen)
            w24 = compress_24(w.permute(0, 2, 3, 1).reshape(s.out_channels, -1))
            x = torch.randn(count, s.in_channels, s.height, s.width, generator=gen).to(device=device, dtype=dt)
            if on_gpu:
                x = x.contiguous(memory_format=torch.channels_last)
                w = w.contiguous(memory_format=torch.channels_last)
            conv_args = (s.stride, s.padding, s.dilation)

            def op(backend, x=x, w24=w24, conv_args=conv_args, k=s.kernel_size):
                return lambda: sparse24_conv2d(x, w24, None, *conv_args, backend=backend, kernel_size=k)

            fns = {"dense": (lambda x=x, w=w, a=conv_args: F.conv2d(x, w, None, *a))}
            fns.update({"triton": op("triton")} if on_gpu else {"reference": op("reference")})
            fns["auto"] = op("auto")
            oh = (s.height + 2 * s.padding[0] - s.dilation[0] * (s.kernel_size[0] - 1) - 1) // s.stride[0] + 1
            ow = (s.width + 2 * s.padding[1] - s.dilation[1] * (s.kernel_size[1] - 1) - 1) // s.stride[1] + 1
            flops = 2.0 * count * oh * ow * s.out_channels * s.in_channels * s.kernel_size[0] * s.kernel_size[1]
            layer = s.describe()
        else:
            k, n = shape
            w = random_24_weight(n, k, dt, device, generator=gen)
            w24 = compress_24(w)
            x = torch.randn(count, k, generator=gen).to(device=device, dtype=dt)
            fns = {"dense": (lambda x=x, w=w: F.linear(x, w))}
            if on_gpu:
                fns["triton"] = lambda x=x, w24=w24: sparse24_linear(x, w24, backend="triton")
                if cusparselt_unsupported_reason(device, dt, n, k) is None:
                    ss = torch.sparse.to_sparse_semi_structured(w)
                    fns["cusparselt"] = lambda x=x, ss=ss: F.linear(x, ss)
            else:
                fns["reference"] = lambda x=x, w24=w24: sparse24_linear(x, w24, backend="reference")
            fns["auto"] = lambda x=x, w24=w24: sparse24_linear(x, w24, backend="auto")
            flops = 2.0 * count * n * k
            layer = f"{k}->{n}"
        timings, errs, choice = _measure(fns, device, rounds, rep)
        rows += _rows(suite, layer, count, dt, timings, errs, choice, flops)
        del fns, w, w24, x
    return rows


def run_layer_suite(
    device: torch.device | str | None = None,
    *,
    dtype: Optional[torch.dtype] = None,
    quick: bool = False,
    out_dir: str | os.PathLike | None = None,
    name: Optional[str] = None,
    progress: bool = True,
    **options,
) -> list[Path]:
    """Run :func:`measure_layers` and write ``<name>.json`` + ``<name>.md`` with the environment stamp.

    Args:
        device: ``"cuda"`` or ``"cpu"``; default the GPU if there is one.
        dtype: one dtype to measure (shortcut for ``dtypes=(dtype,)``); default as :func:`measure_layers`.
        quick: the smoke run of :func:`measure_layers`.
        out_dir: the folder to write to (default ``benchmarks/results/<device_slug>/`` of the checkout).
        name: file stem, default ``layers`` (``layers_quick`` when quick).
        progress: show a progress bar.
        **options: passed to :func:`measure_layers` (``suites``, ``dtypes``, ``tokens``, ``conv_batches``,
            ``rep``, ``rounds``, ``budget_s``).

    Returns:
        The paths written: ``[json, markdown]``.

    Raises:
        ValueError / TypeError: as :func:`measure_layers`, or ``dtype`` together with ``dtypes``.
    """
    if dtype is not None:
        if options.get("dtypes") is not None:
            raise ValueError("run_layer_suite(): expected dtype or dtypes, got both")
        options["dtypes"] = (dtype,)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = measure_layers(device, quick=quick, progress=progress, **options)
    files = _write(rows, device, out_dir, name or ("layers_quick" if quick else "layers"))
    return [files.json, files.markdown]


# The GPU suite's step (``sparsekernels bench gpu``) plans ~90 s for this on an H100: fp16 only, LLaMA
# and BERT-base Linears at 4 / 3 token counts, every ResNet-50 conv shape at batch 8, cut at budget_s.
SECTION_TOKENS = {"llama": (1, 16, 128, 2048), "bert-base": (1, 128, 2048)}
SECTION_CONV_BATCHES = (8,)


def layer_suite_sections(
    device: torch.device | str | None = None,
    *,
    dtype: torch.dtype = torch.float16,
    quick: bool = False,
    progress: bool = True,
    budget_s: float = 80.0,
) -> list[dict]:
    """The per-layer suite as report sections (one per suite) for ``sparsekernels bench gpu``.

    Each section is a dict with ``name``, ``title``, ``rows`` (dicts), ``columns`` and ``notes``. Not
    written to disk here: the caller writes the sections it collects.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    per_suite_tokens = {} if quick else SECTION_TOKENS
    rows: list[LayerRow] = []
    t0 = time.perf_counter()
    for suites in (("llama",), ("bert-base",), ("resnet50",)) if not quick else (("bert-base",), ("resnet50",)):
        left = budget_s - (time.perf_counter() - t0)
        if left <= 0:
            break
        tokens = per_suite_tokens.get(suites[0])
        rows += measure_layers(device, quick=quick, suites=suites, dtypes=(dtype,), tokens=tokens,
                               conv_batches=None if quick else SECTION_CONV_BATCHES, progress=progress,
                               budget_s=left)
    sections = []
    for suite in dict.fromkeys(r.suite for r in rows):
        suite_rows = [r for r in rows if r.suite == suite]
        sections.append({
            "name": f"layers_{suite.replace('-', '_')}",
            "title": f"Per-layer suite: {suite} (dense vs backends vs dispatched, {str(dtype).replace('torch.', '')})",
            "rows": [r.as_dict() for r in suite_rows],
            "columns": list(_COLUMNS),
            "notes": _notes(suite_rows, device),
        })
    return sections


_COLUMNS = (
    ("suite", "suite"), ("layer", "layer"), ("tokens", "tokens / batch", "d"), ("dtype", "dtype"),
    ("backend", "backend"), ("choice", "auto ran"), *SWEEP_TIMING_COLUMNS,
    ("tflop_per_s", "TFLOP/s (dense-equiv.)", ".3f"), ("rel_err_vs_dense", "rel. err vs dense", ".1e"),
)


def _notes(rows: list[LayerRow], device: torch.device) -> str:
    auto = [r for r in rows if r.backend == "auto"]
    worst = min(auto, key=lambda r: r.speedup_vs_dense) if auto else None
    notes = (
        "vs dense = dense median / this median (higher is better). `auto` is what a swapped model runs: on the "
        "GPU the dispatcher's measured choice (the `auto ran` column), on the CPU the dense copy cached per weight. "
        "Conv inputs are channels-last on the GPU; ResNet-50's 3-channel stem conv is not 2:4-convertible and is "
        "left out. CPU timings: the lowest of several interleaved rounds' warmed-up medians."
    )
    if worst is not None:
        notes += (f" Slowest `auto` row: {worst.speedup_vs_dense:.3f}x of dense ({worst.suite} {worst.layer}, "
                  f"{worst.tokens}, {worst.dtype}).")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if device.type == "cpu" and load is not None:
        notes += (f" Host load average at the end of the run: {load[0]:.1f} on {os.cpu_count()} cores "
                  "(a shared machine's CPU timings are noisy when it exceeds the core count).")
    if auto:
        below = sum(r.speedup_vs_dense < 0.97 for r in auto)
        notes += f" `auto` rows below 0.97x of dense: {below} of {len(auto)}."
    return notes


def _write(rows: list[LayerRow], device: torch.device, out_dir, stem: str):
    from .report import results_dir, write_report

    auto = [r for r in rows if r.backend == "auto"]
    worst = min(auto, key=lambda r: r.speedup_vs_dense) if auto else None
    notes = _notes(rows, device)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    meta = {
        "host_load_average": load,
        "min_auto_speedup_vs_dense": worst.speedup_vs_dense if worst else None,
        "auto_rows_below_0.97x": sum(r.speedup_vs_dense < 0.97 for r in auto),
        "auto_rows": len(auto),
    }
    folder = results_dir(device) if out_dir is None else out_dir
    return write_report(stem, [r.as_dict() for r in rows], _COLUMNS, out_dir=folder,
                        device=device, title="Per-layer suite: dense vs sparse backends vs dispatched", notes=notes,
                        meta=meta)
