"""lm-eval results JSON files → one long-form DataFrame (one row per run × task × metric).

A run is labelled from the results' own config, never from folder names (lm-eval writes base and
+MemDec runs of one base model into the same folder):

- `method` — an explicit `method=` in `--metadata` (lm-eval copies it into every task's
  `configs[task].metadata`) or in `model_args` wins; it may be a key of METHODS ("memdec", "knnlm",
  "rag", "dapt", "lora", "base") or any label of your own. Otherwise it is inferred from the model
  class: `memdec` → +MemDec (with `router=` in its model_args → +MemDec (router)), `knnlm` → +kNN-LM, `incontext_rag` → +In-Context RAG; a run with
  `peft=` → +LoRA; a run whose `pretrained` is a local folder holding the `baseline.json` that
  `memdec dapt` writes ({"method": "dapt", "base": ...}) → +DAPT; any other run → base. The keys,
  labels, aliases and model names are the method registry's (memdec.methods), so a method registered
  by a MEMDEC_PLUGINS file (`--model NAME` of its `model`) gets its own label too.
- `base` — the base model's short name (last path component): an explicit `base=` in `--metadata`
  wins; else the "base" of the DAPT folder's baseline.json; else `pretrained`. The folder must exist
  where the report is made; elsewhere pass `--metadata '{"method": "dapt", "base": "gpt2"}'`.

Files considered below each folder: `results*.json` and lm-eval's `NAME_<date>.json`
(`--output_path NAME.json`); per-sample `samples_*.jsonl` files are ignored. A file that is not an
lm-eval results file (truncated, another tool's) is skipped with a warning naming it.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from baselines import BASELINE_JSON
from memdec.methods import find_method, methods

HF_MODELS = {"hf", "hf-auto", "huggingface", "hf-multimodal"}


# The method tables below come from the method registry (memdec.methods): built-ins and MEMDEC_PLUGINS files.
# METHODS, METHOD_ALIASES, MODEL_METHODS and VARIANT_ARGS stay importable as module attributes (read fresh).


def method_labels() -> dict[str, str]:
    """Method key -> row label, in the order rows appear in tables."""
    return {m.name: m.label for m in methods()}


def method_aliases() -> dict[str, str]:
    """Other spellings (lower-case) -> method key."""
    return {a.lower(): m.name for m in methods() for a in m.aliases if a.lower() != m.name}


def model_methods() -> dict[str, str]:
    """lm-eval model name -> the method its runs are (when no marker_arg of that model is set)."""
    return {m.model.lower(): m.name for m in methods() if m.model and m.marker_arg is None}


def variant_args(method: str | None = None) -> tuple[str, ...]:
    """model_args shown first in row labels, in order: `method`'s own variant_args, then every method's."""
    own = m.variant_args if method is not None and (m := find_method(method)) is not None else ()
    return tuple(dict.fromkeys([*own, *(a for m in methods() for a in m.variant_args)]))


_TABLES = {"METHODS": method_labels, "METHOD_ALIASES": method_aliases, "MODEL_METHODS": model_methods,
           "VARIANT_ARGS": variant_args}


def __getattr__(name: str) -> Any:
    if name in _TABLES:
        return _TABLES[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# model_args that tell two runs of one method and base apart are shown in the row label when they differ;
# these never count
IGNORED_ARGS = {"device", "batch_size", "max_batch_size", "parallelize", "device_map", "trust_remote_code",
                "method", "base"}

RESULTS_NAME = re.compile(r"^results.*\.json$|_\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(\.\d+)?\.json$")

COLUMNS = [
    "file", "model", "method", "base", "label", "memory", "lmbda", "datastore", "peft", "corpus", "k",
    "temperature", "n_params", "task", "metric", "filter", "value", "stderr", "higher_is_better",
    "window", "stride", "n_samples", "limit", "date", "model_args",
]


class SkippedFileWarning(UserWarning):
    """A file or folder given to the report could not be used (the message names it)."""


def _skip(path: Path | str, why: str) -> None:
    warnings.warn(f"{path}: skipped, {why}", SkippedFileWarning, stacklevel=3)


def find_results_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """lm-eval results files below the given folders (a file given directly is taken as is)."""
    found: dict[Path, None] = {}
    for p in paths:
        p = Path(p)
        if p.is_file():
            found[p.resolve()] = None
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*.json") if f.is_file() and RESULTS_NAME.search(f.name))
            if not files:
                _skip(p, "no lm-eval results files (results_*.json) below it")
            for f in files:
                found[f.resolve()] = None
        else:
            _skip(p, "no such file or folder")
    return list(found)


def _parse_args(model_args: Any) -> dict[str, Any]:
    if isinstance(model_args, dict):
        return dict(model_args)
    if isinstance(model_args, str):
        from lm_eval.utils import simple_parse_args_string

        return simple_parse_args_string(model_args)
    return {}


def short_name(model: Any) -> str:
    """'Qwen/Qwen2.5-0.5B' → 'Qwen2.5-0.5B'; '/models/gpt2-xl/' → 'gpt2-xl'."""
    return str(model).rstrip("/\\").replace("\\", "/").split("/")[-1] if model else ""


def _dapt_marker(pretrained: Any) -> dict | None:
    """The DAPT marker of a local model folder (`baseline.json` with method "dapt", written by `memdec dapt`)."""
    if not pretrained or not os.path.isdir(str(pretrained)):
        return None
    f = Path(str(pretrained)) / BASELINE_JSON
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and str(data.get("method", "")).lower() == "dapt" else None


def _method_key(value: Any) -> str:
    v = str(value).strip()
    method = find_method(v)
    return v if method is None else method.name


def _method_of_model(model: str, args: dict[str, Any]) -> str | None:
    """The registered method a run of lm-eval model `model` with `args` is: one of that model's methods
    (the one whose marker_arg is set, else the one without), else a model-less method whose marker_arg is
    set (peft= → lora), else None."""
    registered = methods()
    own = [m for m in registered if m.model and m.model.lower() == model.lower()]
    for m in own:
        if m.marker_arg and args.get(m.marker_arg):  # memdec + router= → memdec_router (issue 17)
            return m.name
    for m in own:
        if not m.marker_arg:
            return m.name
    for m in registered:
        if m.model is None and m.marker_arg and args.get(m.marker_arg):
            return m.name
    return None


def describe_run(res: dict[str, Any]) -> dict[str, Any]:
    """Run-level fields (model, method, base, memory, lmbda, ...) from a results dict's own config."""
    cfg = res.get("config") or {}
    args = _parse_args(cfg.get("model_args"))
    meta: dict[str, Any] = {}
    for task_cfg in (res.get("configs") or {}).values():
        if isinstance(task_cfg, dict) and isinstance(task_cfg.get("metadata"), dict):
            meta = task_cfg["metadata"]
            break
    model = str(cfg.get("model", ""))
    pretrained = args.get("pretrained", cfg.get("model_name", ""))
    explicit = meta.get("method", args.get("method"))
    marker = None
    if explicit is not None:
        method = _method_key(explicit)
    elif (found := _method_of_model(model, args)) is not None:
        method = found
    elif (marker := _dapt_marker(pretrained)) is not None:
        method = "dapt"
    else:
        method = "base"
    if method == "dapt" and marker is None:
        marker = _dapt_marker(pretrained)
    base = meta.get("base", args.get("base"))
    if base is None and marker is not None:
        base = marker.get("base")
    if base is None:
        base = pretrained
    n_params = cfg.get("model_num_parameters")
    return {
        "model": model,
        "method": method,
        "base": short_name(base),
        "memory": args.get("memory"),
        # the lmbda a mixing model used: its model_args, else what it reported in config (get_model_info)
        "lmbda": _num(args.get("lmbda", args.get("lambda", cfg.get("lmbda")))),
        "datastore": args.get("datastore"),
        "peft": args.get("peft"),
        "corpus": args.get("corpus"),
        "k": _num(args.get("k")),
        "temperature": _num(args.get("temperature")),
        "n_params": n_params if isinstance(n_params, int | float) and n_params > 0 else None,
        "limit": cfg.get("limit"),
        "date": res.get("date"),
        "_args": args,
        "_meta": meta,
        # whose variant_args order its label: its method, or for a label of your own the method its model is
        "_variants": method if find_method(method) is not None else (_method_of_model(model, args) or method),
        "_max_length": res.get("max_length"),
    }


