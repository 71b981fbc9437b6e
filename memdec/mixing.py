"""Interpolating two next-token distributions, and checking that two models can be mixed at all.

Everything that combines a base model with something else (the Memory Decoder, the kNN-LM,
`tune-lambda`) goes through these functions, so the formula lives in one place:

    log p = logaddexp(log(lmbda) + log p_mem, log(1 - lmbda) + log p_base)
"""

from __future__ import annotations

import hashlib
import json
import math

import torch


class TokenizerMismatchError(ValueError):
    """Two models (or a model and a datastore) do not share a tokenizer."""


def check_lmbda(lmbda: float, name: str = "lmbda") -> float:
    """Return `lmbda` as a float, or raise a one-line error if it is not in [0, 1]."""
    try:
        value = float(lmbda)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {lmbda!r}") from None
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def mix_logprobs(base_logp: torch.Tensor, other_logp: torch.Tensor, lmbda: float) -> torch.Tensor:
    """log(lmbda * p_other + (1 - lmbda) * p_base), elementwise, from log-probabilities.

    lmbda = 0 returns `base_logp` exactly and lmbda = 1 returns `other_logp` exactly.
    """
    lmbda = check_lmbda(lmbda)
    if lmbda == 0.0:
        return base_logp
    if lmbda == 1.0:
        return other_logp
    return torch.logaddexp(other_logp + math.log(lmbda), base_logp + math.log1p(-lmbda))


def align_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Cut or pad the last dimension of `logits` to the tokenizer's length `vocab_size`.

    Models of one family often pad their embedding matrix (Qwen2.5: 151936 vs 152064 rows) beyond
    the tokenizer's length; those extra rows are never real tokens, so they are dropped. Missing rows
    (a model smaller than the tokenizer) get -inf: the model gives them no probability.
    """
    n = logits.shape[-1]
    if n == vocab_size:
        return logits
    if n > vocab_size:
        return logits[..., :vocab_size]
    pad = logits.new_full((*logits.shape[:-1], vocab_size - n), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


def log_softmax(logits: torch.Tensor, vocab_size: int, temperature: float = 1.0) -> torch.Tensor:
    """Float32 log-softmax over the first `vocab_size` entries, after dividing by `temperature`."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = align_vocab(logits, vocab_size).float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the token -> id mapping and the special tokens: equal iff the tokenizers agree."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def tokenizer_name(tokenizer) -> str:
    """A human-readable name for error messages."""
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def check_same_tokenizer(tok_a, tok_b, what_a: str = "base", what_b: str = "memory") -> None:
    """Raise TokenizerMismatchError (one line, naming both) unless the two tokenizers agree."""
    fa, fb = tokenizer_fingerprint(tok_a), tokenizer_fingerprint(tok_b)
    if fa != fb:
        raise TokenizerMismatchError(
            f"{what_a} tokenizer {tokenizer_name(tok_a)!r} ({len(tok_a)} tokens, {fa}) differs from "
            f"{what_b} tokenizer {tokenizer_name(tok_b)!r} ({len(tok_b)} tokens, {fb}); "
            "a Memory Decoder only mixes with models that share its tokenizer"
        )


def check_fingerprint(tokenizer, fingerprint: str, what: str) -> None:
    """Raise TokenizerMismatchError unless `tokenizer` has the fingerprint recorded for `what`."""
    mine = tokenizer_fingerprint(tokenizer)
    if mine != fingerprint:
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer_name(tokenizer)!r} ({mine}) differs from the one {what} was built "
            f"with ({fingerprint})"
        )
