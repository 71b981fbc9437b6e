"""What `memdec bench` times: the real scorers and decoders, and each table row as a small spec.

A `MethodSpec` names a row and says how it scores (a function of the shared `BenchContext` and the token ids)
and decodes (of the context, the number of new tokens and whether to sample), what it sets up first, and which
back-to-back comparisons it carries; `method_specs(settings)` lists the rows in table order, and
memdec.bench.run walks that list.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from memdec.inference import fast
from memdec.inference.knn import knn_distribution, knn_target_probs
from memdec.inference.mixing import log_softmax, mix_logprobs

from .timing import time_ms

if TYPE_CHECKING:
    from .run import BenchSettings



@torch.no_grad()
def score_base_hf(base, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """What lm-eval's `hf` model does for a rolling window: log_softmax (logits' dtype), argmax, gather."""
    logits = base(ids[:, :-1]).logits[..., :vocab]
    logp = torch.log_softmax(logits, dim=-1)
    greedy = logp.argmax(-1)
    lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return lp.float().sum() + (greedy == ids[:, 1:]).sum()


@torch.no_grad()
def score_base_fast(base, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """The fastest base: its forward compiled and CUDA-graphed (memdec.inference.fast.graphed), fused target log-probs.

    What the `memdec` lm-eval model computes for a rolling window with lmbda = 0.
    """
    return fast.target_logprobs(fast.graphed(base)(ids[:, :-1]), ids[:, 1:], vocab).sum()


@torch.no_grad()
def score_memdec_plain(base, memory, ids: torch.Tensor, vocab: int, lmbda: float,
                       per_token: bool = False) -> torch.Tensor:
    """The plain mixture: float32 (B, T, V) log-probs of both, mixed, re-normalised as HFLM does, argmax."""
    x = ids[:, :-1]
    logp = torch.log_softmax(mix_logprobs(log_softmax(base(x).logits, vocab), log_softmax(memory(x).logits, vocab),
                                          lmbda), dim=-1)
    greedy = logp.argmax(-1)
    lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return lp if per_token else lp.sum() + (greedy == ids[:, 1:]).sum()


@torch.no_grad()
def score_memdec_fast(base, memory, ids: torch.Tensor, vocab: int, lmbda: float,
                      per_token: bool = False) -> torch.Tensor:
    """The fast path of the `memdec` lm-eval model for rolling windows (memdec.inference.fast.score_tokens), with the
    base compiled and graphed too (`graph_base=true`).

    `memory` is the model or, as in the `memdec` lm-eval model, a memdec.inference.fast.GraphedForward of it.
    """
    other = memory if isinstance(memory, fast.GraphedForward) else (
        lambda i, a, k: fast.lm_logits(memory, i, a, k))
    lp = fast.score_tokens(base, other, ids[:, :-1], ids[:, 1:], lmbda, vocab, graph_base=True).logprobs
    return lp if per_token else lp.sum()


def bench_router(base, memory, device: torch.device, seed: int) -> Any:
    """A random 2-layer router over both hidden states and the four scalars (lmdeploy's "both" mode)."""
    from memdec.inference.router import Router, RouterNetwork, hidden_size

    torch.manual_seed(seed)
    hb, hm = hidden_size(base), hidden_size(memory)
    net = RouterNetwork("both", True, hb, hm, layers=2, hidden=128)
    return Router(net.to(device), {"inputs": "both", "scalars": True, "layers": 2, "hidden": 128,
                                   "base_hidden_size": hb, "memory_hidden_size": hm})


@torch.no_grad()
def score_memdec_router(base, memory, ids: torch.Tensor, vocab: int, router, per_token: bool = False) -> torch.Tensor:
    """The `memdec` lm-eval model's routed fast path (memdec.inference.fast.routed_score_tokens), base graphed.

    `memory` is the model or a memdec.inference.fast.GraphedForward of it made with hidden=True.
    """
    other = memory if isinstance(memory, fast.GraphedForward) else (
        lambda i, a, k: fast.lm_logits_hidden(memory, i, a, k))
    lp, _, _ = fast.routed_score_tokens(base, other, ids[:, :-1], ids[:, 1:], router, vocab, graph_base=True)
    return lp if per_token else lp.sum()


class KNN:
    """kNN-LM over random keys: distances -> softmax(-d / T) over the k neighbours' values, mixed per token."""

    def __init__(self, base, n_keys: int, k: int, temperature: float, vocab: int, device: torch.device,
                 seed: int) -> None:
        from memdec.pipeline.keys import capture_keys, key_dim

        self.base, self.k, self.temperature, self.vocab = base, k, temperature, vocab
        self.capture_keys = capture_keys
        dim = key_dim(base)
        g = torch.Generator(device=device).manual_seed(seed)
        keys = torch.empty((n_keys, dim), dtype=torch.float16, device=device)
        for s in range(0, n_keys, 1 << 20):  # chunked, so no float32 copy of all keys exists
            part = keys[s : s + (1 << 20)]
            part.copy_(torch.randn(part.shape, generator=g, device=device))
        self.values = torch.randint(0, vocab, (n_keys,), generator=g, device=device)
        self.index = self._index(keys, device)

    @staticmethod
    def _index(keys: torch.Tensor, device: torch.device):
        from memdec.pipeline.search import TorchIndex

        # keys already live on the device in float16: search them in place (no resident copy)
        return TorchIndex(keys, device=device, resident=False, half=device.type == "cuda")

    def knn_logprob(self, queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p_kNN(target) per query (float32)."""
        d, i = self.index.search(queries.float(), self.k)
        return knn_target_probs(d, i, self.values, targets, self.temperature).log()

    def knn_logprobs_full(self, queries: torch.Tensor) -> torch.Tensor:
        """log p_kNN over the vocabulary (n, V), for decoding."""
        d, i = self.index.search(queries.float(), self.k)
        return knn_distribution(d, i, self.values, self.temperature, self.vocab).log()

    @torch.no_grad()
    def score(self, ids: torch.Tensor, lmbda: float) -> torch.Tensor:
        """Summed log-prob of the base mixed with the kNN distribution at every next token of `ids`."""
        x, t = ids[:, :-1], ids[:, 1:]
        with self.capture_keys(self.base) as cap:
            logits = self.base(x).logits
        keys = cap.keys.reshape(-1, cap.keys.shape[-1])
        base_lp = fast.target_logprobs(logits, t, self.vocab).reshape(-1)
        knn_lp = self.knn_logprob(keys, t.reshape(-1))
        return mix_logprobs(base_lp, knn_lp, lmbda).sum()


def _generate_hf(model, ids: torch.Tensor, n: int, sample: bool, static_cache=None) -> torch.Tensor:
    """HF generate of exactly n new tokens; with `static_cache` (reset first), HF's compiled static-cache path."""
    kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": n, "min_new_tokens": n,
                              "pad_token_id": model.config.eos_token_id}
    if sample:
        kwargs.update(top_k=0, top_p=1.0, temperature=1.0)
    if static_cache is not None:
        # one cache of a fixed size for every call, so the compiled step never recompiles
        static_cache.reset()
        kwargs[fast.cache_kwarg(model)] = static_cache
    return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)