def _num(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _window_stride(run: dict[str, Any], task_cfg: dict[str, Any], metrics: dict[str, Any]
                   ) -> tuple[float | None, float | None]:
    """Window and stride of a perplexity task: memdec's sliding-window tasks record theirs in the task
    metadata (`ppl_window` / `ppl_stride`); for lm-eval's own rolling-window tasks, max_length.

    A model's own `stride`/`window` arguments (In-Context RAG's retrieval stride) are never taken for them.
    """
    meta = task_cfg.get("metadata") if isinstance(task_cfg.get("metadata"), dict) else {}
    if meta.get("ppl_window") is not None:
        window = _num(meta.get("ppl_window"))
        return window, _num(meta.get("ppl_stride", window))
    if task_cfg.get("output_type") == "loglikelihood_rolling" and not any(
            k.startswith("token_perplexity,") for k in metrics):
        # lm-eval's own rolling windows: max_length tokens, no overlap beyond one token of context
        length = _num(run["_args"].get("max_length", run["_max_length"]))
        return length, length
    return None, None


def read_results(path: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed lm-eval results file, or None (with a SkippedFileWarning naming it)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
    except json.JSONDecodeError as e:
        _skip(path, f"not valid JSON, truncated? ({e.msg} at line {e.lineno})")
        return None
    except (OSError, UnicodeDecodeError) as e:
        _skip(path, f"unreadable ({e})")
        return None
    if not isinstance(res, dict) or not isinstance(res.get("results"), dict):
        _skip(path, "not an lm-eval results file (no 'results' table)")
        return None
    cfg = res.get("config")
    if not isinstance(cfg, dict) or "model" not in cfg:
        _skip(path, "not an lm-eval results file (no 'config' with the model)")
        return None
    return res


def run_rows(res: dict[str, Any], file: str = "") -> list[dict[str, Any]]:
    """Long-form rows (one per task × metric × filter) of one parsed results dict."""
    run = describe_run(res)
    hib_all = res.get("higher_is_better") or {}
    n_samples = res.get("n-samples") or {}
    rows = []
    for task, metrics in res["results"].items():
        if not isinstance(metrics, dict):
            continue
        task_cfg = (res.get("configs") or {}).get(task) or {}
        window, stride = _window_stride(run, task_cfg, metrics)
        hib = hib_all.get(task) or {}
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, _, filt = key.rpartition(",")
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({
                **{k: v for k, v in run.items() if not k.startswith("_")},
                "file": file,
                "_variants": run["_variants"],
                "model_args": json.dumps(run["_args"], sort_keys=True, default=str),
                "task": task,
                "metric": metric,
                "filter": filt,
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, int | float) and not isinstance(stderr, bool) else None,
                "higher_is_better": hib.get(metric),
                "window": window,
                "stride": stride,
                "n_samples": (n_samples.get(task) or {}).get("effective"),
            })
    return rows


def _fmt_arg(name: str, value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and ("/" in value or "\\" in value):
        value = short_name(value)
    return f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"


def add_labels(df: pd.DataFrame) -> pd.DataFrame:
    """Fill `label`: the method's row label, plus the model_args that tell apart its runs on one base
    model that report the same task (e.g. '+MemDec (lmbda=0.6)'); settings that do not change results
    (device, batch size) are ignored."""
    df = df.copy()
    names = method_labels()
    labels = df["method"].map(lambda m: names.get(m, m))
    variants = df["_variants"] if "_variants" in df else df["method"]
    orders: dict[str, dict[str, int]] = {}
    for _key, part in df.groupby(["method", "base"], dropna=False, sort=False):
        runs = {f: json.loads(a) for f, a in zip(part["file"], part["model_args"], strict=True)}
        tasks = part.groupby("file")["task"].agg(set).to_dict()
        varying: dict[str, set[str]] = {f: set() for f in runs}
        for task in set(part["task"]):
            files = [f for f in runs if task in tasks[f]]
            keys = {k for f in files for k in runs[f]} - IGNORED_ARGS
            diff = {k for k in keys if len({str(runs[f].get(k)) for f in files}) > 1}
            for f in files:
                varying[f] |= diff
        for idx, file in part["file"].items():
            kind = variants.at[idx]
            if kind not in orders:
                orders[kind] = {k: i for i, k in enumerate(variant_args(kind))}
            order = orders[kind]
            args, keys = runs[file], sorted(varying[file], key=lambda k: (order.get(k, len(order)), k))
            extra = ", ".join(_fmt_arg(k, args[k]) for k in keys if args.get(k) is not None)
            labels.at[idx] = f"{labels.at[idx]} ({extra})" if extra else labels.at[idx]
    df["label"] = labels
    return df


def load_results(paths: Sequence[str | os.PathLike] | str | os.PathLike) -> pd.DataFrame:
    """All lm-eval results below `paths` as a long-form DataFrame (columns: COLUMNS).

    Unusable files are skipped with a SkippedFileWarning naming each; an empty frame means none
    was found. Runs repeated with identical numbers (the same file found twice, a re-run) count once.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    rows: list[dict[str, Any]] = []
    for f in find_results_files(paths):
        res = read_results(f)
        if res is None:
            continue
        got = run_rows(res, str(f))
        if not got:
            _skip(f, "no numeric metrics in its 'results'")
        rows.extend(got)
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df:
            df[col] = None
    if df.empty:
        return df[COLUMNS]
    df = add_labels(df)
    return df[COLUMNS].reset_index(drop=True)


def find_conflicts(df: pd.DataFrame) -> pd.DataFrame:
    """Rows whose (base, label, task, metric, filter) appear with different values in several files."""
    key = ["base", "label", "task", "metric", "filter"]
    if df.empty:
        return df.iloc[0:0]

    def differs(values: pd.Series) -> bool:
        v = values.dropna().tolist()
        return any(not math.isclose(a, v[0], rel_tol=1e-9, abs_tol=1e-12) for a in v[1:])

    bad = df.groupby(key, dropna=False)["value"].transform(differs).astype(bool)
    return df[bad].sort_values(key + ["file"]).reset_index(drop=True)


def dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (base, label, task, metric, filter); conflicting values become NaN (see find_conflicts)."""
    key = ["base", "label", "task", "metric", "filter"]
    if df.empty:
        return df
    conflicts = find_conflicts(df)
    out = df.drop_duplicates(key, keep="first").copy()
    if not conflicts.empty:
        bad = set(map(tuple, conflicts[key].astype(str).values))
        mask = out[key].astype(str).apply(tuple, axis=1).isin(bad)
        out.loc[mask, "value"] = float("nan")
        out.loc[mask, "stderr"] = float("nan")
    return out.reset_index(drop=True)


def iter_tasks(df: pd.DataFrame) -> list[str]:
    """Task names present, in order of appearance."""
    return list(dict.fromkeys(df["task"].tolist())) if not df.empty else []
