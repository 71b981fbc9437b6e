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

The pieces: memdec.bench.models (architectures), .timing, .methods (the scorers and one spec per row) and .report.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from memdec.core.devices import parse_dtype
from memdec.core.errors import first_line
from memdec.inference import fast

from .methods import BenchContext, MethodSpec, method_specs
from .models import build_model, n_params
from .report import markdown_table, write_outputs
from .timing import PeakMemory, environment, paired_per_token_ratio, paired_ratio, per_token_ms, time_ms


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
    prompt = torch.randint(0, vocab, (1, settings.prompt_len), generator=g).to(device)
    ctx = BenchContext(settings, device, base, memory, vocab, g, prompt)
    rows: list[Row] = []
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

    for spec in method_specs(settings):
        row = Row(spec.name, spec.note)
        rows.append(row)
        if spec.setup is not None:
            try:
                spec.setup(ctx)
            except Exception as e:
                if not spec.setup_may_fail:
                    raise
                row.error = f"setup: {_err(e)}"
                say(f"  {row.method}: setup failed ({_err(e)})")
                continue
        _measure_row(spec, row, ctx, measure, paired, say)
        if spec.teardown is not None:
            spec.teardown(ctx)

    if fast._COMPILE_FAILED:
        env["compile_failed"] = sorted(fast._COMPILE_FAILED)
    result = {"settings": _jsonable(asdict(settings)), "environment": env, "checks": ctx.checks, "paired": paired,
              "params": {"base": n_params(ctx.base), "memory": n_params(ctx.memory)},
              "rows": [asdict(x) for x in rows]}
    result["table"] = markdown_table(result)
    if out is not None:
        write_outputs(result, out)
    return result


def _measure_row(spec: MethodSpec, row: Row, ctx: BenchContext, measure: Callable[[Row, str, Callable[[], Any]], Any],
                 paired: dict[str, float | None], say: Callable[[str], None]) -> None:
    """One spec's measurements into `row` (and `paired`): scoring at each shape, decoding, the paired ratios."""
    s, device, n = ctx.settings, ctx.device, ctx.n
    if spec.score is not None or spec.score_ms is not None:
        for b, t in s.score_shapes:
            key = f"{b}x{t}"
            ids = ctx.ids(b, t)
            if spec.score_ms is not None:
                fn = lambda ids=ids, b=b, t=t: spec.score_ms(ctx, ids, b, t)  # noqa: E731
            else:
                fn = lambda ids=ids: time_ms(lambda: spec.score(ctx, ids), device, s.warmup, s.repeats)  # noqa: E731
            with PeakMemory(device) as pm:
                row.score[key] = measure(row, f"score {key}", fn)
            row.score_mib[key] = pm.mib
            say(f"  {row.method} score {key}: {row.score[key]} ms")
    if spec.decode is not None:
        if spec.marks_fallback:
            ctx.fell_back.clear()
        gen = spec.decode
        torch.manual_seed(s.seed)
        with PeakMemory(device) as pm:
            row.greedy_ms = measure(row, "greedy", lambda: per_token_ms(lambda k: gen(ctx, k, False), n, device,
                                                                         1, s.decode_repeats))
            row.sampled_ms = measure(row, "sampled", lambda: per_token_ms(lambda k: gen(ctx, k, True), n, device,
                                                                           1, s.decode_repeats))
        row.decode_mib = pm.mib
        say(f"  {row.method} decode: greedy {row.greedy_ms} ms/token, sampled {row.sampled_ms} ms/token")
        if spec.marks_fallback and ctx.fell_back:
            row.error = (row.error + "; " if row.error else "") + "fast decoding fell back to the plain loop (see the log)"
    ps = spec.paired_score
    if ps is not None:
        for b, t in s.score_shapes:
            ids = ctx.ids(b, t)
            paired[f"{ps.prefix}score {b}x{t}"] = measure(row, f"paired {ps.prefix}score {b}x{t}", lambda ids=ids: (
                paired_ratio(lambda: ps.ref(ctx, ids), lambda: ps.fn(ctx, ids), device, 1, s.paired_rounds)))
    pd = spec.paired_decode
    if pd is not None:
        for mode, smp in (("greedy", False), ("sampled", True)):
            torch.manual_seed(s.seed)
            paired[mode] = measure(row, f"paired {mode}", lambda smp=smp: paired_per_token_ratio(
                lambda k: pd.ref(ctx, k, smp), lambda k: pd.gen(ctx, k, smp), n, device, 1, s.paired_rounds))
    if spec.paired_label:
        prefix = ps.prefix if ps is not None else ""
        say(f"  {spec.paired_label}: { {k: v for k, v in paired.items() if k.startswith(prefix)} }")
    if spec.finish is not None:
        spec.finish(ctx, lambda what, fn: measure(row, what, fn))



def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x




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
