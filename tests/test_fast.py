"""memdec.inference.fast: the fast scoring and decoding paths give the plain computation's numbers (float64 references)."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from memdec.inference import fast


def _ref_mixture(base_logits, other_logits, lmbda, vocab, other_temperature=1.0):
    """float64 log(lmbda * softmax(other / T) + (1 - lmbda) * softmax(base)) over the first `vocab` entries."""

    def probs(x, t):
        x = x.double()
        if x.shape[-1] < vocab:
            x = torch.cat([x, x.new_full((*x.shape[:-1], vocab - x.shape[-1]), -math.inf)], -1)
        return torch.softmax(x[..., :vocab] / t, -1)

    return torch.log(lmbda * probs(other_logits, other_temperature) + (1 - lmbda) * probs(base_logits, 1.0))


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, 40, generator=g) * 4  # padded past the vocabulary of 37
    other = torch.randn(3, 5, 37, generator=g) * 3
    targets = torch.randint(0, 37, (3, 5), generator=g)
    return base, other, targets


@pytest.mark.parametrize("chunk_bytes", [1 << 28, 4 * 37 * 2])  # one chunk / two rows per chunk
@pytest.mark.parametrize("lmbda,temp", [(0.0, 1.0), (0.3, 1.0), (0.7, 2.5), (1.0, 0.5)])
def test_mixture_target_logprobs_matches_float64(logits, monkeypatch, chunk_bytes, lmbda, temp):
    monkeypatch.setattr(fast, "CHUNK_BYTES", chunk_bytes)
    base, other, targets = logits
    got = fast.mixture_target_logprobs(base, other, targets, lmbda, 37, other_temperature=temp)
    ref = _ref_mixture(base, other, lmbda, 37, temp).gather(-1, targets[..., None]).squeeze(-1)
    assert got.dtype == torch.float32 and got.shape == targets.shape
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)


def test_bf16_logits_are_normalised_in_float32(logits):
    base, other, targets = logits
    b16, o16 = base.bfloat16(), other.bfloat16()
    got = fast.mixture_target_logprobs(b16, o16, targets, 0.4, 37)
    ref = _ref_mixture(b16.double(), o16.double(), 0.4, 37).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)


def test_target_logprobs_of_logprobs_is_identity(logits):
    base, _, targets = logits
    lp = torch.log_softmax(base[..., :37].double(), -1)
    got = fast.target_logprobs(lp.float(), targets, 37)
    torch.testing.assert_close(got.double(), lp.gather(-1, targets[..., None]).squeeze(-1), atol=1e-5, rtol=0)


def test_smaller_model_vocabulary_gets_no_mass():
    base = torch.randn(2, 6)
    other = torch.randn(2, 4)  # knows 4 of the 6 tokens
    t = torch.tensor([5, 1])
    got = fast.mixture_target_logprobs(base, other, t, 0.5, 6)
    ref = _ref_mixture(base, other, 0.5, 6).gather(-1, t[:, None]).squeeze(-1)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    assert got[0] == pytest.approx(math.log(0.5) + torch.log_softmax(base[0].double(), -1)[5].item(), abs=1e-5)
    # the per-token scoring of perplexity and tune-lambda gives such tokens no mass either
    from memdec.inference.scoring import target_logprobs

    lp = target_logprobs(other, t, 6).double()
    assert lp[0] == -math.inf and lp[1] == pytest.approx(torch.log_softmax(other[1].double(), -1)[1].item(), abs=1e-6)


@pytest.mark.parametrize("chunk_bytes", [1 << 28, 4 * 37 * 3])
def test_mixture_argmax_and_rows(logits, monkeypatch, chunk_bytes):
    monkeypatch.setattr(fast, "CHUNK_BYTES", chunk_bytes)
    base, other, _ = logits
    ref = _ref_mixture(base, other, 0.35, 37, 1.5)
    assert torch.equal(fast.mixture_argmax(base, other, 0.35, 37, 1.5), ref.argmax(-1))
    torch.testing.assert_close(fast.mixture_logprobs(base, other, 0.35, 37, 1.5).double(), ref, atol=2e-5, rtol=0)


def test_bad_shapes_and_lmbda(logits):
    base, other, targets = logits
    with pytest.raises(ValueError, match="do not match"):
        fast.target_logprobs(base, targets[:, :3], 37)
    with pytest.raises(ValueError, match="lmbda"):
        fast.mixture_target_logprobs(base, other, targets, 1.5, 37)


# ---- with tiny models ----


@pytest.fixture(scope="module")
def models(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["tok"])
    load = lambda k: AutoModelForCausalLM.from_pretrained(tiny[k]).eval()  # noqa: E731
    return {"tok": tok, "base": load("base"), "memory": load("memory"), "base_llama": load("base_llama")}


@pytest.mark.parametrize("base_name", ["base", "base_llama"])
def test_score_tokens_matches_plain_mixture(models, base_name):
    base, memory, vocab = models[base_name], models["memory"], len(models["tok"])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 20), generator=g)
    x, t = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        ref = _ref_mixture(base(x).logits, memory(x).logits, 0.25, vocab, 2.0)
    other = lambda i, a, k: fast.lm_logits(memory, i, a, k)  # noqa: E731
    lp, am, _ = fast.score_tokens(base, other, x, t, 0.25, vocab, other_temperature=2.0, greedy=True)
    torch.testing.assert_close(lp.double(), ref.gather(-1, t[..., None]).squeeze(-1), atol=2e-5, rtol=1e-5)
    assert torch.equal(am, ref.argmax(-1))
    # only the last 4 positions (logits_to_keep)
    lp4, am4, _ = fast.score_tokens(base, other, x, t[:, -4:], 0.25, vocab, keep=4, other_temperature=2.0, greedy=True)
    torch.testing.assert_close(lp4, lp[:, -4:], atol=1e-5, rtol=1e-5)
    assert torch.equal(am4, am[:, -4:])


@pytest.mark.parametrize("bucket,limit", [(1, None), (8, None), (64, None), (8, 37)])
def test_padded_shape_covers_the_wanted_positions(bucket, limit):
    for t in range(1, 75):
        for keep in range(0, t):
            tb, kb, lo = fast.padded_shape(t, keep, bucket, limit)
            assert tb >= t and (tb % bucket == 0 or tb == max(t, limit or 0))
            assert kb == 0 or (kb < tb and kb % bucket == 0)
            first = tb - kb if kb else 0  # position of the padded output's first row
            assert lo >= 0 and first + lo == (t - keep if keep else 0)
            assert lo + (keep or t) <= (kb or tb)
            assert kb == 0 or kb - bucket < tb - (t - keep)  # no more kept rows than one bucket's worth


def test_right_padding_leaves_earlier_logits_unchanged(models):
    # what GraphedForward relies on: positions before the padding see the same inputs
    model, vocab = models["memory"], len(models["tok"])
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, 13), generator=g)
    for keep in (0, 3):
        tb, kb, lo = fast.padded_shape(13, keep, 8)
        padded = torch.cat([ids, torch.zeros(2, tb - 13, dtype=torch.long)], 1)
        with torch.no_grad():
            want = model(ids).logits[:, -keep:] if keep else model(ids).logits
            got = fast.lm_logits(model, padded, None, kb)[:, lo : lo + (keep or 13)]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_graphed_forward_off_the_gpu_is_the_plain_forward(models):
    model, vocab = models["memory"], len(models["tok"])
    ids = torch.randint(0, vocab, (3, 11), generator=torch.Generator().manual_seed(4))
    runner = fast.GraphedForward(model)
    assert not runner.use_graph and not runner.use_compile
    with torch.no_grad():
        torch.testing.assert_close(runner(ids), model(ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(runner(ids, None, 4), model(ids).logits[:, -4:], atol=1e-6, rtol=1e-6)


def _reference_decode(base, memory, ids, n, lmbda, vocab, sample=False):
    """No caches: the whole sequence through both models at every step, float64 mixture; greedy or sampled
    (torch's global generator)."""
    out = ids
    for _ in range(n):
        with torch.no_grad():
            lp = _ref_mixture(base(out).logits[:, -1], memory(out).logits[:, -1], lmbda, vocab)
        nxt = torch.multinomial(lp.exp(), 1).squeeze(1) if sample else lp.argmax(-1)
        out = torch.cat([out, nxt[:, None]], 1)
    return out


def _decoder(models, batch, max_cache_len, lmbda, vocab):
    """A GraphedDecoder whose step gives the mixture's log-probs, as MemoryDecoder builds it."""
    post = (lambda o: fast.mixture_logprobs(o[0], o[1], lmbda, vocab)) if len(models) == 2 else None
    return fast.GraphedDecoder(models, batch_size=batch, max_cache_len=max_cache_len, post=post)


def _decode(dec, ids, n, **kwargs):
    """memdec's one decode loop (memdec.inference.joint.generate_tokens) over the decoder's steps."""
    from memdec.inference.joint import generate_tokens

    kwargs.setdefault("do_sample", False)
    return generate_tokens(dec.decode_step, ids, max_new_tokens=n, **kwargs)


@pytest.mark.parametrize("base_name", ["base", "base_llama"])
def test_graphed_decoder_greedy_matches_uncached_reference(models, base_name):
    base, memory, vocab = models[base_name], models["memory"], len(models["tok"])
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(2))
    dec = _decoder([base, memory], 2, 40, 0.4, vocab)
    assert torch.equal(_decode(dec, ids, 12), _reference_decode(base, memory, ids, 12, 0.4, vocab))
    # the decoder is reusable: a second prompt of another length resets its caches
    ids2 = ids[:, :5]
    assert torch.equal(_decode(dec, ids2, 6), _reference_decode(base, memory, ids2, 6, 0.4, vocab))


