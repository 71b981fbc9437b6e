"""kNN targets: equal a dense float64 computation, exclude the query's own row, sum to 1, resume after SIGKILL."""

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

from memdec.core.formats import FormatError
from memdec.pipeline.datastore import Datastore, build_datastore
from memdec.pipeline.targets import Targets, build_targets, knn_distribution


@pytest.fixture(scope="module")
def small_ds(tiny, texts, tmp_path_factory) -> Datastore:
    """A datastore of ~1.5k rows: small enough for a dense n x n float64 reference."""
    out = tmp_path_factory.mktemp("small") / "ds"
    build_datastore(tiny["base"], texts["general"][:1], out, window=32, shard_rows=400, device="cpu", progress=False)
    return Datastore.open(out)


def dense(t: Targets, vocab: int) -> np.ndarray:
    offsets, ids, probs = t.rows(0, t.n_rows)
    out = np.zeros((t.n_rows, vocab))
    rows = np.repeat(np.arange(t.n_rows), np.diff(offsets))
    out[rows, ids] = probs.astype(np.float64)
    return out


def reference(ds: Datastore, k: int, temperature: float, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense kNN-LM distributions in float64: all pairwise distances, own row excluded, k nearest.

    Equal distances are ordered by row id (as memdec.pipeline.search does). Also returns a mask of rows whose
    k-th and (k+1)-th distances nearly tie (0 < gap <= 1e-6 relative), where float32 and float64 may
    pick different neighbours.
    """
    keys = ds.keys().astype(np.float64)
    d = np.concatenate([((keys[a : a + 100, None, :] - keys[None, :, :]) ** 2).sum(-1) for a in range(0, ds.n, 100)])
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")
    nn = order[:, :k]
    edge = np.take_along_axis(d, order[:, k - 1 : k + 1], 1)
    gap = edge[:, 1] - edge[:, 0]
    tie = (gap > 0) & (gap <= 1e-6 * edge[:, 1])
    logits = -np.take_along_axis(d, nn, 1) / temperature
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    out = np.zeros((ds.n, vocab))
    np.add.at(out, (np.repeat(np.arange(ds.n), k), ds.values[nn].reshape(-1)), p.reshape(-1))
    return out, tie


@pytest.mark.parametrize("k, temperature", [(24, 16.0), (5, 2.0)])
def test_targets_equal_dense_float64_reference(small_ds, tmp_path, k, temperature):
    out = build_targets(small_ds, tmp_path / "t", k=k, temperature=temperature, chunk_rows=500, batch_size=128,
                        device="cpu", progress=False)
    t = Targets.open(out)
    assert (t.n_rows, t.k, t.temperature) == (small_ds.n, k, temperature)
    assert t.manifest["datastore"]["tokenizer_fingerprint"] == small_ds.manifest["tokenizer_fingerprint"]
    vocab = int(small_ds.values.max()) + 1
    got, (ref, tie) = dense(t, vocab), reference(small_ds, k, temperature, vocab)
    assert tie.mean() < 0.01
    np.testing.assert_allclose(got[~tie], ref[~tie], atol=1.5e-3)
    # every row sums to 1 after the float16 cast, and holds only stored values, ascending, with p > 0
    offsets, ids, probs = t.rows(0, t.n_rows)
    sums = np.add.reduceat(probs.astype(np.float64), offsets[:-1])
    # off by at most half a float16 step at the largest entry (when no entry can absorb the rest)
    assert np.abs(sums - 1).max() <= 2.0**-12 and np.mean(np.abs(sums - 1) < 1e-6) > 0.9
    assert np.isin(ids, small_ds.values).all() and (probs > 0).all()
    assert all(np.all(np.diff(ids[a:b]) > 0) for a, b in zip(offsets[:-1], offsets[1:], strict=True))
    # a row slice is the same CSR, rebased
    o2, i2, p2 = t.rows(100, 140)
    assert o2[0] == 0 and np.array_equal(o2, offsets[100:141] - offsets[100])
    assert np.array_equal(i2, ids[offsets[100] : offsets[140]]) and np.array_equal(p2, probs[offsets[100] : offsets[140]])
    t.check_datastore(small_ds)


def test_every_other_row_as_neighbour_equals_dense_reference(tiny, texts, tmp_path):
    """k = n - 1: the search returns all n keys (k + 1 = n) and every other row is a neighbour."""
    ds = Datastore.open(build_datastore(tiny["base"], [texts["general"][0][:300]], tmp_path / "ds", window=32,
                                        shard_rows=40, device="cpu", progress=False))
    assert 20 < ds.n < 400
    k = ds.n - 1
    t = Targets.open(build_targets(ds, tmp_path / "t", k=k, temperature=4.0, device="cpu", progress=False))
    vocab = int(ds.values.max()) + 1
    ref, _ = reference(ds, k, 4.0, vocab)
    np.testing.assert_allclose(dense(t, vocab), ref, atol=1.5e-3)
    with pytest.raises(ValueError, match=f"k = {ds.n}: datastore .* has {ds.n} rows, so at most {k} neighbours"):
        build_targets(ds, tmp_path / "t2", k=ds.n, device="cpu", progress=False)


def test_own_row_is_dropped_wherever_it_appears():
    values = torch.tensor([0, 10, 11, 10, 12, 13, 14, 15], dtype=torch.int32)
    dist = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    ids = torch.tensor([[1, 3, 2, 4], [1, 3, 2, 4], [1, 3, 2, 4]])
    # query 3 is second (a tie at distance 0 put row 1 first); query 4 is last; query 7 is absent
    counts, tok, probs = knn_distribution(dist, ids, torch.tensor([3, 4, 7]), values, k=3, temperature=2.0)

    def soft(d):
        e = np.exp(-np.asarray(d) / 2.0)
        return e / e.sum()

    rows = np.split(np.arange(len(tok)), np.cumsum(counts.numpy())[:-1])
    expect = [
        {10: soft([0, 2, 3])[0], 11: soft([0, 2, 3])[1], 12: soft([0, 2, 3])[2]},  # rows 1, 2, 4
        {10: sum(soft([0, 1, 2])[[0, 1]]), 11: soft([0, 1, 2])[2]},  # rows 1, 3, 2: token 10 twice
        {10: sum(soft([0, 1, 2])[[0, 1]]), 11: soft([0, 1, 2])[2]},  # farthest (row 4) dropped
    ]
    for r, want in zip(rows, expect, strict=True):
        got = dict(zip(tok[r].tolist(), probs[r].double().tolist(), strict=True))
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[x] for x in want], list(want.values()), atol=1e-3)


def test_faiss_flat_backend_matches_torch(small_ds, tmp_path):
    ds = Datastore.open(shutil.copytree(small_ds.path, tmp_path / "ds"))
    a = Targets.open(build_targets(ds, k=16, device="cpu", progress=False))
    b = Targets.open(build_targets(ds, k=16, backend="faiss-flat", out=tmp_path / "flat", progress=False))
    assert a.path == ds.path / "targets-k16-t16" and (ds.path / "index-faiss-flat" / "index.faiss").exists()
    vocab = int(ds.values.max()) + 1
    da, db = dense(a, vocab), dense(b, vocab)
    same = np.abs(da - db).max(1) <= 2e-3  # faiss orders exact ties at the k-th neighbour its own way
    assert same.mean() > 0.98


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.suffix == ".npy"}


def test_sigkill_resumes_to_identical_output(tiny_datastore, tmp_path):
    args = {"k": 8, "temperature": 16.0, "chunk_rows": 1500, "batch_size": 500, "device": "cpu", "progress": False}
    out = tmp_path / "killed"
    code = f"from memdec.pipeline.targets import build_targets; build_targets({tiny_datastore!r}, {str(out)!r}, **{args!r})"
    env = {**os.environ, "MEMDEC_TEST_KILL_AFTER": "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = Path(str(out) + ".partial")
    assert not out.exists() and (partial / "part_00001.counts.npy").exists()
    assert not (partial / "part_00002.counts.npy").exists()
    build_targets(tiny_datastore, out, **args)
    whole = build_targets(tiny_datastore, tmp_path / "whole", **args)
    assert not partial.exists() and sorted(_files(out)) == ["ids.npy", "offsets.npy", "probs.npy"]
    assert _files(out) == _files(whole)
    strip = [{k: v for k, v in json.loads((p / "manifest.json").read_text()).items() if k != "created"}
             for p in (out, whole)]
    assert strip[0] == strip[1]


def test_bad_settings_and_damaged_files(small_ds, tmp_path):
    with pytest.raises(ValueError, match=rf"k = {small_ds.n}: datastore .* has {small_ds.n} rows, so at most "
                                         rf"{small_ds.n - 1} neighbours"):
        build_targets(small_ds, tmp_path / "x", k=small_ds.n, progress=False)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        build_targets(small_ds, tmp_path / "x", k=4, temperature=0, progress=False)
    with pytest.raises(ValueError, match="backend 'faiss-hnsw': use one of torch, faiss-flat, faiss-ivfpq"):
        build_targets(small_ds, tmp_path / "x", k=4, backend="faiss-hnsw", progress=False)
    assert not any(tmp_path.iterdir())

    good = build_targets(small_ds, tmp_path / "t", k=4, device="cpu", progress=False)
    trunc = shutil.copytree(good, tmp_path / "trunc")
    data = (trunc / "probs.npy").read_bytes()
    (trunc / "probs.npy").write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match="probs.npy: unreadable or truncated"):
        Targets.open(trunc)
    bad = shutil.copytree(good, tmp_path / "bad")
    m = json.loads((bad / "manifest.json").read_text())
    m["nnz"] += 3
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match="offsets.npy: not a valid CSR offset array"):
        Targets.open(bad)
    with pytest.raises(FormatError, match="not complete"):
        (tmp_path / "half.partial").mkdir()
        Targets.open(tmp_path / "half")


def test_two_processes_give_the_same_files_as_one(tiny, texts, tmp_path):
    """torchrun with 2 CPU processes (gloo): shards/chunks split across processes, identical files."""
    docs = tmp_path / "docs.json"
    docs.write_text(json.dumps(texts["domain"][:8]))
    ds_args = {"window": 64, "stride": 48, "batch_size": 3, "shard_rows": 700, "device": "cpu", "progress": False}
    t_args = {"k": 6, "chunk_rows": 600, "device": "cpu", "progress": False}
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys\nfrom memdec.pipeline.datastore import build_datastore\nfrom memdec.pipeline.targets import build_targets\n"
        f"out = sys.argv[1]\ndocs = json.load(open({str(docs)!r}))\n"
        f"ds = build_datastore({tiny['base']!r}, docs, out + '/ds', **{ds_args!r})\n"
        f"build_targets(ds, out + '/t', **{t_args!r})\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run([*cmd, str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp_path / "one"
    ds = build_datastore(tiny["base"], texts["domain"][:8], one / "ds", **ds_args)
    build_targets(ds, one / "t", **t_args)
    assert len(json.loads((one / "ds" / "manifest.json").read_text())["shards"]) >= 3
    for sub in ("ds", "t"):
        assert _files(tmp_path / "two" / sub) == _files(one / sub)
        assert not Path(str(tmp_path / "two" / sub) + ".partial").exists()


def test_targets_cli(small_ds, tmp_path, capsys):
    from memdec.cli import main

    ds = shutil.copytree(small_ds.path, tmp_path / "ds")
    assert main(["targets", "--datastore", str(ds), "--k", "4", "--temperature", "8", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == str(ds / "targets-k4-t8")
    assert Targets.open(ds / "targets-k4-t8").k == 4
    assert main(["targets", "--datastore", str(ds), "--k", "4", "--temperature", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "targets-k4-t8: already exists" in err
