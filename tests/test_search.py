"""Search backends: exact torch search equals float64 brute force; faiss Flat agrees; IVF-PQ is refined."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from memdec.core.formats import FormatError
from memdec.pipeline.datastore import Datastore
from memdec.pipeline.search import TorchIndex, build_index, exact_distances, load_index, open_index


def brute_force(keys: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 squared L2 distances to all keys, the k smallest, nearest first."""
    k64, q64 = keys.astype(np.float64), queries.astype(np.float64)
    d = (q64**2).sum(1)[:, None] - 2 * q64 @ k64.T + (k64**2).sum(1)[None, :]
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, 1), ids


@pytest.fixture(scope="module")
def random_keys() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    keys = (rng.standard_normal((3000, 24)) * 3).astype(np.float16)
    queries = (rng.standard_normal((70, 24)) * 3).astype(np.float16)
    return keys, queries


@pytest.mark.parametrize("half, scale", [(False, 1.0), (True, 1.0), (True, 300.0)])
def test_torch_search_equals_brute_force(random_keys, half, scale):
    """half: the GPU path (float16 candidates, exact re-ranking); scale 300 makes q.k overflow float16."""
    keys, queries = (x * np.float16(scale) for x in random_keys)
    assert np.isfinite(keys).all() and (scale == 1 or (keys.astype(np.float64) ** 2).sum(1).max() > 65504)
    ref_d, ref_i = brute_force(keys, queries, 40)
    # chunks that do not divide n and small query batches exercise the per-chunk top-k merge
    index = TorchIndex(torch.from_numpy(keys), device="cpu", chunk_rows=700, query_batch=16, half=half)
    d, i = index.search(torch.from_numpy(queries).float(), 40)
    assert d.dtype == torch.float32 and i.dtype == torch.int64 and d.shape == (70, 40)
    assert np.array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-5, atol=1e-3 * scale**2)


def test_index_cli_saves_a_manifest(tiny_datastore, tmp_path, capsys):
    from memdec.cli import main

    ds = shutil.copytree(tiny_datastore, tmp_path / "ds")
    assert main(["index", "--datastore", str(ds), "--backend", "torch"]) == 0
    assert capsys.readouterr().out.strip() == str(ds / "index-torch")
    assert json.loads((ds / "index-torch" / "manifest.json").read_text())["backend"] == "torch"
    index = load_index(ds / "index-torch")
    assert isinstance(index, TorchIndex) and index.n == Datastore.open(ds).n


def test_torch_search_over_a_datastore(tiny_datastore):
    ds = Datastore.open(tiny_datastore)
    keys = ds.keys()
    queries = keys[::97]
    ref_d, ref_i = brute_force(keys, queries, 20)
    index = TorchIndex(ds, device="cpu", chunk_rows=1500)
    d, i = index.search(torch.from_numpy(queries).float(), 20)
    assert np.array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-5, atol=1e-2)
    assert np.array_equal(i[:, 0].numpy(), np.arange(0, ds.n, 97))  # a stored key finds itself first
    with pytest.raises(ValueError, match=f"k = {ds.n + 1}: must be between 1 and the number of keys"):
        index.search(torch.from_numpy(queries).float(), ds.n + 1)


def test_faiss_flat_agrees_with_torch(tiny_datastore, tmp_path):
    ds = Datastore.open(shutil.copytree(tiny_datastore, tmp_path / "ds"))
    queries = torch.from_numpy(ds.keys(100, 400)).float()
    td, ti = open_index(ds, "torch").search(queries, 30)
    flat = build_index(ds, "faiss-flat", progress=False)
    assert flat.path == ds.path / "index-faiss-flat" and (flat.path / "index.faiss").exists()
    assert json.loads((flat.path / "manifest.json").read_text())["kind"] == "index"
    fd, fi = flat.search(queries, 30)
    assert np.array_equal(fi.numpy(), ti.numpy())
    np.testing.assert_allclose(fd.numpy(), td.numpy(), rtol=1e-4, atol=1e-2)
    again = load_index(flat.path)  # reads the faiss file and the datastore recorded in its manifest
    assert np.array_equal(again.search(queries, 30)[1].numpy(), ti.numpy())
    with pytest.raises(FileExistsError, match="index-faiss-flat: already exists"):
        build_index(ds, "faiss-flat", progress=False)


