"""Smoke test of experiments/offline_reproduction/run.py at --small scale on CPU, on a tiny slice of corpora;
unit tests of its scheduler.py and of reports/claims.py (`memdec report --claims`).

Runs every stage for one domain with two base models and three methods (+MemDec, +kNN-LM, +MemDec (router))
plus the bases,
then checks the +MemDec perplexity against a direct float64 computation of the mixture, the resume
(a rerun skips every stage), the report and the bundle.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "experiments" / "offline_reproduction"
DATA = Path(__file__).parent / "data"


def _load_run():
    spec = importlib.util.spec_from_file_location("offline_reproduction_run", HERE / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _load_run()
from experiments.offline_reproduction import scheduler  # noqa: E402  (run.py put ROOT on sys.path)
from reports import claims  # noqa: E402


def _docs(name: str) -> list[str]:
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _write_gz(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> Path:
    """{general,finance}/{train,valid,test}.jsonl.gz cut from the test fixtures (documents split in halves)."""
    root = tmp_path_factory.mktemp("corpora")
    for name, source in (("general", "general.jsonl"), ("finance", "domain.jsonl")):
        docs = [half for d in _docs(source) for half in (d[: len(d) // 2], d[len(d) // 2 :]) if half.strip()]
        n = len(docs)
        _write_gz(root / name / "train.jsonl.gz", docs[: n - 4])
        _write_gz(root / name / "valid.jsonl.gz", docs[n - 4 : n - 2])
        _write_gz(root / name / "test.jsonl.gz", docs[n - 2 :])
    return root


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """config.yaml with two base models in its `small:` section and a one-point lmbda grid (0.5)."""
    cfg = yaml.safe_load((HERE / "config.yaml").read_text(encoding="utf-8"))
    small = cfg["small"]
    small["bases"] = {k: v for i, (k, v) in enumerate(small["bases"].items()) if i in (0, len(small["bases"]) - 1)}
    small["tune"] = {"grid": "0.5"}
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")  # bases: smallest first
    return path


@pytest.fixture(scope="module")
def done(tmp_path_factory, corpora, config) -> dict:
    root = tmp_path_factory.mktemp("repro")
    argv = ["--config", str(config), "--run", str(root / "run"), "--out", str(root / "out"), "--small",
            "--corpora", str(corpora), "--serial", "--domains", "finance", "--methods", "base", "memdec", "knnlm",
            "router", "rag", "dapt", "lora"]
    rc = run.main(argv)
    return {"rc": rc, "argv": argv, "run": root / "run", "out": root / "out", "config": config}


def test_parallel_workers_run_domain_and_finetune_jobs_side_by_side(tmp_path, corpora, config):
    """--parallel: worker processes (own logs, own compile caches); the fine-tuning job runs beside the domain's
    and may finish its learning-rate choice before the domain job has made RESULTS/DOMAIN (it did once)."""
    argv = ["--config", str(config), "--run", str(tmp_path / "run"), "--small", "--corpora", str(corpora),
            "--parallel", "--domains", "finance", "--methods", "base", "memdec", "dapt", "lora"]
    assert run.main(argv) == 0
    res = tmp_path / "run" / "results" / "finance"
    assert (res / "lr_dapt.json").exists() and (res / "lr_lora.json").exists()
    for base in ("base-10m", "base-100m"):
        for method in ("memdec", "dapt", "lora"):
            assert len(list(res.glob(f"{base}__{method}_*.json"))) == 1, (base, method)
    logs = sorted(p.name for p in (tmp_path / "run" / "logs").glob("*.log"))
    assert "finetune-finance.log" in logs and "domain-finance.log" in logs


def test_finetune_job_chooses_the_learning_rate_before_the_results_folder_exists(tmp_path, config, monkeypatch):
    """The fine-tuning job alone on a fresh run folder: grid on the largest base, lowest valid perplexity chosen
    (written even though no other job has made RESULTS/DOMAIN yet), then the other bases at it, then evaluations."""
    cfg = run.load_config(config, small=True)
    paths = run.Paths(tmp_path / "run", cfg)
    trained, evals = [], []

    def fake_finetune(cfg, paths, dom, method, base, lr):
        trained.append((method, base, lr))
        out = run._finetuned(paths, method, dom, base, lr)
        out.mkdir(parents=True)
        (out / "baseline.json").write_text("{}")

    monkeypatch.setattr(run, "finetune", fake_finetune)
    monkeypatch.setattr(run, "valid_perplexity", lambda cfg, paths, dom, method, base, lr, dev: 100.0 - 1e4 * lr)
    monkeypatch.setattr(run, "run_eval", lambda cfg, paths, group, name, *a: evals.append(name))
    run.job_finetune(cfg, paths, "finance", ("dapt",))
    grid = cfg["dapt"]["lr_grid"]
    assert trained == [("dapt", "base-100m", lr) for lr in grid] + [("dapt", "base-10m", max(grid))]
    assert json.loads(paths.lr_choice("finance", "dapt").read_text())["best_lr"] == max(grid)
    assert evals == ["base-10m__dapt", "base-100m__dapt"]


def _results(folder: Path, name: str) -> dict:
    (file,) = folder.glob(f"{name}_*.json")
    return json.loads(file.read_text(encoding="utf-8"))


def _direct_ppl(base: str, memory: str, lmbda: float, texts: list[str], window: int, stride: int) -> float:
    """Token perplexity of lmbda * p_mem + (1 - lmbda) * p_base over sliding windows, float64, by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memdec.pipeline.data import sliding_windows, tokenize

    tok = AutoTokenizer.from_pretrained(base)
    ids = torch.as_tensor(tokenize(texts, tok, progress=False), dtype=torch.long)
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float64).eval() for p in (base, memory)]
    total, count = 0.0, 0
    for w in sliding_windows(len(ids), window, stride):
        x = ids[w.start : w.end][None]
        with torch.no_grad():
            lp = [torch.log_softmax(m(x).logits[0, :, : len(tok)].double(), -1) for m in models]
        for p in range(w.score_start, w.end):  # position p is predicted from logits at p - 1
            t = int(ids[p])
            b, m = float(lp[0][p - 1 - w.start, t]), float(lp[1][p - 1 - w.start, t])
            total += math.log(lmbda * math.exp(m) + (1 - lmbda) * math.exp(b))
            count += 1
    return math.exp(-total / count)


