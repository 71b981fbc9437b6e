"""lm_eval_tasks/: every task end to end on its fixture, against independent float64 computations."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TASK_DIR = ROOT / "lm_eval_tasks"
FIXTURES = Path(__file__).parent / "data" / "tasks"
PPL_TASKS = ["memdec_wikitext103", "memdec_bio_ppl", "memdec_finance_ppl", "memdec_law_ppl"]
ZS_TASKS = ["memdec_sst2", "memdec_mr", "memdec_cr", "memdec_rt", "memdec_hyp", "memdec_cb", "memdec_rte",
            "memdec_agnews", "memdec_yahoo"]
ALL_TASKS = PPL_TASKS + ZS_TASKS
WINDOW, STRIDE = 48, 16


def read_fixture(task: str) -> list[dict]:
    with open(FIXTURES / f"{task}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluate(model: str, model_args: str, tasks: list[str], **metadata):
    import lm_eval
    from lm_eval.tasks import TaskManager

    meta = {"data_dir": str(FIXTURES), "ppl_window": WINDOW, "ppl_stride": STRIDE} | metadata
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata=meta)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=tm,
                                   batch_size=4, device="cpu", log_samples=True)


@pytest.fixture(scope="module")
def hf_results(tiny):
    """All tasks and both groups through lm-eval's `hf` model (float64), on the fixtures."""
    return evaluate("hf", f"pretrained={tiny['base']},dtype=float64",
                    ["memdec_wikitext103", "memdec_domain_ppl", "memdec_zeroshot9"])


@pytest.fixture(scope="module")
def model64(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float64).eval()
    return model, AutoTokenizer.from_pretrained(tiny["base"])


# ---------------------------------------------------------------- perplexity


def hand_logprobs(logp_fn, tokens: np.ndarray, window: int, stride: int) -> np.ndarray:
    """log p(tokens[p]) for p = 1..n-1, p predicted in the first window start = k*stride with p < start + window.

    Written from the rule, not from memdec.pipeline.data.sliding_windows: the context of p is tokens[k*stride : p].
    `logp_fn(ids [1, T]) -> [T, V]` float64 next-token log-probs.
    """
    n = len(tokens)
    out = np.full(n - 1, np.nan)
    k = 0
    while k * stride < n - 1:
        start = k * stride
        ids = torch.as_tensor(tokens[start : start + window], dtype=torch.long)[None]
        with torch.no_grad():
            logp = logp_fn(ids)
        for p in range(start + 1, min(start + window, n)):
            if np.isnan(out[p - 1]):
                out[p - 1] = logp[p - start - 1, tokens[p]].item()
        k += 1
    assert not np.isnan(out).any()
    return out


def base_logp(model):
    return lambda ids: torch.log_softmax(model(ids).logits[0].double(), -1)


