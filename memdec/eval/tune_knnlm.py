"""`memdec tune-knnlm`: the kNN-LM's lmbda and temperature with the lowest validation perplexity.

The kNN-LM baseline deserves the same care as the Memory Decoder's lmbda (tune-lambda): the base scores
the validation tokens once over the shared sliding windows (memdec.pipeline.data), and at every scored
position its key (memdec.pipeline.keys) is searched once in the datastore's index for its k neighbours.
What is kept per position is the base's log-prob of the target, the k squared distances and which
neighbours' values are the target; every (temperature, lmbda) of the grid then costs one softmax over
those distances (memdec.inference.knn.neighbour_weights, the kNN-LM's own) and a mix
(memdec.inference.scoring.mixed_logprobs), with no further forward pass or search. The numbers are the
ones `--model knnlm` computes with the same k, backend and windows (the grid in float64, the base's target
log-probs as tune-lambda's).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from memdec.core.devices import default_device, parse_dtype
from memdec.core.formats import check_output_dir, check_output_file, load_npy, save_npy, write_json
from memdec.core.models import (
    check_context,
    context_length,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)
from memdec.eval.tune import parse_grid
from memdec.inference.knn import neighbour_weights
from memdec.inference.scoring import mixed_logprobs, perplexity, target_logprobs

#: default temperature grid: the paper's kNN-LM settings lie inside it (1 for GPT-2 in neulab's scripts, 16-30 here)
DEFAULT_TEMPERATURES = "1,2,4,8,16,32,64"


@dataclass
class KNNTuneResult:
    """Validation perplexity at every (temperature, lmbda) of the grid, and the best pair."""

    lmbdas: list[float]
    temperatures: list[float]
    perplexities: list[list[float]]  # [temperature][lmbda]
    best_lmbda: float
    best_temperature: float
    best_perplexity: float
    base_perplexity: float
    n_tokens: int
    window: int
    stride: int
    k: int
    data: str
    datastore: str

    def table(self) -> str:
        """One line per temperature: its best lmbda and perplexity; the overall best marked."""
        lines = ["  temperature  best lmbda  perplexity"]
        for t, row in zip(self.temperatures, self.perplexities, strict=True):
            j = int(np.argmin(row))
            mark = "  <- best" if t == self.best_temperature else ""
            lines.append(f"  {t:11g}  {self.lmbdas[j]:10.3f}  {row[j]:10.4f}{mark}")
        lines.append(f"  base alone (lmbda 0): {self.base_perplexity:.4f}")
        return "\n".join(lines)

    def model_args(self) -> str:
        """The `--model knnlm` model_args of the best pair (without pretrained and datastore)."""
        return f"k={self.k},lmbda={self.best_lmbda:g},temperature={self.best_temperature:g}"


def parse_temperatures(spec: str | list[float]) -> list[float]:
    """Temperatures from 'a,b,c' (each > 0), sorted and deduplicated."""
    items = spec if isinstance(spec, list | tuple) else [v for v in str(spec).split(",") if v.strip()]
    out = []
    for v in items:
        try:
            t = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"temperature grid {spec!r}: {v!r} is not a number") from None
        if not (t > 0 and math.isfinite(t)):
            raise ValueError(f"temperature grid {spec!r}: temperatures must be > 0, got {v}")
        out.append(t)
    if not out:
        raise ValueError(f"temperature grid {spec!r}: no temperatures")
    return sorted(set(out))


@torch.no_grad()
def knn_features(model, knn, tokens: np.ndarray, window: int, stride: int, batch_size: int = 8,
                 vocab_size: int | None = None, pad_id: int = 0, progress: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base log p(target) float64 (n-1,), squared distances float32 (n-1, k) with +inf for a missing
    neighbour, whether each neighbour's value is the target bool (n-1, k)); row i is target tokens[i + 1].

    `knn` is a baselines.knnlm.KNNDistribution (its index, k, recompute_dists); windows as
    memdec.pipeline.data.sliding_windows, so each target is scored once with the context the tasks give it.
    """
    from tqdm.auto import tqdm

    from memdec.pipeline.data import sliding_windows, window_batch
    from memdec.pipeline.keys import capture_keys

    tokens_t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    n = int(tokens_t.numel())
    k = int(knn.k)
    base_lp = np.full(max(n - 1, 0), np.nan, dtype=np.float64)
    dists = np.full((max(n - 1, 0), k), np.inf, dtype=np.float32)
    hits = np.zeros((max(n - 1, 0), k), dtype=bool)
    vocab_size = vocab_size or model.config.vocab_size
    device = next(model.parameters()).device
    values = knn.values
    windows = sliding_windows(n, window, stride)
    for i in tqdm(range(0, len(windows), batch_size), desc="knn features", disable=not progress):
        chunk = windows[i : i + batch_size]
        ids, attn, _ = window_batch(tokens_t, chunk, pad_id)
        with capture_keys(model) as cap:
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
            keys = cap.pop()
        # the base's target log-probs exactly as tune-lambda's (memdec.inference.scoring.token_logprobs)
        lp = target_logprobs(logits[:, :-1], ids[:, 1:].to(device), vocab_size).cpu().double()
        rows, queries, targets = [], [], []
        for b, w in enumerate(chunk):
            j0 = w.score_start - w.start  # first scored input position; its prediction comes from j0 - 1
            rows.append(slice(w.score_start - 1, w.end - 1))
            base_lp[rows[-1]] = lp[b, j0 - 1 : w.end - w.start - 1].numpy()
            queries.append(keys[b, j0 - 1 : w.end - w.start - 1])
            targets.append(ids[b, j0 : w.end - w.start])
        d, nb = knn.neighbours(torch.cat(queries))  # one search for the whole batch
        target = torch.cat(targets).to(nb.device)
        valid = (nb >= 0) & torch.isfinite(d)
        hit = (valid & (values.to(nb.device)[nb.clamp_min(0)] == target[:, None])).cpu().numpy()
        d = torch.where(valid, d.float(), torch.full_like(d.float(), math.inf)).cpu().numpy()
        start = 0
        for r in rows:
            stop = start + (r.stop - r.start)
            dists[r], hits[r] = d[start:stop], hit[start:stop]
            start = stop
    return base_lp, dists, hits


