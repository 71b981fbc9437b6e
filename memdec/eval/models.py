"""lm-eval models that mix a base LM with something else (`memdec-eval` itself is memdec.eval.launcher).

`MixtureLM` is lm-eval's HF model (HFLM: batching, batch_size=auto, max_length, dtype, device,
parallelize, `accelerate launch`) whose next-token log-probs are

    mix_logprobs(base_logp, self.other_logprobs(input_ids, attention_mask), lmbda)

mixed once, in `_model_call`, so loglikelihood, loglikelihood_rolling and batch-size detection all
see the mixture (HFLM's log_softmax of the returned log-probs is a no-op up to rounding). HFLM right-pads
each scoring batch and passes no mask; MixtureLM records each row's real length as HFLM pads the batch
(`_recording_padding`) and hands `other_logprobs` the real mask (the base runs unmasked, as in HFLM:
right padding never reaches a causal model's real positions). A subclass
(the `memdec` model below, the kNN-LM baseline) only implements `other_logprobs`; `mixed_logprobs`
calls `base_logprobs` first and then `other_logprobs` with the same tensors, so a subclass may
capture the base's hidden states on the way. Generation runs memdec.inference.joint's decode loop on the
mixture (a subclass may give a faster `_generation_step`).

A subclass that sets `fast_scoring` (the `memdec` model does, unless `fast=false`) scores requests
through memdec.inference.fast instead: only the scored positions' logits, each target's log-prob normalised
per model and mixed per token, the mixture's argmax only where lm-eval's is_greedy needs it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from memdec.inference.joint import (
    MemoryDecoder,
    check_context,
    check_memory_tokenizer,
    check_temperature,
    generate_tokens,
    load_causal_lm,
    load_tokenizer,
    model_logprobs,
    read_memdec_json,
    resolve_lmbda,
    resolve_model_path,
)
from memdec.inference.mixing import lmbda_property, mix_logprobs
from memdec.inference.scoring import max_positions

__all__ = ["MixtureLM", "MemDecLM", "cpu_data_parallel"]


def _check_model_args(args: dict[str, Any]) -> None:
    if "device" in args:
        raise ValueError(f"device={args['device']} inside --model_args: pass it as --device {args['device']} instead")


def cpu_data_parallel(lm: HFLM) -> HFLM:
    """Make an HFLM split its requests across the processes of a CPU launch (torchrun with
    ACCELERATE_USE_CPU=true: accelerate's gloo backend); returns `lm`.

    lm-eval's HFLM is data-parallel only with more than one GPU: on CPU every process keeps rank 0 of 1
    and evaluates everything. This gives it the accelerator's rank and world size instead (MixtureLM
    calls it); anything else (one process, GPUs, a device_map) is left as it is.
    """
    acc = getattr(lm, "accelerator", None)
    if acc is not None and lm.world_size == 1 and acc.num_processes > 1 and lm.device.type == "cpu":
        lm._rank, lm._world_size = acc.process_index, acc.num_processes
    return lm


class MixtureLM(HFLM):
    """HFLM whose distribution is lmbda * p_other + (1 - lmbda) * p_base; subclasses define `other_logprobs`."""

    def __init__(self, pretrained: Any, lmbda: float | None = 0.5, **kwargs: Any) -> None:
        if lmbda is not None:  # None: a subclass owns lmbda (MemDecLM: its MemoryDecoder's)
            self.lmbda = lmbda
        super().__init__(pretrained=pretrained, **kwargs)
        if self.backend != "causal":
            raise ValueError(f"{type(self).__name__}: {pretrained} is not a causal LM (only causal bases can be mixed)")
        cpu_data_parallel(self)

    # lm-eval builds models through these two: refuse device= in --model_args (it would shadow --device)
    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None):
        _check_model_args(arg_dict)
        return super().create_from_arg_obj(arg_dict, additional_config)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        _check_model_args(simple_parse_args_string(arg_string))
        return super().create_from_arg_string(arg_string, additional_config)

    lmbda = lmbda_property("Weight of the other distribution in the mixture, in [0, 1] (stored here only for "
                           "mixtures without an owner of their own: MemDecLM's is its MemoryDecoder's).")

    @property
    def mix_vocab_size(self) -> int:
        """Length of the tokenizer: the last dimension of every mixed distribution."""
        return len(self.tokenizer)

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                              enabled=self.mixed_precision_dtype is not None)

    def other_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token log-probs (B, T, mix_vocab_size) of the distribution mixed with the base.

        `attention_mask` (1 = real token) marks the right padding of lm-eval's scoring batches and the left
        padding of generation; positions then count real tokens only (memdec.inference.joint.position_ids_from_mask).
        It is None only for a batch MixtureLM did not see padded (e.g. batch-size detection: no padding).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement other_logprobs")

    def base_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The base model's float32 next-token log-probs (B, T, mix_vocab_size)."""
        with torch.no_grad(), self._autocast():
            return model_logprobs(self.model, input_ids, attention_mask, self.mix_vocab_size)

    def mixed_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       other_mask: torch.Tensor | None = None) -> torch.Tensor:
        """log(lmbda * p_other + (1 - lmbda) * p_base), (B, T, mix_vocab_size), float32.

        `other_mask`, if given, replaces `attention_mask` for `other_logprobs` only (scoring: the real tokens
        of a right-padded batch, which the base, like HFLM's, does not need).
        """
        base = self.base_logprobs(input_ids, attention_mask)
        with torch.no_grad(), self._autocast():
            other = self.other_logprobs(input_ids, attention_mask if other_mask is None else other_mask)
        return mix_logprobs(base, other.to(base.device), self.lmbda)

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is not None:
            raise ValueError(f"{type(self).__name__}: encoder-decoder models cannot be mixed")
        return self.mixed_logprobs(inps, other_mask=self._padding_mask(inps))

    # -- the real tokens of HFLM's right-padded scoring batches --

    #: each row's real length in the batch HFLM last padded (set by `_recording_padding`, taken by `_padding_mask`)
    _padded_lengths: list[int] | None = None

    @contextlib.contextmanager
    def _recording_padding(self) -> Iterator[None]:
        """While HFLM scores: record the real lengths of each batch it right-pads.

        HFLM's `_loglikelihood_tokens` knows every row's length but passes `_model_call` only the padded ids;
        it builds the batch with `lm_eval.models.huggingface.pad_and_concat`, which is wrapped here (and
        restored on exit) to note `[len(row) for row in rows]` first.
        """
        import lm_eval.models.huggingface as hf

        original = getattr(hf, "pad_and_concat", None)
        if original is None:  # another lm-eval layout: other_logprobs then sees every position as real
            yield
            return

        def pad_and_concat(max_length: int, tensors: list[torch.Tensor], padding_side: str = "right"):
            if padding_side == "right":  # the causal batch (pad_and_concat replaces the tensors in place)
                self._padded_lengths = [int(t.shape[-1]) for t in tensors]
            return original(max_length, tensors, padding_side)

        hf.pad_and_concat = pad_and_concat
        try:
            yield
        finally:
            hf.pad_and_concat = original
            self._padded_lengths = None

    def _padding_mask(self, inps: torch.Tensor) -> torch.Tensor | None:
        """(B, T) long, 1 at real tokens, of the batch just padded by HFLM; None if `inps` is not that batch."""
        lengths, self._padded_lengths = self._padded_lengths, None
        if lengths is None or len(lengths) != inps.shape[0] or max(lengths) != inps.shape[1]:
            return None
        real = torch.tensor(lengths, device=inps.device)
        return (torch.arange(inps.shape[1], device=inps.device) < real[:, None]).long()

    # -- fast scoring (memdec.inference.fast): only the targets' mixed log-probs, never a (B, T, V) mixture --

    #: whether `_loglikelihood_tokens` takes the fast path (a subclass opts in: it must define `other_scores`)
    fast_scoring: bool = False
    #: whether the fast path compiles and CUDA-graphs the base too (None: MEMDEC_GRAPH_BASE; `graph_base=` model_arg)
    graph_base: bool | None = None

    def other_scores(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        """The other distribution at the last `keep` positions, as logits or log-probs (B, keep, V')."""
        return self.other_logprobs(input_ids)[:, -keep:]

    @property
    def other_temperature(self) -> float:
        """Temperature dividing `other_scores` before their softmax."""
        return 1.0

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        # rolling windows ignore is_greedy: the fast path then skips the mixture's argmax
        self._rolling = True
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self._rolling = False

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """HFLM's batching (sorting, batch sizes, one-token-continuation cache) around memdec.inference.fast scoring."""
        if not self.fast_scoring:
            with self._recording_padding():
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        from lm_eval.models.utils import Collator
        from tqdm.auto import tqdm

        rolling = getattr(self, "_rolling", False)
        re_ord = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                          group_by="contexts" if self.logits_cache else None,
                          group_fn=lambda r: r[-2] + r[-1][:-1])
        n = len(re_ord)
        auto = self.batch_size == "auto"
        batch_size = self.batch_size if not auto else (override_bs if override_bs is not None else 0)
        batch_fn = self._batch_scheduler if auto and n > 0 and not override_bs else None
        if batch_fn is not None:
            self.batch_sizes = {}
        res = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
        for chunk in re_ord.get_batched(n=batch_size, batch_fn=batch_fn):
            scored = self._fast_score_chunk(chunk, greedy=not rolling)
            for (req_str, ctx, cont), (lp, am, last, q) in zip(chunk, scored, strict=True):
                for req_str_i, cont_i, _ in re_ord.get_cache(req_str=req_str, cxt_toks=ctx, cont_toks=cont,
                                                              logits=torch.zeros(1, 1, 1)):
                    c = len(cont_i)
                    # every request of a cache group shares all positions but the last one's target
                    logp = float(lp[q - c + 1 : q].sum()) + float(last[cont_i[-1]])
                    greedy = am is not None and am[q - c + 1 : q + 1].tolist() == list(cont_i)
                    answer = (logp, bool(greedy))
                    res.append(answer)
                    if req_str_i is not None:
                        self.cache_hook.add_partial("loglikelihood", req_str_i, answer)
                    pbar.update(1)
        pbar.close()
        return re_ord.get_original(res)

    def _fast_inputs(self, chunk) -> tuple[torch.Tensor, torch.Tensor, list[int], int, int]:
        """(input ids (B, T), targets (B, keep), input lengths, first kept position, keep) of a request chunk."""
        if any(not ctx or not cont for _, ctx, cont in chunk):
            raise ValueError("loglikelihood: every request needs a non-empty context and continuation")
        inps = [(list(ctx) + list(cont))[-(self.max_length + 1) :] for _, ctx, cont in chunk]
        inplens = [len(x) - 1 for x in inps]
        contlens = [len(cont) for _, _, cont in chunk]
        length = max(inplens)
        start = min(i - c for i, c in zip(inplens, contlens, strict=True))
        keep = length - start
        ids = torch.zeros((len(chunk), length), dtype=torch.long)
        targets = torch.zeros((len(chunk), keep), dtype=torch.long)
        for b, seq in enumerate(inps):
            ids[b, : inplens[b]] = torch.tensor(seq[:-1])
            tail = seq[start + 1 :]
            targets[b, : len(tail)] = torch.tensor(tail)
        return ids.to(self.device), targets.to(self.device), inplens, start, keep

    def _fast_score_chunk(self, chunk, greedy: bool):
        """Per request: (target log-probs, argmax or None, mixed log-probs at the last position, its index)."""
        from memdec.inference import fast

        ids, targets, inplens, start, keep = self._fast_inputs(chunk)
        q = torch.tensor([i - 1 - start for i in inplens], device=ids.device)
        with self._autocast():
            lp, am, last = fast.score_tokens(self.model, lambda x, _mask, k: self.other_scores(x, k).to(self.device),
                                             ids, targets, self.lmbda, self.mix_vocab_size, keep=keep,
                                             other_temperature=self.other_temperature, greedy=greedy,
                                             graph_base=self.graph_base, last_at=q)
        lp, last = lp.cpu(), last.cpu()
        am = am.cpu() if am is not None else None
        return [(lp[b], None if am is None else am[b], last[b], int(q[b])) for b in range(len(chunk))]

    # -- generation --

    def _generation_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: Any):
        """Mixed log-probs of the next token (B, V); this generic version recomputes the whole prefix."""
        return self.mixed_logprobs(input_ids, attention_mask)[:, -1, :], state

    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, stopping_criteria,
                  **kwargs: Any) -> torch.Tensor:
        return generate_tokens(self._generation_step, input_ids, attention_mask, None,
                               getattr(self.model, "generation_config", None), stopping_criteria, self.tokenizer,
                               **kwargs)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs: Any) -> torch.Tensor:
        from lm_eval.models.utils_hf import stop_sequences_criteria

        # lm-eval's conventions (as HFLM): temperature 0 or unset means greedy
        generation_kwargs["temperature"] = generation_kwargs.get("temperature", 0.0)
        if generation_kwargs["temperature"] == 0.0 and generation_kwargs.get("do_sample") is None:
            generation_kwargs["do_sample"] = False
        if generation_kwargs.get("do_sample") is False and generation_kwargs["temperature"] == 0.0:
            generation_kwargs.pop("temperature")
        attention_mask = generation_kwargs.pop("attention_mask", None)
        stopping = stop_sequences_criteria(self.tokenizer, stop, context.shape[1], context.shape[0])
        with self._autocast():
            return self._generate(context, attention_mask, stopping, max_length=max_length,
                                  pad_token_id=self.tokenizer.pad_token_id, **generation_kwargs)

    def get_model_info(self) -> dict:
        """HFLM's info plus the mixture's lmbda (lm-eval writes it into the results JSON's config)."""
        info = super().get_model_info()
        info.update(lmbda=self.lmbda, mixture=type(self).__name__)
        return info


