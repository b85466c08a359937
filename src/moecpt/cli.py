"""The `moecpt` command line: one entry point, one sub-command per stage of the pipeline.

Each stage's package owns its sub-commands in its own `cli.py`, exposing `register(subparsers)`; this module
only wires them together (the one place where the layers meet).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from moecpt import __version__
from moecpt.errors import UserError

# Modules that add sub-commands, in the order they appear in `moecpt --help`.
COMMAND_MODULES = (
    "moecpt.data.cli",
    "moecpt.train.cli",
    "moecpt.parallel.cli",
    "moecpt.report.cli",
    "moecpt.eval.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moecpt",
        description="Continual pre-training of Mixture-of-Experts language models.",
    )
    parser.add_argument("--version", action="version", version=f"moecpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Only commands that take `--section.key=value` config overrides accept arguments argparse does not know.
        bad = [a for a in extra if not (getattr(args, "accepts_overrides", False) and a.startswith("--") and "=" in a)]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"moecpt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