def _sampler(lp: torch.Tensor, _ids: torch.Tensor) -> torch.Tensor:
    return torch.multinomial(torch.softmax(lp, dim=-1), 1).squeeze(1)


@torch.no_grad()
def _knn_generate(knn: KNN, ids: torch.Tensor, n: int, lmbda: float, sample: bool) -> torch.Tensor:
    """kNN-LM decoding with a dynamic KV cache: one search per new token."""
    from transformers import DynamicCache

    name = fast.cache_kwarg(knn.base)
    cache = DynamicCache()
    out, x = ids, ids
    for _ in range(n):
        with knn.capture_keys(knn.base) as cap:  # (the DynamicCache is updated in place)
            res = knn.base(input_ids=x, use_cache=True, logits_to_keep=1, **{name: cache})
        lp = mix_logprobs(log_softmax(res.logits[:, -1], knn.vocab), knn.knn_logprobs_full(cap.keys[:, -1]), lmbda)
        nxt = _sampler(lp, out) if sample else lp.argmax(-1)
        out = torch.cat([out, nxt[:, None]], 1)
        x = nxt[:, None]
    return out


def _rag_generate(base, ids: torch.Tensor, n: int, sample: bool, stride: int, doc: torch.Tensor) -> torch.Tensor:
    """In-Context RAG's decoding pattern: every `stride` tokens a new document before the context, a new generate."""
    made = ids
    while made.shape[1] - ids.shape[1] < n:
        k = min(stride, n - (made.shape[1] - ids.shape[1]))
        inp = torch.cat([doc, made], 1)
        out = _generate_hf(base, inp, k, sample)
        made = torch.cat([made, out[:, inp.shape[1] :]], 1)
    return made


