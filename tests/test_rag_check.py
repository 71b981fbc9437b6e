"""experiments/offline_reproduction/rag_check.py: the RAG copy check at the retrieval level (issue 18, goal 3)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("rag_check", ROOT / "experiments" / "offline_reproduction" / "rag_check.py")
rag_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rag_check)

pytest.importorskip("bm25s")


def _jsonl(path: Path, docs: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def test_contains_is_a_contiguous_run():
    hay = np.array([1, 2, 3, 2, 3, 4])
    assert rag_check._contains(hay, np.array([2, 3, 4])) and not rag_check._contains(hay, np.array([2, 4]))
    assert rag_check._contains(hay, np.array([], dtype=int)) and not rag_check._contains(hay[:2], hay)


def test_corpus_holding_the_test_document_is_found_and_one_without_is_not(tiny, texts, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["base"])
    test = texts["domain"][0]
    others = [t for t in texts["general"] if t != test][:20]
    honest = _jsonl(tmp_path / "honest.jsonl", others)
    copy = _jsonl(tmp_path / "copy.jsonl", [*others, test])
    a, b = (rag_check.retrieval_check(tok, [test], c, stride=8, query_tokens=8, chunk_tokens=64,
                                      cache_dir=str(tmp_path / "cache")) for c in (honest, copy))
    n = len(range(8, len(tok(test)["input_ids"]) - 1, 8))
    assert a["points"] == b["points"] == n > 3
    # the chunk that holds the query often holds what follows; other documents almost never do
    assert b["holds_next_block"] > a["holds_next_block"] + 0.25 and b["holds_next_token"] >= b["holds_next_block"]
    assert rag_check.main(["--tokenizer", tiny["base"], "--test", str(tmp_path / "none.jsonl"), "--corpus", copy]) == 2
