"""memdec.pipeline.train: the sparse KL + CE loss against dense float64 references, training, resume, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from memdec.core.formats import partial_dir
from memdec.pipeline.train import knn_batch, latest_checkpoint, memdec_loss, train


def _random_case(seed: int = 0, b: int = 3, length: int = 7, vocab: int = 11, support: int = 4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, length, vocab, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, vocab, (b, length), generator=g)
    score = torch.rand(b, length, generator=g) > 0.3
    score[:, 0] = False
    n = int(score[:, 1:].sum())
    lens = torch.randint(1, support + 1, (n,), generator=g)
    knn_ids = torch.zeros(n, support, dtype=torch.long)
    knn_probs = torch.zeros(n, support, dtype=torch.float64)
    for r in range(n):
        knn_ids[r, : lens[r]] = torch.randperm(vocab, generator=g)[: lens[r]]
        w = torch.rand(int(lens[r]), generator=g, dtype=torch.float64) + 0.05
        knn_probs[r, : lens[r]] = w / w.sum()
    return logits, ids, score, knn_ids, knn_probs


def _dense_reference(logits, ids, score, knn_ids, knn_probs, beta):
    """Independent float64 computation: explicit loops, dense p_knn over the vocabulary."""
    logits = logits.double()
    vocab = logits.shape[-1]
    kls, ces = [], []
    r = 0
    for b in range(ids.shape[0]):
        for j in range(1, ids.shape[1]):
            if not score[b, j]:
                continue
            logq = torch.log_softmax(logits[b, j - 1], dim=-1)
            p = torch.zeros(vocab, dtype=torch.float64)
            for i, pr in zip(knn_ids[r].tolist(), knn_probs[r].double().tolist(), strict=True):
                p[i] += pr
            nz = p > 0
            kls.append(float((p[nz] * (p[nz].log() - logq[nz])).sum()))
            ces.append(float(-logq[ids[b, j]]))
            r += 1
    return beta * np.mean(kls) + (1 - beta) * np.mean(ces), np.mean(kls), np.mean(ces)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_sparse_kl_matches_dense_float64(beta):
    logits, ids, score, knn_ids, knn_probs = _random_case(seed=int(beta * 10))
    loss, stats = memdec_loss(logits.float(), ids, score, knn_ids, knn_probs.float(), beta)
    want, kl, ce = _dense_reference(logits, ids, score, knn_ids, knn_probs, beta)
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert stats["ce"] == pytest.approx(ce, rel=1e-5)
    if beta > 0:
        assert stats["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_training_loss_and_gradients_equal_a_plain_float64_formula(beta, monkeypatch):
    """The step loop's loss (flat logit rows, blockwise log-partition) and memdec_loss: the same sum and
    the same gradient as autograd through log_softmax in float64."""
    from memdec.pipeline import train as train_mod
    from memdec.pipeline.train import _step_loss

    monkeypatch.setattr(train_mod, "LSE_BLOCK", 13 * 3)  # blocks of 3 rows
    logits, ids, score, knn_ids, knn_probs = _random_case(seed=11 + int(beta * 10), b=4, length=9, vocab=13)
    sel = score[:, 1:]

    def plain(x):
        logq = torch.log_softmax(x[:, :-1][sel], -1)
        ce = -logq.gather(1, ids[:, 1:][sel][:, None]).squeeze(1)
        p = knn_probs
        kl = (p * (torch.where(p > 0, p, torch.ones_like(p)).log() - logq.gather(1, knn_ids))).sum(-1)
        return (beta * kl + (1 - beta) * ce).sum()

    ref_x = logits.clone().requires_grad_(True)
    want = plain(ref_x)
    want.backward()
    b_idx, j_idx = sel.nonzero(as_tuple=True)
    for fn in ("step", "api"):
        x = logits.clone().requires_grad_(True)
        if fn == "step":
            loss, sums = _step_loss(x, b_idx * ids.shape[1] + j_idx, ids[:, 1:][sel], knn_ids.int(),
                                    knn_probs, beta, None)
            assert sums[0].item() == pytest.approx(want.item(), rel=1e-12)
        else:
            loss, _ = memdec_loss(x, ids, score, knn_ids, knn_probs, beta, reduction="sum")
        loss.backward()
        assert loss.item() == pytest.approx(want.item(), rel=1e-12)
        torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-10, atol=1e-12)


def test_blockwise_log_partition_in_bfloat16_matches_float32(monkeypatch):
    from memdec.pipeline import train as train_mod
    from memdec.pipeline.train import _LogSumExp

    monkeypatch.setattr(train_mod, "LSE_BLOCK", 5000 * 4)

    x = (torch.randn(37, 5000, generator=torch.Generator().manual_seed(0)) * 4).bfloat16().requires_grad_(True)
    g = torch.rand(37)
    out = _LogSumExp.apply(x)
    (out * g).sum().backward()
    ref = x.detach().float().requires_grad_(True)
    (torch.logsumexp(ref, -1) * g).sum().backward()
    assert out.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, torch.logsumexp(ref.detach(), -1), rtol=0, atol=1e-5)
    torch.testing.assert_close(x.grad.float(), ref.grad, rtol=1e-2, atol=1e-6)


def test_kl_is_zero_when_model_equals_targets():
    logits, ids, score, knn_ids, knn_probs = _random_case(seed=5, vocab=6)
    sel = score[:, 1:]
    pred = torch.log_softmax(logits[:, :-1][sel], -1)
    full_ids = torch.arange(6).expand(pred.shape[0], 6)
    loss, stats = memdec_loss(logits, ids, score, full_ids, pred.exp(), beta=1.0)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)


def test_beta_zero_equals_torch_cross_entropy():
    logits, ids, score, _, _ = _random_case(seed=3)
    loss, _ = memdec_loss(logits.float(), ids, score, beta=0.0)
    sel = score[:, 1:]
    want = torch.nn.functional.cross_entropy(logits[:, :-1][sel].float(), ids[:, 1:][sel])
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_padded_vocabulary_is_cut_to_the_tokenizer():
    logits, ids, score, knn_ids, knn_probs = _random_case(seed=4, vocab=9)
    padded = torch.cat([logits, torch.full((*logits.shape[:2], 3), 50.0, dtype=logits.dtype)], dim=-1)
    a, _ = memdec_loss(padded, ids, score, knn_ids, knn_probs, 0.5, vocab_size=9)
    b, _ = memdec_loss(logits, ids, score, knn_ids, knn_probs, 0.5)
    assert a.item() == pytest.approx(b.item(), rel=1e-9)


def test_knn_batch_packs_csr_rows_in_position_order():
    from memdec.pipeline.data import Window

    class FakeTargets:  # CSR rows per the targets contract: row r <-> target position r + 1
        offsets = np.array([0, 1, 3, 4, 6, 7], dtype=np.int64)
        ids = np.array([5, 1, 2, 7, 3, 4, 9], dtype=np.int32)
        probs = np.array([1, 0.25, 0.75, 1, 0.5, 0.5, 1], dtype=np.float16)

        def rows(self, start, stop):
            o = self.offsets[start : stop + 1]
            return o, self.ids[o[0] : o[-1]], self.probs[o[0] : o[-1]]

    ids, probs = knn_batch(FakeTargets(), [Window(0, 3, 1), Window(2, 6, 3)])  # positions 1,2 then 3,4,5
    assert ids.tolist() == [[5, 0], [1, 2], [7, 0], [3, 4], [9, 0]]
    assert probs.tolist() == [[1, 0], [0.25, 0.75], [1, 0], [0.5, 0.5], [1, 0]]


# ------------------------------------------------------------------------------------ training runs


@pytest.fixture(scope="module")
def domain_file(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("corpus") / "domain.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts["domain"]), encoding="utf-8")
    return path


def _mean_ce(model_dir, texts, window=32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memdec.inference.scoring import token_logprobs
    from memdec.pipeline.data import tokenize

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return -token_logprobs(model, tokenize(texts, tok, progress=False), window).mean()


def test_plain_finetuning_lowers_loss_and_writes_hf_dir(tiny, texts, tmp_path):
    out = train(tiny["memory"], tmp_path / "dapt", texts=texts["domain"], beta=0.0, window=32, steps=15,
                batch_size=4, lr=3e-3, save_every=5, progress=False)
    assert _mean_ce(out, texts["domain"]) < _mean_ce(tiny["memory"], texts["domain"]) - 0.1
    meta = json.loads((out / "memdec.json").read_text())
    assert meta["format_version"] == 1 and meta["datastore"] is None and meta["training"]["steps"] == 15
    assert not partial_dir(out).exists() and not (out / "checkpoints").exists()
    with pytest.raises(FileExistsError, match="already there"):
        train(tiny["memory"], out, texts=texts["domain"], beta=0.0, window=32, steps=1)


def test_lora_adapter_is_saved(tiny, texts, tmp_path):
    from peft import LoraConfig

    out = train(tiny["memory"], tmp_path / "lora", texts=texts["domain"], beta=0.0, window=32, steps=2,
                batch_size=2, peft_config=LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True),
                progress=False)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()


KILLED_RUN = """
import os, signal, sys
from memdec.pipeline.train import train
def die(step, stats):
    if step == 5:
        os.kill(os.getpid(), signal.SIGKILL)
