"""memdec/inference/router.py: the routed mixture, forced weights, training, save/load, resume, bad inputs, memdec-eval."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from memdec.inference import router as R
from memdec.inference.joint import MemoryDecoder

TRAIN = dict(window=32, stride=16, steps=40, save_every=10, batch_tokens=256, hidden=16, progress=False, device="cpu")


@pytest.fixture(scope="module")
def router_data(tmp_path_factory, texts) -> dict[str, str]:
    """Held-out-style text files: domain and general documents (valid parts are their last 10 %)."""
    root = tmp_path_factory.mktemp("rdata")
    paths = {}
    for name, docs in (("domain", texts["domain"][:6]), ("general", texts["general"][:12])):
        paths[name] = str(root / f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps({"text": t[:1500]}) + "\n" for t in docs)
    return paths


@pytest.fixture(scope="module")
def trained(tiny, router_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("router") / "r"
    return R.train_router(tiny["base"], tiny["memory"], [router_data["domain"], router_data["general"]], out,
                          cache_dir=out.parent / "cache", **TRAIN)


def test_routed_mixture_matches_float64():
    g = torch.Generator().manual_seed(0)
    base = torch.log_softmax(torch.randn(3, 5, 11, generator=g), -1)
    mem = torch.log_softmax(3 * torch.randn(3, 5, 11, generator=g), -1)
    lw = torch.log_softmax(torch.randn(3, 5, 2, generator=g), -1)
    w = lw.double().exp().numpy()
    want = np.log(w[..., :1] * base.double().exp().numpy() + w[..., 1:] * mem.double().exp().numpy())
    got = R.routed_logprobs(base, mem, lw)
    assert np.allclose(got.double().numpy(), want, atol=1e-5)
    t = torch.randint(0, 11, (3, 5), generator=g)
    bt, mt = base.gather(-1, t[..., None])[..., 0], mem.gather(-1, t[..., None])[..., 0]
    assert np.allclose(R.routed_target_logprobs(bt, mt, lw).numpy(), np.take_along_axis(want, t[..., None].numpy(), -1)[..., 0],
                       atol=1e-5)
    # scalars: largest probability and entropy, lmdeploy's order (base max, base entropy, memory max, memory entropy)
    s = R.scalar_features(base, mem).double().numpy()
    p = base.double().exp().numpy()
    assert np.allclose(s[..., 0], p.max(-1), atol=1e-6) and np.allclose(s[..., 1], -(p * np.log(p)).sum(-1), atol=1e-5)
    # the threshold: memory weight <= t -> exactly (1, 0)
    th = R.apply_threshold(lw, 0.5)
    off = lw[..., 1].exp() <= 0.5
    assert torch.equal(th[off], torch.tensor([0.0, -math.inf]).expand(int(off.sum()), 2))
    assert torch.equal(th[~off], lw[~off])


def _forced_router(tiny, base_weight: float | None) -> R.Router:
    base = AutoModelForCausalLM.from_pretrained(tiny["base"])
    mem = AutoModelForCausalLM.from_pretrained(tiny["memory"])
    net = R.RouterNetwork("both", True, R.hidden_size(base), R.hidden_size(mem), layers=2, hidden=8)
    torch.nn.init.normal_(net.mlp[0].weight)
    if base_weight is not None:
        with torch.no_grad():
            net.mlp[-1].weight.zero_()
            net.mlp[-1].bias.copy_(torch.tensor([0.0, -1e30]) if base_weight == 1 else torch.tensor([-1e30, 0.0]))
    return R.Router(net, {"inputs": "both"}, path="forced")


@pytest.mark.parametrize("case", ["base", "memory", "threshold1"])
def test_forced_weights_reproduce_base_or_memory_exactly(tiny, case):
    joint = MemoryDecoder.from_pretrained(tiny["base"], tiny["memory"], device="cpu", dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    if case == "threshold1":
        joint.router = _forced_router(tiny, None)
        joint.router.threshold = 1.0
    else:
        joint.router = _forced_router(tiny, 1 if case == "base" else 0)
    got = joint.logprobs(ids)
    want = joint.memory_logprobs(ids) if case == "memory" else joint.base_logprobs(ids)
    assert torch.equal(got, want)
    # generation on the routed mixture follows the same model
    gen = joint.generate(ids, max_new_tokens=4)
    ref = MemoryDecoder(joint.base, joint.memory, joint.tokenizer, lmbda=1.0 if case == "memory" else 0.0)
    assert torch.equal(gen, ref.generate(ids, max_new_tokens=4))


def test_training_beats_fixed_lmbda_and_round_trips(trained, tiny):
    cfg = json.loads((trained / R.ROUTER_CONFIG).read_text())
    ref = cfg["valid_reference_losses"]
    assert cfg["final_valid_loss"] < ref["best_fixed"] < min(ref["base"], ref["memory"]) + 1e-9
    assert cfg["final_valid_loss"] < ref["lmbda_init"]
    hist = [h["valid_loss"] for h in cfg["training"]["history"]]
    assert min(hist) == pytest.approx(cfg["final_valid_loss"]) and min(hist) < ref["lmbda_init"]
    assert cfg["base_hidden_size"] == 64 and cfg["memory_hidden_size"] == 32
    assert not (trained.parent / "r.partial").exists() and sorted(p.name for p in trained.iterdir()) == sorted(
        [R.ROUTER_CONFIG, R.ROUTER_WEIGHTS])
    # the saved (normalisation folded) router gives the valid loss it recorded, from the cached features
    router = R.Router.load(trained)
    feats = {w: [R._load_features(p) for p in sorted((trained.parent / "cache").glob(f"router-{w}_*"))]
             for w in ("base", "memory")}
    assert len(feats["base"]) == 2
    losses = []
    # cache names hash the model too, so pair each stream's two files by their length, not by name
    by_len = lambda fs: sorted(fs, key=lambda f: len(f["logp"]))  # noqa: E731
    for fb, fm in zip(by_len(feats["base"]), by_len(feats["memory"]), strict=True):
        assert len(fb["logp"]) == len(fm["logp"])
        cut = int(round(len(fb["logp"]) * 0.9))
        part = {k: {n: v[cut:] for n, v in f.items()} for k, f in (("b", fb), ("m", fm))}
        lw = router.feature_log_weights(part["b"], part["m"]).double()
        lp = R.routed_target_logprobs(torch.from_numpy(part["b"]["logp"]), torch.from_numpy(part["m"]["logp"]), lw)
        losses.append(float(-lp.mean()))
    assert np.mean(losses) == pytest.approx(cfg["final_valid_loss"], rel=1e-5)


def test_fold_normalization_keeps_the_function(tmp_path):
    g = torch.Generator().manual_seed(1)
    for proj in (0, 4):
        net = R.RouterNetwork("both", True, 6, 5, layers=2, hidden=8, scalar_proj_dim=proj)
        x = torch.randn(7, 15, generator=g) * 3 + 1
        net.set_normalization(torch.randn(15, generator=g), torch.rand(15, generator=g) + 0.5)
        before = net.forward_raw(x)
        R.save_router(net, {"inputs": "both", "scalars": True, "base_hidden_size": 6, "memory_hidden_size": 5,
                            "layers": 2, "hidden": 8, "scalar_proj_dim": proj}, tmp_path / f"r{proj}")
        loaded = R.Router.load(tmp_path / f"r{proj}").net
        assert torch.allclose(loaded.forward_raw(x), before, atol=1e-5)


def test_resume_after_interruption_gives_the_same_router(tiny, router_data, tmp_path, monkeypatch, trained):
    out = tmp_path / "r"
    calls = {"n": 0}
    real = R._nll

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 25:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(R, "_nll", dying)
    cache = trained.parent / "cache"
    with pytest.raises(RuntimeError, match="killed"):
        R.train_router(tiny["base"], tiny["memory"], [router_data["domain"], router_data["general"]], out,
                       cache_dir=cache, **TRAIN)
    assert (tmp_path / "r.partial" / "checkpoint" / "state.json").exists() and not out.exists()
    monkeypatch.setattr(R, "_nll", real)
    R.train_router(tiny["base"], tiny["memory"], [router_data["domain"], router_data["general"]], out,
                   cache_dir=cache, **TRAIN)
    from safetensors.torch import load_file

    a, b = load_file(str(out / R.ROUTER_WEIGHTS)), load_file(str(trained / R.ROUTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_router_checked_against_the_models(trained, tiny):
    with pytest.raises(ValueError, match="hidden size 64.*hidden size 32") as e:
        MemoryDecoder.from_pretrained(tiny["memory"], tiny["memory"], router=str(trained), device="cpu")
    assert "\n" not in str(e.value)
    other = AutoModelForCausalLM.from_pretrained(tiny["other_tok_model"])
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="tokenizer"):
        R.Router.load(trained, tokenizer=AutoTokenizer.from_pretrained(tiny["other_tok_model"]))
    del other
    with pytest.raises(ValueError, match="together"):
        MemoryDecoder.from_pretrained(tiny["base"], tiny["memory"], lmbda=0.3, router=str(trained))
    with pytest.raises(ValueError, match="router_threshold must be in"):
        MemoryDecoder.from_pretrained(tiny["base"], tiny["memory"], router=str(trained), router_threshold=1.5)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memdec.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1])})


@pytest.mark.parametrize("case", ["missing router", "threshold", "lmbda and router", "missing memory", "bad data",
                                  "export base-only"])
def test_cli_bad_inputs(case, tiny, trained, router_data, tmp_path):
    gen = ["generate", "--base", tiny["base"], "--memory", tiny["memory"], "--prompt", "x", "--max-new-tokens", "2"]
    out = tmp_path / "o"
    args, words = {
        "missing router": (gen + ["--router", str(tmp_path / "nope")], "no such folder"),
        "threshold": (gen + ["--router", str(trained), "--router-threshold", "1.5"], "router_threshold"),
        "lmbda and router": (gen + ["--router", str(trained), "--lmbda", "0.2"], "together"),
        "missing memory": (["train-router", "--base", tiny["base"], "--memory", str(tmp_path / "m"), "--data",
                            router_data["domain"], "--out", str(out)], "no such folder"),
        "bad data": (["train-router", "--base", tiny["base"], "--memory", tiny["memory"], "--data",
                      str(tmp_path / "none.jsonl"), "--out", str(out)], "none.jsonl"),
        "export base-only": (["export-router", str(trained), "--out", str(out)], None),
    }[case]
    if case == "export base-only":  # a base-only router has no lmdeploy input mode
        cfg = json.loads((trained / R.ROUTER_CONFIG).read_text())
        bad = tmp_path / "base_only"
        bad.mkdir()
        net = R.RouterNetwork("base", True, 64, 32, 1)
        R.save_router(net, {**cfg, "inputs": "base", "layers": 1}, bad)
        args, words = ["export-router", str(bad), "--out", str(out)], "no lmdeploy input_mode"
    proc = _cli(args, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("memdec "), proc.stderr
    assert not out.exists() and not (tmp_path / "o.partial").exists()


def test_export_lmdeploy(trained, tmp_path):
    out = R.export_router(trained, tmp_path / "lmd", threshold=0.1)
    cfg = json.loads((out / "router_config.json").read_text())
    assert cfg == {"num_layers": 2, "input_mode": "both", "use_scalars": True, "scalar_proj_dim": 0,
                   "hidden_dim": 16, "dropout": 0.0}
    from safetensors.torch import load_file

    sd = load_file(str(out / "router.safetensors"))
    assert sorted(sd) == ["mlp.0.bias", "mlp.0.weight", "mlp.3.bias", "mlp.3.weight"]
    assert sd["mlp.0.weight"].shape == (16, 64 + 32 + 4)
    fusion = json.loads((out / "memory_fusion_config.json").read_text())
    assert fusion["lambda_base_only_threshold"] == 0.1 and fusion["routers"]["lmd"]["path"] == "lmd"


def test_memdec_eval_routed_perplexity_matches_float64(tiny, trained, tmp_path, texts):
    from memdec.eval.models import MemDecLM

    lm = MemDecLM(pretrained=tiny["base"], memory=tiny["memory"], router=str(trained), device="cpu",
                  batch_size=2, dtype="float32")
    assert lm.get_model_info()["router"] == str(trained) and lm.get_model_info()["lmbda"] is None
    from lm_eval.api.instance import Instance

    text = texts["domain"][0][:300]
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    tok = lm.tokenizer
    ids = torch.tensor([[tok.eos_token_id] + tok.encode(text)])
    router = R.Router.load(trained)
    router.net.double()
    with torch.no_grad():
        outs = []
        for path in (tiny["base"], tiny["memory"]):
            m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
            o = m(ids, output_hidden_states=True)
            outs.append((torch.log_softmax(o.logits[0, :-1, : len(tok)], -1), o.hidden_states[-1][0, :-1]))
        (bl, bh), (ml, mh) = outs
        lw = router.net(bh, mh, R.scalar_features(bl, ml).double())
        p = lw[:, :1].exp() * bl.exp() + lw[:, 1:].exp() * ml.exp()
        want = float(torch.log(p).gather(-1, ids[0, 1:, None]).sum())
    assert got == pytest.approx(want, abs=1e-3)


def test_report_has_a_router_row(tmp_path):
    import reports

    src = Path(__file__).parent / "data" / "results" / "gpt2" / "results_2026-01-01T11-00-00.000001.json"
    data = json.loads(src.read_text())
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "results_fixed.json").write_text(json.dumps(data))
    data["config"]["model_args"] = {"pretrained": "openai-community/gpt2", "memory": "runs/memdec-gpt2-bio",
                                    "router": "runs/router-gpt2-bio"}
    data["config"]["lmbda"] = None
    data["results"]["memdec_wikitext103"]["token_perplexity,none"] = 21.5
    (tmp_path / "runs" / "results_router.json").write_text(json.dumps(data))
    df = reports.load_results([tmp_path / "runs"])
    t = reports.perplexity_table(df)
    assert list(t.index) == ["+MemDec", "+MemDec (router)"]
    assert t.at["+MemDec (router)", "gpt2"] == 21.5 and t.at["+MemDec", "gpt2"] == 14.57


def test_fast_paths_with_a_router_match_the_plain_paths(tiny, trained, texts):
    """The fast scoring path (GraphedForward hidden=True; plain forward on CPU) and the static-cache decoder
    (GraphedDecoder hidden=True; eager on CPU) give the plain paths' numbers with a router."""
    from lm_eval.api.instance import Instance

    from memdec.eval.models import MemDecLM

    common = dict(pretrained=tiny["base"], memory=tiny["memory"], router=str(trained), router_threshold=0.2,
                  device="cpu", batch_size=2, dtype="float32")
    fast, plain = MemDecLM(**common), MemDecLM(**common, fast=False)
    assert fast.fast_scoring and not plain.fast_scoring
    pairs = [("The river", " flows north"), ("Viral conjunctivitis", " due to adenovirus.")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got, want = fast.loglikelihood(reqs, disable_tqdm=True), plain.loglikelihood(reqs, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in want]
    assert [v for v, _ in got] == pytest.approx([v for v, _ in want], abs=1e-4)
    roll = [Instance("loglikelihood_rolling", {}, (texts["domain"][0][:600],), 0)]
    assert fast.loglikelihood_rolling(roll, disable_tqdm=True) == pytest.approx(
        plain.loglikelihood_rolling(roll, disable_tqdm=True), abs=1e-3)
    joint = fast.joint
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    joint.fast_decode = True
    quick = joint.generate(ids, max_new_tokens=6)
    assert "_decoders" in joint.__dict__  # the GraphedDecoder ran
    joint.fast_decode = False
    assert torch.equal(quick, joint.generate(ids, max_new_tokens=6))
