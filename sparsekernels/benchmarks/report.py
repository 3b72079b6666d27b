"""Report writers: every benchmark result lands as JSON (the data) + Markdown (the table people read) and,
where it helps, PNG plots, under ``benchmarks/results/<device_slug>/``, stamped with
:func:`~sparsekernels.environment.environment_stamp`.

The JSON schema (``"schema": "sparsekernels.report/1"``)::

    {"schema": ..., "name": "demo", "title": "...", "environment": {...stamp...},
     "columns": [{"key": "latency_ms", "header": "latency (ms)", "fmt": ".2f"}, ...],
     "rows": [{...}, ...], "notes": "...", "meta": {...}}

``sparsekernels.benchmarks.readme`` renders the README's results section from these files, so the README tables are
always the files' tables. Plots use matplotlib's non-interactive Agg backend (no display needed).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from ..environment import device_slug, environment_stamp

__all__ = [
    "SCHEMA",
    "SUITE_SCHEMA",
    "Column",
    "ReportFiles",
    "default_results_root",
    "results_dir",
    "format_value",
    "normalize_columns",
    "jsonable",
    "stamp_line",
    "markdown_table",
    "render_markdown",
    "write_report",
    "read_report",
    "plot_lines",
]

SCHEMA = "sparsekernels.report/1"
# A file of several reports (the GPU suite's): {"schema": SUITE_SCHEMA, "sections": [report, ...], ...}
SUITE_SCHEMA = "sparsekernels.suite/1"


@dataclass(frozen=True)
class Column:
    """One table column: ``key`` in each row dict, the ``header`` shown, and a format spec for numbers.

    ``fmt`` is a :func:`format` spec such as ``".2f"`` or ``",d"``; non-numbers are shown with ``str``.
    A missing or ``None`` value is shown as ``–``.
    """

    key: str
    header: str
    fmt: str = ""

    def as_dict(self) -> dict:
        return {"key": self.key, "header": self.header, "fmt": self.fmt}


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by :func:`write_report`."""

    json: Path
    markdown: Path


def default_results_root() -> Path:
    """``benchmarks/results`` of the source tree when running from a checkout, else ``./benchmarks/results``."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "benchmarks").is_dir():
        return repo / "benchmarks" / "results"
    return Path.cwd() / "benchmarks" / "results"


def results_dir(device: torch.device | str = "cpu", root: str | os.PathLike | None = None) -> Path:
    """``<root>/<device_slug(device)>`` (``root`` defaults to :func:`default_results_root`); not created."""
    return (Path(root) if root is not None else default_results_root()) / device_slug(device)


def normalize_columns(columns: Sequence[Column | Mapping | tuple]) -> list[Column]:
    """Columns given as :class:`Column`, dicts (as in a report JSON) or ``(key, header[, fmt])`` tuples."""
    out = []
    for c in columns:
        if isinstance(c, Column):
            out.append(c)
        elif isinstance(c, Mapping):
            out.append(Column(c["key"], c.get("header", c["key"]), c.get("fmt", "")))
        elif isinstance(c, (tuple, list)) and 1 <= len(c) <= 3 and all(isinstance(v, str) for v in c):
            out.append(Column(*c))
        else:
            raise TypeError(f"expected a Column, a dict or a (key, header[, fmt]) tuple, got {c!r}")
    return out


def format_value(value, fmt: str = "") -> str:
    """Format one table cell: ``None``/NaN as ``–``, numbers with ``fmt``, everything else with ``str``."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and math.isnan(value):
        return "–"
    if isinstance(value, (int, float)) and fmt:
        try:
            return format(value, fmt)
        except ValueError:  # e.g. ",d" given a float
            return format(float(value), fmt.replace("d", ".0f"))
    return str(value).replace("|", "\\|")


def markdown_table(rows: Iterable[Mapping], columns: Sequence[Column | Mapping | tuple]) -> str:
    """A GitHub Markdown table of ``rows`` (dicts) with the given columns."""
    cols = normalize_columns(columns)
    lines = ["| " + " | ".join(c.header for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(c.key), c.fmt) for c in cols) + " |")
    return "\n".join(lines)


