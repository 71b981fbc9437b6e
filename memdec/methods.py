"""The method registry: one `register_method(Method(...))` per method (the Memory Decoder, the base model,
each baseline), read by everything that lists methods (report labels, `memdec` training subcommands).

    from memdec.methods import Method, register_method
    register_method(Method(name="unigram", label="+Unigram", model="unigram", variant_args=("corpus", "lmbda")))

Built-in methods register themselves in their own modules (BUILTIN_METHODS says which); a method of your
own is a file named in `MEMDEC_PLUGINS` (paths separated by os.pathsep) that calls `register_method`.
Registering imports nothing heavy: the lm-eval class is a "module:Class" string, imported by
`Method.load_model()` only. The built-in modules themselves import torch and lm-eval, so the registry
reads their `register_method(Method(...))` lines from the source (literal arguments only) instead of
importing them; importing such a module later registers the same Method again, which is a no-op.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

PLUGINS_ENV = "MEMDEC_PLUGINS"

#: built-in method name -> the module that registers it, in the order of the report's rows
BUILTIN_METHODS: dict[str, str] = {
    "base": __name__,
    "rag": "baselines.incontext_rag",
    "knnlm": "baselines.knnlm",
    "dapt": "baselines.dapt",
    "lora": "baselines.lora",
    "memdec": __name__,
    "memdec_router": __name__,
}


def _check_ref(value: str | None, what: str) -> None:
    if value is not None and (not isinstance(value, str) or value.count(":") != 1 or not all(value.split(":"))):
        raise ValueError(f"Method {what}={value!r}: expected 'module:name'")


@dataclass(frozen=True)
class Method:
    """One method: how lm-eval runs it, how reports label it, how `memdec` trains it.

    - `name`: the method key (`--metadata '{"method": NAME}'`); `label`: its report row ("+kNN-LM");
      `aliases`: other spellings accepted for the key (compared lower-case).
    - `model`: the lm-eval model name its runs use ("knnlm"); None for a method evaluated with lm-eval's
      `hf` (DAPT, LoRA, the base). `model_class`: "module:Class" of that model, imported only by `load_model`.
    - `marker_arg`: a model_args key whose presence marks a run of this method: with `model`, among runs of
      that model (memdec + router= → memdec_router); without, among runs of any model no method claims
      (peft= → lora).
    - `variant_args`: the model_args that tell two of its runs apart, shown first (in this order) in a
      report label when they differ ("+MemDec (memory=..., lmbda=0.6)").
    - `train`: "module:function" adding its `memdec` training subcommand, called as `function(subparsers)`
      like memdec/cli.py's blocks (the module is imported to build the parser: keep it light).
    - `bench`: "module:function" returning its `memdec bench` rows, called as `function(settings)` -> a list of
      memdec.bench.MethodSpec (built-ins in memdec.bench.BENCH_ORDER first, then the others in registry order).
    """

    name: str
    label: str
    model: str | None = None
    model_class: str | None = None
    aliases: tuple[str, ...] = ()
    variant_args: tuple[str, ...] = ()
    marker_arg: str | None = None
    train: str | None = None
    bench: str | None = None

    def __post_init__(self) -> None:
        for key in ("name", "label"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                raise ValueError(f"Method {key}={getattr(self, key)!r}: expected a non-empty string")
        for key in ("aliases", "variant_args"):
            value = getattr(self, key)
            value = (value,) if isinstance(value, str) else tuple(value)
            if not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"Method {self.name!r}: {key} must be strings, got {value!r}")
            object.__setattr__(self, key, value)
        _check_ref(self.model_class, "model_class")
        _check_ref(self.train, "train")
        _check_ref(self.bench, "bench")

    def load_model(self) -> type:
        """The lm-eval model class (imports `model_class`; its module registers it with lm-eval)."""
        if self.model_class is None:
            raise ValueError(f"method {self.name!r} has no model_class (it is evaluated with lm-eval's hf)")
        return resolve(self.model_class)


def resolve(ref: str) -> Any:
    """The object a "module:name" string names (importing the module)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, Method] = {}  # name -> Method, in registration order
_KEYS: dict[str, str] = {}  # lower-case name or alias -> name
_builtins_loaded = False


