"""The paper's three table layouts as DataFrames (from `load_results`), and their markdown rendering.

Task and metric names are mapped through the small tables below (TASK_COLUMNS, PPL_METRICS,
ACC_METRICS), so a renamed task or metric is one line here. A cell with no result is NaN in the
DataFrame and a dash in markdown; a cell whose duplicate runs disagree is NaN too, listed in
`table.attrs["conflicts"]` and shown as "conflict" (see `reports.load.find_conflicts`).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from reports.load import dedupe, find_conflicts, iter_tasks, method_labels

# metric names, in order of preference: the first one a task has is the one shown
PPL_METRICS = ("token_perplexity", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
ACC_METRICS = {
    "dcpmi": ("acc_dcpmi", "dcpmi_acc", "acc_dc_pmi", "acc_pmi", "dcpmi"),
    "acc": ("acc",),
}
ACC_NAMES = {"dcpmi": "DC-PMI accuracy", "acc": "accuracy"}

# column label -> task names (compared after dropping a "memdec_" prefix and a "_ppl" suffix)
GENERAL_TASKS = {"WikiText-103": ("wikitext103", "wikitext")}
DOMAIN_TASKS = {"Bio": ("bio", "biomed", "biomedicine"), "Fin": ("finance", "fin"), "Law": ("law", "legal")}
ZEROSHOT_TASKS = {
    "SST2": ("sst2", "sst-2"), "MR": ("mr",), "CR": ("cr",), "RT": ("rt",), "HYP": ("hyp", "hyperpartisan"),
    "CB": ("cb",), "RTE": ("rte",), "AGN": ("agnews", "ag_news", "agn"), "Yahoo": ("yahoo", "yahoo_answers"),
}
DASH = "–"
CONFLICT = "conflict"


def canon(task: str) -> str:
    """'memdec_bio_ppl' → 'bio': the name compared against the task tables."""
    t = str(task).lower()
    t = t.removeprefix("memdec_")
    return t.removesuffix("_ppl")


def match_task(tasks: list[str], aliases: tuple[str, ...]) -> str | None:
    """The first task (in alias order) whose canonical name is one of `aliases`."""
    for alias in aliases:
        for t in tasks:
            if canon(t) == alias:
                return t
    return None


def pick_metric(df: pd.DataFrame, tasks: list[str], candidates: tuple[str, ...]) -> str | None:
    """The first of `candidates` that any of `tasks` reports."""
    have = set(df.loc[df["task"].isin(tasks), "metric"])
    return next((m for m in candidates if m in have), None)


def _row_order(labels: list[str]) -> list[str]:
    """Method rows in the paper's order (base, +In-Context RAG, ... +MemDec), then other labels."""
    order = {label: i for i, label in enumerate(method_labels().values())}

    def key(label: str) -> tuple[int, str]:
        head = label.split(" (")[0]
        return (order.get(head, len(order)), label)

    return sorted(dict.fromkeys(labels), key=key)


def _select(df: pd.DataFrame, columns: dict[str, str], metric: str) -> pd.DataFrame:
    """Long rows of `metric` for the tasks in `columns` (column label → task), with a 'column' field."""
    task_to_col = {t: c for c, t in columns.items()}
    part = df[df["task"].isin(task_to_col) & (df["metric"] == metric)].copy()
    if "none" in set(part["filter"]):
        part = part[part["filter"] == "none"]
    part["column"] = part["task"].map(task_to_col)
    return part


def _conflict_cells(df: pd.DataFrame, columns: dict[str, str], metric: str, index: list[str]) -> set[tuple]:
    conf = _select(find_conflicts(df), columns, metric)
    return {(*tuple(r[i] for i in index), r["column"]) for _, r in conf.iterrows()}


def _finish(table: pd.DataFrame, **attrs: Any) -> pd.DataFrame:
    table.columns.name = None
    table.attrs.update(attrs)
    return table


def _meta(part: pd.DataFrame) -> dict[str, Any]:
    hib = part["higher_is_better"].dropna()
    return {
        "higher_is_better": bool(hib.iloc[0]) if len(hib) else None,
        "windows": sorted({(w, s) for w, s in zip(part["window"], part["stride"], strict=True)
                           if w is not None and w == w}),
        "lmbda": {(b, lab): v for b, lab, v in zip(part["base"], part["label"], part["lmbda"], strict=True)
                  if v is not None and v == v},
    }


