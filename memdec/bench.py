"""`memdec bench`: inference speed of a base LM alone, with a Memory Decoder, a kNN-LM and In-Context RAG.

Models are random-weight copies of real architectures built from the configs in memdec/configs/arch
(no downloads); `--small` shrinks them (layers, width, vocabulary, lengths) so the whole run takes
seconds on a CPU. Everything compared is measured in one process on one device:

- scoring: the log-prob of every next token of (batch, length) random token ids, as lm-eval's
  `loglikelihood_rolling` asks for it: for the base, what lm-eval's `hf` model computes (logits,
  log_softmax, argmax for is_greedy, gather); for the Memory Decoder, the plain mixture (float32
  (B, T, V) log-probs of both models, mixed and re-normalised) and the fast path (memdec.inference.fast);
- decoding at batch 1: per-token latency of greedy and sampled decoding, from the time to generate
  N new tokens minus the time to generate 1 (so the prompt's prefill is left out);
- peak GPU memory of each measurement (torch.cuda.max_memory_allocated).

The kNN-LM searches random float16 keys (memdec.pipeline.search.TorchIndex, exact, on the device) with the
base's last-MLP input as the query; In-Context RAG is estimated from its forward passes alone (a
lower bound: BM25 retrieval on the CPU is left out). Results: bench.json, bench.md (table) and
bench.png (bar chart, if matplotlib is installed) in --out.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from memdec.core.devices import parse_dtype
from memdec.core.errors import first_line
from memdec.inference import fast
from memdec.inference.knn import knn_distribution, knn_target_probs
from memdec.inference.mixing import log_softmax, mix_logprobs

ARCH_DIR = Path(__file__).parent / "configs" / "arch"
SMALL = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 512}


@dataclass
class BenchSettings:
    """What `memdec bench` measures; the defaults are the GPU run's, `small()` the CPU test's."""

    device: str = "cuda"
    dtype: str = "bf16"
    base: str = "qwen2.5-1.5b"
    memory: str = "qwen2.5-0.5b"
    small: bool = False
    lmbda: float = 0.5
    score_shapes: list[tuple[int, int]] = field(default_factory=lambda: [(8, 1024), (1, 1024)])
    prompt_len: int = 128
    new_tokens: int = 64
    knn_sizes: list[int] = field(default_factory=lambda: [1_000_000, 10_000_000])
    knn_k: int = 1024
    knn_temperature: float = 1.0
    rag_stride: int = 4
    rag_doc_tokens: int = 256
    rag_blocks: int = 8
    warmup: int = 2
    repeats: int = 5
    decode_repeats: int = 5
    paired_rounds: int = 9  # back-to-back base / +MemDec (fast) rounds for the paired ratios
    compile: bool = True
    seed: int = 0
    budget_s: float = 450.0  # rows not started within this many seconds are skipped (and marked so)

    @classmethod
    def small_cpu(cls, **overrides) -> BenchSettings:
        s = cls(device="cpu", dtype="fp32", small=True, score_shapes=[(4, 64), (1, 64)], prompt_len=16,
                new_tokens=8, knn_sizes=[1000, 10000], knn_k=16, rag_doc_tokens=16, rag_blocks=2, warmup=1,
                repeats=2, decode_repeats=1, paired_rounds=2, compile=False)
        for k, v in overrides.items():
            setattr(s, k, v)
        return s


# ---- models ----


def arch_names() -> list[str]:
    """Architectures shipped in memdec/configs/arch."""
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def arch_config(name: str, small: bool = False):
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


def build_model(name: str, small: bool, dtype: torch.dtype, device: torch.device, seed: int):
    """A random-weight causal LM of architecture `name` on `device` in `dtype`, eval mode."""
    import transformers
    from transformers import AutoModelForCausalLM

    config = arch_config(name, small)
    torch.manual_seed(seed)
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **{key: dtype})
    return model.to(device=device, dtype=dtype).eval()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- timing ----


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _once(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one `fn()` in milliseconds (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of `fn()` in milliseconds after `warmup` calls (CUDA events on a GPU).

    When the last warm-up call took over a second, at most 3 calls are timed.
    """
    last = 0.0
    for _ in range(warmup):
        last = _once(fn, device)
    if last > 1000.0:  # the last warm-up call (compiling is done by then) was slow: fewer repeats
        repeats = min(repeats, 3)
    _sync(device)
    return statistics.median(_once(fn, device) for _ in range(max(1, repeats)))


