"""The In-Context RAG copy check at the retrieval level (issue 18, goal 3): does BM25 find the test passage?
And the models' side of it (`copy_ability`): can a model copy a passage it is shown?

    python experiments/offline_reproduction/rag_check.py --tokenizer TOK --test TEST.jsonl \
        --corpus TRAIN.jsonl [--corpus TRAIN+TEST.jsonl] [--stride 32 --query-tokens 32 --chunk-tokens 128]

For every retrieval point of each test document (every `stride` tokens, as `--model incontext_rag` plans
them: the query is the decoded last `query_tokens` tokens), the best BM25 chunk of each corpus
(baselines.incontext_rag.ChunkIndex, the model's own index) is checked for the next `stride` tokens: the
share of points whose retrieved chunk holds them verbatim, and the share holding the next token right after
the query's last token. With the test documents in the corpus this share is high when retrieval works; the
perplexity then falls only if the model can copy what it is shown (the results say whether it does).
No model is loaded: the check runs on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _contains(hay: np.ndarray, needle: np.ndarray) -> bool:
    """Whether `needle` occurs in `hay` as a contiguous run."""
    n = len(needle)
    if n == 0 or len(hay) < n:
        return n == 0
    starts = np.flatnonzero(hay[: len(hay) - n + 1] == needle[0])
    return any(np.array_equal(hay[s : s + n], needle) for s in starts)


def retrieval_check(tokenizer, test_docs: list[str], corpus: str, stride: int = 32, query_tokens: int = 32,
                    chunk_tokens: int = 128, cache_dir: str | None = None) -> dict[str, Any]:
    """Share of retrieval points whose best chunk of `corpus` holds the next `stride` tokens (and the next token)."""
    from baselines.incontext_rag import ChunkIndex
    from memdec.pipeline.data import tokenize

    index = ChunkIndex.build_or_load(corpus, tokenizer, chunk_tokens, cache_dir)
    queries, nexts = [], []
    for doc in test_docs:
        ids = tokenize([doc], tokenizer, progress=False)
        for p in range(query_tokens, len(ids) - 1, stride):
            queries.append(tokenizer.decode(ids[p - query_tokens : p].tolist()))
            nexts.append((ids[p - query_tokens : p], ids[p : p + stride]))
    docs = index.retrieve(queries)
    block = [d is not None and _contains(d, nxt) for d, (_, nxt) in zip(docs, nexts, strict=True)]
    token = [d is not None and _contains(d, np.concatenate([q[-4:], nxt[:1]])) for d, (q, nxt) in
             zip(docs, nexts, strict=True)]
    return {"corpus": corpus, "points": len(queries), "retrieved": int(sum(d is not None for d in docs)),
            "holds_next_block": float(np.mean(block)) if block else 0.0,
            "holds_next_token": float(np.mean(token)) if token else 0.0,
            "stride": stride, "query_tokens": query_tokens, "chunk_tokens": chunk_tokens}


def copy_spans(tokens: np.ndarray, span: int, n_spans: int) -> np.ndarray:
    """`n_spans` spans of `span` tokens at evenly spaced, non-overlapping offsets of `tokens`, (n, span)."""
    if span < 2 or n_spans < 1:
        raise ValueError(f"copy ability: span ({span}) must be at least 2 and n_spans ({n_spans}) at least 1")
    n = min(int(n_spans), len(tokens) // span)
    if n < 1:
        raise ValueError(f"copy ability: the test text has {len(tokens)} tokens, fewer than one span of {span}")
    starts = np.linspace(0, len(tokens) - span, n).astype(np.int64)
    return np.stack([np.asarray(tokens[s : s + span], dtype=np.int64) for s in starts])


def copy_ability(model_path: str, tokens: np.ndarray, span: int = 128, n_spans: int = 32, batch_size: int = 8,
                 device: str | None = None, vocab_size: int | None = None) -> dict[str, Any]:
    """Whether a model copies from its context: mean NLL (nats per token) of `n_spans` test spans of `span`
    tokens each shown twice in a row, on tokens 1..span-1 of the first copy and of the second.

    A model with induction heads predicts the second copy almost perfectly (NLL near 0); a model that cannot
    copy scores both copies alike, and then In-Context RAG cannot help it even when the retrieved chunk holds
    the continuation (the copy check). `vocab_size`: the tokenizer's length (default the model's logits').
    """
    import torch

    from memdec.core.devices import default_device
    from memdec.core.models import check_context, context_length, load_causal_lm
    from memdec.inference.scoring import target_logprobs

    spans = copy_spans(tokens, span, n_spans)
    check_context(context_length(model_path, "model"), 2 * span, f"model {model_path} (two copies of a span)")
    device = device or default_device()
    model = load_causal_lm(model_path, "model", dtype="float32", device=device)
    first, second = [], []
    with torch.no_grad():
        for i in range(0, len(spans), batch_size):
            x = torch.as_tensor(np.concatenate([spans[i : i + batch_size]] * 2, axis=1), device=device)
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
            nll = -target_logprobs(logits, x[:, 1:], vocab_size or logits.shape[-1]).double()  # [:, j]: x[:, j + 1]
            first.append(nll[:, : span - 1].cpu())
            second.append(nll[:, span:].cpu())
    f, s = torch.cat(first), torch.cat(second)
    return {"model": str(model_path), "span": int(span), "n_spans": int(len(spans)),
            "nll_first": float(f.mean()), "nll_second": float(s.mean()),
            "second_over_first": float(s.mean() / f.mean()) if float(f.mean()) > 0 else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--test", required=True, help="jsonl of test documents ({'text': ...} per line)")
    ap.add_argument("--corpus", action="append", required=True, help="a retrieval corpus (repeatable)")
    ap.add_argument("--stride", type=int, default=32)
    ap.add_argument("--query-tokens", type=int, default=32)
    ap.add_argument("--chunk-tokens", type=int, default=128)
    ap.add_argument("--cache-dir")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer

    for path in [a.test, *a.corpus]:
        if not Path(path).is_file():
            print(f"rag_check: error: {path}: no such file", file=sys.stderr)
            return 2
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    from memdec.pipeline.data import CorpusSpec, load_texts

    docs = load_texts(CorpusSpec(path=a.test))
    res = [retrieval_check(tok, docs, c, a.stride, a.query_tokens, a.chunk_tokens, a.cache_dir) for c in a.corpus]
    print(json.dumps(res, indent=1))
    if a.out:
        from memdec.core.formats import write_json

        write_json(a.out, {"test": a.test, "results": res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
