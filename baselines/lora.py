"""LoRA baseline: a peft LoRA adapter on the base model, trained with plain CE on the domain corpus.

    memdec lora --model BASE --corpus PATH --out DIR [--rank R | --match-params MEMDEC_DIR]
    memdec-eval --model hf --model_args pretrained=BASE,peft=DIR --tasks ...

`--match-params` picks the rank whose trainable parameter count is closest to the Memory
Decoder's, as in the paper: an adapter of rank r on a layer with `fan_in` inputs and `fan_out`
outputs has r * (fan_in + fan_out) parameters, so the count is exact and linear in r.
Training is `memdec.pipeline.train.train` with beta = 0 and a `peft_config` (same windows, resume, bf16).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from baselines import BASELINE_JSON
from memdec.methods import Method, register_method
from memdec.pipeline.data import CorpusSpec


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(fan_in, fan_out) of a layer LoRA can adapt (nn.Linear, GPT-2's Conv1D), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "weight"):  # transformers' GPT-2 Conv1D: [in, out]
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def linear_layers(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Dotted name -> (fan_in, fan_out) of every layer of `model` that LoRA can adapt."""
    return {name: shape for name, m in model.named_modules() if (shape := _linear_shape(m)) is not None}


def default_target_modules(model: nn.Module) -> list[str]:
    """peft's default LoRA targets for the model's architecture."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    model_type = getattr(model.config, "model_type", None)
    if model_type not in defaults:
        raise ValueError(f"lora: no default target modules for model type {model_type!r}; pass --target-modules "
                         f"(its linear layers: {', '.join(_short_names(model))})")
    return list(defaults[model_type])


def _short_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in linear_layers(model)})


def target_layers(model: nn.Module, target_modules: Sequence[str]) -> dict[str, tuple[int, int]]:
    """The layers peft adapts for `target_modules` (name equal to, or ending in '.' + a target).

    Raises a one-line error naming any target that matches no linear layer, with the model's
    linear layer names.
    """
    layers = linear_layers(model)
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in layers)]
    if missing or not target_modules:
        raise ValueError(f"lora: target modules {missing or list(target_modules)} match no linear layer of "
                         f"{type(model).__name__}; its linear layers: {', '.join(_short_names(model))}")
    return {n: s for n, s in layers.items() if any(n == t or n.endswith("." + t) for t in target_modules)}


def lora_param_count(model: nn.Module, target_modules: Sequence[str], rank: int) -> int:
    """Trainable parameters of a rank-`rank` LoRA adapter: sum of rank * (fan_in + fan_out)."""
    return rank * sum(i + o for i, o in target_layers(model, target_modules).values())


def model_param_count(path: str | os.PathLike) -> int:
    """Parameters of the HF causal LM at `path` (tied weights counted once), without loading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not Path(path, "config.json").exists():
        raise FileNotFoundError(f"--match-params {path}: no model there (config.json missing)")
    cfg = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def match_rank(model: nn.Module, target_modules: Sequence[str], n_params: int) -> int:
    """The rank (>= 1) whose LoRA parameter count is closest to `n_params` (the smaller on a tie)."""
    per_rank = lora_param_count(model, target_modules, 1)
    low = max(1, n_params // per_rank)
    return min((low, low + 1), key=lambda r: (abs(r * per_rank - n_params), r))


def lora(
    model: str | os.PathLike,
    out: str | os.PathLike,
    corpus: str | CorpusSpec | None = None,
    datastore: str | os.PathLike | None = None,
    rank: int | None = None,
    match_params: str | os.PathLike | None = None,
    target_modules: Sequence[str] | None = None,
    alpha: float | None = None,
    dropout: float = 0.05,
    lr: float = 2e-4,
    **train_kwargs,
) -> Path:
    """Train a LoRA adapter of `model` on `corpus` (or a datastore's token stream); returns `out`.

    Give `rank`, or `match_params` (a Memory Decoder dir) to pick the rank whose parameter count is
    closest to it (default rank 8). Other keywords go to `memdec.pipeline.train.train` (window, steps, ...).
    """
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    from memdec.core.errors import first_line
    from memdec.core.models import resolve_model_path
    from memdec.pipeline.train import check_out, train

    if rank is not None and match_params is not None:
        raise ValueError("lora: give --rank or --match-params, not both")
    if rank is not None and int(rank) < 1:
        raise ValueError(f"lora: rank must be >= 1, got {rank}")
    check_out(out, bool(train_kwargs.get("overwrite", False)))
    name = resolve_model_path(str(model), "model")
    try:
        model_config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"model {model}: cannot read its config ({first_line(e)})") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    targets = list(target_modules) if target_modules else default_target_modules(skeleton)
    target_layers(skeleton, targets)  # one-line error for unknown targets, before any training
    info: dict = {"method": "lora", "base": str(model), "target_modules": targets}
    if match_params is not None:
        info["matched_to"] = str(match_params)
        info["matched_params"] = model_param_count(match_params)
        rank = match_rank(skeleton, targets, info["matched_params"])
    rank = int(rank or 8)
    info.update(rank=rank, trainable_params=lora_param_count(skeleton, targets, rank))
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    path = train(init=model, out=out, corpus=corpus, datastore=datastore, beta=0.0, lr=lr, peft_config=config,
                 extra_files={BASELINE_JSON: info}, **train_kwargs)
    return Path(path)


# evaluated with lm-eval's hf and peft=DIR in model_args
register_method(Method(name="lora", label="+LoRA", aliases=("peft", "+lora"), marker_arg="peft", variant_args=("peft",),
                       train="memdec.cli:lora_command"))