def knn_target_logprobs(dists: np.ndarray | torch.Tensor, hits: np.ndarray | torch.Tensor,
                        temperature: float) -> np.ndarray:
    """float64 log p_knn(target) (n,) at one temperature from `knn_features`' distances and hits (-inf: no hit)."""
    d = torch.as_tensor(np.asarray(dists, dtype=np.float64)) if not torch.is_tensor(dists) else dists.double()
    hit = torch.as_tensor(np.asarray(hits)) if not torch.is_tensor(hits) else hits
    ids = torch.where(torch.isfinite(d), 0, -1)  # neighbour_weights' validity: a finite distance
    p, _ = neighbour_weights(d, ids, temperature)
    mass = torch.where(hit, p, torch.zeros_like(p)).sum(-1)
    with np.errstate(divide="ignore"):
        return np.log(mass.numpy())


def grid_perplexities(base_lp: np.ndarray, dists: np.ndarray, hits: np.ndarray, lmbdas: list[float],
                      temperatures: list[float]) -> list[list[float]]:
    """Token perplexity of the kNN-LM mixture at every (temperature, lmbda): [temperature][lmbda]."""
    d = torch.as_tensor(np.asarray(dists, dtype=np.float64))  # converted once for every temperature
    hit = torch.as_tensor(np.asarray(hits))
    out = []
    for t in temperatures:
        knn_lp = knn_target_logprobs(d, hit, t)
        out.append([perplexity(mixed_logprobs(base_lp, knn_lp, lm)) for lm in lmbdas])
    return out


