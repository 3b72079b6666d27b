"""The ``sparsekernels`` command line. Run ``sparsekernels --help`` (or ``python -m sparsekernels``).

Subcommands:

* ``demo``  -- the main job: train a CNN on the bundled digits, prune (filters, 2:4, both), fine-tune, swap to
  the sparse runtime, time against dense, write the table and a plot;
* ``prune`` -- prune a torchvision model, a ``module:factory`` model, a safetensors checkpoint or a Hugging Face
  language model directory (calibrated on text, perplexity before and after); save it;
* ``bench`` -- the kernel sweep, the layer suite, the model suites, the one-call GPU suite, and the
  single-purpose benchmarks (CPU memory, channel latency, pruning quality, the CPU design study).

Every bad argument ends in one line ``sparsekernels <command>: error: ...`` and exit code 2, found before any
long work starts (sizes within limits, ``--out`` writable, factories imported); Ctrl-C ends in one line and exit
code 130, with no half-written result (results are published whole or not at all), and an operating-system
error (a full disk) in one line and exit code 1. Only the argument parsing lives here; the commands live in
:mod:`sparsekernels.app` and :mod:`sparsekernels.benchmarks` and are imported when they run, so ``--help``
costs nothing (no torchvision, no pruning, no triton).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ._version import __version__


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message):  # noqa: D401 - argparse API
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message}\n")


def _checked(convert, accepts, expected: str):
    """An argparse type: ``convert(text)`` when it parses and ``accepts`` the value, else the error "expected ..."."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def _int_in(low: int, high: int):
    """An argparse type for an integer in ``low..high`` (sizes are bounded: a typo must not allocate terabytes)."""
    return _checked(int, lambda v: low <= v <= high, f"an integer in {low}..{high:,}" if low else
                    f"an integer >= 0 and <= {high:,}")


_nonneg_int = _int_in(0, 2**32 - 1)
_ratio = _checked(float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)")
_budget = _checked(float, lambda v: 0 < v <= 86400, "a positive number of seconds, at most 86,400 (a day)")


def _pattern(text: str) -> str:
    """``channels``, ``unstructured`` or ``N:M`` with 0 < N < M."""
    if text in ("channels", "unstructured"):
        return text
    parts = text.split(":")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m:
            return f"{n}:{m}"
    raise argparse.ArgumentTypeError(f"expected channels, unstructured or N:M with 0 < N < M (e.g. 2:4), got {text!r}")


