"""Shared fixtures: a tiny tokenizer and tiny models built locally (never downloaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

DATA = Path(__file__).parent / "data"


def read_jsonl(name: str) -> list[str]:
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@pytest.fixture(scope="session")
def texts() -> dict[str, list[str]]:
    """{'general': [...], 'domain': [...]}: the shipped fixture documents."""
    return {"general": read_jsonl("general.jsonl"), "domain": read_jsonl("domain.jsonl")}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, texts):
    """Paths of tiny local models sharing one tokenizer.

    - `tok`: the tokenizer alone; `base`: GPT-2 (2 layers, 64 wide); `memory`: a smaller GPT-2
      (another seed); `base_llama`: a Llama whose embedding is padded 8 rows past the tokenizer;
    - `other_tok_model`: a GPT-2 with a different tokenizer (for mismatch errors).
    """
    from memdec.tiny import save_model, tiny_model, train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tok = train_tokenizer(texts["general"] + texts["domain"], vocab_size=400)
    tok.save_pretrained(root / "tok")
    paths = {"root": root, "tok": str(root / "tok")}
    paths["base"] = save_model(tiny_model(tok, "gpt2", n_layer=2, hidden=64, seed=1), tok, root / "base")
    paths["memory"] = save_model(tiny_model(tok, "gpt2", n_layer=1, hidden=32, n_head=2, seed=2), tok, root / "memory")
    paths["base_llama"] = save_model(tiny_model(tok, "llama", n_layer=2, hidden=64, vocab_pad=8, seed=3), tok,
                                     root / "base_llama")
    other = train_tokenizer(texts["domain"], vocab_size=300, name="other-bpe")
    paths["other_tok_model"] = save_model(tiny_model(other, "gpt2", seed=4), other, root / "other")
    return paths


@pytest.fixture(scope="session")
def gpt2_style(tmp_path_factory, texts):
    """Paths of tiny models with a GPT-2-style tokenizer (memdec.tiny.train_tokenizer(gpt2_style=True):
    <|endoftext|> = EOS = BOS = UNK is the last id, no pad token, model_max_length 1024).

    - `tok`: the tokenizer alone; `base`: GPT-2 with 1024 positions (2 layers, 64 wide);
      `memory`: GPT-2 with 256 positions (1 layer, 32 wide).
    """
    from memdec.tiny import save_model, tiny_model, train_tokenizer

    root = tmp_path_factory.mktemp("gpt2_style")
    tok = train_tokenizer(texts["general"] + texts["domain"], vocab_size=400, name="gpt2-style-bpe", gpt2_style=True)
    tok.save_pretrained(root / "tok")
    paths = {"root": root, "tok": str(root / "tok")}
    paths["base"] = save_model(tiny_model(tok, "gpt2", n_layer=2, hidden=64, max_positions=1024, seed=5), tok,
                               root / "base")
    paths["memory"] = save_model(tiny_model(tok, "gpt2", n_layer=1, hidden=32, n_head=2, max_positions=256, seed=6),
                                 tok, root / "memory")
    return paths


# ---- datastore fixtures (memdec/pipeline/datastore.py; used by test_datastore, test_search, test_targets) ----

DATASTORE_ARGS = {"window": 64, "stride": 48, "batch_size": 3, "shard_rows": 2500, "device": "cpu", "progress": False}


@pytest.fixture(scope="session")
def tiny_datastore(tiny, texts, tmp_path_factory) -> str:
    """A datastore of the tiny GPT-2 `base` over the domain documents (window 64, stride 48, ~8k rows, 4 shards)."""
    from memdec.pipeline.datastore import build_datastore

    out = tmp_path_factory.mktemp("ds") / "domain"
    return str(build_datastore(tiny["base"], texts["domain"], out, **DATASTORE_ARGS))