@pytest.mark.parametrize("task", PPL_TASKS)
def test_token_perplexity_matches_hand_sliding_window(hf_results, model64, task):
    from memdec.pipeline.data import tokenize

    model, tok = model64
    texts = [r["text"] for r in read_fixture(task)]
    tokens = tokenize(texts, tok, progress=False)
    assert len(tokens) > 3 * WINDOW  # several windows, some spanning documents
    lp = hand_logprobs(base_logp(model), tokens, WINDOW, STRIDE)
    got = hf_results["results"][task]
    assert got["token_perplexity,none"] == pytest.approx(math.exp(-lp.mean()), rel=1e-9)
    words = sum(len(re.split(r"\s+", t.strip())) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert got["word_perplexity,none"] == pytest.approx(math.exp(-lp.sum() / words), rel=1e-9)
    assert got["bits_per_byte,none"] == pytest.approx(-lp.sum() / n_bytes / math.log(2), rel=1e-9)
    # the same number as memdec's own sliding-window scoring (memdec.inference.scoring), which every stage shares
    from memdec.inference.scoring import perplexity, token_logprobs

    assert got["token_perplexity,none"] == pytest.approx(perplexity(token_logprobs(model, tokens, WINDOW, STRIDE)),
                                                         rel=1e-9)
    # per-document entries carry whole windows and add up to the stream's totals
    samples = hf_results["samples"][task]
    assert sum(s["token_perplexity"][1] for s in samples) == len(tokens) - 1


def test_disjoint_windows_keep_one_token_of_context(tiny, model64):
    from memdec.inference.scoring import perplexity, token_logprobs
    from memdec.pipeline.data import tokenize

    model, tok = model64
    res = evaluate("hf", f"pretrained={tiny['base']},dtype=float64", ["memdec_law_ppl"], ppl_window=WINDOW, ppl_stride=WINDOW)
    tokens = tokenize([r["text"] for r in read_fixture("memdec_law_ppl")], tok, progress=False)
    expected = perplexity(token_logprobs(model, tokens, WINDOW, WINDOW))
    assert res["results"]["memdec_law_ppl"]["token_perplexity,none"] == pytest.approx(expected, rel=1e-9)


def test_bad_window_or_stride_is_an_error():
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False,
                     metadata={"data_dir": str(FIXTURES), "ppl_window": 64, "ppl_stride": 65})
    with pytest.raises(ValueError, match=r"memdec_law_ppl: ppl_window must be >= 2 and ppl_stride in \[1, ppl_window\]"):
        tm.load(["memdec_law_ppl"])
    # lm-eval copies --model_args into the metadata: a model's own `stride` (incontext_rag) is not ours
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False,
                     metadata={"data_dir": str(FIXTURES), "pretrained": "x", "window": 8, "stride": 4})
    task = tm.load(["memdec_law_ppl"])["tasks"]["memdec_law_ppl"]
    assert (task.window, task.stride) == (1024, 512)


def test_stride_follows_a_given_window():
    """--metadata '{"ppl_window": 256}' alone: stride 128 (was: the yaml's 512 > 256, an error)."""
    from lm_eval.tasks import TaskManager

    for meta, expected in (({"ppl_window": 256}, (256, 128)), ({"ppl_window": 7}, (7, 3)),
                           ({"ppl_window": 256, "ppl_stride": 256}, (256, 256))):
        tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata={"data_dir": str(FIXTURES), **meta})
        tasks = tm.load(PPL_TASKS)["tasks"]
        assert {(t.window, t.stride) for t in tasks.values()} == {expected}, meta


def test_blank_documents_are_dropped(tmp_path):
    from lm_eval.tasks import TaskManager

    rows = [{"text": "first"}, {"text": "  \n"}, {"text": "second"}]
    (tmp_path / "memdec_law_ppl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "memdec_bio_ppl.jsonl").write_text('{"text": ""}\n')
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata={"data_dir": str(tmp_path)})
    task = tm.load(["memdec_law_ppl"])["tasks"]["memdec_law_ppl"]
    assert [d["text"] for d in task.test_docs()] == ["first", "second"]
    with pytest.raises(ValueError, match="memdec_bio_ppl: no non-blank document in field 'text'"):
        tm.load(["memdec_bio_ppl"])


def test_perplexity_window_longer_than_model_is_an_error(tiny):
    with pytest.raises(ValueError, match=r"memdec_law_ppl: window 1024 .* max_length 256"):
        evaluate("hf", f"pretrained={tiny['base']}", ["memdec_law_ppl"], ppl_window=1024, ppl_stride=512)


# ---------------------------------------------------------------- zero-shot DC-PMI


def test_dcpmi_rule_by_hand():
    from lm_eval_tasks.utils import dcpmi_predictions

    # label 0: p(w|x) = .30 + .10 = .40, label 1: .35 -> plain picks 0
    # PMI: label 0: log(.30/.30) + log(.10/.20) = -0.69; label 1: log(.35/.05) = 1.95 -> DC-PMI picks 1
    cond = [[math.log(0.30), math.log(0.10)], [math.log(0.35)]]
    dom = [[math.log(0.30), math.log(0.20)], [math.log(0.05)]]
    assert dcpmi_predictions(cond, dom) == (0, 1)
    # a label whose words all get probability 0 (a kNN-LM at lmbda=1 whose neighbours name none) is never picked
    zero = [[-math.inf, -math.inf], [math.log(0.01)]]
    assert dcpmi_predictions(zero, [[math.log(0.5), math.log(0.5)], [math.log(0.5)]]) == (1, 1)


