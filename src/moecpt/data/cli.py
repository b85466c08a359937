"""`moecpt data ...` sub-commands."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command and its sub-commands."""
    parser = subparsers.add_parser("data", help="tokenize corpora into shards, inspect mixtures")
    parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
