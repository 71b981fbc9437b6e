"""MemoryDecoder against independent float64 computations: mixture, perplexity, greedy and sampled generation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memdec.inference.joint import MemoryDecoder
from memdec.inference.mixing import TokenizerMismatchError

LMBDA = 0.3


@pytest.fixture(scope="module")
def joint(tiny) -> MemoryDecoder:
    return MemoryDecoder.from_pretrained(tiny["base"], tiny["memory"], lmbda=LMBDA, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def ref(tiny):
    """The same two models in float64, loaded independently."""
    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()

    return {"base": load(tiny["base"]), "memory": load(tiny["memory"]), "base_llama": load(tiny["base_llama"])}


@pytest.fixture(scope="module")
def short_memory(tiny, tmp_path_factory):
    """A memory decoder whose context (32 positions) is shorter than the base's (256)."""
    from memdec.tiny import save_model, tiny_model

    tok = AutoTokenizer.from_pretrained(tiny["tok"])
    path = tmp_path_factory.mktemp("short") / "memory"
    return save_model(tiny_model(tok, "gpt2", n_layer=1, hidden=32, n_head=2, max_positions=32, seed=5), tok, path)


@torch.no_grad()
def ref_mixture(ref, ids: list[int], lmbda: float, base: str = "base", mem_temperature: float = 1.0,
                vocab: int = 400) -> torch.Tensor:
    """float64 log(lmbda p_mem + (1 - lmbda) p_base) for every position of one unpadded sequence (T, vocab)."""
    x = torch.tensor([ids])
    pb = torch.softmax(ref[base](x).logits[0, :, :vocab], -1)
    pm = torch.softmax(ref["memory"](x).logits[0, :, :vocab] / mem_temperature, -1)
    return torch.log(lmbda * pm + (1 - lmbda) * pb)


