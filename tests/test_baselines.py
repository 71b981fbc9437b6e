"""Baselines: the registry and plugins, In-Context RAG, DAPT and LoRA (kNN-LM: tests/test_knnlm.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memdec.cli import main as memdec_main

TEXT_CTX = "B30.1 Conjunctivitis due to adenovirus. Inclusion terms: Acute adenoviral"
TEXT_CONT = " follicular conjunctivitis; Swimming-pool conjunctivitis."


def _write_jsonl(path: Path, docs: list[str]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return str(path)


def _instances(kind: str, args_list: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args_list)]


@pytest.fixture(scope="module")
def domain_file(tmp_path_factory, texts) -> str:
    return _write_jsonl(tmp_path_factory.mktemp("corpus") / "domain.jsonl", texts["domain"])


@pytest.fixture(scope="module")
def base_lm(tiny):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=tiny["base"], device="cpu", batch_size=4)


def _rag(tiny, tmp_path, **kw):
    from baselines.incontext_rag import InContextRAG

    return InContextRAG(pretrained=tiny["base"], device="cpu", batch_size=4, cache_dir=str(tmp_path / "cache"), **kw)


def _requests(texts):
    ll = _instances("loglikelihood", [(TEXT_CTX, TEXT_CONT), ("The hacker", " wrote a kludge in the cruft"),
                                      (texts["general"][0][:300], " and so on")])
    rolling = _instances("loglikelihood_rolling", [(texts["domain"][2][:600],), (texts["general"][1][:400],)])
    return ll, rolling


def _close(a, b, tol=1e-4):
    return all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b, strict=True))


# ---- registry and plugins


TOY_PLUGIN = '''
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM


@register_model("toy_uniform")
class ToyUniform(HFLM):
    """Every token of the tokenizer gets probability 1 / len(tokenizer)."""

    def _model_call(self, inps, attn_mask=None, labels=None):
        return torch.zeros(*inps.shape, len(self.tokenizer))
'''


def test_register_all_imports_baselines_and_plugins(tmp_path, monkeypatch):
    from lm_eval.api.registry import get_model

    import baselines

    plugin = tmp_path / "toy_plugin.py"
    plugin.write_text(TOY_PLUGIN)
    monkeypatch.setenv(baselines.PLUGINS_ENV, os.pathsep.join([str(plugin), ""]))
    baselines.register_all()
    baselines.register_all()  # idempotent: a second call must not re-register
    assert get_model("toy_uniform").__name__ == "ToyUniform"
    assert get_model("incontext_rag").__module__ == "baselines.incontext_rag"
    for name in baselines.BASELINES.values():
        assert name in sys.modules
    monkeypatch.setenv(baselines.PLUGINS_ENV, str(tmp_path / "missing.py"))
    with pytest.raises(FileNotFoundError, match="missing.py: no such file"):
        baselines.register_all()


def test_plugin_runs_through_memdec_eval(tmp_path, tiny, texts):
    """A one-file toy baseline named in MEMDEC_PLUGINS is evaluated by `memdec-eval` (a subprocess)."""
    from transformers import AutoTokenizer

    plugin = tmp_path / "toy_plugin.py"
    plugin.write_text(TOY_PLUGIN)
    docs = [texts["domain"][0][:300], texts["domain"][1][:200]]
    data = _write_jsonl(tmp_path / "eval.jsonl", docs)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy_ppl.yaml").write_text(
        "task: toy_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
    )
    env = {**os.environ, "MEMDEC_PLUGINS": str(plugin), "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "results"
    cmd = [sys.executable, "-c", "import sys; from memdec.eval.launcher import cli_main; sys.argv[0] = 'memdec-eval'; "
           "sys.exit(cli_main())", "--model", "toy_uniform", "--model_args", f"pretrained={tiny['base']}",
           "--tasks", "toy_ppl", "--include_path", str(tasks), "--device", "cpu", "--output_path", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["toy_ppl"]
    # independent: each token costs log V nats; word perplexity = exp(total nll / words)
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    n_tokens = sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs)
    n_words = sum(len(d.split()) for d in docs)
    expected = math.exp(n_tokens * math.log(len(tok)) / n_words)
    assert result["word_perplexity,none"] == pytest.approx(expected, rel=1e-4)


def test_readme_example_baseline(tiny, tmp_path, domain_file, monkeypatch, base_lm):
    """The README's worked example, loaded as a plugin file, mixes the base with the corpus unigram."""
    import re

    from lm_eval.api.registry import get_model
    from transformers import AutoTokenizer

    import baselines

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"### Adding a baseline.*?```python\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "unigram.py").write_text(code)
    monkeypatch.setenv(baselines.PLUGINS_ENV, str(tmp_path / "unigram.py"))
    baselines.register_all()
    cls = get_model("unigram")
    req = _instances("loglikelihood", [(TEXT_CTX, TEXT_CONT)])
    lm = cls(pretrained=tiny["base"], corpus=domain_file, lmbda=1.0, device="cpu")
    # independent: add-one unigram counts over the corpus tokens
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    ids = [i for d in json_texts(domain_file) for i in tok(d, add_special_tokens=False)["input_ids"]]
    ids += [tok.eos_token_id] * (len(json_texts(domain_file)) - 1)
    counts = torch.bincount(torch.tensor(ids), minlength=len(tok)).double() + 1
    cont = tok(TEXT_CTX + TEXT_CONT)["input_ids"][len(tok(TEXT_CTX)["input_ids"]) :]
    expected = float((counts / counts.sum()).log()[cont].sum())
    assert lm.loglikelihood(req)[0][0] == pytest.approx(expected, abs=1e-3)
    lm.lmbda = 0.0
    assert _close([lm.loglikelihood(req)[0][0]], [base_lm.loglikelihood(req)[0][0]])


