"""`python -m moecpt.train --config FILE [--section.key=value ...]` (what torchrun launches)."""

import sys

from moecpt.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