def perplexity_table(df: pd.DataFrame, task: str | None = None) -> pd.DataFrame:
    """Layout (1): rows = methods, columns = base models, values = perplexity on one task.

    `task` defaults to the WikiText-103 task (GENERAL_TASKS). Empty frame if the task is absent.
    """
    tasks = iter_tasks(df)
    task = task or match_task(tasks, GENERAL_TASKS["WikiText-103"])
    metric = pick_metric(df, [task], PPL_METRICS) if task else None
    if metric is None:
        return pd.DataFrame()
    columns = {task: task}
    part = _select(dedupe(df), columns, metric)
    bases = list(dict.fromkeys(part["base"]))
    table = part.pivot_table(index="label", columns="base", values="value", aggfunc="first", dropna=False)
    table = table.reindex(index=_row_order(list(part["label"])), columns=bases)
    conflicts = {(lab, b) for b, lab, _ in _conflict_cells(df, columns, metric, ["base", "label"])}
    return _finish(table, kind="perplexity", task=task, tasks=[task], metric=metric, conflicts=conflicts,
                   grouped=False, **_meta(part))


def _grouped_table(df: pd.DataFrame, columns: dict[str, str], metric: str, kind: str, avg: bool,
                   scale: float = 1.0) -> pd.DataFrame:
    part = _select(dedupe(df), columns, metric)
    part["value"] = part["value"] * scale
    rows = []
    for base in dict.fromkeys(part["base"]):
        labels = _row_order(list(part.loc[part["base"] == base, "label"]))
        rows += [(base, lab) for lab in labels]
    table = part.pivot_table(index=["base", "label"], columns="column", values="value", aggfunc="first",
                             dropna=False)
    table = table.reindex(index=pd.MultiIndex.from_tuples(rows, names=["base", "label"]),
                          columns=list(columns))
    if avg:
        # the average only over complete rows: a partial average would not be comparable
        table["Avg"] = table[list(columns)].mean(axis=1, skipna=False)
    conflicts = _conflict_cells(df, columns, metric, ["base", "label"])
    return _finish(table, kind=kind, tasks=list(columns.values()), metric=metric, conflicts=conflicts,
                   grouped=True, scale=scale, **_meta(part))


def domain_table(df: pd.DataFrame) -> pd.DataFrame:
    """Layout (2): rows = (base, method), columns = Bio, Fin, Law, Avg (perplexity). Empty if no domain task."""
    tasks = iter_tasks(df)
    columns = {c: t for c, aliases in DOMAIN_TASKS.items() if (t := match_task(tasks, aliases))}
    metric = pick_metric(df, list(columns.values()), PPL_METRICS)
    if not columns or metric is None:
        return pd.DataFrame()
    columns = {c: columns.get(c, f"<no {c} task>") for c in DOMAIN_TASKS}
    return _grouped_table(df, columns, metric, "domain", avg=True)


def zeroshot_table(df: pd.DataFrame, accuracy: str = "dcpmi") -> pd.DataFrame:
    """Layout (3): rows = (base, method), columns = the nine tasks and Avg; accuracy in %.

    `accuracy` is "dcpmi" (DC-PMI accuracy) or "acc" (plain accuracy). Empty if none is present.
    """
    if accuracy not in ACC_METRICS:
        raise ValueError(f"accuracy must be one of {sorted(ACC_METRICS)}, got {accuracy!r}")
    tasks = iter_tasks(df)
    columns = {c: t for c, aliases in ZEROSHOT_TASKS.items() if (t := match_task(tasks, aliases))}
    metric = pick_metric(df, list(columns.values()), ACC_METRICS[accuracy])
    if not columns or metric is None:
        return pd.DataFrame()
    columns = {c: columns.get(c, f"<no {c} task>") for c in ZEROSHOT_TASKS}
    return _grouped_table(df, columns, metric, "zeroshot", avg=True, scale=100.0)


def general_perplexity_tasks(df: pd.DataFrame) -> list[str]:
    """Perplexity tasks for layout (1): WikiText-103 first, then any other non-domain perplexity task."""
    tasks = iter_tasks(df)
    domain = {match_task(tasks, a) for a in DOMAIN_TASKS.values()}
    zeroshot = {match_task(tasks, a) for a in ZEROSHOT_TASKS.values()}
    with_ppl = [t for t in tasks if pick_metric(df, [t], PPL_METRICS) and t not in domain | zeroshot]
    first = match_task(with_ppl, GENERAL_TASKS["WikiText-103"])
    return ([first] if first else []) + [t for t in with_ppl if t != first]


# ---- markdown ----


def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def _best(values: pd.Series, higher: bool | None) -> set:
    v = values.dropna()
    if v.empty or higher is None:
        return set()
    target = v.max() if higher else v.min()
    return {i for i, x in v.items() if math.isclose(x, target, rel_tol=1e-12, abs_tol=1e-12)}