@torch.no_grad()
def agreement(base, memory, joint, prompt: torch.Tensor, vocab: int, lmbda: float, n: int, g: torch.Generator,
              device: torch.device, runner: fast.GraphedForward | None = None) -> dict[str, Any]:
    """The fast paths against the plain ones on this device: scoring differences (also to a float32-weights,
    float64-mixture reference, since low-precision kernels round differently), greedy tokens in common."""
    import copy

    ids = torch.randint(0, vocab, (2, 257), generator=g).to(device)
    fast_lp = score_memdec_fast(base, runner or memory, ids, vocab, lmbda, True).double()
    plain_lp = score_memdec_plain(base, memory, ids, vocab, lmbda, True).double()
    x, y = ids[:, :-1], ids[:, 1:, None]
    ref = None
    for model, w in ((base, 1.0 - lmbda), (memory, lmbda)):
        m32 = copy.deepcopy(model).float()
        lp = log_softmax(m32(x).logits.double(), vocab).gather(-1, y).squeeze(-1) + math.log(max(w, 1e-300))
        ref = lp if ref is None else torch.logaddexp(ref, lp)
        del m32
    diff = (fast_lp - plain_lp).abs().max()
    out = {}
    for flag in (False, True):
        joint.fast_decode = flag
        out[flag] = joint.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   eos_token_id=base.config.eos_token_id)[0, prompt.shape[1] :]
    same = (out[True] != out[False]).nonzero()
    return {"score_max_abs_diff": float(diff), "score_fast_vs_fp32_max_abs_diff": float((fast_lp - ref).abs().max()),
            "score_plain_vs_fp32_max_abs_diff": float((plain_lp - ref).abs().max()), "greedy_tokens_compared": n,
            "greedy_leading_tokens_equal": int(same[0, 0]) if len(same) else n,
            "fast_decode_used": bool(joint.fast_decode)}



def _rag_score_ms(base, ids: torch.Tensor, doc: torch.Tensor, t: int, s: BenchSettings,
                  device: torch.device) -> float:
    """Estimated ms to score t tokens In-Context-RAG style: one forward of doc + context per block of `stride`."""
    points = list(range(0, t, s.rag_stride))
    pick = [points[round(j * (len(points) - 1) / max(1, s.rag_blocks - 1))] for j in range(min(s.rag_blocks, len(points)))]
    keep = s.rag_stride if fast.accepts_logits_to_keep(base) else 0

    def block(p: int) -> None:
        e = min(p + s.rag_stride, t)
        x = torch.cat([doc, ids[:, : e]], 1)
        with torch.no_grad():
            fast.lm_logits(base, x, None, keep)

    times = [time_ms(lambda p=p: block(p), device, 1 if i == 0 else 0, 1) for i, p in enumerate(pick)]
    return statistics.mean(times) * len(points)


def _count(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else (
        f"{n // 1000}k" if n % 1000 == 0 else str(n))



# ---- the rows ----


class _Tok:
    """MemoryDecoder needs only len() and the pad id of a tokenizer here."""

    def __init__(self, vocab: int, pad_token_id: int | None) -> None:
        self.vocab, self.pad_token_id = vocab, pad_token_id

    def __len__(self) -> int:
        return self.vocab


SAMPLING = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0}