def _base_tokenizer(pretrained: Any, kwargs: dict[str, Any]):
    tok = kwargs.get("tokenizer")
    if tok is not None and not isinstance(tok, str):
        return tok
    name = tok or (pretrained if isinstance(pretrained, str) else getattr(pretrained, "name_or_path", None))
    if not name:
        raise ValueError("memdec: cannot tell the base tokenizer; pass tokenizer=... in --model_args")
    revision = kwargs.get("revision") if tok is None else None
    return load_tokenizer(name, "base", revision, bool(kwargs.get("trust_remote_code", False)))


class MemDecLM(MixtureLM):
    """`--model memdec --model_args pretrained=BASE,memory=MEMDEC[,lmbda=...,mem_temperature=...]`.

    Without max_length in --model_args, max_length is the shorter of the two models' contexts.
    `router=ROUTER[,router_threshold=t]` (memdec train-router) mixes with per-token weights instead of lmbda;
    scoring then runs the plain path (full distributions and both models' final hidden states).
    """

    fast_scoring = True

    def __init__(self, pretrained: Any, memory: str | None = None, memory_revision: str | None = None,
                 lmbda: float | None = None, mem_temperature: float = 1.0, fast: bool | str = True,
                 graph_base: bool | str | None = None, router: str | None = None,
                 router_threshold: float | None = None, **kwargs: Any) -> None:
        if not memory:
            raise ValueError("memdec: give the Memory Decoder as memory=PATH_OR_ID in --model_args")
        fast = _as_bool(fast, "fast")
        self.graph_base = None if graph_base is None else _as_bool(graph_base, "graph_base")
        router = None if router is None else str(router)
        mem_temperature = check_temperature(mem_temperature)
        memory = resolve_model_path(str(memory), "memory")
        memory_revision = None if memory_revision is None else str(memory_revision)
        lmbda = resolve_lmbda(lmbda, router, router_threshold, read_memdec_json(memory, memory_revision))
        trust = bool(kwargs.get("trust_remote_code", False))
        # before any weights are loaded: the two tokenizers must agree
        check_memory_tokenizer(_base_tokenizer(pretrained, kwargs), memory, memory_revision, trust)
        super().__init__(pretrained, lmbda=None, **kwargs)  # lmbda lives in self.joint only
        mem_model = load_causal_lm(memory, "memory", memory_revision, self.model.dtype, self.device, trust)
        mem_limit = max_positions(mem_model)
        if kwargs.get("max_length") is None and mem_limit is not None and mem_limit < self.max_length:
            print(f"memdec: max_length {mem_limit}, the context length of memory {memory} (the base takes "
                  f"{self.max_length}; pass max_length in --model_args to choose)", file=sys.stderr)
            self._max_length = mem_limit  # no max_length given: the shorter of the two contexts
        check_context(mem_model, self.max_length, f"memory {memory}",
                      f" (max_length {self.max_length}); pass a smaller max_length in --model_args")
        self.joint = MemoryDecoder(self.model, mem_model, self.tokenizer, lmbda, mem_temperature, memory,
                                   memory_revision, router, router_threshold)
        if not fast:  # the plain paths: full mixtures for scoring, dynamic caches for decoding
            self.fast_scoring = False
            self.joint.fast_decode = False

    @property
    def lmbda(self) -> float:
        """The joint model's lmbda (its one owner)."""
        return self.joint.lmbda

    @lmbda.setter
    def lmbda(self, value: float) -> None:
        self.joint.lmbda = value

    def other_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.joint.memory_logprobs(input_ids, attention_mask)

    def mixed_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       other_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The lmbda mixture, or with a router the per-token routed mixture (memdec.inference.router; both
        models unmasked there: right padding never reaches a causal model's real positions)."""
        if self.joint.router is None:
            return super().mixed_logprobs(input_ids, attention_mask, other_mask)
        with torch.no_grad(), self._autocast():
            return self.joint.logprobs(input_ids, attention_mask)

    def other_scores(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        """The memory's raw logits at the last `keep` positions (normalised, after mem_temperature, by memdec.inference.fast).

        On CUDA the memory's forward is compiled and runs as one CUDA graph per padded batch shape
        (memdec.inference.fast.GraphedForward); the result is valid until the next call.
        """
        from memdec.inference import fast

        memory = self.joint.memory
        runner = self.__dict__.get("_memory_forward")
        hidden = self.joint.router is not None  # then (logits, final hidden state)
        if runner is None or runner.model is not memory or runner.hidden != hidden:
            runner = self.__dict__["_memory_forward"] = fast.GraphedForward(memory, hidden=hidden)
        with torch.no_grad():
            return runner(input_ids.to(memory.device), None, keep)

    @property
    def other_temperature(self) -> float:
        return self.joint.mem_temperature

    def _fast_score_chunk(self, chunk, greedy: bool):
        """With a router: per-token weights from both models' final hidden states and the four scalars of each
        distribution (memdec.inference.fast.routed_score_tokens, one fused pass per model's logits)."""
        if self.joint.router is None:
            return super()._fast_score_chunk(chunk, greedy)
        from memdec.inference import fast
        from memdec.inference.mixing import log_softmax
        from memdec.inference.router import routed_logprobs

        ids, targets, inplens, start, keep = self._fast_inputs(chunk)
        vocab, temp = self.mix_vocab_size, self.other_temperature
        with torch.no_grad(), self._autocast():
            lp, lw, (bl, _, ml, _) = fast.routed_score_tokens(
                self.model, lambda i, _m, k: tuple(o.to(self.device) for o in self.other_scores(i, k)), ids,
                targets, self.joint.router, vocab, keep, temp, self.graph_base)
        with torch.no_grad():
            lp = lp.cpu()
            am = None
            if greedy:
                rows, b_rows, m_rows, lw_rows = fast._rows_per_chunk(vocab), fast._rows(bl), fast._rows(ml), lw.reshape(-1, 2)
                am = torch.cat([routed_logprobs(log_softmax(b_rows[i : i + rows], vocab),
                                                log_softmax(m_rows[i : i + rows], vocab, temp),
                                                lw_rows[i : i + rows]).argmax(-1)
                                for i in range(0, b_rows.shape[0], rows)]).reshape(bl.shape[:-1]).cpu()
            q = torch.tensor([i - 1 - start for i in inplens], device=bl.device)
            r = torch.arange(len(chunk), device=bl.device)
            last = routed_logprobs(log_softmax(bl[r, q], vocab), log_softmax(ml[r, q], vocab, temp), lw[r, q]).cpu()
        return [(lp[b], am[b] if greedy else None, last[b], int(q[b])) for b in range(len(chunk))]

    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, stopping_criteria,
                  **kwargs: Any) -> torch.Tensor:
        # the joint model's decode loop: one KV cache per model
        return self.joint.generate(input_ids, attention_mask, stopping_criteria=stopping_criteria, **kwargs)

    def get_model_info(self) -> dict:
        """Adds the memory model, its revision, size, mem_temperature and whether the base was graphed."""
        from memdec.inference import fast

        info = super().get_model_info()
        mem = self.joint.memory
        info.update(memory=self.joint.memory_name, memory_revision=self.joint.memory_revision,
                    memory_sha=_hub_sha(self.joint.memory_name, self.joint.memory_revision),
                    mem_temperature=self.joint.mem_temperature, memory_num_parameters=mem.num_parameters(),
                    memory_dtype=str(mem.dtype), fast=self.fast_scoring,
                    graph_base=self.graph_base if self.graph_base is not None else fast.graph_base_enabled())
        if self.joint.router is not None:
            info.update(lmbda=None, router=self.joint.router.path, router_threshold=self.joint.router.threshold,
                        router_config=self.joint.router.summary())
        return info


def _as_bool(value: Any, name: str) -> bool:
    """A model_arg given as a bool or as true/false text (one-line error otherwise)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _as_int(value: Any, name: str) -> int:
    """A model_arg given as an int or as integer text (one-line error naming `name` otherwise)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return int(value) if isinstance(value, int) else int(str(value).strip())
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _hub_sha(name: str | None, revision: str | None) -> str:
    """The hub commit of a model id ('' for a local folder or when the hub cannot be asked)."""
    if not name or os.path.isdir(name):
        return ""
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo_id=name, revision=revision).sha or ""
    except Exception:  # offline, private or unknown: the results JSON just has no sha
        return ""


register_model("memdec")(MemDecLM)


_LAUNCHER_NAMES = ("cli_main", "register_models", "tasks_dir", "memdec_help")


def __getattr__(name: str):
    """The launcher's names, for entry points installed before memdec.eval.launcher existed (lazy: no import
    of the launcher, and so of baselines, when this module loads)."""
    if name in _LAUNCHER_NAMES:
        from memdec.eval import launcher

        return getattr(launcher, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
