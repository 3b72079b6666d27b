"""Pruning quality: accuracy and output fidelity of 2:4 pruning with each importance criterion.

Two measurements, both on the CPU:

1. **Digits CNN** (scikit-learn's bundled handwritten digits, ``sparsekernels.examples.digits``): train the
   dense model once, then prune every eligible layer to 2:4 one-shot with each criterion (magnitude,
   taylor, wanda, sparsegpt), and fine-tune each pruned model briefly (reduced learning rate, 1/10 of the
   training rate, distillation from the dense model). Test accuracy of each. Then 80 % unstructured:
   a uniform budget vs the sensitivity-allocated one, and one-shot + fine-tune vs gradual pruning.
2. **Transformer-style model** (:class:`OutlierTransformer`: pre-LN attention + MLP blocks whose LayerNorm
   gains have a few large channels and whose inputs have outlier features and low-rank structure, as
   LLM activations do): prune every Linear to 2:4 one-shot; relative output error against the dense
   model on held-out inputs, for several seeds.

Usage::

    sparsekernels bench pruning-quality [--quick] [--out DIR]
    python -m sparsekernels.benchmarks.pruning_quality [--quick] [--out DIR] [--threads N] [--progress]

Writes ``pruning_quality.json`` and ``pruning_quality.md`` (``pruning_quality_quick.*`` for a quick run; with
the environment stamp) to the out dir, by default ``benchmarks/results/cpu/``. The model and input generator
here are also imported by ``tests/test_prune_weights.py``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "OUTLIER_CHANNELS",
    "CRITERIA",
    "OutlierBlock",
    "OutlierTransformer",
    "outlier_batches",
    "relative_output_error",
    "transformer_fidelity",
    "digits_loss",
    "digits_quality",
    "render_markdown",
    "run_pruning_quality",
    "main",
]

OUTLIER_CHANNELS = (3, 17, 40, 58)
CRITERIA = ("magnitude", "taylor", "wanda", "sparsegpt")


# ---------------------------------------------------------------------------------------------------
# A small transformer with LLM-like activation outliers
# ---------------------------------------------------------------------------------------------------


class OutlierBlock(nn.Module):
    """Pre-LN block: causal multi-head self-attention (q, k, v, o Linear) and a GELU MLP (fc1, fc2)."""

    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ff)
        self.fc2 = nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)

        def split(z):
            return z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class OutlierTransformer(nn.Module):
    """``layers`` :class:`OutlierBlock` s, a final LayerNorm and a Linear head; input and output ``[B, T, d]``.

    The LayerNorm gains of ``outliers`` channels are set to ``outlier_gain``: like the massive activation
    channels of LLMs, a few input features of every Linear are much larger than the rest.
    """

    def __init__(self, d=64, heads=4, ff=256, layers=2, outliers=OUTLIER_CHANNELS, outlier_gain=8.0):
        super().__init__()
        self.blocks = nn.ModuleList(OutlierBlock(d, heads, ff) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, d)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight[list(outliers)] = outlier_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def outlier_batches(count: int, seed: int, *, d=64, tokens=32, batch=8, rank=8, outliers=OUTLIER_CHANNELS):
    """``count`` input batches ``[batch, tokens, d]``: a shared rank-``rank`` subspace plus noise, with the
    ``outliers`` features 10x larger (the subspace is fixed, the samples depend on ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=torch.Generator().manual_seed(1234))
    out = []
    for _ in range(count):
        z = torch.randn(batch, tokens, rank, generator=g)
        x = z @ basis / math.sqrt(rank) + 0.3 * torch.randn(batch, tokens, d, generator=g)
        x[..., list(outliers)] *= 10.0
        out.append(x)
    return out


@torch.no_grad()
def relative_output_error(model: nn.Module, reference: nn.Module, inputs) -> float:
    """``||model(x) - reference(x)|| / ||reference(x)||`` over all ``inputs`` (float64)."""
    num = den = 0.0
    for x in inputs:
        y, ref = model(x).double(), reference(x).double()
        num += float((y - ref).square().sum())
        den += float(ref.square().sum())
    return math.sqrt(num / den)