@dataclass
class BenchContext:
    """What the rows share: the settings, the two models, the prompt, and what earlier rows' setups built."""

    settings: BenchSettings
    device: torch.device
    base: Any
    memory: Any
    vocab: int
    g: torch.Generator  # every row's random token ids come from it, in table order
    prompt: torch.Tensor
    joint: Any = None  # MemoryDecoder(base, memory), fixed lmbda
    runner: Any = None  # memdec.inference.fast.GraphedForward of the memory
    hrunner: Any = None  # the same with hidden=True, for the router
    router: Any = None
    routed: Any = None  # MemoryDecoder with the router
    static: Any = None  # HF StaticCache of the base
    knn: KNN | None = None
    doc: torch.Tensor | None = None  # In-Context RAG's document
    single: dict[str, Any] = field(default_factory=dict)  # the base's GraphedDecoder, made on first use
    fell_back: list[bool] = field(default_factory=list)  # a fast decoding run fell back to the plain loop
    checks: dict[str, Any] | None = None  # agreement(), once the Memory Decoder rows are done

    @property
    def n(self) -> int:
        return self.settings.new_tokens

    @property
    def lmbda(self) -> float:
        return self.settings.lmbda

    @property
    def eos(self) -> int | None:
        return self.base.config.eos_token_id

    @property
    def use_compile(self) -> bool:
        return self.settings.compile and self.device.type == "cuda"

    def ids(self, b: int, t: int) -> torch.Tensor:
        """(b, t + 1) random token ids from the shared generator, on the device."""
        return torch.randint(0, self.vocab, (b, t + 1), generator=self.g).to(self.device)

    def graphed_single(self, k: int, s: bool) -> torch.Tensor:
        """The base alone on memdec's graphed step, through the same decode loop as MemoryDecoder.generate."""
        from memdec.inference.joint import generate_tokens

        if "dec" not in self.single:
            self.single["dec"] = fast.GraphedDecoder(
                [self.base], 1, self.settings.prompt_len + self.n + 8, use_compile=self.use_compile,
                post=lambda out: log_softmax(out[0], self.vocab))  # in the graph
        kw = SAMPLING if s else {"do_sample": False}
        return generate_tokens(self.single["dec"].decode_step, self.prompt, None, None, self.base.generation_config,
                               max_new_tokens=k, min_new_tokens=k, eos_token_id=self.eos, pad_token_id=self.eos, **kw)

    def joint_generate(self, k: int, s: bool, fast_decode: bool, model: Any = None) -> torch.Tensor:
        """MemoryDecoder.generate of exactly k new tokens (plain or fast loop); marks a fast run that fell back."""
        model = model or self.joint
        model.fast_decode = fast_decode
        kw = SAMPLING if s else {"do_sample": False}
        out = model.generate(self.prompt, max_new_tokens=k, min_new_tokens=k, eos_token_id=self.eos, **kw)
        if fast_decode and model.fast_decode is False:
            self.fell_back.append(True)
        return out


ScoreFn = Callable[[BenchContext, torch.Tensor], Any]
DecodeFn = Callable[[BenchContext, int, bool], Any]


@dataclass
class PairedScore:
    """time(fn) / time(ref) at each scoring shape, timed back to back: bench.json's paired[prefix + "score BxT"]."""

    prefix: str
    ref: ScoreFn
    fn: ScoreFn


@dataclass
class PairedDecode:
    """Per-token greedy and sampled decode time of gen / ref, timed back to back: paired["greedy" / "sampled"]."""

    ref: DecodeFn
    gen: DecodeFn


@dataclass
class MethodSpec:
    """One row of the table: how it scores and decodes, what it needs set up first, what it is compared to.

    `score_ms` (the context, ids, batch, length -> ms) replaces timing `score` where a row is estimated rather than
    timed; `finish` runs after the row's measurements with the context and a `measure(what, fn)` charging the row.
    """

    name: str
    note: str = ""
    score: ScoreFn | None = None
    decode: DecodeFn | None = None
    setup: Callable[[BenchContext], None] | None = None
    setup_may_fail: bool = False  # a failing setup marks the row and skips it (else the run stops)
    score_ms: Callable[[BenchContext, torch.Tensor, int, int], float] | None = None
    marks_fallback: bool = False  # mark the row when fast decoding fell back to the plain loop
    paired_score: PairedScore | None = None
    paired_decode: PairedDecode | None = None
    paired_label: str = ""  # progress line for the paired ratios whose keys start with paired_score's prefix
    finish: Callable[[BenchContext, Callable[[str, Callable[[], Any]], Any]], None] | None = None
    teardown: Callable[[BenchContext], None] | None = None


