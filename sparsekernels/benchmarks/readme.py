"""Regenerate the README's results section from ``benchmarks/results/`` so its tables always match the files.

Run from the repository root::

    python -m sparsekernels.benchmarks.readme            # rewrite the section between the markers
    python -m sparsekernels.benchmarks.readme --check    # exit 1 if the README is out of date

Only the text between ``<!-- results:start -->`` and ``<!-- results:end -->`` is touched, and only after every
results file has passed its schema check (a bad file is one error naming it; the README is left alone). Every headline
result (:data:`HEADLINE`: a ``sparsekernels.report/1`` JSON, or each section of the GPU suite's
``sparsekernels.suite/1`` JSON) becomes a table with the file it came from and the device and versions that
produced it; every other result file is listed as a link with its title.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

__all__ = ["START", "END", "HEADLINE", "check_report", "check_suite", "render_results_section", "update_readme", "main"]

START = "<!-- results:start -->"
END = "<!-- results:end -->"

# The headline results, shown as tables in this order; every other result file (design studies, quick
# smoke runs, other formats) is listed as a link with its title, to keep the README readable.
HEADLINE = (
    "demo",
    "gpu_suite",
    "models_resnet50",
    "models_bert",
    "models_llama",
    "models_resnet50_quick",
    "models_bert_quick",
    "models_llama_quick",
    "channel_latency",
    "pruning_quality",
    "llm_scaling",
    "kernels_linear24",
    "linear24",
    "cpu_memory",
    "layers",
)
_ORDER = HEADLINE


def _rank(stem: str) -> tuple:
    return (_ORDER.index(stem) if stem in _ORDER else len(_ORDER), stem)


def _device_rank(folder: str) -> tuple:
    return (0 if folder == "cpu" else 1, folder)


# ----------------------------------------------------------------------------------------------------
# The schema check of every file the README is made from

_FORMAT_SPEC = re.compile(r"(?:.?[<>=^])?[+\- ]?z?#?0?\d{0,2}[,_]?(?:\.\d{1,2})?[bcdeEfFgGnosxX%]?")
_PLOT_REF = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,120}\.png")
_SCALARS = (str, int, float, bool, type(None))


class _BadResult(ValueError):
    def __init__(self, source, entry: str, problem: str):
        super().__init__(f"{source}: {entry}: {problem}")


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _line(source, entry: str, value, *, limit: int = 500, empty: bool = True) -> str:
    if not isinstance(value, str) or len(value) > limit or "\n" in value or (not value and not empty):
        raise _BadResult(source, entry, f"expected a one-line string of at most {limit} characters, got "
                         f"{_type_name(value) if not isinstance(value, str) else repr(value[:60])}")
    return value


def _check_section(source, data, entry: str, *, folder: Path | None) -> None:
    for key in ("name", "title", "columns", "rows"):
        if key not in data:
            raise _BadResult(source, f"{entry}{key}", "missing")
    name = data["name"]
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_" for c in name):
        raise _BadResult(source, f"{entry}name",
                         f"expected a file stem (letters, digits, '-', '_'), got {name!r}"[:200])
    _line(source, f"{entry}title", data["title"])
    notes = data.get("notes", "")
    if not isinstance(notes, str) or len(notes) > 20_000:
        raise _BadResult(source, f"{entry}notes", f"expected a string of at most 20,000 characters, got "
                         f"{_type_name(notes) if not isinstance(notes, str) else f'{len(notes):,} characters'}")
    env = data.get("environment", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, _SCALARS) for k, v in env.items()):
        raise _BadResult(source, f"{entry}environment", "expected an object of strings, numbers, booleans or nulls")
    for key in ("device", "torch", "triton", "cuda", "sparsekernels", "python", "date"):
        if env.get(key) is not None:
            _line(source, f"{entry}environment.{key}", str(env[key]), limit=300)
    columns = data["columns"]
    if not isinstance(columns, list) or not 1 <= len(columns) <= 64:
        raise _BadResult(source, f"{entry}columns", f"expected a list of 1 to 64 columns, got {_type_name(columns)}")
    for i, c in enumerate(columns):
        if not isinstance(c, dict) or set(c) - {"key", "header", "fmt"} or "key" not in c:
            raise _BadResult(source, f"{entry}columns[{i}]", 'expected {"key", "header", "fmt"}')
        _line(source, f"{entry}columns[{i}].key", c["key"], limit=200, empty=False)
        _line(source, f"{entry}columns[{i}].header", c.get("header", c["key"]), limit=200)
        fmt = c.get("fmt", "")
        if not isinstance(fmt, str) or not _FORMAT_SPEC.fullmatch(fmt):
            raise _BadResult(source, f"{entry}columns[{i}].fmt", f"expected a number format such as '.2f' or ',d', "
                             f"got {fmt!r}"[:200])
    rows = data["rows"]
    if not isinstance(rows, list) or len(rows) > 100_000:
        raise _BadResult(source, f"{entry}rows", f"expected a list of at most 100,000 rows, got {_type_name(rows)}")
    keys = [c["key"] for c in columns]
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise _BadResult(source, f"{entry}rows[{i}]", f"expected an object, got {_type_name(row)}")
        for key in keys:
            if not isinstance(row.get(key), _SCALARS):
                raise _BadResult(source, f"{entry}rows[{i}].{key}", f"expected a string, number, boolean or null, got "
                                 f"{_type_name(row[key])}")
    if not isinstance(data.get("meta", {}), dict):
        raise _BadResult(source, f"{entry}meta", f"expected an object, got {_type_name(data['meta'])}")
    plots = data.get("plots", [])
    if not isinstance(plots, list):
        raise _BadResult(source, f"{entry}plots", f"expected a list of PNG file names, got {_type_name(plots)}")
    for i, p in enumerate(plots):
        if not isinstance(p, str) or not _PLOT_REF.fullmatch(p):
            raise _BadResult(source, f"{entry}plots[{i}]", f"expected a PNG file name beside the report, got "
                             f"{p!r}"[:200])
        if folder is not None and not (folder / p).is_file():
            raise _BadResult(source, f"{entry}plots[{i}]", f"names {p!r}, which is not in {folder}")


def check_report(data, source: str | os.PathLike = "report", *, folder: str | os.PathLike | None = None) -> dict:
    """Check a ``sparsekernels.report/1`` dict (as :func:`write_report` writes it) before it is rendered.

    Args:
        data: the parsed JSON.
        source: how the error names the file.
        folder: where the report's plots must exist (``None``: not checked).

    Returns:
        ``data``.

    Raises:
        ValueError: ``<source>: <entry>: <what is wrong>`` -- a missing or mistyped field, a column format that is
            not a number format, a displayed cell that is not a scalar, a multi-line title, a plot that is not a
            PNG file name beside the report (or is missing from ``folder``).
    """
    from .report import SCHEMA

    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        got = data.get("schema") if isinstance(data, dict) else _type_name(data)
        raise _BadResult(source, "schema", f"expected {SCHEMA!r}, got {got!r}"[:200])
    _check_section(source, data, "", folder=Path(folder) if folder is not None else None)
    return data


def check_suite(data, source: str | os.PathLike = "suite", *, folder: str | os.PathLike | None = None) -> dict:
    """Check a ``sparsekernels.suite/1`` dict (the GPU suite's file: ``sections`` of reports).

    Raises:
        ValueError: as :func:`check_report`, naming the section.
    """
    from .report import SUITE_SCHEMA

    if not isinstance(data, dict) or data.get("schema") != SUITE_SCHEMA:
        got = data.get("schema") if isinstance(data, dict) else _type_name(data)
        raise _BadResult(source, "schema", f"expected {SUITE_SCHEMA!r}, got {got!r}"[:200])
    _line(source, "title", data.get("title", ""))
    for key in ("ran", "skipped"):
        table = data.get(key, {})
        if not isinstance(table, dict) or not all(isinstance(v, (str, int, float)) for v in table.values()):
            raise _BadResult(source, key, "expected an object of strings or numbers")
    for key, value in data.get("skipped", {}).items():
        _line(source, f"skipped[{key[:40]!r}]", f"{key}: {value}", limit=2000)
    sections = data.get("sections")
    if not isinstance(sections, list) or len(sections) > 1000:
        raise _BadResult(source, "sections", f"expected a list of reports, got {_type_name(sections)}")
    for i, section in enumerate(sections):
        if not isinstance(section, dict):
            raise _BadResult(source, f"sections[{i}]", f"expected an object, got {_type_name(section)}")
        _check_section(source, {**section, "plots": []}, f"sections[{i}].", folder=None)
    fake = {"name": "suite", "title": "", "columns": [{"key": "k"}], "rows": [], "plots": data.get("plots", [])}
    _check_section(source, fake, "", folder=Path(folder) if folder is not None else None)
    return data


def _load(path: Path) -> dict:
    """One results file, checked: a report or a suite against its schema, or a result in its own format (no
    ``schema``: listed as a link, or shown from its Markdown page when it is a headline result).

    Raises:
        ValueError: ``<file>: <entry>: <what is wrong>`` for a file the README cannot be made from.
    """
    from .report import SCHEMA, SUITE_SCHEMA, load_result_json

    data = load_result_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: file: expected a JSON object, got {type(data).__name__}")
    schema = data.get("schema")
    if schema == SCHEMA:
        return check_report(data, path, folder=path.parent)
    if schema == SUITE_SCHEMA:
        return check_suite(data, path, folder=path.parent)
    if schema is not None:
        raise ValueError(f"{path}: schema: expected {SCHEMA!r}, {SUITE_SCHEMA!r} or none, got {schema!r}"[:300])
    if path.stem in HEADLINE and not path.with_suffix(".md").is_file():
        raise ValueError(f"{path}: schema: a headline result without a schema is shown from its Markdown page, "
                         f"and {path.with_suffix('.md').name} is not beside it")
    title = data.get("title")
    if title is not None and (not isinstance(title, str) or "\n" in title or len(title) > 500):
        raise ValueError(f"{path}: title: expected a one-line string of at most 500 characters")
    return data


def _demote(markdown: str, folder: Path, repo: Path) -> str:
    """Push every heading of a result's own Markdown page below the README's (``#`` -> ``####``) and make its
    relative image / file links relative to the repository root."""
    import re

    prefix = folder.relative_to(repo).as_posix() + "/" if folder.is_relative_to(repo) else ""
    out = []
    for line in markdown.strip().splitlines():
        if line.startswith("#"):
            line = "###" + line
        line = re.sub(r"\]\((?!https?://|/|#)([^)]+)\)", lambda m: f"]({prefix}{m.group(1)})", line)
        out.append(line)
    return "\n".join(out)


def render_results_section(results_root: str | os.PathLike, repo_root: str | os.PathLike) -> str:
    """Markdown for the README's results section from every result file under ``results_root``.

    Args:
        results_root: usually ``<repo>/benchmarks/results``.
        repo_root: paths in the text are written relative to it.

    Raises:
        ValueError: a results file that is not valid (see :func:`check_report`);
            the message names the file and the entry.
    """
    from .report import SUITE_SCHEMA, markdown_table, stamp_line

    root, repo = Path(results_root), Path(repo_root)
    out = ["Generated by `python -m sparsekernels.benchmarks.readme` from the files under `benchmarks/results/` "
           "(re-run a benchmark, then that command). Each table names its source file and the device and "
           "versions that produced it."]
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: _device_rank(p.name)) if root.is_dir() else []
    if not folders:
        return "\n".join(out + ["", "(no results yet)"])
    for folder in folders:
        tables, others = [], []
        for path in sorted(folder.glob("*.json"), key=lambda p: _rank(p.stem)):
            data = _load(path)
            rel = path.relative_to(repo).as_posix() if path.is_relative_to(repo) else path.as_posix()
            md = path.with_suffix(".md")
            if path.stem in HEADLINE and data.get("schema") is None:
                # a headline result in its own format: its Markdown page, headings demoted under ours
                page = _demote(md.read_text(), folder, repo).split("\n", 1)
                source = f"Source: `{rel}` (and `{md.name}`)"
                if page[0].startswith("#"):  # the source goes under the page's title, like every other table
                    tables.append(f"{page[0]}\n\n{source}\n" + (page[1] if len(page) > 1 else ""))
                else:
                    tables.append(f"{source}\n\n" + "\n".join(page))
                continue
            superseded = path.stem.endswith("_quick") and (folder / f"{path.stem[:-len('_quick')]}.json").is_file()
            if data.get("schema") is None or path.stem not in HEADLINE or superseded:
                # a quick smoke run beside its full-size result: a link only
                others.append((rel, data.get("title")))
                continue
            env = data.get("environment", {})
            sections = data["sections"] if data.get("schema") == SUITE_SCHEMA else [data]
            if data.get("schema") == SUITE_SCHEMA:
                skipped = "; ".join(f"{k}: {v}" for k, v in data.get("skipped", {}).items())
                tables.append(f"#### {data.get('title', path.stem)}\n\nSource: `{rel}` · {stamp_line(env)}"
                              + (f"\n\nNot run: {skipped}" if skipped else ""))
            for s in sections:
                if not s.get("rows"):
                    continue
                block = [f"#### {s.get('title') or s.get('name')}", "",
                         f"Source: `{rel}` · {stamp_line(s.get('environment', env))}", "",
                         markdown_table(s["rows"], s["columns"])]
                if s.get("notes"):
                    block += ["", str(s["notes"]).strip()]
                for p in data.get("plots", []) if s is data else []:
                    block += ["", f"![{Path(p).stem}]({(folder / p).relative_to(repo).as_posix() if folder.is_relative_to(repo) else p})"]
                tables.append("\n".join(block))
        if not tables and not others:
            continue
        out += ["", f"### `{folder.name}`"]
        for t in tables:
            out += ["", t]
        if others:
            out += ["", "More results:", ""]
            out += [f"- [`{Path(o).name}`]({o})" + (f": {t}" if t else "") for o, t in others]
    return "\n".join(out)


def update_readme(readme: str | os.PathLike, results_root: str | os.PathLike, *, check: bool = False) -> bool:
    """Replace the README's results section; returns True if the file's text changed (or would, with ``check``).

    Raises:
        ValueError: the README lacks the start / end markers, or they are out of order.
    """
    readme = Path(readme)
    text = readme.read_text()
    i, j = text.find(START), text.find(END)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"update_readme(): expected {START} ... {END} in {readme}, got "
                         f"{'none' if i < 0 and j < 0 else 'only one or out of order'}")
    section = render_results_section(results_root, readme.parent)
    new = text[: i + len(START)] + "\n" + section + "\n" + text[j:]
    changed = new != text
    if changed and not check:
        from .report import publishing

        with publishing() as results:
            results.write_text(readme, new)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsekernels.benchmarks.readme",
                                     description="Regenerate the README results section from benchmarks/results/.")
    parser.add_argument("--readme", default=None, help="README path (default: the repository's README.md)")
    parser.add_argument("--results", default=None, help="results root (default: benchmarks/results next to it)")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if the README is out of date")
    args = parser.parse_args(argv)
    readme = Path(args.readme) if args.readme else Path(__file__).resolve().parents[2] / "README.md"
    results = Path(args.results) if args.results else readme.parent / "benchmarks" / "results"
    try:
        changed = update_readme(readme, results, check=args.check)
    except (OSError, ValueError) as e:  # a bad results file: one line naming it, nothing rewritten
        print(f"{parser.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{readme}: {'out of date' if changed else 'up to date'}")
        return 1 if changed else 0
    print(f"{readme}: {'updated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