def test_ivfpq_refined_distances_are_exact(tiny_datastore, tmp_path):
    ds = Datastore.open(shutil.copytree(tiny_datastore, tmp_path / "ds"))
    queries = torch.from_numpy(ds.keys(1000, 1200)).float()
    ivf = build_index(ds, "faiss-ivfpq", nlist=16, m=8, nprobe=16, train_size=3000, progress=False)
    assert ivf.refine
    d, i = ivf.search(queries, 25)
    exact = exact_distances(queries, i, ds)
    np.testing.assert_allclose(d.numpy(), exact.numpy(), rtol=1e-6)
    assert torch.all(d[:, 1:] >= d[:, :-1])
    _, ref_i = brute_force(ds.keys(), queries.numpy(), 25)
    recall = np.mean([len(set(a) & set(b)) / 25 for a, b in zip(i.numpy(), ref_i, strict=True)])
    assert recall > 0.5
    manifest = json.loads((ivf.path / "manifest.json").read_text())
    assert manifest["params"]["nlist"] == 16 and manifest["params"]["nprobe"] == 16
    raw = load_index(ivf.path, refine=False)
    d_raw, _ = raw.search(queries, 25)
    assert not np.allclose(d_raw.numpy(), d.numpy())  # PQ distances are approximate


def test_index_of_another_datastore_is_rejected(tiny, texts, tiny_datastore, tmp_path):
    from conftest import DATASTORE_ARGS

    from memdec.pipeline.datastore import build_datastore

    ds = Datastore.open(shutil.copytree(tiny_datastore, tmp_path / "ds"))
    flat = build_index(ds, "faiss-flat", progress=False)
    other = build_datastore(tiny["base"], texts["domain"][:5], tmp_path / "other", **DATASTORE_ARGS)
    with pytest.raises(FormatError, match=r"index-faiss-flat: index built for a datastore with n_entries = \d+, "
                                          r"datastore .*other has \d+"):
        load_index(flat.path, datastore=other)
    with pytest.raises(ValueError, match="backend 'annoy'"):
        build_index(ds, "annoy")
    with pytest.raises(ValueError, match="m = 5 must divide the key dimension 64"):
        build_index(ds, "faiss-ivfpq", m=5, progress=False)


