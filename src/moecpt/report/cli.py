"""`moecpt plot RUN_DIR`."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("plot", help="draw the figures of a training run",
                              description="Draw PNG figures (training loss, load-balancing loss, LR schedule, "
                                          "validation loss per corpus, expert load) from RUN_DIR/metrics.jsonl.")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output directory (default RUN_DIR/plots)")
    p.set_defaults(func=_plot)

    r = subparsers.add_parser("report", help="(re)write the report of a `moecpt run` study",
                              description="Write RUN_DIR/report.md, RUN_DIR/figures/ and RUN_DIR/summary.json "
                                          "from a run directory of `moecpt run`.")
    r.add_argument("run_dir")
    r.set_defaults(func=_report)


def _plot(args: argparse.Namespace) -> int:
    from moecpt.report.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def _report(args: argparse.Namespace) -> int:
    from moecpt.report.report import write_report

    print(write_report(args.run_dir))
    return 0
