"""experiments/offline_reproduction/rag_check.copy_ability: can a base copy a span it is shown (issue 18, goal 3)?"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("rag_check", ROOT / "experiments" / "offline_reproduction" / "rag_check.py")
rag_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rag_check)


def test_spans_are_evenly_spaced_and_disjoint():
    tokens = np.arange(100)
    spans = rag_check.copy_spans(tokens, 10, 4)
    assert spans.shape == (4, 10) and spans[0, 0] == 0 and spans[-1, -1] == 99
    assert all(spans[i + 1, 0] >= spans[i, -1] + 1 for i in range(3))
    assert rag_check.copy_spans(tokens, 30, 9).shape == (3, 30)  # no more spans than fit
    for bad, match in (((tokens[:5], 10, 2), "fewer than one span of 10"), ((tokens, 1, 2), "at least 2")):
        with pytest.raises(ValueError, match=match) as e:
            rag_check.copy_spans(*bad)
        assert "\n" not in str(e.value)


def test_copy_ability_matches_float64_brute_force(tiny, texts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["base"])
    tokens = np.asarray(tok(" ".join(texts["domain"][:3]))["input_ids"], dtype=np.int64)
    span, n = 16, 5
    got = rag_check.copy_ability(tiny["base"], tokens, span=span, n_spans=n, batch_size=2, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float64).eval()
    first, second = [], []
    for s in rag_check.copy_spans(tokens, span, n):
        x = torch.as_tensor(np.concatenate([s, s]))[None]
        with torch.no_grad():
            p = torch.softmax(model(input_ids=x).logits[0], -1)
        for j in range(1, span):  # token j of each copy, predicted from everything before it
            first.append(-torch.log(p[j - 1, x[0, j]]).item())
            second.append(-torch.log(p[span + j - 1, x[0, span + j]]).item())
    assert got["n_spans"] == n and got["span"] == span
    assert got["nll_first"] == pytest.approx(np.mean(first), rel=1e-5)
    assert got["nll_second"] == pytest.approx(np.mean(second), rel=1e-5)
    assert got["second_over_first"] == pytest.approx(np.mean(second) / np.mean(first), rel=1e-5)


def test_two_copies_longer_than_the_context_is_one_line_before_scoring(tiny, texts, monkeypatch):
    import memdec.core.models as models

    def no_model(*_a, **_k):
        raise AssertionError("no model should load")

    monkeypatch.setattr(models, "load_causal_lm", no_model)
    tokens = np.arange(2000) % 50
    with pytest.raises(ValueError) as e:
        rag_check.copy_ability(tiny["memory"], tokens, span=200, n_spans=2, device="cpu")  # 400 > 256 positions
    assert "\n" not in str(e.value) and tiny["memory"] in str(e.value) and "256" in str(e.value)
