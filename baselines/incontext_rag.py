"""In-Context RAG baseline (In-Context RALM, Ram et al. 2023) as the lm-eval model `incontext_rag`.

    memdec-eval --model incontext_rag \
        --model_args pretrained=BASE,corpus=PATH,stride=4,query_tokens=32,max_doc_tokens=256 --tasks ...

The domain corpus is tokenized with the base model's tokenizer, split into chunks of `chunk_tokens`
tokens (never across documents) and indexed with BM25 (bm25s). Scoring a continuation goes in blocks
of `stride` tokens: at the start of each block (the retrieval point) the last `query_tokens` tokens
form the query, the best chunk (truncated to `max_doc_tokens`) and `separator` are placed before the
context, and only the block's tokens are scored. A block without a hit (empty query, no shared
term, no corpus) is scored by the base model alone. Generation retrieves again every `stride` new
tokens. The BM25 index is built once and cached under `cache_dir` (default ~/.cache/memdec/rag),
keyed by a hash of the corpus text, the tokenizer and the chunk size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from memdec.core.formats import is_complete, load_npy, read_manifest, save_npy, staged_output, write_manifest
from memdec.eval.models import _as_int
from memdec.inference.mixing import tokenizer_fingerprint
from memdec.inference.scoring import target_logprobs
from memdec.methods import Method, register_method
from memdec.pipeline.data import CorpusSpec, load_texts, tokenize


def _bm25s():
    """bm25s, imported so that it cannot take the GPU: bm25s imports JAX when installed, and JAX would
    preallocate 75 % of the GPU's memory at import (seen as CUDA out-of-memory in the base model)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import bm25s

    return bm25s


INDEX_KIND = "rag_index"
INDEX_VERSION = 1