def assert_same_neighbours(keys: np.ndarray, queries: np.ndarray, k: int, d: torch.Tensor, i: torch.Tensor) -> None:
    """The search's answer equals a float64 brute force: the same sorted distances, each id's true
    distance equal to the one returned, distinct ids, and the same ids wherever the distance is not
    tied with the k-th (at a tie any of the equal keys is a right answer)."""
    ref_d, ref_i = brute_force(keys, queries, k)
    d, i = d.numpy().astype(np.float64), i.numpy()
    assert d.shape == i.shape == (len(queries), k)
    np.testing.assert_allclose(d, ref_d, rtol=1e-6, atol=1e-6)
    true = ((keys.astype(np.float64)[i] - queries.astype(np.float64)[:, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(true, d, rtol=1e-6, atol=1e-6)
    for row in range(len(queries)):
        assert len(set(i[row])) == k
        below = ref_d[row, -1] * (1 - 1e-9) - 1e-12  # clearly nearer than the k-th (float64 rounding aside)
        assert set(i[row][true[row] < below]) == set(ref_i[row][ref_d[row] < below])
        ties = true[row] == true[row, -1]
        assert np.all(np.diff(i[row][ties]) > 0)  # equal distances come in id order


@pytest.mark.parametrize("group", [1, 3, 8, 64])
@pytest.mark.parametrize("half", [False, True])
def test_group_selection_with_ties_and_duplicate_keys(group, half):
    """Small-integer keys (many equal distances) and repeated rows; tiles that the group size does not divide."""
    rng = np.random.default_rng(1)
    base = rng.integers(-2, 3, size=(500, 6)).astype(np.float16)
    keys = np.concatenate([base, base[:200], base[:50]])  # duplicate keys: equal distances by construction
    queries = np.concatenate([keys[::37], rng.integers(-2, 3, size=(9, 6)).astype(np.float16)])
    for k in (1, 17, 300):
        index = TorchIndex(torch.from_numpy(keys), device="cpu", chunk_rows=97, query_batch=11, group=group,
                           half=half, margin=4)
        d, i = index.search(torch.from_numpy(queries).float(), k)
        assert_same_neighbours(keys, queries, k, d, i)


@pytest.mark.parametrize("n, k", [(40, 40), (40, 39), (40, 37), (5, 5), (33, 1)])
def test_k_close_to_the_number_of_keys(n, k):
    """k = n returns every key once; a group larger than the whole key set; fewer groups than k."""
    rng = np.random.default_rng(n + k)
    keys = rng.standard_normal((n, 5)).astype(np.float32)
    queries = rng.standard_normal((7, 5)).astype(np.float32)
    for group, chunk in ((16, None), (4, 12), (64, 8)):
        index = TorchIndex(torch.from_numpy(keys), device="cpu", group=group, chunk_rows=chunk)
        d, i = index.search(torch.from_numpy(queries), k)
        assert_same_neighbours(keys, queries, k, d, i)
        if k == n:
            assert all(sorted(row) == list(range(n)) for row in i.tolist())


def test_datastore_keys_streamed_in_blocks_equal_brute_force(tiny_datastore):
    """Keys read block by block from the memory-mapped shards (not resident), blocks across shard ends."""
    ds = Datastore.open(tiny_datastore)
    keys = ds.keys()
    queries = keys[5::211]
    index = TorchIndex(ds, device="cpu", chunk_rows=333, group=5, resident=False)
    assert index._keys is None
    d, i = index.search(torch.from_numpy(queries).float(), 50)
    assert_same_neighbours(keys, queries, 50, d, i)


def test_memory_cap_from_the_environment(monkeypatch):
    from memdec.pipeline.search import MAX_MEMORY_ENV, _env_bytes

    monkeypatch.setenv(MAX_MEMORY_ENV, "1.5G")
    assert _env_bytes(MAX_MEMORY_ENV) == int(1.5 * (1 << 30))
    monkeypatch.setenv(MAX_MEMORY_ENV, "512M")
    assert TorchIndex(torch.zeros((10, 4)), device="cpu").max_memory == 512 << 20
    monkeypatch.setenv(MAX_MEMORY_ENV, "lots")
    with pytest.raises(ValueError, match="MEMDEC_SEARCH_MAX_MEMORY='lots': expected a byte count"):
        TorchIndex(torch.zeros((10, 4)), device="cpu")


def test_ivfpq_k_factor_reranks_more_candidates_and_raises_recall(tiny_datastore, tmp_path):
    """refine alone re-scores the k ids faiss found (same ids, same recall); k_factor F re-ranks F k candidates by
    exact distance: with every list probed and every key a candidate, the float64 brute force's neighbours."""
    ds = Datastore.open(shutil.copytree(tiny_datastore, tmp_path / "ds"))
    queries = torch.from_numpy(ds.keys(1000, 1100)).float()
    k = 10
    _, ref_i = brute_force(ds.keys(), queries.numpy(), k)
    ivf = build_index(ds, "faiss-ivfpq", nlist=16, m=8, nprobe=16, train_size=3000, progress=False)
    assert ivf.k_factor == 1
    _, i1 = ivf.search(queries, k)
    _, i0 = load_index(ivf.path, refine=False).search(queries, k)
    assert np.array_equal(np.sort(i1.numpy(), 1), np.sort(i0.numpy(), 1))  # refine: same ids
    recall = lambda i: np.mean([len(set(a) & set(b)) / k for a, b in zip(i.numpy(), ref_i, strict=True)])  # noqa: E731
    assert recall(i1) < 1.0
    every = build_index(ds, "faiss-ivfpq", out=tmp_path / "ivf-all", nlist=16, m=8, nprobe=16, train_size=3000,
                        k_factor=-(-ds.n // k), progress=False)
    assert json.loads((every.path / "manifest.json").read_text())["params"]["k_factor"] == -(-ds.n // k)
    d, i = load_index(every.path).search(queries, k)  # the saved k_factor is used
    assert recall(i) == 1.0
    np.testing.assert_allclose(d.numpy(), exact_distances(queries, i, ds).numpy(), rtol=1e-6)
    assert load_index(every.path, refine=False).k_factor == 1  # without refine there is nothing to re-rank
    for bad, match in ((0, "k_factor \\(--k-factor\\) must be an integer >= 1, got 0"), (2.5, "got 2.5"),
                       (True, "got True")):
        with pytest.raises(ValueError, match=match):
            build_index(ds, "faiss-ivfpq", out=tmp_path / "bad", k_factor=bad, progress=False)
    with pytest.raises(ValueError, match="k_factor = 4: only for faiss-ivfpq \\(the faiss-flat search is exact\\)"):
        build_index(ds, "faiss-flat", out=tmp_path / "bad", k_factor=4, progress=False)
    assert not (tmp_path / "bad").exists()