def test_small_run_completes_and_memdec_matches_direct_mixture(done):
    assert done["rc"] == 0
    runs = done["run"]
    cfg = run.load_config(done["config"], small=True)
    bases = list(cfg["bases"])
    # every base alone on the domain and general tests; +MemDec and +kNN-LM for each base on finance
    for b in bases:
        res = _results(runs / "results" / "base", f"{b}__base")["results"]
        assert set(res) == {"memdec_finance_ppl", "memdec_general_ppl"}
        for m in ("memdec", "knnlm"):
            res = _results(runs / "results" / "finance", f"{b}__{m}")["results"]
            assert set(res) == {"memdec_finance_ppl", "memdec_general_ppl"}
    # lmbda came from tune-lambda on valid (grid of one point, 0.5) and reached the evaluation
    memory = runs / "domains" / "finance" / "memdec-finance"
    tuned = json.loads((runs / "results" / "finance" / "tune_lambda.json").read_text())
    assert tuned["best_lmbda"] == 0.5 == json.loads((memory / "memdec.json").read_text())["lmbda"]
    # the Memory Decoder starts from the smallest base and its datastore/targets come from the largest
    info = json.loads((memory / "memdec.json").read_text())
    assert info["training"]["init"].endswith(f"models/{bases[0]}")
    assert info["datastore"]["path"].endswith(f"datastore-finance-{bases[-1]}")
    # the reported +MemDec token perplexity equals a direct float64 mixture over the same windows
    test_docs = [json.loads(line)["text"] for line in (runs / "eval_data" / "memdec_finance_ppl.jsonl").open()]
    e = cfg["eval"]
    for b in bases:
        got = _results(runs / "results" / "finance", f"{b}__memdec")["results"]["memdec_finance_ppl"]
        want = _direct_ppl(str(runs / "models" / b), str(memory), 0.5, test_docs, e["window"], e["stride"])
        assert got["token_perplexity,none"] == pytest.approx(want, rel=1e-4)