def _empty_cache(ctx: BenchContext) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def _setup_static(ctx: BenchContext) -> None:
    ctx.static = fast.make_static_cache(ctx.base, 1, ctx.settings.prompt_len + ctx.n + 8)


def _setup_joint(ctx: BenchContext) -> None:
    from memdec.inference.joint import MemoryDecoder

    ctx.joint = MemoryDecoder(ctx.base, ctx.memory, _Tok(ctx.vocab, ctx.eos), ctx.lmbda)


def _setup_fast(ctx: BenchContext) -> None:
    ctx.runner = fast.GraphedForward(ctx.memory, use_compile=ctx.use_compile)


def _setup_router(ctx: BenchContext) -> None:
    from memdec.inference.joint import MemoryDecoder

    ctx.router = bench_router(ctx.base, ctx.memory, ctx.device, ctx.settings.seed)
    ctx.hrunner = fast.GraphedForward(ctx.memory, use_compile=ctx.use_compile, hidden=True)
    ctx.routed = MemoryDecoder(ctx.base, ctx.memory, _Tok(ctx.vocab, ctx.eos), router=ctx.router)


def _finish_memdec(ctx: BenchContext, measure: Callable[[str, Callable[[], Any]], Any]) -> None:
    """After the last Memory Decoder row: free its graphs, check fast against plain, move the memory off the GPU."""
    ctx.hrunner = ctx.routed = None  # their graphs hold memory
    ctx.single.clear()
    ctx.checks = measure("agreement check", lambda: agreement(ctx.base, ctx.memory, ctx.joint, ctx.prompt,
                                                              ctx.vocab, ctx.lmbda, ctx.n, ctx.g, ctx.device,
                                                              ctx.runner))
    ctx.joint = None  # the memory moves off the GPU below
    ctx.memory = ctx.memory.cpu() if ctx.device.type == "cuda" else ctx.memory
    _empty_cache(ctx)


def _knn_spec(size: int, settings: BenchSettings) -> MethodSpec:
    def setup(ctx: BenchContext) -> None:
        ctx.knn = KNN(ctx.base, size, min(settings.knn_k, size), settings.knn_temperature, ctx.vocab, ctx.device,
                      settings.seed)

    def teardown(ctx: BenchContext) -> None:
        ctx.knn = None
        _empty_cache(ctx)

    return MethodSpec(f"+kNN-LM {_count(size)}", f"exact torch search, k={settings.knn_k}, random float16 keys",
                      score=lambda c, ids: c.knn.score(ids, c.lmbda),
                      decode=lambda c, k, s: _knn_generate(c.knn, c.prompt, k, c.lmbda, s),
                      setup=setup, setup_may_fail=True, teardown=teardown)


def _setup_rag(ctx: BenchContext) -> None:
    ctx.doc = torch.randint(0, ctx.vocab, (1, ctx.settings.rag_doc_tokens), generator=ctx.g).to(ctx.device)


#: the table order of the built-in methods' rows; methods registered with a `bench` ref beyond these follow
BENCH_ORDER = ("base", "memdec", "memdec_router", "knnlm", "rag")


def method_specs(settings: BenchSettings) -> list[MethodSpec]:
    """The rows of `memdec bench`, in table order: each registered method's `bench` specs (memdec.methods)."""
    from memdec.methods import methods, resolve

    timed = {m.name: m for m in methods() if m.bench}
    names = [n for n in BENCH_ORDER if n in timed] + [n for n in timed if n not in BENCH_ORDER]
    return [spec for n in names for spec in resolve(timed[n].bench)(settings)]


def base_specs(settings: BenchSettings) -> list[MethodSpec]:
    """The base alone: lm-eval's `hf` computation, HF's static cache, memdec's compiled + graphed base."""
    return [
        MethodSpec("base", "scoring as lm-eval `hf`; decoding: HF generate, dynamic cache, eager",
                   score=lambda c, ids: score_base_hf(c.base, ids, c.vocab),
                   decode=lambda c, k, smp: _generate_hf(c.base, c.prompt, k, smp)),
        MethodSpec("base (HF static cache)", "HF generate with a StaticCache (HF compiles its decode step on CUDA)",
                   decode=lambda c, k, smp: _generate_hf(c.base, c.prompt, k, smp, c.static), setup=_setup_static),
        MethodSpec("base (compiled + graphed)",
                   "scoring: memdec.inference.fast.graphed forward (compiled, one CUDA graph per padded "
                   "shape) and fused target log-probs, as --model memdec with lmbda=0; "
                   "decoding: memdec.inference.fast.GraphedDecoder (static cache, compiled step in a "
                   "CUDA graph, MemoryDecoder's decode loop)",
                   score=lambda c, ids: score_base_fast(c.base, ids, c.vocab),
                   decode=lambda c, k, smp: c.graphed_single(k, smp)),
    ]


