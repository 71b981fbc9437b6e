"""Issue 7 diagnostics: +MemDec scoring with the memory graphed, five ways of ordering the two models' streams.

    python3 benchmarks/diag_streams.py      # one GPU, about 3 minutes (two compiles of the memory)

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
lo_prio, hi_prio = torch.cuda.Stream.priority_range() if hasattr(torch.cuda.Stream, "priority_range") else (0, -1)
print("priority range", lo_prio, hi_prio)
main = torch.cuda.current_stream()
side = torch.cuda.Stream()
hp = torch.cuda.Stream(priority=hi_prio)


def t(name, fn, warm=3, rep=7):
    ms = bench.time_ms(fn, dev, warm, rep)
    print(f"{name:50s} {ms:9.3f} ms", flush=True)
    return ms


def mix(bl, ml, y):
    return fast.mixture_target_logprobs(bl, ml, y, 0.5, V).sum()


def o1(ff, x, y):  # memory on the side stream first, base on main
    side.wait_stream(main)
    with torch.cuda.stream(side):
        m = ff(x)
    b = base(x).logits
    main.wait_stream(side)
    return mix(b, m, y)


def o2(ff, x, y):  # base first on main, then the memory on the side stream
    side.wait_stream(main)
    b = base(x).logits
    with torch.cuda.stream(side):
        m = ff(x)
    main.wait_stream(side)
    return mix(b, m, y)


def o3(ff, x, y):  # base on a high-priority stream, memory launched first on the side stream
    side.wait_stream(main)
    hp.wait_stream(main)
    with torch.cuda.stream(side):
        m = ff(x)
    with torch.cuda.stream(hp):
        b = base(x).logits
    main.wait_stream(side)
    main.wait_stream(hp)
    return mix(b, m, y)


def o5(ff, x, y):  # base on a high-priority stream first, then the memory on the side stream
    side.wait_stream(main)
    hp.wait_stream(main)
    with torch.cuda.stream(hp):
        b = base(x).logits
    with torch.cuda.stream(side):
        m = ff(x)
    main.wait_stream(side)
    main.wait_stream(hp)
    return mix(b, m, y)


def o4(ff, x, y):  # one stream
    return mix(base(x).logits, ff(x), y)


g = torch.Generator().manual_seed(0)
ff = fast.GraphedForward(mem)  # compiled, one CUDA graph per padded shape
with torch.no_grad():
    for b, T in [(8, 1024), (1, 1024)]:
        ids = torch.randint(0, V, (b, T + 1), generator=g).to(dev)
        x, y = ids[:, :-1], ids[:, 1:]
        k = f"{b}x{T}"
        t0 = time.perf_counter()
        out = ff(x)
        torch.cuda.synchronize()
        err = (out.float() - mem(x).logits.float()).abs().max().item()
        print(f"{k} first call {time.perf_counter() - t0:.1f} s; max |logit diff| vs eager {err:.3g}", flush=True)
        t(f"{k} base_hf", lambda ids=ids: bench.score_base_hf(base, ids, V))
        t(f"{k} memory alone", lambda x=x: ff(x))
        for name, fn in (("o1 mem-side-first", o1), ("o2 base-first", o2), ("o3 base-high-prio", o3),
                         ("o4 sequential", o4), ("o5 base-high-prio-first", o5)):
            t(f"{k} {name}", lambda fn=fn, x=x, y=y: fn(ff, x, y))
