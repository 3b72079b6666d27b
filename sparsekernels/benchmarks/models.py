"""Model suites: whole models and LLM-sized layers, dense against pruned / 2:4 on the device at hand.

* **ResNet-50** (torchvision, random init): dense; filter-pruned at several channel ratios
  (``pruning.prune_channels``, physically smaller); 2:4 on every eligible conv (``pruning.prune_weights`` +
  ``sparsekernels.sparsify``); filters + 2:4.
* **BERT-base-sized encoder** (``transformers.BertConfig``: hidden 768, 12 heads, FFN 3072, 12 layers,
  random init) at batch 1-64, sequence 128: dense, heads/FFN filter-pruned, 2:4 on every encoder Linear.
* **LLaMA-sized projections** (LLaMA-3-8B: q/o 4096x4096, k/v 4096->1024, gate/up 4096->14336, down
  14336->4096) at decode (1-16 tokens) and prefill (512-8192 tokens): ``nn.Linear`` against ``SparseLinear``.

Every row has the median latency and its interquartile range, the speedup over dense, TFLOP/s and GB/s
(dense-equivalent FLOPs; bytes = weights as stored + input + output), the % of the roofline on a GPU of known
peak (H100, H200, A100; none on the CPU), weight memory (and peak GPU memory), and -- for 2:4 -- the relative
error of the swapped model against the masked dense one. A variant that cannot be built is a row with its
``status`` saying why, never a silent gap. ``quick=True`` shrinks every size so all suites run on a CPU in
about a minute.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .measure import ROOFLINE_COLUMNS, call_model, latency_columns, relative_error

__all__ = [
    "ResNetSizes",
    "BertSizes",
    "LlamaSizes",
    "SuiteSizes",
    "SuiteResult",
    "suite_sizes",
    "resnet50_suite",
    "bert_suite",
    "llama_suite",
    "SUITES",
    "run_model_suites",
    "suite_plot_specs",
    "plot_suites",
    "timing_stamp",
    "write_suite",
    "MODEL_COLUMNS",
    "LLAMA_COLUMNS",
    "LLAMA_SHAPES",
]

# LLaMA-3-8B projections: (name, in_features, out_features)
LLAMA_SHAPES = (
    ("q/o 4096x4096", 4096, 4096),
    ("k/v 4096->1024", 4096, 1024),
    ("gate/up 4096->14336", 4096, 14336),
    ("down 14336->4096", 14336, 4096),
)


@dataclass(frozen=True)
class ResNetSizes:
    """The ResNet suite's model and input.

    Attributes:
        arch: the torchvision model name (``"resnet50"``; quick runs use ``"resnet18"``).
        batch, resolution: the input is ``[batch, 3, resolution, resolution]``.
        ratios: the filter-pruning ratios (fractions of channels removed), one variant each.
    """

    arch: str
    batch: int
    resolution: int
    ratios: tuple[float, ...]


@dataclass(frozen=True)
class BertSizes:
    """The BERT-base-sized encoder (hidden 768, 12 heads, FFN 3072 always).

    Attributes:
        layers: encoder layers.
        seq: tokens per sequence.
        batches: the batch sizes timed, one row each.
        vocab: the vocabulary size (the embedding table's rows).
    """

    layers: int
    seq: int
    batches: tuple[int, ...]
    vocab: int = 30522


@dataclass(frozen=True)
class LlamaSizes:
    """The LLaMA-sized projections: ``(name, in_features, out_features)`` each, timed at every token count."""

    shapes: tuple[tuple[str, int, int], ...]
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class SuiteSizes:
    """Every size the suites use; :func:`suite_sizes` picks them for a device and ``quick``.

    Attributes:
        resnet, bert, llama: each suite's sizes.
        rounds, rep: interleaved timing rounds, and timed calls per variant and round.
        cpu_threads: torch's CPU threads while timing (``None``: leave torch's setting).
        round_to: filter pruning keeps channel counts multiples of this (``None``: any count).
    """

    resnet: ResNetSizes
    bert: BertSizes
    llama: LlamaSizes
    rounds: int
    rep: int
    cpu_threads: int | None = 1
    round_to: int | None = 8


def suite_sizes(device: torch.device | str, quick: bool) -> SuiteSizes:
    """Sizes for ``device``: the full GPU sizes; CPU sizes that finish in minutes; ``quick``: about a minute
    on a 2-core CPU (ResNet-18 instead of ResNet-50, at 64x64; a 2-layer encoder with an 8192-token
    vocabulary; projections shrunk 8x)."""
    device = torch.device(device)
    if quick:
        small = tuple((f"{n.split()[0]} /8 {i // 8}->{o // 8}", i // 8, o // 8) for n, i, o in LLAMA_SHAPES)
        return SuiteSizes(ResNetSizes("resnet18", 2, 64, (0.3,)), BertSizes(2, 32, (1, 4), vocab=8192),
                          LlamaSizes(small, (1, 16, 256)), rounds=5, rep=3)
    if device.type == "cuda":
        return SuiteSizes(ResNetSizes("resnet50", 64, 224, (0.2, 0.3, 0.5)), BertSizes(12, 128, (1, 4, 16, 64)),
                          LlamaSizes(LLAMA_SHAPES, (1, 4, 16, 512, 2048, 8192)), rounds=5, rep=10)
    return SuiteSizes(ResNetSizes("resnet50", 8, 224, (0.3, 0.5)), BertSizes(12, 128, (1, 8)),
                      LlamaSizes(LLAMA_SHAPES, (1, 16, 128)), rounds=5, rep=5)


@dataclass(frozen=True)
class SuiteResult:
    """Rows of one suite, with the columns to show and the plots drawn from them."""

    name: str
    title: str
    rows: list
    columns: tuple
    notes: str = ""
    plots: tuple = field(default_factory=tuple)


MODEL_COLUMNS = (
    ("model", "model"), ("variant", "variant"), ("batch", "batch", "d"), ("dtype", "dtype"), *latency_columns(),
    ("mac_ratio", "MACs / dense", ".2f"), *ROOFLINE_COLUMNS, ("weight_mb", "weights (MB)", ".1f"),
    ("peak_mem_mb", "peak mem (MB)", ".0f"), ("rel_err", "rel. err vs masked", ".1e"), ("status", "status"),
)

LLAMA_COLUMNS = (
    ("layer", "layer"), ("tokens", "tokens", "d"), ("dtype", "dtype"), ("dense_ms", "dense (ms)", ".4f"),
    *latency_columns("2:4", ".4f"), *ROOFLINE_COLUMNS, ("weight_mb", "2:4 weights (MB)", ".1f"),
    ("dense_weight_mb", "dense weights (MB)", ".1f"), ("rel_err", "rel. err", ".1e"), ("status", "status"),
)

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _timing_note(device: torch.device, sizes: SuiteSizes) -> str:
    """How the rows were timed (the report's device line shows torch's default thread count)."""
    how = f"median of {sizes.rounds} interleaved rounds of {sizes.rep} calls (sparsekernels.timing.time_fn)"
    if torch.device(device).type == "cpu" and sizes.cpu_threads is not None:
        how += f", {sizes.cpu_threads} CPU thread(s) while timing"
    return f" Timing: {how}."


def _output_tensor(y):
    if isinstance(y, torch.Tensor):
        return y
    if hasattr(y, "last_hidden_state"):
        return y.last_hidden_state
    if isinstance(y, (tuple, list)):
        return y[0]
    raise TypeError(f"cannot find the output tensor in {type(y).__name__}")


def _peak_mem_mb(model: nn.Module, example, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        call_model(model, example)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 1e6


def _nbytes(example) -> int:
    if isinstance(example, dict):
        return sum(v.nbytes for v in example.values() if isinstance(v, torch.Tensor))
    return example.nbytes


def _prune_24_masked(model: nn.Module) -> nn.Module:
    """2:4-prune every eligible layer of ``model`` in place (magnitude) and remove the masks: plain weights
    with zeros, the masked dense model."""
    import pruning

    pruning.prune_weights(model, pattern="2:4", importance="magnitude", progress=False)
    pruning.remove_masks(model)
    return model


def _batch_of(example) -> int:
    t = next(iter(example.values())) if isinstance(example, dict) else example
    return int(t.shape[0])


def _first_sample(example):
    """The first sample of a batch (tensor or dict of tensors), batch dimension kept."""
    if isinstance(example, dict):
        return {k: v[:1] for k, v in example.items()}
    return example[:1]


def _to_device(example, device: torch.device, dtype: torch.dtype):
    if isinstance(example, dict):  # token ids and masks keep their integer dtype
        return {k: v.to(device) for k, v in example.items()}
    return example.to(device=device, dtype=dtype)


def _model_rows(
    model_name: str,
    build: Callable[[], nn.Module],
    examples: list,
    variants: list[tuple[str, str, float]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    sizes: SuiteSizes,
    progress: bool,
    channel_kwargs: Optional[dict] = None,
) -> list[dict]:
    """Build each variant once (``(label, kind, ratio)`` with kind ``dense|filters|2:4|filters+2:4``), then, for
    every example (one per batch size), time all variants interleaved. Returns one row per (batch, variant).

    Pruning and MAC counting run on the CPU in float32 with one sample of the first example (FLOPs scale with
    the batch); the models are then moved to ``device`` / ``dtype`` and the 2:4 ones swapped with
    ``sparsekernels.sparsify``.
    """
    import pruning
    import sparsekernels

    from .measure import count_macs, cpu_timing_threads, device_peak, roofline_columns, stored_bytes, time_interleaved

    peak = device_peak(device)
    first = examples[0]
    probe = _first_sample(first)
    torch.manual_seed(0)
    channel_kwargs = channel_kwargs or {}
    base = build().eval()
    base_macs = count_macs(base, probe)
    filtered: dict[float, tuple[nn.Module, object]] = {}
    models: dict[str, nn.Module] = {}
    info: dict[str, dict] = {}
    for label, kind, ratio in variants:
        meta = info[label] = {"status": "ok"}
        try:
            if kind in ("filters", "filters+2:4"):
                if ratio not in filtered:  # prune_channels returns a new model and leaves base untouched
                    fm = pruning.prune_channels(base, probe, ratio=ratio, importance="l1", round_to=sizes.round_to,
                                                progress=False, **channel_kwargs).eval()
                    filtered[ratio] = (fm, count_macs(fm, probe))
                m, macs = copy.deepcopy(filtered[ratio][0]), filtered[ratio][1]
            else:
                m, macs = copy.deepcopy(base), base_macs
            meta["flops_per_sample"] = 2.0 * macs.total
            if kind in ("2:4", "filters+2:4"):
                _prune_24_masked(m)
                macs = count_macs(m, probe)
            meta["mac_ratio"] = macs.effective / base_macs.total
            m = m.to(device=device, dtype=dtype).eval()
            if kind in ("2:4", "filters+2:4"):
                masked = copy.deepcopy(m)
                report = sparsekernels.sparsify(m)
                meta["status"] = f"{len(report.swapped)} layers 2:4, {len(report.skipped)} dense"
                x = _to_device(first, device, dtype)
                with torch.inference_mode():
                    meta["rel_err"] = relative_error(_output_tensor(call_model(m, x)),
                                                     _output_tensor(call_model(masked, x)))
                del masked
            meta["weight_bytes"] = stored_bytes(m)
            models[label] = m
        except Exception as e:  # a variant that cannot be built is reported, never hidden
            meta["status"] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    del filtered

    def runner(m, x):
        def call():
            with torch.inference_mode():
                return call_model(m, x)
        return call

    rows = []
    for example in examples:
        batch = _batch_of(example)
        x = _to_device(example, device, dtype)
        timings = {}
        if models:
            with cpu_timing_threads(device, sizes.cpu_threads):
                timings = time_interleaved({k: runner(m, x) for k, m in models.items()}, device=device,
                                           rounds=sizes.rounds, rep=sizes.rep, progress=progress,
                                           desc=f"{model_name} b{batch}")
        dense_ms = timings["dense"].median_ms if "dense" in timings else None
        for label, _, _ in variants:
            meta = info[label]
            row = {"model": model_name, "variant": label, "batch": batch, "dtype": _DTYPE_NAMES.get(dtype, str(dtype)),
                   "status": meta["status"], "mac_ratio": meta.get("mac_ratio"), "rel_err": meta.get("rel_err")}
            rows.append(row)
            t = timings.get(label)
            if t is None:
                continue
            row.update(latency_ms=t.median_ms, iqr_ms=t.iqr_ms, p25_ms=t.p25_ms, p75_ms=t.p75_ms, samples=t.n,
                       speedup=dense_ms / t.median_ms if dense_ms else None,
                       weight_mb=meta["weight_bytes"] / 1e6,
                       peak_mem_mb=_peak_mem_mb(models[label], x, device))
            io = _nbytes(x) * 2  # input in, output of similar size out: a lower bound on the traffic
            row.update(roofline_columns(meta["flops_per_sample"] * batch, meta["weight_bytes"] + io, t.median_ms, peak))
    return rows


def resnet50_suite(device: torch.device, dtype: torch.dtype, *, quick: bool = False, progress: bool = True,
                   sizes: SuiteSizes | None = None) -> SuiteResult:
    """ResNet-50: dense, filters at every ratio of ``sizes.resnet.ratios``, 2:4, filters + 2:4."""
    import torchvision

    sizes = sizes or suite_sizes(device, quick)
    res, batch = sizes.resnet.resolution, sizes.resnet.batch
    example = torch.randn(batch, 3, res, res)
    both_ratio = sizes.resnet.ratios[len(sizes.resnet.ratios) // 2]
    variants = [("dense", "dense", 0.0)]
    variants += [(f"filters -{r:.0%}", "filters", r) for r in sizes.resnet.ratios]
    variants += [("2:4", "2:4", 0.0), (f"filters -{both_ratio:.0%} + 2:4", "filters+2:4", both_ratio)]
    rows = _model_rows(f"{sizes.resnet.arch} {res}px", lambda: torchvision.models.get_model(sizes.resnet.arch),
                       [example], variants, device=device, dtype=dtype, sizes=sizes, progress=progress)
    return SuiteResult("resnet50", f"{sizes.resnet.arch} (random init), batch {batch}, {res}x{res}", rows, MODEL_COLUMNS,
                       notes="Filter ratios are fractions of channels removed (pruning.prune_channels, L1, "
                       f"round_to={sizes.round_to}); MACs / dense counts non-zero-weight MACs (torch.utils.flop_counter)."
                       + _timing_note(device, sizes))


def bert_suite(device: torch.device, dtype: torch.dtype, *, quick: bool = False, progress: bool = True,
               sizes: SuiteSizes | None = None) -> SuiteResult:
    """A BERT-base-sized encoder (random init, no download) at every batch of ``sizes.bert.batches``."""
    sizes = sizes or suite_sizes(device, quick)
    try:
        from transformers import BertConfig, BertModel
    except ImportError as e:
        row = {"model": "bert-base encoder", "variant": "dense", "status": f"failed: transformers missing ({e})"}
        return SuiteResult("bert", "BERT-base encoder", [row], MODEL_COLUMNS)
    config = BertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072, vocab_size=sizes.bert.vocab,
                        num_hidden_layers=sizes.bert.layers, max_position_embeddings=max(512, sizes.bert.seq))

    def build():
        return BertModel(config, add_pooling_layer=False)

    variants = [("dense", "dense", 0.0), ("filters -30%", "filters", 0.3), ("2:4", "2:4", 0.0)]
    gen = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(0, config.vocab_size, (batch, sizes.bert.seq), generator=gen)}
                for batch in sizes.bert.batches]
    # hf_config="ignore": heads go although BertConfig cannot state fewer heads at the same width (the suite
    # times the model; it never saves it)
    rows = _model_rows(f"bert-base {sizes.bert.layers}L seq{sizes.bert.seq}", build, examples, variants,
                       device=device, dtype=dtype, sizes=sizes, progress=progress,
                       channel_kwargs={"hf_config": "ignore"})
    return SuiteResult("bert", f"BERT-base-sized encoder ({sizes.bert.layers} layers, hidden 768, 12 heads, FFN 3072,"
                       f" seq {sizes.bert.seq}, random init)", rows, MODEL_COLUMNS,
                       notes="filters -30%: attention heads and FFN width pruned by pruning.prune_channels; "
                       "2:4: every encoder Linear." + _timing_note(device, sizes))


def llama_suite(device: torch.device, dtype: torch.dtype, *, quick: bool = False, progress: bool = True,
                sizes: SuiteSizes | None = None) -> SuiteResult:
    """LLaMA-sized projections: ``nn.Linear`` vs ``SparseLinear`` (2:4 by magnitude) at every token count."""
    import pruning
    from tqdm.auto import tqdm

    from ..nn.linear import SparseLinear
    from .measure import cpu_timing_threads, device_peak, roofline_columns, stored_bytes, time_interleaved

    sizes = sizes or suite_sizes(device, quick)
    peak = device_peak(device)
    rows = []
    elt = torch.tensor([], dtype=dtype).element_size()
    for name, k, n in tqdm(sizes.llama.shapes, desc="llama layers", disable=not progress, leave=False):
        torch.manual_seed(0)
        dense = nn.Linear(k, n, bias=False)
        with torch.no_grad():
            dense.weight.mul_(pruning.nm_mask(dense.weight.abs(), 2, 4))
        dense = dense.to(device=device, dtype=dtype).eval()
        sparse = SparseLinear.from_dense(dense).eval()
        w_bytes, dense_bytes = stored_bytes(sparse), stored_bytes(dense)
        for tokens in sizes.llama.tokens:
            row = {"layer": name, "in": k, "out": n, "tokens": tokens, "dtype": _DTYPE_NAMES.get(dtype, str(dtype)),
                   "weight_mb": w_bytes / 1e6, "dense_weight_mb": dense_bytes / 1e6, "status": "ok"}
            rows.append(row)
            try:
                x = torch.randn(tokens, k, device=device, dtype=dtype)
                with torch.inference_mode():
                    row["rel_err"] = relative_error(sparse(x), dense(x))

                def run(m):
                    def call():
                        with torch.inference_mode():
                            return m(x)
                    return call

                with cpu_timing_threads(device, sizes.cpu_threads):
                    t = time_interleaved({"dense": run(dense), "2:4": run(sparse)}, device=device,
                                         rounds=sizes.rounds, rep=sizes.rep, progress=False)
                flops = 2.0 * tokens * k * n
                io = tokens * (k + n) * elt
                row.update(dense_ms=t["dense"].median_ms, latency_ms=t["2:4"].median_ms, iqr_ms=t["2:4"].iqr_ms,
                           dense_iqr_ms=t["dense"].iqr_ms, speedup=t["dense"].median_ms / t["2:4"].median_ms)
                row.update(roofline_columns(flops, w_bytes + io, t["2:4"].median_ms, peak))
                dense_roof = roofline_columns(flops, dense_bytes + io, t["dense"].median_ms, peak)
                row.update({f"dense_{k2}": v for k2, v in dense_roof.items()})
            except Exception as e:
                row["status"] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        del dense, sparse
    return SuiteResult("llama", "LLaMA-3-8B-sized projections, dense nn.Linear vs 2:4 SparseLinear", rows,
                       LLAMA_COLUMNS, notes="TFLOP/s, GB/s and % roofline are the 2:4 layer's (dense-equivalent "
                       "FLOPs; bytes = compressed weight + activations)." + _timing_note(device, sizes))


SUITES = {"resnet50": resnet50_suite, "bert": bert_suite, "llama": llama_suite}


def suite_plot_specs(results: list[SuiteResult]) -> dict[str, dict]:
    """``plot_lines`` arguments for ``latency_vs_tokens`` (LLaMA projections) and ``speedup_vs_sparsity``
    (whole models: speedup against the fraction of MACs removed, with the ideal ``1 / MAC ratio``), from
    whichever suites are in ``results`` (rows without a latency are left out)."""
    specs = {}
    for r in results:
        if r.name != "llama":
            continue
        series = {}
        for row in r.rows:
            if row.get("latency_ms") is None:
                continue
            short = row["layer"].split()[0]
            series.setdefault(f"{short} dense", []).append((row["tokens"], row["dense_ms"]))
            series.setdefault(f"{short} 2:4", []).append((row["tokens"], row["latency_ms"]))
        if series:
            specs["latency_vs_tokens"] = dict(series=series, title="LLaMA-sized projections: latency vs tokens",
                                              xlabel="tokens (M)", ylabel="latency (ms)", logx=True, logy=True)
    series = {}
    for r in results:
        if r.name == "llama":
            continue
        for row in r.rows:
            if row.get("speedup") is None or row.get("mac_ratio") is None or row["variant"] == "dense":
                continue
            kind = "2:4" if row["variant"] == "2:4" else ("filters + 2:4" if "2:4" in row["variant"] else "filters")
            model = str(row.get("model", r.name)).split()[0]
            series.setdefault(f"{model} b{row.get('batch')} {kind}", []).append((1.0 - row["mac_ratio"], row["speedup"]))
    if series:
        xs = sorted({x for pts in series.values() for x, _ in pts})
        series["ideal (1 / MAC ratio)"] = [(x, 1.0 / max(1.0 - x, 1e-3)) for x in xs]
        specs["speedup_vs_sparsity"] = dict(series=series, title="Whole models: speedup over dense vs MACs removed",
                                            xlabel="fraction of MACs removed (non-zero weights)",
                                            ylabel="speedup over dense (x)", hline=1.0, hline_label="dense")
    return specs


def timing_stamp(device: torch.device, threads: int | None = 1) -> dict:
    """The environment stamp as it was while timing: on the CPU with the suites' timing thread count."""
    from ..environment import environment_stamp
    from .measure import cpu_timing_threads

    with cpu_timing_threads(device, threads):
        return environment_stamp(device)


