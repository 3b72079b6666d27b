"""``sparsekernels demo`` -- the main job, end to end, on the built-in digits (no download).

1. Train :class:`~sparsekernels.examples.digits.DigitsCNN` on scikit-learn's handwritten digits.
2. Three pruned variants, each fine-tuned with ``pruning.finetune``:

   * **filters** -- ``pruning.prune_channels`` removes ``ratio`` of the channels (a physically smaller
     dense model: faster on every device, no special kernel);
   * **2:4** -- ``pruning.prune_weights(pattern="2:4")``, fine-tuned with the masks enforced, then
     ``pruning.remove_masks``;
   * **filters + 2:4** -- both, in that order.

3. Each variant is swapped to the sparse runtime (``sparsekernels.sparsify``) and timed against the dense
   model at the same batch, in interleaved rounds (:func:`~sparsekernels.benchmarks.measure.time_interleaved`).
4. The table -- accuracy, non-zero parameters, effective MACs, stored weight bytes, latency median and IQR,
   speedup over dense -- is printed and written as JSON + Markdown with a PNG plot, the three published
   together, by default to ``./sparsekernels-output/demo/`` (:data:`DEMO_OUT`), never over the committed
   results unless that folder is asked for. The folder is checked for writability before the first step.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..benchmarks.measure import latency_columns
from . import SIZE_LIMITS, check_output_folder, resolve_device

__all__ = ["DemoConfig", "DemoResult", "run_demo", "DEMO_COLUMNS", "DEMO_OUT"]


# Where the demo writes when no folder is given: outside the committed results, relative to the current folder.
DEMO_OUT = Path("sparsekernels-output") / "demo"


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo.

    Attributes:
        epochs: training epochs of the dense model.
        finetune_epochs: fine-tuning epochs after each pruning step (None: ``max(1, epochs // 3)``).
        width: first-stage channels of DigitsCNN (then 2x and 4x).
        batch: batch size of the timed inference (the test images, repeated to fill it).
        channel_ratio: fraction of channels filter pruning removes.
        seed: seed of the data split, the initialisation and the training order.
        threads: CPU threads of the timed inference on the CPU (None: 1). One thread by default because on a
            shared or busy CPU a multi-threaded op waits for its slowest thread's time slice, and the timing
            then measures the scheduler (measured here, 2 busy cores: dense IQR 120-230 ms at 2 threads vs
            30 ms at 1 thread on a 250 ms call). Training uses torch's default.
        lr: peak learning rate of the dense training (fine-tuning uses a third of it).
        rounds: interleaved timing rounds.
    """

    epochs: int = 10
    finetune_epochs: int | None = None
    width: int = 32
    batch: int = 256
    channel_ratio: float = 0.5
    seed: int = 0
    threads: int | None = None
    lr: float = 3e-3
    rounds: int = 7

    def __post_init__(self):
        for name in ("epochs", "finetune_epochs", "width", "batch", "threads", "rounds"):
            value, limit = getattr(self, name), SIZE_LIMITS[name]
            if value is None and name in ("finetune_epochs", "threads"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise ValueError(f"DemoConfig: expected {name} to be an int in 1..{limit}, got {value!r}")
        if not 0.0 < self.channel_ratio < 1.0:
            raise ValueError(f"DemoConfig: expected 0 < channel_ratio < 1, got {self.channel_ratio}")

    @property
    def ft_epochs(self) -> int:
        return self.finetune_epochs if self.finetune_epochs is not None else max(1, self.epochs // 3)


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` returns: the table rows and the files it wrote."""

    rows: list
    json_path: Path
    markdown_path: Path
    plot_path: Path
    seconds: float


DEMO_COLUMNS = (
    ("variant", "model"), ("accuracy", "accuracy (%)", ".2f"), ("params", "non-zero params", ",d"),
    ("macs", "MACs / image", ",d"), ("weight_bytes", "weight bytes", ",d"), *latency_columns(fmt=".2f"),
    ("swapped", "sparse layers"),
)


def _finetune(model: nn.Module, data, *, epochs: int, lr: float, seed: int, progress: bool,
              teacher: nn.Module | None = None) -> nn.Module:
    """Fine-tune with ``pruning.finetune`` (masks, if any, stay enforced after every step)."""
    import pruning

    config = pruning.FinetuneConfig(epochs=epochs, lr=lr, seed=seed)
    pruning.finetune(model, data.train_loader(64, seed), config=config, teacher=teacher, progress=progress)
    model.eval()
    return model


def _prune_filters(model: nn.Module, ratio: float, example: torch.Tensor) -> nn.Module:
    import pruning

    return pruning.prune_channels(model, example, ratio=ratio, importance="l1")


def _prune_24(model: nn.Module, data, *, epochs: int, lr: float, seed: int, progress: bool, teacher: nn.Module):
    import pruning

    report = pruning.prune_weights(model, pattern="2:4", importance="magnitude", progress=progress)
    _finetune(model, data, epochs=epochs, lr=lr, seed=seed, progress=progress, teacher=teacher)
    pruning.remove_masks(model)
    return report


def _swap(model: nn.Module):
    import sparsekernels

    return sparsekernels.sparsify(model)


def _plot(path: Path, rows: list[dict], title: str, subtitle: str) -> Path:
    import matplotlib

    from ..benchmarks.report import save_figure

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    colors = ["#888888", "#1f77b4", "#ff7f0e", "#2ca02c"][: len(rows)]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(11, 3.8), dpi=110)
    speed = [r["speedup"] for r in rows]
    ax1.bar(names, speed, color=colors)
    ax1.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax1.set_ylabel("speedup over dense (x)")
    ax1.set_title("latency speedup (higher is better)", fontsize=9)
    for i, v in enumerate(speed):
        ax1.text(i, v, f"{v:.2f}x", ha="center", va="bottom", fontsize=8)
    acc = [r["accuracy"] for r in rows]
    ax2.bar(names, acc, color=colors)
    low = max(0.0, min(acc) - 3.0)
    ax2.set_ylim(low, 100.0)
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_title("accuracy (digits test set)", fontsize=9)
    for i, v in enumerate(acc):
        ax2.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    wb = [r["weight_bytes"] / 1024 for r in rows]
    macs = [r["macs"] / 1e6 for r in rows]
    ax3.bar([i - 0.2 for i in range(len(rows))], wb, width=0.4, label="weight KiB", color="#9467bd")
    ax3b = ax3.twinx()
    ax3b.bar([i + 0.2 for i in range(len(rows))], macs, width=0.4, label="MMACs / image", color="#8c564b")
    ax3.set_xticks(range(len(rows)), names)
    ax3.set_ylabel("stored weight (KiB)")
    ax3b.set_ylabel("effective MMACs / image")
    ax3.set_title("size and work", fontsize=9)
    h1, l1 = ax3.get_legend_handles_labels()
    h2, l2 = ax3b.get_legend_handles_labels()
    ax3.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
    for ax in (ax1, ax2, ax3):
        ax.tick_params(axis="x", labelsize=8, rotation=15)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def run_demo(
    config: DemoConfig = DemoConfig(),
    *,
    device: str | torch.device | None = "auto",
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    stream=None,
) -> DemoResult:
    """Run the demo and write ``demo.json``, ``demo.md`` and ``demo.png`` to ``out_dir``.

    Args:
        config: a :class:`DemoConfig`.
        device: where the models are timed (training always runs on the CPU: the digits are tiny);
            ``"auto"`` picks the GPU when there is one.
        out_dir: output folder (default :data:`DEMO_OUT`, ``./sparsekernels-output/demo/``: outside the committed
            results; pass ``benchmarks/results/<device>`` to publish there). Checked for writability before any
            work; the three files appear there together when the run ends, or not at all.
        progress: show progress bars.
        stream: where the table is printed (default ``sys.stdout``).

    Returns:
        A :class:`DemoResult` (rows in the order dense, filters, 2:4, filters + 2:4).

    Raises:
        UsageError: an unusable ``device`` or ``out_dir``.
        TypeError: ``config`` is not a :class:`DemoConfig`.
    """
    from tqdm.auto import tqdm

    from ..benchmarks.measure import count_macs, cpu_timing_threads, nonzero_params, stored_bytes, time_interleaved
    from ..benchmarks.report import markdown_table, publishing, write_report
    from ..environment import environment_stamp
    from ..examples.digits import DigitsCNN, evaluate_accuracy, load_digits_data, train_classifier

    if not isinstance(config, DemoConfig):
        raise TypeError(f"run_demo(): expected a DemoConfig, got {type(config).__name__}")
    stream = stream or sys.stdout
    device = resolve_device(device)
    out = check_output_folder(out_dir if out_dir is not None else DEMO_OUT)  # before minutes of work, not after
    started = time.perf_counter()
    steps = tqdm(total=6, desc="demo", disable=not progress)

    stage_seconds: dict[str, float] = {}
    last = [time.perf_counter(), None]

    def step(text: str) -> None:
        now = time.perf_counter()
        if last[1] is not None:
            stage_seconds[last[1]] = now - last[0]
        last[0], last[1] = now, text
        steps.set_postfix_str(text)

    try:
        step("load + train dense")
        data = load_digits_data(seed=config.seed)
        torch.manual_seed(config.seed)
        dense = DigitsCNN(width=config.width)
        train_classifier(dense, data, epochs=config.epochs, lr=config.lr, seed=config.seed, progress=progress)
        dense.eval()
        steps.update()
        ft_lr = config.lr / 3
        example = data.test.tensors[0][:8]

        step("filter pruning + fine-tune")
        filters = _prune_filters(dense, config.channel_ratio, example)
        _finetune(filters, data, epochs=config.ft_epochs, lr=ft_lr, seed=config.seed, progress=progress,
                  teacher=dense)
        steps.update()

        step("2:4 + fine-tune")
        sparse24 = copy.deepcopy(dense)
        _prune_24(sparse24, data, epochs=config.ft_epochs, lr=ft_lr, seed=config.seed, progress=progress,
                  teacher=dense)
        steps.update()

        step("filters + 2:4 + fine-tune")
        both = copy.deepcopy(filters)
        _prune_24(both, data, epochs=config.ft_epochs, lr=ft_lr, seed=config.seed, progress=progress,
                  teacher=dense)
        steps.update()

        variants = {"dense": dense, "filters": filters, "2:4": sparse24, "filters + 2:4": both}
        label = {"filters": f"filters -{config.channel_ratio:.0%}", "2:4": "2:4", "filters + 2:4": "filters + 2:4"}
        rows = []
        for name, model in variants.items():
            model.eval()
            macs = count_macs(model, example[:1])
            rows.append({
                "variant": label.get(name, name),
                "accuracy": evaluate_accuracy(model, data),
                "params": nonzero_params(model),
                "macs": macs.effective,
                "macs_total": macs.total,
            })

        step("swap to the sparse runtime")
        swapped = {}
        for (name, model), row in zip(variants.items(), rows):
            model = model.to(device)
            if name == "dense":
                row["swapped"] = "0 (dense)"
            else:
                report = _swap(model)
                row["swapped"] = f"{len(report.swapped)} of {len(report.swapped) + len(report.skipped)}"
                row["skipped"] = {s.name: s.reason for s in report.skipped}
                row["accuracy_masked"] = row["accuracy"]  # before the swap, dense modules with zeros
                row["accuracy"] = evaluate_accuracy(model, data)  # what the table shows: the swapped model
            row["weight_bytes"] = stored_bytes(model)
            if name in ("dense", "filters"):
                row.pop("skipped", None)  # nothing in them is 2:4 by design: no per-layer noise in the report
            swapped[name] = model
        steps.update()

        step(f"timing at batch {config.batch}")
        images = data.test.tensors[0]
        reps = -(-config.batch // len(images))
        x = images.repeat(reps, 1, 1, 1)[: config.batch].to(device).contiguous()

        def runner(m):
            def call():
                with torch.inference_mode():
                    return m(x)
            return call

        timing_threads = config.threads if config.threads is not None else 1
        with cpu_timing_threads(device, timing_threads):
            env = environment_stamp(device)  # stamped while the timing's thread count is in force
            timings = time_interleaved({k: runner(m) for k, m in swapped.items()}, device=device,
                                       rounds=config.rounds, rep=5, progress=progress, desc="timing")
        dense_ms = timings["dense"].median_ms
        for name, row in zip(variants, rows):
            t = timings[name]
            row.update(latency_ms=t.median_ms, iqr_ms=t.iqr_ms, p25_ms=t.p25_ms, p75_ms=t.p75_ms,
                       samples=t.n, speedup=dense_ms / t.median_ms)
        steps.update()
        step("write")
    finally:
        steps.close()

    seconds = time.perf_counter() - started
    title = f"sparsekernels demo: DigitsCNN(width={config.width}) on the digits, batch {config.batch}"
    notes = (
        f"Dense trained {config.epochs} epochs; each pruned variant fine-tuned {config.ft_epochs} epochs "
        f"(distilled from dense). Filter pruning removes {config.channel_ratio:.0%} of the channels "
        "(pruning.prune_channels, L1); 2:4 prunes every eligible Conv2d/Linear (pruning.prune_weights, "
        "magnitude). Accuracy is measured on the held-out digits after the swap to the sparse runtime "
        "(sparsekernels.sparsify). MACs are PyTorch flop_counter MACs times each layer's weight density; "
        "weight bytes are the swapped model's state_dict (compressed 2:4 values + metadata, BatchNorm). "
        f"Latency: median of {config.rounds} interleaved rounds of sparsekernels.timing.time_fn on "
        f"{device}" + (f" with {timing_threads} thread(s)" if device.type == "cpu" else "")
        + f". The whole demo took {seconds:.0f} s."
    )
    plot_path = out / "demo.png"
    with publishing():  # the plot, the JSON and the Markdown appear together, or not at all
        _plot(plot_path, rows, title, env["device"])
        files = write_report(
            "demo", rows, DEMO_COLUMNS, out_dir=out, device=device, title=title, notes=notes,
            meta={"config": asdict(config), "seconds": seconds, "stage_seconds": stage_seconds}, plots=[plot_path],
            environment=env,
        )
    print(f"\n{title}\n{env['device']} · torch {env['torch']}\n", file=stream)
    print(markdown_table(rows, DEMO_COLUMNS), file=stream)
    for row in rows:
        for layer, reason in (row.get("skipped") or {}).items():
            print(f"  {row['variant']}: {layer} left dense: {reason}", file=stream)
    print(f"\nwrote {files.json}, {files.markdown}, {plot_path} ({seconds:.0f} s)", file=stream)
    return DemoResult(rows, files.json, files.markdown, plot_path, seconds)

