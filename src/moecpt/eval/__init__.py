"""Evaluation: the Japanese benchmark suite of the Swallow-MX report, GSM8K, and held-out loss.

`moecpt.eval.metrics` holds the metric functions (importable without torch); `moecpt.eval.tasks` reads the
datasets and the protocol files and builds prompts; `moecpt.eval.runner` generates and scores;
`moecpt.eval.heldout` measures bits per byte on held-out documents.
"""