def transformer_fidelity(seed: int, *, calib_batches=16, test_batches=8, progress=False) -> dict[str, float]:
    """2:4 one-shot on every Linear of a seeded :class:`OutlierTransformer`; relative output error per criterion."""
    import pruning

    torch.manual_seed(seed)
    dense = OutlierTransformer().eval()
    calib = outlier_batches(calib_batches, seed=10 * seed + 1)
    test = outlier_batches(test_batches, seed=10 * seed + 2)
    errors = {}
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        report = pruning.prune_weights(model, "2:4", criterion, calib=calib, progress=progress)
        assert not report.skipped and abs(report.overall_sparsity - 0.5) < 1e-12
        errors[criterion] = relative_output_error(model, dense, test)
    return errors


# ---------------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------------


def digits_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def digits_quality(*, width=32, train_epochs=10, finetune_epochs=3, calib_batches=8, seed=0, progress=False) -> dict:
    """Dense accuracy, then 2:4 one-shot and fine-tuned accuracy for every criterion."""
    import pruning

    from ..examples.digits import DigitsCNN, evaluate_accuracy, load_digits_data, train_classifier

    data = load_digits_data(seed=seed)
    torch.manual_seed(seed)
    dense = DigitsCNN(width)
    train_lr = 3e-3
    t0 = time.perf_counter()
    train_classifier(dense, data, epochs=train_epochs, lr=train_lr, seed=seed, progress=progress)
    train_s = time.perf_counter() - t0
    dense_acc = evaluate_accuracy(dense, data)
    calib_pairs = [b for b, _ in zip(data.train_loader(128, seed=seed + 1), range(calib_batches))]
    calib_images = [x for x, _ in calib_pairs]
    rows = []
    for criterion in CRITERIA:
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        report = pruning.prune_weights(
            model,
            "2:4",
            criterion,
            calib=calib_pairs if criterion == "taylor" else calib_images,
            loss_fn=digits_loss if criterion == "taylor" else None,
            progress=progress,
        )
        prune_s = time.perf_counter() - t0
        one_shot = evaluate_accuracy(model, data)
        t0 = time.perf_counter()
        pruning.finetune(
            model,
            data.train_loader(64, seed=seed + 2),
            epochs=finetune_epochs,
            lr=train_lr / 10,
            teacher=dense,
            seed=seed,
            progress=progress,
        )
        finetune_s = time.perf_counter() - t0
        tuned = evaluate_accuracy(model, data)
        rows.append(
            {
                "criterion": criterion,
                "one_shot_accuracy": one_shot,
                "finetuned_accuracy": tuned,
                "finetuned_minus_dense": tuned - dense_acc,
                "overall_sparsity": report.overall_sparsity,
                "pruned_layers": report.pruned_names,
                "skipped": {s.name: s.reason for s in report.skipped},
                "prune_seconds": prune_s,
                "finetune_seconds": finetune_s,
            }
        )
    unstructured = _digits_unstructured(dense, data, calib_images, finetune_epochs, train_lr, seed, progress)
    return {
        "unstructured": unstructured,
        "model": f"DigitsCNN(width={width})",
        "dataset": "scikit-learn digits (1797 8x8 images; 25% stratified test split)",
        "train_epochs": train_epochs,
        "train_lr": train_lr,
        "finetune": {"epochs": finetune_epochs, "lr": train_lr / 10, "teacher": "dense model (KD, T=2, weight 0.5)"},
        "calibration_batches": calib_batches,
        "dense_accuracy": dense_acc,
        "dense_train_seconds": train_s,
        "rows": rows,
    }


