"""Shared pieces: mixing, windows, key hook, scoring, formats — against independent computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memdec.core import formats
from memdec.inference.mixing import (
    TokenizerMismatchError,
    align_vocab,
    check_lmbda,
    check_same_tokenizer,
    mix_logprobs,
    tokenizer_fingerprint,
)
from memdec.inference.scoring import perplexity, token_logprobs
from memdec.pipeline.data import CorpusSpec, load_texts, sliding_windows, tokenize, write_texts
from memdec.pipeline.keys import capture_keys, key_layer


def test_mix_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    a = torch.log_softmax(torch.randn(3, 50, generator=g), -1)
    b = torch.log_softmax(torch.randn(3, 50, generator=g), -1)
    for lmbda in (0.0, 0.25, 0.55, 1.0):
        ref = np.log(lmbda * np.exp(b.double().numpy()) + (1 - lmbda) * np.exp(a.double().numpy()))
        got = mix_logprobs(a, b, lmbda).double().numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5)
    assert torch.equal(mix_logprobs(a, b, 0.0), a) and torch.equal(mix_logprobs(a, b, 1.0), b)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "x"])
def test_bad_lmbda(bad):
    with pytest.raises(ValueError, match="lmbda"):
        check_lmbda(bad)


def test_align_vocab_pads_and_cuts():
    x = torch.zeros(2, 5)
    assert align_vocab(x, 3).shape == (2, 3)
    y = align_vocab(x, 7)
    assert y.shape == (2, 7) and torch.isinf(y[:, 5:]).all()


def test_fingerprint(tiny):
    a = AutoTokenizer.from_pretrained(tiny["base"])
    b = AutoTokenizer.from_pretrained(tiny["memory"])
    c = AutoTokenizer.from_pretrained(tiny["other_tok_model"])
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b) != tokenizer_fingerprint(c)
    check_same_tokenizer(a, b)
    with pytest.raises(TokenizerMismatchError, match=r"other. \(300 tokens"):
        check_same_tokenizer(a, c)


@pytest.mark.parametrize("n,window,stride", [(2, 4, 2), (10, 4, 1), (100, 16, 8), (101, 16, 16), (37, 8, 3)])
def test_windows_score_each_target_once(n, window, stride):
    seen = np.zeros(n, dtype=int)
    for w in sliding_windows(n, window, stride):
        assert w.end - w.start <= window and w.start < w.score_start <= w.end
        seen[w.score_start : w.end] += 1
    assert seen[0] == 0 and (seen[1:] == 1).all()


def test_write_texts_round_trips_through_load_texts(tmp_path):
    docs = ["plain", "ünïcode — and \"quotes\"\nover two lines", ""]
    path = tmp_path / "sub" / "docs.jsonl"  # the parent folder is made
    write_texts(path, iter(docs))
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == [{"text": d} for d in docs]
    assert "ünïcode" in path.read_text(encoding="utf-8")  # not \u-escaped
    assert sorted(p.name for p in path.parent.iterdir()) == ["docs.jsonl"]  # no temporary file left
    assert load_texts(CorpusSpec(path=str(path))) == [d for d in docs if d]


def test_load_texts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_texts(CorpusSpec(path=str(tmp_path / "nope.txt")))
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no text"):
        load_texts(CorpusSpec(path=str(tmp_path / "e.jsonl")))
    (tmp_path / "f.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="line 1: no field 'text'"):
        load_texts(CorpusSpec(path=str(tmp_path / "f.jsonl")))
    (tmp_path / "g.jsonl").write_text('"some text"\n')  # a JSON string, not an object
    with pytest.raises(ValueError, match="g.jsonl, line 1: not a JSON object"):
        load_texts(CorpusSpec(path=str(tmp_path / "g.jsonl")))
    (tmp_path / "h.json").write_text('["some text"]')
    with pytest.raises(ValueError, match="h.json, record 1: not a JSON object"):
        load_texts(CorpusSpec(path=str(tmp_path / "h.json")))
    (tmp_path / "i.json").write_text('[{"body": "x"}]')
    with pytest.raises(ValueError, match=r"corpus .*i.json, record 1: no field 'text' \(has \['body'\]\)"):
        load_texts(CorpusSpec(path=str(tmp_path / "i.json")))
    (tmp_path / "j.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="j.jsonl, line 2: not valid JSON"):
        load_texts(CorpusSpec(path=str(tmp_path / "j.jsonl")))


@pytest.mark.parametrize("name,norm", [("base", "transformer.h.1.ln_2"), ("base_llama", "model.layers.1.post_attention_layernorm")])
def test_key_is_pre_mlp_norm_output(tiny, name, norm):
    model = AutoModelForCausalLM.from_pretrained(tiny[name]).eval()
    assert key_layer(model) == norm.rsplit(".", 1)[0] + ".mlp"
    seen = {}
    handle = model.get_submodule(norm).register_forward_hook(lambda m, i, o: seen.setdefault("k", o))
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad(), capture_keys(model) as cap:
        model(ids)
    handle.remove()
    torch.testing.assert_close(cap.pop(), seen["k"])


def test_token_logprobs_match_direct_windows(tiny, texts):
    model = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    tokens = tokenize(texts["domain"][:1], tok, progress=False)[:150]
    got = token_logprobs(model, tokens, window=32, stride=12, batch_size=3)
    # independent: for each target position p, the context is the window that first scores p
    ref = np.zeros(len(tokens) - 1)
    start, prev_end = 0, 1
    while prev_end < len(tokens):
        end = min(start + 32, len(tokens))
        if end > prev_end:
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.as_tensor(tokens[start:end]).long()[None]).logits[0], -1)
            for p in range(prev_end, end):
                ref[p - 1] = lp[p - 1 - start, tokens[p]].item()
            prev_end = end
        start += 12
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
    assert perplexity(got) == pytest.approx(math.exp(-ref.mean()))


def test_formats_roundtrip_and_errors(tmp_path):
    with formats.staged_output(tmp_path / "out") as d:
        formats.save_npy(d / "a.npy", np.arange(6, dtype=np.int32))
        formats.write_manifest(d, "thing", rows=6)
        assert not formats.is_complete(tmp_path / "out", "thing")
    assert formats.is_complete(tmp_path / "out", "thing")
    a = formats.load_npy(tmp_path / "out" / "a.npy", shape=(6,), dtype=np.int32)
    assert a.tolist() == list(range(6))
    with pytest.raises(formats.FormatError, match="shape"):
        formats.load_npy(tmp_path / "out" / "a.npy", shape=(7,))
    raw = (tmp_path / "out" / "a.npy").read_bytes()
    (tmp_path / "out" / "a.npy").write_bytes(raw[:-8])
    with pytest.raises(formats.FormatError, match="truncated"):
        formats.load_npy(tmp_path / "out" / "a.npy")
    with pytest.raises(formats.FormatError, match="expected a 'other'"):
        formats.read_manifest(tmp_path / "out", "other")


def test_cli_corpus_help_names_every_readable_suffix():
    from memdec.cli import CORPUS_FORMS
    from memdec.pipeline.data import TEXT_SUFFIXES

    assert "/".join(TEXT_SUFFIXES) in CORPUS_FORMS