def paired_ratio(ref: Callable[[], Any], fn: Callable[[], Any], device: torch.device, warmup: int,
                 rounds: int) -> float:
    """Median over `rounds` of time(fn) / time(ref), the two timed back to back (which goes first alternates).

    Drift of the host or the card between measurements (launch-bound batch-1 work varies by tens of per cent
    from minute to minute) cancels, where the ratio of two separately timed rows does not.
    """
    for _ in range(warmup):
        _once(ref, device), _once(fn, device)
    _sync(device)
    ratios = []
    for i in range(max(1, rounds)):
        if i % 2:
            b, a = _once(fn, device), _once(ref, device)
        else:
            a, b = _once(ref, device), _once(fn, device)
        ratios.append(b / a)
    return statistics.median(ratios)


def paired_per_token_ratio(ref: Callable[[int], Any], gen: Callable[[int], Any], n: int, device: torch.device,
                           warmup: int, rounds: int) -> float:
    """Median over `rounds` of gen's per-token decode time / ref's, as `per_token_ms`, the four timed back to back."""
    for _ in range(warmup):
        for k in (n, 1):
            _once(lambda k=k: ref(k), device), _once(lambda k=k: gen(k), device)
    _sync(device)
    ratios = []
    for i in range(max(1, rounds)):
        t = {}
        order = [("ref", ref), ("gen", gen)] if i % 2 == 0 else [("gen", gen), ("ref", ref)]
        for k in (n, 1):
            for name, f in order:
                t[name, k] = _once(lambda f=f, k=k: f(k), device)
        ratios.append((t["gen", n] - t["gen", 1]) / (t["ref", n] - t["ref", 1]))
    return statistics.median(ratios)


class PeakMemory:
    """Peak GPU memory (MiB) allocated inside the block; None off the GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.mib = device, None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20


# ---- what is measured ----


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


def bench_router(base, memory, device: torch.device, seed: int):
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


def per_token_ms(gen: Callable[[int], Any], n: int, device: torch.device, warmup: int, repeats: int) -> float:
    """Decode latency per token: (time for n new tokens - time for 1) / (n - 1)."""
    t_n = time_ms(lambda: gen(n), device, warmup, repeats)
    t_1 = time_ms(lambda: gen(1), device, warmup, repeats)
    return (t_n - t_1) / max(1, n - 1)


# ---- the run ----


@dataclass
class Row:
    """One method's numbers; None where not measured."""

    method: str
    note: str = ""
    score: dict[str, float | None] = field(default_factory=dict)  # "BxT" -> ms
    score_mib: dict[str, float | None] = field(default_factory=dict)
    greedy_ms: float | None = None
    sampled_ms: float | None = None
    decode_mib: float | None = None
    error: str | None = None


def environment(device: torch.device) -> dict[str, Any]:
    """Device name, library versions, date (UTC) and host, for the report."""
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "host": platform.node()}


def _err(e: BaseException) -> str:
    return first_line(e, typed=True)[:200]


