"""`memdec pipeline CONFIG.yaml`: corpus → datastore → index → kNN targets → Memory Decoder, in one go.

The config (YAML, or a dict) names each stage's settings; every stage writes under `output` and is
skipped when its complete output is already there, so a rerun after a kill picks up where it
stopped (a stage interrupted half-way resumes from its own partial output):

    output: runs/gpt2-wikitext103          # OUT/datastore, OUT/datastore/{index-<backend>,targets-k<K>-t<T>}, OUT/memdec
    corpus: {dataset: wikitext, config: wikitext-103-raw-v1, split: train}   # or {path: my/files/}
    base_model: gpt2-xl                    # builds the datastore (keys, values)
    datastore: {window: 1024, stride: 512, batch_size: 8}
    index: {backend: faiss-flat}           # + nlist / m / nbits / nprobe for faiss-ivfpq
    targets: {k: 1024, temperature: 16}
    train: {init: gpt2, beta: 0.5, steps: 10000, lr: 1.0e-3, batch_size: 8}

Relative paths in a config file are taken relative to the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from memdec.core.errors import first_line
from memdec.core.formats import check_output_dir, is_complete, read_json
from memdec.core.models import MEMDEC_JSON
from memdec.pipeline.data import CorpusSpec

SECTIONS = ("output", "corpus", "base_model", "datastore", "index", "targets", "train")
STAGES = ("datastore", "index", "targets", "train")


def load_config(config: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """The pipeline config as a dict, checked for missing/unknown sections (one-line errors)."""
    if isinstance(config, dict):
        cfg, where = dict(config), "pipeline config"
    else:
        import yaml

        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"pipeline config {path}: no such file")
        try:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ValueError(f"pipeline config {path}: not valid YAML ({first_line(e)})") from None
        where = f"pipeline config {path}"
        if not isinstance(cfg, dict):
            raise ValueError(f"{where}: expected a mapping of sections ({', '.join(SECTIONS)})")
    unknown = sorted(set(cfg) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    for key in ("output", "corpus", "base_model", "train"):
        if not cfg.get(key):
            raise ValueError(f"{where}: missing the {key!r} section")
    for key in ("datastore", "index", "targets", "train"):
        if cfg.get(key) is None:
            cfg[key] = {}
        if not isinstance(cfg[key], dict):
            raise ValueError(f"{where}: section {key!r} must be a mapping, got {type(cfg[key]).__name__}")
    if "init" not in cfg["train"]:
        raise ValueError(f"{where}: section 'train' needs 'init' (the small LM the Memory Decoder starts from)")
    return cfg


# per section: the stage function and the arguments the pipeline itself passes (not settable in the config)
_FUNCTIONS = {
    "datastore": ("memdec.pipeline.datastore.build_datastore", {"model_or_path", "corpus", "out", "progress", "overwrite"}),
    "index": ("memdec.pipeline.search.build_index", {"datastore", "out", "progress", "overwrite"}),
    "targets": ("memdec.pipeline.targets.build_targets", {"datastore", "out", "backend", "progress", "overwrite"}),
    "train": ("memdec.pipeline.train.train", {"out", "datastore", "targets", "corpus", "texts", "progress", "callback",
                                     "overwrite"}),
}
# build_targets passes its other keyword arguments on to the exact-search index it opens
_EXTRA_KEYWORDS = {"targets": ("memdec.pipeline.search.TorchIndex", {"keys", "device", "chunk_rows"})}


def _arguments(function: str) -> set[str]:
    """The named parameters of `module.function` (or of a class's constructor)."""
    import importlib
    import inspect

    module, _, name = function.rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters.values()
    return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def check_sections(cfg: dict[str, Any], where: str = "pipeline config") -> None:
    """One-line error for a section key its stage function does not take (typos fail before any work)."""
    for section, (function, reserved) in _FUNCTIONS.items():
        known = _arguments(function) - reserved
        if section in _EXTRA_KEYWORDS:
            extra, taken = _EXTRA_KEYWORDS[section]
            known |= _arguments(extra) - taken
        for key in cfg[section]:
            if key in reserved or key not in known:
                why = "set by the pipeline" if key in reserved else "unknown"
                raise ValueError(f"{where}: section {section!r}: key {key!r} is {why} "
                                 f"(settable: {', '.join(sorted(known))})")


def stage_paths(cfg: dict[str, Any]) -> dict[str, Path]:
    """Where each stage's output lives."""
    import inspect

    from memdec.pipeline.targets import build_targets, default_out

    root = Path(cfg["output"])
    backend = cfg["index"].get("backend", "torch")
    defaults = inspect.signature(build_targets).parameters
    k = cfg["targets"].get("k", defaults["k"].default)
    temperature = float(cfg["targets"].get("temperature", defaults["temperature"].default))
    targets = root / "targets"  # where memdec <= 0.1 put them: a complete one there is still used
    if not is_complete(targets, "targets"):
        targets = default_out(root / "datastore", k, temperature)  # as `memdec targets` writes them
    return {"datastore": root / "datastore", "index": root / "datastore" / f"index-{backend}",
            "targets": targets, "train": root / "memdec"}


def stage_complete(stage: str, path: Path) -> bool:
    """True if `path` holds the finished output of `stage`."""
    if stage == "train":
        try:
            return read_json(path / MEMDEC_JSON).get("format_version") == 1
        except ValueError:
            return False
    return is_complete(path, stage)


def _check_targets_k(cfg: dict[str, Any], datastore: Path) -> None:
    """One-line error if the config's targets.k is more neighbours than the datastore's rows allow."""
    import inspect

    from memdec.pipeline.datastore import Datastore
    from memdec.pipeline.targets import build_targets, check_k

    k = cfg["targets"].get("k", inspect.signature(build_targets).parameters["k"].default)
    try:
        check_k(k, Datastore.open(datastore))
    except ValueError as e:
        raise ValueError(f"pipeline config: targets.k: {e}") from None


def run_pipeline(config: str | os.PathLike | dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Run every stage whose output is not complete yet, and every stage after one that ran (its complete
    output was made from the old inputs and is replaced); returns {"paths": {...}, "ran": [...], "skipped": [...]}."""
    cfg = load_config(config)
    check_sections(cfg, "pipeline config" if isinstance(config, dict) else f"pipeline config {config}")
    paths = stage_paths(cfg)
    check_output_dir(cfg["output"], "pipeline config: output")
    Path(cfg["output"]).mkdir(parents=True, exist_ok=True)
    ran, skipped = [], []

    replace: dict[str, bool] = {}  # stages that run: True if a complete but stale output is replaced

    def todo(stage: str) -> bool:
        done = stage_complete(stage, paths[stage])
        if done and not ran:
            skipped.append(stage)
            print(f"pipeline: {stage}: complete, skipped ({paths[stage]})", flush=True)
            return False
        replace[stage] = done  # else an unfinished .partial output is resumed
        print(f"pipeline: {stage}: {f'{ran[-1]} was rebuilt, replacing it' if done else 'running'} ({paths[stage]})",
              flush=True)
        ran.append(stage)
        return True

    if todo("datastore"):
        from memdec.pipeline.datastore import build_datastore

        corpus = CorpusSpec.from_arg(cfg["corpus"])
        build_datastore(cfg["base_model"], corpus, paths["datastore"], progress=progress, overwrite=False,
                        **cfg["datastore"])
    _check_targets_k(cfg, paths["datastore"])  # the row count is known now: before any index or targets work
    if todo("index"):
        from memdec.pipeline.search import build_index

        build_index(paths["datastore"], out=paths["index"], progress=progress, overwrite=replace["index"],
                    **cfg["index"])
    if todo("targets"):
        from memdec.pipeline.targets import build_targets

        backend = cfg["index"].get("backend", "torch")
        build_targets(paths["datastore"], out=paths["targets"], backend=backend, progress=progress,
                      overwrite=replace["targets"], **cfg["targets"])
    if todo("train"):
        from memdec.pipeline.train import train

        opts = dict(cfg["train"])
        init = opts.pop("init")
        train(init, paths["train"], datastore=paths["datastore"], targets=paths["targets"], progress=progress,
              overwrite=replace["train"], **opts)
    return {"paths": {k: str(v) for k, v in paths.items()}, "ran": ran, "skipped": skipped}
