"""The paper's baselines as lm-eval models and training commands, one module per method.

BASELINES maps a name to the module that implements it; `register_all()` imports them so their
lm-eval models are registered (memdec-eval calls it).
"""

from __future__ import annotations

import importlib

BASELINES: dict[str, str] = {}


def register_all() -> None:
    """Import every baseline module so that its `@register_model` classes are known to lm-eval."""
    for module in BASELINES.values():
        importlib.import_module(module)