def _base_row(index: pd.Index, grouped: bool):
    """The row deltas are taken against: 'base', else the only 'base (...)' variant, else None."""
    label = {i: (i[1] if grouped else i) for i in index}
    exact = [i for i, lab in label.items() if lab == "base"]
    variants = [i for i, lab in label.items() if str(lab).startswith("base (")]
    return exact[0] if exact else variants[0] if len(variants) == 1 else None


def to_markdown(table: pd.DataFrame, digits: int = 2, deltas: bool = True) -> str:
    """A table from this module as markdown: best per column in bold (per base model in grouped
    tables), the change against the base row in brackets, a dash for a missing cell, then a line
    naming the metric, window/stride and lmbda."""
    if table.empty:
        return ""
    higher = table.attrs.get("higher_is_better")
    conflicts = table.attrs.get("conflicts", set())
    grouped = table.attrs.get("grouped", False)
    cells = pd.DataFrame("", index=table.index, columns=table.columns, dtype=object)
    groups = ([(b, table.xs(b, level="base", drop_level=False)) for b in dict.fromkeys(table.index.get_level_values(0))]
              if grouped else [(None, table)])
    for _, block in groups:
        base_row = _base_row(block.index, grouped)
        for col in table.columns:
            best = _best(block[col], higher)
            for idx, value in block[col].items():
                cell_key = (*idx, col) if grouped else (idx, col)
                if value != value:  # NaN
                    cells.at[idx, col] = CONFLICT if cell_key in conflicts else DASH
                    continue
                text = _fmt(value, digits)
                if idx in best and len(block[col].dropna()) > 1:
                    text = f"**{text}**"
                if deltas and base_row is not None and idx != base_row:
                    ref = block.at[base_row, col]
                    if ref == ref:
                        text += f" ({value - ref:+.{digits}f})".replace("-", "−")
                cells.at[idx, col] = text
    if grouped:
        cells = cells.reset_index()
        cells.loc[cells["base"].duplicated(), "base"] = ""
        cells = cells.rename(columns={"base": "Base model", "label": "Method"})
    else:
        cells = cells.reset_index().rename(columns={"label": "Method"})
    md = cells.to_markdown(index=False, disable_numparse=True)
    return md + "\n\n" + footnote(table, deltas) + "\n"


def footnote(table: pd.DataFrame, deltas: bool = True) -> str:
    """'Metric: ... ; window/stride: ...; lmbda: ...' for a table from this module."""
    a = table.attrs
    kind = a.get("kind")
    metric = a.get("metric")
    direction = {True: "higher is better", False: "lower is better", None: "direction unknown"}[a.get("higher_is_better")]
    if kind == "zeroshot":
        what = f"`{metric}` in % ({direction}), zero-shot"
    else:
        what = f"`{metric}` ({direction})"
    tasks = ", ".join(f"`{t}`" for t in a.get("tasks", []) if not t.startswith("<"))
    parts = [f"Metric: {what} on {tasks}"]
    if kind != "zeroshot":
        windows = a.get("windows") or []
        if windows:
            parts.append("window/stride: " + ", ".join(f"{_int(w)}/{_int(s)}" for w, s in windows))
        else:
            parts.append("window/stride: not recorded")
    if deltas:
        parts.append("(±x) = change against the base model's own row")
    lmbda = {k: v for k, v in (a.get("lmbda") or {}).items() if "lmbda=" not in k[1]}  # not in the label already
    if lmbda:
        bases: dict[tuple[str, float], list[str]] = {}
        for (b, lab), v in lmbda.items():
            bases.setdefault((lab, v), []).append(b)
        parts.append("lmbda: " + ", ".join(f"{lab} {v:g} ({', '.join(bs)})" for (lab, v), bs in bases.items()))
    recorded = set(a.get("lmbda") or {})
    if not a.get("grouped"):
        recorded = {lab for _, lab in recorded}
    unknown = sorted({str(i[1] if isinstance(i, tuple) else i) for i in table.index if i not in recorded
                      and str(i[1] if isinstance(i, tuple) else i).startswith(("+MemDec", "+kNN-LM"))
                      and "lmbda=" not in str(i)})
    routed = [u for u in unknown if "(router)" in u]
    unknown = [u for u in unknown if "(router)" not in u]
    if routed:
        parts.append("+MemDec (router): per-token weights from its router, no fixed lmbda")
    if unknown:
        parts.append(f"lmbda not recorded for {', '.join(unknown)} (the model's default)")
    if kind in ("domain", "zeroshot"):
        parts.append("Avg only over complete rows")
    return "; ".join(parts) + "."


def _int(x: Any) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)
