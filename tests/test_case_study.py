"""experiments/offline_reproduction/case_study.py: the five columns against a float64 brute force, the long-tail
token rule, the markdown table and a missing test file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from experiments.offline_reproduction.case_study import (
    case_study,
    case_study_lines,
    long_tail_tokens,
    reference_counts,
    word_like,
)

K, TEMP, KNN_LMBDA, LMBDA, WINDOW, STRIDE = 8, 10.0, 0.3, 0.4, 48, 20


def _jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, texts) -> dict[str, str]:
    """A GPT-2-style tokenizer (1000 tokens: word pieces exist), base and memory GPT-2s, the base's datastore
    over five domain documents, a test split of two others and the general documents as reference."""
    from memdec.pipeline.datastore import build_datastore
    from memdec.tiny import save_model, tiny_model, train_tokenizer

    root = tmp_path_factory.mktemp("case")
    tok = train_tokenizer(texts["general"] + texts["domain"], vocab_size=1000, gpt2_style=True)
    paths = {"base": save_model(tiny_model(tok, "gpt2", n_layer=2, hidden=64, seed=11), tok, root / "base"),
             "memory": save_model(tiny_model(tok, "gpt2", n_layer=1, hidden=32, n_head=2, seed=12), tok,
                                  root / "memory"),
             "test": _jsonl(root / "test.jsonl", texts["domain"][5:7]),
             "reference": _jsonl(root / "general.jsonl", texts["general"])}
    paths["datastore"] = str(build_datastore(paths["base"], texts["domain"][:5], root / "ds", window=64, stride=48,
                                             device="cpu", progress=False))
    return paths


def brute_force(paths: dict[str, str], tokens: np.ndarray) -> dict[str, np.ndarray]:
    """float64 p(target) per scored position of each column: models window by window, exact kNN over all keys."""
    from memdec.pipeline.data import sliding_windows
    from memdec.pipeline.datastore import Datastore
    from memdec.pipeline.keys import capture_keys

    n_vocab = len(AutoTokenizer.from_pretrained(paths["base"]))
    base = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float64).eval()
    mem = AutoModelForCausalLM.from_pretrained(paths["memory"], dtype=torch.float64).eval()
    ds = Datastore.open(paths["datastore"])
    all_keys = torch.from_numpy(ds.keys().astype("float64"))
    values = torch.from_numpy(ds.values.astype("int64"))
    pb, pm, pk = [], [], []
    for w in sliding_windows(len(tokens), WINDOW, STRIDE):
        ids = torch.as_tensor(tokens[w.start : w.end], dtype=torch.long)[None]
        with torch.no_grad(), capture_keys(base) as cap:
            logits = base(input_ids=ids).logits[0]
            keys = cap.pop()[0]
            mem_logits = mem(input_ids=ids).logits[0]
        j = torch.arange(w.score_start - w.start, w.end - w.start)
        target = ids[0, j]
        pb.append(torch.softmax(logits[j - 1, :n_vocab], -1).gather(-1, target[:, None])[:, 0])
        pm.append(torch.softmax(mem_logits[j - 1, :n_vocab], -1).gather(-1, target[:, None])[:, 0])
        d, top = ((keys[j - 1][:, None, :] - all_keys[None]) ** 2).sum(-1).topk(K, largest=False)
        pk.append((torch.softmax(-d / TEMP, -1) * (values[top] == target[:, None])).sum(-1))
    b, m, kn = (torch.cat(x).numpy() for x in (pb, pm, pk))
    assert len(b) == len(tokens) - 1
    return {"base": b, "knnlm": KNN_LMBDA * kn + (1 - KNN_LMBDA) * b, "knn": kn, "memdec_alone": m,
            "memdec": LMBDA * m + (1 - LMBDA) * b}


def test_columns_match_float64_brute_force(setup, tmp_path):
    from memdec.pipeline.data import CorpusSpec, load_texts, tokenize

    out = tmp_path / "case.json"
    r = case_study(setup["base"], setup["memory"], setup["datastore"], setup["test"], setup["reference"],
                   {"k": K, "lmbda": KNN_LMBDA, "temperature": TEMP}, LMBDA, WINDOW, STRIDE, batch_size=3,
                   n_tokens=5, min_count=3, device="cpu", out=out, reference_cache=tmp_path / "counts")
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    tok = AutoTokenizer.from_pretrained(setup["base"])
    tokens = tokenize(load_texts(CorpusSpec.from_arg(setup["test"])), tok, progress=False)
    ref = tokenize(load_texts(CorpusSpec.from_arg(setup["reference"])), tok, progress=False)
    want = brute_force(setup, tokens)
    targets = tokens[1:]
    s = r["settings"]
    assert (s["k"], s["temperature"], s["knnlm_lmbda"], s["lmbda"]) == (K, TEMP, KNN_LMBDA, LMBDA)
    assert s["n_positions"] == len(targets) and (s["window"], s["stride"]) == (WINDOW, STRIDE)

    # the rule, independently: ids >= 3 times in the test targets, word-like first, then rarest in the reference
    counts = {int(i): int((targets == i).sum()) for i in np.unique(targets)}
    cand = [i for i, c in counts.items() if c >= 3 and i != tok.eos_token_id]
    per_m = {i: float((ref == i).sum()) / len(ref) * 1e6 for i in cand}
    text = {i: tok.decode([i]).strip() for i in cand}
    wl = {i: len(text[i]) >= 4 and text[i].isalpha() for i in cand}
    order = sorted(cand, key=lambda i: (not wl[i], per_m[i], -counts[i], i))
    assert [t["id"] for t in r["tokens"]] == order[:5]
    assert sum(wl.values()) >= 5 and all(t["word_like"] for t in r["tokens"])  # the fixture has words to pick
    assert max(t["per_million"] for t in r["tokens"]) <= min(per_m[i] for i in cand if wl[i] and i not in order[:5])

    for t in r["tokens"]:
        at = targets == t["id"]
        assert t["test_count"] == counts[t["id"]] and t["per_million"] == pytest.approx(per_m[t["id"]])
        for c, p in want.items():
            assert t["mean_prob"][c] == pytest.approx(p[at].mean(), rel=1e-4, abs=1e-9), (t["text"], c)
    tail = np.isin(targets, order[:5])
    for key, mask in (("long_tail", tail), ("all", np.ones(len(targets), dtype=bool))):
        assert r[key]["n_positions"] == int(mask.sum())
        for c, p in want.items():
            assert r[key]["mean_prob"][c] == pytest.approx(p[mask].mean(), rel=1e-4, abs=1e-9), (key, c)
            ppl = math.exp(-np.log(p[mask]).mean()) if (p[mask] > 0).all() else None
            assert r[key]["perplexity"][c] == (None if ppl is None else pytest.approx(ppl, rel=1e-4)), (key, c)
    assert r["all"]["mean_prob"]["knn"] > 0 and r["all"]["perplexity"]["memdec"] is not None

    lines = case_study_lines(r)
    assert lines[0] == "| token | test count | per M in general | base | +kNN-LM | kNN alone | MemDec alone | +MemDec |"
    assert len(lines) == 2 + 5 + 4 + 2 and lines[-2] == "" and "rarest" not in lines[0]
    assert all(line.count("|") == 9 for line in lines[:-2])
    first = r["tokens"][0]["text"]  # a leading space shows as ␣
    assert f"`{'␣' if first[:1].isspace() else ''}{first.strip()}` | {r['tokens'][0]['test_count']} |" in lines[2]
    assert lines[-3].startswith(f"| all tokens: perplexity | {len(targets)} |")
    assert "per million" in lines[-1] and "at least 3" in lines[-1] and "lmbda 0.4" in lines[-1]


def test_long_tail_rule_prefers_word_like(setup):
    tok = AutoTokenizer.from_pretrained(setup["base"])
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("Ġthe", "a")}
    word = next(i for i in range(len(tok)) if word_like(tok.decode([i])))
    targets = np.array([ids["a"]] * 4 + [word] * 3 + [ids["Ġthe"]] * 2)
    reference = np.array([word] * 10 + [ids["a"]] * 1 + [1] * 89)
    rows = long_tail_tokens(targets, np.bincount(reference, minlength=len(tok)), tok, n_tokens=2, min_count=3)
    # the word comes first although "a" is rarer; "Ġthe" (2 < min_count) is never a candidate
    assert [r["id"] for r in rows] == [word, ids["a"]]
    assert rows[0]["per_million"] == pytest.approx(1e5) and rows[1]["reference_count"] == 1
    assert word_like(" Ġtissue") and not word_like(" the") and not word_like(" 1234")


def test_missing_test_file_is_one_line_before_any_model(setup, tmp_path, monkeypatch):
    import memdec.core.models as models

    def no_model(*_a, **_k):
        raise AssertionError("no model should load")

    monkeypatch.setattr(models, "load_causal_lm", no_model)
    monkeypatch.setattr(models, "load_tokenizer", no_model)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as e:
        case_study(setup["base"], setup["memory"], setup["datastore"], str(missing), setup["reference"],
                   {"k": K, "lmbda": KNN_LMBDA, "temperature": TEMP}, LMBDA, WINDOW, STRIDE, device="cpu",
                   out=tmp_path / "r.json")
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "r.json").exists()


def test_reference_counts_are_cached_per_corpus_and_tokenizer(setup, tmp_path, monkeypatch):
    """The reference's token counts equal a bincount of its tokens; a second call reads them from the cache
    (no tokenizing), a changed corpus is counted again, and no temporary file is left."""
    import experiments.offline_reproduction.case_study as cs
    from memdec.pipeline.data import CorpusSpec, load_texts, tokenize

    tok = AutoTokenizer.from_pretrained(setup["base"])
    ref = tmp_path / "general.jsonl"
    ref.write_bytes(Path(setup["reference"]).read_bytes())
    want = np.bincount(tokenize(load_texts(CorpusSpec.from_arg(str(ref))), tok, progress=False), minlength=len(tok))
    cache = tmp_path / "cache"
    got = reference_counts(ref, tok, cache)
    assert got.dtype == np.int64 and got.shape == (len(tok),) and np.array_equal(got, want)
    assert [p.suffix for p in cache.iterdir()] == [".npy"] and "tmp" not in next(cache.iterdir()).name

    def no_tokenize(*_a, **_k):
        raise AssertionError("the cached counts should be read")

    monkeypatch.setattr("memdec.pipeline.data.tokenize", no_tokenize)
    assert np.array_equal(reference_counts(ref, tok, cache), want)
    monkeypatch.undo()
    ref.write_text(ref.read_text(encoding="utf-8") + json.dumps({"text": "tissue tissue tissue"}) + "\n",
                   encoding="utf-8")
    again = reference_counts(ref, tok, cache)
    assert again.sum() > want.sum() and len(list(cache.iterdir())) == 2
    assert cs.reference_counts is reference_counts
