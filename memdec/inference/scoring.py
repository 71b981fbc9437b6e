"""Per-token log-probabilities of a token stream under sliding windows (memdec.pipeline.data's windowing).

Mixing is elementwise in probability space, so the mixture's log-probability of the observed token
only needs each model's log-probability of that token: `perplexity` of a joint model and
`tune-lambda` both mix these per-token numbers (memdec.inference.mixing) instead of full distributions.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from memdec.core.models import check_context, context_length, max_positions, model_name  # noqa: F401  (re-exported)
from memdec.inference.mixing import align_vocab
from memdec.pipeline.data import sliding_windows, window_batch


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) under softmax(logits[..., :vocab_size] / temperature), in float32 or better.

    Tokens past the logits' width (a model smaller than the tokenizer) get log-prob -inf.
    """
    logits = _scaled(logits, vocab_size, temperature)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _scaled(logits: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """logits[..., :vocab_size] / temperature in float32 or better (padded with -inf past their width)."""
    logits = align_vocab(logits, vocab_size)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits / temperature if temperature != 1.0 else logits


def target_stats(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                 temperature: float = 1.0) -> torch.Tensor:
    """(log p(target), largest probability, entropy) (..., 3) in float32 of softmax(logits[..., :vocab_size] / T).

    The router's scalars (memdec.inference.router.distribution_scalars) and the target log-prob from one max
    and one sum pass over each row: with m the row's max, e = exp(x - m), s0 = sum(e) and s1 = sum(e * (x - m))
    over finite x, lse = m + log s0, entropy = log s0 - s1 / s0, largest probability = 1 / s0. (-inf entries
    add nothing; taking s1 about m, not 0, avoids cancelling two large numbers.)
    """
    x = _scaled(logits, vocab_size, temperature)
    m = x.amax(dim=-1, keepdim=True)
    d = x - m
    e = torch.exp(d)
    s0 = e.sum(dim=-1)
    s1 = (e * torch.where(torch.isfinite(d), d, torch.zeros_like(d))).sum(dim=-1)
    log_s0 = torch.log(s0)
    lse = m.squeeze(-1) + log_s0
    lp = x.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    return torch.stack([lp, s0.reciprocal(), log_s0 - s1 / s0], dim=-1)


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
    check_context(model, min(window, n))
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


def pair_logprobs(
    base: Any,
    memory: Any,
    tokens: np.ndarray | torch.Tensor,
    window: int,
    stride: int | None = None,
    batch_size: int = 8,
    vocab_size: int | None = None,
    mem_temperature: float = 1.0,
    pad_id: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The base's and the memory's per-token log-probs (`token_logprobs`, float64) over the same windows.

    Each of `base` / `memory` is a loaded model, a zero-argument loader (the model is loaded, scored and
    dropped: one model in memory at a time) or an array already scored (kept as given).
    """
    kw = dict(window=window, stride=stride, batch_size=batch_size, vocab_size=vocab_size, pad_id=pad_id,
              progress=progress)
    out = []
    for model, temperature in ((base, 1.0), (memory, mem_temperature)):
        if isinstance(model, np.ndarray):
            out.append(model)
            continue
        loaded = model() if callable(model) and not hasattr(model, "config") else model
        out.append(token_logprobs(loaded, tokens, temperature=temperature, **kw))
        del loaded
    return out[0], out[1]


def mixed_logprobs(base_logp: np.ndarray, memory_logp: np.ndarray, lmbda: float) -> np.ndarray:
    """Per-token log-probs of the lmbda mixture from the two models' (float64, memdec.inference.mixing)."""
    from memdec.inference.mixing import mix_logprobs

    base = torch.as_tensor(np.asarray(base_logp, dtype=np.float64))
    mem = torch.as_tensor(np.asarray(memory_logp, dtype=np.float64))
    if base.shape != mem.shape:
        raise ValueError(f"log-prob arrays differ in length: base {tuple(base.shape)}, memory {tuple(mem.shape)}")
    return mix_logprobs(base, mem, lmbda).numpy()


def perplexity(logprobs: np.ndarray) -> float:
    """exp of the mean negative log-likelihood (token-level perplexity)."""
    logprobs = np.asarray(logprobs, dtype=np.float64)
    if logprobs.size == 0:
        raise ValueError("perplexity of zero tokens is undefined")
    return float(math.exp(-logprobs.mean()))
