"""One command that refreshes every important GPU number: ``python -m sparsekernels bench gpu --out DIR``.

Made for a lent GPU session with a hard time limit (10 minutes a command): it runs the steps below in order
of importance, each only if its planned cost still fits the budget (default 480 s, leaving margin under
9 minutes on an H100), and rewrites its files after every step, so whatever finished is on disk even if the
process is killed. It writes at most :data:`MAX_FILES` files, flat in ``DIR`` (no subfolders):

* ``gpu_suite.json`` -- every table (``sections``, each a ``sparsekernels.report/1`` report), the steps
  skipped and why, the environment stamp;
* ``gpu_suite.md``   -- the same tables in Markdown;
* ``gpu_kernels_speedup.png``, ``gpu_latency_vs_tokens.png``, ``gpu_speedup_vs_sparsity.png`` -- plots.

Steps, most important first (planned seconds on an H100 in brackets):

1. ``kernels_fp16`` -- the 2:4 Linear sweep: LLaMA layers x tokens 1..8192, fp16 (90 s).
2. ``llama``        -- LLaMA-sized projections through ``SparseLinear`` (the dispatcher), fp16 (60 s).
3. ``layers``       -- the per-layer dispatcher suite, fp16, cut at 80 s by itself (90 s).
4. ``resnet50``     -- ResNet-50 at batch 64, fp16: dense, filters at 3 ratios, 2:4, both (75 s).
5. ``bert``         -- the BERT-base encoder at batch 1, 4, 16, 64, fp16 (60 s).
6. ``kernels_bf16`` -- the 2:4 Linear sweep in bf16 (90 s).

The planned seconds are estimates (no H100 was lent while this was written): the planner and a watchdog keep
the whole run inside the budget whatever a step really costs. A step that overruns what is left by more
than ``grace_s`` is interrupted, recorded as failed, and the remaining steps are skipped.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

__all__ = ["GpuStep", "StepOutput", "StepTimeout", "GpuSuiteResult", "MAX_FILES", "default_steps", "plan_next",
           "run_gpu_suite"]

MAX_FILES = 8


@dataclass(frozen=True)
class StepOutput:
    """What a step returns: report sections (dicts with name/title/columns/rows/notes) and plot series."""

    sections: tuple = ()
    plots: tuple = ()  # (file stem, kwargs for plot_lines) pairs


@dataclass(frozen=True)
class GpuStep:
    """One unit of the GPU suite: ``run(device, progress) -> StepOutput`` and its planned cost in seconds."""

    name: str
    planned_s: float
    run: Callable[[torch.device, bool], StepOutput]


@dataclass
class GpuSuiteResult:
    """The outcome: files written, steps run (with seconds), steps skipped or failed (with the reason)."""

    files: list = field(default_factory=list)
    ran: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    seconds: float = 0.0


def plan_next(step: GpuStep, elapsed_s: float, budget_s: float, margin: float = 1.15) -> str | None:
    """``None`` if ``step`` fits (``elapsed + margin * planned <= budget``), else why it is skipped."""
    need = margin * step.planned_s
    if elapsed_s + need > budget_s:
        return (f"skipped: needs ~{need:.0f} s (planned {step.planned_s:.0f} s x {margin}), "
                f"{max(budget_s - elapsed_s, 0):.0f} s of the {budget_s:.0f} s budget left")
    return None


class StepTimeout(Exception):
    """Raised inside a step that overran the budget (by the watchdog)."""


@contextlib.contextmanager
def _watchdog(seconds: float):
    """Raise :class:`StepTimeout` in the main thread after ``seconds`` (real time); a no-op where SIGALRM or
    the main thread is unavailable. Python delivers it between bytecodes, i.e. after the CUDA call in flight."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def _raise(signum, frame):
        raise StepTimeout("the step overran the time budget by more than the grace period")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------------- steps


def _section(name, title, rows, columns, notes="") -> dict:
    from .report import normalize_columns

    return {"name": name, "title": title, "rows": rows, "columns": [c.as_dict() for c in normalize_columns(columns)],
            "notes": notes}


