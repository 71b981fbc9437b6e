"""Corpus → token windows: the one windowing function every stage, baseline and metric uses.

A corpus is a list of documents, tokenized and concatenated into one stream of token ids (an EOS
token between documents when the tokenizer has one). Windows over that stream follow the usual
sliding-window perplexity rule: window `w`, stride `s`; each window scores only the tokens that no
earlier window scored, so every token from position 1 on is scored exactly once. A window never
starts after the last token scored before it (with stride = window, consecutive windows overlap by
one token, as lm-eval's rolling windows do), so each scored token has at least one token of context.

Position `p` of the stream is predicted from positions < p; datastore row `p - 1` holds the key
computed at position `p - 1` and the value `tokens[p]`.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json", ".parquet")


@dataclass
class CorpusSpec:
    """Where a corpus lives: local files (`path`: a file, a folder or a glob) or a hub dataset."""

    path: str | None = None
    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    text_column: str = "text"
    max_docs: int | None = None

    def __post_init__(self) -> None:
        if self.max_docs is not None and (isinstance(self.max_docs, bool) or int(self.max_docs) < 1):
            raise ValueError(f"max_docs (--max-docs) must be >= 1, got {self.max_docs}")

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        cfg = f"/{self.config}" if self.config else ""
        return f"hf:{self.dataset}{cfg}[{self.split}]"

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_arg(cls, value: str | dict | CorpusSpec, **kw) -> CorpusSpec:
        """A spec from a CLI/config value: a dict, a local path, or `hf:NAME[:CONFIG]` for a hub dataset."""
        if isinstance(value, CorpusSpec):
            return value
        if isinstance(value, dict):
            return cls(**{**value, **{k: v for k, v in kw.items() if v is not None}})
        kw = {k: v for k, v in kw.items() if v is not None}
        if str(value).startswith("hf:"):
            dataset, _, config = str(value)[3:].partition(":")
            return cls(dataset=dataset, **{"config": config or None, **kw})
        return cls(path=str(value), **kw)


def _files(path: str) -> list[str]:
    if os.path.isdir(path):
        found = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(path)
            for f in names
            if f.endswith(TEXT_SUFFIXES)
        )
    elif any(ch in path for ch in "*?["):
        found = sorted(glob.glob(path))
    elif os.path.exists(path):
        found = [path]
    else:
        raise FileNotFoundError(f"corpus {path}: no such file or folder")
    if not found:
        raise FileNotFoundError(f"corpus {path}: no {'/'.join(TEXT_SUFFIXES)} files found")
    return found


RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


def iter_records(path: str) -> Iterator[tuple[str, dict]]:
    """(where, record) for each record of a .jsonl / .jsonl.gz / .json / .parquet file, in order.

    `where` is "line N" (JSONL, blank lines skipped) or "record N". Bad JSON or a record that is not an
    object is a one-line ValueError naming the file and the place.
    """
    if path.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {i}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}, line {i}: not a JSON object")
                yield f"line {i}", row
        return
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    elif path.endswith(".parquet"):
        import pandas as pd

        rows = pd.read_parquet(path).to_dict("records")
    else:
        raise ValueError(f"{path}: unsupported file type (use {', '.join(RECORD_SUFFIXES)})")
    for i, row in enumerate(rows if isinstance(rows, list) else [rows], 1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}, record {i}: not a JSON object")
        yield f"record {i}", row


def _not_utf8(path: str) -> ValueError:
    """A one-line error naming the first byte of `path` (decompressed for .gz) that is not UTF-8."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = "of its decompressed text " if path.endswith(".gz") else ""
        return ValueError(f"corpus {path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start} "
                          f"{where}cannot be decoded)")
    return ValueError(f"corpus {path}: not UTF-8 text")


def _read_file(path: str, column: str) -> Iterable[str]:
    try:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                yield f.read()
            return
        for where, row in iter_records(path):
            if column not in row:
                raise ValueError(f"{path}, {where}: no field {column!r} (has {sorted(row)})")
            yield row[column]
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except ValueError as e:
        raise ValueError(f"corpus {e}") from None


def load_texts(spec: CorpusSpec) -> list[str]:
    """The corpus's non-empty documents, in order. Raises a one-line error for a missing/empty corpus."""
    if spec.path is not None:
        texts = [t for f in _files(spec.path) for t in _read_file(f, spec.text_column)]
    elif spec.dataset is not None:
        import datasets

        ds = datasets.load_dataset(spec.dataset, spec.config, split=spec.split)
        if spec.text_column not in ds.column_names:
            raise ValueError(f"corpus {spec.describe()}: no column {spec.text_column!r} ({ds.column_names})")
        texts = ds[spec.text_column]
    else:
        raise ValueError("corpus: give a local path or a hub dataset name")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if spec.max_docs is not None:
        texts = texts[: spec.max_docs]
    if not texts:
        raise ValueError(f"corpus {spec.describe()}: no text found")
    return texts


