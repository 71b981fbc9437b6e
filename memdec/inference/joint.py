"""A base LM and a Memory Decoder run side by side: mixed log-probs, perplexity and generation.

    log p = logaddexp(log(lmbda) + log p_mem, log(1 - lmbda) + log p_base)      (memdec.inference.mixing)

The memory's logits may be divided by `mem_temperature` before its softmax. Both models see the same
token ids; their vocabularies are aligned to the tokenizer's length (memdec.inference.mixing.align_vocab), so a
memory serves every base that shares its tokenizer whatever the padded embedding size.

Generation keeps one KV cache per model. One decode loop (`generate_tokens`) serves every mixture:
it asks a `step(input_ids, attention_mask, state) -> (next-token log-probs (B, V), state)` for the
mixture's distribution, applies transformers' logits processors and picks greedily or by sampling.
`MemoryDecoder._step` runs both models with dynamic caches; on CUDA, unpadded batches take
a GraphedDecoder's `decode_step` instead (memdec.inference.fast: static caches, both models' step and the
mixture captured in one CUDA graph, the memory on a side stream), which gives the same distributions
(`fast_decode`).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from memdec.core.errors import first_line
from memdec.core.models import (  # noqa: F401  (re-exported: memdec.inference.joint's names)
    MEMDEC_JSON,
    check_context,
    load_causal_lm,
    load_tokenizer,
    max_positions,
    read_memdec_json,
    resolve_model_path,
)
from memdec.inference.fast import GraphedDecoder, cache_kwarg, mixture_logprobs
from memdec.inference.mixing import (
    check_lmbda,
    check_same_tokenizer,
    lmbda_property,
    log_softmax,
    mix_logprobs,
)
from memdec.inference.scoring import mixed_logprobs, pair_logprobs, perplexity

DEFAULT_LMBDA = 0.5

# Generation settings this decoder honours; anything else set away from its default is refused.
_UNSUPPORTED = {"num_beams": 1, "num_return_sequences": 1, "return_dict_in_generate": False,
                "output_scores": False, "output_logits": False}
_GEN_DEFAULTS: dict[str, Any] = {
    "max_length": 20, "min_length": 0, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    "min_p": None, "repetition_penalty": 1.0, **_UNSUPPORTED,
}


# ---- loading ----


def check_temperature(value: Any, name: str = "mem_temperature") -> float:
    """Return `value` as a float, or raise a one-line error naming `name` unless it is a number > 0."""
    try:
        temperature = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number > 0, got {value!r}") from None
    if not temperature > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return temperature


def default_lmbda(info: dict[str, Any]) -> float:
    """The lmbda a memory suggests in its memdec.json, else DEFAULT_LMBDA."""
    value = info.get("lmbda")
    return check_lmbda(value, f"{MEMDEC_JSON} lmbda") if value is not None else DEFAULT_LMBDA


def check_memory_tokenizer(base_tokenizer, memory: str, memory_revision: str | None = None,
                           trust_remote_code: bool = False) -> None:
    """Refuse (TokenizerMismatchError, one line naming both) a memory whose tokenizer differs from the base's."""
    from memdec.inference.mixing import check_fingerprint

    try:
        mem_tok = load_tokenizer(memory, "memory", memory_revision, trust_remote_code)
    except FileNotFoundError:
        fingerprint = read_memdec_json(memory, memory_revision).get("tokenizer_fingerprint")
        if not fingerprint:
            raise
        check_fingerprint(base_tokenizer, fingerprint, f"memory {memory}")
        return
    check_same_tokenizer(base_tokenizer, mem_tok, "base", "memory")


# ---- forward passes ----


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (left padding allowed); padded slots get position 1, as HF does."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


@torch.no_grad()
def model_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int,
                   temperature: float = 1.0) -> torch.Tensor:
    """Float32 next-token log-probs (B, T, vocab_size) of a causal LM (left padding allowed)."""
    device = model.device
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(device)}
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        kwargs.update(attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask))
    return log_softmax(model(**kwargs).logits, vocab_size, temperature)