def test_bundle_report_and_times(done):
    out, runs = done["out"], done["run"]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).stat().st_size < 16 << 20 for f in files)
    assert {"results.tar.gz", "report.md", "report.csv", "results.md", "times.json", "logs.tar.gz"} <= set(files)
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    n_json = len(list((runs / "results").rglob("*.json")))
    # bases; memdec, knnlm, router, rag, dapt, lora per base; RAG at the paper's stride per base and the copy check;
    # tune-lambda, tune-knnlm per base, the DAPT and LoRA learning-rate choices, the case study, the RAG check,
    # the copy ability per base
    assert sum(n.endswith(".json") for n in names) == n_json == 2 + 2 * 6 + 2 + 1 + 1 + 2 + 2 + 1 + 1 + 2
    md = (out / "results.md").read_text()
    assert "## The paper's claims against these numbers" in md and "Domain perplexity" in md
    times = json.loads((out / "times.json").read_text())
    assert times["jobs"]["domain-finance"]["memdec"]["status"] == "ran"
    assert times["jobs"]["domain-finance"]["memdec"]["seconds"] > 0


def test_rerun_skips_every_stage(done):
    runs = done["run"]
    before = sorted(p.name for p in (runs / "results").rglob("*.json"))
    assert run.main(done["argv"]) == 0
    assert sorted(p.name for p in (runs / "results").rglob("*.json")) == before
    for job in ("setup", "pretrain-base-10m", "domain-finance", "finetune-finance", "eval-bases"):
        stages = json.loads((runs / "times" / f"{job}.json").read_text())
        assert stages and all(rec["status"] == "skipped" for rec in stages.values()), job
        assert all("seconds" in rec for rec in stages.values()), job  # earlier wall times kept


def test_read_capped_and_gpu_assignment(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["aaaa", "bbb", "cc", "d"]))
    assert run.read_capped(path, None) == ["aaaa", "bbb", "cc", "d"]
    assert run.read_capped(path, 8) == ["aaaa", "bbb"]  # whole documents while they fit
    assert run.read_capped(path, 2) == ["aa"]  # the first document is cut to the cap
    # heaviest first onto the least loaded GPU: 5 -> 0, 4 -> 1, 3 -> 1 (load 4 < 5), 1 -> 0
    assert scheduler.assign_gpus({"a": 5, "b": 4, "c": 3, "d": 1}, 2) == {"a": 0, "b": 1, "c": 1, "d": 0}
    assert set(scheduler.assign_gpus({"a": 1, "b": 2}, 0).values()) == {0}


def test_a_silent_worker_is_killed_and_the_others_finish(tmp_path):
    """stall_s: a worker whose log does not grow is killed (with its children) and restarted once; silent again,
    it is reported failed; the others finish."""
    import sys
    import time

    cmds = {"quiet": [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                      "'import time; time.sleep(60)']); time.sleep(60)"],
            "ok": [sys.executable, "-c", "print('done')"]}
    t0 = time.time()
    failed = scheduler.run_jobs(["quiet", "ok"], lambda j: None, cmds.__getitem__, {}, 0, False, tmp_path / "logs",
                                ROOT, stall_s=2)
    assert failed == ["quiet"] and time.time() - t0 < 30
    assert "done" in (tmp_path / "logs" / "ok.log").read_text()


def test_a_worker_that_stalls_once_is_restarted_and_finishes(tmp_path):
    """The restarted worker runs again (here: the second run finds a marker the first left and exits at once)."""
    import sys

    marker = tmp_path / "first-run"
    code = (f"import pathlib, sys, time; m = pathlib.Path({str(marker)!r})\n"
            "if m.exists(): print('resumed'); sys.exit(0)\n"
            "m.write_text('x'); time.sleep(60)")
    failed = scheduler.run_jobs(["j"], lambda j: None, lambda j: [sys.executable, "-c", code], {}, 0, False,
                                tmp_path / "logs", ROOT, stall_s=2)
    assert failed == [] and "resumed" in (tmp_path / "logs" / "j.log").read_text()