def test_graphed_decoder_sampling_matches_reference(models):
    base, memory, vocab = models["base"], models["memory"], len(models["tok"])
    ids = torch.randint(0, vocab, (1, 6), generator=torch.Generator().manual_seed(3))
    dec = _decoder([base, memory], 1, 32, 0.6, vocab)
    torch.manual_seed(7)
    got = _decode(dec, ids, 10, do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    torch.manual_seed(7)
    assert torch.equal(got, _reference_decode(base, memory, ids, 10, 0.6, vocab, sample=True))


def test_graphed_decoder_limits(models):
    base, vocab = models["base"], len(models["tok"])
    dec = _decoder([base], 1, 8, 0.0, vocab)
    with pytest.raises(ValueError, match="batch 2"):
        dec.prefill(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="does not fit"):
        dec.prefill(torch.zeros(1, 8, dtype=torch.long))
    assert _decode(dec, torch.zeros(1, 3, dtype=torch.long), 5).shape == (1, 8)


def test_eos_stops_and_pads(models):
    base, memory, vocab = models["base"], models["memory"], len(models["tok"])
    ids = torch.randint(0, vocab, (1, 5), generator=torch.Generator().manual_seed(4))
    ref = _reference_decode(base, memory, ids, 6, 0.5, vocab)
    eos = int(ref[0, 7])  # the third new token
    got = _decode(_decoder([base, memory], 1, 20, 0.5, vocab), ids, 6, eos_token_id=eos)
    first = (ref[0, 5:] == eos).nonzero()[0, 0].item()
    assert torch.equal(got[0], ref[0, : 5 + first + 1])


def test_run_concurrently_on_cpu_is_ordered():
    calls = []
    a, b = fast.run_concurrently(lambda: calls.append("a") or 1, lambda: calls.append("b") or torch.ones(1),
                                 torch.device("cpu"))
    assert calls == ["a", "b"] and a == 1 and torch.equal(b, torch.ones(1))


# ---- wired into MemoryDecoder.generate and the `memdec` lm-eval model ----


@pytest.fixture(scope="module")
def joint(tiny):
    from memdec.inference.joint import MemoryDecoder

    return MemoryDecoder.from_pretrained(tiny["base"], tiny["memory"], lmbda=0.3, mem_temperature=1.5, device="cpu")


def _spy_steps(monkeypatch) -> list[int]:
    calls = []
    original = fast.GraphedDecoder.step

    def step(self, tokens):
        calls.append(1)
        return original(self, tokens)

    monkeypatch.setattr(fast.GraphedDecoder, "step", step)
    return calls


@pytest.mark.parametrize("kwargs", [{"do_sample": False}, {"do_sample": True, "top_k": 20, "temperature": 0.8}])
def test_generate_fast_equals_plain(joint, monkeypatch, kwargs):
    ids = torch.randint(0, len(joint.tokenizer), (2, 7), generator=torch.Generator().manual_seed(5))
    outs = {}
    for flag in (False, True):
        monkeypatch.setattr(joint, "fast_decode", flag)
        calls = _spy_steps(monkeypatch)
        torch.manual_seed(11)
        outs[flag] = joint.generate(ids, max_new_tokens=9, min_new_tokens=9, **kwargs)
        assert (len(calls) > 0) == flag  # the fast decoder ran only when asked
    assert outs[True].shape == (2, 16)
    assert torch.equal(outs[True], outs[False])


def test_generate_left_padded_batch_takes_the_plain_loop(joint, monkeypatch):
    ids = torch.randint(1, len(joint.tokenizer), (2, 6), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    monkeypatch.setattr(joint, "fast_decode", True)
    calls = _spy_steps(monkeypatch)
    fast_out = joint.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert not calls
    monkeypatch.setattr(joint, "fast_decode", False)
    assert torch.equal(fast_out, joint.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False))


@pytest.fixture(scope="module")
def memdec_lm(tiny):
    from memdec.eval.models import MemDecLM

    return MemDecLM(pretrained=tiny["base"], memory=tiny["memory"], lmbda=0.4, mem_temperature=1.3, batch_size=3,
                    max_length=40, device="cpu")


def test_loglikelihood_fast_equals_plain(memdec_lm, joint, monkeypatch):
    lm = memdec_lm
    g = torch.Generator().manual_seed(8)
    vocab = len(lm.tokenizer)
    rand = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
    ctx = rand(12)
    # the mixture's own greedy continuation of ctx: is_greedy must be True for it
    lm.joint.fast_decode = False
    greedy = lm.joint.generate(torch.tensor([ctx]), max_new_tokens=3, do_sample=False)[0, 12:].tolist()
    requests = [(None, ctx, greedy), (None, ctx, rand(3))]
    requests += [(None, ctx, [t]) for t in rand(4)]  # one-token continuations of one context: a cache group
    requests += [(None, rand(n), rand(m)) for n, m in [(5, 1), (30, 8), (60, 4), (2, 20)]]  # (60: truncated)
    results = {}
    for flag in (False, True):
        monkeypatch.setattr(lm, "fast_scoring", flag)
        results[flag] = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    for (lp_f, g_f), (lp_p, g_p) in zip(results[True], results[False], strict=True):
        assert lp_f == pytest.approx(lp_p, abs=2e-4)
        assert g_f == g_p
    assert results[True][0][1] is True and results[True][1][1] is False


def test_loglikelihood_rolling_fast_equals_plain(memdec_lm, monkeypatch):
    from lm_eval.api.instance import Instance

    lm = memdec_lm
    texts = ["The quick brown fox jumps over the lazy dog. " * 6, "A short one."]
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in enumerate(texts)]
    results = {}
    for flag in (False, True):
        monkeypatch.setattr(lm, "fast_scoring", flag)
        results[flag] = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert results[True] == pytest.approx(results[False], abs=5e-4)