def plot_suites(results: list[SuiteResult], out_dir: Path, device: torch.device, prefix: str = "",
                suffix: str = "", threads: int | None = 1) -> list[Path]:
    """Draw ``<prefix>latency_vs_tokens<suffix>.png`` and ``<prefix>speedup_vs_sparsity<suffix>.png`` (see
    :func:`suite_plot_specs`) into ``out_dir``; returns the paths written. ``threads``: the CPU timing thread
    count, shown in the subtitle."""
    from .report import plot_lines

    sub = timing_stamp(device, threads)["device"]
    return [plot_lines(Path(out_dir) / f"{prefix}{stem}{suffix}.png", subtitle=sub, **spec)
            for stem, spec in suite_plot_specs(results).items()]


def write_suite(result: SuiteResult, out_dir: str | os.PathLike, device: torch.device, plots=(), *,
                suffix: str = "", threads: int | None = 1) -> Path:
    """Write one suite as ``<out_dir>/models_<name><suffix>.json|md`` (stamped with the CPU timing thread
    count ``threads``); returns the JSON path."""
    from .report import write_report

    files = write_report(f"models_{result.name}{suffix}", result.rows, result.columns, out_dir=out_dir,
                         device=device, title=result.title, notes=result.notes, plots=plots,
                         environment=timing_stamp(device, threads))
    return files.json


