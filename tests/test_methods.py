"""memdec.methods, the method registry: registration, lookups, laziness, and the README's one-file baseline."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from memdec import methods as registry
from memdec.methods import Method, get_method, register_method

ROOT = Path(__file__).parents[1]
MARKER = "<!-- example: unigram baseline"
GPT2_MEMDEC = ROOT / "tests" / "data" / "results" / "gpt2" / "results_2026-01-01T11-00-00.000001.json"


@pytest.fixture
def scratch_registry():
    """Methods registered in a test are forgotten after it."""
    registry.methods()  # the built-ins read first: they stay
    saved = dict(registry._REGISTRY), dict(registry._KEYS)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved[0])
    registry._KEYS.clear()
    registry._KEYS.update(saved[1])


def _python(code: str, *argv: str, **env: str) -> subprocess.CompletedProcess:
    """`python -c code argv...` with `env` added (and no MEMDEC_PLUGINS unless given)."""
    full_env = {k: v for k, v in os.environ.items() if k != "MEMDEC_PLUGINS"}
    full_env.update(OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-c", code, *argv], env=full_env, capture_output=True, text=True,
                          timeout=300)


def readme_example() -> str:
    """The README's example baseline file, verbatim (the python block after MARKER)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.search(re.escape(MARKER) + r".*?\n```python\n(.*?)```", readme, re.S).group(1)


# ---- registration


def test_collisions_are_one_line_errors_naming_both(scratch_registry):
    with pytest.raises(ValueError) as e:
        register_method(Method(name="knnlm", label="+My kNN"))
    assert str(e.value) == ("register_method: name 'knnlm' of method 'knnlm' (+My kNN) is already the name of "
                            "method 'knnlm' (+kNN-LM)")
    with pytest.raises(ValueError, match=r"alias 'peft' of method 'adapter' \(\+Adapter\) is already an alias of "
                                         r"method 'lora' \(\+LoRA\)$"):
        register_method(Method(name="adapter", label="+Adapter", aliases=("PEFT",)))
    with pytest.raises(ValueError, match=r"name 'router' of method 'router' .* an alias of method 'memdec_router'"):
        register_method(Method(name="router", label="+Router"))
    register_method(Method(name="mine", label="+Mine", aliases=("my-method",)))
    with pytest.raises(ValueError, match=r"alias 'mine' of method 'other' \(\+Other\) is already the name of method "
                                         r"'mine' \(\+Mine\)"):
        register_method(Method(name="other", label="+Other", aliases=("mine",)))
    assert "other" not in registry._REGISTRY and "\n" not in str(e.value)
    register_method(Method(name="mine", label="+Mine", aliases=("my-method",)))  # the same again: a no-op


def test_lookup_by_name_or_alias(scratch_registry):
    assert get_method("rag") is get_method("In-Context RAG") is get_method(" +in-context rag ")
    assert get_method("router").name == "memdec_router" and get_method("PEFT").name == "lora"
    mine = register_method(Method(name="mine", label="+Mine", aliases=("My-Method",)))
    assert get_method("my-method") is mine and registry.methods()[-1] is mine
    assert [m.name for m in registry.methods()[:7]] == list(registry.BUILTIN_METHODS)
    with pytest.raises(KeyError, match=r"unknown method 'nope' \(known: base, rag, knnlm, dapt, lora, memdec"):
        get_method("nope")


def test_method_fields_are_checked():
    with pytest.raises(ValueError, match="model_class='baselines.knnlm': expected 'module:name'"):
        Method(name="x", label="+X", model="x", model_class="baselines.knnlm")
    with pytest.raises(ValueError, match="label=''"):
        Method(name="x", label="")
    assert Method(name="x", label="+X", aliases=["a"]).aliases == ("a",)  # frozen, hashable: lists become tuples
    with pytest.raises(ValueError, match="has no model_class"):
        get_method("dapt").load_model()