def _add_device(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--device", default=default, help=f"auto, cpu or cuda[:N] (default: {default})")


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")


def _config(cls, args: argparse.Namespace, **options):
    """The frozen dataclass ``cls`` with every field that has a command-line option set from it (``options``:
    field -> option name, where they differ); fields without an option keep their defaults."""
    names = {f.name: options.get(f.name, f.name) for f in dataclasses.fields(cls)}
    return cls(**{field: getattr(args, option) for field, option in names.items() if hasattr(args, option)})


def _run_demo(args) -> int:
    from .app.demo import DemoConfig, run_demo

    config = _config(DemoConfig, args, channel_ratio="ratio")
    run_demo(config, device=args.device, out_dir=args.out, progress=args.progress)
    return 0


def _run_prune(args) -> int:
    from .app.prune import PruneConfig, run_prune

    run_prune(_config(PruneConfig, args), out=args.out, progress=args.progress)
    return 0


def _run_bench(args) -> int:
    from .app import UsageError, check_output_folder, parse_dtype, resolve_device
    from .benchmarks.report import results_dir
    from .benchmarks.run import check_selection, run_bench

    device = None if args.device == "auto" else resolve_device(args.device)
    dtype = None if args.dtype == "auto" else parse_dtype(args.dtype, device)
    try:
        device = check_selection(args.which, device, dtype, args.budget_s)
    except ValueError as e:  # arguments this selection cannot run with: a usage error, said in one line
        raise UsageError(str(e)) from e
    out = check_output_folder(args.out if args.out is not None else results_dir(device))
    run_bench(args.which, device=device, dtype=dtype, quick=args.quick, out_dir=out, progress=args.progress,
              budget_s=args.budget_s)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .app import SIZE_LIMITS

    def size(name: str):
        return _int_in(1, SIZE_LIMITS[name])

    parser = _Parser(
        prog="sparsekernels",
        description="Sparse inference for PyTorch: prune, swap to sparse kernels, measure.",
    )
    parser.add_argument("--version", action="version", version=f"sparsekernels {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser(
        "demo",
        help="the main job: train, prune (filters / 2:4 / both), fine-tune, swap, time vs dense",
        description="Train DigitsCNN on scikit-learn's bundled digits, then prune it three ways (filter "
        "pruning, 2:4, both), fine-tune each, swap to the sparse runtime and time it against the dense model. "
        "Prints the table and writes it (JSON + Markdown) with a plot.",
    )
    _add_device(demo, "auto")
    demo.add_argument("--out", default=None,
                      help="output folder (default: ./sparsekernels-output/demo/; give benchmarks/results/<device> to "
                      "publish into the committed results)")
    demo.add_argument("--epochs", type=size("epochs"), default=10, help="training epochs of the dense model (10)")
    demo.add_argument("--finetune-epochs", type=size("finetune_epochs"), default=None,
                      help="fine-tuning epochs after each pruning step (default: --epochs // 3, at least 1)")
    demo.add_argument("--width", type=size("width"), default=32, help="first-stage channels of DigitsCNN (32)")
    demo.add_argument("--batch", type=size("batch"), default=256, help="batch size of the timed inference (256)")
    demo.add_argument("--ratio", type=_ratio, default=0.5, help="fraction of channels removed by filter pruning (0.5)")
    demo.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (0)")
    demo.add_argument("--threads", type=size("threads"), default=None,
                      help="CPU threads of the timed inference (default 1: stable on a shared CPU)")
    _add_progress(demo)
    demo.set_defaults(func=_run_demo)

    prune = sub.add_parser(
        "prune",
        help="prune a torchvision model, a module:factory model, a safetensors checkpoint or a Hugging Face "
        "language model directory; save it",
        description="MODEL is a torchvision model name (e.g. resnet18, random init), a factory "
        "'package.module:function' that returns an nn.Module, a .safetensors state dict together with "
        "--factory (no pickled files are read), or a Hugging Face model directory (config.json, a tokenizer, "
        "safetensors weights; without weights the model is built from config.json with random weights). A "
        "state dict result is saved as safetensors with the pruning metadata; a Hugging Face model is saved "
        "with save_pretrained (2:4: compressed) with its tokenizer, and its perplexity on --eval-text is "
        "reported before and after. The report (parameters and MACs before/after, per layer) is printed.",
    )
    prune.add_argument("model", metavar="MODEL",
                       help="torchvision name, module:factory, FILE.safetensors, or a Hugging Face model folder")
    prune.add_argument("--pattern", type=_pattern, required=True,
                       help="channels (filter pruning, physically smaller), 2:4 or any N:M, unstructured")
    prune.add_argument("--ratio", type=_ratio, default=None,
                       help="fraction removed: channels (default 0.5) or weights for unstructured (default 0.5); "
                       "N:M patterns fix it to 1 - N/M")
    prune.add_argument("--importance", default=None,
                       help="criterion: channels -> l1 (default), l2, bn_scale; weights -> magnitude (default), "
                       "wanda, sparsegpt (calibrated on --calib-text, or on random inputs of --input-shape)")
    prune.add_argument("--input-shape", default=None, help="example input shape (default 1,3,224,224)")
    prune.add_argument("--factory", default=None, help="module:function building the model of a .safetensors MODEL")
    prune.add_argument("--round-to", type=size("round_to"), default=None,
                       help="channels: keep counts multiples of this")
    prune.add_argument("--calib-batches", type=size("calib_batches"), default=None,
                       help="random calibration batches (default 4)")
    prune.add_argument("--calib-text", default=None,
                       help="Hugging Face MODEL: UTF-8 text file whose token ids calibrate the pruning")
    prune.add_argument("--calib-samples", type=size("calib_samples"), default=8,
                       help="Hugging Face MODEL: calibration windows cut from --calib-text (8)")
    prune.add_argument("--seq-len", type=size("seq_len"), default=128,
                       help="Hugging Face MODEL: tokens per calibration and evaluation window (128)")
    prune.add_argument("--eval-text", default=None,
                       help="Hugging Face MODEL: held-out UTF-8 text; its perplexity is reported before and after")
    prune.add_argument("--tokenizer", default=None, help="Hugging Face MODEL: the tokenizer's folder, if not MODEL")
    prune.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (0)")
    prune.add_argument("--out", required=True,
                       help="output FILE.safetensors, or a new or empty folder for a Hugging Face MODEL")
    _add_progress(prune)
    prune.set_defaults(func=_run_prune)

    from .benchmarks import SELECTIONS

    bench = sub.add_parser(
        "bench",
        help="benchmarks: kernels (2:4 Linear sweep), layers, models, all, the one-call GPU suite, and more",
        description="kernels: the 2:4 Linear sweep; layers: per-layer dispatched sparse vs dense; models: "
        "ResNet-50, a BERT-base encoder and LLaMA-sized projections; all: the three; gpu: the one-call GPU "
        "suite (< 9 minutes on an H100, at most 8 files, flat in --out); memory: resident memory of a CPU 2:4 "
        "SparseLinear vs nn.Linear; channel-latency: filter-pruned ResNet-50 vs dense; pruning-quality: "
        "accuracy and output fidelity per pruning criterion (CPU); nm-quality: one-shot 2:4 quality of every "
        "criterion with and without channel permutation (CPU); llm-scaling: pruning time, peak memory and "
        "fidelity of a Llama-style model against depth, beside llm-compressor (CPU); decode: end-to-end decode "
        "tokens/s of a Llama-style model, dense vs 2:4; cpu-auto: the CPU design "
        "study of SparseConv2d and BlockSparseLinear.",
    )
    bench.add_argument("which", nargs="?", default="all", choices=SELECTIONS, help="what to run (default: all)")
    _add_device(bench)
    bench.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                       help="auto = fp16 on a GPU, fp32 on the CPU")
    bench.add_argument("--quick", action="store_true",
                       help="tiny sizes: runs on a CPU in about a minute; files named *_quick")
    bench.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<device>/)")
    bench.add_argument("--budget-s", type=_budget, default=None,
                       help="gpu: time budget in seconds (default 480, under the 9-minute limit)")
    _add_progress(bench)
    bench.set_defaults(func=_run_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .app import UsageError

    prog = f"sparsekernels {args.command}"
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        sys.stderr.write(f"{prog}: error: {_one_line(e)}\n")
        return 2
    except KeyboardInterrupt:  # results are published whole or not at all, so nothing half-written is left
        sys.stderr.write(f"{prog}: interrupted; no partial results were written\n")
        return 130
    except OSError as e:  # the machine, not the arguments: a full disk, a folder removed under the run
        sys.stderr.write(f"{prog}: error: {_one_line(e)}\n")
        return 1


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:2000]


if __name__ == "__main__":
    sys.exit(main())
