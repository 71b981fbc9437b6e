"""Random-weight models for `memdec bench`: the architecture configs shipped in memdec/configs/arch, built on a device."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ARCH_DIR = Path(__file__).resolve().parent.parent / "configs" / "arch"
SMALL = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 512}


def arch_names() -> list[str]:
    """Architectures shipped in memdec/configs/arch."""
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def arch_config(name: str, small: bool = False) -> Any:
    """A transformers config for architecture `name` (memdec/configs/arch/NAME.json), shrunk if `small`."""
    from transformers import AutoConfig

    path = ARCH_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"bench: unknown architecture {name!r} (known: {', '.join(arch_names())})")
    fields = json.loads(path.read_text())
    fields.pop("architectures", None)
    fields.pop("torch_dtype", None)
    if small:
        s = SMALL
        if fields["model_type"] == "gpt2":
            fields.update(n_layer=s["layers"], n_embd=s["hidden"], n_head=s["heads"], n_positions=1024, n_ctx=1024)
        else:
            fields.update(num_hidden_layers=s["layers"], hidden_size=s["hidden"], intermediate_size=2 * s["hidden"],
                          num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                          max_window_layers=s["layers"])
        fields["vocab_size"] = s["vocab"]
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key in fields:
                fields[key] = s["vocab"] - 1
    for key in ("attn_pdrop", "embd_pdrop", "resid_pdrop", "attention_dropout"):
        if key in fields:
            fields[key] = 0.0
    return AutoConfig.for_model(**fields)


def build_model(name: str, small: bool, dtype: torch.dtype, device: torch.device, seed: int) -> Any:
    """A random-weight causal LM of architecture `name` on `device` in `dtype`, eval mode."""
    import transformers
    from transformers import AutoModelForCausalLM

    config = arch_config(name, small)
    torch.manual_seed(seed)
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **{key: dtype})
    return model.to(device=device, dtype=dtype).eval()


def n_params(model: torch.nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())