def _kernels_step(dtype: torch.dtype):
    def run(device: torch.device, progress: bool) -> StepOutput:
        from .kernels import LAYERS, TOKENS, kernel_columns, run_linear24_sweep
        from .measure import add_roofline

        rows = [r.as_dict() for r in run_linear24_sweep(device, tokens=TOKENS, layers=LAYERS, dtypes=[dtype],
                                                           out_dir=None, progress=progress)]
        add_roofline(rows, device)
        # one line per layer: what a swapped model runs (the dispatcher's "auto"), else our Triton kernel
        backends = {r["backend"] for r in rows}
        shown = next((b for b in ("auto", "triton", "cpu_auto") if b in backends), None)
        series = {}
        for r in rows:
            if r["backend"] != "dense" and (shown is None or r["backend"] == shown):
                series.setdefault(f"{r['in_features']}x{r['out_features']} {r['dtype']} {r['backend']}", []).append(
                    (r["tokens"], r["speedup_vs_dense"]))
        name = str(dtype).replace("torch.", "")
        section = _section(f"kernels_linear24_{name}", f"2:4 Linear sweep (LLaMA layers, {name})", rows,
                           kernel_columns(device), "speedup = cuBLAS median / this median; % roofline against the dense "
                           "fp16 tensor-core peak and HBM bandwidth")
        return StepOutput((section,), (("_kernel_series", series),))

    return run


def _suite_step(name: str):
    def run(device: torch.device, progress: bool) -> StepOutput:
        from .models import SUITES

        result = SUITES[name](device, torch.float16, quick=False, progress=progress)
        section = _section(f"models_{result.name}", result.title, result.rows, result.columns, result.notes)
        return StepOutput((section,), (("_suite", result),))

    return run


def _step_layers(device: torch.device, progress: bool) -> StepOutput:
    from . import layers

    sections = layers.layer_suite_sections(device, dtype=torch.float16, quick=False, progress=progress)
    return StepOutput(tuple(_section(**s) for s in sections))


def default_steps() -> list[GpuStep]:
    """The real steps, most important first (planned seconds include Triton compilation and autotuning)."""
    return [
        GpuStep("kernels_fp16", 90.0, _kernels_step(torch.float16)),
        GpuStep("llama", 60.0, _suite_step("llama")),
        GpuStep("layers", 90.0, _step_layers),
        GpuStep("resnet50", 75.0, _suite_step("resnet50")),
        GpuStep("bert", 60.0, _suite_step("bert")),
        GpuStep("kernels_bf16", 90.0, _kernels_step(torch.bfloat16)),
    ]


# ----------------------------------------------------------------------------------------------- writing


def _render_md(doc: dict) -> str:
    from .report import markdown_table, stamp_line

    lines = ["# GPU suite", "", stamp_line(doc["environment"]), ""]
    lines.append(f"Budget {doc['budget_s']:.0f} s, spent {doc['seconds']:.0f} s. Steps run: "
                 + (", ".join(f"{k} ({v:.0f} s)" for k, v in doc["ran"].items()) or "none") + ".")
    for k, v in doc["skipped"].items():
        lines.append(f"- `{k}` {v}")
    for s in doc["sections"]:
        lines += ["", f"## {s['title']}", "", markdown_table(s["rows"], s["columns"])]
        if s.get("notes"):
            lines += ["", s["notes"]]
    for p in doc["plots"]:
        lines += ["", f"![{Path(p).stem}]({p})"]
    return "\n".join(lines) + "\n"


def _write(out: Path, device, env: dict, budget_s: float, result: GpuSuiteResult, sections: list,
           plot_specs: dict) -> list[Path]:
    """Publish the suite's files as they stand (after every step): the JSON, the Markdown and the plots of one
    moment, together (:func:`~sparsekernels.benchmarks.report.publishing`)."""
    from .report import SCHEMA, SUITE_SCHEMA, jsonable, normalize_columns, plot_lines, publishing

    with publishing() as staged:
        plots = []
        for stem, spec in plot_specs.items():
            try:
                plots.append(plot_lines(out / f"{stem}.png", subtitle=env.get("device", ""), **spec))
            except ValueError:  # no finite point: no plot, said in the JSON
                result.skipped[f"plot {stem}"] = "no finite points to plot"
        doc = {
            "schema": SUITE_SCHEMA, "name": "gpu_suite", "title": "GPU suite", "environment": env,
            "budget_s": budget_s, "seconds": result.seconds, "ran": dict(result.ran), "skipped": dict(result.skipped),
            "sections": [{"schema": SCHEMA, "environment": env, "plots": [], "meta": {}, **jsonable(s),
                          "columns": [c.as_dict() for c in normalize_columns(s["columns"])]} for s in sections],
            "plots": [p.name for p in plots],
        }
        staged.write_text(out / "gpu_suite.md", _render_md(doc))
        staged.write_text(out / "gpu_suite.json", json.dumps(doc, indent=2) + "\n")
        files = [out / "gpu_suite.json", out / "gpu_suite.md", *plots]
    assert len(files) <= MAX_FILES, f"the GPU suite must write at most {MAX_FILES} files, wrote {len(files)}"
    return files