train(sys.argv[1], sys.argv[2], corpus=sys.argv[3], beta=0.0, window=24, steps=8, batch_size=2,
      lr=3e-3, save_every=2, seed=7, progress=False, callback=die)
"""


def test_killed_run_resumes_to_the_same_weights(tiny, domain_file, tmp_path):
    from safetensors.torch import load_file

    kw = dict(corpus=str(domain_file), beta=0.0, window=24, steps=8, batch_size=2, lr=3e-3, save_every=2, seed=7,
              progress=False)
    ref = train(tiny["memory"], tmp_path / "ref", **kw)
    out = tmp_path / "resumed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_RUN), tiny["memory"], str(out), str(domain_file)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()
    assert latest_checkpoint(partial_dir(out) / "checkpoints").name == "step_0000004"
    steps_seen = []
    train(tiny["memory"], out, callback=lambda s, st: steps_seen.append(s), **kw)
    assert steps_seen == [5, 6, 7, 8]
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _run_group(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group; on timeout kill the whole group (launcher and workers)."""
    import signal

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:4])} ...: no answer in {timeout} s: {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


TWO_PROCESS_RUN = """
import sys
from memdec.pipeline.train import train
train(sys.argv[1], sys.argv[2], corpus=sys.argv[3], beta=0.0, window=24, steps=4, batch_size=2, grad_accum=2,
      lr=3e-3, seed=3, progress=False)
"""


def test_two_processes_match_one(tiny, domain_file, tmp_path):
    """Data-parallel (torchrun, 2 CPU processes, gloo) with batch 2 each = one process with batch 4."""
    from safetensors.torch import load_file

    one = train(tiny["memory"], tmp_path / "one", corpus=str(domain_file), beta=0.0, window=24, steps=4,
                batch_size=4, grad_accum=2, lr=3e-3, seed=3, progress=False)
    script = tmp_path / "run.py"
    script.write_text(TWO_PROCESS_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = _run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       str(script), tiny["memory"], str(tmp_path / "two"), str(domain_file)], env, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "memdec.json").read_text())["training"]["processes"] == 2
    a, b = load_file(str(one / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    init = load_file(str(Path(tiny["memory"]) / "model.safetensors"))
    assert any(not torch.equal(a[k], init[k]) for k in a)  # training moved the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ errors


def test_window_longer_than_model_positions(tiny, texts, tmp_path):
    with pytest.raises(ValueError, match=r"init model .*window 300 is longer than its context length 256"):
        train(tiny["memory"], tmp_path / "x", texts=texts["domain"], beta=0.0, window=300, steps=1)


def test_bad_arguments(tiny, texts, tmp_path):
    with pytest.raises(ValueError, match="needs a datastore"):
        train(tiny["memory"], tmp_path / "x", texts=texts["domain"], beta=0.5)
    with pytest.raises(ValueError, match="exactly one of"):
        train(tiny["memory"], tmp_path / "x", beta=0.0)
    with pytest.raises(ValueError, match="beta must be in"):
        train(tiny["memory"], tmp_path / "x", texts=texts["domain"], beta=1.5)
    with pytest.raises(ValueError, match="fewer than one window"):
        train(tiny["memory"], tmp_path / "x", texts=["tiny text"], beta=0.0, window=64)
    with pytest.raises(FileNotFoundError, match=r"init model .*nope: no such folder"):
        train(tmp_path / "nope", tmp_path / "x", texts=texts["domain"], beta=0.0)
    with pytest.raises(FileNotFoundError, match=r"init model .*: cannot load its tokenizer"):
        train(tmp_path, tmp_path / "x", texts=texts["domain"], beta=0.0)  # a folder without a model


def test_changed_settings_do_not_resume_silently(tiny, texts, tmp_path):
    out = tmp_path / "x"
    partial_dir(out).mkdir()
    (partial_dir(out) / "train_settings.json").write_text(json.dumps({"lr": 1.0}))
    with pytest.raises(ValueError, match=r"unfinished run with other settings \(.*lr"):
        train(tiny["memory"], out, texts=texts["domain"], beta=0.0, window=32, steps=1)
    assert Path(partial_dir(out)).exists()


# ------------------------------------------------------------------------- on a datastore's kNN targets


@pytest.fixture(scope="module")
def knn_store(tiny, texts, tmp_path_factory):
    """A datastore of the tiny base over the domain fixture texts, and its exact kNN targets."""
    from memdec.pipeline.datastore import build_datastore
    from memdec.pipeline.targets import build_targets

    root = tmp_path_factory.mktemp("knn")
    ds = build_datastore(tiny["base"], texts["domain"], root / "ds", window=32, progress=False)
    tg = build_targets(ds, out=root / "targets", k=8, temperature=4.0, progress=False)
    return {"datastore": ds, "targets": tg, "root": root}


def _dataset_loss(model_dir, store, beta=0.5, window=32):
    """The training objective over every target position of the datastore (no gradient)."""
    from transformers import AutoModelForCausalLM

    from memdec.pipeline.data import sliding_windows, window_batch
    from memdec.pipeline.datastore import Datastore
    from memdec.pipeline.targets import Targets

    ds, tg = Datastore.open(store["datastore"]), Targets.open(store["targets"])
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total = n = 0.0
    with torch.no_grad():
        for w in sliding_windows(len(ds.tokens), window):
            ids, attn, score = window_batch(np.array(ds.tokens), [w])
            ki, kp = knn_batch(tg, [w])
            loss, st = memdec_loss(model(input_ids=ids, attention_mask=attn).logits, ids, score, ki, kp, beta)
            total += loss.item() * st["positions"]
            n += st["positions"]
    return total / n


def test_memory_decoder_training_lowers_the_loss(tiny, knn_store, tmp_path):
    from transformers import AutoTokenizer

    from memdec.inference.mixing import tokenizer_fingerprint

    out = train(tiny["memory"], tmp_path / "md", datastore=knn_store["datastore"], targets=knn_store["targets"],
                beta=0.5, steps=12, batch_size=4, lr=3e-3, lmbda=0.3, progress=False)
    assert _dataset_loss(out, knn_store) < _dataset_loss(tiny["memory"], knn_store) - 0.1
    meta = json.loads((out / "memdec.json").read_text())
    assert meta["lmbda"] == 0.3 and meta["training"]["beta"] == 0.5
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(AutoTokenizer.from_pretrained(out))
    assert meta["datastore"]["n_entries"] == meta["datastore"]["n_tokens"] - 1
    assert meta["datastore"]["tokenizer_fingerprint"] == meta["tokenizer_fingerprint"]


def test_other_tokenizer_than_the_datastore(tiny, knn_store, tmp_path):
    from memdec.inference.mixing import TokenizerMismatchError

    with pytest.raises(TokenizerMismatchError, match=r"differs from the one datastore .* was built with"):
        train(tiny["other_tok_model"], tmp_path / "x", datastore=knn_store["datastore"],
              targets=knn_store["targets"], steps=1)
    assert not partial_dir(tmp_path / "x").exists()


def test_targets_of_another_datastore(tiny, texts, knn_store, tmp_path):
    from memdec.pipeline.datastore import build_datastore

    other = build_datastore(tiny["base"], texts["domain"][:3], tmp_path / "ds2", window=32, progress=False)
    with pytest.raises(ValueError, match=r"targets .*: computed from a datastore with n_entries = \d+, but datastore"):
        train(tiny["memory"], tmp_path / "x", datastore=other, targets=knn_store["targets"], steps=1)


def test_window_longer_than_init_model_on_a_datastore(tiny, knn_store, tmp_path):
    """A given window longer than the init model's context is refused; the default fits it (min with the datastore's)."""
    from transformers import AutoTokenizer

    from memdec.tiny import save_model, tiny_model

    tok = AutoTokenizer.from_pretrained(tiny["tok"])
    short = save_model(tiny_model(tok, n_layer=1, hidden=16, n_head=2, max_positions=16), tok, tmp_path / "short")
    with pytest.raises(ValueError, match=r"init model .*short: window 32 is longer than its context length 16"):
        train(short, tmp_path / "x", datastore=knn_store["datastore"], targets=knn_store["targets"], window=32,
              steps=1)
    out = train(short, tmp_path / "y", datastore=knn_store["datastore"], targets=knn_store["targets"], steps=1,
                progress=False)
    assert json.loads((out / "memdec.json").read_text())["training"]["window"] == 16


def test_targets_default_to_the_one_inside_the_datastore(tiny, texts, tmp_path):
    from memdec.pipeline.datastore import build_datastore
    from memdec.pipeline.targets import build_targets
    from memdec.pipeline.train import find_targets

    ds = build_datastore(tiny["base"], texts["domain"][:3], tmp_path / "ds", window=32, progress=False)
    with pytest.raises(FileNotFoundError, match=r"ds: no kNN targets inside it; run `memdec targets"):
        train(tiny["memory"], tmp_path / "x", datastore=ds, steps=1)
    one = build_targets(ds, k=4, temperature=2.0, progress=False)
    assert find_targets(ds) == one
    out = train(tiny["memory"], tmp_path / "md", datastore=ds, steps=1, progress=False)
    assert json.loads((out / "memdec.json").read_text())["datastore"]["targets"] == str(one)
    build_targets(ds, k=5, temperature=2.0, progress=False)
    with pytest.raises(ValueError, match=r"several kNN targets \(targets-k4-t2, targets-k5-t2\)"):
        find_targets(ds)
