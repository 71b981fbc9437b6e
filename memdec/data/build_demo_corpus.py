"""Rebuild the bundled demo corpus from the offline corpora (../shared/corpora); deterministic.

    python memdec/data/build_demo_corpus.py /path/to/shared/corpora

Keeps only sources with a permissive licence (see CREDITS.md): a general part (WordNet, the Jargon
File, the Python documentation) and a domain part (ICD-10-CM, public domain), with evenly spaced
documents so that every part of each source is represented.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
# (output file, corpus, split, {source: byte budget})
PARTS = [
    ("general.jsonl", "general", "train", {"wordnet": 220_000, "jargon": 140_000, "python-doc": 200_000}),
    ("domain_train.jsonl", "bio", "train", {"icd10cm": 80_000}),
    ("domain_test.jsonl", "bio", "test", {"icd10cm": 36_000}),
]


def evenly(docs: list[dict], budget: int) -> list[dict]:
    """Evenly spaced documents (in source order) whose texts add up to at most `budget` bytes."""
    total = sum(len(d["text"].encode()) for d in docs)
    step = max(1, round(total / budget))
    picked, used = [], 0
    for d in docs[::step]:
        size = len(d["text"].encode())
        if used + size > budget:
            continue
        picked.append(d)
        used += size
    return picked


def main(root: str) -> None:
    for name, corpus, split, budgets in PARTS:
        with gzip.open(Path(root) / corpus / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        out = []
        for source, budget in budgets.items():
            out += evenly([r for r in rows if r["source"] == source], budget)
        with open(HERE / name, "w", encoding="utf-8") as f:
            for r in out:
                f.write(json.dumps({"text": r["text"], "source": r["source"]}, ensure_ascii=False) + "\n")
        print(name, len(out), "docs", sum(len(r["text"].encode()) for r in out), "bytes")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/corpora")