def test_fast_model_arg_turns_both_fast_paths_off(tiny):
    from memdec.eval.models import MemDecLM

    lm = MemDecLM(pretrained=tiny["base"], memory=tiny["memory"], fast="false", batch_size=2, device="cpu")
    assert lm.fast_scoring is False and lm.joint.fast_decode is False
    assert lm.get_model_info()["fast"] is False
    with pytest.raises(ValueError, match="fast must be true or false, got 'maybe'"):
        MemDecLM(pretrained=tiny["base"], memory=tiny["memory"], fast="maybe", batch_size=2, device="cpu")


@pytest.mark.parametrize("base_name", ["base", "base_llama"])
def test_warmup_runs_before_a_capture_leave_the_caches_consistent(models, base_name):
    """On CUDA a new decoder runs its step eagerly twice before capturing it; that must not shift the caches."""
    base, memory, vocab = models[base_name], models["memory"], len(models["tok"])
    seq = torch.randint(0, vocab, (1, 14), generator=torch.Generator().manual_seed(9))
    dec = fast.GraphedDecoder([base, memory], batch_size=1, max_cache_len=32)
    got = [dec.prefill(seq[:, :6])]
    for p in range(6, seq.shape[1]):
        dec._ids.copy_(seq[:, p : p + 1])
        dec._cpos.fill_(dec.pos)
        dec._warmup(2)
        got.append(dec.step(seq[:, p]))
    with torch.no_grad():
        for i, logits in enumerate(got):
            n = 6 + i
            for model, out in zip((base, memory), logits, strict=True):
                torch.testing.assert_close(out, model(seq[:, :n]).logits[:, -1], atol=1e-4, rtol=1e-4)


