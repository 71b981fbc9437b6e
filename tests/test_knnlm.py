"""kNN-LM baseline: equals the base at lmbda=0, finds exact continuations, matches a float64 brute force."""

from __future__ import annotations

import math

import pytest
import torch
from test_baselines import _close, _instances, _requests

from memdec.inference.mixing import TokenizerMismatchError


@pytest.fixture(scope="module")
def base_lm(tiny):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=tiny["base"], device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def eval_doc(texts) -> str:
    return texts["domain"][3][:300]


@pytest.fixture(scope="module")
def datastores(tiny, texts, eval_doc, tmp_path_factory):
    """'self': the evaluation text first (its keys all from one window starting at it) then filler;
    'mixed': evaluation text + other documents in short windows."""
    from memdec.pipeline.datastore import build_datastore

    root = tmp_path_factory.mktemp("knn")
    return {
        "self": str(build_datastore(tiny["base"], [eval_doc, texts["general"][0][:500]], root / "self", window=256,
                                    stride=128, device="cpu",
                                    progress=False)),
        "mixed": str(build_datastore(tiny["base"], [eval_doc, *texts["general"][:2]], root / "mixed", window=64,
                                     stride=32, device="cpu", progress=False)),
    }


def _knn(tiny, datastore, **kw):
    from baselines.knnlm import KNNLM

    kw = {"pretrained": tiny["base"], "device": "cpu", "batch_size": 4, **kw}
    return KNNLM(datastore=datastore, **kw)


def test_lmbda_zero_equals_base(tiny, texts, datastores, base_lm):
    knn = _knn(tiny, datastores["mixed"], k=8, lmbda=0.0)
    ll, rolling = _requests(texts)
    assert _close([x[0] for x in knn.loglikelihood(ll)], [x[0] for x in base_lm.loglikelihood(ll)])
    assert _close(knn.loglikelihood_rolling(rolling), base_lm.loglikelihood_rolling(rolling))


def test_self_datastore_finds_exact_continuation(tiny, datastores, eval_doc, base_lm):
    """k=1 over a datastore of the evaluation text: every neighbour is the position itself."""
    cut = eval_doc.index(" ")
    req = _instances("loglikelihood", [(eval_doc[:cut], eval_doc[cut:])])
    (res,) = _knn(tiny, datastores["self"], k=1, lmbda=1.0).loglikelihood(req)
    assert res[0] == pytest.approx(0.0, abs=1e-6) and res[1] is True  # p(exact continuation) = 1
    n = len(base_lm.tok_encode(eval_doc[cut:]))
    ppl_knn = math.exp(-_knn(tiny, datastores["self"], k=1, lmbda=0.5).loglikelihood(req)[0][0] / n)
    ppl_base = math.exp(-base_lm.loglikelihood(req)[0][0] / n)
    assert n > 150 and ppl_knn <= 2.0 + 1e-6 and ppl_base > 100  # p >= 0.5 * 1 at every token


def test_generation(tiny, datastores, eval_doc, base_lm):
    """lmbda=0 generates what the base generates; k=1, lmbda=1 over the text itself recites it."""
    cut = eval_doc.index(" ", 60)
    req = _instances("generate_until", [(eval_doc[:cut], {"until": ["\n\n"], "max_gen_toks": 12}),
                                        ("The hacker", {"until": ["."], "max_gen_toks": 8})])
    assert _knn(tiny, datastores["mixed"], k=4, lmbda=0.0).generate_until(req) == base_lm.generate_until(req)
    knn = _knn(tiny, datastores["self"], k=1, lmbda=1.0)
    (text, _) = knn.generate_until(req)
    expected = knn.tok_decode(knn.tok_encode(eval_doc)[len(knn.tok_encode(eval_doc[:cut])):][:12])
    assert text == expected and len(text) > 10
    info = knn.get_model_info()
    assert info["knn_k"] == 1 and info["lmbda"] == 1.0 and info["knn_datastore"] == datastores["self"]


