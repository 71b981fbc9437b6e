"""memdec pipeline (stages skipped when complete, config errors) and memdec demo end to end (small settings)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from memdec.cli import main
from memdec.pipeline.run import run_pipeline


@pytest.fixture
def config(tiny, tmp_path) -> dict:
    return {
        "output": str(tmp_path / "run"),
        "corpus": {"path": str(Path(__file__).parent / "data" / "domain.jsonl"), "max_docs": 6},
        "base_model": tiny["base"],
        "datastore": {"window": 32, "batch_size": 4},
        "index": {"backend": "torch"},
        "targets": {"k": 8, "temperature": 4.0},
        "train": {"init": tiny["memory"], "beta": 0.5, "steps": 3, "batch_size": 2, "window": 32},
    }


def test_pipeline_runs_each_stage_once(config, tmp_path, capsys):
    first = run_pipeline(config, progress=False)
    assert first["ran"] == ["datastore", "index", "targets", "train"] and first["skipped"] == []
    # targets where `memdec targets` writes them, so `memdec train --datastore` finds them
    from memdec.pipeline.train import find_targets

    ds = Path(first["paths"]["datastore"])
    assert Path(first["paths"]["targets"]) == ds / "targets-k8-t4" == find_targets(ds)
    out = Path(first["paths"]["train"])
    meta = json.loads((out / "memdec.json").read_text())
    assert meta["datastore"]["path"] == first["paths"]["datastore"] and meta["training"]["steps"] == 3
    stamp = (out / "model.safetensors").stat().st_mtime_ns

    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["pipeline", str(path)]) == 0
    assert capsys.readouterr().out.count("complete, skipped") == 4
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

    # a removed output is rebuilt, and only it
    import shutil

    shutil.rmtree(first["paths"]["targets"])
    shutil.rmtree(out)
    again = run_pipeline(config, progress=False)
    assert again["ran"] == ["targets", "train"] and again["skipped"] == ["datastore", "index"]

    # a rebuilt stage makes every later output stale: the complete Memory Decoder is trained again
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    shutil.rmtree(first["paths"]["targets"])
    third = run_pipeline(config, progress=False)
    assert third["ran"] == ["targets", "train"] and third["skipped"] == ["datastore", "index"]
    assert (out / "model.safetensors").stat().st_mtime_ns != stamp
    assert "train: targets was rebuilt, replacing it" in capsys.readouterr().out

    # an output of memdec <= 0.1 (targets in OUT/targets) is still complete, and train finds its targets
    shutil.move(ds / "targets-k8-t4", Path(config["output"]) / "targets")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    old = run_pipeline(config, progress=False)
    assert old["ran"] == [] and old["paths"]["targets"] == str(Path(config["output"]) / "targets")
    assert find_targets(ds) == Path(config["output"]) / "targets"
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("text, message", [
    ("output: x\n", "missing the 'corpus' section"),
    ("output: x\ncorpus: c\nbase_model: b\ntrain: {init: m}\nstuff: 1\n", "unknown section(s) stuff"),
    ("output: x\ncorpus: c\nbase_model: b\ntrain: {beta: 0.5}\n", "section 'train' needs 'init'"),
    ("output: [x\n", "not valid YAML"),
    ("- just a list\n", "expected a mapping of sections"),
    ("output: x\ncorpus: c\nbase_model: b\ntrain: {init: m, stpes: 3}\n", "section 'train': key 'stpes' is unknown"),
    ("output: x\ncorpus: c\nbase_model: b\ntrain: {init: m}\ndatastore: {out: y}\n", "key 'out' is set by the pipeline"),
    ("output: x\ncorpus: c\nbase_model: b\ntrain: {init: m}\ntargets: {k: 4, temprature: 2}\n",
     "section 'targets': key 'temprature' is unknown"),
])
def test_pipeline_config_errors_are_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["pipeline", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(path) in err and "\n" not in err


def test_pipeline_missing_config_file(tmp_path, capsys):
    assert main(["pipeline", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err


def test_demo_end_to_end_matches_direct_scoring(tmp_path, capsys):
    """A small demo: lm-eval's perplexities equal memdec.inference.scoring's, mixed by hand; a rerun skips every step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memdec.demo import DemoSettings, _texts, run_demo
    from memdec.inference.scoring import token_logprobs
    from memdec.pipeline.data import tokenize

    s = DemoSettings(vocab_size=300, window=32, eval_stride=16, base_layers=1, base_hidden=32, base_heads=2,
                     base_steps=6, memory_layers=1, memory_hidden=16, memory_heads=2, memory_steps=6, k=8,
                     lmbda=0.4, max_docs=2)
    result = run_demo(tmp_path / "demo", s, progress=False)
    base_row, memory_row, mixed_row = result["rows"]
    assert mixed_row["lm_eval_model"] == "memdec" and mixed_row["model_args"]["lmbda"] == 0.4
    assert "| base " in (tmp_path / "demo" / "results.md").read_text()

    tok = AutoTokenizer.from_pretrained(result["paths"]["base"])
    ids = tokenize(_texts("domain_test", 2), tok, progress=False)
    lp = {name: token_logprobs(AutoModelForCausalLM.from_pretrained(result["paths"][name]), ids, 32, 16)
          for name in ("base", "memory")}
    mixed = np.logaddexp(math.log(0.4) + lp["memory"], math.log(0.6) + lp["base"])
    for row, want in [(base_row, lp["base"]), (memory_row, lp["memory"]), (mixed_row, mixed)]:
        assert row["token_perplexity"] == pytest.approx(math.exp(-want.mean()), rel=1e-4), row["model"]

    capsys.readouterr()
    again = run_demo(tmp_path / "demo", s, progress=False)
    printed = capsys.readouterr().out
    assert printed.count("complete, skipped") == 10  # 3 demo steps + 4 pipeline stages + 3 evaluations
    assert again["rows"] == result["rows"]
