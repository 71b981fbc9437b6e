"""A GPT-2-style tokenizer (byte-level BPE, no pad token, <|endoftext|> = EOS = BOS = UNK as the last id, id 0 a
real token) and GPT-2s of 1024 and 256 positions through every stage and baseline with their default windows;
each result against an independent float64 computation."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_joint import reference_generate
from test_tasks import FIXTURES, hand_logprobs, read_fixture
from transformers import AutoModelForCausalLM, AutoTokenizer

from memdec.cli import main
from memdec.tiny import EOS

DOMAIN = str(Path(__file__).parent / "data" / "domain.jsonl")
TASK = "memdec_law_ppl"
WINDOW = 256  # the memory's context: every default below comes out as this (or 1024 for the base alone)


def _one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(w in err for w in words), err
    return err


@pytest.fixture(scope="module")
def run(gpt2_style, tmp_path_factory):
    """datastore -> targets -> train with the CLI's defaults (no --window anywhere)."""
    root = tmp_path_factory.mktemp("gpt2_run")
    ds, mem = root / "datastore", root / "memdec"
    assert main(["datastore", "--model", gpt2_style["base"], "--corpus", DOMAIN, "--out", str(ds),
                 "--batch-size", "4", "--device", "cpu"]) == 0
    assert main(["targets", "--datastore", str(ds), "--k", "8", "--temperature", "4", "--device", "cpu"]) == 0
    assert main(["train", "--init", gpt2_style["memory"], "--datastore", str(ds), "--out", str(mem), "--steps", "2",
                 "--batch-size", "2", "--lr", "1e-3", "--mixed-precision", "no"]) == 0
    return {"root": root, "datastore": str(ds), "memory": str(mem)}


@pytest.fixture(scope="module")
def ref(gpt2_style, run):
    """The base and the trained memory in float64, loaded independently."""
    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()

    return {"base": load(gpt2_style["base"]), "memory": load(run["memory"])}


@pytest.fixture(scope="module")
def tok(gpt2_style):
    return AutoTokenizer.from_pretrained(gpt2_style["tok"])


def law_tokens(tok) -> np.ndarray:
    from memdec.pipeline.data import tokenize

    return tokenize([r["text"] for r in read_fixture(TASK)], tok, progress=False)


def evaluate(model: str, model_args: str, **metadata) -> dict:
    """One perplexity task through lm-eval with memdec's tasks; only ppl_window is given (stride follows)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from memdec.eval.launcher import tasks_dir

    tm = TaskManager(include_path=tasks_dir(), include_defaults=False,
                     metadata={"data_dir": str(FIXTURES), "ppl_window": WINDOW, **metadata})
    res = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], task_manager=tm, batch_size=4,
                                  device="cpu")
    return res["results"][TASK]


# ---------------------------------------------------------------- the fixture itself and the fingerprint


def test_the_tokenizer_looks_like_gpt2s(tok):
    assert tok.pad_token is None and tok.model_max_length == 1024 and len(tok) == 400
    assert tok.eos_token == tok.bos_token == tok.unk_token == EOS and tok.eos_token_id == len(tok) - 1
    assert tok.convert_ids_to_tokens(0) == "!" and tok("Hi there")["input_ids"] == tok.encode("Hi there")


def _rebuilt(tok, edit=None, **special):
    """A copy of `tok` whose backend JSON went through `edit`, with special tokens `special` (default GPT-2's)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(tok.backend_tokenizer.to_str())
    if edit is not None:
        edit(data)
    special = {"eos_token": EOS, "bos_token": EOS, "unk_token": EOS, **special}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), **special)


