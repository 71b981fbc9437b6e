"""`memdec tune-lambda`: the mixing weight lmbda that minimises validation perplexity.

Each model scores the validation tokens once (memdec.inference.scoring.token_logprobs over the shared sliding
windows); the perplexity of every lmbda on the grid then comes from those cached per-token numbers
through memdec.inference.mixing.mix_logprobs, with no further forward passes. With `write`, the best value
becomes the "lmbda" of the memory decoder's memdec.json (its other fields are kept).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from memdec.core.devices import default_device, parse_dtype
from memdec.core.formats import (
    FORMAT_VERSION,
    check_output_dir,
    check_output_file,
    load_npy,
    read_json,
    save_npy,
    write_json,
)
from memdec.core.models import (
    MEMDEC_JSON,
    check_context,
    context_length,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)
from memdec.inference.mixing import check_lmbda, check_same_tokenizer, tokenizer_fingerprint
from memdec.inference.scoring import mixed_logprobs, pair_logprobs, perplexity


@dataclass
class TuneResult:
    """The perplexity at each lmbda of the grid, and the best one."""

    grid: list[float]
    perplexities: list[float]
    best_lmbda: float
    best_perplexity: float
    n_tokens: int
    window: int
    stride: int
    data: str
    written: str | None = field(default=None)

    def table(self) -> str:
        """The curve as a plain-text table, the best row marked."""
        lines = ["  lmbda  perplexity"]
        for lm, ppl in zip(self.grid, self.perplexities, strict=True):
            mark = "  <- best" if lm == self.best_lmbda else ""
            lines.append(f"  {lm:5.3f}  {ppl:10.4f}{mark}")
        return "\n".join(lines)


def parse_grid(spec: str | list[float]) -> list[float]:
    """lmbda values from 'START:STOP:STEP' (STOP included) or 'a,b,c'; each checked to lie in [0, 1]."""
    if isinstance(spec, list | tuple):
        values = [check_lmbda(v, "grid value") for v in spec]
    elif ":" in str(spec):
        parts = str(spec).split(":")
        if len(parts) != 3:
            raise ValueError(f"grid {spec!r}: expected START:STOP:STEP, e.g. 0:1:0.05")
        try:
            start, stop, step = (float(p) for p in parts)
        except ValueError:
            raise ValueError(f"grid {spec!r}: START, STOP and STEP must be numbers") from None
        if not step > 0 or stop < start:
            raise ValueError(f"grid {spec!r}: needs STEP > 0 and STOP >= START")
        n = int(math.floor((stop - start) / step + 1e-9)) + 1
        values = [check_lmbda(round(start + i * step, 10), "grid value") for i in range(n)]
    else:
        try:
            values = [check_lmbda(float(v), "grid value") for v in str(spec).split(",") if v.strip()]
        except ValueError as e:
            raise ValueError(f"grid {spec!r}: {e}") from None
    if not values:
        raise ValueError(f"grid {spec!r}: no lmbda values")
    return sorted(set(values))


def curve(base_logp: np.ndarray, memory_logp: np.ndarray, grid: list[float]) -> list[float]:
    """Perplexity of the mixture at each lmbda, from the two models' per-token log-probs (float64)."""
    return [perplexity(mixed_logprobs(base_logp, memory_logp, lm)) for lm in grid]


def _hub_snapshot(name: str) -> str:
    """The commit of hub model `name` in the local Hugging Face cache ('' if it is not cached); no network."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id: the name alone keys it
        return ""
    return Path(found).parent.name if isinstance(found, str) else ""


def _cache_path(cache_dir: str | os.PathLike, what: str, name: str, tokens: np.ndarray, window: int,
                stride: int, dtype: str) -> Path:
    """Cache file of one model's per-token log-probs; the name changes when any input does (for a local
    folder its weight files' names, sizes and times; for a hub model the commit cached locally)."""
    local = Path(name).is_dir()
    files = sorted(Path(name).glob("*.safetensors")) + sorted(Path(name).glob("*.bin")) if local else []
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files] if local else _hub_snapshot(name)
    key = json.dumps({"model": os.path.abspath(name) if local else name, "files": stamp,
                      "tokens": hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int64).tobytes()).hexdigest(),
                      "window": window, "stride": stride, "dtype": dtype})
    return Path(cache_dir) / f"{what}_logprobs_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"


