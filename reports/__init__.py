"""Comparison tables and plots from lm-eval results (issue 6): a Python API returning DataFrames.

    import reports
    df = reports.load_results(["runs/eval"])      # long form: one row per run x task x metric
    reports.perplexity_table(df)                  # layout (1): methods x base models
    reports.domain_table(df)                      # layout (2): Bio / Fin / Law / Avg
    reports.zeroshot_table(df, "dcpmi")           # layout (3): nine tasks + Avg
    reports.find_conflicts(df), reports.lmbda_curve(df), reports.size_curve(df)
    reports.write_report(["runs/eval"], "reports/NAME")   # what `memdec report` does
"""

from reports.load import SkippedFileWarning, find_conflicts, load_results
from reports.plots import lmbda_curve, plot_lmbda, plot_size, size_curve
from reports.report import build_tables, write_report
from reports.tables import domain_table, perplexity_table, to_markdown, zeroshot_table

__all__ = [
    "SkippedFileWarning", "build_tables", "domain_table", "find_conflicts", "lmbda_curve", "load_results",
    "perplexity_table", "plot_lmbda", "plot_size", "size_curve", "to_markdown", "write_report", "zeroshot_table",
]
