"""Plain-text tables for the reports the library prints (swap reports, dispatch explanations)."""
from __future__ import annotations

__all__ = ["format_table"]


def format_table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    """Rows under a header, columns padded to their widest cell, two spaces of indent; one string per line."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = ["  " + fmt.format(*header).rstrip(), "  " + "  ".join("-" * w for w in widths)]
    out += ["  " + fmt.format(*map(str, r)).rstrip() for r in rows]
    return out