def write_texts(path: str | os.PathLike, texts: Iterable[str]) -> None:
    """Write documents as JSON lines ({"text": ...} each, what `load_texts` reads), atomically (a temporary name,
    then a rename); the parent folder is made if missing."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def tokenize(texts: Sequence[str], tokenizer, batch_size: int = 1000, progress: bool = True) -> np.ndarray:
    """Token ids of all documents concatenated (int32), EOS between documents when the tokenizer has one."""
    from tqdm.auto import tqdm

    eos = tokenizer.eos_token_id
    parts: list[np.ndarray] = []
    bar = tqdm(total=len(texts), desc="tokenize", unit="doc", disable=not progress or len(texts) < 2 * batch_size)
    for i in range(0, len(texts), batch_size):
        # verbose=False: no "longer than the model's maximum sequence length" warning; windows cut the stream
        batch = tokenizer(list(texts[i : i + batch_size]), add_special_tokens=False, verbose=False)["input_ids"]
        for ids in batch:
            parts.append(np.asarray(ids, dtype=np.int32))
            if eos is not None:
                parts.append(np.asarray([eos], dtype=np.int32))
        bar.update(len(batch))
    bar.close()
    if eos is not None and parts:
        parts.pop()  # no EOS after the last document
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def corpus_tokens(corpus: CorpusSpec | Sequence[str] | str | dict, tokenizer, progress: bool = True
                  ) -> tuple[np.ndarray, dict, str]:
    """(token stream, corpus description for a manifest, name for messages) of a corpus.

    `corpus` is a CorpusSpec, a local path / `hf:NAME[:CONFIG]`, a spec dict or a list of documents."""
    if isinstance(corpus, (str, os.PathLike, dict)):
        corpus = CorpusSpec.from_arg(str(corpus) if isinstance(corpus, os.PathLike) else corpus)
    if isinstance(corpus, CorpusSpec):
        texts, desc, what = load_texts(corpus), corpus.to_dict(), f"corpus {corpus.describe()}"
    else:
        texts = [t for t in corpus if isinstance(t, str) and t.strip()]
        if not texts:
            raise ValueError("corpus: no text found (an empty list of documents)")
        desc, what = {"texts": len(texts)}, f"corpus of {len(texts)} documents"
    return tokenize(texts, tokenizer, progress=progress), desc, what


#: the longest window any stage picks by itself (the paper's setting)
DEFAULT_WINDOW = 1024


def default_window(*limits: int | None) -> int:
    """The window every stage uses when none is given: min(DEFAULT_WINDOW, each known limit).

    The limits are the context lengths of the models involved (and, for training on a datastore,
    the datastore's window); None (unknown) is skipped.
    """
    return min([DEFAULT_WINDOW, *(int(x) for x in limits if x)])


def default_stride(window: int) -> int:
    """The stride of the scoring stages (tune-lambda, perplexity) when none is given: half the window."""
    return max(1, int(window) // 2)


@dataclass(frozen=True)
class Window:
    """Input tokens[start:end]; the scored targets are positions [score_start, end)."""

    start: int
    end: int
    score_start: int

    @property
    def n_scored(self) -> int:
        return self.end - self.score_start


def sliding_windows(n_tokens: int, window: int, stride: int | None = None) -> list[Window]:
    """Windows of at most `window` tokens, starting every `stride` tokens, covering targets 1..n-1 once."""
    stride = window if stride is None else stride
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    out: list[Window] = []
    prev_end = 1  # position 0 has no context and is never scored
    start = 0
    while prev_end < n_tokens:
        start = min(start, prev_end - 1)  # the first new target needs its predecessor in the window
        end = min(start + window, n_tokens)
        out.append(Window(start, end, prev_end))
        prev_end = end
        start += stride
    return out


def check_min_tokens(n_tokens: int, window: int, what: str) -> None:
    """Raise a one-line error if a corpus cannot fill one window (`window` + 1 tokens)."""
    if n_tokens < window + 1:
        raise ValueError(f"{what}: {n_tokens} tokens, fewer than one window of {window} (+1) tokens")


def window_batch(
    tokens: np.ndarray | torch.Tensor, windows: Sequence[Window], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, score_mask) for a batch of windows.

    score_mask[b, j] is True when input position j of window b is a scored target; its prediction
    comes from the logits at j - 1.
    """
    tokens = torch.as_tensor(tokens)
    length = max(w.end - w.start for w in windows)
    ids = torch.full((len(windows), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(windows), length), dtype=torch.long)
    score = torch.zeros((len(windows), length), dtype=torch.bool)
    for b, w in enumerate(windows):
        n = w.end - w.start
        ids[b, :n] = tokens[w.start : w.end]
        attn[b, :n] = 1
        score[b, w.score_start - w.start : n] = True
    return ids, attn, score
