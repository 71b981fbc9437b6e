"""memdec's lm-eval tasks: local/hub data, sliding-window perplexity and kNN-Prompt zero-shot scoring.

- `load_task_data`: every task's `custom_dataset`. Task T reads `DIR/T.jsonl` (or `.json`, `.parquet`)
  when a data directory is given (`--metadata '{"data_dir": DIR}'` or the `MEMDEC_DATA_DIR` environment
  variable), otherwise its confirmed hub dataset; a task without one needs the local file.
- `SlidingPerplexityTask`: token-level perplexity over the documents concatenated into one token stream
  (memdec.pipeline.data.tokenize: EOS between documents), windows of `ppl_window` tokens every `ppl_stride` tokens
  (memdec.pipeline.data.sliding_windows), each window scoring only its new tokens; plus word perplexity and
  bits per byte. Its requests are of the type `memdec_window_loglikelihood`, which this module adds to
  lm-eval's `TemplateLM` (so `--model hf`, `--model memdec` and every HFLM subclass answer it): the
  model tokenizes with its own tokenizer and passes each window to `_loglikelihood_tokens` as exact
  token ids (context = the window's old tokens, continuation = its new ones). With several processes
  every process builds the same stream and windows, scores its share and gathers the rest, so the
  metrics equal the one-process ones.
- `DCPMITask`: kNN-Prompt's zero-shot classification (Shi et al., 2022): a prompt per input, fuzzy
  verbalizers (several label words per label), plain accuracy (label probabilities = sum of its words'
  probabilities) and domain-conditional PMI accuracy (kNN-Prompt's score.py: a label's score is the sum
  over its words of log p(word | input) - log p(word | domain premise); the premise is its own request).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from lm_eval.api.instance import Instance
from lm_eval.api.metrics import bits_per_byte, mean, weighted_perplexity
from lm_eval.api.model import CacheHook, TemplateLM
from lm_eval.api.task import ConfigurableTask

from memdec.pipeline.data import iter_records

eval_logger = logging.getLogger(__name__)

DATA_DIR_ENV = "MEMDEC_DATA_DIR"
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
REQUEST_TYPE = "memdec_window_loglikelihood"


# ---------------------------------------------------------------- data


def _local_file(task: str, data_dir: str) -> str:
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{task}: data dir {data_dir}: no such folder")
    for suffix in DATA_SUFFIXES:
        path = os.path.join(data_dir, task + suffix)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{task}: data dir {data_dir} has no {' or '.join(task + x for x in DATA_SUFFIXES)}")


def _read_records(task: str, path: str) -> list[dict]:
    try:
        return [row for _, row in iter_records(path)]
    except ValueError as e:
        raise ValueError(f"{task}: {e}") from None


def check_records(task: str, source: str, rows: Sequence[dict], fields: Sequence[str],
                  label_field: str | None = None, n_labels: int | None = None) -> None:
    """Raise a one-line error naming task, source and field for a missing field or an unknown label."""
    if not rows:
        raise ValueError(f"{task}: {source}: no records")
    for i, row in enumerate(rows, 1):
        for field in fields:
            if field not in row or row[field] is None:
                raise ValueError(f"{task}: {source}, record {i}: no field {field!r}")
        if label_field is not None and n_labels is not None:
            label = row[label_field]
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < n_labels:
                raise ValueError(f"{task}: {source}, record {i}: field {label_field!r} has unknown label "
                                 f"{label!r} (expected an integer 0..{n_labels - 1})")


def load_task_data(
    memdec_task: str,
    fields: Sequence[str],
    hub_path: str | None = None,
    hub_name: str | None = None,
    hub_split: str | None = None,
    hub_rename: dict[str, str] | None = None,
    label_column: str | None = None,
    n_labels: int | None = None,
    data_dir: str | None = None,
    **_: Any,
):
    """The task's evaluation documents as a DatasetDict {"test": ...}: local file first, else the hub.

    lm-eval calls this with the task's `dataset_kwargs` and its metadata (which carries `data_dir`
    from `--metadata`, plus the model arguments: those are ignored).
    """
    import datasets

    data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
    if data_dir:
        path = _local_file(memdec_task, os.path.expanduser(str(data_dir)))
        rows = _read_records(memdec_task, path)
        check_records(memdec_task, path, rows, fields, label_column, n_labels)
        ds = datasets.Dataset.from_list([{k: row[k] for k in fields} for row in rows])
    elif hub_path is None:
        raise ValueError(
            f"{memdec_task}: no confirmed hub dataset for this task; give local data: "
            f"--metadata '{{\"data_dir\": DIR}}' or {DATA_DIR_ENV}=DIR with DIR/{memdec_task}.jsonl "
            f"(fields: {', '.join(fields)})")
    else:
        ds = datasets.load_dataset(hub_path, hub_name, split=hub_split)
        if hub_rename:
            ds = ds.rename_columns(hub_rename)
        source = f"hf:{hub_path}" + (f"/{hub_name}" if hub_name else "") + f"[{hub_split}]"
        missing = [f for f in fields if f not in ds.column_names]
        if missing:
            raise ValueError(f"{memdec_task}: {source}: no field {missing[0]!r} (has {ds.column_names})")
        ds = ds.select_columns(list(fields))
        if label_column is not None:
            check_records(memdec_task, source, [{label_column: v} for v in ds[label_column]], [label_column],
                          label_column, n_labels)
    return datasets.DatasetDict({"test": ds})


# ---------------------------------------------------------------- sliding-window perplexity


def _doc_ends(texts: Sequence[str], tokenizer) -> np.ndarray:
    """Exclusive end position of each document's tokens in memdec.pipeline.data.tokenize's stream."""
    from memdec.pipeline.data import tokenize

    lengths = np.array([len(tokenize([t], tokenizer, progress=False)) for t in texts], dtype=np.int64)
    sep = 1 if tokenizer.eos_token_id is not None else 0
    return np.cumsum(lengths + sep) - sep


def _score_windows(lm: TemplateLM, reqs: list, task: str, disable_tqdm: bool) -> list[float]:
    """Each window request's log-likelihood from `lm._loglikelihood_tokens`.

    With several processes, process r scores windows r, r + world_size, ... (padded with a repeat to
    the same number on every process, as lm-eval pads its own requests: batch-size detection is a
    collective) and `lm.all_gather` brings every process all the scores.
    """
    world, rank = int(getattr(lm, "world_size", 1) or 1), int(getattr(lm, "rank", 0) or 0)
    if world == 1:
        return [float(lp) for lp, _ in lm._loglikelihood_tokens(reqs, disable_tqdm=disable_tqdm)]
    import torch

    device = getattr(lm, "device", None) or "cpu"
    counts = lm.all_gather(torch.tensor([len(reqs)], dtype=torch.int64, device=device)).cpu().tolist()
    if len(set(counts)) != 1:
        raise ValueError(f"{task}: the processes built different windows ({counts} windows); every process "
                         f"must see every document")
    mine = list(range(rank, len(reqs), world))
    share = -(-len(reqs) // world)
    padded = mine + [mine[-1] if mine else 0] * (share - len(mine))
    scores = lm._loglikelihood_tokens([reqs[i] for i in padded], disable_tqdm=disable_tqdm)
    local = torch.tensor([float(lp) for lp, _ in scores], dtype=torch.float64, device=device)
    gathered = lm.all_gather(local).cpu().view(world, share)
    return [float(gathered[i % world, i // world]) for i in range(len(reqs))]


def window_loglikelihood(lm: TemplateLM, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, int]]:
    """Answer `memdec_window_loglikelihood` requests: args (text, window, stride), one per document.

    The documents of one task (in doc_id order) form one token stream (memdec.pipeline.data.tokenize with the
    model's tokenizer); each window of memdec.pipeline.data.sliding_windows is scored through the model's
    `_loglikelihood_tokens` with token-exact context and continuation. A window's log-likelihood and
    token count go to the document holding its last token, so per-document entries sum to the exact
    stream totals (only those corpus-level sums are meaningful). Returns (log-likelihood, n_tokens).

    With several processes (`lm.world_size` > 1) every process holds every document's request
    (SlidingPerplexityTask builds them all), scores every world_size-th window and gets the others'
    scores by `lm.all_gather` (`_score_windows`), so each answer equals the one-process answer.
    """
    from memdec.pipeline.data import sliding_windows, tokenize

    def key(req: Instance) -> tuple:
        return req.task_name, int(req.args[1]), int(req.args[2])

    streams: dict[tuple, dict[int, str]] = defaultdict(dict)  # (task, window, stride) -> doc_id -> text
    for req in requests:
        streams[key(req)][req.doc_id] = req.args[0]
    answers: dict[tuple, tuple[float, int]] = {}  # (task, window, stride, doc_id) -> (log-likelihood, n)
    max_len = getattr(lm, "max_length", None)
    for (task, window, stride), docs in streams.items():
        if max_len is not None and window - 1 > max_len:
            raise ValueError(f"{task}: window {window} needs {window - 1} input tokens, more than the model's "
                             f"max_length {max_len}; set --metadata '{{\"ppl_window\": N, \"ppl_stride\": M}}'")
        doc_ids = sorted(docs)
        texts = [docs[d] for d in doc_ids]
        tokens = tokenize(texts, lm.tokenizer, progress=False)
        if len(tokens) < 2:
            raise ValueError(f"{task}: the documents have {len(tokens)} token(s); perplexity needs at least 2")
        ends = _doc_ends(texts, lm.tokenizer)
        if int(ends[-1]) != len(tokens):
            raise ValueError(f"{task}: document token counts do not add up to the stream length")
        windows = sliding_windows(len(tokens), window, stride)
        ids = tokens.tolist()
        reqs = [((f"{task}:window:{w.start}", ""), ids[w.start:w.score_start], ids[w.score_start:w.end])
                for w in windows]
        hook, lm.cache_hook = getattr(lm, "cache_hook", None), CacheHook(None)  # window scores are not cached
        try:
            scores = _score_windows(lm, reqs, task, disable_tqdm)
        finally:
            lm.cache_hook = hook
        ll = np.zeros(len(doc_ids))
        n = np.zeros(len(doc_ids), dtype=np.int64)
        for w, logprob in zip(windows, scores, strict=True):
            k = min(int(np.searchsorted(ends, w.end - 1, side="right")), len(doc_ids) - 1)  # holds the last token
            ll[k] += logprob
            n[k] += w.n_scored
        for k, d in enumerate(doc_ids):
            answers[(task, window, stride, d)] = (float(ll[k]), int(n[k]))
    return [answers[(*key(req), req.doc_id)] for req in requests]


if not hasattr(TemplateLM, REQUEST_TYPE):
    setattr(TemplateLM, REQUEST_TYPE, window_loglikelihood)


def _count_words(text: str) -> int:
    return len(re.split(r"\s+", text.strip())) if text.strip() else 0


class SlidingPerplexityTask(ConfigurableTask):
    """Token perplexity (sliding windows), word perplexity and bits per byte of a corpus's "text" field.

    Window and stride come from the task metadata (`ppl_window`, default 1024, the paper's setting;
    `ppl_stride`, default half of `ppl_window`, as memdec.pipeline.data.default_stride), settable with
    `--metadata '{"ppl_window": 2048, "ppl_stride": 1024}'` or just `'{"ppl_window": 256}'`. (Not
    plain `window`/`stride`: lm-eval copies --model_args into the task metadata, and a model argument
    such as incontext_rag's retrieval `stride` would land there.)
    """

    def __init__(self, config: dict | None = None, **kwargs) -> None:
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        super().__init__(config=config, **kwargs)
        from memdec.pipeline.data import default_stride

        meta = self.config.metadata or {}
        try:
            self.window = int(meta.get("ppl_window", 1024))
            self.stride = int(meta["ppl_stride"]) if "ppl_stride" in meta else default_stride(self.window)
        except (TypeError, ValueError):
            raise ValueError(f"{self.config.task}: ppl_window and ppl_stride must be integers, got "
                             f"{meta.get('ppl_window')!r}, {meta.get('ppl_stride')!r}") from None
        if self.window < 2 or not 1 <= self.stride <= self.window:
            raise ValueError(f"{self.config.task}: ppl_window must be >= 2 and ppl_stride in [1, ppl_window]; got "
                             f"{self.window}, {self.stride}")
        self.OUTPUT_TYPE = REQUEST_TYPE  # the request type lm-eval dispatches (and pads across ranks)

    def build_all_requests(self, *, rank: int = 0, world_size: int = 1, **kwargs: Any) -> None:
        """Every process builds every document's request (the one-process token stream and windows);
        `window_loglikelihood` splits the windows across processes and `doc_iterator` the documents'
        results, so the gathered metrics equal the one-process ones. `limit` and `samples` as lm-eval's."""
        super().build_all_requests(rank=0, world_size=1, **kwargs)
        if world_size > 1 and len(self._instances) < world_size:
            raise ValueError(f"{self.config.task}: {len(self._instances)} document(s) for {world_size} processes; "
                             f"run with at most {len(self._instances)} processes")

    def doc_iterator(self, *, rank: int = 0, limit: int | None = None, world_size: int = 1,
                     samples: list[int] | None = None):
        """lm-eval's documents (the first `limit`, or `samples`); with several processes, process `rank`'s
        contiguous block of them (not lm-eval's rank::world_size), so that lm-eval's gather (in rank order)
        lists the results in document order and sums them in the one-process order."""
        docs = list(super().doc_iterator(rank=0, limit=limit, world_size=1, samples=samples))
        n = len(docs)
        return iter(docs[rank * n // world_size : (rank + 1) * n // world_size])

    def download(self, dataset_kwargs: dict[str, Any] | None = None, **kwargs) -> None:
        """As ConfigurableTask, then drop blank documents (as memdec.pipeline.data.load_texts does)."""
        super().download(dataset_kwargs, **kwargs)
        for split in list(self.dataset):
            self.dataset[split] = self.dataset[split].filter(lambda d: bool(d["text"] and d["text"].strip()))
            if len(self.dataset[split]) == 0:
                raise ValueError(f"{self.config.task}: no non-blank document in field 'text'")

    def doc_to_text(self, doc, doc_to_text=None) -> str:
        return ""

    def doc_to_target(self, doc, doc_to_target=None) -> str:
        return doc["text"]

    def fewshot_context(self, doc, num_fewshot, *args, **kwargs) -> str:
        if num_fewshot:
            raise ValueError(f"{self.config.task}: perplexity tasks take no few-shot examples")
        return ""

    def construct_requests(self, doc: dict, ctx: str, **kwargs) -> Instance:
        for key in ("apply_chat_template", "chat_template"):
            kwargs.pop(key, None)
        return Instance(request_type=REQUEST_TYPE, doc=doc, arguments=(doc["text"], self.window, self.stride),
                        idx=0, **kwargs)

    def process_results(self, doc: dict, results) -> dict:
        loglikelihood, n_tokens = results[0]
        text = doc["text"]
        return {
            "token_perplexity": (loglikelihood, n_tokens),
            "word_perplexity": (loglikelihood, _count_words(text)),
            "bits_per_byte": (loglikelihood, len(text.encode("utf-8"))),
        }

    def aggregation(self) -> dict:
        return {"token_perplexity": weighted_perplexity, "word_perplexity": weighted_perplexity,
                "bits_per_byte": bits_per_byte}

    def higher_is_better(self) -> dict:
        return {"token_perplexity": False, "word_perplexity": False, "bits_per_byte": False}


# ---------------------------------------------------------------- kNN-Prompt zero-shot classification


def single_token_words(label_words: Sequence[Sequence[str]], tokenizer) -> list[list[str]]:
    """Each label's words that are one token for `tokenizer` (kNN-Prompt's rule); a label's first word
    (its name) is always kept, scored as a whole continuation if it is longer."""
    def one_token(word: str) -> bool:
        return len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1

    return [[words[0]] + [w for w in words[1:] if one_token(w)] for words in label_words]


@functools.cache
def _label_tokenizer(name: str, revision: str | None, trust_remote_code: bool):
    """The model's tokenizer, loaded once for all the zero-shot tasks of a run."""
    from memdec.core.models import load_tokenizer

    return load_tokenizer(name, "tokenizer", revision, trust_remote_code)


def dcpmi_predictions(cond: Sequence[Sequence[float]], domain: Sequence[Sequence[float]]) -> tuple[int, int]:
    """(plain, DC-PMI) predicted labels from per-label lists of word log-probabilities.

    plain: argmax over labels of log sum_w p(w | input); DC-PMI (kNN-Prompt's score.py): argmax of
    sum_w [log p(w | input) - log p(w | domain premise)]. Ties go to the lower label.
    """
    plain = [float(np.logaddexp.reduce(words)) for words in cond]  # -inf (p = 0) stays -inf
    pmi = [sum(c - d for c, d in zip(cw, dw, strict=True)) for cw, dw in zip(cond, domain, strict=True)]
    return int(np.argmax(plain)), int(np.argmax(pmi))


class DCPMITask(ConfigurableTask):
    """kNN-Prompt zero-shot classification: fuzzy verbalizers, plain and domain-conditional PMI accuracy.

    Task metadata: `prompt` (a Python format string over the document's fields), `domain_premise`, `label_words` (one list of label words per label, each with its leading space;
    the first is the label's name) and `label_field`.
    """

    def __init__(self, config: dict | None = None, **kwargs) -> None:
        meta = (config or {}).get("metadata") or {}
        task = (config or {}).get("task", "task")
        for key in ("prompt", "domain_premise", "label_words", "label_field"):
            if key not in meta:
                raise ValueError(f"{task}: metadata has no {key!r}")
        words = meta["label_words"]
        if not (isinstance(words, list) and len(words) >= 2
                and all(isinstance(w, list) and w and all(isinstance(x, str) and x for x in w) for w in words)):
            raise ValueError(f"{task}: metadata 'label_words' must be a list of >= 2 non-empty lists of words")
        self.template = str(meta["prompt"])
        self.domain_premise = str(meta["domain_premise"])
        self.label_words: list[list[str]] = [list(w) for w in words]
        tok_name = meta.get("tokenizer") or meta.get("pretrained")
        if meta.get("single_token_words", True) and isinstance(tok_name, str):
            tokenizer = _label_tokenizer(tok_name, meta.get("revision"), bool(meta.get("trust_remote_code")))
            self.label_words = single_token_words(self.label_words, tokenizer)
            eval_logger.info("%s: label words kept (single tokens for %s): %s", task, tok_name, self.label_words)
        elif meta.get("single_token_words", True):
            eval_logger.warning("%s: no tokenizer in the metadata (tokenizer= or pretrained=); all label words "
                                "are kept, multi-token ones scored as whole continuations", task)
        self.label_field = str(meta["label_field"])
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        config["dataset_kwargs"] = {**(config.get("dataset_kwargs") or {}),
                                    "label_column": self.label_field, "n_labels": len(self.label_words)}
        super().__init__(config=config, **kwargs)

    def doc_to_text(self, doc, doc_to_text=None) -> str:
        return self.template.format(**doc)

    def doc_to_target(self, doc, doc_to_target=None) -> int:
        return int(doc[self.label_field])

    def fewshot_context(self, doc, num_fewshot, *args, **kwargs) -> str:
        if num_fewshot:
            raise ValueError(f"{self.config.task}: kNN-Prompt scoring is zero-shot (got num_fewshot={num_fewshot})")
        return super().fewshot_context(doc, num_fewshot, *args, **kwargs)

    def construct_requests(self, doc: dict, ctx: str, **kwargs) -> list[Instance]:
        for key in ("apply_chat_template", "chat_template"):
            kwargs.pop(key, None)
        flat = [w for words in self.label_words for w in words]
        args = [(ctx, w) for w in flat] + [(self.domain_premise, w) for w in flat]
        return [Instance(request_type="loglikelihood", doc=doc, arguments=a, idx=i, **kwargs)
                for i, a in enumerate(args)]

    def _split(self, values: Sequence[float]) -> list[list[float]]:
        out, i = [], 0
        for words in self.label_words:
            out.append(list(values[i:i + len(words)]))
            i += len(words)
        return out

    def process_results(self, doc: dict, results) -> dict:
        lls = [r[0] for r in results]
        half = len(lls) // 2
        plain, pmi = dcpmi_predictions(self._split(lls[:half]), self._split(lls[half:]))
        gold = self.doc_to_target(doc)
        return {"acc": float(plain == gold), "acc_dcpmi": float(pmi == gold)}

    def aggregation(self) -> dict:
        return {"acc": mean, "acc_dcpmi": mean}

    def higher_is_better(self) -> dict:
        return {"acc": True, "acc_dcpmi": True}