def run_bench(settings: BenchSettings, out: str | os.PathLike | None = None,
              progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run every measurement of `settings`; write bench.json / bench.md / bench.png to `out`; the results."""
    saved = os.environ.get("MEMDEC_COMPILE")
    if not settings.compile:  # memdec.inference.fast's fused kernels and MemoryDecoder's graphed decoding
        os.environ["MEMDEC_COMPILE"] = "0"
    try:
        return _run_bench(settings, out, progress)
    finally:
        if saved is None:
            os.environ.pop("MEMDEC_COMPILE", None)
        else:
            os.environ["MEMDEC_COMPILE"] = saved


def _run_bench(settings: BenchSettings, out: str | os.PathLike | None,
               progress: Callable[[str], None] | None) -> dict[str, Any]:
    say = progress or (lambda _m: None)
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench: --device cuda but torch sees no GPU (use --device cpu --small)")
    try:
        dtype = parse_dtype(settings.dtype, device)
    except ValueError as e:
        raise ValueError(f"bench: {e}") from None
    env = environment(device)
    say(f"bench on {env['device_name']} (torch {env['torch']}, transformers {env['transformers']})")
    base = build_model(settings.base, settings.small, dtype, device, settings.seed)
    memory = build_model(settings.memory, settings.small, dtype, device, settings.seed + 1)
    vocab = min(base.config.vocab_size, memory.config.vocab_size)
    if base.config.vocab_size != memory.config.vocab_size:
        say(f"note: vocabularies differ ({base.config.vocab_size} vs {memory.config.vocab_size}); using {vocab}")
    g = torch.Generator(device="cpu").manual_seed(settings.seed)
    lmbda = settings.lmbda
    rows: list[Row] = []
    checks: dict[str, Any] | None = None
    paired: dict[str, float | None] = {}

    t_start = time.perf_counter()

    def measure(row: Row, what: str, fn: Callable[[], Any]) -> Any:
        if time.perf_counter() - t_start > settings.budget_s:
            if not (row.error or "").endswith("time budget"):
                row.error = (row.error + "; " if row.error else "") + f"{what} and later skipped: time budget"
            return None
        try:
            return fn()
        except Exception as e:  # record and go on: one failing method must not lose the others
            row.error = (row.error + "; " if row.error else "") + f"{what}: {_err(e)}"
            say(f"  {row.method} {what}: failed ({_err(e)})")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    def scoring(row: Row, fn: Callable[[torch.Tensor], Any]) -> None:
        for b, t in settings.score_shapes:
            key = f"{b}x{t}"
            ids = torch.randint(0, vocab, (b, t + 1), generator=g).to(device)
            with PeakMemory(device) as pm:
                row.score[key] = measure(row, f"score {key}",
                                         lambda ids=ids: time_ms(lambda: fn(ids), device, settings.warmup,
                                                                 settings.repeats))
            row.score_mib[key] = pm.mib
            say(f"  {row.method} score {key}: {row.score[key]} ms")

    prompt = torch.randint(0, vocab, (1, settings.prompt_len), generator=g).to(device)
    n = settings.new_tokens

    def decoding(row: Row, gen: Callable[[int, bool], Any]) -> None:
        torch.manual_seed(settings.seed)
        with PeakMemory(device) as pm:
            row.greedy_ms = measure(row, "greedy", lambda: per_token_ms(lambda k: gen(k, False), n, device,
                                                                         1, settings.decode_repeats))
            row.sampled_ms = measure(row, "sampled", lambda: per_token_ms(lambda k: gen(k, True), n, device,
                                                                           1, settings.decode_repeats))
        row.decode_mib = pm.mib
        say(f"  {row.method} decode: greedy {row.greedy_ms} ms/token, sampled {row.sampled_ms} ms/token")

    # base alone
    r = Row("base", "scoring as lm-eval `hf`; decoding: HF generate, dynamic cache, eager")
    rows.append(r)
    scoring(r, lambda ids: score_base_hf(base, ids, vocab))
    decoding(r, lambda k, s: _generate_hf(base, prompt, k, s))

    r = Row("base (HF static cache)", "HF generate with a StaticCache (HF compiles its decode step on CUDA)")
    rows.append(r)
    static = fast.make_static_cache(base, 1, settings.prompt_len + n + 8)
    decoding(r, lambda k, s, static=static: _generate_hf(base, prompt, k, s, static))

    from memdec.inference.joint import MemoryDecoder, generate_tokens

    sampling = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0}
    eos = base.config.eos_token_id
    single = {}

    def graphed_single(k: int, s: bool) -> torch.Tensor:
        # the base alone on memdec's graphed step, through the same decode loop as MemoryDecoder.generate
        if "dec" not in single:
            single["dec"] = fast.GraphedDecoder(
                [base], 1, settings.prompt_len + n + 8, use_compile=settings.compile and device.type == "cuda",
                post=lambda out: log_softmax(out[0], vocab))  # in the graph
        kw = sampling if s else {"do_sample": False}
        return generate_tokens(single["dec"].decode_step, prompt, None, None, base.generation_config, max_new_tokens=k,
                               min_new_tokens=k, eos_token_id=eos, pad_token_id=eos, **kw)

    r = Row("base (compiled + graphed)", "scoring: memdec.inference.fast.graphed forward (compiled, one CUDA graph per padded "
                                         "shape) and fused target log-probs, as --model memdec with lmbda=0; "
                                         "decoding: memdec.inference.fast.GraphedDecoder (static cache, compiled step in a "
                                         "CUDA graph, MemoryDecoder's decode loop)")
    rows.append(r)
    scoring(r, lambda ids: score_base_fast(base, ids, vocab))
    decoding(r, graphed_single)

    # Memory Decoder
    class _Tok:  # MemoryDecoder needs only len() and the pad id of a tokenizer here
        pad_token_id = eos

        def __len__(self) -> int:
            return vocab

    joint = MemoryDecoder(base, memory, _Tok(), lmbda)

    fell_back: list[bool] = []  # whether a fast decoding run fell back to the plain loop

    def joint_generate(k: int, s: bool, fast_decode: bool, model: MemoryDecoder | None = None) -> torch.Tensor:
        model = model or joint
        model.fast_decode = fast_decode
        kw = sampling if s else {"do_sample": False}
        out = model.generate(prompt, max_new_tokens=k, min_new_tokens=k, eos_token_id=eos, **kw)
        if fast_decode and model.fast_decode is False:
            fell_back.append(True)
        return out

    r = Row("+MemDec (plain)", "float32 (B,T,V) mixture; MemoryDecoder.generate with dynamic caches, eager")
    rows.append(r)
    scoring(r, lambda ids: score_memdec_plain(base, memory, ids, vocab, lmbda))
    decoding(r, lambda k, s: joint_generate(k, s, False))

    r = Row("+MemDec (fast)", "memdec.inference.fast: fused target log-probs, concurrent forwards; MemoryDecoder.generate "
                              "with its graphed two-model step")
    rows.append(r)
    runner = fast.GraphedForward(memory, use_compile=settings.compile and device.type == "cuda")
    scoring(r, lambda ids: score_memdec_fast(base, runner, ids, vocab, lmbda))
    decoding(r, lambda k, s: joint_generate(k, s, True))
    if fell_back:
        r.error = (r.error + "; " if r.error else "") + "fast decoding fell back to the plain loop (see the log)"
    # the same two comparisons timed back to back, so drift between the rows' measurements cancels
    for b, t in settings.score_shapes:
        ids = torch.randint(0, vocab, (b, t + 1), generator=g).to(device)
        paired[f"score {b}x{t}"] = measure(r, f"paired score {b}x{t}", lambda ids=ids: paired_ratio(
            lambda: score_base_fast(base, ids, vocab), lambda: score_memdec_fast(base, runner, ids, vocab, lmbda),
            device, 1, settings.paired_rounds))
    for mode, smp in (("greedy", False), ("sampled", True)):
        torch.manual_seed(settings.seed)
        paired[mode] = measure(r, f"paired {mode}", lambda smp=smp: paired_per_token_ratio(
            lambda k: graphed_single(k, smp), lambda k: joint_generate(k, smp, True), n, device, 1,
            settings.paired_rounds))
    say(f"  paired ratios (+MemDec fast / base): {paired}")

    r = Row("+MemDec (router, fast)", "the `memdec` model's routed fast path: a random 2-layer router over both "
                                      "hidden states and the four scalars (one fused pass per model's logits)")
    rows.append(r)
    router = bench_router(base, memory, device, settings.seed)
    hrunner = fast.GraphedForward(memory, use_compile=settings.compile and device.type == "cuda", hidden=True)
    scoring(r, lambda ids: score_memdec_router(base, hrunner, ids, vocab, router))
    routed = MemoryDecoder(base, memory, _Tok(), router=router)
    fell_back.clear()
    decoding(r, lambda k, s: joint_generate(k, s, True, routed))
    if fell_back:
        r.error = (r.error + "; " if r.error else "") + "fast decoding fell back to the plain loop (see the log)"
    for b, t in settings.score_shapes:  # the router's cost over +MemDec (fast), timed back to back
        ids = torch.randint(0, vocab, (b, t + 1), generator=g).to(device)
        paired[f"router score {b}x{t}"] = measure(r, f"paired router score {b}x{t}", lambda ids=ids: paired_ratio(
            lambda: score_memdec_fast(base, runner, ids, vocab, lmbda),
            lambda: score_memdec_router(base, hrunner, ids, vocab, router), device, 1, settings.paired_rounds))
    say(f"  paired ratio (+MemDec router / +MemDec fast): "
        f"{ {k: v for k, v in paired.items() if k.startswith('router')} }")
    hrunner = routed = None  # noqa: F841  (their graphs hold memory)
    single.clear()
    checks = measure(r, "agreement check", lambda: agreement(base, memory, joint, prompt, vocab, lmbda, n, g, device,
                                                                 runner))
    joint = None  # noqa: F841  (the memory moves off the GPU below)
    memory = memory.cpu() if device.type == "cuda" else memory
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # kNN-LM
    for size in settings.knn_sizes:
        r = Row(f"+kNN-LM {_count(size)}", f"exact torch search, k={settings.knn_k}, random float16 keys")
        rows.append(r)
        try:
            knn = KNN(base, size, min(settings.knn_k, size), settings.knn_temperature, vocab, device, settings.seed)
        except Exception as e:
            r.error = f"setup: {_err(e)}"
            say(f"  {r.method}: setup failed ({_err(e)})")
            continue
        scoring(r, lambda ids, knn=knn: knn.score(ids, lmbda))
        decoding(r, lambda k, s, knn=knn: _knn_generate(knn, prompt, k, lmbda, s))
        del knn
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # In-Context RAG (forward passes only)
    r = Row("+In-Context RAG", f"lower bound: forward passes only (stride {settings.rag_stride}, "
                               f"{settings.rag_doc_tokens}-token document), retrieval left out; scoring estimated "
                               f"from {settings.rag_blocks} of its blocks")
    rows.append(r)
    doc = torch.randint(0, vocab, (1, settings.rag_doc_tokens), generator=g).to(device)
    for b, t in settings.score_shapes:
        key = f"{b}x{t}"
        ids = torch.randint(0, vocab, (b, t + 1), generator=g).to(device)
        with PeakMemory(device) as pm:
            r.score[key] = measure(r, f"score {key}", lambda ids=ids, b=b, t=t: _rag_score_ms(
                base, ids, doc.expand(b, -1), t, settings, device))
        r.score_mib[key] = pm.mib
        say(f"  {r.method} score {key}: {r.score[key]} ms")
    decoding(r, lambda k, s: _rag_generate(base, prompt, k, s, settings.rag_stride, doc))

    if fast._COMPILE_FAILED:
        env["compile_failed"] = sorted(fast._COMPILE_FAILED)
    result = {"settings": _jsonable(asdict(settings)), "environment": env, "checks": checks, "paired": paired,
              "params": {"base": n_params(base), "memory": n_params(memory)},
              "rows": [asdict(x) for x in rows]}
    result["table"] = markdown_table(result)
    if out is not None:
        write_outputs(result, out)
    return result


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


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# ---- reporting ----


def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{digits}f}"


def _ratio(x: float | None, ref: float | None) -> str:
    return "n/a" if x is None or not ref else f"{x / ref:.2f}x"


def markdown_table(result: dict[str, Any]) -> str:
    """The results as a markdown table: throughput and latency with ratios to the base alone."""
    rows = result["rows"]
    shapes = [f"{b}x{t}" for b, t in result["settings"]["score_shapes"]]
    dec_bases = [r for r in rows if r["method"].startswith("base")]
    best_score = {sh: min((r["score"][sh] for r in dec_bases if r["score"].get(sh)), default=None) for sh in shapes}
    best_g = min((r["greedy_ms"] for r in dec_bases if r["greedy_ms"]), default=None)
    best_s = min((r["sampled_ms"] for r in dec_bases if r["sampled_ms"]), default=None)
    head = ["method"]
    for sh in shapes:
        head += [f"score {sh} tok/s", "ratio"]
    head += ["greedy ms/tok", "ratio", "sampled ms/tok", "ratio", "peak GPU MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"]]
        for sh in shapes:
            b, t = (int(v) for v in sh.split("x"))
            ms = r["score"].get(sh)
            cells += [_fmt(b * t / (ms / 1e3)) if ms else "n/a", _ratio(ms, best_score[sh])]
        cells += [_fmt(r["greedy_ms"], 2), _ratio(r["greedy_ms"], best_g), _fmt(r["sampled_ms"], 2),
                  _ratio(r["sampled_ms"], best_s)]
        mibs = [m for m in [*r["score_mib"].values(), r["decode_mib"]] if m is not None]
        cells.append(_fmt(max(mibs)) if mibs else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    env = result["environment"]
    s = result["settings"]
    notes = [f"{env['device_name']}, torch {env['torch']}, transformers {env['transformers']}, {env['date']}; "
             f"random-weight {s['base']} + {s['memory']}{' (small)' if s['small'] else ''}, {s['dtype']}, "
             f"lmbda {s['lmbda']}.",
             "Scoring ratios: time / the fastest base row at that shape (lm-eval `hf` computation or memdec's "
             f"compiled + graphed base). Decoding ratios: per-token time / the fastest base row; batch 1, prompt {s['prompt_len']}, {s['new_tokens']} new tokens, "
             "(t(N) - t(1)) / (N - 1).",
             ]
    p = {k: v for k, v in (result.get("paired") or {}).items() if v is not None and not k.startswith("router")}
    pr = {k[len("router "):]: v for k, v in (result.get("paired") or {}).items()
          if v is not None and k.startswith("router")}
    if pr:
        notes.append("Router cost, +MemDec (router, fast) / +MemDec (fast) timed back to back (median of "
                     f"{s['paired_rounds']} rounds): " + ", ".join(f"{k} {v:.3f}x" for k, v in pr.items()) + ".")
    if p:
        notes.append(f"Paired ratios, +MemDec (fast) / base timed back to back (median of {s['paired_rounds']} "
                     "rounds; scoring against the compiled + graphed base, decoding against memdec's graphed "
                     "base step): " + ", ".join(f"{k} {v:.2f}x" for k, v in p.items()) + ".")
    c = result.get("checks")
    if c:
        vs32 = (f" (to float32 weights with a float64 mixture: fast {c['score_fast_vs_fp32_max_abs_diff']:.2e}, "
                f"plain {c['score_plain_vs_fp32_max_abs_diff']:.2e})" if "score_fast_vs_fp32_max_abs_diff" in c else "")
        notes.append(f"Fast vs plain on this device: scoring max |difference| {c['score_max_abs_diff']:.2e} nats "
                     f"per token (2x256 tokens){vs32}; greedy decoding: the first {c['greedy_leading_tokens_equal']} of "
                     f"{c['greedy_tokens_compared']} tokens identical (random weights give near-uniform "
                     "distributions, where bf16 rounding can flip an argmax).")
    if env.get("compile_failed"):
        notes.append(f"torch.compile failed for {', '.join(env['compile_failed'])}: plain torch was used there.")
    for r in rows:
        if r["note"]:
            notes.append(f"{r['method']}: {r['note']}.")
        if r["error"]:
            notes.append(f"{r['method']} errors: {r['error']}")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {x}" for x in notes) + "\n"


def write_outputs(result: dict[str, Any], out: str | os.PathLike) -> Path:
    """bench.json, bench.md and (with matplotlib) bench.png in `out`, each written then renamed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("bench.json", json.dumps(result, indent=2) + "\n"), ("bench.md", result["table"])):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)
    plot(result, out / "bench.png")
    return out


