"""The paper's case-study table (issue 18, goal 4(v)): long-tail tokens of a domain's test split and the
probability of each under the base, the kNN-LM and the Memory Decoder.

One scoring and search pass of the base over the evaluation's sliding windows (memdec.pipeline.data) gives,
per scored position, the base's log p(target), the k neighbours' distances and hits
(memdec.eval.tune_knnlm.knn_features, what `--model knnlm` computes); one pass of the Memory Decoder gives
its log p(target) (memdec.inference.scoring.token_logprobs). The kNN distribution and the two mixtures come
from knn_target_logprobs and mixed_logprobs. Long-tail tokens: targets seen at least `min_count` times in the
test split with the lowest frequency per million tokens of a general reference corpus, word-like ones first.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from reports.claims import COLUMNS, case_study_lines  # noqa: E402, F401  (the table is the report's; re-exported)


def word_like(text: str) -> bool:
    """True for a decoded token that reads as a word: at least 4 letters after stripping (and a leading Ġ)."""
    s = text.strip().removeprefix("Ġ").strip()
    return len(s) >= 4 and s.isalpha()


def long_tail_tokens(targets: np.ndarray, reference_counts: np.ndarray, tokenizer, n_tokens: int = 10,
                     min_count: int = 3) -> list[dict[str, Any]]:
    """The `n_tokens` target ids (≥ `min_count` occurrences in `targets`) rarest per million reference tokens
    (`reference_counts[i]`: how often id i occurs there), word-like first (ties: more test occurrences, then
    lower id); special tokens never."""
    ids, counts = np.unique(np.asarray(targets, dtype=np.int64), return_counts=True)
    ref = np.asarray(reference_counts, dtype=np.int64)
    total = max(int(ref.sum()), 1)
    special = set(tokenizer.all_special_ids)
    rows = []
    for i, c in zip(ids.tolist(), counts.tolist(), strict=True):
        if c < min_count or i in special:
            continue
        text = tokenizer.decode([i])
        n_ref = int(ref[i]) if i < len(ref) else 0
        rows.append({"id": i, "text": text, "test_count": c, "reference_count": n_ref,
                     "per_million": n_ref / total * 1e6, "word_like": word_like(text)})
    rows.sort(key=lambda r: (not r["word_like"], r["per_million"], -r["test_count"], r["id"]))
    return rows[:n_tokens]


def reference_counts(reference: str | Path, tokenizer, cache_dir: str | Path | None = None,
                     progress: bool = False) -> np.ndarray:
    """How often each token id occurs in the `reference` corpus, (len(tokenizer),) int64.

    With `cache_dir` the counts are kept there as one .npy per (corpus path, size, mtime, tokenizer
    fingerprint), so a run's domains tokenize a large reference once (`save_npy`: workers may race, each
    writes the same numbers).
    """
    import hashlib

    from memdec.core.formats import load_npy, save_npy
    from memdec.inference.mixing import tokenizer_fingerprint
    from memdec.pipeline.data import CorpusSpec, load_texts, tokenize

    cached = None
    if cache_dir is not None:
        st = Path(reference).stat()
        key = f"{Path(reference).resolve()}|{st.st_size}|{st.st_mtime_ns}|{tokenizer_fingerprint(tokenizer)}"
        cached = Path(cache_dir) / f"reference-counts-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
        if cached.exists():
            return np.asarray(load_npy(cached, mmap=False, dtype=np.int64))
    tokens = tokenize(load_texts(CorpusSpec.from_arg(str(reference))), tokenizer, progress=progress)
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=len(tokenizer)).astype(np.int64)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_npy(cached, counts)
    return counts


def _ppl(logprobs: np.ndarray) -> float | None:
    """Token perplexity, None when infinite (a kNN distribution that misses a target)."""
    nll = -float(np.mean(logprobs))
    return math.exp(nll) if nll < 700 else None


def _summary(cols: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, Any]:
    return {"n_positions": int(mask.sum()),
            "mean_prob": {c: float(np.exp(lp[mask]).mean()) for c, lp in cols.items()},
            "perplexity": {c: _ppl(lp[mask]) for c, lp in cols.items()}}


def _knn_settings(knnlm: dict) -> tuple[int, float, float]:
    from memdec.inference.joint import check_temperature
    from memdec.inference.mixing import check_lmbda

    missing = [key for key in ("k", "lmbda", "temperature") if key not in knnlm]
    if missing:
        raise ValueError(f"case study: knnlm settings {knnlm!r} lack {', '.join(missing)}")
    return (int(knnlm["k"]), check_lmbda(knnlm["lmbda"], "case study: knnlm lmbda"),
            check_temperature(knnlm["temperature"], "case study: knnlm temperature"))


def case_study(base: str, memory: str, datastore: str, test: str, reference: str, knnlm: dict, lmbda: float,
               window: int, stride: int, batch_size: int = 8, n_tokens: int = 10, min_count: int = 3,
               device: str | None = None, out: str | Path | None = None, progress: bool = False,
               reference_cache: str | Path | None = None) -> dict:
    """Mean probability of the true next token under the five columns (COLUMNS) for the long-tail tokens of
    `test` (rarest in `reference`), over the long-tail positions together and over all positions.

    `knnlm` is {"k", "lmbda", "temperature"} (the kNN-LM's settings), `lmbda` the Memory Decoder's weight;
    `reference_cache` a folder for the reference's token counts (`reference_counts`).
    Every input is checked before a model loads; with `out` the result is written there as JSON (atomically).
    """
    from baselines.knnlm import KNNDistribution
    from memdec.core.devices import default_device
    from memdec.core.formats import check_output_file, write_json
    from memdec.core.models import (
        check_context,
        context_length,
        load_causal_lm,
        load_tokenizer,
        resolve_model_path,
    )
    from memdec.eval.tune_knnlm import knn_features, knn_target_logprobs
    from memdec.inference.mixing import check_lmbda, check_same_tokenizer
    from memdec.inference.scoring import mixed_logprobs, token_logprobs
    from memdec.pipeline.data import CorpusSpec, check_min_tokens, load_texts, tokenize
    from memdec.pipeline.datastore import Datastore
    from memdec.pipeline.keys import key_dim

    for path, what in ((test, "test"), (reference, "reference")):
        if not Path(path).exists():
            raise FileNotFoundError(f"case study: {what} corpus {path}: no such file")
    k, knn_lmbda, temperature = _knn_settings(knnlm)
    lmbda = check_lmbda(lmbda, "case study: lmbda")
    if out:
        check_output_file(out, "case study output")
    base, memory = resolve_model_path(base, "base"), resolve_model_path(memory, "memory")
    ds = Datastore.open(datastore)
    if not 1 <= k <= ds.n:
        raise ValueError(f"case study: k = {k} must be between 1 and the size of datastore {datastore} ({ds.n})")
    tok = load_tokenizer(base, "base")
    check_same_tokenizer(tok, load_tokenizer(memory, "memory"), "base", "memory")
    ds.check_tokenizer(tok)
    tokens = tokenize(load_texts(CorpusSpec.from_arg(str(test))), tok, progress=progress)
    ref = reference_counts(reference, tok, reference_cache, progress)
    for name, what in ((base, "base"), (memory, "memory")):
        check_context(context_length(name, what), window, f"{what} {name}")
    check_min_tokens(len(tokens), window, f"test corpus {test}")
    device = device or default_device()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    knn = KNNDistribution(ds, k=k, temperature=temperature, device=device)
    model = load_causal_lm(base, "base", dtype="float32", device=device)
    if key_dim(model) != ds.dim:
        raise ValueError(f"case study: base {base} has keys of dim {key_dim(model)}, datastore {datastore} "
                         f"holds keys of dim {ds.dim}")
    base_lp, dists, hits = knn_features(model, knn, tokens, window, stride, batch_size, len(tok), pad, progress)
    del model, knn
    mem = load_causal_lm(memory, "memory", dtype="float32", device=device)
    mem_lp = token_logprobs(mem, tokens, window, stride, batch_size, len(tok), pad_id=pad, progress=progress)
    del mem
    knn_lp = knn_target_logprobs(dists, hits, temperature)
    cols = {"base": base_lp, "knnlm": mixed_logprobs(base_lp, knn_lp, knn_lmbda), "knn": knn_lp,
            "memdec_alone": mem_lp, "memdec": mixed_logprobs(base_lp, mem_lp, lmbda)}

    targets = np.asarray(tokens[1:], dtype=np.int64)
    chosen = long_tail_tokens(targets, ref, tok, n_tokens, min_count)
    for row in chosen:
        row["mean_prob"] = _summary(cols, targets == row["id"])["mean_prob"]
    result = {
        "settings": {"base": str(base), "memory": str(memory), "datastore": str(ds.path), "test": str(test),
                     "reference": str(reference), "k": k, "knnlm_lmbda": knn_lmbda, "temperature": temperature,
                     "lmbda": lmbda, "window": int(window), "stride": int(stride), "n_positions": int(len(targets)),
                     "reference_tokens": int(ref.sum()), "n_tokens": int(n_tokens), "min_count": int(min_count),
                     "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "tokens": chosen,
        "long_tail": _summary(cols, np.isin(targets, [r["id"] for r in chosen])),
        "all": _summary(cols, np.ones(len(targets), dtype=bool)),
    }
    if out:
        write_json(out, result)
    return result