def _digits_unstructured(dense, data, calib, finetune_epochs, train_lr, seed, progress, target=0.8) -> dict:
    """Unstructured magnitude pruning at ``target``: a uniform budget vs the sensitivity-allocated one
    (one-shot), then fine-tuning of the uniform one-shot model vs gradual (cubic) pruning during fine-tuning."""
    import pruning

    from ..examples.digits import evaluate_accuracy

    def eligible(name, module):  # the same layers 2:4 prunes: leave the 1-channel stem dense
        return not (isinstance(module, nn.Conv2d) and module.in_channels == 1)

    sens = pruning.sensitivity_analysis(
        dense, calib, sparsities=(0.5, 0.7, 0.8, 0.9, 0.95), filter_fn=eligible, progress=progress
    )
    allocation = sens.allocate(target)
    rows = {}
    uniform = copy.deepcopy(dense)
    pruning.prune_weights(uniform, "unstructured", sparsity=target, filter_fn=eligible, progress=progress)
    rows["uniform, one-shot"] = evaluate_accuracy(uniform, data)
    allocated = copy.deepcopy(dense)
    report = pruning.prune_weights(allocated, "unstructured", sparsity=allocation, progress=progress)
    rows["sensitivity-allocated, one-shot"] = evaluate_accuracy(allocated, data)
    allocated_sparsity = report.overall_sparsity
    pruning.finetune(uniform, data.train_loader(64, seed=seed + 2), epochs=finetune_epochs, lr=train_lr / 10,
                     teacher=dense, seed=seed, progress=progress)
    rows["uniform, one-shot + fine-tune"] = evaluate_accuracy(uniform, data)
    gradual = copy.deepcopy(dense)
    loader = data.train_loader(64, seed=seed + 2)
    steps = finetune_epochs * len(loader)
    pruner = pruning.GradualPruner(gradual, target, total_steps=steps * 2 // 3, frequency=max(1, steps // 12),
                                   filter_fn=eligible)
    pruning.finetune(gradual, loader, epochs=finetune_epochs, lr=train_lr / 10, teacher=dense, seed=seed,
                     pruner=pruner, progress=progress)
    rows["gradual (cubic) during fine-tune"] = evaluate_accuracy(gradual, data)
    return {
        "target_sparsity": target,
        "sensitivity_levels": list(sens.sparsities),
        "sensitivity_curves": {k: list(v) for k, v in sens.curves.items()},
        "allocation": allocation,
        "allocated_overall_sparsity": allocated_sparsity,
        "gradual_final_sparsity": pruner.reports[-1][1].overall_sparsity,
        "accuracy": rows,
    }


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def render_markdown(result: dict) -> str:
    """The Markdown page of a result dict (as :func:`run_pruning_quality` returns and writes it as JSON)."""
    stamp = result["environment"]
    dg = result["digits"]
    lines = [
        "# Pruning quality (2:4, one-shot and fine-tuned)",
        "",
        f"Device: {stamp['device']}; torch {stamp['torch']}; sparsekernels {stamp['sparsekernels']}; "
        f"{stamp['date']}. Generated by `sparsekernels bench pruning-quality"
        f"{' --quick' if result['quick'] else ''}`.",
        "",
        f"## Digits CNN — {dg['model']}, {dg['dataset']}",
        "",
        f"Dense accuracy **{dg['dense_accuracy']:.2f} %** (trained {dg['train_epochs']} epochs, lr {dg['train_lr']:g}, "
        f"{dg['dense_train_seconds']:.1f} s). 2:4 on every eligible layer "
        f"(skipped: {', '.join(f'`{k}` ({v})' for k, v in dg['rows'][0]['skipped'].items()) or 'none'}); "
        f"calibration {dg['calibration_batches']} batches of 128; fine-tune {dg['finetune']['epochs']} epochs at "
        f"lr {dg['finetune']['lr']:g} with distillation from the dense model.",
        "",
        "| criterion | sparsity | one-shot acc. (%) | fine-tuned acc. (%) | fine-tuned − dense (points) |",
        "|---|---|---|---|---|",
    ]
    lines.append(f"| dense | 0 | {dg['dense_accuracy']:.2f} | — | — |")
    for r in dg["rows"]:
        lines.append(
            f"| {r['criterion']} | {r['overall_sparsity']:.3f} | {r['one_shot_accuracy']:.2f} | "
            f"{r['finetuned_accuracy']:.2f} | {r['finetuned_minus_dense']:+.2f} |"
        )
    un = dg["unstructured"]
    lines += [
        "",
        f"### Unstructured magnitude pruning at {un['target_sparsity']:.0%} of the same layers",
        "",
        "Sensitivity-allocated: `sensitivity_analysis` (output error at levels "
        f"{', '.join(f'{v:g}' for v in un['sensitivity_levels'])}) then `allocate({un['target_sparsity']:g})` "
        f"(achieved overall {un['allocated_overall_sparsity']:.4f}); per layer: "
        + ", ".join(f"`{k}` {v:.3f}" for k, v in un["allocation"].items())
        + f". Gradual: `GradualPruner` (cubic, final {un['gradual_final_sparsity']:.4f}) during the fine-tune.",
        "",
        "| variant | accuracy (%) |",
        "|---|---|",
    ]
    for name, acc in un["accuracy"].items():
        lines.append(f"| {name} | {acc:.2f} |")
    tf = result["transformer"]
    lines += [
        "",
        "## Transformer-style model — output fidelity against the dense model",
        "",
        f"{tf['model']}; inputs {tf['inputs']}. 2:4 one-shot on every Linear; calibration "
        f"{tf['calibration_batches']} batches, evaluation on {tf['test_batches']} held-out batches. "
        "Relative output error ‖y − y_dense‖ / ‖y_dense‖ (lower is better), per seed and mean.",
        "",
        "| criterion | " + " | ".join(f"seed {s}" for s in tf["seeds"]) + " | mean | error vs magnitude |",
        "|---|" + "---|" * (len(tf["seeds"]) + 2),
    ]
    mag = tf["mean"]["magnitude"]
    for crit in ("magnitude", "wanda", "sparsegpt"):
        cells = " | ".join(f"{tf['per_seed'][str(s)][crit]:.4f}" for s in tf["seeds"])
        lines.append(f"| {crit} | {cells} | {tf['mean'][crit]:.4f} | {tf['mean'][crit] / mag:.2f}x |")
    lines += [
        "",
        f"Wanda's output error is {mag / tf['mean']['wanda']:.1f}x lower than magnitude's, SparseGPT's "
        f"{mag / tf['mean']['sparsegpt']:.1f}x lower (means over seeds).",
        "",
    ]
    return "\n".join(lines)


