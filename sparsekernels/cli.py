"""The ``sparsekernels`` command line. Run ``sparsekernels --help`` (or ``python -m sparsekernels``)."""
from __future__ import annotations

import argparse
import sys

from ._version import __version__


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sparsekernels",
        description="Sparse inference for PyTorch: prune, swap to sparse kernels, measure.",
    )
    parser.add_argument("--version", action="version", version=f"sparsekernels {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