def test_only_single_token_label_words_are_kept(tmp_path):
    from lm_eval.tasks import TaskManager

    from lm_eval_tasks.utils import single_token_words
    from memdec.tiny import train_tokenizer

    tok = train_tokenizer(["true yes no false correct wrong maybe"] * 200, vocab_size=290)
    words = [[" true", " yes", " accurate"], [" false", " no", " untrue"], [" neither"]]
    assert len(tok(" yes")["input_ids"]) == 1 and len(tok(" untrue")["input_ids"]) > 1
    assert single_token_words(words, tok) == [[" true", " yes"], [" false", " no"], [" neither"]]
    tok.save_pretrained(tmp_path)
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False,
                     metadata={"data_dir": str(FIXTURES), "pretrained": str(tmp_path)})
    task = tm.load(["memdec_cb"])["tasks"]["memdec_cb"]
    assert task.label_words == [[" true", " yes", " correct"], [" false", " no", " wrong"], [" neither"]]


# The kNN-Prompt templates of the table (checked against swj0419/kNN_prompt), written out here
# so that the YAML configs are checked against them too.
HAND = {
    "memdec_sst2": (lambda d: f"{d['sentence']} It was", " It was"),
    "memdec_cb": (lambda d: f" question: Given that \"{d['premise']}\" Is \"{d['hypothesis']}\" true, false, "
                            f"or neither?\n answer:", " the answer is:"),
    "memdec_rte": (lambda d: f" {d['premise']}\n question: {d['hypothesis']} true or false?\n answer:",
                   " true or false?\n answer:"),
}


def word_logprob(model, tok, context: str, word: str) -> float:
    ctx, cont = tok(context)["input_ids"], tok(word)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(logp[len(ctx) + i - 1, t].item() for i, t in enumerate(cont))


@pytest.mark.parametrize("task", list(HAND))
def test_dcpmi_accuracy_matches_hand_computation(hf_results, model64, task):
    import yaml

    model, tok = model64
    text = (TASK_DIR / f"{task}.yaml").read_text()
    meta = yaml.safe_load(re.sub(r"!function \S+", "x", text))["metadata"]
    prompt, premise = HAND[task]
    assert meta["domain_premise"] == premise
    words = meta["label_words"]
    docs = read_fixture(task)
    plain_ok, pmi_ok = [], []
    for doc in docs:
        cond = [[word_logprob(model, tok, prompt(doc), w) for w in ws] for ws in words]
        dom = [[word_logprob(model, tok, premise, w) for w in ws] for ws in words]
        plain = int(np.argmax([np.logaddexp.reduce(c) for c in cond]))
        pmi = int(np.argmax([sum(a - b for a, b in zip(c, d, strict=True)) for c, d in zip(cond, dom, strict=True)]))
        plain_ok.append(float(plain == doc["label"]))
        pmi_ok.append(float(pmi == doc["label"]))
    samples = sorted(hf_results["samples"][task], key=lambda s: s["doc_id"])
    assert [s["acc"] for s in samples] == plain_ok
    assert [s["acc_dcpmi"] for s in samples] == pmi_ok
    got = hf_results["results"][task]
    assert got["acc,none"] == pytest.approx(np.mean(plain_ok))
    assert got["acc_dcpmi,none"] == pytest.approx(np.mean(pmi_ok))


def test_every_task_and_group_reports_its_metrics(hf_results):
    res = hf_results["results"]
    for task in PPL_TASKS:
        assert all(np.isfinite(res[task][m]) and res[task][m] > 0 for m in
                   ("token_perplexity,none", "word_perplexity,none", "bits_per_byte,none"))
    for task in ZS_TASKS:
        assert res[task]["sample_len"] == len(read_fixture(task))
        assert 0.0 <= res[task]["acc,none"] <= 1.0 and 0.0 <= res[task]["acc_dcpmi,none"] <= 1.0
    group = res["memdec_zeroshot9"]
    assert group["acc,none"] == pytest.approx(np.mean([res[t]["acc,none"] for t in ZS_TASKS]))
    assert group["acc_dcpmi,none"] == pytest.approx(np.mean([res[t]["acc_dcpmi,none"] for t in ZS_TASKS]))