def _register(method: Method) -> None:
    old = _REGISTRY.get(method.name)
    if old == method:
        return  # the same registration again (a module imported after its source was read)
    keys = {method.name.lower(): "name", **{a.lower(): "alias" for a in method.aliases if a.lower() != method.name.lower()}}
    for key, what in keys.items():
        if key in _KEYS:
            other = _REGISTRY[_KEYS[key]]
            kind = "the name" if key == other.name.lower() else "an alias"
            raise ValueError(f"register_method: {what} {key!r} of method {method.name!r} ({method.label}) is already "
                             f"{kind} of method {other.name!r} ({other.label})")
    _REGISTRY[method.name] = method
    _KEYS.update(dict.fromkeys(keys, method.name))


def register_method(method: Method) -> Method:
    """Add `method` to the registry; returns it. A name or alias already taken raises ValueError naming both
    methods (registering an identical Method again is a no-op)."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method: expected a Method, got {type(method).__name__}")
    _load_builtins()
    _register(method)
    return method


def declared_methods(path: str | os.PathLike) -> list[Method]:
    """The Methods a Python file registers with top-level `register_method(Method(...))` lines, read from its
    source without running it (keyword arguments must be literals)."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), str(path))
    found = []
    for node in tree.body:
        call = node.value if isinstance(node, ast.Expr) else None
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "register_method"):
            continue
        inner = call.args[0] if len(call.args) == 1 and not call.keywords else None
        try:
            if not (isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name) and inner.func.id == "Method"
                    and not inner.args and all(k.arg for k in inner.keywords)):
                raise ValueError
            found.append(Method(**{k.arg: ast.literal_eval(k.value) for k in inner.keywords}))
        except ValueError:
            raise ValueError(f"{path}:{node.lineno}: a built-in method is registered as "
                             "register_method(Method(name=..., ...)) with literal arguments") from None
    return found


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    try:
        for module in dict.fromkeys(BUILTIN_METHODS.values()):
            if module == __name__:
                continue  # registered below, at import
            spec = importlib.util.find_spec(module)
            if spec is None or spec.origin is None:
                raise ModuleNotFoundError(f"built-in method module {module} not found", name=module)
            for method in declared_methods(spec.origin):
                _register(method)
        missing = [n for n in BUILTIN_METHODS if n not in _REGISTRY]
        if missing:
            raise RuntimeError(f"built-in methods {missing} are not registered by their modules")
    except BaseException:
        _builtins_loaded = False
        raise


# ---- plugins


def load_plugin(path: str) -> ModuleType:
    """Import one plugin file (a .py that registers an lm-eval model and/or a method); each file is imported once."""
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


def load_plugins() -> None:
    """Import every MEMDEC_PLUGINS file (once each), registering what it registers."""
    for path in plugin_paths():
        load_plugin(path)


# ---- lookups


def methods() -> list[Method]:
    """Every registered method (built-ins and MEMDEC_PLUGINS files loaded): the built-ins in the report's row
    order, then the others in registration order."""
    _load_builtins()
    load_plugins()
    return [*(_REGISTRY[n] for n in BUILTIN_METHODS), *(m for n, m in _REGISTRY.items() if n not in BUILTIN_METHODS)]


def find_method(name_or_alias: str) -> Method | None:
    """The method with this name or alias (case-insensitive), or None."""
    _load_builtins()
    load_plugins()
    key = _KEYS.get(str(name_or_alias).strip().lower())
    return None if key is None else _REGISTRY[key]


def get_method(name_or_alias: str) -> Method:
    """The method with this name or alias (case-insensitive); KeyError naming the known ones otherwise."""
    method = find_method(name_or_alias)
    if method is None:
        raise KeyError(f"unknown method {name_or_alias!r} (known: {', '.join(m.name for m in methods())})")
    return method


# ---- the built-ins that are not baselines (the baselines register in baselines/*.py)

_MEMDEC_LM = "memdec.eval.models:MemDecLM"
for _method in (
    Method(name="base", label="base", bench="memdec.bench.methods:base_specs"),
    Method(name="memdec", label="+MemDec", model="memdec", model_class=_MEMDEC_LM,
           aliases=("memory_decoder", "+memdec"), variant_args=("memory", "lmbda"),
           bench="memdec.bench.methods:memdec_specs"),
    Method(name="memdec_router", label="+MemDec (router)", model="memdec", model_class=_MEMDEC_LM,
           aliases=("router", "+memdec (router)", "memdec-router"), marker_arg="router",
           variant_args=("memory", "lmbda", "router", "router_threshold"), bench="memdec.bench.methods:router_specs"),
):
    _register(_method)
del _method

__all__ = ["BUILTIN_METHODS", "PLUGINS_ENV", "Method", "declared_methods", "find_method", "get_method",
           "load_plugin", "load_plugins", "methods", "plugin_paths", "register_method", "resolve"]