def plot(result: dict[str, Any], path: Path) -> bool:
    """Bar chart of the ratios to the fastest base row (scoring and decoding); False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    shapes = [f"{b}x{t}" for b, t in result["settings"]["score_shapes"]]
    dec_bases = [r for r in rows if r["method"].startswith("base")]
    best = {k: min((r[k] for r in dec_bases if r[k]), default=None) for k in ("greedy_ms", "sampled_ms")}
    best_score = {sh: min((r["score"][sh] for r in dec_bases if r["score"].get(sh)), default=None) for sh in shapes}
    series = [(f"score {sh}", [(r["score"].get(sh) or math.nan) / (best_score[sh] or math.nan)
                               for r in rows]) for sh in shapes]
    series += [(k.replace("_ms", " decode"), [(r[k] or math.nan) / (best[k] or math.nan) for r in rows])
               for k in ("greedy_ms", "sampled_ms")]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 4.5))
    width = 0.8 / len(series)
    for j, (label, vals) in enumerate(series):
        ax.bar([i + j * width for i in range(len(rows))], vals, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([r["method"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("time / fastest base (log scale)")
    env = result["environment"]
    ax.set_title(f"memdec bench: {env['device_name']}, {env['date']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def bench(device: str = "cuda", small: bool = False, dtype: str | None = None, base: str = "qwen2.5-1.5b",
          memory: str = "qwen2.5-0.5b", out: str = "runs/bench", compile: bool = True,
          skip_knn: bool = False, budget_s: float | None = None) -> dict[str, Any]:
    """The `memdec bench` command: run with GPU defaults (or `small` CPU ones) and write the files to `out`."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"bench: --device must be cuda or cpu, got {device!r}")
    overrides: dict[str, Any] = {"device": device, "base": base, "memory": memory, "compile": compile}
    if dtype is not None:
        overrides["dtype"] = dtype
    if skip_knn:
        overrides["knn_sizes"] = []
    if budget_s is not None:
        if not budget_s > 0:
            raise ValueError(f"bench: --budget must be > 0 seconds, got {budget_s}")
        overrides["budget_s"] = float(budget_s)
    if small:
        settings = BenchSettings.small_cpu(**overrides)
    else:
        settings = BenchSettings(**overrides)
    result = run_bench(settings, out)
    print(result["table"])
    return result