def test_matches_float64_brute_force(tiny, datastores, eval_doc):
    """log p of a few continuation tokens equals a float64 brute-force kNN-LM over all datastore keys."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memdec.pipeline.datastore import Datastore
    from memdec.pipeline.keys import capture_keys

    k, temp, lmbda = 6, 5.0, 0.4
    knn = _knn(tiny, datastores["mixed"], k=k, lmbda=lmbda, temperature=temp)
    ctx, cont = eval_doc[:150], eval_doc[150:175]
    (got,) = knn.loglikelihood(_instances("loglikelihood", [(ctx, cont)]))

    tok = AutoTokenizer.from_pretrained(tiny["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float64).eval()
    ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
    full = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad(), capture_keys(model) as cap:
        logits = model(torch.tensor([full])).logits[0]
        keys = cap.pop()[0]
    ds = Datastore.open(datastores["mixed"])
    all_keys = torch.from_numpy(ds.keys().astype("float64"))
    values = torch.from_numpy(ds.values.astype("int64"))
    vocab = len(tok)
    expected, knn_mass = 0.0, []
    for t in range(len(ctx_ids), len(full)):
        dist = ((all_keys - keys[t - 1]) ** 2).sum(-1)
        top = dist.argsort()[:k]
        w = torch.softmax(-dist[top] / temp, 0)
        p_knn = float(w[values[top] == full[t]].sum())
        knn_mass.append(p_knn)
        p_base = float(torch.softmax(logits[t - 1, :vocab], 0)[full[t]])
        expected += math.log(lmbda * p_knn + (1 - lmbda) * p_base)
    assert len(full) - len(ctx_ids) >= 4 and max(knn_mass) > 0.5  # the neighbours matter
    assert got[0] == pytest.approx(expected, abs=1e-4)


def test_backends_and_recompute_agree(tiny, texts, datastores):
    ll, _ = _requests(texts)
    ref = [x[0] for x in _knn(tiny, datastores["mixed"], k=5, lmbda=0.3).loglikelihood(ll)]
    flat = _knn(tiny, datastores["mixed"], k=5, lmbda=0.3, backend="faiss-flat")
    assert _close([x[0] for x in flat.loglikelihood(ll)], ref, tol=1e-3)
    exact = _knn(tiny, datastores["mixed"], k=5, lmbda=0.3, recompute_dists="true")
    assert _close([x[0] for x in exact.loglikelihood(ll)], ref, tol=1e-3)


def test_padding_positions_are_not_searched(tiny, texts, datastores, monkeypatch):
    knn = _knn(tiny, datastores["mixed"], k=3, lmbda=0.5)
    asked = []
    search = knn.knn.index.search
    monkeypatch.setattr(knn.knn.index, "search", lambda q, k: (asked.append(len(q)), search(q, k))[1])
    # an explicit mask (generation: left padding)
    ids = torch.randint(1, 300, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, :2] = 0
    out = knn.other_logprobs(ids, mask)
    assert sum(asked) == int(mask.sum()) == 16
    assert out.shape == (3, 7, len(knn.tokenizer))
    assert torch.allclose(out[mask.bool()].exp().sum(-1), torch.ones(16))
    # lm-eval's right-padded scoring batches: only each request's own input is searched
    ll, _ = _requests(texts)
    asked.clear()
    batched = knn.loglikelihood(ll)
    n_real = sum(len(knn.tok_encode(r.args[0] + r.args[1])) - 1 for r in ll)
    assert sum(asked) == n_real and len({len(knn.tok_encode(r.args[0] + r.args[1])) for r in ll}) == 3
    one = _knn(tiny, datastores["mixed"], k=3, lmbda=0.5, batch_size=1)
    assert _close([x[0] for x in batched], [x[0] for x in one.loglikelihood(ll)])


def test_bad_input(tiny, datastores):
    with pytest.raises(TokenizerMismatchError, match="datastore"):
        _knn(tiny, datastores["mixed"], pretrained=tiny["other_tok_model"], k=4)
    with pytest.raises(ValueError, match="dim 32, datastore .* dim 64"):
        _knn(tiny, datastores["mixed"], pretrained=tiny["memory"], k=4)
    with pytest.raises(ValueError, match=r"k = 100000 must be between 1 and the size of datastore"):
        _knn(tiny, datastores["mixed"], k=100000)
    with pytest.raises(ValueError, match="backend 'annoy'"):
        _knn(tiny, datastores["mixed"], k=4, backend="annoy")
    with pytest.raises(ValueError, match="datastore=DIR"):
        _knn(tiny, None, k=4)
    with pytest.raises(ValueError, match="knnlm: temperature must be a number > 0, got 'hot'"):
        _knn(tiny, datastores["mixed"], k=4, temperature="hot")
    with pytest.raises(ValueError, match="knnlm: recompute_dists must be true or false"):
        _knn(tiny, datastores["mixed"], k=4, recompute_dists="maybe")


def test_mask_reaching_other_logprobs_marks_exactly_the_real_tokens(tiny, datastores):
    """HFLM right-pads each scoring batch without a mask; other_logprobs gets one marking each row's real tokens,
    also for requests ending in token 0 (the padding id) and requests cut to max_length."""
    knn = _knn(tiny, datastores["mixed"], k=3, lmbda=0.5, batch_size=3, max_length=12)
    seen = []
    other = knn.other_logprobs

    def record(ids, mask=None):
        seen.append((ids.cpu(), None if mask is None else mask.cpu()))
        return other(ids, mask)

    knn.other_logprobs = record
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(1, 300, (n,), generator=g).tolist(), torch.randint(1, 300, (c,), generator=g).tolist())
             for n, c in ((3, 1), (5, 2), (5, 3), (8, 1), (20, 4), (2, 1))]
    pairs.append((pairs[1][0][:2] + [0, 0], [7, 0, 0]))  # real zeros at the end, as HFLM's padding
    requests = [(("", ""), ctx, cont) for ctx, cont in pairs]
    knn._loglikelihood_tokens(requests, disable_tqdm=True)
    # independently: a request's model input is its last max_length + 1 tokens but the final one
    expected = sorted(tuple((ctx + cont)[-13:][:-1]) for ctx, cont in pairs)
    got = []
    assert len(seen) == 3  # 7 requests in batches of 3
    for ids, mask in seen:
        assert mask is not None and mask.shape == ids.shape
        for row, m in zip(ids.tolist(), mask.tolist(), strict=True):
            n = sum(m)
            assert m == [1] * n + [0] * (len(m) - n) and not any(row[n:])  # real tokens, then padding
            got.append(tuple(row[:n]))
    assert sorted(got) == expected