def json_texts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


# ---- In-Context RAG


def test_rag_without_corpus_equals_base(tiny, tmp_path, texts, base_lm):
    rag = _rag(tiny, tmp_path, stride=3)
    ll, rolling = _requests(texts)
    assert _close([x[0] for x in rag.loglikelihood(ll)], [x[0] for x in base_lm.loglikelihood(ll)])
    assert [x[1] for x in rag.loglikelihood(ll)] == [x[1] for x in base_lm.loglikelihood(ll)]
    assert _close(rag.loglikelihood_rolling(rolling), base_lm.loglikelihood_rolling(rolling))
    gen = _instances("generate_until", [(TEXT_CTX, {"until": ["\n\n"], "max_gen_toks": 9})])
    assert rag.generate_until(gen) == base_lm.generate_until(gen)


def test_rag_no_hit_equals_base(tiny, tmp_path, texts, base_lm):
    corpus = _write_jsonl(tmp_path / "unrelated.jsonl", ["zyzzyva quokka", "xylophone qwerty zephyr"])
    rag = _rag(tiny, tmp_path, corpus=corpus, stride=2)
    assert len(rag.index) == 2
    ll, rolling = _requests(texts)
    plans = [b for i, r in enumerate(ll) for b in rag.plan(i, *map(rag.tok_encode, r.args))]
    assert all(len(b.inputs) == b.rows[-1] + 1 for b in plans)  # nothing was prepended
    assert _close([x[0] for x in rag.loglikelihood(ll)], [x[0] for x in base_lm.loglikelihood(ll)])
    assert _close(rag.loglikelihood_rolling(rolling), base_lm.loglikelihood_rolling(rolling))


