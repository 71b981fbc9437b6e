"""The paper's baselines as lm-eval models and training commands, one module per method.

BASELINES maps a name to the module that implements it; `register_all()` imports them so their
`@register_model` classes are known to lm-eval (memdec-eval calls it). A baseline outside this
package is one .py file that registers its model; name it in the environment variable
`MEMDEC_PLUGINS` (several paths separated by os.pathsep) and `register_all()` imports it too.

| name            | how it is used                                                          |
|-----------------|-------------------------------------------------------------------------|
| `knnlm`         | `--model knnlm --model_args pretrained=BASE,datastore=DIR,k=...`        |
| `incontext_rag` | `--model incontext_rag --model_args pretrained=BASE,corpus=PATH,...`    |
| `dapt`          | `memdec dapt ...`, then `--model hf --model_args pretrained=DIR`        |
| `lora`          | `memdec lora ...`, then `--model hf --model_args pretrained=BASE,peft=DIR` |
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from types import ModuleType

BASELINES: dict[str, str] = {
    "knnlm": "baselines.knnlm",
    "incontext_rag": "baselines.incontext_rag",
    "dapt": "baselines.dapt",
    "lora": "baselines.lora",
}

PLUGINS_ENV = "MEMDEC_PLUGINS"
#: what `memdec dapt` / `memdec lora` write beside the model ({"method": ..., "base": ...}); reports read it
BASELINE_JSON = "baseline.json"


def load_plugin(path: str) -> ModuleType:
    """Import one plugin file (a .py that registers an lm-eval model); each file is imported once."""
    path = os.path.abspath(os.path.expanduser(path))
    if not path.endswith(".py"):
        raise ValueError(f"{PLUGINS_ENV}: {path} is not a .py file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{PLUGINS_ENV}: {path}: no such file")
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"memdec_plugin_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{PLUGINS_ENV}: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module


def plugin_paths(value: str | None = None) -> list[str]:
    """The plugin files named by `value` (default: the MEMDEC_PLUGINS environment variable)."""
    value = os.environ.get(PLUGINS_ENV, "") if value is None else value
    return [p for p in value.split(os.pathsep) if p.strip()]


def register_all() -> None:
    """Import every baseline module and every MEMDEC_PLUGINS file, registering their lm-eval models."""
    for module in BASELINES.values():
        importlib.import_module(module)
    for path in plugin_paths():
        load_plugin(path)