def test_fast_step_gives_the_plain_steps_distributions(joint, monkeypatch):
    """Distributions, not just tokens: tiny random models rarely change their argmax."""
    seq = torch.randint(0, len(joint.tokenizer), (2, 12), generator=torch.Generator().manual_seed(12))
    mask = torch.ones_like(seq)
    for lmbda in (0.9, 0.1):  # a decoder is kept per lmbda: the mixture is part of its captured step
        monkeypatch.setattr(joint, "lmbda", lmbda)
        decoder = joint._fast_decoder(2, 12)
        fast_state = plain_state = None
        for n in range(5, 13):
            fast_lp, fast_state = decoder.decode_step(seq[:, :n], mask[:, :n], fast_state)
            plain_lp, plain_state = joint._step(seq[:, :n], mask[:, :n], plain_state)
            torch.testing.assert_close(fast_lp, plain_lp, atol=1e-5, rtol=1e-5)
    assert len(joint._decoders) == 1 and next(iter(joint._decoders))[2:] == (0.1, 1.5)
    with pytest.raises(RuntimeError, match="one new token per step expected, got 2"):
        decoder.decode_step(seq, mask, 10)


class _EagerGraph:
    """Stands in for a CUDA graph on the CPU: replay() reruns the captured call into the same buffers."""

    def __init__(self, run):
        self.replay = run


def test_graphed_forward_pads_caches_and_drops_graphs(models, monkeypatch):
    model, vocab = models["memory"], len(models["tok"])
    captured = []

    def capture(self, b, t, k):  # what a captured graph holds: fixed input ids and output logits
        captured.append((b, t, k))
        ids = torch.zeros(b, t, dtype=torch.long)
        out = self._logits(ids, k).clone()
        return _EagerGraph(lambda: out.copy_(self._logits(ids, k))), ids, out

    monkeypatch.setattr(fast.GraphedForward, "_capture", capture)
    runner = fast.GraphedForward(model, bucket=8, max_graphs=2, max_tokens=64)
    runner.use_graph = True  # the graph path, on the CPU
    g = torch.Generator().manual_seed(5)

    def check(b, t, keep=0):
        ids = torch.randint(1, vocab, (b, t), generator=g)
        with torch.no_grad():
            want = model(ids).logits
            got = runner(ids, None, keep)
        torch.testing.assert_close(got, want[:, -keep:] if keep else want, atol=1e-5, rtol=1e-5)

    check(2, 13)  # padded to 16
    check(2, 11, keep=3)  # same padded length, only the last 8 positions kept
    check(2, 16)  # the first graph again
    assert captured == [(2, 16, 0), (2, 16, 8)]
    check(1, 5)  # a third shape: the least recently used graph (2, 16, 8) is dropped
    assert list(runner._graphs) == [(2, 16, 0), (1, 8, 0)]
    check(2, 12, keep=2)  # dropped before, captured again (dropping (2, 16, 0) now)
    assert captured[-1] == (2, 16, 8) and list(runner._graphs) == [(1, 8, 0), (2, 16, 8)]
    check(8, 13)  # 8 x 16 padded tokens > max_tokens: the plain forward, no graph
    assert len(captured) == 4
    # graph outputs together over max_graph_bytes: older graphs go first
    runner.max_graph_bytes = runner._graph_bytes(2, 16, 0) + 1
    check(3, 7)
    assert list(runner._graphs) == [(3, 8, 0)]


