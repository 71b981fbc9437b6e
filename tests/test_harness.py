"""The `memdec` lm-eval model and `memdec-eval` against `--model hf`, the memory alone and float64 references."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM, AutoTokenizer

from memdec.eval.launcher import _add_task_path, _local_tasks_only, cli_main, tasks_dir
from memdec.eval.models import MemDecLM, MixtureLM
from memdec.inference.joint import model_logprobs

LMBDA = 0.4
PAIRS = [("The river", " flows north"), ("Viral conjunctivitis", " due to adenovirus."), ("A", " hacker")]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, texts) -> Path:
    """Three tiny local lm-eval tasks (rolling perplexity, multiple choice, generation) over local JSON."""
    root = tmp_path_factory.mktemp("tasks")
    with open(root / "docs.jsonl", "w") as f:
        for t in texts["domain"][:2]:
            f.write(json.dumps({"text": t[:400]}) + "\n")
    with open(root / "mc.jsonl", "w") as f:
        for q, c in PAIRS:
            f.write(json.dumps({"q": q, "choices": [c, " is blue"], "label": 0}) + "\n")
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (root / "ppl.yaml").write_text("task: memdec_t_ppl\n" + head.format(data=root / "docs.jsonl") + (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"))
    (root / "mc.yaml").write_text("task: memdec_t_mc\n" + head.format(data=root / "mc.jsonl") + (
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"))
    (root / "gen.yaml").write_text("task: memdec_t_gen\n" + head.format(data=root / "mc.jsonl") + (
        "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{choices[label]}}'\n"
        "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"))
    return root


@pytest.fixture(scope="module")
def lms(tiny):
    common = {"device": "cpu", "batch_size": 2, "dtype": "float32"}
    mem = {"pretrained": tiny["base"], "memory": tiny["memory"]}
    return {
        "hf": HFLM(pretrained=tiny["base"], **common),
        "memory_alone": HFLM(pretrained=tiny["memory"], **common),
        0.0: MemDecLM(**mem, lmbda=0.0, **common),
        1.0: MemDecLM(**mem, lmbda=1.0, **common),
        LMBDA: MemDecLM(**mem, lmbda=LMBDA, **common),
    }


@pytest.fixture(scope="module")
def ref(tiny):
    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()

    return load(tiny["base"]), load(tiny["memory"])


@torch.no_grad()
def ref_logprob(ref, ids: list[int], targets_from: int, lmbda: float) -> float:
    """float64 sum of log(lmbda p_mem + (1 - lmbda) p_base) over ids[targets_from:]."""
    x = torch.tensor([ids])
    pb, pm = (torch.softmax(m(x).logits[0, :-1, :400], -1) for m in ref)
    lp = torch.log(lmbda * pm + (1 - lmbda) * pb)
    return float(sum(lp[p - 1, ids[p]] for p in range(targets_from, len(ids))))


def ll_requests(pairs) -> list[Instance]:
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def test_loglikelihood_endpoints_and_mixture(lms, ref):
    got = {k: lm.loglikelihood(ll_requests(PAIRS), disable_tqdm=True) for k, lm in lms.items()}
    for (a, ga), (b, gb) in zip(got["hf"], got[0.0], strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    for (a, ga), (b, gb) in zip(got["memory_alone"], got[1.0], strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    tok = lms["hf"].tokenizer
    for (ctx, cont), (value, _) in zip(PAIRS, got[LMBDA], strict=True):
        ids = tok.encode(ctx) + tok.encode(cont)
        assert value == pytest.approx(ref_logprob(ref, ids, len(tok.encode(ctx)), LMBDA), abs=1e-4)
    assert got[LMBDA][0][0] not in (pytest.approx(got["hf"][0][0]), pytest.approx(got["memory_alone"][0][0]))


def test_lmbda_endpoints_run_only_the_model_that_counts(lms, monkeypatch):
    from memdec.inference import fast

    def never(*_a, **_k):
        raise AssertionError("this model's scores are not needed")

    lm0, lm1 = lms[0.0], lms[1.0]
    want0 = lm0.loglikelihood(ll_requests(PAIRS), disable_tqdm=True)
    want1 = lm1.loglikelihood(ll_requests(PAIRS), disable_tqdm=True)
    with monkeypatch.context() as m:  # lmbda 0: the memory never runs
        m.setattr(lm0, "other_scores", never)
        assert lm0.loglikelihood(ll_requests(PAIRS), disable_tqdm=True) == want0
    real = fast.base_forward
    with monkeypatch.context() as m:  # lmbda 1: the base never runs
        m.setattr(fast, "base_forward", lambda model, g=None: never() if model is lm1.model else real(model, g))
        assert lm1.loglikelihood(ll_requests(PAIRS), disable_tqdm=True) == want1


def test_loglikelihood_rolling_endpoints_and_mixture(lms, ref, texts):
    long_text = texts["general"][0][:3000]  # several rolling windows of max_length 256
    short_text = texts["domain"][0][:300]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([long_text, short_text])]
    got = {k: lm.loglikelihood_rolling(reqs, disable_tqdm=True) for k, lm in lms.items()}
    assert len(lms["hf"].tok_encode(long_text)) > 3 * lms["hf"].max_length
    assert got[0.0] == pytest.approx(got["hf"], rel=1e-6)
    assert got[1.0] == pytest.approx(got["memory_alone"], rel=1e-6)
    tok = lms["hf"].tokenizer
    ids = [tok.eos_token_id] + tok.encode(short_text)  # lm-eval's prefix token, then every token is a target
    assert got[LMBDA][1] == pytest.approx(ref_logprob(ref, ids, 1, LMBDA), abs=1e-3)


class SecondLM(MixtureLM):
    """A MixtureLM whose other distribution is a second causal LM (the generic, uncached path)."""

    def __init__(self, other: str, **kwargs):
        super().__init__(**kwargs)
        self.other = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32).eval()

    def other_logprobs(self, input_ids, attention_mask=None):
        return model_logprobs(self.other, input_ids, attention_mask, self.mix_vocab_size)


def test_generate_until_through_the_joint_model(lms, tiny):
    reqs = [Instance("generate_until", {}, (ctx, {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}), i)
            for i, (ctx, _) in enumerate(PAIRS)]
    lm = lms[LMBDA]
    got = lm.generate_until(reqs, disable_tqdm=True)
    tok = lm.tokenizer
    for (ctx, _), text in zip(PAIRS, got, strict=True):
        ids = torch.tensor([tok.encode(ctx)])
        out = lm.joint.generate(ids, max_new_tokens=6)  # unpadded, one prompt at a time
        assert text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    generic = SecondLM(other=tiny["memory"], pretrained=tiny["base"], lmbda=LMBDA, device="cpu", batch_size=2)
    assert generic.generate_until(reqs, disable_tqdm=True) == got
    mixed = generic.loglikelihood(ll_requests(PAIRS), disable_tqdm=True)
    assert [v for v, _ in mixed] == pytest.approx([v for v, _ in lm.loglikelihood(ll_requests(PAIRS))], abs=1e-5)
    assert lms[0.0].generate_until(reqs, disable_tqdm=True) == lms["hf"].generate_until(reqs, disable_tqdm=True)


def test_padded_vocab_base(tiny):
    lm = MemDecLM(pretrained=tiny["base_llama"], memory=tiny["memory"], lmbda=LMBDA, device="cpu", batch_size=2)
    assert lm.model.config.vocab_size == len(lm.tokenizer) + 8
    ids = torch.tensor([lm.tok_encode("The river flows")])
    out = lm._model_call(ids)
    assert out.shape == (1, ids.shape[1], len(lm.tokenizer))
    torch.testing.assert_close(out, lm.joint.logprobs(ids))
    assert [v for v, _ in lm.loglikelihood(ll_requests(PAIRS[:1]), disable_tqdm=True)][0] < 0


def test_simple_evaluate_records_memory_and_lmbda(tiny, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = {"pretrained": tiny["base"], "memory": tiny["memory"], "lmbda": LMBDA, "mem_temperature": 1.5}
    res = lm_eval.simple_evaluate(model="memdec", model_args=args, tasks=["memdec_t_ppl", "memdec_t_mc"],
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                  device="cpu", batch_size=2)
    cfg = res["config"]
    assert cfg["model_args"]["memory"] == tiny["memory"] and cfg["model_args"]["lmbda"] == LMBDA
    assert (cfg["lmbda"], cfg["memory"], cfg["mem_temperature"]) == (LMBDA, tiny["memory"], 1.5)
    assert res["results"]["memdec_t_ppl"]["word_perplexity,none"] > 1
    assert 0 <= res["results"]["memdec_t_mc"]["acc,none"] <= 1


def test_task_path_and_local_task_shortcut(task_dir):
    ns = argparse.Namespace(include_path=str(task_dir), config=None)
    _add_task_path(ns)
    assert ns.include_path == [tasks_dir(), str(task_dir)]  # the user's folder comes last and wins a name clash
    assert _local_tasks_only(["memdec_t_ppl", "memdec_t_mc"], ns.include_path)
    assert not _local_tasks_only(["memdec_t_ppl", "hellaswag"], ns.include_path)
    assert not _local_tasks_only(["memdec_t_*"], ns.include_path)


@pytest.fixture(scope="module")
def short_memory(tiny, tmp_path_factory):
    from memdec.tiny import save_model, tiny_model

    tok = AutoTokenizer.from_pretrained(tiny["tok"])
    path = tmp_path_factory.mktemp("short") / "memory"
    return save_model(tiny_model(tok, "gpt2", n_layer=1, hidden=32, n_head=2, max_positions=32, seed=5), tok, path)


@pytest.mark.parametrize("extra, message", [
    ("memory={memory},lmbda=1.5", r"lmbda must be in \[0, 1\], got 1.5"),
    ("memory={missing}", "memory .*missing: no such folder"),
    ("memory={other}", "base tokenizer .*base.* differs from memory tokenizer .*other"),
    ("memory={short},max_length=256", r"context length 32 is shorter than the 256 tokens requested \(max_length 256\)"),
    ("memory={memory},device=cpu", "device=cpu inside --model_args: pass it as --device cpu"),
    ("lmbda=0.5", "memory=PATH_OR_ID"),
])
def test_memdec_eval_errors(tiny, task_dir, short_memory, tmp_path, capsys, monkeypatch, extra, message):
    import re

    if "short" not in extra:  # every other mistake is caught before any weights are loaded
        def no_weights(*args, **kwargs):
            raise AssertionError("weights were loaded before the arguments were checked")

        monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    paths = {"memory": tiny["memory"], "missing": str(tmp_path / "missing"), "other": tiny["other_tok_model"],
             "short": short_memory}
    out = tmp_path / "out"
    rc = cli_main(["--model", "memdec", "--model_args", f"pretrained={tiny['base']}," + extra.format(**paths),
                   "--tasks", "memdec_t_ppl", "--include_path", str(task_dir), "--output_path", str(out)])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("memdec-eval:")]
    assert rc == 2 and len(lines) == 1 and re.search(message, lines[0]), lines
    assert not out.exists()


def run_memdec_eval(args: list[str], cwd: Path, as_module: bool = False) -> subprocess.CompletedProcess:
    """The `memdec-eval` console script (pyproject.toml), or `python -m memdec.harness`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    script = None if as_module else shutil.which("memdec-eval")
    cmd = ([script] if script else [sys.executable, "-m", "memdec.harness"]) + args
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_memdec_eval_command_writes_results(tiny, task_dir, tmp_path):
    out = tmp_path / "results"
    proc = run_memdec_eval(["--model", "memdec", "--model_args",
                            f"pretrained={tiny['base']},memory={tiny['memory']},lmbda=0.55",
                            "--tasks", "memdec_t_ppl,memdec_t_gen", "--include_path", str(task_dir),
                            "--device", "cpu", "--batch_size", "2", "--output_path", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = out.rglob("results_*.json")
    cfg = json.loads(result.read_text())["config"]
    assert cfg["model"] == "memdec" and cfg["model_args"]["memory"] == tiny["memory"]
    assert cfg["model_args"]["lmbda"] == 0.55 and cfg["lmbda"] == 0.55 and cfg["memory"] == tiny["memory"]

    bad = run_memdec_eval(["--model", "memdec", "--model_args", f"pretrained={tiny['base']},memory={tiny['memory']},"
                           "lmbda=-0.1", "--tasks", "memdec_t_ppl", "--include_path", str(task_dir),
                           "--output_path", str(tmp_path / "bad")], tmp_path, as_module=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "memdec-eval: error: lmbda must be in [0, 1], got -0.1"
    assert not (tmp_path / "bad").exists()