def stamp_line(env: Mapping) -> str:
    """One line naming the device and versions of a result (used under every table)."""
    parts = [f"device: {env.get('device', '?')}"]
    for key in ("torch", "triton", "cuda", "sparsekernels", "python"):
        if env.get(key):
            parts.append(f"{key} {env[key]}")
    if env.get("date"):
        parts.append(str(env["date"]))
    return " · ".join(parts)


def render_markdown(report: Mapping, *, heading_level: int = 1) -> str:
    """The Markdown page of a report dict (as written by :func:`write_report`)."""
    h = "#" * heading_level
    out = [f"{h} {report.get('title') or report['name']}", "", stamp_line(report.get("environment", {})), ""]
    out.append(markdown_table(report["rows"], report["columns"]))
    if report.get("notes"):
        out += ["", str(report["notes"]).strip()]
    if report.get("plots"):
        out += [""] + [f"![{Path(p).stem}]({p})" for p in report["plots"]]
    return "\n".join(out) + "\n"


def jsonable(value):
    """``value`` with NaN/inf as ``None`` and dtypes, devices and paths as strings (for ``json.dumps``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_report(
    name: str,
    rows: Sequence[Mapping],
    columns: Sequence[Column | Mapping | tuple],
    *,
    out_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    title: str | None = None,
    notes: str = "",
    meta: Mapping | None = None,
    plots: Sequence[str | os.PathLike] = (),
    environment: Mapping | None = None,
) -> ReportFiles:
    """Write ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md``.

    Args:
        name: file stem, letters, digits, ``-`` and ``_`` only.
        rows: one dict per table row (JSON-serialisable values; NaN/inf are written as ``null``).
        columns: the table's columns (:class:`Column` or ``(key, header, fmt)``); the JSON keeps every
            row key, the Markdown shows these.
        out_dir: folder to write to (created); usually :func:`results_dir`.
        device: the device the numbers were measured on (for the environment stamp).
        title, notes, meta: a heading, a paragraph under the table, extra JSON data.
        plots: PNG paths to link from the Markdown (written relative to ``out_dir`` when inside it).
        environment: a stamp to use instead of a fresh ``environment_stamp(device)``.

    Returns:
        :class:`ReportFiles` with both paths.

    Raises:
        ValueError: a bad ``name`` or an empty ``columns``.
        TypeError: a column that is not a Column / dict / tuple.
    """
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"write_report(): expected a file stem of letters, digits, '-' and '_', got {name!r}")
    cols = normalize_columns(columns)
    if not cols:
        raise ValueError("write_report(): expected at least one column, got none")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_refs = []
    for p in plots:
        p = Path(p)
        try:
            plot_refs.append(str(p.resolve().relative_to(out.resolve())))
        except ValueError:
            plot_refs.append(str(p))
    report = {
        "schema": SCHEMA,
        "name": name,
        "title": title or name,
        "environment": dict(environment) if environment is not None else environment_stamp(device),
        "columns": [c.as_dict() for c in cols],
        "rows": [jsonable(dict(r)) for r in rows],
        "notes": notes,
        "plots": plot_refs,
        "meta": jsonable(dict(meta or {})),
    }
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(render_markdown(report))
    return ReportFiles(json_path, md_path)


def read_report(path: str | os.PathLike) -> dict:
    """Load a report JSON written by :func:`write_report`.

    Raises:
        ValueError: the file is not a ``sparsekernels.report/1`` report.
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"read_report(): expected a {SCHEMA} JSON file, got {path} without that schema")
    return data


def plot_lines(
    path: str | os.PathLike,
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
    hline: float | None = None,
    hline_label: str = "",
    subtitle: str = "",
) -> Path:
    """Draw one line per series (``{label: [(x, y), ...]}``) to a PNG with matplotlib's Agg backend.

    Points with a ``None``/NaN ``y`` are dropped. ``hline`` draws a dashed reference line (e.g. 1.0 for a
    speedup plot). Returns the path written.

    Raises:
        ValueError: no series has a plottable point.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    clean = {
        label: sorted((float(x), float(y)) for x, y in pts if y is not None and math.isfinite(float(y)))
        for label, pts in series.items()
    }
    clean = {k: v for k, v in clean.items() if v}
    if not clean:
        raise ValueError(f"plot_lines(): expected at least one series with a finite point for {path}, got none")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    markers = "os^Dv<>pP*X"
    for i, (label, pts) in enumerate(clean.items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker=markers[i % len(markers)], label=label)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1, label=hline_label or None)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