def run_model_suites(
    device: torch.device,
    dtype: torch.dtype,
    *,
    quick: bool = False,
    out_dir: str | os.PathLike,
    progress: bool = True,
    names: tuple[str, ...] = ("resnet50", "bert", "llama"),
) -> list[Path]:
    """Run the named suites, write each (JSON + Markdown) and the two plots to ``out_dir``; returns the paths.

    Files are named ``models_<suite>.json|md``, ``models_latency_vs_tokens.png`` and
    ``models_speedup_vs_sparsity.png``; with ``quick`` every name gets a ``_quick`` suffix, so a smoke run never
    overwrites full-size results."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ValueError(f"run_model_suites(): expected suite names from {tuple(SUITES)}, got {unknown}")
    sizes = suite_sizes(device, quick)
    results = [SUITES[n](device, dtype, quick=quick, progress=progress, sizes=sizes) for n in names]
    suffix = "_quick" if quick else ""
    plots = plot_suites(results, out, device, prefix="models_", suffix=suffix, threads=sizes.cpu_threads)
    paths = []
    for r in results:
        mine = [p for p in plots if ("latency" in p.name) == (r.name == "llama")]
        paths.append(write_suite(r, out, device, plots=mine, suffix=suffix, threads=sizes.cpu_threads))
    return paths + plots