def run_pruning_quality(
    *,
    quick: bool = False,
    out_dir: str | os.PathLike | None = None,
    threads: int = 1,
    progress: bool = False,
) -> tuple[dict, Path, Path]:
    """Run both measurements on the CPU and write ``pruning_quality[_quick].{json,md}``.

    Args:
        quick: smaller model, fewer epochs and seeds.
        out_dir: output folder (default ``benchmarks/results/cpu/``).
        threads: torch CPU threads while running (restored afterwards). The results do not depend on it, and a
            shared machine runs one thread much faster than several oversubscribed ones.
        progress: progress bars.

    Returns:
        ``(result dict, JSON path, Markdown path)``.

    Raises:
        ValueError: ``threads`` < 1.
    """
    from ..environment import environment_stamp
    from .measure import cpu_timing_threads
    from .report import publishing, results_dir

    if threads < 1:
        raise ValueError(f"run_pruning_quality(): expected threads >= 1, got {threads}")
    out = Path(out_dir) if out_dir is not None else results_dir("cpu")
    t0 = time.perf_counter()
    with cpu_timing_threads("cpu", threads):
        if quick:
            digits = digits_quality(width=16, train_epochs=8, finetune_epochs=2, calib_batches=4, progress=progress)
            seeds = [0, 1]
        else:
            digits = digits_quality(width=32, train_epochs=10, finetune_epochs=3, calib_batches=8, progress=progress)
            seeds = [0, 1, 2, 3, 4]
        per_seed = {str(s): transformer_fidelity(s, progress=progress) for s in seeds}
        environment = environment_stamp("cpu")
    mean = {c: sum(per_seed[str(s)][c] for s in seeds) / len(seeds) for c in ("magnitude", "wanda", "sparsegpt")}
    result = {
        "benchmark": "pruning_quality",
        "quick": quick,
        "environment": environment,
        "digits": digits,
        "transformer": {
            "model": "OutlierTransformer(d=64, heads=4, ff=256, layers=2; LayerNorm gain 8 on 4 channels)",
            "inputs": "rank-8 subspace + noise, 4 outlier features x10, 8 x 32 tokens per batch",
            "calibration_batches": 16,
            "test_batches": 8,
            "seeds": seeds,
            "per_seed": per_seed,
            "mean": mean,
            "error_ratio_vs_magnitude": {c: mean[c] / mean["magnitude"] for c in mean},
        },
        "total_seconds": time.perf_counter() - t0,
    }
    stem = "pruning_quality_quick" if quick else "pruning_quality"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    with publishing() as results:
        results.write_text(md_path, render_markdown(result))
        results.write_text(json_path, json.dumps(result, indent=2) + "\n")
    return result, json_path, md_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsekernels.benchmarks.pruning_quality",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer epochs and seeds")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results/cpu/)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: results do not depend on it, and a "
        "shared machine runs one thread much faster than several oversubscribed ones)"
    )
    args = parser.parse_args(argv)
    try:
        result, json_path, md_path = run_pruning_quality(quick=args.quick, out_dir=args.out, threads=args.threads,
                                                         progress=args.progress)
    except ValueError as e:
        parser.error(str(e))
    print(render_markdown(result))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
