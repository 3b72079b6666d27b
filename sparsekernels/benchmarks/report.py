"""Report writers: every benchmark result lands as JSON (the data) + Markdown (the table people read) and,
where it helps, PNG plots, under ``benchmarks/results/<device_slug>/``, stamped with
:func:`~sparsekernels.environment.environment_stamp`.

The JSON schema (``"schema": "sparsekernels.report/1"``)::

    {"schema": ..., "name": "demo", "title": "...", "environment": {...stamp...},
     "columns": [{"key": "latency_ms", "header": "latency (ms)", "fmt": ".2f"}, ...],
     "rows": [{...}, ...], "notes": "...", "meta": {...}}

``sparsekernels.benchmarks.readme`` renders the README's results section from these files, so the README tables are
always the files' tables, after each one has been checked against its schema there. Plots use matplotlib's
non-interactive Agg backend (no display needed).

Publishing: nothing here writes a result file in place. Every writer stages its file as a hidden temporary
(``.<name>.<random>.partial``) in the target folder and renames it into place, so a reader never sees half a
file. Inside ``with publishing():`` the files of every writer join one :class:`ResultSet` and are renamed into
place together when the block ends without an error, the JSON files last, with Ctrl-C held back during the
renames; an error or Ctrl-C inside the block deletes the temporaries and leaves every earlier file as it was.
So a JSON report, its Markdown page and its plots are always from the same run.
"""
from __future__ import annotations

import contextlib
import contextvars
import io
import json
import math
import os
import shutil
import signal
import tempfile
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
    "save_figure",
    "ResultSet",
    "publishing",
    "load_result_json",
    "MAX_RESULT_BYTES",
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
    return " ".join(str(value).split("\n")).replace("|", "\\|")


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
        out_dir: folder to write to (created when the files are published); usually :func:`results_dir`.
        device: the device the numbers were measured on (for the environment stamp).
        title, notes, meta: a heading, a paragraph under the table, extra JSON data.
        plots: PNG paths to link from the Markdown (written relative to ``out_dir`` when inside it).
        environment: a stamp to use instead of a fresh ``environment_stamp(device)``.

    Returns:
        :class:`ReportFiles` with both paths (published on return, or when the enclosing :func:`publishing`
        block ends).

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
    with publishing() as results:
        results.write_text(md_path, render_markdown(report))
        results.write_text(json_path, json.dumps(report, indent=2) + "\n")
    return ReportFiles(json_path, md_path)


def read_report(path: str | os.PathLike) -> dict:
    """Load a report JSON written by :func:`write_report` (the README generator checks every field:
    :func:`sparsekernels.benchmarks.readme.check_report`).

    Raises:
        ValueError: the file is too large, not JSON, or not a ``sparsekernels.report/1`` report.
    """
    data = load_result_json(path)
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
    save_figure(fig, path)
    return path


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Render a matplotlib figure as PNG and write it to ``path`` like every result file (staged, published with
    its set); closes the figure."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    _stage(Path(path), buffer.getvalue())
    return Path(path)


# ----------------------------------------------------------------------------------------------------
# Publishing: temporaries in the target folder, renamed into place together


def _file_mode(path: Path) -> int:
    """The permission bits a new file at ``path`` gets: the file's own if it exists, else what the umask allows
    (temporary files start private)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


class ResultSet:
    """Files staged to be published together (see the module docstring); made by :func:`publishing`."""

    def __init__(self):
        self._staged: dict[Path, Path] = {}  # final path -> its temporary

    def write_bytes(self, path: str | os.PathLike, data: bytes) -> Path:
        """Stage ``data`` for ``path`` (its folder is created); returns ``path``. Staging the same path again
        replaces the earlier data."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                os.chmod(tmp, _file_mode(path))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        old = self._staged.pop(path, None)
        if old is not None:
            old.unlink(missing_ok=True)
        self._staged[path] = Path(tmp)
        return path

    def write_text(self, path: str | os.PathLike, text: str) -> Path:
        """Stage ``text`` (UTF-8) for ``path``; returns ``path``."""
        return self.write_bytes(path, text.encode("utf-8"))

    @property
    def paths(self) -> list[Path]:
        """The final paths staged so far."""
        return list(self._staged)

    def publish(self) -> list[Path]:
        """Rename every staged file into place (JSON files last), with SIGINT held back meanwhile; returns the
        paths. If a rename fails, the files already renamed are put back as they were (the earlier version, kept
        as a hard link until the set is in place, or no file), the temporaries are deleted, and the error raised.
        """
        order = sorted(self._staged, key=lambda p: p.suffix == ".json")
        blocked = hasattr(signal, "pthread_sigmask")
        if blocked:
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        earlier: dict[Path, Path] = {}  # final path -> the file it replaces, kept until the set is in place
        renamed: list[Path] = []
        try:
            for path in order:
                if path.exists():
                    link = self._staged[path].with_suffix(".earlier.partial")
                    try:
                        os.link(path, link)
                    except OSError:  # a file system without hard links
                        shutil.copy2(path, link)
                    earlier[path] = link
                os.replace(self._staged[path], path)
                renamed.append(path)
        except BaseException:
            for path in renamed:
                if path in earlier:
                    os.replace(earlier[path], path)
                else:
                    path.unlink(missing_ok=True)
            raise
        finally:
            for link in earlier.values():
                link.unlink(missing_ok=True)
            if blocked:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            self.discard()
        return order

    def discard(self) -> None:
        """Delete every temporary not yet published."""
        for tmp in self._staged.values():
            tmp.unlink(missing_ok=True)
        self._staged.clear()


_ACTIVE: contextvars.ContextVar[ResultSet | None] = contextvars.ContextVar("sparsekernels_result_set", default=None)


@contextlib.contextmanager
def publishing():
    """Publish every result file written in the block together, or none of them (see the module docstring).

    Nested blocks join the outermost one. Yields the :class:`ResultSet`.
    """
    outer = _ACTIVE.get()
    if outer is not None:
        yield outer
        return
    results = ResultSet()
    token = _ACTIVE.set(results)
    try:
        yield results
        results.publish()
    finally:
        results.discard()  # whatever was not published: after an error, all of it
        _ACTIVE.reset(token)


def _stage(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through the active result set, or alone (atomically) when there is none."""
    with publishing() as results:
        results.write_bytes(path, data)


# ----------------------------------------------------------------------------------------------------
# Reading result files

# A results file larger than this is refused unread (the largest committed one is about 50 KB).
MAX_RESULT_BYTES = 16 << 20


def load_result_json(path: str | os.PathLike):
    """Parse a results file, refusing one over :data:`MAX_RESULT_BYTES`, not UTF-8, not JSON, or nested too deep.

    Raises:
        ValueError: ``<path>: file: <what is wrong>``.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_RESULT_BYTES:
        raise ValueError(f"{path}: file: {size:,} bytes, more than the {MAX_RESULT_BYTES:,} a results file may have")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: file: not valid JSON ({type(e).__name__}: {' '.join(str(e).split())[:200]})") \
            from None
