"""memdec.inference.knn against a float64 brute force: ties, duplicate values, k > available neighbours."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from memdec.inference.knn import knn_distribution, knn_target_probs


def brute(dist, ids, values, temperature, vocab):
    """p_knn rows by loops in float64 over the valid neighbours (id >= 0, finite distance)."""
    out = np.zeros((len(dist), vocab))
    for r, (ds, js) in enumerate(zip(dist.tolist(), ids.tolist(), strict=True)):
        ok = [(d, j) for d, j in zip(ds, js, strict=True) if j >= 0 and math.isfinite(d)]
        if not ok:
            continue
        z = sum(math.exp(-d / temperature) for d, _ in ok)
        for d, j in ok:
            out[r, int(values[j])] += math.exp(-d / temperature) / z
    return out


def cases():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 6, (40,), generator=g)  # few tokens: many duplicates
    dist = torch.rand(7, 5, generator=g, dtype=torch.float64) * 4
    ids = torch.randint(0, 40, (7, 5), generator=g)
    dist[1] = 2.0  # all tied
    ids[2] = torch.tensor([3, 3, 3, 3, 3])  # one row, several times
    ids[3, 3:] = -1  # k larger than what the search found (faiss pads with -1 / inf)
    dist[3, 3:] = float("inf")
    ids[4, 1:] = -1  # a single neighbour
    dist[5, 2] = float("inf")  # a non-finite distance is not a neighbour
    ids[6] = -1  # none at all
    return dist, ids, values


@pytest.mark.parametrize("temperature", [0.5, 1.0, 16.0])
def test_dense_matches_brute_force(temperature):
    dist, ids, values = cases()
    got = knn_distribution(dist, ids, values, temperature, vocab_size=8)
    assert got.dtype == torch.float64 and got.shape == (7, 8)
    np.testing.assert_allclose(got.numpy(), brute(dist, ids, values, temperature, 8), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got[:6].sum(1).numpy(), 1.0, rtol=1e-12)
    assert float(got[6].abs().sum()) == 0.0


@pytest.mark.parametrize("temperature", [0.5, 16.0])
def test_sparse_matches_dense(temperature):
    dist, ids, values = cases()
    ref = brute(dist, ids, values, temperature, 8)
    sp = knn_distribution(dist, ids, values, temperature)
    for r in range(len(dist)):
        toks = sp.tokens[r][sp.mask[r]].tolist()
        assert toks == sorted(set(toks))  # each distinct token once, ascending
        got = np.zeros(8)
        got[toks] = sp.probs[r][sp.mask[r]].numpy()
        np.testing.assert_allclose(got, ref[r], rtol=1e-12, atol=1e-15)
        assert set(toks) == set(np.nonzero(ref[r])[0].tolist())


def test_target_probs_and_float32():
    dist, ids, values = cases()
    targets = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    ref = brute(dist, ids, values, 2.0, 8)
    got = knn_target_probs(dist, ids, values, targets, 2.0)
    np.testing.assert_allclose(got.numpy(), ref[np.arange(7), targets.numpy()], rtol=1e-12, atol=1e-15)
    dense32 = knn_distribution(dist.float(), ids, values, 2.0, vocab_size=8)
    assert dense32.dtype == torch.float32
    np.testing.assert_allclose(dense32.numpy(), ref, atol=1e-6)