@torch.no_grad()
def model_logprobs_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int,
                          temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`model_logprobs` and the final hidden state (B, T, H) that fed the LM head (for a router)."""
    from memdec.inference.fast import capture_head_input

    with capture_head_input(model) as seen:
        logp = model_logprobs(model, input_ids, attention_mask, vocab_size, temperature)
    return logp, seen[-1]


# ---- the decode loop ----

Step = Callable[[torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, Any]]


def resolve_generation_config(model_config, generation_config=None, **kwargs):
    """HF's precedence: kwargs > `generation_config` > the model's generation_config > global defaults.

    Unknown kwargs and settings this decoder does not implement (beam search, several sequences per
    prompt, dict outputs) raise a one-line ValueError.
    """
    from transformers import GenerationConfig

    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    unused = config.update(**kwargs)
    unused.pop("use_cache", None)
    if unused:
        raise ValueError(f"generate: unknown argument(s) {', '.join(sorted(unused))}")
    layers = [model_config.to_dict() if model_config is not None else {}, _GEN_DEFAULTS]
    for source in layers:
        for key, value in source.items():
            if hasattr(config, key) and getattr(config, key) is None and value is not None:
                setattr(config, key, value)
    for key, ok in _UNSUPPORTED.items():
        value = getattr(config, key, ok)
        if value not in (None, ok):
            raise ValueError(f"generate: {key}={value} is not supported (greedy decoding or sampling only)")
    return config


def eos_ids(config) -> list[int]:
    """The generation config's end-of-sequence ids as a list."""
    eos = config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def logits_processors(config, prompt_length: int, device: torch.device | str = "cpu"):
    """transformers' processors/warpers for `config`: penalties and minimum lengths, then sampling warpers."""
    from transformers import (
        LogitsProcessorList,
        MinLengthLogitsProcessor,
        MinNewTokensLengthLogitsProcessor,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    eos = eos_ids(config)
    if config.repetition_penalty not in (None, 1.0):
        procs.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if eos and config.min_length:
        procs.append(MinLengthLogitsProcessor(config.min_length, eos, device=str(device)))
    if eos and config.min_new_tokens:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_length, config.min_new_tokens, eos, device=str(device)))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            procs.append(TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            procs.append(TopPLogitsWarper(config.top_p))
        if config.min_p:
            procs.append(MinPLogitsWarper(config.min_p))
    return procs


@torch.no_grad()
def generate_tokens(
    step: Step,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    generation_config=None,
    model_generation_config=None,
    stopping_criteria: Sequence | None = None,
    tokenizer=None,
    context_limit: int | None = None,
    **kwargs,
) -> torch.LongTensor:
    """Prompt + generated ids (B, L + new), like HF `generate` for a decoder-only model.

    `step(ids, mask, state) -> (log-probs (B, V) of the next token, state)` gives the mixture's
    distribution after the whole sequence `ids`; `state` starts as None. Greedy or sampling
    (temperature, top-k, top-p, min-p), repetition penalty, min length, EOS / pad ids, stop strings
    (`stop_strings` with a `tokenizer`) and extra StoppingCriteria are honoured. Finished rows are
    filled with the pad id. `context_limit` refuses a total length no model can take.
    """
    from transformers import StoppingCriteriaList, StopStringCriteria

    config = resolve_generation_config(model_generation_config, generation_config, **kwargs)
    if input_ids.dim() != 2:
        raise ValueError(f"generate: input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    batch, prompt_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(input_ids.device).long()
    max_length = prompt_len + config.max_new_tokens if config.max_new_tokens is not None else config.max_length
    if context_limit is not None and max_length > context_limit:
        raise ValueError(f"generate: {max_length} tokens (prompt {prompt_len} + new) exceed the context length "
                         f"{context_limit} of the joint model")
    eos = eos_ids(config)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    procs = logits_processors(config, prompt_len, input_ids.device)
    stops = StoppingCriteriaList(list(stopping_criteria or []))
    if config.stop_strings:
        if tokenizer is None:
            raise ValueError("generate: stop_strings needs the tokenizer")
        stops.append(StopStringCriteria(tokenizer, config.stop_strings))
    eos_t = torch.tensor(eos, dtype=torch.long, device=input_ids.device)

    ids, mask, state = input_ids, attention_mask, None
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    while ids.shape[1] < max_length and bool(unfinished.any()):
        logp, state = step(ids, mask, state)
        scores = procs(ids, logp.float())
        if config.do_sample:
            nxt = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            nxt = scores.argmax(dim=-1)
        nxt = torch.where(unfinished, nxt.to(ids.device), torch.full_like(nxt, pad, device=ids.device))
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        if len(eos_t):
            unfinished &= ~torch.isin(nxt, eos_t)
        if len(stops):
            done = stops(ids, scores)
            unfinished &= ~torch.as_tensor(done, device=ids.device).expand(batch).bool()
    return ids


# ---- the joint model ----


@dataclass
class _Caches:
    """Decode state of the joint model: one KV cache per model and how many tokens they hold."""

    seen: int = 0
    caches: dict[str, Any] = field(default_factory=dict)


def resolve_lmbda(lmbda: Any, router: Any, threshold: Any, memdec_json: dict[str, Any]) -> float:
    """The fixed mixture weight, checked once: `lmbda` if given (refused beside a router), else the memory's
    memdec.json lmbda, else DEFAULT_LMBDA. Called before any weights load."""
    value = None if lmbda is None else check_lmbda(lmbda)  # a bad value is its own error, even beside a router
    check_router_args(lmbda, router, threshold)
    return default_lmbda(memdec_json) if value is None else value


def check_router_args(lmbda: Any, router: Any, threshold: Any) -> None:
    """One-line errors for lmbda and router together, a missing router folder, a threshold outside [0, 1]."""
    from memdec.inference.router import ROUTER_CONFIG, check_threshold

    check_threshold(threshold)
    if router is None:
        if threshold is not None:
            raise ValueError("router_threshold needs a router")
        return
    if lmbda is not None:
        raise ValueError(f"lmbda={lmbda} and router={router} together: a router sets the weights per token; "
                         "give one of them")
    if not isinstance(router, str | os.PathLike):
        return
    if not os.path.isdir(router):
        raise FileNotFoundError(f"router {router}: no such folder")
    if not os.path.isfile(os.path.join(router, ROUTER_CONFIG)):
        raise FileNotFoundError(f"router {router}: {ROUTER_CONFIG} is missing (not a router folder)")


def load_router(router: Any, threshold: float | None, base=None, memory=None, tokenizer=None):
    """A memdec.inference.router.Router from a folder (or one given), checked against the models; None stays None."""
    from memdec.inference.router import Router, check_threshold

    threshold = check_threshold(threshold)
    if router is None:
        if threshold is not None:
            raise ValueError("router_threshold needs a router")
        return None
    if isinstance(router, Router):
        router.check(base, memory, tokenizer)
        if threshold is not None:
            router.threshold = threshold
        return router
    return Router.load(str(router), threshold, base, memory, tokenizer)


class MemoryDecoder:
    """A base causal LM mixed with a Memory Decoder: p = lmbda * p_mem + (1 - lmbda) * p_base.

    With a `router` (memdec.inference.router), the weights are per token instead: log p = logaddexp(log w_base +
    log p_base, log w_mem + log p_mem), w from both models' final hidden states (lmbda is then unused).
    """

    def __init__(self, base, memory, tokenizer, lmbda: float = DEFAULT_LMBDA, mem_temperature: float = 1.0,
                 memory_name: str | None = None, memory_revision: str | None = None, router: Any = None,
                 router_threshold: float | None = None) -> None:
        self.base = base.eval()
        self.memory = memory.eval()
        self.tokenizer = tokenizer
        self.lmbda = lmbda
        self.mem_temperature = check_temperature(mem_temperature)
        self.memory_name = memory_name or getattr(memory, "name_or_path", None)
        self.memory_revision = memory_revision
        self.router = load_router(router, router_threshold, base, memory, tokenizer)
        if self.router is not None:
            self.router.to(base.device)

    lmbda = lmbda_property("Weight of the memory in the fixed mixture, in [0, 1] (checked on every assignment).")

    @classmethod
    def from_pretrained(
        cls,
        base: str,
        memory: str,
        lmbda: float | None = None,
        mem_temperature: float = 1.0,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        revision: str | None = None,
        memory_revision: str | None = None,
        trust_remote_code: bool = False,
        router: str | None = None,
        router_threshold: float | None = None,
    ) -> MemoryDecoder:
        """Load base and memory (local folders or hub ids); lmbda defaults to the memory's memdec.json, else 0.5.

        Tokenizers are compared before any weights are loaded; the memory gets the base's device and dtype.
        With `router` (a memdec train-router folder) the mixture is routed per token; lmbda must then be None.
        """
        check_temperature(mem_temperature)
        base = resolve_model_path(base, "base")
        memory = resolve_model_path(memory, "memory")
        lmbda = resolve_lmbda(lmbda, router, router_threshold, read_memdec_json(memory, memory_revision))
        tokenizer = load_tokenizer(base, "base", revision, trust_remote_code)
        check_memory_tokenizer(tokenizer, memory, memory_revision, trust_remote_code)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        base_model = load_causal_lm(base, "base", revision, dtype, device, trust_remote_code)
        mem_model = load_causal_lm(memory, "memory", memory_revision, base_model.dtype, base_model.device,
                                   trust_remote_code)
        return cls(base_model, mem_model, tokenizer, lmbda, mem_temperature, memory, memory_revision, router,
                   router_threshold)

    # -- properties --

    @property
    def vocab_size(self) -> int:
        """Length of the shared tokenizer: the size of every distribution this model returns."""
        return len(self.tokenizer)

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def max_length(self) -> int | None:
        """The longest context both models accept (None if neither config says)."""
        limits = [m for m in (max_positions(self.base), max_positions(self.memory)) if m is not None]
        return min(limits) if limits else None

    # -- full-sequence log-probs --

    def base_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The base's float32 next-token log-probs (B, T, V)."""
        return model_logprobs(self.base, input_ids, attention_mask, self.vocab_size)

    def memory_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The memory's float32 next-token log-probs (B, T, V), after `mem_temperature`."""
        return model_logprobs(self.memory, input_ids, attention_mask, self.vocab_size, self.mem_temperature)

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mixed float32 next-token log-probs (B, T, len(tokenizer)); left padding allowed."""
        if self.router is not None:
            base, bh = model_logprobs_hidden(self.base, input_ids, attention_mask, self.vocab_size)
            mem, mh = model_logprobs_hidden(self.memory, input_ids, attention_mask, self.vocab_size,
                                            self.mem_temperature)
            return self.router.mix(base, mem.to(base.device), bh, mh)
        base = self.base_logprobs(input_ids, attention_mask)
        return mix_logprobs(base, self.memory_logprobs(input_ids, attention_mask).to(base.device), self.lmbda)

    # -- perplexity --

    def perplexity(self, texts: Sequence[str], window: int | None = None, stride: int | None = None,
                   batch_size: int = 8, progress: bool = False) -> dict[str, float]:
        """Token-level perplexity of the documents (concatenated with EOS between) under sliding windows.

        `window` defaults to min(1024, both context lengths), `stride` to half the window.
        Returns {'perplexity', 'nll' (mean per token), 'tokens', 'base_perplexity', 'memory_perplexity'}.
        """
        from memdec.inference.scoring import model_name
        from memdec.pipeline.data import default_stride, default_window, tokenize

        if isinstance(texts, str):
            texts = [texts]
        window = int(window or default_window(max_positions(self.base), max_positions(self.memory)))
        stride = int(stride or default_stride(window))
        check_context(self.base, window, f"base model {model_name(self.base)}", " (lower window)")
        check_context(self.memory, window, f"memory {self.memory_name}", " (lower window)")
        tokens = tokenize(texts, self.tokenizer, progress=progress)
        if len(tokens) < 2:
            raise ValueError(f"perplexity: the texts hold {len(tokens)} token(s); at least 2 are needed")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        common = dict(window=window, stride=stride, batch_size=batch_size, vocab_size=self.vocab_size, pad_id=pad,
                      progress=progress)
        if self.router is not None:
            from memdec.inference.router import model_features, routed_target_logprobs

            fb = model_features(self.base, tokens, what="base", **common)
            fm = model_features(self.memory, tokens, temperature=self.mem_temperature, what="memory", **common)
            base, mem = fb["logp"], fm["logp"]
            lw = self.router.feature_log_weights(fb, fm).double()
            mixed = routed_target_logprobs(torch.from_numpy(base), torch.from_numpy(mem), lw).numpy()
        else:
            base, mem = pair_logprobs(self.base, self.memory, tokens, mem_temperature=self.mem_temperature, **common)
            mixed = mixed_logprobs(base, mem, self.lmbda)
        return {"perplexity": perplexity(mixed), "nll": float(-np.mean(mixed)), "tokens": int(mixed.size),
                "base_perplexity": perplexity(base), "memory_perplexity": perplexity(mem)}

    # -- generation --

    def _model_step(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """One forward of one model over the new tokens with its KV cache: (last-position logits (B, V'), cache).

        With a router, the last position's final hidden state is kept in `self._hidden[model]`.
        """
        from memdec.inference.fast import capture_head_input

        device = model.device
        name = cache_kwarg(model)
        if self.router is None:
            out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                        position_ids=position_ids.to(device), use_cache=True, logits_to_keep=1, **{name: cache})
            return out.logits[:, -1, :], getattr(out, name)
        with capture_head_input(model) as seen:
            out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                        position_ids=position_ids.to(device), use_cache=True, logits_to_keep=1, **{name: cache})
        self.__dict__.setdefault("_hidden", {})[id(model)] = seen[-1][:, -1]
        return out.logits[:, -1, :], getattr(out, name)

    def _step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: _Caches | None):
        """Mixed next-token log-probs (B, V) after `input_ids`, feeding each model only what its cache lacks."""
        state = state or _Caches()
        new = slice(state.seen, input_ids.shape[1])
        positions = position_ids_from_mask(attention_mask)[:, new]
        base_logits, state.caches["base"] = self._model_step(
            self.base, input_ids[:, new], attention_mask, positions, state.caches.get("base"))
        mem_logits, state.caches["memory"] = self._model_step(
            self.memory, input_ids[:, new], attention_mask, positions, state.caches.get("memory"))
        state.seen = input_ids.shape[1]
        if self.router is not None:
            from memdec.inference.mixing import log_softmax

            hid = self.__dict__["_hidden"]
            return self.router.mix(log_softmax(base_logits, self.vocab_size),
                                   log_softmax(mem_logits, self.vocab_size, self.mem_temperature).to(base_logits.device),
                                   hid[id(self.base)], hid[id(self.memory)]), state
        return mixture_logprobs(base_logits, mem_logits.to(base_logits.device), self.lmbda, self.vocab_size,
                                self.mem_temperature), state

    # -- fast decoding (memdec.inference.fast): static caches, one CUDA graph per step for both models --

    #: decode with memdec.inference.fast.GraphedDecoder: None = on CUDA only (the plain loop elsewhere), True/False forces it
    fast_decode: bool | None = None

    def _fast_decode_ok(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
        wanted = self.device.type == "cuda" if self.fast_decode is None else self.fast_decode
        if not wanted or self.memory.device != self.base.device:
            return False
        return attention_mask is None or bool(attention_mask.bool().all())  # left padding: the plain loop

    def _fast_decoder(self, batch: int, total: int):
        """A GraphedDecoder for `batch` rows and at least `total` tokens (sizes rounded up, one kept)."""
        size = -(-(total + 1) // 256) * 256
        if self.max_length is not None:
            size = max(total + 1, min(size, self.max_length))
        lmbda, temperature, vocab, router = self.lmbda, self.mem_temperature, self.vocab_size, self.router
        widths = [m.get_output_embeddings().weight.shape[0] for m in (self.base, self.memory)]

        def mixture(logits: tuple[torch.Tensor, ...]) -> torch.Tensor:  # part of the captured step on CUDA
            if router is not None:  # rows are [logits, final hidden state] (GraphedDecoder hidden=True)
                from memdec.inference.mixing import log_softmax

                (bl, bh), (ml, mh) = ((x[:, :w], x[:, w:]) for x, w in zip(logits, widths, strict=True))
                return router.mix(log_softmax(bl, vocab), log_softmax(ml, vocab, temperature).to(bl.device), bh,
                                  mh.to(bl.device))
            return mixture_logprobs(logits[0], logits[1].to(logits[0].device), lmbda, vocab, temperature)

        key = (batch, size, lmbda, temperature) + (() if router is None else (id(router), router.threshold))
        decoders = self.__dict__.setdefault("_decoders", {})
        if key not in decoders:
            decoders.clear()  # each holds two static KV caches
            decoders[key] = GraphedDecoder([self.base, self.memory], batch, size, post=mixture,
                                           hidden=router is not None)
        return decoders[key]

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 generation_config=None, stopping_criteria: Sequence | None = None, **kwargs) -> torch.LongTensor:
        """Like HF `generate` (greedy or sampling) on the mixture; returns prompt + new token ids.

        Settings: a GenerationConfig and/or kwargs (max_new_tokens, max_length, do_sample, temperature,
        top_k, top_p, min_p, repetition_penalty, min_new_tokens, eos_token_id, pad_token_id,
        stop_strings); unset ones come from the base's generation_config. Batches are left-padded
        (pass attention_mask).
        """
        if input_ids is None:
            raise ValueError("generate: give input_ids (e.g. tokenizer(texts, return_tensors='pt', padding=True))")
        input_ids = input_ids.to(self.device)
        if kwargs.get("pad_token_id") is None and self.tokenizer.pad_token_id is not None:
            if generation_config is None or generation_config.pad_token_id is None:
                kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        model_config = getattr(self.base, "generation_config", None)
        args = (input_ids, attention_mask, generation_config, model_config, stopping_criteria, self.tokenizer,
                self.max_length)
        if not self._fast_decode_ok(input_ids, attention_mask):
            return generate_tokens(self._step, *args, **kwargs)
        config = resolve_generation_config(model_config, generation_config, **kwargs)
        total = input_ids.shape[1] + config.max_new_tokens if config.max_new_tokens is not None else config.max_length
        if self.max_length is not None and total >= self.max_length:
            return generate_tokens(self._step, *args, **kwargs)  # no room for a rounded-up static cache
        try:
            return generate_tokens(self._fast_decoder(input_ids.shape[0], total).decode_step, *args, **kwargs)
        except ValueError:  # bad settings: the plain loop would refuse them too
            raise
        except Exception as e:  # compiling / graph capture problems: warn once, decode the plain way
            warnings.warn(f"memdec: fast decoding failed ({type(e).__name__}: {first_line(e)}); using the plain decode "
                          "loop from now on (MemoryDecoder.fast_decode = False)", stacklevel=2)
            self.fast_decode = False
            self.__dict__.pop("_decoders", None)
            return generate_tokens(self._step, *args, **kwargs)

    def __repr__(self) -> str:
        mix = f"router={self.router.path!r}" if self.router is not None else f"lmbda={self.lmbda}"
        return (f"MemoryDecoder(base={getattr(self.base, 'name_or_path', '?')!r}, memory={self.memory_name!r}, "
                f"{mix}, mem_temperature={self.mem_temperature})")



def generate_text(base: str, memory: str, prompts: Sequence[str], lmbda: float | None = None,
                  mem_temperature: float = 1.0, device: str | None = None, dtype: str = "auto",
                  batch_size: int = 8, router: str | None = None, router_threshold: float | None = None,
                  **generation: Any) -> list[str]:
    """Continuations of `prompts` under the mixture (`memdec generate`); `generation` as for `MemoryDecoder.generate`."""
    joint = MemoryDecoder.from_pretrained(base, memory, lmbda=lmbda, mem_temperature=mem_temperature, dtype=dtype,
                                          device=device, router=router, router_threshold=router_threshold)
    tok = joint.tokenizer
    if tok.pad_token is None and tok.eos_token is not None:  # (GPT-2's) batches of prompts are padded with EOS
        tok.pad_token = tok.eos_token
    side, tok.padding_side = tok.padding_side, "left"
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tok(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
            ids = joint.generate(enc["input_ids"], enc["attention_mask"], **generation)
            out += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return out