def run_gpu_suite(
    out_dir: str | os.PathLike,
    *,
    device: torch.device | str = "cuda",
    budget_s: float = 480.0,
    steps: Sequence[GpuStep] | None = None,
    progress: bool = True,
    stream=None,
    clock: Callable[[], float] = time.monotonic,
    grace_s: float = 30.0,
) -> GpuSuiteResult:
    """Run the GPU suite into ``out_dir`` (created, flat) within ``budget_s`` seconds.

    Args:
        out_dir: the folder the files go to (no subfolders are made).
        device: the CUDA device (the real steps need one; injected ``steps`` may run anywhere).
        budget_s: seconds the whole run may take; a step starts only if its planned cost fits.
        steps: the steps (default :func:`default_steps`).
        progress: progress bars.
        stream: where the log goes (default ``sys.stdout``).
        clock: the clock the budget is measured with (tests inject a fake one).
        grace_s: a running step is interrupted (``SIGALRM``, main thread on POSIX) once it overruns what is
            left of the budget by this much; it is then recorded as failed and the files are still written.

    Returns:
        A :class:`GpuSuiteResult`; a failing step is recorded (with its error) and the others still run.

    Raises:
        ValueError: ``budget_s`` not positive.
    """
    from ..environment import environment_stamp

    if not budget_s > 0:
        raise ValueError(f"run_gpu_suite(): expected budget_s > 0, got {budget_s}")
    stream = stream or sys.stdout
    device = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = list(steps) if steps is not None else default_steps()
    env = environment_stamp(device)
    result = GpuSuiteResult()
    sections: list = []
    plot_specs: dict = {}
    suites: list = []
    kernel_series: dict = {}
    start = clock()
    for step in steps:
        elapsed = clock() - start
        reason = plan_next(step, elapsed, budget_s)
        if reason is not None:
            result.skipped[step.name] = reason
            print(f"[gpu suite] {step.name}: {reason}", file=stream)
            continue
        print(f"[gpu suite] {step.name} (planned {step.planned_s:.0f} s, {elapsed:.0f} s elapsed)", file=stream)
        t0 = clock()
        try:
            with _watchdog(budget_s - elapsed + grace_s):
                output = step.run(device, progress)
        except Exception as e:  # one broken step must not cost the others their numbers
            result.skipped[step.name] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
            traceback.print_exc(file=stream)
            result.seconds = clock() - start
            result.files = _write(out, device, env, budget_s, result, sections, plot_specs)
            continue
        finally:
            result.seconds = clock() - start
        result.ran[step.name] = clock() - t0
        sections += list(output.sections)
        for stem, spec in output.plots:
            if stem == "_suite":
                suites.append(spec)
            elif stem == "_kernel_series":  # both dtypes' sweeps share one plot
                kernel_series.update(spec)
                plot_specs["gpu_kernels_speedup"] = dict(
                    series=kernel_series, title="2:4 Linear: speedup over cuBLAS vs tokens", xlabel="tokens (M)",
                    ylabel="speedup over dense (x)", logx=True, hline=1.0, hline_label="dense")
            else:
                plot_specs[stem] = spec
        from .models import suite_plot_specs

        plot_specs.update({f"gpu_{k}": v for k, v in suite_plot_specs(suites).items()})
        result.files = _write(out, device, env, budget_s, result, sections, plot_specs)
    result.seconds = clock() - start
    result.files = _write(out, device, env, budget_s, result, sections, plot_specs)
    for p in result.files:
        print(f"wrote {p}", file=stream)
    return result

