"""Issue 7 diagnostics for +MemDec scoring on one GPU (random-weight Qwen2.5-1.5B + 0.5B, bf16; not part of the package).

    python3 benchmarks/diag_scoring.py streams   # five orderings of the two models' CUDA streams, 8x1024 and
                                                 # 1x1024, memory compiled and graphed (about 3 minutes)
    python3 benchmarks/diag_scoring.py phases    # 1x1024 phase by phase, each synchronised: CPU time to
                                                 # enqueue against time until done (about 90 s)

Their output on an H200 is in reports/speed/README.md.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

from memdec import bench
from memdec.inference import fast

LMBDA = 0.5


def models(dev: torch.device):
    base = bench.build_model("qwen2.5-1.5b", False, torch.bfloat16, dev, 0)
    mem = bench.build_model("qwen2.5-0.5b", False, torch.bfloat16, dev, 1)
    return base, mem, base.config.vocab_size


def streams(dev: torch.device) -> None:
    base, mem, vocab = models(dev)
    hi_prio = torch.cuda.Stream.priority_range()[1]
    main, side, hp = torch.cuda.current_stream(), torch.cuda.Stream(), torch.cuda.Stream(priority=hi_prio)

    def mix(b, m, y):
        return fast.mixture_target_logprobs(b, m, y, LMBDA, vocab).sum()

    def joined(*streams_used):
        for s in streams_used:
            main.wait_stream(s)

    def mem_side_first(ff, x, y):  # memdec's order (memdec.inference.fast.run_concurrently)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            m = ff(x)
        b = base(x).logits
        joined(side)
        return mix(b, m, y)

    def base_first(ff, x, y):
        side.wait_stream(main)
        b = base(x).logits
        with torch.cuda.stream(side):
            m = ff(x)
        joined(side)
        return mix(b, m, y)

    def base_high_prio(ff, x, y, base_first=False):
        side.wait_stream(main)
        hp.wait_stream(main)
        if base_first:
            with torch.cuda.stream(hp):
                b = base(x).logits
        with torch.cuda.stream(side):
            m = ff(x)
        if not base_first:
            with torch.cuda.stream(hp):
                b = base(x).logits
        joined(side, hp)
        return mix(b, m, y)

    def one_stream(ff, x, y):
        return mix(base(x).logits, ff(x), y)

    orders: list[tuple[str, Callable]] = [
        ("memory on a side stream first, base on main", mem_side_first),
        ("base first, then memory on a side stream", base_first),
        ("base on a high-priority stream, memory first", base_high_prio),
        ("one stream, base then memory", one_stream),
        ("base on a high-priority stream first", lambda ff, x, y: base_high_prio(ff, x, y, True)),
    ]
    g = torch.Generator().manual_seed(0)
    ff = fast.GraphedForward(mem)  # compiled, one CUDA graph per padded shape

    def report(name: str, fn: Callable) -> None:
        print(f"{name:60s} {bench.time_ms(fn, dev, 3, 7):9.3f} ms", flush=True)

    with torch.no_grad():
        for b, t in [(8, 1024), (1, 1024)]:
            ids = torch.randint(0, vocab, (b, t + 1), generator=g).to(dev)
            x, y = ids[:, :-1], ids[:, 1:]
            t0 = time.perf_counter()
            out = ff(x)
            torch.cuda.synchronize()
            err = (out.float() - mem(x).logits.float()).abs().max().item()
            print(f"{b}x{t} first call {time.perf_counter() - t0:.1f} s; max |logit diff| vs eager {err:.3g}")
            report(f"{b}x{t} base alone (lm-eval hf)", lambda ids=ids: bench.score_base_hf(base, ids, vocab))
            report(f"{b}x{t} memory alone (graphed)", lambda x=x: ff(x))
            for name, fn in orders:
                report(f"{b}x{t} {name}", lambda fn=fn, x=x, y=y: fn(ff, x, y))


def phases(dev: torch.device) -> None:
    base, mem, vocab = models(dev)
    ff = fast.GraphedForward(mem)
    ids = torch.randint(0, vocab, (1, 1025), generator=torch.Generator().manual_seed(0)).to(dev)
    x, y = ids[:, :-1], ids[:, 1:]
    seen: dict[str, list[tuple[float, float]]] = {}

    def ph(name: str, fn: Callable):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        seen.setdefault(name, []).append(((t1 - t0) * 1e3, (time.perf_counter() - t0) * 1e3))
        return out

    with torch.no_grad():
        for i in range(8):
            b = ph("base forward", lambda: base(x).logits)
            ph("base forward, use_cache=False", lambda: base(input_ids=x, use_cache=False).logits)
            m = ph("memory graphed", lambda: ff(x))
            lb = ph("target log-probs, base", lambda b=b: fast.target_logprobs(b, y, vocab))
            lm = ph("target log-probs, memory", lambda m=m: fast.target_logprobs(m, y, vocab))
            ph("mixing", lambda lb=lb, lm=lm: fast.mix_logprobs(lb, lm, LMBDA).sum())
            ph("whole +MemDec scoring", lambda: fast.score_tokens(base, ff, x, y, LMBDA, vocab)[0].sum())
            ph("base as lm-eval hf", lambda: bench.score_base_hf(base, ids, vocab))
            if i == 1:  # two warm-up rounds (compiling, capturing)
                seen.clear()
    for name, v in seen.items():
        cpu, done = sorted(v, key=lambda p: p[1])[len(v) // 2]
        print(f"{name:32s} enqueue {cpu:7.2f} ms   until done {done:7.2f} ms", flush=True)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what not in ("streams", "phases"):
        sys.exit("usage: diag_scoring.py streams|phases")
    {"streams": streams, "phases": phases}[what](torch.device("cuda"))
