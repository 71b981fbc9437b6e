"""Per-token log-probabilities of a token stream under sliding windows (memdec.pipeline.data's windowing).

Mixing is elementwise in probability space, so the mixture's log-probability of the observed token
only needs each model's log-probability of that token: `perplexity` of a joint model and
`tune-lambda` both mix these per-token numbers (memdec.inference.mixing) instead of full distributions.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from memdec.inference.mixing import align_vocab
from memdec.pipeline.data import sliding_windows, window_batch


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
        raise FileNotFoundError(f"{what} {model_or_name}: cannot read its config "
                                f"({str(e).strip().splitlines()[0]})") from None
    return max_positions(SimpleNamespace(config=config))


def check_window(model, window: int, what: str | None = None) -> None:
    """Raise a one-line error naming the model if `window` is longer than its context length."""
    check_window_fits(max_positions(model), window, what or f"model {model_name(model)}")


def check_window_fits(limit: int | None, window: int, what: str) -> None:
    """Raise a one-line error naming `what` (the model) if `window` is longer than the context length `limit`."""
    if limit is not None and window > limit:
        raise ValueError(f"{what}: window {window} is longer than its context length {limit} (lower the window)")


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) under softmax(logits[..., :vocab_size] / temperature), in float32 or better.

    Tokens past the logits' width (a model smaller than the tokenizer) get log-prob -inf.
    """
    logits = align_vocab(logits, vocab_size)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def target_stats(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                 temperature: float = 1.0) -> torch.Tensor:
    """(log p(target), largest probability, entropy) (..., 3) in float32 of softmax(logits[..., :vocab_size] / T).

    The router's scalars (memdec.inference.router.distribution_scalars) and the target log-prob in one pass.
    """
    logits = align_vocab(logits, vocab_size)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    p = torch.exp(logits - lse)
    finite = torch.where(torch.isfinite(logits), logits, torch.zeros_like(logits))
    entropy = lse.squeeze(-1) - (p * finite).sum(dim=-1)
    top = torch.exp(logits.amax(dim=-1) - lse.squeeze(-1))
    lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse.squeeze(-1)
    return torch.stack([lp, top, entropy], dim=-1)


@torch.no_grad()
def token_logprobs(
    model,
    tokens: np.ndarray | torch.Tensor,
    window: int,
    stride: int | None = None,
    batch_size: int = 8,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    pad_id: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """float64 array of length n-1: entry i is log p(tokens[i+1] | its window's context)."""
    from tqdm.auto import tqdm

    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    n = int(tokens.numel())
    out = np.full(max(n - 1, 0), np.nan, dtype=np.float64)
    if n < 2:
        return out
    check_window(model, min(window, n))
    vocab_size = vocab_size or model.config.vocab_size
    device = next(model.parameters()).device
    windows = sliding_windows(n, window, stride)
    from memdec.inference import fast

    graph = device.type == "cuda" and fast.graph_base_enabled()
    if graph:  # MEMDEC_GRAPH_BASE=1: the model compiled and CUDA-graphed, fused target log-probs
        forward = fast.graphed(model)
    for i in tqdm(range(0, len(windows), batch_size), desc="score", disable=not progress):
        chunk = windows[i : i + batch_size]
        ids, attn, score = window_batch(tokens, chunk, pad_id)
        if graph:  # right padding changes no earlier position of a causal LM: no mask needed
            x = ids.to(device)
            lp = fast.target_logprobs(forward(x[:, :-1]), x[:, 1:], vocab_size, temperature).cpu().double()
        else:
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
            lp = target_logprobs(logits[:, :-1], ids[:, 1:].to(device), vocab_size, temperature).cpu().double()
        for b, w in enumerate(chunk):
            j0 = w.score_start - w.start  # first scored input position in this window
            out[w.score_start - 1 : w.end - 1] = lp[b, j0 - 1 : w.end - w.start - 1].numpy()
    return out


def perplexity(logprobs: np.ndarray) -> float:
    """exp of the mean negative log-likelihood (token-level perplexity)."""
    logprobs = np.asarray(logprobs, dtype=np.float64)
    if logprobs.size == 0:
        raise ValueError("perplexity of zero tokens is undefined")
    return float(math.exp(-logprobs.mean()))