def _cache_key(base: str, datastore, tokens: np.ndarray, window: int, stride: int, k: int, dtype: str,
               backend: str, recompute: bool) -> str:
    from memdec.eval.tune import _cache_path

    base_file = _cache_path(".", "base", base, tokens, window, stride, dtype).name  # keyed by the base's files
    manifest = json.dumps(datastore.manifest, sort_keys=True, default=str)
    key = json.dumps({"base": base_file, "datastore": os.path.abspath(str(datastore.path)),
                      "manifest": hashlib.sha256(manifest.encode()).hexdigest(), "k": k, "backend": backend,
                      "recompute": recompute})
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def tune_knnlm(
    base: str,
    datastore: str,
    data: str,
    k: int = 1024,
    lmbda_grid: str | list[float] = "0:1:0.05",
    temperatures: str | list[float] = DEFAULT_TEMPERATURES,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    backend: str = "torch",
    recompute_dists: bool = False,
    device: str | None = None,
    dtype: str = "float32",
    split: str | None = None,
    text_column: str | None = None,
    max_docs: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> KNNTuneResult:
    """Search and score `data` once, then return the perplexity grid over (temperature, lmbda) and its best pair.

    `data` is a local file/folder or `hf:NAME[:CONFIG]`; window defaults to min(1024, the base's context),
    stride to half of it. With `cache_dir` the per-position features are kept there (.npy), so another grid
    costs no forward pass. With `out`, the result is written as JSON (checked writable before any work).
    """
    from baselines.knnlm import KNNDistribution
    from memdec.pipeline.data import (
        CorpusSpec,
        check_min_tokens,
        default_stride,
        default_window,
        load_texts,
        tokenize,
    )
    from memdec.pipeline.datastore import Datastore
    from memdec.pipeline.keys import key_dim

    lmbdas, temps = parse_grid(lmbda_grid), parse_temperatures(temperatures)
    torch_dtype = parse_dtype(dtype)
    base = resolve_model_path(base, "base")
    if out:
        check_output_file(out, "--out")
    if cache_dir:
        check_output_dir(cache_dir, "--cache")
    ds = Datastore.open(datastore)
    if not 1 <= int(k) <= ds.n:  # before the base loads
        raise ValueError(f"tune-knnlm: k = {k} must be between 1 and the size of datastore {datastore} ({ds.n} entries)")
    tok = load_tokenizer(base, "base")
    ds.check_tokenizer(tok)
    spec = CorpusSpec.from_arg(data, split=split, text_column=text_column, max_docs=max_docs)
    limit = context_length(base, "base")
    device = device or default_device()
    tokens = tokenize(load_texts(spec), tok, progress=progress)
    window = int(window or default_window(limit))
    stride = int(stride or default_stride(window))
    check_context(limit, window, f"base {base}")
    check_min_tokens(len(tokens), window, f"data {spec.describe()}")
    stem = None
    if cache_dir:
        key = _cache_key(base, ds, tokens, window, stride, int(k), dtype, backend, recompute_dists)
        stem = Path(cache_dir) / f"knnlm_features_{key}"
    n = len(tokens) - 1
    names = ("base_logprobs", "distances", "hits")
    if stem is not None and all(Path(f"{stem}.{x}.npy").exists() for x in names):
        base_lp = load_npy(f"{stem}.base_logprobs.npy", mmap=False, shape=(n,), dtype=np.float64)
        dists = load_npy(f"{stem}.distances.npy", mmap=False, shape=(n, int(k)), dtype=np.float32)
        hits = load_npy(f"{stem}.hits.npy", mmap=False, shape=(n, int(k)), dtype=np.bool_)
    else:  # the index is opened (and the base loaded) only when the features are not cached
        knn = KNNDistribution(ds, k=k, temperature=1.0, backend=backend, recompute_dists=recompute_dists,
                              device=device)
        model = load_causal_lm(base, "base", dtype=torch_dtype, device=device)
        if key_dim(model) != ds.dim:
            raise ValueError(f"tune-knnlm: base {base} has keys of dim {key_dim(model)}, datastore {datastore} "
                             f"holds keys of dim {ds.dim} (built with {ds.manifest.get('model')})")
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        base_lp, dists, hits = knn_features(model, knn, tokens, window, stride, batch_size, len(tok), pad, progress)
        if stem is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            for name, arr in zip(names, (base_lp, dists, hits), strict=True):
                save_npy(f"{stem}.{name}.npy", arr)
    ppls = grid_perplexities(base_lp, dists, hits, lmbdas, temps)
    ti, li = np.unravel_index(int(np.argmin(np.asarray(ppls))), (len(temps), len(lmbdas)))
    result = KNNTuneResult(lmbdas=lmbdas, temperatures=temps, perplexities=ppls, best_lmbda=lmbdas[li],
                           best_temperature=temps[ti], best_perplexity=ppls[ti][li],
                           base_perplexity=perplexity(base_lp), n_tokens=n, window=window, stride=stride,
                           k=int(k), data=spec.describe(), datastore=str(ds.path))
    if out:
        write_json(out, {**asdict(result), "base": str(base), "model_args": result.model_args()})
    return result