def test_memdec_report_claims_makes_the_claims_tables(done, tmp_path, capsys):
    """`memdec report --claims RUN/results` finds the layout, the bases (smallest first) and the tuning JSONs and
    writes the same claims section as results.md; a tree without the layout is a one-line error, nothing written."""
    from memdec.cli import main

    assert main(["report", str(done["run"] / "results"), "--out", str(tmp_path / "r"), "--claims"]) == 0
    md = (tmp_path / "r.md").read_text()
    section = md[md.index("## The paper's claims against these numbers"):]
    results = (done["out"] / "results.md").read_text()
    ours = results[results.index("## The paper's claims against these numbers"):results.index("## Tables from")]
    assert section.startswith(ours.rstrip("\n"))
    for text in ("| base-10m | finance |", "kNN-LM settings chosen on valid", "(v) Case study, finance",
                 "- Retrieval, finance:", "- Copy ability, finance", "RAG (stride 8)"):
        assert text in section, text
    other = tmp_path / "other"
    (other / "x").mkdir(parents=True)
    for f in (done["run"] / "results" / "finance").glob("base-10m__memdec_*.json"):
        (other / "x" / f.name).write_text(f.read_text())
    capsys.readouterr()
    assert main(["report", str(other), "--out", str(tmp_path / "o"), "--claims"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--claims: no base-alone runs" in err[0] and not list(tmp_path.glob("o.*"))


def test_report_only_refreshes_stage_times(tmp_path):
    """--report-only while workers run: times.json gets every stage finished so far, keeps invocations and phases."""
    run_dir = tmp_path / "run"
    st = scheduler.Stages(run_dir / "times", "domain:x")
    st("a", False, lambda: None)
    scheduler.write_times(run_dir, {"n_gpus": 1}, {"pretrain": 5.0}, 10.0, "t0")
    st("b", False, lambda: None)  # a stage finished after the last times.json
    scheduler.write_times(run_dir, {"n_gpus": 1}, {}, None)
    times = json.loads((run_dir / "times.json").read_text())
    assert set(times["jobs"]["domain-x"]) == {"a", "b"} and times["invocations_s"] == {"t0": 10.0}
    assert times["phases_s"] == {"pretrain": 5.0}


def test_workers_get_their_own_compile_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    a = scheduler.worker_env("domain:bio", 0, 4, ROOT, tmp_path)
    b = scheduler.worker_env("domain:law", 1, 4, ROOT, tmp_path)
    assert a["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile" / "domain-bio") != b["TORCHINDUCTOR_CACHE_DIR"]
    assert a["TRITON_CACHE_DIR"].startswith(a["TORCHINDUCTOR_CACHE_DIR"]) and a["CUDA_VISIBLE_DEVICES"] == "0"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert scheduler.worker_env("eval:bases", 0, 1, ROOT, tmp_path)["TORCHINDUCTOR_CACHE_DIR"] == str(
        tmp_path / "mine" / "eval-bases")


def test_scheduler_stages_skip_complete_and_keep_times(tmp_path):
    ran = []
    st = scheduler.Stages(tmp_path, "domain:x")
    st("a", False, lambda: ran.append("a"))
    st("b", True, lambda: ran.append("b"))
    again = scheduler.Stages(tmp_path, "domain:x")
    again("a", True, lambda: ran.append("a"))
    times = json.loads((tmp_path / "domain-x.json").read_text())
    assert ran == ["a"] and times["a"]["status"] == "skipped" and "seconds" in times["a"]
    assert times["b"] == {"status": "skipped"}


def test_serial_jobs_report_failures_and_keep_going():
    def job(name: str) -> None:
        if name == "bad":
            raise RuntimeError("boom")

    assert scheduler.run_jobs(["bad", "good"], job, lambda j: [], {}, 0, True, Path("."), ROOT) == ["bad"]


def test_claims_labels_come_from_the_registry():
    import pandas as pd

    from memdec.methods import get_method

    rows = [{"base": "b", "method": m, "task": t, "metric": "token_perplexity", "value": v,
             "file": f"/r/{'base' if m == 'base' else 'bio'}/b__{m}_2026.json"}
            for m, v in (("base", 10.0), ("memdec", 8.0), ("knnlm", 9.0)) for t in ("memdec_bio_ppl", "g")]
    lines = claims.claims(pd.DataFrame(rows), ["b"], ["bio"], {"bio": "memdec_bio_ppl", "general": "g"})
    text = "\n".join(lines)
    assert all(get_method(m).label in text for m in claims.CLAIM_METHODS)
    assert "| b | bio | 10.00 | 8.00 | – | 9.00 | – | – | – |" in lines
    assert "1 of 1 (base, domain) pairs (paper: all)" in text
    assert f"- +MemDec beats {get_method('knnlm').label} in 1 of 1 (base, domain) pairs." in lines


def test_bad_config_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text(yaml.safe_dump({"corpora": "x", "domains": ["chemistry"], "bases": {"b": {}}}))
    assert run.main(["--config", str(bad), "--run", str(tmp_path / "r")]) == 2
    assert "run.py: error:" in capsys.readouterr().err
    assert run.main(["--config", str(tmp_path / "none.yaml"), "--run", str(tmp_path / "r")]) == 2


def test_stage_inputs_script_lists_every_corpus_file():
    text = (HERE / "stage_inputs.sh").read_text()
    for name in ("general", "bio", "finance", "law"):
        assert name in text
    assert all(s in text for s in ("train", "valid", "test"))


def test_router_trained_per_base_and_evaluated_with_it(done):
    for base in ("base-10m", "base-100m"):
        router = done["run"] / "domains" / "finance" / f"router-finance-{base}"
        cfg = json.loads((router / "router_config.json").read_text())
        assert cfg["inputs"] == "both" and cfg["base"].endswith(f"models/{base}")
        (path,) = (done["run"] / "results" / "finance").glob(f"{base}__router_*.json")
        res = json.loads(path.read_text())
        assert res["config"]["router"] == str(router) and res["config"]["lmbda"] is None


def test_knnlm_evaluated_at_its_tuned_settings(done):
    """Each base's kNN-LM runs at the (lmbda, temperature) tune-knnlm chose for it on valid."""
    for base in ("base-10m", "base-100m"):
        tuned = json.loads((done["run"] / "results" / "finance" / f"tune_knnlm-{base}.json").read_text())
        assert tuned["datastore"].endswith(f"datastore-finance-{base}")
        args = _results(done["run"] / "results" / "finance", f"{base}__knnlm")["config"]["model_args"]
        assert args["lmbda"] == tuned["best_lmbda"] and args["temperature"] == tuned["best_temperature"]


def test_finetune_learning_rate_chosen_on_valid_and_used_for_every_base(done):
    """DAPT / LoRA: every grid point with the largest base, the lowest valid perplexity wins, every base uses it."""
    runs = done["run"]
    for method in ("dapt", "lora"):
        choice = json.loads((runs / "results" / "finance" / f"lr_{method}.json").read_text())
        ppl = {float(k): v for k, v in choice["valid_perplexity"].items()}
        assert choice["base"] == "base-100m" and choice["best_lr"] == min(ppl, key=ppl.get)
        assert len(ppl) == 2 and all(math.isfinite(v) for v in ppl.values())
        for base in ("base-10m", "base-100m"):
            folder = runs / "domains" / "finance" / f"{method}-finance-{base}-lr{choice['best_lr']:g}"
            assert (folder / "baseline.json").exists()
            args = _results(runs / "results" / "finance", f"{base}__{method}")["config"]["model_args"]
            assert str(folder) in args.values()


def test_rag_paper_stride_and_copy_check(done):
    """RAG at the paper's stride per base, and the copy check (corpus = train + test) with the largest base."""
    runs = done["run"]
    for base in ("base-10m", "base-100m"):
        res = _results(runs / "results" / "finance", f"{base}__rag-stride8")
        assert res["config"]["model_args"]["stride"] == 8 and set(res["results"]) == {"memdec_finance_ppl"}
    res = _results(runs / "results" / "finance", "base-100m__rag-copy")
    corpus = runs / "data" / "finance-train+test.jsonl"
    assert res["config"]["model_args"]["corpus"] == str(corpus)
    lines = corpus.read_text().splitlines()
    n_train = len((runs / "data" / "finance-train.jsonl").read_text().splitlines())
    n_test = len((runs / "data" / "finance-test.jsonl").read_text().splitlines())
    assert len(lines) == n_train + n_test
    md = (done["out"] / "results.md").read_text()
    assert "RAG, corpus with the test documents" in md and "(iii) A smaller base + MemDec" in md
    check = json.loads((runs / "results" / "finance" / "rag_check.json").read_text())
    assert check["copy"]["points"] == check["honest"]["points"] > 0 and "- Retrieval, finance:" in md
    for base in ("base-10m", "base-100m"):  # each base on test spans shown twice (small: 4 x 16 tokens)
        c = json.loads((runs / "results" / "finance" / f"copy_ability-{base}.json").read_text())
        assert (c["base"], c["span"], c["n_spans"]) == (base, 16, 4) and c["nll_first"] > 0 and c["nll_second"] > 0
    assert "- Copy ability, finance (rag_check.copy_ability): mean NLL on 4 test spans of 16 tokens" in md
