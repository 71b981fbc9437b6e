"""The paper's baselines as lm-eval models and training commands, one module per method.

Each module registers its method with `memdec.methods.register_method` (the report's label, aliases,
training subcommand); BASELINES maps a module's short name to it. `register_all()` imports them so
their `@register_model` classes are known to lm-eval (memdec-eval calls it). A baseline outside this
package is one .py file that registers its lm-eval model and its method; name it in the environment
variable `MEMDEC_PLUGINS` (several paths separated by os.pathsep) and `register_all()` imports it too.

| name            | how it is used                                                          |
|-----------------|-------------------------------------------------------------------------|
| `knnlm`         | `--model knnlm --model_args pretrained=BASE,datastore=DIR,k=...`        |
| `incontext_rag` | `--model incontext_rag --model_args pretrained=BASE,corpus=PATH,...`    |
| `dapt`          | `memdec dapt ...`, then `--model hf --model_args pretrained=DIR`        |
| `lora`          | `memdec lora ...`, then `--model hf --model_args pretrained=BASE,peft=DIR` |
"""

from __future__ import annotations

import importlib

from memdec.methods import BUILTIN_METHODS, PLUGINS_ENV, load_plugin, load_plugins, methods, plugin_paths

#: module short name -> module of each built-in baseline (from memdec.methods.BUILTIN_METHODS)
BASELINES: dict[str, str] = {m.rpartition(".")[2]: m for m in dict.fromkeys(BUILTIN_METHODS.values())
                             if m.startswith(f"{__name__}.")}

#: what `memdec dapt` / `memdec lora` write beside the model ({"method": ..., "base": ...}); reports read it
BASELINE_JSON = "baseline.json"

__all__ = ["BASELINES", "BASELINE_JSON", "PLUGINS_ENV", "load_plugin", "plugin_paths", "register_all"]


def register_all() -> None:
    """Import every baseline module and every MEMDEC_PLUGINS file, registering their lm-eval models
    (and the lm-eval class of every registered method that names one)."""
    for module in BASELINES.values():
        importlib.import_module(module)
    load_plugins()
    for method in methods():
        if method.model_class is not None:
            method.load_model()