def default_cache_dir() -> Path:
    """Where retrieval indexes are cached: $MEMDEC_CACHE/rag, else ~/.cache/memdec/rag."""
    root = os.environ.get("MEMDEC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "memdec")
    return Path(root) / "rag"


def chunk_spans(tokens: np.ndarray, eos: int | None, chunk_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of chunks of at most `chunk_tokens` tokens; EOS separates documents and is in none."""
    cuts = np.flatnonzero(tokens == eos) if eos is not None else np.zeros(0, dtype=np.int64)
    doc_starts = np.concatenate([[0], cuts + 1])
    doc_ends = np.concatenate([cuts, [len(tokens)]])
    spans = [(s, min(s + chunk_tokens, int(b))) for a, b in zip(doc_starts, doc_ends, strict=True)
             for s in range(int(a), int(b), chunk_tokens)]
    starts, ends = np.asarray(spans, dtype=np.int64).reshape(-1, 2).T
    return starts, ends


class ChunkIndex:
    """BM25 (bm25s) over token chunks of a corpus; `retrieve` returns the best chunk's token ids."""

    def __init__(self, retriever, tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray, folder: Path):
        self.retriever = retriever
        self.tokens = tokens
        self.starts = starts
        self.ends = ends
        self.folder = folder

    def __len__(self) -> int:
        return len(self.starts)

    def chunk(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.starts[i] : self.ends[i]])

    @classmethod
    def build_or_load(
        cls, corpus: str | CorpusSpec, tokenizer, chunk_tokens: int, cache_dir: str | os.PathLike | None = None
    ) -> ChunkIndex:
        """The index of `corpus` chunked by `tokenizer`, loaded from the cache or built and cached."""
        bm25s = _bm25s()

        if chunk_tokens < 1:
            raise ValueError(f"incontext_rag: chunk_tokens must be >= 1, got {chunk_tokens}")
        spec = CorpusSpec.from_arg(corpus)
        texts = load_texts(spec)  # raises a one-line error for a corpus with no text
        digest = hashlib.sha256()
        for t in texts:
            digest.update(hashlib.sha256(t.encode("utf-8")).digest())
        settings = {"version": INDEX_VERSION, "corpus_sha256": digest.hexdigest(), "chunk_tokens": chunk_tokens,
                    "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "bm25": "bm25s-lucene-en"}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
        folder = Path(cache_dir or default_cache_dir()) / key
        if not is_complete(folder, INDEX_KIND):
            if folder.exists():
                shutil.rmtree(folder)  # a folder without a manifest is not an index
            with staged_output(folder) as tmp:
                tokens = tokenize(texts, tokenizer)
                starts, ends = chunk_spans(tokens, tokenizer.eos_token_id, chunk_tokens)
                chunk_texts = [tokenizer.decode(tokens[a:b].tolist(), skip_special_tokens=True)
                               for a, b in zip(starts, ends, strict=True)]
                words = bm25s.tokenize(chunk_texts, stopwords="en", show_progress=False)
                if not words.vocab:
                    raise ValueError(f"incontext_rag: corpus {spec.describe()} has no words BM25 can index "
                                     "(its chunks decode to no alphanumeric non-stopword tokens)")
                retriever = bm25s.BM25()
                retriever.index(words, show_progress=False)
                retriever.save(str(tmp / "bm25"), show_progress=False)
                save_npy(tmp / "tokens.npy", tokens.astype(np.int32))
                save_npy(tmp / "starts.npy", starts.astype(np.int64))
                save_npy(tmp / "ends.npy", ends.astype(np.int64))
                write_manifest(tmp, INDEX_KIND, corpus=spec.describe(), n_chunks=int(len(starts)),
                               n_tokens=int(len(tokens)), **settings)
        manifest = read_manifest(folder, INDEX_KIND)
        n = manifest["n_chunks"]
        retriever = bm25s.BM25.load(str(folder / "bm25"), show_progress=False)
        return cls(retriever, load_npy(folder / "tokens.npy", shape=(manifest["n_tokens"],), dtype=np.int32),
                   load_npy(folder / "starts.npy", shape=(n,), dtype=np.int64),
                   load_npy(folder / "ends.npy", shape=(n,), dtype=np.int64), folder)

    def retrieve(self, queries: list[str]) -> list[np.ndarray | None]:
        """The best chunk's token ids for each query text, or None where no chunk shares a term with it."""
        bm25s = _bm25s()

        if not queries:
            return []
        q = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
        out: list[np.ndarray | None] = [None] * len(queries)
        asked = [i for i, terms in enumerate(q) if terms]
        if not asked or len(self) == 0:
            return out
        docs, scores = self.retriever.retrieve([q[i] for i in asked], k=1, show_progress=False)
        for i, d, s in zip(asked, docs[:, 0], scores[:, 0], strict=True):
            if s > 0:
                out[i] = self.chunk(int(d))
        return out


@dataclass
class _Block:
    """One forward pass: `inputs` (retrieved doc + separator + context); scores targets at `rows`."""

    request: int
    inputs: list[int]
    rows: list[int]  # input positions whose logits predict the targets
    targets: list[int]


@register_model("incontext_rag")
class InContextRAG(HFLM):
    """A base HF causal LM that reads a BM25-retrieved corpus chunk before its context (In-Context RALM)."""

    def __init__(
        self,
        corpus: str | None = None,
        stride: int = 4,
        query_tokens: int = 32,
        max_doc_tokens: int = 256,
        chunk_tokens: int | None = None,
        separator: str = "\n\n",
        cache_dir: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.stride = _as_int(stride, "incontext_rag: stride")
        self.query_tokens = _as_int(query_tokens, "incontext_rag: query_tokens")
        self.max_doc_tokens = _as_int(max_doc_tokens, "incontext_rag: max_doc_tokens")
        for name, value in (("stride", self.stride), ("query_tokens", self.query_tokens),
                            ("max_doc_tokens", self.max_doc_tokens)):
            if value < 1:
                raise ValueError(f"incontext_rag: {name} must be >= 1, got {value}")
        if self.stride + 1 >= self.max_length:
            raise ValueError(f"incontext_rag: stride {self.stride} leaves no room in max_length {self.max_length}")
        self.separator_ids = self.tokenizer.encode(separator, add_special_tokens=False) if separator else []
        # the retrieved document may use what the stride and separator leave of the context window
        self.doc_budget = max(0, min(self.max_doc_tokens, self.max_length - self.stride - len(self.separator_ids) - 1))
        if self.doc_budget < self.max_doc_tokens:
            logging.getLogger(__name__).warning(
                f"incontext_rag: max_doc_tokens {self.max_doc_tokens} does not fit in max_length {self.max_length} "
                f"(stride {self.stride}, separator {len(self.separator_ids)} tokens): using {self.doc_budget}")
        chunk = _as_int(chunk_tokens, "incontext_rag: chunk_tokens") if chunk_tokens else self.max_doc_tokens
        self.corpus = None if corpus in (None, "") else str(corpus)
        self.index = ChunkIndex.build_or_load(self.corpus, self.tokenizer, chunk, cache_dir) if self.corpus else None

    def get_model_info(self) -> dict:
        """HFLM's info plus the retrieval settings (lm-eval writes them into the results JSON's config)."""
        info = super().get_model_info()
        info.update(rag_corpus=self.corpus, rag_stride=self.stride, rag_query_tokens=self.query_tokens,
                    rag_max_doc_tokens=self.doc_budget, rag_chunks=len(self.index) if self.index else 0,
                    rag_index=str(self.index.folder) if self.index else None)
        return info

    # ---- retrieval ----

    def prefixes(self, histories: list[list[int]]) -> list[list[int]]:
        """Retrieved doc + separator to place before each token history ([] where nothing is retrieved)."""
        if self.index is None or self.doc_budget == 0:
            return [[] for _ in histories]
        queries = [self.tok_decode(h[-self.query_tokens :]) if h else "" for h in histories]
        docs = self.index.retrieve(queries)
        return [[] if d is None else d[: self.doc_budget].tolist() + self.separator_ids for d in docs]

    def plan(self, request: int, context: list[int], continuation: list[int]) -> list[_Block]:
        """Blocks scoring `continuation` after `context`, one retrieval per `stride` tokens."""
        full = list(context) + list(continuation)
        first = len(context)
        points = list(range(first, len(full), self.stride))
        prefixes = self.prefixes([full[:p] for p in points])
        blocks = []
        for p, prefix in zip(points, prefixes, strict=True):
            e = min(p + self.stride, len(full))
            s = max(0, e - 1 - (self.max_length - len(prefix)))
            inputs = prefix + full[s : e - 1]
            rows = [len(prefix) + t - 1 - s for t in range(p, e)]
            blocks.append(_Block(request, inputs, rows, full[p:e]))
        return blocks

    # ---- lm-eval entry points ----

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """(sum of log-probs, all greedy) of each continuation; covers loglikelihood and rolling windows."""
        blocks = [b for i, (_, ctx, cont) in enumerate(requests) for b in self.plan(i, ctx, cont)]
        logp = [0.0] * len(requests)
        greedy = [True] * len(requests)
        bs = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 8)
        order = sorted(range(len(blocks)), key=lambda j: -len(blocks[j].inputs))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for i in tqdm(range(0, len(order), bs), desc="incontext_rag", disable=disable_tqdm or self.rank != 0):
            batch = [blocks[j] for j in order[i : i + bs]]
            length = max(len(b.inputs) for b in batch)
            inps = torch.full((len(batch), length), pad, dtype=torch.long)
            for r, b in enumerate(batch):
                inps[r, : len(b.inputs)] = torch.tensor(b.inputs)
            logits = self._model_call(inps.to(self.device))
            for r, b in enumerate(batch):  # normalised only at the scored rows, not all (B, T, V)
                rows = logits[r, b.rows]
                tgt = torch.tensor(b.targets, device=rows.device)
                logp[b.request] += float(target_logprobs(rows, tgt, rows.shape[-1]).sum())
                greedy[b.request] &= bool((rows.argmax(-1) == tgt).all())
        out = list(zip(logp, greedy, strict=True))
        for (key, _, _), ans in zip(requests, out, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, ans)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) generation that retrieves again every `stride` new tokens."""
        results = []
        for req in tqdm(requests, desc="incontext_rag generate", disable=disable_tqdm or self.rank != 0):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            if not kwargs.get("do_sample") or kwargs.get("temperature", 0.0) == 0.0:
                kwargs = {k: v for k, v in kwargs.items() if k not in ("temperature", "top_p", "top_k")}
                kwargs["do_sample"] = False
            history = self.tok_encode(context)
            made: list[int] = []
            text = ""
            while len(made) < max_new:
                n = min(self.stride, max_new - len(made))
                (prefix,) = self.prefixes([history + made])
                keep = max(1, self.max_length - len(prefix) - n)
                inputs = torch.tensor([prefix + (history + made)[-keep:]], device=self.device)
                with torch.no_grad():
                    out = self.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                              max_new_tokens=n, pad_token_id=self.tokenizer.pad_token_id,
                                              **kwargs)
                new = out[0, inputs.shape[1] :].tolist()
                eos = self.eot_token_id in new
                if eos:
                    new = new[: new.index(self.eot_token_id)]
                made += new
                text = self.tok_decode(made)
                cut = [text.index(s) for s in until if s and s in text]
                if cut:
                    text = text[: min(cut)]
                    break
                if eos or not new:
                    break
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            results.append(text)
        return results


register_method(Method(name="rag", label="+In-Context RAG", model="incontext_rag",
                       model_class="baselines.incontext_rag:InContextRAG", variant_args=("corpus", "stride"),
                       aliases=("incontext_rag", "in-context rag", "in_context_rag", "+in-context rag"),
                       bench="memdec.bench.methods:rag_specs"))
