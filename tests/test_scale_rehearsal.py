"""benchmarks/scale_rehearsal.py: the projection arithmetic, a --small run on CPU, one-line input errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scale_rehearsal.py"
CORPUS = ROOT / "memdec" / "data" / "general.jsonl"


def _module():
    spec = importlib.util.spec_from_file_location("scale_rehearsal", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["scale_rehearsal"] = mod
    spec.loader.exec_module(mod)
    return mod


sr = _module()


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


# ------------------------------------------------------------------------------------ arithmetic


def test_linear_stage_scales_with_tokens_and_divides_over_gpus():
    cost = sr.StageCost("datastore", "linear", tokens=1e6, parallel_s=10.0)
    assert sr.project_seconds(cost, 103e6, 1) == pytest.approx(1030.0)
    assert sr.project_seconds(cost, 103e6, 8) == pytest.approx(1030.0 / 8)  # 128.75 s
    assert sr.project_seconds(cost, 1e9, 1) == pytest.approx(10_000.0)


def test_serial_and_fixed_parts_do_not_divide():
    # 2 s of tokenizing (grows with tokens, every GPU whole) + 8 s divisible + 5 s fixed (compile)
    cost = sr.StageCost("x", "linear", tokens=1e6, parallel_s=8.0, serial_s=2.0, fixed_s=5.0)
    assert sr.project_seconds(cost, 1e6, 1) == pytest.approx(15.0)
    assert sr.project_seconds(cost, 10e6, 8) == pytest.approx(5.0 + 20.0 + 80.0 / 8)


def test_quadratic_stage_scales_with_queries_times_keys():
    full = sr.StageCost("targets", "quadratic", tokens=15e6, parallel_s=100.0)  # all 15 M rows measured
    assert sr.project_seconds(full, 103e6, 1) == pytest.approx(100.0 * (103 / 15) ** 2)
    assert sr.project_seconds(full, 103e6, 8) == pytest.approx(100.0 * (103 / 15) ** 2 / 8)
    # a sample: 1 M queries against 15 M keys in 100 s -> all 15 M rows 1500 s; 103 M rows x keys:
    sample = sr.StageCost("targets", "quadratic", tokens=15e6, parallel_s=100.0, queries=1e6, serial_s=30.0)
    assert sr.project_seconds(sample, 15e6, 1) == pytest.approx(30.0 + 1500.0)
    assert sr.project_seconds(sample, 103e6, 1) == pytest.approx(30.0 * 103 / 15 + 100.0 * 103 * 103 / 15)
    with pytest.raises(ValueError):
        sr.project_seconds(sr.StageCost("x", "cubic", 1.0, 1.0), 2.0)


def test_projection_rows_dominant_stage_and_ivfpq():
    costs = {"datastore": sr.StageCost("datastore", "linear", 1e6, 10.0),
             "targets": sr.StageCost("targets", "quadratic", 1e6, 5.0),
             "train": sr.StageCost("train", "linear", 1e6, 20.0)}
    rows = sr.projection(costs, [1e6, 103e6], [1, 8], key_dim=768,
                         limits={"gpu_memory": 141e9, "host_memory": 128e9, "disk": 60e9})
    assert [(r["tokens"], r["gpus"]) for r in rows] == [(1e6, 1), (1e6, 8), (103e6, 1), (103e6, 8)]
    first, big = rows[0], rows[3]
    assert first["dominant_exact"] == "train" and first["total_exact_s"] == pytest.approx(35.0)
    assert big["targets_exact_s"] == pytest.approx(5.0 * 103**2 / 8)
    assert big["dominant_exact"] == "targets"
    assert big["targets_ivfpq_s"] is None and big["dominant_ivfpq"] is None  # no --ivfpq-qps: not measured
    assert big["keys_bytes"] == pytest.approx(103e6 * 768 * 2)
    assert any("40%" in n for n in big["notes"]) and any("disk" in n for n in big["notes"])
    ivf = sr.projection(costs, [103e6], [8], ivfpq_qps=10_000.0)[0]
    assert ivf["targets_ivfpq_s"] == pytest.approx(103e6 / 10_000 / 8)
    assert ivf["dominant_ivfpq"] == "targets"  # 1287.5 s against 257.5 s of training
    assert ivf["total_ivfpq_s"] == pytest.approx(ivf["datastore_s"] + ivf["targets_ivfpq_s"] + ivf["train_epoch_s"])


def test_train_rate_skips_warmup_and_outliers():
    t0 = 0.0
    ends = [10.0, 11.0, 12.0, 13.0, 23.0, 24.0, 25.0, 26.0, 27.0, 28.0]  # compile in step 1, a recompile in step 5
    rate = sr.train_rate(t0, ends, [100] * 10, wall=30.0)
    assert rate["warmup_steps"] == 2 and rate["outlier_steps"] == 1
    assert rate["rate"] == pytest.approx(100.0)  # 7 steps of 1 s
    assert rate["fixed_seconds"] == pytest.approx(30.0 - 10.0)


def test_sample_blocks_spread_without_overlap():
    blocks = sr.sample_blocks(100, 30, 8)
    assert sum(b - a for a, b in blocks) == 30 and all(b - a <= 8 for a, b in blocks)
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(blocks, blocks[1:], strict=False))
    assert blocks[0][0] == 0 and blocks[-1][1] == 100
    assert sr.sample_blocks(10, 10, 4) == [(0, 4), (4, 7), (7, 10)]


def test_cap_documents_fills_the_cap_exactly(gpt2_style):
    from transformers import AutoTokenizer

    from memdec.pipeline.data import tokenize

    tok = AutoTokenizer.from_pretrained(gpt2_style["tok"])
    texts = [json.loads(line)["text"] for line in CORPUS.read_text(encoding="utf-8").splitlines()[:20]]
    lengths = sr.doc_lengths(texts, tok)
    for cap in (50, 1000, 3333):
        docs, n = sr.cap_documents(texts, lengths, cap, tok)
        assert n == len(tokenize(docs, tok, progress=False)) <= cap
        assert n >= cap - 2  # the last document is cut to fill it
    docs, n = sr.cap_documents(texts, lengths, None, tok)
    assert docs == texts and n == sum(lengths) + len(texts) - 1


# ------------------------------------------------------------------------------------ end to end


def test_small_run_on_cpu(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--small", "--corpus", str(CORPUS), "--device", "cpu", "--out", str(out), "--work", str(work),
            "--ivfpq-qps", "5000"]
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "scale_rehearsal.json").read_text())
    assert result["complete"] is True
    stages = result["stages"]
    for name in ("tokenizer", "models", "corpus", "datastore", "targets-sample", "trainset-datastore",
                 "trainset-targets", "train"):
        assert stages[name]["seconds"] > 0, name
    assert stages["corpus"]["n_tokens"] == 4000 and stages["datastore"]["rows"] == 3999
    assert stages["targets-sample"]["queries"] == 1000 and stages["targets-sample"]["keys"] == 3999
    assert stages["train"]["steps"] == 6 and stages["train"]["rate"] > 0
    kinds = {(r["stage"], r["kind"]) for r in result["table"]}
    assert ("targets: sample", "measured") in kinds and ("targets: all rows", "projected") in kinds
    assert ("train: one epoch", "projected") in kinds
    rows = result["projection"]["rows"]
    assert [(r["tokens"], r["gpus"]) for r in rows] == [(4000, 1), (4000, 8), (103e6, 1), (103e6, 8),
                                                        (1e9, 1), (1e9, 8)]
    for r in rows:
        assert r["dominant_exact"] in ("datastore", "targets", "train")
        assert r["targets_ivfpq_s"] == pytest.approx(r["tokens"] / 5000 / r["gpus"])
    md = (out / "scale_rehearsal.md").read_text()
    assert "CPU rehearsal" in md and "| 103 M | 8 |" in md and "## Projection" in md
    assert result["environment"]["torch"] and result["command"].startswith("python benchmarks/scale_rehearsal.py")

    again = _run(*args)  # resumable: every stage is skipped, the earlier timings are kept
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done in an earlier run") == 8
    assert json.loads((out / "scale_rehearsal.json").read_text())["stages"] == stages


def test_small_run_all_rows(tmp_path):
    out = tmp_path / "out"
    proc = _run("--small", "--corpus", str(CORPUS), "--device", "cpu", "--out", str(out), "--work",
                str(tmp_path / "work"), "--query-sample", "all", "--max-tokens", "1500", "--train-steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "scale_rehearsal.json").read_text())
    assert result["stages"]["targets"]["queries"] == 1499 and "targets-sample" not in result["stages"]
    assert result["projection"]["rows"][0]["tokens"] == 1500


def test_killed_run_resumes(tmp_path):
    args = ["--small", "--corpus", str(CORPUS), "--device", "cpu", "--out", str(tmp_path / "out"), "--work",
            str(tmp_path / "work"), "--query-sample", "all", "--max-tokens", "1500", "--train-steps", "3"]
    env = {**os.environ, "MEMDEC_TEST_KILL_AFTER": "1"}  # SIGKILL once the datastore wrote its first shard
    killed = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                            env={**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}, cwd=ROOT)
    assert killed.returncode != 0 and (tmp_path / "work" / "full" / "datastore.partial").is_dir()
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done in an earlier run") == 3  # tokenizer, models, corpus
    stages = json.loads((tmp_path / "out" / "scale_rehearsal.json").read_text())["stages"]
    assert stages["datastore"]["resumed"] is True and stages["targets"]["resumed"] is False


@pytest.mark.parametrize("extra, message", [
    (["--corpus", "/no/such/corpus.jsonl"], "no such file"),
    (["--corpus", str(CORPUS), "--max-tokens", "40"], "smaller than one window"),
    (["--corpus", str(CORPUS), "--query-sample", "5000"], "--query-sample 5000"),
    (["--corpus", str(CORPUS), "--device", "tpu9"], "--device tpu9"),
    (["--corpus", str(CORPUS), "--max-tokens", "lots"], "--max-tokens"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, extra, message):
    out = tmp_path / "out"
    proc = _run("--small", "--out", str(out), "--work", str(tmp_path / "work"), *extra, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scale_rehearsal.py: error:") and message in lines[0], proc.stderr
    assert not out.exists() and not (tmp_path / "work").exists()


def test_work_with_other_settings_is_refused(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "rehearsal.json").write_text(json.dumps({"settings": {"k": 3}, "stages": {}}))
    proc = _run("--small", "--corpus", str(CORPUS), "--out", str(tmp_path / "out"), "--work", str(work),
                timeout=120)
    assert proc.returncode == 2 and "other settings" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