def test_graphed_is_one_runner_per_model_and_never_stale(tiny):
    import copy

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["memory"]).eval()
    runner = fast.graphed(model)
    assert fast.graphed(model) is runner and runner.model is model
    clone = copy.deepcopy(model)  # a copy gets no graphs of the original's weights
    assert fast.graphed(clone) is not runner and fast.graphed(clone).model is clone
    model.double()  # new weight tensors: the old runner's graphs would read freed memory
    assert fast.graphed(model) is not runner
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(fast.graphed(model)(ids), model(ids).logits, atol=0, rtol=0)


def test_base_forward_graphs_only_when_asked(tiny, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["memory"]).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    monkeypatch.delenv("MEMDEC_GRAPH_BASE", raising=False)
    assert not fast.graph_base_enabled() and fast.base_forward(model, True) is fast.graphed(model)
    assert not isinstance(fast.base_forward(model), fast.GraphedForward)
    monkeypatch.setenv("MEMDEC_GRAPH_BASE", "1")
    assert fast.base_forward(model) is fast.graphed(model)
    with torch.no_grad():
        want = model(ids).logits
        for graph in (False, True):
            torch.testing.assert_close(fast.base_forward(model, graph)(ids, None, 3), want[:, -3:], atol=0, rtol=0)


def test_target_stats_match_float64_and_router_scalars():
    """target_stats: (log p(target), largest probability, entropy) against float64, -inf columns included."""
    from memdec.inference import fast
    from memdec.inference.router import distribution_scalars

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=g) * 3
    logits[..., 10] = -math.inf  # a masked column
    targets = torch.randint(0, 10, (2, 5), generator=g)
    got = fast.target_stats(logits, targets, 11, temperature=2.0)
    x = logits.double() / 2.0
    lp = torch.log_softmax(x, -1)
    p = lp.exp()
    ent = -(p * torch.where(torch.isfinite(lp), lp, torch.zeros_like(lp))).sum(-1)
    want = torch.stack([lp.gather(-1, targets[..., None])[..., 0], p.amax(-1), ent], -1)
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert torch.allclose(got[..., 1:], distribution_scalars(torch.log_softmax(logits / 2.0, -1)), atol=1e-5)


def test_lmbda_has_one_owner(tiny):
    """MemDecLM's lmbda is its MemoryDecoder's: set through either, read the same; bad values refused."""
    from memdec.eval.models import MemDecLM

    lm = MemDecLM(pretrained=tiny["base"], memory=tiny["memory"], lmbda=0.3, batch_size=2, device="cpu")
    assert lm.lmbda == lm.joint.lmbda == 0.3 and "_lmbda" not in vars(lm)
    lm.lmbda = 0.7
    assert lm.joint.lmbda == 0.7 and lm.get_model_info()["lmbda"] == 0.7
    lm.joint.lmbda = 0.2
    assert lm.lmbda == 0.2
    with pytest.raises(ValueError, match="lmbda"):
        lm.lmbda = 1.5
    with pytest.raises(ValueError, match="lmbda"):
        lm.joint.lmbda = -0.1
    assert lm.lmbda == 0.2


@pytest.mark.parametrize("temp", [1.0, 0.7])
@pytest.mark.parametrize("vocab", [9, 11, 13])  # narrower than, as wide as and wider than the logits
def test_scoring_target_stats_float64_with_masked_columns(temp, vocab):
    """scoring.target_stats (max + one sum pass) against float64 softmax: -inf entries, a temperature, slicing."""
    from memdec.inference import scoring

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 11, generator=g, dtype=torch.float64) * 4 + 20  # large logits: no cancellation
    logits[..., 2] = -math.inf
    logits[0, 1, 5:] = -math.inf  # a row with most of its mass masked
    targets = torch.randint(0, vocab, (3, 4), generator=g)
    targets[0, 1] = 6  # a masked target: log-prob -inf
    got = scoring.target_stats(logits, targets, vocab, temperature=temp)
    assert got.dtype == torch.float64
    x = torch.full((3, 4, vocab), -math.inf, dtype=torch.float64)
    w = min(vocab, 11)
    x[..., :w] = logits[..., :w] / temp
    finite = torch.isfinite(x)
    z = torch.where(finite, x, torch.zeros_like(x))
    p = torch.where(finite, torch.exp(z - z.amax(-1, keepdim=True)), torch.zeros_like(z))
    p = p / p.sum(-1, keepdim=True)
    logp = torch.where(finite, torch.log(p), torch.full_like(p, -math.inf))
    ent = -(p * torch.where(finite, torch.log(p), torch.zeros_like(p))).sum(-1)
    want = torch.stack([logp.gather(-1, targets[..., None])[..., 0], p.amax(-1), ent], -1)
    assert got[0, 1, 0] == -math.inf
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    f32 = scoring.target_stats(logits.float(), targets, vocab, temperature=temp)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), want, atol=2e-5, rtol=1e-5)


