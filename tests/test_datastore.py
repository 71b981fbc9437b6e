"""Datastore: keys equal independently computed hidden states, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATASTORE_ARGS

from memdec.core.formats import FormatError
from memdec.inference.mixing import TokenizerMismatchError, tokenizer_fingerprint
from memdec.pipeline.data import sliding_windows, tokenize
from memdec.pipeline.datastore import Datastore, build_datastore


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.suffix == ".npy"}


def _manifest(folder: Path) -> dict:
    m = json.loads((Path(folder) / "manifest.json").read_text())
    m.pop("created")
    return m


def _norm_by_hand(norm: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """LayerNorm (GPT-2 ln_2) or RMSNorm (Llama post_attention_layernorm) in float64 from its weights."""
    w = norm.weight.detach().double().numpy()
    if isinstance(norm, torch.nn.LayerNorm):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + norm.eps) * w + norm.bias.detach().double().numpy()
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w


def _reference_keys(model_dir: str, tokens: np.ndarray, window: int, stride: int) -> np.ndarray:
    """Keys from output_hidden_states: ln_2(input of the last block + its attention output), by hand."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if hasattr(model, "transformer"):
        block = model.transformer.h[-1]
        attn, norm = block.attn, block.ln_2
    else:
        block = model.model.layers[-1]
        attn, norm = block.self_attn, block.post_attention_layernorm
    seen = {}
    attn.register_forward_hook(lambda _m, _a, out: seen.__setitem__("attn", out[0]))
    rows = []
    with torch.no_grad():
        for w in sliding_windows(len(tokens), window, stride):
            ids = torch.as_tensor(tokens[w.start : w.end], dtype=torch.long)[None]
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            h_mid = (hs[-2] + seen["attn"])[0].double().numpy()  # hs[-2]: input of the last block
            keys = _norm_by_hand(norm, h_mid)
            rows.append(keys[w.score_start - w.start - 1 : w.end - w.start - 1])
    return np.concatenate(rows)