def test_rag_matches_hand_computation(tiny, tmp_path, domain_file):
    """Prepend the retrieved chunk + separator, score only the block's tokens: float64 by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stride, query, max_doc = 4, 12, 40
    rag = _rag(tiny, tmp_path, corpus=domain_file, stride=stride, query_tokens=query, max_doc_tokens=max_doc,
               chunk_tokens=64)
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float64).eval()
    ctx = tok(TEXT_CTX, add_special_tokens=False)["input_ids"]
    full = tok(TEXT_CTX + TEXT_CONT, add_special_tokens=False)["input_ids"]
    assert full[: len(ctx)] == ctx
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    expected, hits = 0.0, 0
    for p in range(len(ctx), len(full), stride):
        e = min(p + stride, len(full))
        (doc,) = rag.index.retrieve([tok.decode(full[max(0, p - query) : p])])
        prefix = [] if doc is None else doc[:max_doc].tolist() + sep
        hits += doc is not None
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prefix + full[: e - 1]])).logits[0], -1)
        expected += sum(float(logp[len(prefix) + t - 1, full[t]]) for t in range(p, e))
    assert hits >= 2 and len(range(len(ctx), len(full), stride)) >= 3
    (got,) = rag.loglikelihood(_instances("loglikelihood", [(TEXT_CTX, TEXT_CONT)]))
    assert got[0] == pytest.approx(expected, abs=1e-4)
    base = _rag(tiny, tmp_path).loglikelihood(_instances("loglikelihood", [(TEXT_CTX, TEXT_CONT)]))
    assert abs(base[0][0] - got[0]) > 1e-3  # retrieval changed the score
    text = rag.generate_until(_instances("generate_until", [(TEXT_CTX, {"until": ["\n"], "max_gen_toks": 10})]))
    assert isinstance(text[0], str) and "\n" not in text[0]


def test_rag_index_is_cached(tiny, tmp_path, domain_file, monkeypatch):
    import bm25s

    first = _rag(tiny, tmp_path, corpus=domain_file, chunk_tokens=50)
    assert (first.index.folder / "manifest.json").exists()
    monkeypatch.setattr(bm25s.BM25, "index", lambda *a, **k: pytest.fail("index rebuilt"))
    second = _rag(tiny, tmp_path, corpus=domain_file, chunk_tokens=50)
    assert second.index.folder == first.index.folder and len(second.index) == len(first.index)
    info = second.get_model_info()
    assert info["rag_chunks"] == len(second.index) and info["rag_index"] == str(second.index.folder)
    # chunks never cross documents and never hold the EOS separator
    eos = second.tokenizer.eos_token_id
    assert all(eos not in second.index.chunk(i) for i in range(len(second.index)))
    assert max(len(second.index.chunk(i)) for i in range(len(second.index))) == 50


def test_rag_bad_input(tiny, tmp_path):
    blank = _write_jsonl(tmp_path / "blank.jsonl", ["   ", "\n"])
    with pytest.raises(ValueError, match="blank.jsonl: no text found"):
        _rag(tiny, tmp_path, corpus=blank)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        _rag(tiny, tmp_path, corpus=str(tmp_path / "nowhere.jsonl"))
    stop = _write_jsonl(tmp_path / "stopwords.jsonl", ["the of and a to in it is", "-- ... !! ??"])
    with pytest.raises(ValueError, match="stopwords.jsonl has no words BM25 can index"):
        _rag(tiny, tmp_path, corpus=stop)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        _rag(tiny, tmp_path, stride=0)


# ---- DAPT and LoRA


def _rolling_ll(lm, docs: list[str]) -> float:
    return sum(lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(d,) for d in docs])))


def test_dapt_and_lora_lower_perplexity(tiny, tmp_path, texts, domain_file, base_lm):
    """`memdec dapt` / `memdec lora` write dirs that `--model hf` loads, with a better fit to their corpus."""
    from lm_eval.models.huggingface import HFLM

    common = ["--model", tiny["base"], "--corpus", domain_file, "--window", "64", "--steps", "12",
              "--batch-size", "8", "--mixed-precision", "no"]
    assert memdec_main(["dapt", *common, "--out", str(tmp_path / "dapt"), "--lr", "3e-3"]) == 0
    assert memdec_main(["lora", *common, "--out", str(tmp_path / "lora"), "--lr", "1e-2", "--rank", "8",
                        "--target-modules", "c_attn", "c_fc"]) == 0
    docs = [d[:500] for d in texts["domain"][:3]]
    before = _rolling_ll(base_lm, docs)
    dapt = HFLM(pretrained=str(tmp_path / "dapt"), device="cpu", batch_size=4)
    lora = HFLM(pretrained=tiny["base"], peft=str(tmp_path / "lora"), device="cpu", batch_size=4)
    assert _rolling_ll(dapt, docs) > before + 50  # log-likelihood up = perplexity down
    assert _rolling_ll(lora, docs) > before + 50
    info = json.loads((tmp_path / "lora" / "baseline.json").read_text())
    assert info["rank"] == 8 and info["target_modules"] == ["c_attn", "c_fc"]
    assert sum(p.numel() for n, p in lora.model.named_parameters() if "lora_" in n) == info["trainable_params"]


def test_match_params_picks_closest_rank_by_brute_force(tiny):
    """The chosen rank equals the brute-force argmin over ranks of |peft's trainable count - target|."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from baselines.lora import lora_param_count, match_rank, model_param_count

    target = model_param_count(tiny["memory"])
    memory = AutoModelForCausalLM.from_pretrained(tiny["memory"])
    assert target == sum(p.numel() for p in memory.parameters())

    def peft_count(path: str, modules: list[str], r: int) -> int:
        model = AutoModelForCausalLM.from_pretrained(path)
        return get_peft_model(model, LoraConfig(r=r, target_modules=modules)).get_nb_trainable_parameters()[0]

    for path, modules in ((tiny["base"], ["c_attn"]), (tiny["base_llama"], ["q_proj", "v_proj", "down_proj"])):
        model = AutoModelForCausalLM.from_pretrained(path)
        for r in (1, 3, 16):
            assert lora_param_count(model, modules, r) == peft_count(path, modules, r)
        chosen = match_rank(model, modules, target)
        counts = {r: lora_param_count(model, modules, r) for r in range(1, 4 * chosen + 10)}
        best = min(counts, key=lambda r: (abs(counts[r] - target), r))
        assert chosen == best
    assert match_rank(model, ["q_proj"], 1) == 1  # tiny targets still get rank >= 1


def test_lora_and_dapt_bad_input(tiny, tmp_path, domain_file, capsys):
    args = ["lora", "--model", tiny["base"], "--corpus", domain_file, "--out", str(tmp_path / "x")]
    assert memdec_main([*args, "--target-modules", "c_attn", "q_proj"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "['q_proj']" in err and "c_attn, c_fc, c_proj, lm_head" in err
    assert memdec_main([*args, "--rank", "0"]) == 2
    assert "rank must be >= 1" in capsys.readouterr().err
    assert memdec_main([*args, "--match-params", str(tmp_path / "nomodel")]) == 2
    assert "config.json missing" in capsys.readouterr().err
    blank = _write_jsonl(tmp_path / "blank.jsonl", [" "])
    assert memdec_main(["dapt", "--model", tiny["base"], "--corpus", blank, "--out", str(tmp_path / "d")]) == 2
    assert "no text found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