def old_fingerprint(tokenizer) -> str:
    """memdec 0.1's fingerprint (vocab + special tokens map, pad token included), written out again here."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def test_fingerprint_covers_token_ids_not_padding(gpt2_style, tok):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import configure_pad_token

    from memdec.inference.mixing import tokenizer_fingerprint as fp

    f = fp(tok)
    assert f.startswith("sha256-v2:") and fp(_rebuilt(tok)) == f
    # as lm-eval's HFLM does it: pad = UNK (GPT-2's case), or a new <|pad|> token when there is no UNK/EOS
    hflm = HFLM(pretrained=gpt2_style["base"], device="cpu", batch_size=1).tokenizer
    assert hflm.pad_token == EOS and fp(hflm) == f
    assert fp(configure_pad_token(AutoTokenizer.from_pretrained(gpt2_style["tok"]))) == f
    added = AutoTokenizer.from_pretrained(gpt2_style["tok"])
    added.add_special_tokens({"pad_token": "<|pad|>"})
    assert len(added) == len(tok) + 1 and added.pad_token_id == len(tok) and fp(added) == f
    bos = AutoTokenizer.from_pretrained(gpt2_style["tok"], add_bos_token=True)  # HFLM's add_bos_token=True
    assert bos("hi")["input_ids"][0] == tok.bos_token_id != tok("hi")["input_ids"][0] and fp(bos) == f
    # one merge, one vocabulary entry, the EOS id: each changes the fingerprint
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    in_merges = {part for m in merges for part in (m.split(" ", 1) if isinstance(m, str) else m)}
    rare = next(t for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if t not in in_merges)

    def drop_last_merge(data):
        data["model"]["merges"] = data["model"]["merges"][:-1]

    def rename_one_entry(data):
        data["model"]["vocab"]["<|renamed|>"] = data["model"]["vocab"].pop(rare)

    assert fp(_rebuilt(tok, drop_last_merge)) != f
    assert fp(_rebuilt(tok, rename_one_entry)) != f
    assert fp(_rebuilt(tok, eos_token="!")) != f


def test_fingerprints_of_older_memdec_are_accepted(tiny, tok):
    from memdec.inference.mixing import TokenizerMismatchError, check_fingerprint

    hflm = AutoTokenizer.from_pretrained(tok.name_or_path)
    hflm.pad_token_id = hflm.unk_token_id  # what lm-eval's HFLM does to GPT-2's tokenizer
    assert old_fingerprint(hflm) != old_fingerprint(tok)  # the bug: the old form changed with the pad token
    check_fingerprint(hflm, old_fingerprint(tok), "datastore D")  # a datastore built by memdec 0.1
    plain = AutoTokenizer.from_pretrained(tiny["tok"])  # pad = EOS from the start
    check_fingerprint(plain, old_fingerprint(plain), "datastore D")
    with pytest.raises(TokenizerMismatchError, match=r"differs from the one datastore D was built with \(sha256:"):
        check_fingerprint(plain, old_fingerprint(tok), "datastore D")


# ---------------------------------------------------------------- windows: one default everywhere


def test_default_windows_fit_each_model(gpt2_style, run, texts, tmp_path):
    from memdec.pipeline.datastore import Datastore, build_datastore

    ds = Datastore.open(run["datastore"])
    assert (ds.manifest["window"], ds.manifest["stride"]) == (1024, 1024)  # the base's 1024 positions
    assert ds.n == len(ds.tokens) - 1 > 4 * 1024
    meta = json.loads(Path(run["memory"], "memdec.json").read_text())
    assert meta["training"]["window"] == WINDOW  # min(1024, the datastore's 1024, the memory's 256)
    small = build_datastore(gpt2_style["memory"], texts["domain"][:2], tmp_path / "small", device="cpu",
                            progress=False)  # memdec datastore defaulted to 1024 here: an error
    assert Datastore.open(small).manifest["window"] == WINDOW


def test_windows_longer_than_a_context_name_the_model(gpt2_style, run, tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["datastore", "--model", gpt2_style["memory"], "--corpus", DOMAIN, "--out", str(out),
                 "--window", "1024"]) == 2
    _one_line_error(capsys, "memdec datastore: error:", f"model {gpt2_style['memory']}",
                    "window 1024 is longer than its context length 256")
    assert not out.exists() and not Path(str(out) + ".partial").exists()
    law = str(FIXTURES / f"{TASK}.jsonl")
    assert main(["tune-lambda", "--base", gpt2_style["base"], "--memory", run["memory"], "--data", law,
                 "--window", "1024"]) == 2
    _one_line_error(capsys, "memdec tune-lambda: error:", f"memory {run['memory']}: window 1024 is longer than its "
                    "context length 256")


# ---------------------------------------------------------------- baselines and the Memory Decoder in memdec-eval


def _knn_logp(model, keys_all: torch.Tensor, values: torch.Tensor, k: int, temp: float, lmbda: float):
    """ids [1, T] -> float64 log(lmbda p_kNN + (1 - lmbda) p_base) [T, V] by brute force over every key."""
    from memdec.pipeline.keys import capture_keys

    def logp(ids):
        with torch.no_grad(), capture_keys(model) as cap:
            p_base = torch.softmax(model(ids).logits[0], -1)
            keys = cap.pop()[0]
        p_knn = torch.zeros_like(p_base)
        for t in range(ids.shape[1]):
            dist = ((keys_all - keys[t]) ** 2).sum(-1)
            top = dist.argsort()[:k]
            p_knn[t].index_add_(0, values[top], torch.softmax(-dist[top] / temp, 0))
        return torch.log(lmbda * p_knn + (1 - lmbda) * p_base)

    return logp


def test_knnlm_in_memdec_eval_uses_the_datastore_of_memdec_datastore(gpt2_style, run, ref, tok, tmp_path):
    """The issue's command: `memdec-eval --model knnlm --model_args pretrained=B,datastore=DS` (was refused)."""
    from memdec.pipeline.datastore import Datastore

    k, lmbda = 8, 0.25
    out = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "memdec.harness", "--model", "knnlm", "--model_args",
           f"pretrained={gpt2_style['base']},datastore={run['datastore']},k={k},lmbda={lmbda}", "--tasks", TASK,
           "--metadata", json.dumps({"data_dir": str(FIXTURES), "ppl_window": WINDOW}), "--device", "cpu",
           "--batch_size", "4", "--output_path", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(out.rglob("results_*.json")).read_text())["results"][TASK]["token_perplexity,none"]
    ds = Datastore.open(run["datastore"])
    keys_all = torch.from_numpy(ds.keys().astype(np.float64))
    values = torch.from_numpy(ds.values.astype(np.int64))
    tokens = law_tokens(tok)
    lp = hand_logprobs(_knn_logp(ref["base"], keys_all, values, k, 1.0, lmbda), tokens, WINDOW, WINDOW // 2)
    base = hand_logprobs(lambda ids: torch.log_softmax(ref["base"](ids).logits[0], -1), tokens, WINDOW, WINDOW // 2)
    assert len(tokens) > WINDOW + WINDOW // 2  # at least two windows
    assert got == pytest.approx(math.exp(-lp.mean()), rel=1e-4)
    assert abs(got - math.exp(-base.mean())) > 1e-2 * got  # the neighbours changed it


def test_tune_knnlm_matches_a_brute_force_knnlm(gpt2_style, run, ref, tok, tmp_path):
    """tune-knnlm with a GPT-2-style tokenizer (no pad token) on the datastore of `memdec datastore`: every grid
    cell equals the float64 brute-force kNN-LM over every key, window by window."""
    from memdec.pipeline.datastore import Datastore

    out = tmp_path / "knn.json"
    law = str(FIXTURES / f"{TASK}.jsonl")
    temps, lmbdas = [1.0, 4.0], [0.0, 0.25]
    assert main(["tune-knnlm", "--base", gpt2_style["base"], "--datastore", run["datastore"], "--data", law,
                 "--k", "8", "--grid", "0,0.25", "--temperatures", "1,4", "--window", str(WINDOW), "--device", "cpu",
                 "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    ds = Datastore.open(run["datastore"])
    keys_all = torch.from_numpy(ds.keys().astype(np.float64))
    values = torch.from_numpy(ds.values.astype(np.int64))
    tokens = law_tokens(tok)
    for ti, temp in enumerate(temps):
        for li, lmbda in enumerate(lmbdas):
            lp = hand_logprobs(_knn_logp(ref["base"], keys_all, values, 8, temp, lmbda), tokens, WINDOW, WINDOW // 2)
            assert got["perplexities"][ti][li] == pytest.approx(math.exp(-lp.mean()), rel=1e-4), (temp, lmbda)


def _mixture_logp(ref, lmbda: float):
    def logp(ids):
        pb, pm = (torch.softmax(ref[m](ids).logits[0], -1) for m in ("base", "memory"))
        return torch.log(lmbda * pm + (1 - lmbda) * pb)

    return logp


def test_memdec_in_memdec_eval_equals_a_float64_mixture(gpt2_style, run, ref, tok, capsys):
    """No max_length given: the memory's 256 positions bound it (the base takes 1024)."""
    lmbda = 0.3
    got = evaluate("memdec", f"pretrained={gpt2_style['base']},memory={run['memory']},lmbda={lmbda}")
    assert "memdec: max_length 256, the context length of memory" in capsys.readouterr().err
    tokens = law_tokens(tok)
    lp = hand_logprobs(_mixture_logp(ref, lmbda), tokens, WINDOW, WINDOW // 2)
    assert got["token_perplexity,none"] == pytest.approx(math.exp(-lp.mean()), rel=1e-5)


def test_incontext_rag(gpt2_style, tok, ref, tmp_path):
    """Prepend the retrieved chunk + separator, score only each block's tokens: float64 by hand; and in lm-eval."""
    from lm_eval.api.instance import Instance

    from baselines.incontext_rag import InContextRAG

    stride, query, max_doc = 4, 12, 40
    rag = InContextRAG(pretrained=gpt2_style["base"], corpus=DOMAIN, stride=stride, query_tokens=query,
                       max_doc_tokens=max_doc, chunk_tokens=64, device="cpu", batch_size=4,
                       cache_dir=str(tmp_path / "cache"))
    assert rag.tokenizer.pad_token_id == tok.eos_token_id  # HFLM's pad for GPT-2 (= UNK = EOS)
    text = read_fixture(TASK)[0]["text"]
    cut = text.index(" ", 80)
    ctx_text, cont_text = text[:cut], text[cut:cut + 120]
    ctx = tok(ctx_text, add_special_tokens=False)["input_ids"]
    full = tok(ctx_text + cont_text, add_special_tokens=False)["input_ids"]
    assert full[: len(ctx)] == ctx
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    expected, hits = 0.0, 0
    for p in range(len(ctx), len(full), stride):
        e = min(p + stride, len(full))
        (doc,) = rag.index.retrieve([tok.decode(full[max(0, p - query) : p])])
        prefix = [] if doc is None else doc[:max_doc].tolist() + sep
        hits += doc is not None
        with torch.no_grad():
            logp = torch.log_softmax(ref["base"](torch.tensor([prefix + full[: e - 1]])).logits[0], -1)
        expected += sum(float(logp[len(prefix) + t - 1, full[t]]) for t in range(p, e))
    assert hits >= 2
    (got,) = rag.loglikelihood([Instance("loglikelihood", {}, (ctx_text, cont_text), 0)])
    assert got[0] == pytest.approx(expected, abs=1e-4)
    res = evaluate("incontext_rag", f"pretrained={gpt2_style['base']},corpus={DOMAIN},stride=64,"
                   f"max_doc_tokens=64,chunk_tokens=64,cache_dir={tmp_path / 'cache'}")
    base = hand_logprobs(lambda ids: torch.log_softmax(ref["base"](ids).logits[0], -1), law_tokens(tok), WINDOW,
                         WINDOW // 2)
    assert math.isfinite(res["token_perplexity,none"]) and res["token_perplexity,none"] != pytest.approx(
        math.exp(-base.mean()), rel=1e-3)


# ---------------------------------------------------------------- tune-lambda, generate, dapt / lora


def test_tune_lambda_defaults_to_the_shorter_context(gpt2_style, run, ref, tok, tmp_path, capsys):
    """The README's example without --window: window 256 (the memory's context), stride 128."""
    memory = shutil.copytree(run["memory"], tmp_path / "memory")
    law = str(FIXTURES / f"{TASK}.jsonl")
    assert main(["tune-lambda", "--base", gpt2_style["base"], "--memory", str(memory), "--data", law,
                 "--grid", "0,0.5,1", "--device", "cpu", "--write"]) == 0
    out = capsys.readouterr().out
    assert f"window {WINDOW}, stride {WINDOW // 2}" in out
    tuning = json.loads((memory / "memdec.json").read_text())["lmbda_tuning"]
    tokens = law_tokens(tok)
    for lmbda, ppl in zip(tuning["grid"], tuning["perplexities"], strict=True):
        lp = hand_logprobs(_mixture_logp(ref, lmbda), tokens, WINDOW, WINDOW // 2)
        assert ppl == pytest.approx(math.exp(-lp.mean()), rel=1e-5)


def test_generate_batches_prompts_without_a_pad_token(gpt2_style, run, ref, tok, texts, capsys):
    lmbda, steps = 0.4, 5
    prompts = [texts["domain"][0][:60], texts["domain"][1][:25]]  # two lengths: the batch is padded
    assert main(["generate", "--base", gpt2_style["base"], "--memory", run["memory"], "--lmbda", str(lmbda),
                 "--device", "cpu", "--max-new-tokens", str(steps), *[a for p in prompts for a in ("--prompt", p)]]) == 0
    printed = capsys.readouterr().out
    for p in prompts:
        new = reference_generate(ref, tok.encode(p), lmbda, steps, tok.eos_token_id)
        assert p + tok.decode(new, skip_special_tokens=True) in printed


def test_dapt_and_lora(gpt2_style, tok, tmp_path):
    """Default window min(1024, 1024 positions) = 1024; the LoRA adapter's size by hand; both load in lm-eval."""
    from lm_eval.models.huggingface import HFLM

    from memdec.pipeline.data import tokenize

    common = ["--model", gpt2_style["base"], "--corpus", DOMAIN, "--steps", "4", "--batch-size", "2",
              "--mixed-precision", "no"]
    assert main(["dapt", *common, "--out", str(tmp_path / "dapt"), "--lr", "3e-3"]) == 0
    assert main(["lora", *common, "--out", str(tmp_path / "lora"), "--rank", "4", "--target-modules", "c_attn"]) == 0
    for name in ("dapt", "lora"):
        assert json.loads((tmp_path / name / "memdec.json").read_text())["training"]["window"] == 1024
    info = json.loads((tmp_path / "lora" / "baseline.json").read_text())
    assert info["trainable_params"] == 2 * 4 * (64 + 3 * 64)  # 2 layers of c_attn: 64 -> 192
    doc = [json.loads(line)["text"] for line in open(DOMAIN, encoding="utf-8")][0][:800]
    ids = torch.tensor([tokenize([doc], tok, progress=False).tolist()])

    def nll(model) -> float:
        with torch.no_grad():
            return float(model(ids, labels=ids).loss)

    before = nll(AutoModelForCausalLM.from_pretrained(gpt2_style["base"]).eval())
    dapt = HFLM(pretrained=str(tmp_path / "dapt"), device="cpu", batch_size=2)
    lora = HFLM(pretrained=gpt2_style["base"], peft=str(tmp_path / "lora"), device="cpu", batch_size=2)
    assert nll(dapt.model) < before - 0.1
    assert sum(p.numel() for n, p in lora.model.named_parameters() if "lora_" in n) == info["trainable_params"]
