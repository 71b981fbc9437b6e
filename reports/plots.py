"""Plot data (DataFrames) and PNG plots: perplexity against lmbda, perplexity by base-model size.

Plots use matplotlib's object API (`Figure`, rendered by the Agg canvas), so no display or pyplot
state is needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from reports.load import dedupe, iter_tasks, method_labels
from reports.tables import (
    DOMAIN_TASKS,
    PPL_METRICS,
    _row_order,
    general_perplexity_tasks,
    match_task,
    pick_metric,
)

SERIES_ARGS = ("memory", "datastore", "k", "temperature", "corpus", "peft")


def _ppl_tasks(df: pd.DataFrame) -> list[str]:
    general, tasks = general_perplexity_tasks(df), iter_tasks(df)
    domain = [t for a in DOMAIN_TASKS.values() if (t := match_task(tasks, a))]
    return general + [t for t in domain if t not in general]


def _ppl_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Deduplicated rows of each perplexity task's headline metric."""
    if df.empty:
        return df
    df = dedupe(df)
    parts = []
    for task in _ppl_tasks(df):
        metric = pick_metric(df, [task], PPL_METRICS)
        part = df[(df["task"] == task) & (df["metric"] == metric)]
        if "none" in set(part["filter"]):
            part = part[part["filter"] == "none"]
        parts.append(part)
    return pd.concat(parts, ignore_index=True) if parts else df.iloc[0:0]


def lmbda_curve(df: pd.DataFrame) -> pd.DataFrame:
    """Perplexity against lmbda, for each (task, base, method, memory/datastore...) run at 2+ lmbda values.

    Columns: task, metric, base, series, lmbda, value (sorted by lmbda).
    """
    rows = _ppl_rows(df)
    cols = ["task", "metric", "base", "series", "lmbda", "value"]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    rows = rows[rows["lmbda"].notna()].copy()

    labels = method_labels()

    def series(r: pd.Series) -> str:
        extra = ", ".join(f"{a}={os.path.basename(str(r[a]).rstrip('/'))}" for a in SERIES_ARGS
                          if r[a] is not None and r[a] == r[a])
        name = f"{r['base']} {labels.get(r['method'], r['method'])}"
        return f"{name} ({extra})" if extra else name

    if rows.empty:
        return pd.DataFrame(columns=cols)
    rows["series"] = rows.apply(series, axis=1)
    keep = rows.groupby(["task", "series"])["lmbda"].transform("nunique") >= 2
    out = rows[keep][cols].drop_duplicates(["task", "series", "lmbda"]).copy()
    out["_t"] = out["task"].map({t: i for i, t in enumerate(_ppl_tasks(df))})
    return out.sort_values(["_t", "series", "lmbda"]).drop(columns="_t").reset_index(drop=True)


def size_curve(df: pd.DataFrame) -> pd.DataFrame:
    """Perplexity by base-model size, one series per method label, for tasks run on 2+ base models.

    Size is the base run's `model_num_parameters` (else the smallest of that base's runs); when no
    run of a base records it, bases are placed in order of appearance (`size` NaN, `position` set).
    Columns: task, metric, label, base, size, position, value.
    """
    rows = _ppl_rows(df)
    cols = ["task", "metric", "label", "base", "size", "position", "value"]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    sizes: dict[str, float] = {}
    for base, part in rows.groupby("base", sort=False):
        n = part.loc[part["method"] == "base", "n_params"].dropna()
        n = n if len(n) else part["n_params"].dropna()
        sizes[base] = float(n.min()) if len(n) else float("nan")
    known = all(v == v for v in sizes.values())
    order = sorted(sizes, key=lambda b: sizes[b]) if known else list(sizes)
    rows = rows.copy()
    rows["size"] = rows["base"].map(sizes)
    rows["position"] = rows["base"].map({b: i for i, b in enumerate(order)})
    keep = rows.groupby("task")["base"].transform("nunique") >= 2
    out = rows[keep][cols].copy()
    task_order = {t: i for i, t in enumerate(_ppl_tasks(df))}
    label_order = {lab: i for i, lab in enumerate(_row_order(list(out["label"])))}
    out["_t"], out["_l"] = out["task"].map(task_order), out["label"].map(label_order)
    return out.sort_values(["_t", "_l", "position"]).drop(columns=["_t", "_l"]).reset_index(drop=True)


def _axes_grid(n: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * n, 4.2), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    return fig, axes


def plot_lmbda(curve: pd.DataFrame, path: str | os.PathLike) -> Path | None:
    """PNG of perplexity against lmbda (one panel per task); None if `curve` is empty."""
    if curve.empty:
        return None
    tasks = list(dict.fromkeys(curve["task"]))
    fig, axes = _axes_grid(len(tasks))
    for ax, task in zip(axes, tasks, strict=True):
        part = curve[curve["task"] == task]
        for name, s in part.groupby("series", sort=False):
            ax.plot(s["lmbda"], s["value"], marker="o", label=name)
        ax.set_title(task)
        ax.set_xlabel("lmbda (weight of the memory)")
        ax.set_ylabel(str(part["metric"].iloc[0]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_size(curve: pd.DataFrame, path: str | os.PathLike) -> Path | None:
    """PNG of perplexity by base-model size per method (one panel per task); None if `curve` is empty."""
    if curve.empty:
        return None
    tasks = list(dict.fromkeys(curve["task"]))
    fig, axes = _axes_grid(len(tasks))
    by_size = curve["size"].notna().all()
    for ax, task in zip(axes, tasks, strict=True):
        part = curve[curve["task"] == task]
        x = "size" if by_size else "position"
        for label, s in part.groupby("label", sort=False):
            ax.plot(s[x], s["value"], marker="o", label=label)
        bases = part.drop_duplicates("base").sort_values(x)
        if by_size:
            ax.set_xscale("log")  # before the ticks: a new scale replaces them
            ax.minorticks_off()
        ax.set_xticks(list(bases[x]), list(bases["base"]), rotation=20, fontsize=8)
        ax.set_title(task)
        ax.set_xlabel("base model (by parameter count)" if by_size else "base model (order of appearance)")
        ax.set_ylabel(str(part["metric"].iloc[0]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return Path(path)