@pytest.mark.parametrize("arch", ["base", "base_llama"])
def test_keys_and_values_match_independent_computation(tiny, texts, tmp_path, arch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny[arch])
    docs = texts["general"][:6]
    out = build_datastore(tiny[arch], docs, tmp_path / "ds", window=40, stride=25, batch_size=4, shard_rows=300,
                          device="cpu", progress=False)
    ds = Datastore.open(out)
    tokens = tokenize(docs, tok, progress=False)
    assert np.array_equal(ds.tokens, tokens)
    assert ds.n == len(tokens) - 1 and len(ds.manifest["shards"]) > 2
    assert np.array_equal(ds.values, tokens[1:])
    ref = _reference_keys(tiny[arch], tokens, 40, 25)
    assert ref.shape == (ds.n, ds.dim)
    np.testing.assert_allclose(ds.keys(0, ds.n).astype(np.float64), ref, rtol=2e-3, atol=2e-3)
    # keys() across shard boundaries and gather() agree with the full array
    all_keys = ds.keys()
    assert np.array_equal(ds.keys(250, 650), all_keys[250:650])
    rows = np.array([[0, ds.n - 1], [301, 17]])
    assert np.array_equal(ds.gather(rows), all_keys[rows])
    m = ds.manifest
    assert m["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert m["key_layer"] == ("transformer.h.1.mlp" if arch == "base" else "model.layers.1.mlp")
    assert (m["dim"], m["window"], m["stride"], m["n_tokens"]) == (64, 40, 25, len(tokens))
    assert m["model"] == tiny[arch] and m["corpus"] == {"texts": 6}
    ds.check_tokenizer(tok)


def test_sigkill_resumes_to_identical_output(tiny, texts, tiny_datastore, tmp_path):
    out = tmp_path / "ds"
    docs_file = tmp_path / "docs.json"
    docs_file.write_text(json.dumps(texts["domain"]))
    code = (
        "import json, sys; from memdec.pipeline.datastore import build_datastore; "
        f"build_datastore({tiny['base']!r}, json.load(open({str(docs_file)!r})), {str(out)!r}, **{DATASTORE_ARGS!r})"
    )
    env = {**os.environ, "MEMDEC_TEST_KILL_AFTER": "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = Path(str(out) + ".partial")
    assert not out.exists() and (partial / "keys_00001.npy").exists() and not (partial / "keys_00003.npy").exists()
    assert not (partial / "manifest.json").exists()
    build_datastore(tiny["base"], texts["domain"], out, **DATASTORE_ARGS)
    assert not partial.exists()
    assert _files(out) == _files(tiny_datastore)
    assert _manifest(out) == _manifest(tiny_datastore)


def test_bad_corpus(tiny, tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_datastore(tiny["base"], str(missing), tmp_path / "a", window=32, progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no text"):
        build_datastore(tiny["base"], str(empty), tmp_path / "b", window=32, progress=False)
    with pytest.raises(ValueError, match="no text"):
        build_datastore(tiny["base"], [], tmp_path / "c", window=32, progress=False)
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "a few words"}\n')
    with pytest.raises(ValueError, match=r"short.jsonl: \d+ tokens, fewer than one window of 32"):
        build_datastore(tiny["base"], str(short), tmp_path / "d", window=32, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "short.jsonl"]  # nothing left behind


def test_cli_one_line_error(tiny, tmp_path, capsys):
    from memdec.cli import main

    rc = main(["datastore", "--model", tiny["base"], "--corpus", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "none: no such file" in err


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_open_detects_damage(tiny_datastore, tmp_path):
    ds = Datastore.open(tiny_datastore)
    assert ds.n == ds.manifest["n_entries"] and len(ds.manifest["shards"]) == 4

    trunc = _copy(tiny_datastore, tmp_path / "trunc")
    data = (trunc / "keys_00001.npy").read_bytes()
    (trunc / "keys_00001.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"keys_00001.npy: unreadable or truncated"):
        Datastore.open(trunc)

    gone = _copy(tiny_datastore, tmp_path / "gone")
    (gone / "values_00002.npy").unlink()
    with pytest.raises(FormatError, match=r"values_00002.npy: missing"):
        Datastore.open(gone)

    counts = _copy(tiny_datastore, tmp_path / "counts")
    m = json.loads((counts / "manifest.json").read_text())
    m["shards"][0]["rows"] += 1
    (counts / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match=r"manifest.json: shards hold \d+ rows, the manifest says n_entries"):
        Datastore.open(counts)

    dim = _copy(tiny_datastore, tmp_path / "dim")
    m = json.loads((dim / "manifest.json").read_text())
    m["dim"] = 32
    (dim / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match=r"keys_00000.npy: shape \(\d+, 64\) does not match the manifest's \(\d+, 32\)"):
        Datastore.open(dim)

    with pytest.raises(FormatError, match="no such datastore folder"):
        Datastore.open(tmp_path / "absent")


def test_other_tokenizer_is_rejected(tiny, tiny_datastore):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tiny["other_tok_model"])
    with pytest.raises(TokenizerMismatchError, match=f"datastore {tiny_datastore}"):
        Datastore.open(tiny_datastore).check_tokenizer(other)


def test_partial_with_other_settings_and_existing_output(tiny, texts, tiny_datastore, tmp_path):
    with pytest.raises(FileExistsError, match="already exists"):
        build_datastore(tiny["base"], texts["domain"], tiny_datastore, **DATASTORE_ARGS)
    out = tmp_path / "ds"
    partial = Path(str(out) + ".partial")
    partial.mkdir()
    (partial / "plan.json").write_text(json.dumps({"window": 999}))
    with pytest.raises(ValueError, match=r"ds.partial: left by an interrupted run with other settings"):
        build_datastore(tiny["base"], texts["domain"], out, **DATASTORE_ARGS)
    with pytest.raises(FormatError, match="not complete"):
        Datastore.open(out)
    args = {**DATASTORE_ARGS, "window": 32, "stride": None}
    build_datastore(tiny["base"], texts["domain"][:3], out, overwrite=True, **args)
    assert Datastore.open(out).manifest["window"] == 32 and not partial.exists()
