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


def lmbda_property(doc: str) -> property:
    """An `lmbda` attribute stored as `_lmbda` and checked by `check_lmbda` on every assignment."""

    def get(self) -> float:
        return self._lmbda

    def set_(self, value: float) -> None:
        self._lmbda = check_lmbda(value)

    return property(get, set_, doc=doc)


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


#: text tokenized into every fingerprint: the normalizer's and pre-tokenizer's effect on ids
FINGERPRINT_PROBE = (
    "Hello, world!  The year 2025: 3.14159 + 42 = 45.14159\n\tnew\tline\r\n"
    " leading space, trailing space \u00a0nbsp \u00c9t\u00e9 na\u00efve CAF\u00c9 \u00df\u00e4\u00f6\u00fc "
    "\u0394\u03b5\u03bb\u03c4\u03b1 \u0436\u0443\u0440\u043d\u0430\u043b \u4e2d\u6587\u5b57 "
    "\u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 "
    "\U0001f600\U0001f44d\ufb01 \u2460 x\u00b2 def f(x): return x**2  # code\n"
)


def _padding_only_id(tokenizer) -> int | None:
    """The pad token's id if it was added for padding only (an added token past the base vocabulary
    that is not also EOS/BOS/UNK, as lm-eval adds `<|pad|>`), else None."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        return None
    others = {getattr(tokenizer, f"{k}_token_id", None) for k in ("eos", "bos", "unk")}
    base = getattr(tokenizer, "vocab_size", None)
    return pad if pad not in others and isinstance(base, int) and pad >= base else None


def _merges(tokenizer) -> list[list[str]]:
    """BPE merges in rank order as [left, right] pairs ([] for other models)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        merges = json.loads(backend.to_str()).get("model", {}).get("merges") or []
        return [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
    ranks = getattr(tokenizer, "bpe_ranks", None)  # a slow BPE tokenizer
    return [list(pair) for pair, _ in sorted(ranks.items(), key=lambda kv: kv[1])] if ranks else []


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what decides token ids; equal iff the tokenizers give the same ids.

    Covered: the token -> id mapping (added tokens included), the BPE merges, the ids of the probe
    text FINGERPRINT_PROBE (the normalizer and pre-tokenizer at work), and the EOS/BOS/UNK ids.
    Not covered: the pad token (lm-eval's HFLM sets one on tokenizers without it, reusing UNK/EOS or
    adding `<|pad|>`; such an added pad token is left out of the mapping too), the special tokens a
    post-processor adds around a text (memdec tokenizes corpora without them; lm-eval's add_bos_token
    changes them), padding/truncation settings, model_max_length and the decoder.
    Form `sha256-v2:` + 16 hex digits; `check_fingerprint` also accepts the older `sha256:` form.
    """
    pad = _padding_only_id(tokenizer)
    vocab = sorted(((t, i) for t, i in tokenizer.get_vocab().items() if i != pad), key=lambda kv: (kv[1], kv[0]))
    payload = {
        "vocab": vocab,
        "merges": _merges(tokenizer),
        "probe": tokenizer(FINGERPRINT_PROBE, add_special_tokens=False)["input_ids"],
        "ids": {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("eos", "bos", "unk")},
    }
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return "sha256-v2:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _legacy_fingerprints(tokenizer) -> set[str]:
    """The fingerprint as memdec <= 0.1 computed it (vocab + special tokens map, pad token included),
    for the tokenizer as it is and without its pad token (as it was before lm-eval added one)."""
    out = set()
    for drop_pad in (False, True):
        pad = _padding_only_id(tokenizer) if drop_pad else None
        vocab = sorted(((t, i) for t, i in tokenizer.get_vocab().items() if i != pad), key=lambda kv: kv[1])
        special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())
                   if not (drop_pad and k == "pad_token")}
        payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
        out.add("sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16])
    return out


def same_fingerprint(tokenizer, fingerprint: str) -> bool:
    """True if `tokenizer` matches a recorded fingerprint (the current form, or the older `sha256:` one)."""
    if fingerprint.startswith("sha256-v2:"):
        return tokenizer_fingerprint(tokenizer) == fingerprint
    return fingerprint in _legacy_fingerprints(tokenizer)


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
    if not same_fingerprint(tokenizer, fingerprint):
        mine = tokenizer_fingerprint(tokenizer)
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer_name(tokenizer)!r} ({mine}) differs from the one {what} was built "
            f"with ({fingerprint})"
        )