def prompts(texts, tok, lengths=(23, 9)) -> list[list[int]]:
    return [tok.encode(texts["domain"][i])[:n] for i, n in enumerate(lengths)]


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(map(len, seqs))
    ids = torch.tensor([[pad] * (n - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def test_logprobs_match_float64_mixture_with_left_padding(joint, ref, texts):
    seqs = prompts(texts, joint.tokenizer)
    ids, mask = left_pad(seqs, joint.tokenizer.pad_token_id)
    out = joint.logprobs(ids, mask)
    assert out.shape == (2, ids.shape[1], len(joint.tokenizer)) and out.dtype == torch.float32
    for b, s in enumerate(seqs):
        expect = ref_mixture(ref, s, LMBDA)
        torch.testing.assert_close(out[b, ids.shape[1] - len(s):].double(), expect, atol=2e-5, rtol=0)
        assert torch.allclose(out[b].exp().sum(-1), torch.ones(()), atol=1e-4)


def test_mem_temperature_and_lmbda_endpoints(joint, ref, texts):
    s = prompts(texts, joint.tokenizer)[0]
    ids = torch.tensor([s])
    warm = MemoryDecoder(joint.base, joint.memory, joint.tokenizer, lmbda=0.6, mem_temperature=2.0)
    torch.testing.assert_close(warm.logprobs(ids)[0].double(), ref_mixture(ref, s, 0.6, mem_temperature=2.0),
                               atol=2e-5, rtol=0)
    only_base = MemoryDecoder(joint.base, joint.memory, joint.tokenizer, lmbda=0.0)
    only_mem = MemoryDecoder(joint.base, joint.memory, joint.tokenizer, lmbda=1.0)
    assert torch.equal(only_base.logprobs(ids), joint.base_logprobs(ids))
    assert torch.equal(only_mem.logprobs(ids), joint.memory_logprobs(ids))


@torch.no_grad()
def test_perplexity_matches_direct_sliding_window(joint, ref, texts):
    docs = texts["domain"][:2]
    tok = joint.tokenizer
    tokens = tok.encode(docs[0]) + [tok.eos_token_id] + tok.encode(docs[1])
    window, stride = 200, 80
    total, count, prev_end, begin = 0.0, 0, 1, 0
    while prev_end < len(tokens):  # each target scored once, with the context of its window
        end = min(begin + window, len(tokens))
        lp = ref_mixture(ref, tokens[begin:end], LMBDA)
        for p in range(prev_end, end):
            total += float(lp[p - 1 - begin, tokens[p]])
            count += 1
        prev_end, begin = end, begin + stride
    out = joint.perplexity(docs, window=window, stride=stride, batch_size=4)
    assert out["tokens"] == count == len(tokens) - 1
    assert out["nll"] == pytest.approx(-total / count, rel=1e-6)
    assert out["perplexity"] == pytest.approx(torch.tensor(-total / count).exp().item(), rel=1e-6)


def test_perplexity_window_longer_than_memory_context(tiny, short_memory, texts):
    joint = MemoryDecoder.from_pretrained(tiny["base"], short_memory, device="cpu")
    with pytest.raises(ValueError, match="context length 32 is shorter than the 64 tokens") as e:
        joint.perplexity(texts["domain"][:1], window=64, stride=32)
    assert "\n" not in str(e.value)


@torch.no_grad()
def reference_generate(ref, prompt: list[int], lmbda: float, steps: int, eos: int, base: str = "base") -> list[int]:
    """Greedy decoding without caches: full float64 forward of both models at every step."""
    seq = list(prompt)
    for _ in range(steps):
        nxt = int(ref_mixture(ref, seq, lmbda, base)[-1].argmax())
        seq.append(nxt)
        if nxt == eos:
            break
    return seq[len(prompt):]


def check_against_reference(out: torch.Tensor, width: int, expected: list[list[int]], pad: int) -> None:
    for row, exp in zip(out[:, width:].tolist(), expected, strict=True):
        assert row[: len(exp)] == exp
        assert all(t == pad for t in row[len(exp):])


@pytest.mark.parametrize("base", ["base", "base_llama"])
def test_greedy_generate_equals_stepwise_argmax(tiny, ref, texts, base):
    joint = MemoryDecoder.from_pretrained(tiny[base], tiny["memory"], lmbda=LMBDA, device="cpu", dtype=torch.float32)
    tok = joint.tokenizer
    seqs = prompts(texts, tok)
    expected = [reference_generate(ref, s, LMBDA, 12, tok.eos_token_id, base) for s in seqs]
    one = joint.generate(torch.tensor([seqs[0]]), max_new_tokens=12)
    check_against_reference(one, len(seqs[0]), expected[:1], tok.pad_token_id)
    ids, mask = left_pad(seqs, tok.pad_token_id)
    batch = joint.generate(ids, attention_mask=mask, max_new_tokens=12)
    check_against_reference(batch, ids.shape[1], expected, tok.pad_token_id)


def test_lmbda0_generate_equals_hf_generate(joint, texts):
    tok = joint.tokenizer
    ids, mask = left_pad(prompts(texts, tok), tok.pad_token_id)
    only_base = MemoryDecoder(joint.base, joint.memory, tok, lmbda=0.0)
    ours = only_base.generate(ids, attention_mask=mask, max_new_tokens=10)
    theirs = joint.base.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
    assert torch.equal(ours, theirs)


def test_generation_config_and_stop_strings(joint, texts):
    from transformers import GenerationConfig

    tok = joint.tokenizer
    ids = torch.tensor([prompts(texts, tok)[0]])
    full = joint.generate(ids, generation_config=GenerationConfig(max_new_tokens=6, do_sample=False))
    assert full.shape[1] == ids.shape[1] + 6
    assert torch.equal(joint.generate(ids, max_length=ids.shape[1] + 3), full[:, : ids.shape[1] + 3])
    n = ids.shape[1]
    stop = tok.decode(full[0, n + 1: n + 3])
    stopped = joint.generate(ids, max_new_tokens=6, stop_strings=[stop])
    # HF semantics: stop at the first step where the text so far (prompt included) ends with the stop string
    first = next(k for k in range(1, 7) if tok.decode(full[0, : n + k]).endswith(stop))
    assert first <= 3 and torch.equal(stopped, full[:, : n + first])
    with pytest.raises(ValueError, match="num_beams=2 is not supported"):
        joint.generate(ids, num_beams=2)
    with pytest.raises(ValueError, match="unknown argument.*colour"):
        joint.generate(ids, colour="red")


@torch.no_grad()
@pytest.mark.parametrize("warp", [{"temperature": 0.7, "top_k": 5}, {"temperature": 1.3, "top_k": 0, "top_p": 0.3}])
def test_sampling_matches_reference_sampler(joint, texts, warp):
    tok = joint.tokenizer
    prompt = prompts(texts, tok)[1]
    torch.manual_seed(1234)
    out = joint.generate(torch.tensor([prompt]), do_sample=True, max_new_tokens=10, **warp)[0, len(prompt):].tolist()

    torch.manual_seed(1234)
    seq, sampled = list(prompt), []
    for step in range(10):
        scores = joint.logprobs(torch.tensor([seq]))[0, -1].double() / warp["temperature"]
        order = scores.argsort(descending=True)
        if warp["top_k"]:
            keep = order[: warp["top_k"]]
        else:  # smallest set of most likely tokens whose probability reaches top_p
            cum = torch.softmax(scores[order], -1).cumsum(-1)
            keep = order[: int((cum < warp["top_p"]).sum()) + 1]
        allowed = torch.full_like(scores, float("-inf"))
        allowed[keep] = scores[keep]
        nxt = int(torch.multinomial(torch.softmax(allowed, -1).float(), 1))
        assert out[step] in set(keep.tolist()), f"step {step}: token {out[step]} outside the allowed set"
        sampled.append(nxt)
        seq.append(nxt)
        if nxt == tok.eos_token_id:
            break
    assert out[: len(sampled)] == sampled
    assert len(set(sampled)) > 1  # really sampled, not greedy


def test_other_tokenizer_refused_before_loading_weights(tiny, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the tokenizer check")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(TokenizerMismatchError) as e:
        MemoryDecoder.from_pretrained(tiny["base"], tiny["other_tok_model"], device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and tiny["base"] in msg and tiny["other_tok_model"] in msg


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"lmbda must be in \[0, 1\], got 1.5"):
        MemoryDecoder.from_pretrained(tiny["base"], tiny["memory"], lmbda=1.5)
    with pytest.raises(FileNotFoundError, match="memory .*missing: no such folder"):
        MemoryDecoder.from_pretrained(tiny["base"], str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="mem_temperature must be > 0"):
        MemoryDecoder.from_pretrained(tiny["base"], tiny["memory"], mem_temperature=0, device="cpu")
    with pytest.raises(ValueError, match="mem_temperature must be a number > 0, got 'warm'"):
        MemoryDecoder.from_pretrained(tiny["base"], tiny["memory"], mem_temperature="warm", device="cpu")


def test_lmbda_defaults_to_memdec_json(tiny, tmp_path):
    mem = tmp_path / "memory"
    shutil.copytree(tiny["memory"], mem)
    (mem / "memdec.json").write_text(json.dumps({"format_version": 1, "lmbda": 0.25}))
    assert MemoryDecoder.from_pretrained(tiny["base"], str(mem), device="cpu").lmbda == 0.25
    assert MemoryDecoder.from_pretrained(tiny["base"], str(mem), lmbda=0.7, device="cpu").lmbda == 0.7
    assert MemoryDecoder.from_pretrained(tiny["base"], tiny["memory"], device="cpu").lmbda == 0.5


def test_memdec_generate_command(tiny, joint, texts, capsys):
    from memdec.cli import main

    tok = joint.tokenizer
    prompts_ = [tok.decode(p) for p in prompts(texts, tok)]
    assert main(["generate", "--base", tiny["base"], "--memory", tiny["memory"], "--lmbda", str(LMBDA),
                 "--device", "cpu", "--max-new-tokens", "5", *[a for p in prompts_ for a in ("--prompt", p)]]) == 0
    printed = capsys.readouterr().out
    for p in prompts_:  # one prompt at a time, unpadded, through the Python API
        ids = torch.tensor([tok.encode(p)])
        assert p + tok.decode(joint.generate(ids, max_new_tokens=5)[0, ids.shape[1]:], skip_special_tokens=True) \
            in printed
    assert main(["generate", "--base", tiny["base"], "--memory", tiny["memory"], "--lmbda", "2",
                 "--prompt", "x"]) == 2
    assert "memdec generate: error: lmbda must be in [0, 1], got 2.0" in capsys.readouterr().err


def test_generate_text_pads_with_eos_when_the_tokenizer_has_no_pad_token(tiny, tmp_path):
    from memdec.inference.joint import generate_text

    paths = {}
    for name in ("base", "memory"):
        paths[name] = str(tmp_path / name)
        shutil.copytree(tiny[name], paths[name])
        tok = AutoTokenizer.from_pretrained(paths[name])
        tok.pad_token = None
        tok.save_pretrained(paths[name])
    assert AutoTokenizer.from_pretrained(paths["base"]).pad_token is None
    prompts_ = ["the patient was given", "dose"]
    batched = generate_text(paths["base"], paths["memory"], prompts_, device="cpu", max_new_tokens=4)
    alone = [generate_text(paths["base"], paths["memory"], [p], device="cpu", max_new_tokens=4)[0] for p in prompts_]
    assert batched == alone
