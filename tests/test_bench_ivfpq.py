"""benchmarks/bench_pipeline.py's IVF-PQ section: its helpers against hand-computed values, one tiny CPU run,
and one-line errors for bad --ivfpq-* values (checked before any work)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("faiss")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_pipeline.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_pipeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recall_counts_the_shared_ids_per_query(bench):
    found = torch.tensor([[1, 2, 3, 4], [5, 6, -1, -1], [9, 8, 7, 6]])
    exact = torch.tensor([[2, 4, 9, 10], [5, 7, 8, -1], [6, 7, 8, 9]])
    # {2, 4} of 4; {5} of the 3 valid (a -1 in both is no match); all 4, in another order
    assert bench.recall(found, exact).tolist() == pytest.approx([0.5, 1 / 3, 1.0])
    assert bench.recall(torch.full((1, 3), -1), torch.full((1, 3), -1)).tolist() == [0.0]


def test_without_self_drops_the_own_row_else_the_farthest(bench):
    ids = torch.tensor([[7, 3, 5], [1, 2, 4], [3, 8, 6]])
    assert bench.without_self(ids, torch.tensor([3, 9, 6])).tolist() == [[7, 5], [1, 2], [3, 8]]
    _, d = bench.without_self(ids, torch.tensor([3, 9, 6]), ids * 10.0)  # other tensors cut the same way
    assert d.tolist() == [[70.0, 50.0], [10.0, 20.0], [30.0, 80.0]]


def test_total_variation_of_hand_computed_distributions(bench):
    # row 0: p = (.5, .3, .2), q = (.2, .3, .5) over tokens 0, 1, 2: TV = (.3 + 0 + .3) / 2 = .3
    # row 1: p = {1: .6, 4: .4}, q = {4: .1, 7: .9}: TV = (.6 + .3 + .9) / 2 = .9
    p = (torch.tensor([3, 2]), torch.tensor([0, 1, 2, 1, 4]), torch.tensor([.5, .3, .2, .6, .4]).half())
    q = (torch.tensor([3, 2]), torch.tensor([0, 1, 2, 4, 7]), torch.tensor([.2, .3, .5, .1, .9]).half())
    assert bench.total_variation(p, q, 8).tolist() == pytest.approx([0.3, 0.9], abs=1e-3)
    assert bench.total_variation(p, p, 8).tolist() == [0.0, 0.0]
    dense = bench.csr_dense(*p, 8)
    assert dense.shape == (2, 8) and dense.sum(1).tolist() == pytest.approx([1.0, 1.0], abs=1e-3)


def test_clustered_keys_and_zipf_tokens(bench):
    keys = bench.clustered_keys(500, 8, 4, torch.device("cpu"))
    assert keys.shape == (500, 8) and keys.dtype == torch.float16 and torch.isfinite(keys).all()
    assert torch.equal(keys, bench.clustered_keys(500, 8, 4, torch.device("cpu")))  # seeded
    tok = bench.zipf_tokens(20000, 50)
    counts = torch.bincount(torch.from_numpy(tok).long(), minlength=50)
    assert tok.min() >= 0 and tok.max() < 50 and counts.argmax() == 0 and counts[0] > 2 * counts[10]


def test_small_cpu_run_all_lists_and_full_rerank_is_exact(bench, tmp_path):
    out = tmp_path / "bench"
    argv = ["--device", "cpu", "--small", "--skip", "datastore", "targets", "train", "--out", str(out),
            "--ivfpq", "2000x16", "--ivfpq-nlist", "8", "--ivfpq-m", "4", "--ivfpq-nprobe", "1,8", "--k", "8",
            "--ivfpq-queries", "128", "--ivfpq-query-batch", "64", "--ivfpq-rerank", "1,300"]
    assert bench.main(argv) == 0
    res = json.loads((out / "bench_pipeline.json").read_text())["ivfpq"]
    assert res["nlist"] == 8 and res["m"] == 4 and res["faiss_on"] == "cpu" and res["faiss"]
    rows = {(r["nprobe"], r["refine"], r["candidates"]): r for r in res["rows"]}
    assert set(rows) == {(None, None, 9)} | {(p, f, c) for p in (1, 8) for f, c in
                                            ((False, 9), (True, 9), (True, 2000))}
    # every list probed and every key re-ranked exactly: the exact neighbours and distributions
    assert rows[8, True, 2000]["recall"] == 1.0 and rows[8, True, 2000]["mean_tv"] < 1e-3
    for p in (1, 8):  # memdec's refine re-scores the ids found: the same ids, so the same recall
        assert rows[p, True, 9]["recall"] == rows[p, False, 9]["recall"] <= 1.0
        assert 0.0 <= rows[p, True, 9]["mean_tv"] <= 1.0 and rows[p, True, 9]["queries_per_s"] > 0
    assert res["build_s"] > 0 and res["threads"]["faiss_omp"] >= 1
    table = (out / "bench_pipeline.md").read_text()
    assert "## IVF-PQ against exact search (2,000 x 16" in table and "| faiss-ivfpq | 8 | 2,000 |" in table


@pytest.mark.parametrize("extra, words", [
    (["--ivfpq-m", "5"], "--ivfpq-m 5: must divide the key dimension 16"),
    (["--ivfpq-nlist", "8", "--ivfpq-nprobe", "4,16"], "--ivfpq-nprobe 16: more than --ivfpq-nlist 8"),
    (["--ivfpq-nprobe", "8,x"], "--ivfpq-nprobe '8,x': expected comma-separated integers"),
    (["--ivfpq-train-rows", "100"], "--ivfpq-train-rows 100: IVF-PQ training needs at least 256 keys"),
])
def test_bad_option_values_are_one_line_errors_before_work(bench, tmp_path, capsys, extra, words):
    out = tmp_path / "bench"
    argv = ["--device", "cpu", "--small", "--out", str(out), "--ivfpq", "2000x16", *extra]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bench_pipeline.py: error: {words}") and "\n" not in err, err
    assert not out.exists()  # nothing run, nothing written


def test_bad_shape_is_a_one_line_error(bench, tmp_path, capsys):
    assert bench.main(["--device", "cpu", "--small", "--out", str(tmp_path / "b"), "--ivfpq", "1e7"]) == 2
    assert capsys.readouterr().err.strip() == ("bench_pipeline.py: error: --ivfpq '1e7': expected one NxD shape "
                                               "such as 1e7x768")
