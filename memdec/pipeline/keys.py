"""The kNN key of a causal LM: the input of its last transformer block's MLP (after the pre-MLP norm).

This is the one place that knows where the key lives; the datastore builder and the kNN-LM both
capture it with `capture_keys`, so keys written to disk and keys searched at inference match.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# attribute names of a block's feed-forward module, in the order tried
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if all(any(hasattr(b, m) for m in _MLP_NAMES) for b in module):
                if best is None or len(module) > len(best[1]):
                    best = (name, module)
    if best is None:
        arch = type(model).__name__
        raise ValueError(
            f"{arch}: no list of transformer blocks with an MLP ({'/'.join(_MLP_NAMES)}) found; "
            "memdec.pipeline.keys supports GPT-2, Llama, Qwen2, Mistral, GPT-NeoX and similar HF causal LMs"
        )
    return best


def key_layer(model: nn.Module) -> str:
    """The dotted module name whose input is the key, e.g. 'transformer.h.11.mlp'."""
    name, blocks = _blocks(model)
    last = blocks[-1]
    mlp = next(m for m in _MLP_NAMES if hasattr(last, m))
    return f"{name}.{len(blocks) - 1}.{mlp}"


def key_module(model: nn.Module) -> nn.Module:
    """The module whose input is the key."""
    return model.get_submodule(key_layer(model))


def key_dim(model: nn.Module) -> int:
    """The dimension of the key (the model's hidden size)."""
    cfg = model.config
    for attr in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise ValueError(f"{type(model).__name__}: cannot tell the hidden size from its config")


class KeyCapture:
    """Holds the key tensor (batch, length, dim) of the most recent forward pass."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None

    def pop(self) -> torch.Tensor:
        if self.keys is None:
            raise RuntimeError("no key captured: run a forward pass inside capture_keys() first")
        keys, self.keys = self.keys, None
        return keys


@contextmanager
def capture_keys(model: nn.Module) -> Iterator[KeyCapture]:
    """Within the block, every forward pass of `model` stores its keys in the yielded KeyCapture."""
    capture = KeyCapture()

    def hook(_module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        capture.keys = x.detach()

    handle = key_module(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield capture
    finally:
        handle.remove()
