"""memdec tune-lambda: the curve from cached per-token log-probs equals a direct float64 evaluation."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import memdec.eval.tune as tune
from memdec.cli import main
from memdec.inference import scoring
from memdec.inference.mixing import TokenizerMismatchError
from memdec.pipeline.data import sliding_windows, tokenize

WINDOW, STRIDE = 24, 10


@pytest.fixture(scope="module")
def val_file(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("val") / "val.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for t in texts["domain"][:2]:
            f.write(json.dumps({"text": t[:300]}) + "\n")
    return path


def direct_perplexity(base_dir, memory_dir, tokens, lmbda):
    """exp(mean NLL) of lmbda*p_mem + (1-lmbda)*p_base, from full float64 softmaxes, window by window."""
    tok = AutoTokenizer.from_pretrained(base_dir)
    models = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in (base_dir, memory_dir)]
    nll, n = 0.0, 0
    for w in sliding_windows(len(tokens), WINDOW, STRIDE):
        ids = torch.as_tensor(tokens[w.start:w.end], dtype=torch.long)[None]
        with torch.no_grad():
            pb, pm = (torch.softmax(m(input_ids=ids).logits[0, :, :len(tok)].double(), -1) for m in models)
        for pos in range(w.score_start, w.end):  # target position pos, predicted at pos - 1
            j, y = pos - w.start - 1, int(tokens[pos])
            nll -= math.log(lmbda * pm[j, y].item() + (1 - lmbda) * pb[j, y].item())
            n += 1
    assert n == len(tokens) - 1
    return math.exp(nll / n)


def test_parse_grid():
    assert tune.parse_grid("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(tune.parse_grid("0:1:0.05")) == 21 and tune.parse_grid("0:1:0.05")[7] == 0.35
    assert tune.parse_grid("0.6, 0.2") == [0.2, 0.6]
    for bad in ("0:2:0.5", "1:0:0.1", "0:1:0", "a,b", "0:1", ""):
        with pytest.raises(ValueError, match="grid"):
            tune.parse_grid(bad)


def test_curve_from_cache_equals_direct_mixture(tiny, val_file, tmp_path, monkeypatch):
    memory = shutil.copytree(tiny["memory"], tmp_path / "memory")
    (memory / "memdec.json").write_text(json.dumps({"format_version": 1, "datastore": {"k": 8}, "lmbda": 0.5}))
    calls = []
    real = scoring.token_logprobs  # tune scores through scoring.pair_logprobs
    monkeypatch.setattr(scoring, "token_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    grid = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    r = tune.tune_lambda(tiny["base"], str(memory), str(val_file), window=WINDOW, stride=STRIDE, grid=grid,
                         write=True, plot=tmp_path / "curve.png", device="cpu", progress=False)
    assert len(calls) == 2  # one scoring pass per model, whatever the grid size
    tokens = tokenize([json.loads(line)["text"] for line in val_file.read_text().splitlines()],
                      AutoTokenizer.from_pretrained(tiny["base"]), progress=False)
    assert r.n_tokens == len(tokens) - 1 and r.grid == grid
    for lm in (0.0, 0.25, 0.9, 1.0):
        assert r.perplexities[grid.index(lm)] == pytest.approx(direct_perplexity(tiny["base"], memory, tokens, lm),
                                                               rel=1e-5)
    assert r.best_perplexity == min(r.perplexities) and r.perplexities[grid.index(r.best_lmbda)] == r.best_perplexity
    saved = json.loads((memory / "memdec.json").read_text())
    assert saved["lmbda"] == r.best_lmbda and saved["datastore"] == {"k": 8} and saved["format_version"] == 1
    assert saved["lmbda_tuning"]["window"] == WINDOW and saved["lmbda_tuning"]["perplexities"] == r.perplexities
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(memory.glob("*.tmp"))


def test_cache_reused_on_rerun(tiny, val_file, tmp_path, monkeypatch):
    kw = dict(window=WINDOW, stride=STRIDE, grid="0:1:0.5", device="cpu", progress=False, cache_dir=tmp_path / "c")
    first = tune.tune_lambda(tiny["base"], tiny["memory"], str(val_file), **kw)
    assert len(list((tmp_path / "c").glob("*.npy"))) == 2
    monkeypatch.setattr(scoring, "token_logprobs", lambda *a, **k: pytest.fail("scored again despite the cache"))
    again = tune.tune_lambda(tiny["base"], tiny["memory"], str(val_file), **{**kw, "grid": "0,0.5,1,0.25"})
    assert again.perplexities[:1] + again.perplexities[2:] == first.perplexities  # grid sorted: 0, .25, .5, 1
    with pytest.raises(pytest.fail.Exception, match="scored again"):  # another stride: a new cache entry
        tune.tune_lambda(tiny["base"], tiny["memory"], str(val_file), **{**kw, "stride": STRIDE + 1})


def test_tokenizer_mismatch_before_any_compute(tiny, val_file, monkeypatch):
    monkeypatch.setattr(scoring, "token_logprobs", lambda *a, **k: pytest.fail("scored before checking tokenizers"))
    with pytest.raises(TokenizerMismatchError, match="memory tokenizer"):
        tune.tune_lambda(tiny["base"], tiny["other_tok_model"], str(val_file), window=WINDOW, progress=False)


def test_write_needs_a_local_memory_folder(tiny, val_file):
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        tune.tune_lambda(tiny["base"], "someone/hub-memory", str(val_file), write=True, progress=False)


def test_cli_tune_lambda(tiny, val_file, capsys):
    assert main(["tune-lambda", "--base", tiny["base_llama"], "--memory", tiny["memory"], "--data", str(val_file),
                 "--window", str(WINDOW), "--grid", "0:1:0.5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "best lmbda" in out and out.count("<- best") == 1
    lines = out.splitlines()
    table = lines[lines.index("  lmbda  perplexity") + 1:][:3]
    ppl = {float(line.split()[0]): float(line.split()[1]) for line in table}
    assert set(ppl) == {0.0, 0.5, 1.0} and all(np.isfinite(v) for v in ppl.values())
    assert main(["tune-lambda", "--base", tiny["base"], "--memory", tiny["memory"], "--data", str(val_file),
                 "--grid", "0:1.5:0.5"]) == 2
    assert "grid" in capsys.readouterr().err


def test_cache_key_of_a_hub_model_follows_its_cached_commit(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    import numpy as np

    from memdec.eval.tune import _cache_path

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--someorg--somemodel"
    tokens = np.arange(50)

    def key():
        return _cache_path(tmp_path / "c", "base", "someorg/somemodel", tokens, 16, 8, "float32")

    uncached = key()
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        if commit == "a" * 40:
            first = key()
            assert first != uncached and key() == first  # stable while the commit is the same
    assert key() not in (uncached, first)  # a new commit of the model: its log-probs are scored again