def _tiny_lm(arch: str, n_layer: int = 2, seed: int = 0):
    """A random tiny GPT-2 or Qwen2 causal LM built here (no tokenizer, no files)."""
    from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=96, n_positions=128, n_embd=32, n_layer=n_layer, n_head=4, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=False)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _test_backend() -> str:
    """aot_eager (Dynamo and AOT autograd, seconds on CPU); inductor's C++ build with MEMDEC_TEST_INDUCTOR=1."""
    return "inductor" if os.environ.get("MEMDEC_TEST_INDUCTOR") == "1" else "aot_eager"


#: the longer compile cases (each torch.compile of a tiny model takes several seconds on CPU) with MEMDEC_TEST_COMPILE=1
_full_compile = pytest.mark.skipif(os.environ.get("MEMDEC_TEST_COMPILE") != "1",
                                   reason="a longer compile case: set MEMDEC_TEST_COMPILE=1")


def _hidden_reference(model, ids, keep):
    ref = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    want_l, want_h = ref.logits, ref.hidden_states[-1]
    return (want_l[:, -keep:], want_h[:, -keep:]) if keep else (want_l, want_h)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_lm_logits_hidden_is_the_head_input(arch):
    """lm_logits_hidden's hidden state (a pre-hook on the LM head) is output_hidden_states' last entry."""
    model = _tiny_lm(arch)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b, t, keep in [(2, 17, 0), (2, 19, 5), (1, 9, 9)]:
            ids = torch.randint(0, 96, (b, t), generator=g)
            want_l, want_h = _hidden_reference(model, ids, keep)
            logits, hidden = fast.lm_logits_hidden(model, ids, keep=keep)
            assert hidden.shape == (b, keep or t, 32)
            torch.testing.assert_close(hidden, want_h, atol=0, rtol=0)
            torch.testing.assert_close(logits, want_l, atol=0, rtol=0)
    assert not model.get_output_embeddings()._forward_pre_hooks  # the hook is gone after each call


@pytest.mark.parametrize("arch, keeps", [("qwen2", (0,)), pytest.param("gpt2", (0, 5), marks=_full_compile),
                                         pytest.param("qwen2", (0, 5), marks=_full_compile)])