def test_registering_and_listing_import_no_lm_eval_torch_or_transformers():
    code = ("import sys\n"
            "from memdec.methods import Method, register_method, get_method, methods\n"
            "register_method(Method(name='lazy', label='+Lazy', model='lazy',"
            " model_class='lm_eval.models.huggingface:HFLM'))\n"
            "assert [m.name for m in methods()][-1] == 'lazy' and get_method('knnlm').model == 'knnlm'\n"
            "import memdec.cli, reports.load\n"
            "memdec.cli.build_parser()\n"
            "assert reports.load.METHODS['knnlm'] == '+kNN-LM'\n"
            "heavy = [n for n in ('lm_eval', 'torch', 'transformers') if n in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_builtin_source_registrations_match_their_import():
    """The registry reads the baselines' register_method lines from source; importing them registers the same."""
    import importlib

    for name, module in registry.BUILTIN_METHODS.items():
        read = get_method(name)
        importlib.import_module(module)  # runs its register_method again: no collision
        assert get_method(name) == read
    assert get_method("knnlm").load_model().__name__ == "KNNLM"
    assert get_method("rag").load_model().__name__ == "InContextRAG"
    assert get_method("memdec_router").load_model() is get_method("memdec").load_model()


def test_a_builtin_registration_must_be_literal(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from memdec.methods import Method, register_method\nNAME = 'x'\n\n"
                 "register_method(Method(name=NAME, label='+X'))\n")
    with pytest.raises(ValueError, match=r"m.py:4: a built-in method is registered as register_method\(Method"):
        registry.declared_methods(f)


# ---- readers


def test_report_tables_unchanged():
    """The tables reports/load.py had before the registry, now derived from it."""
    code = ("import json, reports.load as L\n"
            "print(json.dumps([L.METHODS, L.METHOD_ALIASES, L.MODEL_METHODS, L.VARIANT_ARGS,"
            " {m: L.variant_args(m) for m in L.METHODS}]))\n")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    labels, aliases, models, _all, own = json.loads(proc.stdout)
    assert list(labels.items()) == [("base", "base"), ("rag", "+In-Context RAG"), ("knnlm", "+kNN-LM"),
                                    ("dapt", "+DAPT"), ("lora", "+LoRA"), ("memdec", "+MemDec"),
                                    ("memdec_router", "+MemDec (router)")]
    assert aliases == {
        "incontext_rag": "rag", "in-context rag": "rag", "in_context_rag": "rag", "+in-context rag": "rag",
        "knn-lm": "knnlm", "knn_lm": "knnlm", "+knn-lm": "knnlm",
        "+dapt": "dapt", "peft": "lora", "+lora": "lora", "memory_decoder": "memdec", "+memdec": "memdec",
        "router": "memdec_router", "+memdec (router)": "memdec_router", "memdec-router": "memdec_router",
    }
    assert models == {"memdec": "memdec", "knnlm": "knnlm", "incontext_rag": "rag"}
    # the old global order, as each method sees its own keys
    # (+ RAG's stride, issue 18: its paper-stride runs sit beside the stride-32 ones)
    old = ("memory", "lmbda", "router", "router_threshold", "datastore", "k", "temperature", "peft", "corpus",
           "stride")
    for method, keys in own.items():
        mine = get_method(method).variant_args
        assert keys[: len(mine)] == list(mine) and list(mine) == [k for k in old if k in mine], method


def test_label_of_your_own_orders_by_the_model_method(tmp_path):
    """`--metadata method=ours` on memdec runs: the label lists memory before lmbda, as before the registry."""
    import reports

    raw = json.loads(GPT2_MEMDEC.read_text())
    for i, (memory, lmbda) in enumerate([("runs/a", 0.6), ("runs/b", 0.8)]):
        res = copy.deepcopy(raw)
        res["config"]["model_args"] = {"pretrained": "gpt2", "memory": memory, "lmbda": lmbda, "method": "ours"}
        (tmp_path / f"results_{i}.json").write_text(json.dumps(res))
    df = reports.load_results([tmp_path])
    assert set(df["label"]) == {"ours (memory=a, lmbda=0.6)", "ours (memory=b, lmbda=0.8)"}


def test_cli_training_commands_come_from_the_registry(tmp_path):
    from memdec.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices)[:5] == ["demo", "train", "dapt", "lora", "datastore"]
    bad = _python("import sys; from memdec.cli import main; sys.exit(main(['--help']))",
                  MEMDEC_PLUGINS=str(tmp_path / "missing.py"))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"memdec: error: MEMDEC_PLUGINS: {tmp_path / 'missing.py'}: no such file"]


# ---- the README's example


def _unigram_expected(tiny: dict, corpus: str, docs: list[str]) -> float:
    """Word perplexity of `docs` under the add-one unigram of `corpus` alone (lmbda = 1), by hand."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["base"])
    texts = [json.loads(line)["text"] for line in Path(corpus).read_text().splitlines() if line.strip()]
    ids = [i for d in texts for i in tok(d, add_special_tokens=False)["input_ids"]]
    ids += [tok.eos_token_id] * (len(texts) - 1)
    logp = ((torch.bincount(torch.tensor(ids), minlength=len(tok)).double() + 1) / (len(ids) + len(tok))).log()
    nll = -sum(float(logp[tok(d, add_special_tokens=False)["input_ids"]].sum()) for d in docs)
    return math.exp(nll / sum(len(d.split()) for d in docs))


def test_readme_example_runs_as_a_plugin_and_gets_its_label(tmp_path, tiny, texts):
    plugin = tmp_path / "unigram.py"
    plugin.write_text(readme_example())
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts["domain"]))
    docs = [texts["domain"][0][:300], texts["domain"][1][:200]]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "law_ppl.yaml").write_text(  # "law": a domain column of the report's tables
        "task: law_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n')
    env = {"MEMDEC_PLUGINS": str(plugin), "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "results"
    argv = ["--model", "unigram", "--model_args", f"pretrained={tiny['base']},corpus={corpus},lmbda=1.0",
            "--tasks", "law_ppl", "--include_path", str(tasks), "--device", "cpu", "--output_path", str(out)]
    proc = _python("import sys; from memdec.eval.launcher import cli_main; sys.argv[0] = 'memdec-eval'; "
                   "sys.exit(cli_main())", *argv, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["law_ppl"]
    assert result["word_perplexity,none"] == pytest.approx(_unigram_expected(tiny, str(corpus), docs), rel=1e-4)

    report = tmp_path / "report"
    code = f"import sys; from memdec.cli import main; sys.exit(main(['report', {str(out)!r}, '--out', {str(report)!r}]))"
    proc = _python(code, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import pandas as pd

    csv = pd.read_csv(f"{report}.csv")
    assert set(zip(csv["method"], csv["label"], strict=True)) == {("unigram", "+Unigram")}
    assert "| +Unigram |" in Path(f"{report}.md").read_text().replace("  ", " ")
