"""The `moecpt` command line: one entry point, one sub-command per stage of the pipeline.

Each stage's package owns its sub-commands in its own `cli.py`, exposing `register(subparsers)`; this module
only wires them together (the one place where the layers meet).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from moecpt import __version__
from moecpt.errors import UserError

# Modules that add sub-commands, in the order they appear in `moecpt --help`.
COMMAND_MODULES = (
    "moecpt.data.cli",
    "moecpt.train.cli",
    "moecpt.tools.cli",
    "moecpt.tools.vocab",
    "moecpt.parallel.cli",
    "moecpt.report.cli",
    "moecpt.pipeline.cli",
    "moecpt.eval.cli",
)

OVERRIDE = re.compile(r"^--[A-Za-z_]\w*(\.\w+)+=")


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
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--section.key=value` config overrides are taken out before argparse, which would read a value with a
    # space in it (an inline TOML table) as a positional argument.
    overrides = [a for a in argv if OVERRIDE.match(a)]
    args, extra = parser.parse_known_args([a for a in argv if not OVERRIDE.match(a)])
    overrides += [a for a in extra if re.match(r"^--\w+=", a)]  # top-level keys, e.g. --run_dir=DIR
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and not getattr(args, "accepts_overrides", False)):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    args.overrides = overrides
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