def write_lmbda(memory: str | os.PathLike, lmbda: float, tokenizer=None, tuning: dict | None = None) -> Path:
    """Set "lmbda" in MEMORY/memdec.json (atomically), keeping its other fields; create it if absent."""
    folder = Path(memory)
    if not folder.is_dir():
        raise FileNotFoundError(f"memory {memory}: not a local folder, cannot write its {MEMDEC_JSON}")
    path = folder / MEMDEC_JSON
    data = read_json(path) if path.exists() else {"format_version": FORMAT_VERSION}
    if "tokenizer_fingerprint" not in data and tokenizer is not None:
        data["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
    data["lmbda"] = check_lmbda(lmbda)
    if tuning is not None:
        data["lmbda_tuning"] = tuning
    write_json(path, data)
    return path


def tune_lambda(
    base: str,
    memory: str,
    data: str,
    window: int | None = None,
    stride: int | None = None,
    grid: str | list[float] = "0:1:0.05",
    batch_size: int = 8,
    write: bool = False,
    plot: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str = "float32",
    split: str | None = None,
    text_column: str | None = None,
    max_docs: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> TuneResult:
    """Score `data` once with each model, then return the perplexity curve over `grid` and its best lmbda.

    `data` is a local file/folder or `hf:NAME[:CONFIG]`; window defaults to the shorter context of
    the two models (at most 1024), stride to half the window. With `write`, stores the best lmbda
    in MEMORY/memdec.json; with `plot`, saves the curve as a PNG there. With `cache_dir`, each model's
    per-token log-probs are kept there (.npy, keyed by model files or hub commit, tokens, window, stride, dtype), so a
    rerun (another grid, or after a kill) scores only what is missing.
    """
    from memdec.pipeline.data import (
        CorpusSpec,
        check_min_tokens,
        default_stride,
        default_window,
        load_texts,
        tokenize,
    )

    values = parse_grid(grid)
    torch_dtype = parse_dtype(dtype)
    base, memory = resolve_model_path(base, "base"), resolve_model_path(memory, "memory")
    if write and not Path(memory).is_dir():
        raise FileNotFoundError(f"memory {memory}: not a local folder, cannot write its {MEMDEC_JSON}")
    if write:  # every output is checked before any scoring, and written last
        check_output_file(Path(memory) / MEMDEC_JSON, "--write")
    if plot:
        check_output_file(plot, "--plot")
    if cache_dir:
        check_output_dir(cache_dir, "--cache")
    tok = load_tokenizer(base, "base")
    check_same_tokenizer(tok, load_tokenizer(memory, "memory"), "base", "memory")
    spec = CorpusSpec.from_arg(data, split=split, text_column=text_column, max_docs=max_docs)
    tokens = tokenize(load_texts(spec), tok, progress=progress)
    limits = {f"{what} {name}": context_length(name, what) for name, what in ((base, "base"), (memory, "memory"))}
    window = int(window or default_window(*limits.values()))
    stride = int(stride or default_stride(window))
    for what, limit in limits.items():  # before any scoring
        check_context(limit, window, what)
    check_min_tokens(len(tokens), window, f"data {spec.describe()}")
    device = device or default_device()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    paths, scored = {}, {}
    for name, what in ((base, "base"), (memory, "memory")):
        paths[what] = _cache_path(cache_dir, what, name, tokens, window, stride, dtype) if cache_dir else None
        if paths[what] is not None and paths[what].exists():
            scored[what] = load_npy(paths[what], mmap=False, shape=(len(tokens) - 1,), dtype=np.float64)
        else:  # loaded when scored: one model in memory at a time
            scored[what] = lambda name=name, what=what: load_causal_lm(name, what, dtype=torch_dtype, device=device)
    logps = pair_logprobs(scored["base"], scored["memory"], tokens, window, stride, batch_size, len(tok),
                          pad_id=pad, progress=progress)
    for what, lp in zip(("base", "memory"), logps, strict=True):
        path = paths[what]
        if path is not None and not isinstance(scored[what], np.ndarray):
            path.parent.mkdir(parents=True, exist_ok=True)
            save_npy(path, lp)
    base_lp, memory_lp = logps
    ppls = curve(base_lp, memory_lp, values)
    best = int(np.argmin(ppls))
    result = TuneResult(grid=values, perplexities=ppls, best_lmbda=values[best], best_perplexity=ppls[best],
                        n_tokens=int(len(base_lp)), window=window, stride=stride, data=spec.describe())
    if plot:
        plot_curve(result, plot)
    if write:
        tuning = {k: v for k, v in asdict(result).items() if k != "written"}
        tuning["base"] = str(base)
        result.written = str(write_lmbda(memory, result.best_lmbda, tok, tuning))
    return result


def plot_curve(result: TuneResult, path: str | os.PathLike) -> Path:
    """PNG of perplexity against lmbda, the best point marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(result.grid, result.perplexities, marker=".")
    ax.plot([result.best_lmbda], [result.best_perplexity], marker="*", markersize=14, linestyle="none",
            label=f"best lmbda {result.best_lmbda:g}: {result.best_perplexity:.3f}")
    ax.set_xlabel("lmbda (weight of the memory decoder)")
    ax.set_ylabel("token perplexity")
    ax.set_title(f"{result.data}, window {result.window} / stride {result.stride}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    return Path(path)
