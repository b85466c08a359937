"""`moecpt eval`: run the benchmark suite on a model directory and write results.json and results.md."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` command."""
    parser = subparsers.add_parser("eval", help="evaluate a model on the Swallow-MX benchmark suite")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from moecpt.errors import UserError

    raise UserError("moecpt eval is not implemented yet")