# `lm-eval validate` as its command line runs it, except that lm-eval's own ~15k task files are not
# indexed (about 15 s): our task names all start with memdec_, so they cannot clash with built-in ones.
VALIDATE = """
import sys
import lm_eval.tasks
from lm_eval.__main__ import cli_evaluate

class LocalOnly(lm_eval.tasks.TaskManager):
    def __init__(self, *a, **kw):
        super().__init__(*a, **{**kw, "include_defaults": False})

lm_eval.tasks.TaskManager = LocalOnly
sys.argv = ["lm-eval", *sys.argv[1:]]
cli_evaluate()
"""


def test_lm_eval_validate_accepts_every_task():
    names = ",".join(ALL_TASKS + ["memdec_domain_ppl", "memdec_zeroshot9"])
    proc = subprocess.run([sys.executable, "-c", VALIDATE, "validate", "--tasks", names, "--include_path",
                           str(TASK_DIR)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "All tasks found and valid" in proc.stdout
    bad = subprocess.run([sys.executable, "-c", VALIDATE, "validate", "--tasks", "memdec_nope", "--include_path",
                          str(TASK_DIR)], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "memdec_nope" in bad.stdout


# ---------------------------------------------------------------- bad input


def test_bad_local_data_errors_name_task_file_and_field(tmp_path, monkeypatch):
    from lm_eval_tasks.utils import load_task_data

    monkeypatch.delenv("MEMDEC_DATA_DIR", raising=False)
    kw = {"fields": ["text", "label"], "label_column": "label", "n_labels": 2}
    with pytest.raises(FileNotFoundError, match=r"memdec_mr: data dir .* has no memdec_mr\.jsonl"):
        load_task_data("memdec_mr", data_dir=str(tmp_path), **kw)
    (tmp_path / "memdec_mr.jsonl").write_text('{"text": "fine", "label": 1}\n{"label": 0}\n')
    with pytest.raises(ValueError, match=r"memdec_mr: .*memdec_mr\.jsonl, record 2: no field 'text'"):
        load_task_data("memdec_mr", data_dir=str(tmp_path), **kw)
    (tmp_path / "memdec_mr.jsonl").write_text('{"text": "fine", "label": 3}\n')
    with pytest.raises(ValueError, match=r"memdec_mr: .*memdec_mr\.jsonl, record 1: field 'label' has unknown label 3"):
        load_task_data("memdec_mr", data_dir=str(tmp_path), **kw)
    with pytest.raises(ValueError, match=r"memdec_mr: no confirmed hub dataset.*data_dir.*memdec_mr\.jsonl"):
        load_task_data("memdec_mr", **kw)
    (tmp_path / "memdec_mr.jsonl").write_text('{"text": "fine", "label": 1}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"memdec_mr: .*memdec_mr\.jsonl, line 2: not valid JSON"):
        load_task_data("memdec_mr", data_dir=str(tmp_path), **kw)
    # the environment variable works like --metadata data_dir; .json and .parquet are read too
    import pandas as pd

    (tmp_path / "memdec_mr.jsonl").unlink()
    (tmp_path / "memdec_mr.json").write_text('[{"text": "a", "label": 0}, {"text": "b", "label": 1}]')
    assert load_task_data("memdec_mr", data_dir=str(tmp_path), **kw)["test"]["text"] == ["a", "b"]
    (tmp_path / "memdec_mr.json").unlink()
    import gzip

    with gzip.open(tmp_path / "memdec_mr.jsonl.gz", "wt") as f:
        f.write('{"text": "c", "label": 1}\n\n{"text": "d", "label": 0}\n')
    assert load_task_data("memdec_mr", data_dir=str(tmp_path), **kw)["test"]["text"] == ["c", "d"]
    (tmp_path / "memdec_mr.jsonl.gz").unlink()
    pd.DataFrame({"text": ["a", "b"], "label": [0, 1], "extra": [1, 2]}).to_parquet(tmp_path / "memdec_mr.parquet")
    monkeypatch.setenv("MEMDEC_DATA_DIR", str(tmp_path))
    ds = load_task_data("memdec_mr", **kw)["test"]
    assert ds.column_names == ["text", "label"] and ds["label"] == [0, 1]


def test_zero_shot_config_errors(tmp_path):
    from lm_eval_tasks.utils import DCPMITask

    base = {"task": "memdec_x", "metadata": {"prompt": "{text}", "domain_premise": " x", "label_field": "label"}}
    with pytest.raises(ValueError, match=r"memdec_x: metadata has no 'label_words'"):
        DCPMITask(config=base)
    bad = {**base, "metadata": {**base["metadata"], "label_words": [[" a"], []]}}
    with pytest.raises(ValueError, match=r"memdec_x: metadata 'label_words' must be"):
        DCPMITask(config=bad)


def test_missing_task_file_through_lm_eval(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"memdec_law_ppl: data dir .* has no memdec_law_ppl\.jsonl"):
        evaluate("hf", f"pretrained={tiny['base']}", ["memdec_law_ppl"], data_dir=str(tmp_path))


# ---------------------------------------------------------------- the memdec model and memdec-eval

LMBDA = 0.3


@pytest.fixture(scope="module")
def memdec_results(tiny):
    """All tasks through `--model memdec` (tiny base + tiny memory, float64)."""
    pytest.importorskip("memdec.eval.models")
    import memdec.eval.models  # noqa: F401  (registers the memdec model)

    return evaluate("memdec", f"pretrained={tiny['base']},memory={tiny['memory']},lmbda={LMBDA},dtype=float64",
                    ["memdec_wikitext103", "memdec_domain_ppl", "memdec_zeroshot9"])


def test_memdec_model_token_perplexity_is_the_hand_mixture(memdec_results, model64, tiny):
    from transformers import AutoModelForCausalLM

    from memdec.pipeline.data import tokenize

    base, tok = model64
    mem = AutoModelForCausalLM.from_pretrained(tiny["memory"], dtype=torch.float64).eval()
    vocab = len(tok)

    def mixed(ids):
        pb = torch.softmax(base(ids).logits[0].double()[:, :vocab], -1)
        pm = torch.softmax(mem(ids).logits[0].double()[:, :vocab], -1)
        return torch.log(LMBDA * pm + (1 - LMBDA) * pb)

    task = "memdec_bio_ppl"
    tokens = tokenize([r["text"] for r in read_fixture(task)], tok, progress=False)
    lp = hand_logprobs(mixed, tokens, WINDOW, STRIDE)
    got = memdec_results["results"][task]["token_perplexity,none"]
    assert got == pytest.approx(math.exp(-lp.mean()), rel=1e-6)


def test_every_task_runs_with_memdec_model(memdec_results, hf_results):
    res = memdec_results["results"]
    for task in PPL_TASKS:
        assert np.isfinite(res[task]["token_perplexity,none"])
        assert res[task]["token_perplexity,none"] != hf_results["results"][task]["token_perplexity,none"]
    for task in ZS_TASKS:
        assert res[task]["sample_len"] == len(read_fixture(task))
        assert 0.0 <= res[task]["acc,none"] <= 1.0 and 0.0 <= res[task]["acc_dcpmi,none"] <= 1.0
    assert "memdec_zeroshot9" in res and "memdec_domain_ppl" in memdec_results["group_subtasks"]


def test_memdec_eval_command_runs_the_tasks(tiny, tmp_path, hf_results):
    pytest.importorskip("memdec.eval.models")
    # the command line copies pretrained= into the task metadata, which would keep only single-token label
    # words (the tiny tokenizer has none); all words are kept here to compare with hf_results
    meta = json.dumps({"data_dir": str(FIXTURES), "ppl_window": WINDOW, "ppl_stride": STRIDE,
                       "single_token_words": False})
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from memdec.eval.launcher import cli_main; sys.exit(cli_main())", "run",
         "--model", "hf", "--model_args", f"pretrained={tiny['base']},dtype=float64", "--device", "cpu",
         "--tasks", "memdec_law_ppl,memdec_rte", "--metadata", meta, "--batch_size", "4",
         "--output_path", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(tmp_path.rglob("results_*.json")).read_text())["results"]
    for task, metric in (("memdec_law_ppl", "token_perplexity,none"), ("memdec_rte", "acc_dcpmi,none")):
        assert out[task][metric] == pytest.approx(hf_results["results"][task][metric], rel=1e-9)
