"""Issue 7 diagnostics: +MemDec scoring at 1x1024, phase by phase (each synchronised): CPU enqueue vs done.

    python3 benchmarks/diag_phases.py       # one GPU, about 90 s (one compile of the memory)

Not part of the package; its output on an H200 is in reports/speed/README.md.
"""

from __future__ import annotations

import time

import torch

from memdec import bench, fast

dev = torch.device("cuda")
base = bench.build_model("qwen2.5-1.5b", False, torch.bfloat16, dev, 0)
mem = bench.build_model("qwen2.5-0.5b", False, torch.bfloat16, dev, 1)
V = base.config.vocab_size
ff = fast.GraphedForward(mem)
ids = torch.randint(0, V, (1, 1025), generator=torch.Generator().manual_seed(0)).to(dev)
x, y = ids[:, :-1], ids[:, 1:]
phases = {}


def ph(name, fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    phases.setdefault(name, []).append(((t1 - t0) * 1e3, (t2 - t0) * 1e3))
    return out


with torch.no_grad():
    for i in range(8):
        b = ph("base fwd", lambda: base(x).logits)
        b2 = ph("base fwd use_cache=False", lambda: base(input_ids=x, use_cache=False).logits)
        m = ph("mem graphed", lambda: ff(x))
        lb = ph("target lp base", lambda b=b: fast.target_logprobs(b, y, V))
        lm = ph("target lp mem", lambda m=m: fast.target_logprobs(m, y, V))
        ph("mix", lambda lb=lb, lm=lm: fast.mix_logprobs(lb, lm, 0.5).sum())
        ph("score_tokens total", lambda: fast.score_tokens(base, ff, x, y, 0.5, V)[0].sum())
        ph("score_base_hf", lambda: bench.score_base_hf(base, ids, V))
        if i == 1:
            phases.clear()
for k, v in phases.items():
    v.sort(key=lambda p: p[1])
    cpu, wall = v[len(v) // 2]
    print(f"{k:28s} enqueue {cpu:7.2f} ms   until done {wall:7.2f} ms", flush=True)
