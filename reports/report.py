"""`memdec report`: lm-eval results folders → NAME.md (the paper's tables), NAME.csv (long form), PNG plots."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pandas as pd

from memdec.core.formats import check_output_file
from reports.load import SkippedFileWarning, find_conflicts, load_results
from reports.plots import lmbda_curve, plot_lmbda, plot_size, size_curve
from reports.tables import (
    ACC_NAMES,
    domain_table,
    general_perplexity_tasks,
    perplexity_table,
    to_markdown,
    zeroshot_table,
)


class ConflictWarning(UserWarning):
    """Duplicate runs disagree (the report lists them)."""


def build_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Title → table for every layout the results can fill (empty layouts are left out)."""
    tables: dict[str, pd.DataFrame] = {}
    for task in general_perplexity_tasks(df):
        tables[f"Perplexity on {task} by base model"] = perplexity_table(df, task)
    tables["Domain perplexity"] = domain_table(df)
    for acc in ("dcpmi", "acc"):
        tables[f"Zero-shot {ACC_NAMES[acc]}"] = zeroshot_table(df, acc)
    return {title: t for title, t in tables.items() if not t.empty}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(paths: list[str | os.PathLike], out: str | os.PathLike, claims: bool = False) -> dict[str, Path]:
    """Write OUT.md, OUT.csv and OUT_lmbda.png / OUT_size.png (when there is something to plot); with `claims`,
    OUT.md also checks the paper's claims (reports/claims.py; the results must follow its layout).

    Returns {"md", "csv", "lmbda_png"?, "size_png"?} → paths. Unusable files are skipped with a
    SkippedFileWarning each (also listed in OUT.md); raises ValueError when no table can be made.
    """
    out = Path(out)
    if out.suffix in (".md", ".csv"):
        out = out.with_suffix("")
    for suffix in (".md", ".csv", "_lmbda.png", "_size.png"):  # every output checked before any work
        check_output_file(out.with_name(out.name + suffix), "--out", make_parent=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedFileWarning)
        df = load_results(paths)
    skipped = [str(w.message) for w in caught if issubclass(w.category, SkippedFileWarning)]
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    where = ", ".join(str(p) for p in paths)
    if df.empty:
        raise ValueError(f"no lm-eval results found in {where}" + (" (see the warnings above)" if skipped else ""))
    claim_lines = None
    if claims:  # before any file is written: a tree without the layout is a one-line error
        from reports.claims import claims_report

        claim_lines = claims_report(paths, df)
    tables = build_tables(df)
    if not tables:
        tasks = ", ".join(dict.fromkeys(df["task"]))
        raise ValueError(f"no table to make from the results in {where}: none of their tasks ({tasks}) has "
                         "a known perplexity or accuracy metric (see reports/tables.py)")

    out.parent.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    lines = [f"# {out.name}", "", f"From {df['file'].nunique()} lm-eval results files below {where}.", ""]
    for title, table in tables.items():
        lines += [f"## {title}", "", to_markdown(table)]
    if claim_lines:
        lines += claim_lines
    conflicts = find_conflicts(df)
    if not conflicts.empty:
        n = len(conflicts.drop_duplicates(["base", "label", "task", "metric", "filter"]))
        warnings.warn(f"{n} results differ between duplicate runs (same method, base model, task and metric); "
                      f"listed under 'Conflicting duplicates' in {out.name}.md", ConflictWarning, stacklevel=2)
        lines += ["## Conflicting duplicates", "",
                  "The same method, base model, task and metric with different values; their cells read "
                  "'conflict'. Rerun or remove one of the files.", "",
                  conflicts[["base", "label", "task", "metric", "value", "file"]].to_markdown(index=False), ""]
    plots = {"lmbda_png": (lmbda_curve(df), plot_lmbda, "_lmbda.png", "Perplexity against lmbda"),
             "size_png": (size_curve(df), plot_size, "_size.png", "Perplexity by base-model size")}
    for key, (curve, plot, suffix, title) in plots.items():
        path = plot(curve, out.with_name(out.name + suffix))
        if path is not None:
            written[key] = path
            lines += [f"## {title}", "", f"![{title}]({path.name})", ""]
    if skipped:
        lines += ["## Skipped files", ""] + [f"- {s}" for s in skipped] + [""]
    written["md"] = out.with_name(out.name + ".md")
    _write_text(written["md"], "\n".join(lines))
    written["csv"] = out.with_name(out.name + ".csv")
    _write_text(written["csv"], df.to_csv(index=False))
    return written
