"""GPU smoke check of the CUDA-only paths (no download, under a minute): graphed two-model decoding and fused
scoring against the plain computation, on small random GPT-2 models in float32.

    python benchmarks/gpu_smoke.py            # prints one line per check and exits non-zero on a mismatch
"""

from __future__ import annotations

import copy
import sys
import warnings

import torch


def main() -> int:
    from memdec import MemoryDecoder
    from memdec.inference import fast
    from memdec.tiny import tiny_model, train_tokenizer

    dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    words = " ".join(f"w{i % 97} v{i % 13}" for i in range(3000))
    tok = train_tokenizer([words], vocab_size=300)
    base = tiny_model(tok, "gpt2", n_layer=4, hidden=256, n_head=4, max_positions=512, seed=1).to(dev)
    mem = tiny_model(tok, "gpt2", n_layer=2, hidden=128, n_head=4, max_positions=512, seed=2).to(dev)
    joint = MemoryDecoder(base, mem, tok, lmbda=0.4)
    ok = True
    prompt = torch.randint(1, len(tok), (1, 32), device=dev)

    joint.fast_decode = False
    plain = joint.generate(prompt, max_new_tokens=48, do_sample=False)
    joint.fast_decode = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed = joint.generate(prompt, max_new_tokens=48, do_sample=False)
    fell_back = joint.fast_decode is not True or any("fast decoding failed" in str(w.message) for w in caught)
    print(f"graphed decoding path used: {not fell_back}")
    same = torch.equal(plain, graphed)
    ok &= same and not fell_back
    print(f"greedy decoding, graphed vs plain: {'identical' if same else 'DIFFERENT'} ({graphed.shape[1] - 32} new tokens)")
    torch.manual_seed(0)
    sampled = joint.generate(prompt, max_new_tokens=16, do_sample=True, top_k=20, min_new_tokens=16)
    print(f"sampled decoding (graphed, min_new_tokens): {sampled.shape[1] - 32} new tokens")
    ok &= sampled.shape[1] == 48

    runner = fast.GraphedForward(mem)  # compiled, one CUDA graph per padded shape (as the memdec lm-eval model)
    for rows, length, keep in ((4, 256, 0), (3, 200, 0), (2, 130, 7), (4, 256, 0)):
        ids = torch.randint(1, len(tok), (rows, length + 1), device=dev)
        with torch.no_grad():
            x, t = ids[:, :-1], ids[:, 1:][:, -keep:] if keep else ids[:, 1:]
            lp, _, _ = fast.score_tokens(base, runner, x, t, 0.4, len(tok), keep=keep)
            b = torch.log_softmax(base(x).logits.double(), -1)
            m = torch.log_softmax(mem(x).logits.double(), -1)
            ref = torch.logaddexp(b + torch.log(torch.tensor(0.6, dtype=torch.float64)),
                                  m + torch.log(torch.tensor(0.4, dtype=torch.float64)))
            ref = (ref[:, -keep:] if keep else ref).gather(-1, t[..., None]).squeeze(-1)
        err = (lp.double() - ref).abs().max().item()
        ok &= err < 1e-4
        print(f"fused scoring ({rows}x{length}, keep {keep}; graphed memory {runner.use_graph}, graphed base "
              f"{fast.graphed(base).use_graph}) vs float64 mixture: max |diff| {err:.2e} nats")
    ok &= fast.graphed(base).use_graph and runner.use_graph

    # per-token scoring over sliding windows (MemoryDecoder.perplexity, tune-lambda): graphed on CUDA
    from memdec.inference.scoring import token_logprobs

    stream = torch.randint(1, len(tok), (3000,))
    got = token_logprobs(base, stream, window=256, stride=128, batch_size=4)
    ref = token_logprobs(copy.deepcopy(base).double().cpu(), stream, window=256, stride=128, batch_size=4)
    err = float(abs(got - ref).max())
    ok &= err < 1e-4
    print(f"token_logprobs over windows (graphed base {fast.graphed(base).use_graph}) vs float64 on CPU: "
          f"max |diff| {err:.2e} nats")
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}: {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