def memdec_specs(settings: BenchSettings) -> list[MethodSpec]:
    """+MemDec: the plain float32 mixture and the fast path of the `memdec` lm-eval model (paired with the base)."""
    return [
        MethodSpec("+MemDec (plain)", "float32 (B,T,V) mixture; MemoryDecoder.generate with dynamic caches, eager",
                   score=lambda c, ids: score_memdec_plain(c.base, c.memory, ids, c.vocab, c.lmbda),
                   decode=lambda c, k, smp: c.joint_generate(k, smp, False), setup=_setup_joint),
        MethodSpec("+MemDec (fast)",
                   "memdec.inference.fast: fused target log-probs, concurrent forwards; MemoryDecoder.generate "
                   "with its graphed two-model step",
                   score=lambda c, ids: score_memdec_fast(c.base, c.runner, ids, c.vocab, c.lmbda),
                   decode=lambda c, k, smp: c.joint_generate(k, smp, True), setup=_setup_fast, marks_fallback=True,
                   # the same two comparisons timed back to back, so drift between the rows' measurements cancels
                   paired_score=PairedScore("", lambda c, ids: score_base_fast(c.base, ids, c.vocab),
                                            lambda c, ids: score_memdec_fast(c.base, c.runner, ids, c.vocab, c.lmbda)),
                   paired_decode=PairedDecode(lambda c, k, smp: c.graphed_single(k, smp),
                                              lambda c, k, smp: c.joint_generate(k, smp, True)),
                   paired_label="paired ratios (+MemDec fast / base)"),
    ]


def router_specs(settings: BenchSettings) -> list[MethodSpec]:
    """+MemDec with a (random) router: the routed fast path, paired with +MemDec (fast)."""
    return [
        MethodSpec("+MemDec (router, fast)",
                   "the `memdec` model's routed fast path: a random 2-layer router over both "
                   "hidden states and the four scalars (one fused pass per model's logits)",
                   score=lambda c, ids: score_memdec_router(c.base, c.hrunner, ids, c.vocab, c.router),
                   decode=lambda c, k, smp: c.joint_generate(k, smp, True, c.routed), setup=_setup_router,
                   marks_fallback=True,
                   # the router's cost over +MemDec (fast), timed back to back
                   paired_score=PairedScore("router ",
                                            lambda c, ids: score_memdec_fast(c.base, c.runner, ids, c.vocab, c.lmbda),
                                            lambda c, ids: score_memdec_router(c.base, c.hrunner, ids, c.vocab,
                                                                               c.router)),
                   paired_label="paired ratio (+MemDec router / +MemDec fast)", finish=_finish_memdec),
    ]


def knnlm_specs(settings: BenchSettings) -> list[MethodSpec]:
    """+kNN-LM over each of `settings.knn_sizes` random keys."""
    return [_knn_spec(size, settings) for size in settings.knn_sizes]


def rag_specs(settings: BenchSettings) -> list[MethodSpec]:
    """+In-Context RAG (a lower bound: its forward passes only)."""
    s = settings
    return [
        MethodSpec("+In-Context RAG", f"lower bound: forward passes only (stride {s.rag_stride}, "
                                      f"{s.rag_doc_tokens}-token document), retrieval left out; scoring estimated "
                                      f"from {s.rag_blocks} of its blocks",
                   decode=lambda c, k, smp: _rag_generate(c.base, c.prompt, k, smp, c.settings.rag_stride, c.doc),
                   setup=_setup_rag,
                   score_ms=lambda c, ids, b, t: _rag_score_ms(c.base, ids, c.doc.expand(b, -1), t, c.settings,
                                                               c.device)),
    ]
