"""memdec tune-knnlm: the (temperature, lmbda) grid equals a float64 brute-force kNN-LM; cache, CLI, bad inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memdec.cli import main
from memdec.pipeline.data import tokenize

K, TEMPS, LMBDAS = 8, [2.0, 30.0], [0.0, 0.25, 0.6, 1.0]


@pytest.fixture(scope="module")
def val_file(tmp_path_factory, texts):
    """One short domain document (about 120 tokens: several windows of 48)."""
    path = tmp_path_factory.mktemp("knnval") / "val.jsonl"
    path.write_text(json.dumps({"text": texts["domain"][5][:260]}) + "\n", encoding="utf-8")
    return path


def brute_force(base_dir, datastore, tokens, k, temps, lmbdas, window, stride):
    """[temperature][lmbda] perplexity: float64 model window by window, every datastore key, exact top-k,
    softmax(-d / T) over the k neighbours, mixed with the base at each target."""
    from memdec.pipeline.data import sliding_windows
    from memdec.pipeline.datastore import Datastore
    from memdec.pipeline.keys import capture_keys

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64).eval()
    ds = Datastore.open(datastore)
    all_keys = torch.from_numpy(ds.keys().astype("float64"))
    values = torch.from_numpy(ds.values.astype("int64"))
    p_base, d_all, hit_all = [], [], []
    for w in sliding_windows(len(tokens), window, stride):
        ids = torch.as_tensor(tokens[w.start : w.end], dtype=torch.long)[None]
        with torch.no_grad(), capture_keys(model) as cap:
            logits = model(input_ids=ids).logits[0]
            keys = cap.pop()[0]
        j = torch.arange(w.score_start - w.start, w.end - w.start)  # scored input positions
        target = ids[0, j]
        p_base.append(torch.softmax(logits[j - 1, : len(tok)], -1).gather(-1, target[:, None])[:, 0])
        dist = ((keys[j - 1][:, None, :] - all_keys[None]) ** 2).sum(-1)
        d, top = dist.topk(k, largest=False)
        d_all.append(d)
        hit_all.append(values[top] == target[:, None])
    p_base, d, hit = torch.cat(p_base), torch.cat(d_all), torch.cat(hit_all)
    assert len(p_base) == len(tokens) - 1
    out = []
    for t in temps:
        p_knn = (torch.softmax(-d / t, -1) * hit).sum(-1)
        out.append([math.exp(-float(torch.log(lm * p_knn + (1 - lm) * p_base).mean())) for lm in lmbdas])
    return out


def test_grid_matches_float64_brute_force(tiny, tiny_datastore, val_file, tmp_path):
    from memdec.eval.tune_knnlm import tune_knnlm

    r = tune_knnlm(tiny["base"], tiny_datastore, str(val_file), k=K, lmbda_grid=LMBDAS, temperatures=TEMPS,
                   window=48, stride=20, device="cpu", progress=False, out=tmp_path / "r.json")
    tokens = tokenize([json.loads(val_file.read_text())["text"]], AutoTokenizer.from_pretrained(tiny["base"]))
    assert len(tokens) > 100 and r.n_tokens == len(tokens) - 1
    want = brute_force(tiny["base"], tiny_datastore, tokens, K, TEMPS, LMBDAS, 48, 20)
    got = np.asarray(r.perplexities)
    # every cell, lmbda 1 (the kNN distribution alone; infinite if a target has no neighbour) included
    assert got.shape == (2, 4) and np.allclose(got, np.asarray(want), rtol=1e-4)
    best = np.unravel_index(np.argmin(got), got.shape)
    assert (r.best_temperature, r.best_lmbda) == (TEMPS[best[0]], LMBDAS[best[1]])
    assert r.base_perplexity == pytest.approx(want[0][0], rel=1e-4) and r.best_perplexity < r.base_perplexity
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["best_lmbda"] == r.best_lmbda and saved["model_args"] == r.model_args()
    assert f"temperature={r.best_temperature:g}" in saved["model_args"]


def test_cli_cache_reuses_features(tiny, tiny_datastore, val_file, tmp_path, capsys, monkeypatch):
    args = ["tune-knnlm", "--base", tiny["base"], "--datastore", tiny_datastore, "--data", str(val_file),
            "--k", str(K), "--window", "64", "--stride", "32", "--device", "cpu", "--cache", str(tmp_path / "c")]
    assert main([*args, "--grid", "0,0.5", "--temperatures", "4"]) == 0
    first = capsys.readouterr().out
    assert "best: lmbda" in first and len(list((tmp_path / "c").glob("knnlm_features_*.npy"))) == 3

    import memdec.eval.tune_knnlm as tk

    def no_model(*_a, **_k):
        raise AssertionError("the cached features should have been used")

    monkeypatch.setattr(tk, "load_causal_lm", no_model)
    assert main([*args, "--grid", "0,0.5", "--temperatures", "4,8"]) == 0
    second = capsys.readouterr().out
    row = next(line for line in first.splitlines() if line.strip().startswith("4 ")).replace("  <- best", "")
    assert row in second  # the same numbers at temperature 4, from the cache


@pytest.mark.parametrize("extra, needle", [
    (["--k", "100000000"], "k = 100000000"),
    (["--temperatures", "0"], "temperatures must be > 0"),
    (["--grid", "0:2:0.5"], "grid"),
    (["--window", "100000"], "window 100000"),
])
def test_bad_input_is_one_line(tiny, tiny_datastore, val_file, tmp_path, capsys, extra, needle):
    args = ["tune-knnlm", "--base", tiny["base"], "--datastore", tiny_datastore, "--data", str(val_file),
            "--device", "cpu", "--k", "4", "--out", str(tmp_path / "r.json"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "r.json").exists()


def test_out_folder_refused_before_work(tiny, tiny_datastore, val_file, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    args = ["tune-knnlm", "--base", tiny["base"], "--datastore", tiny_datastore, "--data", str(val_file),
            "--device", "cpu", "--k", "4", "--out", str(tmp_path / "d")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a folder" in err
    assert list((tmp_path / "d").iterdir()) == []
