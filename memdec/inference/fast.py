"""Fast paths for a base LM mixed with a second model: fused scoring and graphed two-model decoding.

Scoring only needs each target token's mixed log-probability (and, for lm-eval's `is_greedy`, the
mixture's argmax at continuation positions), so nothing here materialises a (batch, length, vocab)
float32 mixture: per-position log-normalisers are computed in float32 row chunks (one fused kernel
per model through torch.compile on CUDA), and the target log-probabilities are mixed per token:

    log p(t) = logaddexp(log(lmbda) + log p_mem(t), log(1 - lmbda) + log p_base(t))

The second model's scoring forward (GraphedForward) is compiled (the whole forward, or with
MEMDEC_COMPILE_MODE=regional each decoder layer once per model) and, for batches up to a few thousand tokens, replayed as one CUDA graph per
right-padded shape, beside the base's forward on a side stream.

Decoding at batch 1 keeps both models' KV caches static, compiles each forward and captures one
decode step of both models in a single CUDA graph, the memory's forward on a side stream, so its
work overlaps with the base's. Everything has a plain torch path (CPU, or where compiling fails)
that gives the same numbers.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from memdec.core.compile_cache import use_compile_cache
from memdec.core.errors import first_line
from memdec.inference import scoring
from memdec.inference.mixing import align_vocab, check_lmbda, log_softmax, mix_logprobs

log = logging.getLogger(__name__)

#: bytes of float32 rows materialised at once by the plain (uncompiled) path
CHUNK_BYTES = 256 * 2**20

_COMPILED: dict[str, Any] = {}
_COMPILE_FAILED: set[str] = set()


def compile_enabled(device: torch.device) -> bool:
    """Whether fused kernels are compiled: on CUDA unless MEMDEC_COMPILE=0."""
    return device.type == "cuda" and os.environ.get("MEMDEC_COMPILE", "1") != "0"


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * max(vocab, 1)))


def _compiled(name: str, fn: Callable) -> Callable | None:
    if name in _COMPILE_FAILED:
        return None
    if name not in _COMPILED:
        use_compile_cache()
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


def _call_compiled(name: str, fn: Callable, *args) -> torch.Tensor | None:
    """fn compiled (CUDA), or None if compiling is off or failed (then the caller runs it eagerly)."""
    compiled = _compiled(name, fn)
    if compiled is None:
        return None
    try:
        return compiled(*args)
    except Exception as e:  # a compiler problem must never break scoring: fall back, once, loudly
        log.warning("memdec.inference.fast: compiling %s failed (%s); using the plain torch path", name, first_line(e, typed=True))
        _COMPILE_FAILED.add(name)
        return None


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _per_position(name: str, fn: Callable, logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                  temperature: float, width: int) -> torch.Tensor:
    """fn(logit rows, target rows, vocab_size, temperature) over all positions: float32 (*targets.shape[, width]).

    One fused compiled kernel on CUDA, else float32 row chunks: a float32 copy of all of `logits` is never made.
    """
    shape = targets.shape
    if logits.shape[:-1] != shape:
        raise ValueError(f"{name}: logits {tuple(logits.shape)} do not match targets {tuple(shape)}")
    if logits.shape[-1] < vocab_size:  # rare (a model smaller than the tokenizer): padded once, not per chunk
        logits = align_vocab(logits, vocab_size)
    x, t = _rows(logits), targets.reshape(-1)
    tail = (width,) if width else ()
    if x.shape[0] == 0:
        return torch.zeros(*shape, *tail, dtype=torch.float32, device=logits.device)
    if compile_enabled(x.device):
        out = _call_compiled(name, fn, x, t, vocab_size, float(temperature))
        if out is not None:
            return out.float().reshape(*shape, *tail)
    step = _rows_per_chunk(vocab_size)
    out = torch.empty(x.shape[0], *tail, dtype=torch.float32, device=x.device)
    for i in range(0, x.shape[0], step):
        out[i : i + step] = fn(x[i : i + step], t[i : i + step], vocab_size, temperature)
    return out.reshape(*shape, *tail)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                    temperature: float = 1.0) -> torch.Tensor:
    """float32 log softmax(logits[..., :vocab_size] / temperature) at `targets`, shape of `targets`.

    Works in float32 row chunks (or one fused compiled kernel on CUDA): a (rows, vocab) float32 copy
    of all of `logits` is never made. Entries past the logits' width get log-prob -inf.
    """
    return _per_position("target_logprobs", scoring.target_logprobs, logits, targets, vocab_size, temperature, 0)


def target_stats(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                 temperature: float = 1.0) -> torch.Tensor:
    """`target_logprobs` with each position's largest probability and entropy: float32 (*targets.shape, 3).

    One pass over the logits, as `target_logprobs` (the router's scalars come free with the target log-prob).
    """
    return _per_position("target_stats", scoring.target_stats, logits, targets, vocab_size, temperature, 3)


def mixture_target_logprobs(
    base_logits: torch.Tensor,
    other_logits: torch.Tensor,
    targets: torch.Tensor,
    lmbda: float,
    vocab_size: int,
    other_temperature: float = 1.0,
) -> torch.Tensor:
    """float32 log(lmbda * p_other(t) + (1 - lmbda) * p_base(t)) for each target t.

    Either input may be logits or log-probabilities (normalising log-probabilities is a no-op);
    `other_temperature` divides the other model's logits before its softmax.
    """
    lmbda = check_lmbda(lmbda)
    base_lp = target_logprobs(base_logits, targets, vocab_size) if lmbda < 1.0 else None
    other_lp = target_logprobs(other_logits, targets, vocab_size, other_temperature) if lmbda > 0.0 else None
    if base_lp is None:
        return other_lp
    if other_lp is None:
        return base_lp
    return mix_logprobs(base_lp, other_lp, lmbda)


def _mixture_rows_eager(base: torch.Tensor, other: torch.Tensor, lmbda: float, vocab_size: int,
                        other_temperature: float) -> torch.Tensor:
    return mix_logprobs(log_softmax(base, vocab_size), log_softmax(other, vocab_size, other_temperature), lmbda)


def mixture_logprobs(
    base_logits: torch.Tensor,
    other_logits: torch.Tensor,
    lmbda: float,
    vocab_size: int,
    other_temperature: float = 1.0,
) -> torch.Tensor:
    """float32 mixed log-probabilities (..., vocab_size) of the given rows: call it on few rows only."""
    lmbda = check_lmbda(lmbda)
    return _mixture_rows_eager(base_logits, other_logits, lmbda, vocab_size, other_temperature)


def mixture_argmax(
    base_logits: torch.Tensor,
    other_logits: torch.Tensor,
    lmbda: float,
    vocab_size: int,
    other_temperature: float = 1.0,
) -> torch.Tensor:
    """int64 argmax over the vocabulary of the mixture, per position, in float32 row chunks."""
    lmbda = check_lmbda(lmbda)
    shape = base_logits.shape[:-1]
    b, o = _rows(base_logits), _rows(other_logits)
    out = torch.empty(b.shape[0], dtype=torch.long, device=b.device)
    step = _rows_per_chunk(vocab_size)
    for i in range(0, b.shape[0], step):
        out[i : i + step] = _mixture_rows_eager(b[i : i + step], o[i : i + step], lmbda, vocab_size,
                                                other_temperature).argmax(-1)
    return out.reshape(shape)


# ---- running two models ----


@functools.cache
def _forward_params(model_class: type) -> frozenset[str]:
    """Names of the parameters of a model class's forward (empty if it has no readable signature)."""
    try:
        return frozenset(inspect.signature(model_class.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def accepts_logits_to_keep(model) -> bool:
    """Whether `model.forward` takes `logits_to_keep` (computing the LM head on the last positions only)."""
    return "logits_to_keep" in _forward_params(type(model))


def lm_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              keep: int = 0, forward: Callable | None = None) -> torch.Tensor:
    """Logits of a causal LM; with keep > 0 only the last `keep` positions (when the model allows it).

    `forward` runs in place of calling `model` (e.g. its compiled forward).
    """
    kwargs: dict[str, Any] = {} if attention_mask is None else {"attention_mask": attention_mask}
    if keep and accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = int(keep)
    logits = (forward or model)(input_ids=input_ids, use_cache=False, **kwargs).logits
    return logits[:, -keep:] if keep else logits


@contextlib.contextmanager
def capture_head_input(model) -> Iterator[list[torch.Tensor]]:
    """Record the input of `model`'s LM head (the final hidden state, after the final norm) on each eager forward.

    A forward pre-hook on `model.get_output_embeddings()`, registered for the block only. Eager calls only: a
    compiled forward may replay code traced without the hook (Dynamo shares compiled code between compiles
    of one function and does not guard on module hooks), so the compiled paths use `lm_logits_hidden`.
    """
    seen: list[torch.Tensor] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


_UNSET = object()


def head_split(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(backbone, LM head) of a causal LM whose logits are exactly `head(backbone(...)[0])`, else None.

    The backbone is `model.base_model` (Qwen2Model, GPT2Model, ...). Checked once per model: its own logits
    of a 4-token input must equal the split's bit for bit (after a cast to their dtype, where the model
    upcasts), which rules out final-logit soft-capping or scaling (Gemma 2, Cohere, Granite) that a causal
    LM class adds after the head. A model that fails the check still works (output_hidden_states), slower.
    """
    cached = model.__dict__.get("_memdec_head_split", _UNSET)
    if cached is not _UNSET:
        return cached
    result = None
    backbone = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(backbone, torch.nn.Module) and backbone is not model and isinstance(head, torch.nn.Module):
        ids = torch.zeros(1, 4, dtype=torch.long, device=next(model.parameters()).device)
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                want = model(input_ids=ids, use_cache=False).logits
                got = head(backbone(input_ids=ids, use_cache=False)[0])
            if want.shape == got.shape and torch.equal(want, got.to(want.dtype)):  # an upcast of the logits is exact
                result = (backbone, head)
        except Exception as e:  # an unusual model: the output_hidden_states path below still works
            log.info("memdec.inference.fast: %s: no backbone/head split (%s)", type(model).__name__, first_line(e, typed=True))
        finally:
            model.train(was)
    model.__dict__["_memdec_head_split"] = result
    return result


def hidden_target(model) -> torch.nn.Module:
    """What `lm_logits_hidden`'s `forward` stands in for: the backbone (`head_split`), else the model."""
    split = head_split(model)
    return model if split is None else split[0]


def lm_logits_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     keep: int = 0, forward: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`lm_logits` and the final hidden state (the LM head's input): ((B, T or keep, V'), (B, T or keep, H)).

    The backbone's last hidden state, cut to the last `keep` positions, then the head (`head_split`); models
    without that split run with output_hidden_states. `forward` runs in place of calling
    `hidden_target(model)` (e.g. its compiled forward). No hook: a compiled forward shares its code cache
    with every other compile of the same function, and Dynamo does not guard on module hooks.
    """
    kwargs: dict[str, Any] = {} if attention_mask is None else {"attention_mask": attention_mask}
    split = head_split(model)
    if split is not None:
        backbone, head = split
        hidden = (forward or backbone)(input_ids=input_ids, use_cache=False, **kwargs)[0]
        if keep:
            hidden = hidden[:, -keep:]
        return head(hidden), hidden
    out = (forward or model)(input_ids=input_ids, use_cache=False, output_hidden_states=True, **kwargs)
    logits, hidden = out.logits, out.hidden_states[-1]
    return (logits[:, -keep:], hidden[:, -keep:]) if keep else (logits, hidden)


def padded_shape(t: int, keep: int, bucket: int, limit: int | None = None) -> tuple[int, int, int]:
    """Right padding of a (B, t) input keeping its last `keep` positions (0: all): (padded length,
    positions the padded forward keeps (0: all), index of position t - keep in that output).

    Lengths round up to a multiple of `bucket` (never past `limit`, the model's positions, unless t is).
    """
    tb = -(-t // bucket) * bucket
    if limit:
        tb = min(tb, max(t, int(limit)))
    start = t - keep if keep else 0  # the first position wanted
    kb = min(tb, -(-(tb - start) // bucket) * bucket) if keep else 0
    kb = 0 if kb >= tb else kb
    return tb, kb, start - (tb - kb if kb else 0)


COMPILE_MODES = ("regional", "full")


def default_compile_mode() -> str:
    """How GraphedForward compiles a forward: MEMDEC_COMPILE_MODE=full (default: the whole forward) or regional
    (each decoder layer: first calls ~4x faster on CPU and ~10x on an H200, but there its CUDA-graph capture
    fails and it runs ungraphed, ~6 % slower at 8x1024; so opt-in)."""
    mode = os.environ.get("MEMDEC_COMPILE_MODE", "").strip().lower() or "full"
    if mode not in COMPILE_MODES:
        raise ValueError(f"MEMDEC_COMPILE_MODE={mode!r}: use one of {', '.join(COMPILE_MODES)}")
    return mode


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's repeated decoder blocks: its largest nn.ModuleList whose children all share one class
    (model.model.layers of Qwen2 / Llama, model.transformer.h of GPT-2), or None."""
    best = None
    for mod in model.modules():
        if (isinstance(mod, torch.nn.ModuleList) and len(mod) and len({type(c) for c in mod}) == 1
                and (best is None or len(mod) > len(best))):
            best = mod
    return best


class RegionalCompile:
    """One model's decoder layers, each compiled with `layer.compile(dynamic=True)` (PyTorch's regional
    compilation: identical layers reuse one compiled code, so a cold compile costs about one layer's, not the
    whole forward's), switched on only inside `active()`: the same model called anywhere else runs its plain
    layers (no recompiles for an attention mask or a KV cache, no compiled layer inside another torch.compile).
    """

    def __init__(self, layers: torch.nn.ModuleList, **compile_kwargs: Any) -> None:
        self.layers = list(layers)
        self.failed = False  # set when compiling failed in one of the model's runners: the others run plain
        self._compiled = []
        for layer in self.layers:
            before = layer._compiled_call_impl
            layer.compile(dynamic=True, **compile_kwargs)
            self._compiled.append(layer._compiled_call_impl)
            layer._compiled_call_impl = before

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copy of the model compiles its own layers (regional_compile makes them)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within the block, calling a layer runs its compiled code (unless compiling failed)."""
        before = [layer._compiled_call_impl for layer in self.layers]
        if not self.failed:
            for layer, fn in zip(self.layers, self._compiled, strict=True):
                layer._compiled_call_impl = fn
        try:
            yield
        finally:
            for layer, fn in zip(self.layers, before, strict=True):
                layer._compiled_call_impl = fn

    def wrap(self, forward: Callable) -> Callable:
        """`forward` run with the compiled layers active."""
        @functools.wraps(forward)
        def run(*args: Any, **kwargs: Any) -> Any:
            with self.active():
                return forward(*args, **kwargs)
        return run


def regional_compile(model: torch.nn.Module, **compile_kwargs: Any) -> RegionalCompile | None:
    """The model's one RegionalCompile (made on first use, shared by all its GraphedForwards), or None when
    it has no decoder layer list. `compile_kwargs` (e.g. a backend) go to `layer.compile` on first use only."""
    entry = model.__dict__.get("_memdec_regional")
    if entry is None:
        layers = decoder_layers(model)
        if layers is None:
            return None
        import torch._dynamo as dynamo

        # one entry per model size, batch-1 specialisation, plain / hidden variant: room for base and memory
        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        entry = model.__dict__["_memdec_regional"] = RegionalCompile(layers, **compile_kwargs)
    return entry


class _CompiledForwards(dict):
    """A model's compiled forwards, by compile settings; a deep copy of the model starts without them."""

    def __deepcopy__(self, memo: dict) -> _CompiledForwards:
        return _CompiledForwards()


class GraphedForward:
    """A causal LM's logits for right-padded batches (no attention mask); on CUDA compiled and graphed.

    Padding on the right never changes earlier positions of a causal LM, so on CUDA each batch of at
    most `max_tokens` padded tokens is padded on the right to a multiple of `bucket` tokens and each
    (batch, padded length, kept positions) shape runs as one captured CUDA graph of the compiled
    forward: no per-kernel launch cost, which dominates small batches. Larger batches run compiled,
    ungraphed. At most `max_graphs` graphs whose outputs together take at most `max_graph_bytes` are
    kept (least recently used dropped; they share one memory pool). Elsewhere, or where compiling or
    capturing fails, the plain forward runs (one warning). The result of a graphed call is valid until the
    next call. With `hidden`, the result is (logits, final hidden state) (`lm_logits_hidden`).

    `compile_mode` (None: MEMDEC_COMPILE_MODE, see `default_compile_mode`) says what is compiled. "regional"
    compiles each of the model's repeated decoder layers (`decoder_layers`,
    `layer.compile(dynamic=True)`) once per model, shared by its runners (plain and hidden) and active only
    during their forwards (`RegionalCompile`): identical layers share one compiled code, so a cold compile
    takes about one layer's time, while the CUDA graph still covers the whole forward. "full" compiles the
    whole forward (torch.compile(model.forward, dynamic=True); the default), as does "regional" for a model
    without a layer list.
    """

    def __init__(self, model, bucket: int = 64, max_graphs: int = 4, max_tokens: int = 8192,
                 max_graph_bytes: int = 3 * 2**30, use_graph: bool | None = None,
                 use_compile: bool | None = None, hidden: bool = False, compile_mode: str | None = None) -> None:
        self.model = model
        self.hidden = bool(hidden)
        self.device = next(model.parameters()).device
        self.bucket = max(1, int(bucket))
        self.max_graphs = max(1, int(max_graphs))
        self.max_tokens = int(max_tokens)
        self.max_graph_bytes = int(max_graph_bytes)
        on_cuda = self.device.type == "cuda"
        self.use_compile = compile_enabled(self.device) if use_compile is None else (use_compile and on_cuda)
        self.use_graph = on_cuda if use_graph is None else (use_graph and on_cuda)
        self.compile_mode = compile_mode or default_compile_mode()
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"GraphedForward: compile_mode {self.compile_mode!r}: use one of {', '.join(COMPILE_MODES)}")
        self._regional: RegionalCompile | None = None
        self._forward = self._compiled_forward() if self.use_compile else self._target().forward
        self._graphs: dict[tuple[int, int, int], tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._pool = None

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a deep copy of the model gets no graphs of this one's weights (graphed() makes new ones)

    def _target(self) -> torch.nn.Module:
        """The module whose forward this runner compiles: the backbone where the model splits (`head_split`; the
        head runs after it), plain and hidden runners alike, so the two share one compiled code; else the model."""
        return hidden_target(self.model)

    def _compiled_forward(self, **compile_kwargs: Any) -> Callable:
        """The model's forward compiled as `compile_mode` says (`compile_kwargs`, e.g. a backend, go to torch.compile)."""
        use_compile_cache()
        target = self._target()
        if self.compile_mode == "regional":
            self._regional = regional_compile(self.model, **compile_kwargs)
            if self._regional is not None:
                return self._regional.wrap(target.forward)
            log.info("memdec.inference.fast: %s has no decoder layer list; compiling its whole forward",
                     type(self.model).__name__)
        # one compiled forward per model (and settings), shared by its plain and hidden runners (same target)
        shared = self.model.__dict__.setdefault("_memdec_compiled", _CompiledForwards())
        key = tuple(sorted(compile_kwargs.items(), key=lambda kv: kv[0]))
        if key not in shared:
            shared[key] = torch.compile(target.forward, dynamic=True, **compile_kwargs)
        return shared[key]

    def _logits(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        if self.hidden or head_split(self.model) is not None:
            out = lm_logits_hidden(self.model, ids, None, keep, self._forward)
            return out if self.hidden else out[0]
        return lm_logits(self.model, ids, None, keep, self._forward)

    def _plain(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        if self.use_compile:
            try:
                return self._logits(input_ids, keep)
            except Exception as e:  # a compiler problem must never break scoring
                log.warning("memdec.inference.fast: compiling the forward failed (%s); running it uncompiled", first_line(e, typed=True))
                self.use_compile, self._forward = False, self._target().forward
                if self._regional is not None:  # the model's other runners share the compiled layers: plain too
                    self._regional.failed = True
        return self._logits(input_ids, keep)

    def _graph_bytes(self, b: int, t: int, k: int) -> int:
        """Bytes of a graph's output logits."""
        p = next(self.model.parameters())
        width = int(getattr(self.model.config, "vocab_size", 0) or 0)
        if self.hidden:
            width += int(getattr(self.model.config, "hidden_size", 0) or 0)
        return b * (k or t) * width * p.element_size()

    def _make_room(self, need: int) -> None:
        """Drop the least recently used graphs until one more, with `need` bytes of output, fits the limits."""
        while self._graphs and (len(self._graphs) >= self.max_graphs or need + sum(
                sum(o.numel() * o.element_size() for o in _outputs(e[2])) for e in self._graphs.values())
                > self.max_graph_bytes):
            self._graphs.pop(next(iter(self._graphs)))

    def _capture(self, b: int, t: int, k: int) -> tuple[Any, torch.Tensor, Any]:
        """(graph, its input ids (b, t), its output logits (or (logits, hidden))) keeping `k` positions (0: all)."""
        ids = torch.zeros(b, t, dtype=torch.long, device=self.device)
        warm = torch.cuda.Stream(device=self.device)
        warm.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(warm):
            for _ in range(2):
                self._logits(ids, k)
        torch.cuda.current_stream(self.device).wait_stream(warm)
        torch.cuda.synchronize(self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._logits(ids, k)
        return graph, ids, out

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 keep: int = 0) -> torch.Tensor:
        """Logits (B, T or keep, V) of `input_ids` (B, T); with keep > 0 only the last `keep` positions."""
        b, t = input_ids.shape
        keep = int(keep) if keep and keep < t else 0
        if not self.use_graph or attention_mask is not None or t == 0:
            if attention_mask is not None:
                return (lm_logits_hidden if self.hidden else lm_logits)(self.model, input_ids, attention_mask, keep)
            return self._plain(input_ids, keep)
        tb, kb, lo = padded_shape(t, keep, self.bucket, getattr(self.model.config, "max_position_embeddings", None))
        need = self._graph_bytes(b, tb, kb)
        if b * tb > self.max_tokens or need > self.max_graph_bytes:
            return self._plain(input_ids, keep)  # big batches are GPU-bound: a graph would only hold memory
        key = (b, tb, kb)
        on_gpu = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with on_gpu:  # the model's own GPU, which need not be the current one
            try:
                entry = self._graphs.pop(key, None)
                if entry is None:
                    self._make_room(need)
                    entry = self._capture(b, tb, kb)
            except Exception as e:
                log.warning("memdec.inference.fast: capturing a CUDA graph of the forward failed (%s); running it ungraphed",
                            first_line(e, typed=True))
                self.use_graph = False
                self._graphs.clear()
                return self._plain(input_ids, keep)
            self._graphs[key] = entry  # most recently used last
            graph, ids, out = entry
            ids[:, :t].copy_(input_ids)
            ids[:, t:].zero_()
            graph.replay()
        if self.hidden:
            return tuple(o[:, lo : lo + (keep or t)] for o in out)
        return out[:, lo : lo + (keep or t)]


def _outputs(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def graph_base_enabled() -> bool:
    """Whether the base (and tune-lambda's / perplexity's models) are compiled and graphed too: MEMDEC_GRAPH_BASE=1.

    Off by default: on one H200 (reports/speed/h200-2026-12-03-graphed-base/) the graphed base scores
    8x1024 in 51 ms instead of 64 ms, but compiling it adds about two minutes to a run's first batch.
    """
    return os.environ.get("MEMDEC_GRAPH_BASE", "0") == "1"


def base_forward(model, graph: bool | None = None, hidden: bool = False) -> Callable[..., Any]:
    """`(input_ids, attention_mask, keep) -> logits` (with `hidden`: (logits, final hidden state)) of a base:
    `graphed(model, hidden)` if `graph` (None: the MEMDEC_GRAPH_BASE setting), else the plain forward.

    `model` may be a GraphedForward already (made with the same `hidden`): it is used as it is.
    """
    if isinstance(model, GraphedForward):
        if model.hidden != bool(hidden):
            raise ValueError(f"base_forward: a GraphedForward with hidden={model.hidden} where hidden={bool(hidden)} is needed")
        return model
    if graph if graph is not None else graph_base_enabled():
        return graphed(model, hidden)
    plain = lm_logits_hidden if hidden else lm_logits
    return lambda ids, mask=None, keep=0: plain(model, ids, mask, keep)


def graphed(model, hidden: bool = False) -> GraphedForward:
    """The model's one GraphedForward (made on first use; one more with `hidden`), shared by every scorer of it.

    Sharing keeps one set of compiled code and captured graphs per model: the `memdec` lm-eval
    model, `MemoryDecoder.perplexity`, tune-lambda and the bench all score through it.
    """
    p = next(model.parameters())
    key = (p.device, p.dtype, p.data_ptr())  # moved or cast weights: graphs of the old ones are stale
    slot = "_memdec_graphed_hidden" if hidden else "_memdec_graphed"
    entry = model.__dict__.get(slot)
    if entry is None or entry[0] != key:
        entry = model.__dict__[slot] = (key, GraphedForward(model, hidden=hidden))
    return entry[1]


_SIDE_STREAMS: dict[Any, Any] = {}


def side_stream(device: torch.device):
    """One extra CUDA stream per device, reused."""
    key = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key)
    return _SIDE_STREAMS[key]


def run_concurrently(first: Callable[[], Any], second: Callable[[], Any],
                     device: torch.device) -> tuple[Any, Any]:
    """(first(), second()): on CUDA `second` runs on a side stream, overlapping `first`; else in order.

    `second` returns a tensor or a tuple of tensors; the caller may use both results on its current stream.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return first(), second()
    main = torch.cuda.current_stream(device)
    side = side_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        b = second()
    a = first()
    main.wait_stream(side)
    for t in (b if isinstance(b, tuple) else (b,)):
        t.record_stream(main)
    return a, b


class TokenScores(NamedTuple):
    """What `score_tokens` returns: mixed target log-probs, the mixture's argmax (or None), and the full
    mixed log-probs (B, V) at the positions asked for with `last_at` (or None)."""

    logprobs: torch.Tensor
    argmax: torch.Tensor | None
    last: torch.Tensor | None


@torch.no_grad()
def score_tokens(
    base,
    other: Callable[[torch.Tensor, torch.Tensor | None, int], torch.Tensor],
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    lmbda: float,
    vocab_size: int,
    attention_mask: torch.Tensor | None = None,
    keep: int = 0,
    other_temperature: float = 1.0,
    greedy: bool = False,
    graph_base: bool | None = None,
    last_at: torch.Tensor | None = None,
) -> TokenScores:
    """Mixed log-probs of `targets` (B, keep or T) after `input_ids`, the mixture's argmax if `greedy`, and
    with `last_at` (B,) the mixed log-probs at kept position last_at[b] of each row.

    `other(input_ids, attention_mask, keep)` returns the second model's logits (or log-probs) of the
    same positions; it runs concurrently with the base, whose forward is `base_forward(base, graph_base)`
    (with graph_base, compiled and CUDA-graphed on CUDA; the plain forward elsewhere). At lmbda 0 / 1
    only the model that counts runs. `targets[:, j]` is the token predicted at the j-th kept position.
    """
    def run_base() -> torch.Tensor:
        return base_forward(base, graph_base)(input_ids, attention_mask, keep)

    if lmbda == 0.0:
        b = o = run_base()
    elif lmbda == 1.0:
        b = o = other(input_ids, attention_mask, keep)
    else:
        b, o = run_concurrently(run_base, lambda: other(input_ids, attention_mask, keep), input_ids.device)
    lp = mixture_target_logprobs(b, o, targets, lmbda, vocab_size, other_temperature)
    am = mixture_argmax(b, o, lmbda, vocab_size, other_temperature) if greedy else None
    last = None
    if last_at is not None:
        rows = torch.arange(b.shape[0], device=b.device)
        q = last_at.to(b.device)
        last = mixture_logprobs(b[rows, q], o[rows, q], lmbda, vocab_size, other_temperature)
    return TokenScores(lp, am, last)


def routed_score_tokens(
    base,
    other: Callable[[torch.Tensor, torch.Tensor | None, int], tuple[torch.Tensor, torch.Tensor]],
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    router,
    vocab_size: int,
    keep: int = 0,
    other_temperature: float = 1.0,
    graph_base: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Routed-mixture log-probs of `targets` (B, keep or T), the router's log weights (B, keep or T, 2), and
    (base logits, base hidden, other logits, other hidden) for callers that need more of them.

    `other(input_ids, attention_mask, keep)` returns the memory's (logits, final hidden state) and runs
    concurrently with the base (`base_forward(base, graph_base, hidden=True)`). Each model's target
    log-prob and the router's scalars (largest probability, entropy) come from one fused pass over its
    logits (`target_stats`); `router` is a memdec.inference.router.Router.
    """
    from memdec.inference.router import apply_threshold, routed_target_logprobs

    (bl, bh), (ol, oh) = run_concurrently(
        lambda: base_forward(base, graph_base, hidden=True)(input_ids, None, keep),
        lambda: other(input_ids, None, keep), input_ids.device)
    bs = target_stats(bl, targets, vocab_size)
    os_ = target_stats(ol, targets, vocab_size, other_temperature)
    net = router.net
    dev = next(net.parameters()).device
    scalars = torch.cat([bs[..., 1:], os_[..., 1:]], -1) if net.scalars else None
    lw = apply_threshold(net(bh.to(dev), oh.to(dev), None if scalars is None else scalars.to(dev)),
                         router.threshold).to(bs.device)
    return routed_target_logprobs(bs[..., 0], os_[..., 0], lw), lw, (bl, bh, ol, oh)


# ---- graphed decoding ----


def cache_kwarg(model) -> str:
    """The forward keyword for a KV cache: `cache` (transformers >= 5.2x) or `past_key_values` (older)."""
    return "cache" if "cache" in _forward_params(type(model)) else "past_key_values"


def make_static_cache(model, batch_size: int, max_cache_len: int):
    """A transformers StaticCache for `model` (handles the constructor of transformers 4.4x and 5.x)."""
    from transformers import StaticCache

    p = next(model.parameters())
    return StaticCache(config=model.config, max_cache_len=max_cache_len, max_batch_size=batch_size,
                       device=p.device, dtype=p.dtype)


class GraphedDecoder:
    """Batch decoding of one or two causal LMs with static KV caches; on CUDA one step is a CUDA graph.

    `prefill(input_ids)` runs the prompt (no padding) and returns each model's last logits;
    `step(tokens)` feeds one token per row and returns the next logits, as a tuple with one entry per
    model. With `post`, both return `(post(that tuple),)` instead, and on CUDA `post` (e.g. the
    mixture) is captured in the graph too. On CUDA each model's forward is compiled and both are
    captured into one graph per decoder, the second model on a side stream; elsewhere the same
    static-cache calls run eagerly. With `hidden`, each model's output row is its logits followed by
    its final hidden state (for a router).
    """

    def __init__(self, models: list, batch_size: int, max_cache_len: int, use_graph: bool | None = None,
                 use_compile: bool | None = None,
                 post: Callable[[tuple[torch.Tensor, ...]], torch.Tensor] | None = None, hidden: bool = False) -> None:
        self.models = list(models)
        self.hidden = bool(hidden)
        self.post = post
        self.device = next(self.models[0].parameters()).device
        on_cuda = self.device.type == "cuda"
        self.use_compile = compile_enabled(self.device) if use_compile is None else use_compile
        # eager HF forwards synchronise with the CPU here and there, which a graph capture forbids
        self.use_graph = (on_cuda and self.use_compile) if use_graph is None else (use_graph and on_cuda)
        self.batch_size = batch_size
        self.max_cache_len = max_cache_len
        self.caches = [make_static_cache(m, batch_size, max_cache_len) for m in self.models]
        if self.use_compile:
            # each (batch, cache size) and HF's own compiled call add entries for the same forward code
            import torch._dynamo as dynamo

            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        if self.use_compile:
            use_compile_cache()
        # with `hidden`, each model's backbone runs and the step applies the head (`lm_logits_hidden`'s split)
        self.targets = [hidden_target(m) if self.hidden else m for m in self.models]
        self.forwards = [torch.compile(t.forward, dynamic=False, fullgraph=False) if self.use_compile else t.forward
                         for t in self.targets]
        self.cache_kw = [cache_kwarg(t) for t in self.targets]
        # the post-processing (the mixture) fused into a few kernels on CUDA, like the forwards
        self._post = torch.compile(post, dynamic=False) if (post is not None and self.use_compile) else post
        self.pos = 0
        self._ids = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self._cpos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._graph = None
        self._out: tuple[torch.Tensor, ...] | None = None

    def _forward(self, i: int, ids: torch.Tensor, cpos: torch.Tensor) -> torch.Tensor:
        kwargs = {self.cache_kw[i]: self.caches[i]}
        return self._last(i, self.forwards[i], input_ids=ids, cache_position=cpos,
                          position_ids=cpos.unsqueeze(0).expand(ids.shape[0], -1), use_cache=True, **kwargs)

    def _last(self, i: int, forward: Callable, **kwargs: Any) -> torch.Tensor:
        """forward(**kwargs)'s last-position logits; when `hidden`, with model i's final hidden state (its LM head's
        input) appended: `forward` is then its backbone's (`head_split`) and the head runs here."""
        if not self.hidden:
            return forward(**kwargs).logits[:, -1]
        split = head_split(self.models[i])
        if split is None:
            out = forward(**kwargs, output_hidden_states=True)
            return torch.cat([out.logits[:, -1], out.hidden_states[-1][:, -1].to(out.logits.dtype)], dim=-1)
        hidden = forward(**kwargs)[0][:, -1]
        logits = split[1](hidden)
        return torch.cat([logits, hidden.to(logits.dtype)], dim=-1)

    def _step_eager(self, ids: torch.Tensor, cpos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(self.models) == 1 or self.device.type != "cuda":
            return tuple(self._forward(i, ids, cpos) for i in range(len(self.models)))
        main = torch.cuda.current_stream(self.device)
        side = side_stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            rest = [self._forward(i, ids, cpos) for i in range(1, len(self.models))]
        first = self._forward(0, ids, cpos)
        main.wait_stream(side)
        return (first, *rest)

    def _run(self, ids: torch.Tensor, cpos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self._step_eager(ids, cpos)
        if self.post is None:
            return outs
        if self._post is not self.post:
            try:
                return (self._post(outs),)
            except Exception as e:  # compiling the mixture failed: run it eagerly (same numbers)
                log.warning("memdec.inference.fast: compiling the decode step's post-processing failed (%s); running it eagerly",
                            type(e).__name__)
                self._post = self.post
        return (self.post(outs),)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Reset the caches, run the prompt (batch, length) through every model; last-position logits."""
        b, n = input_ids.shape
        if b != self.batch_size:
            raise ValueError(f"GraphedDecoder: batch {b} differs from the decoder's batch size {self.batch_size}")
        if n >= self.max_cache_len:
            raise ValueError(f"GraphedDecoder: prompt of {n} tokens does not fit the cache of {self.max_cache_len}")
        for c in self.caches:
            c.reset()
        cpos = torch.arange(n, device=self.device)
        # the prompt runs eagerly (its shape changes from call to call; compiling it would recompile)
        outs = []
        for i, (m, c, kw) in enumerate(zip(self.targets, self.caches, self.cache_kw, strict=True)):
            kwargs = {kw: c, "logits_to_keep": 1} if accepts_logits_to_keep(m) else {kw: c}
            outs.append(self._last(i, m, input_ids=input_ids, cache_position=cpos,
                                   position_ids=cpos.unsqueeze(0).expand(b, -1), use_cache=True, **kwargs))
        self.pos = n
        return (self.post(tuple(outs)),) if self.post is not None else tuple(outs)

    def _rewind(self) -> None:
        """Put each static cache's own write position back at `self.pos`.

        transformers >= 5 static layers write at an internal counter (a tensor, advanced in place by
        every forward) rather than at `cache_position`; warm-up runs and test replays advance it.
        """
        for cache in self.caches:
            for layer in getattr(cache, "layers", []):
                counter = getattr(layer, "cumulative_length", None)
                if isinstance(counter, torch.Tensor):
                    counter.fill_(self.pos)

    def _warmup(self, times: int = 2) -> tuple[torch.Tensor, ...]:
        """Run the step `times` times at the current position (compiling it); the caches are left as before."""
        out: tuple[torch.Tensor, ...] = ()
        for _ in range(times):
            self._rewind()
            out = tuple(t.float() for t in self._run(self._ids, self._cpos))
        self._rewind()
        return out

    def _graphable(self) -> bool:
        # sliding-window layers keep python-int positions, which a captured graph would freeze
        return not any(getattr(layer, "is_sliding", False) for c in self.caches for layer in getattr(c, "layers", []))

    def _capture(self) -> None:
        # warm up (compiles; the caches' buffers exist since the prefill) on a side stream, then capture one step
        warm = torch.cuda.Stream(device=self.device)
        warm.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(warm):
            ref = self._warmup(2)
        torch.cuda.current_stream(self.device).wait_stream(warm)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._run(self._ids, self._cpos)
        # the replayed graph must give the step it captured (same inputs: the eager warm-up's logits)
        self._rewind()
        graph.replay()
        self._rewind()
        for r, o in zip(ref, out, strict=True):
            err = float((o.float() - r).abs().max())
            if not err <= 1e-3 * (1.0 + float(r.abs().max())):
                raise RuntimeError(f"GraphedDecoder: the captured step differs from the eager one (max error {err:g})")
        self._graph, self._out = graph, out

    def decode_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    state: int | None) -> tuple[torch.Tensor, int]:
        """A decode-loop step (memdec.inference.joint.generate_tokens): the first output after `input_ids`, and its length.

        The prompt is prefilled when `state` is None, then each call must add exactly one token (no
        padding: `attention_mask` is ignored).
        """
        if state is None:
            out = self.prefill(input_ids)
        elif input_ids.shape[1] != state + 1:
            raise RuntimeError(f"GraphedDecoder: one new token per step expected, got {input_ids.shape[1] - state}")
        else:
            out = self.step(input_ids[:, -1])
        return out[0], input_ids.shape[1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Feed `tokens` (batch,) at the next position; each model's logits (batch, vocab) for the one after."""
        if self.pos >= self.max_cache_len:
            raise ValueError(f"GraphedDecoder: the cache of {self.max_cache_len} tokens is full")
        if self.use_graph and self._graph is None and not self._graphable():
            self.use_graph = False
        if not self.use_graph:
            cpos = torch.tensor([self.pos], device=self.device)
            out = self._run(tokens.reshape(-1, 1), cpos)
        else:
            self._ids.copy_(tokens.reshape(-1, 1))
            self._cpos.fill_(self.pos)
            if self._graph is None:
                # the warm-up steps write this position's keys too; the captured replay rewrites them
                self._capture()
            self._graph.replay()
            out = tuple(t.clone() for t in self._out)
        self.pos += 1
        return out