def test_lm_logits_hidden_under_torch_compile(arch, keeps):
    """The backbone compiled in one graph (fullgraph, dynamic=True) gives the eager hidden state and logits, and a
    new length recompiles nothing."""
    import torch._dynamo as dynamo

    model = _tiny_lm(arch)
    assert fast.hidden_target(model) is model.base_model
    compiled = torch.compile(fast.hidden_target(model).forward, dynamic=True, fullgraph=True, backend=_test_backend())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for keep in keeps:
            for i, (b, t) in enumerate([(2, 17), (3, 23)]):
                ids = torch.randint(0, 96, (b, t), generator=g)
                want_l, want_h = _hidden_reference(model, ids, keep)
                with dynamo.config.patch(error_on_recompile=i > 0):  # each keep is a guard of its own, a length not
                    logits, hidden = fast.lm_logits_hidden(model, ids, keep=keep, forward=compiled)
                assert hidden.shape == (b, keep or t, 32)
                torch.testing.assert_close(hidden, want_h, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(logits, want_l, atol=1e-5, rtol=1e-5)
    assert not model.get_output_embeddings()._forward_pre_hooks


def test_plain_then_hidden_runner_of_one_model_compiled_in_full(monkeypatch):
    """The H200 failure of 2026-12-04: the plain runner compiled model.forward, the hidden runner's compile of the
    same function reused that code (Dynamo does not guard on hooks) and the LM head's hook never ran. Now the
    hidden runner compiles the backbone: both runners give the eager numbers, in either order."""
    monkeypatch.setenv("MEMDEC_COMPILE_MODE", "full")
    for order in ("plain first", "hidden first"):
        model = _tiny_lm("qwen2", n_layer=2, seed=3)
        ids = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            want_l, want_h = _hidden_reference(copy.deepcopy(model), ids, 0)
        runners = [_force_compiled(model), _force_compiled(model, hidden=True)]
        if order == "hidden first":
            runners.reverse()
        for r in runners:
            got = r(ids)
            if r.hidden:
                torch.testing.assert_close(got[0], want_l, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(got[1], want_h, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(r(ids, keep=4)[1], want_h[:, -4:], atol=1e-5, rtol=1e-5)
            else:
                torch.testing.assert_close(got, want_l, atol=1e-5, rtol=1e-5)
        assert not model.get_output_embeddings()._forward_pre_hooks


def test_head_split_refuses_a_model_that_changes_logits_after_the_head():
    """A causal LM whose forward scales the head's output (like Gemma 2's soft-capping) gets no split; its hidden
    state then comes from output_hidden_states, and the logits stay the model's own."""
    model = _tiny_lm("qwen2", n_layer=2, seed=4)
    assert fast.head_split(model) == (model.base_model, model.get_output_embeddings())
    capped = _tiny_lm("qwen2", n_layer=2, seed=4)
    plain_forward = capped.forward

    def forward(*args, **kwargs):
        out = plain_forward(*args, **kwargs)
        out.logits = 30.0 * torch.tanh(out.logits / 30.0)
        return out

    capped.forward = forward  # nn.Module.__call__ calls self.forward: the instance's
    assert fast.head_split(capped) is None and fast.hidden_target(capped) is capped
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = capped(input_ids=ids, use_cache=False, output_hidden_states=True)
        logits, hidden = fast.lm_logits_hidden(capped, ids, keep=3)
    torch.testing.assert_close(logits, ref.logits[:, -3:], atol=0, rtol=0)
    torch.testing.assert_close(hidden, ref.hidden_states[-1][:, -3:], atol=0, rtol=0)


def _force_compiled(model, **kwargs) -> fast.GraphedForward:
    """A GraphedForward compiled off the GPU (GraphedForward compiles on CUDA only): its internal helper, called here."""
    runner = fast.GraphedForward(model, use_compile=False, **kwargs)
    runner.use_compile = True
    runner._forward = runner._compiled_forward(backend=_test_backend())
    return runner


def test_decoder_layers_is_the_repeated_block_list():
    gpt2, qwen = _tiny_lm("gpt2", 3), _tiny_lm("qwen2", 3)
    assert fast.decoder_layers(gpt2) is gpt2.transformer.h
    assert fast.decoder_layers(qwen) is qwen.model.layers
    assert fast.decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None
    mixed = torch.nn.Module()
    mixed.a = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.ReLU()])  # two classes: no
    mixed.b = torch.nn.ModuleList([torch.nn.ReLU(), torch.nn.ReLU()])
    assert fast.decoder_layers(mixed) is mixed.b


def test_regional_compile_equals_eager_and_compiles_one_layer(monkeypatch):
    """Regional compilation (each decoder layer compiled, identical layers sharing one graph) gives the eager
    logits and hidden states; the plain and hidden runners share the compiled layers; the model called
    anywhere else (an attention mask) runs its plain layers."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setenv("MEMDEC_COMPILE_MODE", "regional")
    model = _tiny_lm("qwen2", n_layer=4, seed=1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 24), generator=g)
    with torch.no_grad():  # on a copy: output_hidden_states installs transformers' capturing hooks for good
        ref = copy.deepcopy(model)(input_ids=ids, use_cache=False, output_hidden_states=True)
    graphs = counters["stats"]["unique_graphs"]
    runner = _force_compiled(model)
    hrunner = _force_compiled(model, hidden=True)
    assert runner.compile_mode == "regional" and runner._regional is hrunner._regional is not None
    assert runner._regional.layers == list(model.model.layers)
    torch.testing.assert_close(runner(ids), ref.logits, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] - graphs == 1  # four layers, one compiled graph
    with dynamo.config.patch(error_on_recompile=True):  # the hidden runner and a new length reuse it
        logits, hidden = hrunner(ids)
        torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden, ref.hidden_states[-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(runner(ids[:, :17], keep=5), ref.logits[:, 12:17], atol=1e-5, rtol=1e-5)
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)  # off outside the runners
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    frames = counters["frames"]["total"]
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert counters["frames"]["total"] == frames  # no compiled code ran for the masked call
    torch.testing.assert_close(runner(ids, mask), masked, atol=0, rtol=0)  # a mask: the plain forward
    with torch.no_grad():  # transformers' output-capturing hooks on the layers (graph breaks): still the same numbers
        model(input_ids=ids, use_cache=False, output_hidden_states=True)
    torch.testing.assert_close(hrunner(ids)[1], ref.hidden_states[-1], atol=1e-5, rtol=1e-5)


def test_compile_mode_setting_and_fallbacks(monkeypatch, caplog):
    """MEMDEC_COMPILE_MODE picks regional / full (bad values refused); a model without a layer list compiles in
    full; a failing compiled layer warns once and leaves both of the model's runners on the plain forward."""
    model = _tiny_lm("gpt2", n_layer=2)
    monkeypatch.setenv("MEMDEC_COMPILE_MODE", "full")
    assert fast.GraphedForward(model).compile_mode == "full"
    monkeypatch.setenv("MEMDEC_COMPILE_MODE", "Regional")
    assert fast.GraphedForward(model).compile_mode == "regional"
    monkeypatch.setenv("MEMDEC_COMPILE_MODE", "everything")
    with pytest.raises(ValueError, match="MEMDEC_COMPILE_MODE"):
        fast.GraphedForward(model)
    monkeypatch.delenv("MEMDEC_COMPILE_MODE")
    assert fast.GraphedForward(model).compile_mode == "full"  # the default until regional is measured on a GPU
    monkeypatch.setenv("MEMDEC_COMPILE_MODE", "regional")
    with pytest.raises(ValueError, match="compile_mode"):
        fast.GraphedForward(model, compile_mode="partial")
    monkeypatch.setattr(fast, "decoder_layers", lambda m: None)
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    runner = fast.GraphedForward(model, use_compile=False)
    runner._compiled_forward()
    assert calls == [{"dynamic": True}] and runner._regional is None
    monkeypatch.undo()
    monkeypatch.setenv("MEMDEC_COMPILE_MODE", "regional")

    def broken(*args, **kwargs):
        raise RuntimeError("inductor exploded\nmore")

    runner, hrunner = _force_compiled(model), _force_compiled(model, hidden=True)
    runner._regional._compiled = [broken] * len(runner._regional.layers)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    with caplog.at_level("WARNING", logger="memdec.inference.fast"):
        torch.testing.assert_close(runner(ids), want.logits, atol=0, rtol=0)
        torch.testing.assert_close(hrunner(ids)[1], want.hidden_states[-1], atol=0, rtol=0)
        runner(ids)
    assert [r.getMessage() for r in caplog.records if "failed" in r.getMessage()] == [
        "memdec.inference.fast: compiling the forward failed (RuntimeError: inductor exploded); running it uncompiled"]
    assert not runner.use_compile


def test_graphed_decoder_hidden_compiled_matches_eager(monkeypatch):
    """GraphedDecoder(hidden=True) compiled (aot_eager here; inductor on CUDA) returns each model's logits and final
    hidden state of the eager decoder, also when the same model's plain forward was compiled before it (the
    case where a hook-based hidden state silently went missing)."""
    import functools

    base, memory = _tiny_lm("qwen2", n_layer=2, seed=5), _tiny_lm("qwen2", n_layer=2, seed=6)
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.compile(base.forward, dynamic=False, backend=_test_backend())(input_ids=ids, use_cache=False)
    eager = fast.GraphedDecoder([base, memory], batch_size=1, max_cache_len=16, use_compile=False, hidden=True)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=_test_backend()))
    compiled = fast.GraphedDecoder([base, memory], batch_size=1, max_cache_len=16, use_compile=True, hidden=True)
    assert compiled.targets == [base.base_model, memory.base_model]
    with torch.no_grad():
        want = [m(input_ids=ids, use_cache=False, output_hidden_states=True) for m in (copy.deepcopy(base), copy.deepcopy(memory))]
    for dec in (eager, compiled):
        outs = dec.prefill(ids[:, :4])
        for t in range(4, 7):
            for o, w in zip(outs, want, strict=True):
                torch.testing.assert_close(o[:, :96], w.logits[:, t - 1], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(o[:, 96:], w.hidden_states[-1][:, t - 1], atol=1e-5, rtol=1e-5)
            outs = dec.step(ids[:, t])


def test_plain_and_hidden_runners_share_one_compiled_backbone(monkeypatch):
    """Where the model splits, both runners compile its backbone (the head runs after it): the hidden runner after
    the plain one compiles nothing new (one cold compile per model, not two), and both give the eager numbers."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setenv("MEMDEC_COMPILE_MODE", "full")
    model = _tiny_lm("qwen2", n_layer=2, seed=7)
    ids = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want_l, want_h = _hidden_reference(copy.deepcopy(model), ids, 0)
    runner = _force_compiled(model)
    torch.testing.assert_close(runner(ids), want_l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(runner(ids, keep=3), want_l[:, -3:], atol=1e-5, rtol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    hrunner = _force_compiled(model, hidden=True)
    assert hrunner._forward is runner._forward  # the model's one compiled backbone forward
    assert "_memdec_compiled" not in copy.deepcopy(model).__dict__ or not copy.deepcopy(model)._memdec_compiled
    with dynamo.config.patch(error_on_recompile=True):
        logits, hidden = hrunner(ids)
    assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(logits, want_l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden, want_h, atol=1e-5, rtol=1e-5)


def test_head_split_accepts_a_model_that_upcasts_its_logits():
    """A causal LM returning float32 logits of a bfloat16 head (exact upcast) keeps the split."""
    model = _tiny_lm("qwen2", n_layer=1, seed=8).to(torch.bfloat16)
    plain_forward = model.forward

    def forward(*args, **kwargs):
        out = plain_forward(*args, **kwargs)
        out.logits = out.logits.float()
        return out

    model.forward = forward
    assert fast.head_split(model) == (model.base_model, model.get_output_embeddings())
