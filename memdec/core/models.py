"""Loading models and tokenizers (local folders or hub ids) with one-line errors, and their context lengths."""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from memdec.core.errors import first_line

#: a trained memory decoder's own file (format in memdec/pipeline/train.py)
MEMDEC_JSON = "memdec.json"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_path(name: str, what: str) -> str:
    """`name` as given if it is a local folder or could be a hub id; else a one-line FileNotFoundError."""
    name = str(name)
    if os.path.isdir(os.path.expanduser(name)):
        return os.path.expanduser(name)
    if os.path.exists(name):
        raise FileNotFoundError(f"{what} {name}: not a model folder")
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise FileNotFoundError(f"{what} {name}: no such folder")
    return name


def load_tokenizer(name: str, what: str, revision: str | None = None, trust_remote_code: bool = False):
    """AutoTokenizer.from_pretrained with a one-line error naming `what` when it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{what} {name}: cannot load its tokenizer ({first_line(e)})") from None


def load_causal_lm(name: str, what: str, revision: str | None = None, dtype: Any = "auto",
                   device: str | torch.device | None = None, trust_remote_code: bool = False):
    """AutoModelForCausalLM.from_pretrained (eval mode, on `device`), one-line error if it cannot be loaded."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(f"{what} {name}: cannot load the model ({first_line(e)})") from None
    except SafetensorError as e:
        raise ValueError(f"{what} {name}: cannot load the model, its weights file is truncated or corrupt "
                         f"({first_line(e)})") from None
    if device is not None:
        model = model.to(device)
    return model.eval()


def read_memdec_json(memory: str, revision: str | None = None) -> dict[str, Any]:
    """The memory's `memdec.json` (format in memdec/pipeline/train.py), or {} if it has none."""
    from transformers.utils import cached_file

    from memdec.core.formats import read_json

    try:
        path = cached_file(memory, MEMDEC_JSON, revision=revision, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except OSError:
        path = None
    return read_json(path) if path else {}


# ---- context lengths ----


def max_positions(model) -> int | None:
    """The longest context a model accepts, from its config (None if it does not say)."""
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_name(model) -> str:
    """The name a model was loaded from (its config's name_or_path), else its class name."""
    return str(getattr(model.config, "_name_or_path", "") or getattr(model.config, "name_or_path", "")
               or type(model).__name__)


def context_length(model_or_name, what: str = "model", revision: str | None = None) -> int | None:
    """max_positions of a loaded model, or of a local folder / hub id from its config alone (no weights)."""
    if hasattr(model_or_name, "config"):
        return max_positions(model_or_name)
    from types import SimpleNamespace

    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(os.path.expanduser(str(model_or_name)), revision=revision,
                                            trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{what} {model_or_name}: cannot read its config ({first_line(e)})") from None
    return max_positions(SimpleNamespace(config=config))


def check_context(model_or_limit: Any, length: int, what: str | None = None, hint: str | None = None) -> None:
    """One-line ValueError naming `what` if `length` tokens exceed a model's context length.

    `model_or_limit` is a loaded model or its limit (None: no limit known). Without `hint` the length
    is a scoring window ("window N is longer than its context length L (lower the window)"); with
    one it is tokens requested otherwise, `hint` saying how to ask for fewer.
    """
    limit = model_or_limit if model_or_limit is None or isinstance(model_or_limit, int) \
        else max_positions(model_or_limit)
    if limit is None or length <= limit:
        return
    what = what or f"model {model_name(model_or_limit)}"
    if hint is None:
        raise ValueError(f"{what}: window {length} is longer than its context length {limit} (lower the window)")
    raise ValueError(f"{what}: context length {limit} is shorter than the {length} tokens requested{hint}")
