"""Issue 17: the router's scoring cost over +MemDec (fast), paired, on CUDA (random-weight Qwen2.5 1.5B + 0.5B).

    python benchmarks/router_cost.py --out DIR [--shapes 1x1024,8x1024] [--rounds 9]
        [--compile-mode {regional,full}] [--compare-modes] [--warm-cache]

Times memdec.bench.score_memdec_fast against memdec.bench.score_memdec_router (the `memdec` lm-eval model's
routed fast path; both with the base compiled and graphed) back to back, alternating, median of `rounds`;
also checks the routed fast path against the plain float32 routed mixture. Records the seconds of each
runner's first call (compile + capture) under the compile mode (MEMDEC_COMPILE_MODE, set by --compile-mode),
and of each scorer's first call at each shape (a new shape's captures).

--compare-modes first times, in this process and before anything else compiles, the first call of +MemDec
fast with regional and then with full compilation (fresh runners of both models each) and their
steady-state paired ratio regional / full at the first shape. Unless --warm-cache, inductor's on-disk cache
(TORCHINDUCTOR_CACHE_DIR) is a fresh folder, so first calls are cold. Writes router_cost.json after every step.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from memdec import bench as B
from memdec.inference import fast
from memdec.inference.mixing import log_softmax
from memdec.inference.router import routed_logprobs


def first_call_s(fn: Callable[[], Any], dev: torch.device) -> float:
    """Seconds of one call of `fn` (its first: compiling and capturing included), synchronised."""
    B._sync(dev)
    t0 = time.perf_counter()
    fn()
    B._sync(dev)
    return time.perf_counter() - t0


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="1x1024,8x1024")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny models (a CPU check of the script)")
    ap.add_argument("--compile-mode", choices=fast.COMPILE_MODES, default=None,
                    help="MEMDEC_COMPILE_MODE of every runner (default: the environment's, else full)")
    ap.add_argument("--compare-modes", action="store_true",
                    help="first: cold first call and steady-state paired ratio of +MemDec fast, regional vs full")
    ap.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk cache (first calls may be warm)")
    a = ap.parse_args()
    if a.compile_mode:
        os.environ["MEMDEC_COMPILE_MODE"] = a.compile_mode
    dev = torch.device(a.device)
    if fast.compile_enabled(dev) and not a.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="memdec-inductor-")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    base = B.build_model("qwen2.5-1.5b", a.small, dtype, dev, 0)
    memory = B.build_model("qwen2.5-0.5b", a.small, dtype, dev, 1)
    vocab = min(base.config.vocab_size, memory.config.vocab_size)
    router = B.bench_router(base, memory, dev, 0)
    mode = fast.default_compile_mode()
    res: dict[str, Any] = {"environment": B.environment(dev), "compile_mode": mode, "rounds": a.rounds,
                           "compile_enabled": fast.compile_enabled(dev),
                           "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"), "shapes": {}}

    def save(what: str) -> None:
        (out / "router_cost.json").write_text(json.dumps(res, indent=1))
        print(f"[{time.perf_counter() - t0:.0f} s] {what}", flush=True)

    save(f"models built (compile mode {mode})")
    g = torch.Generator().manual_seed(0)
    b0, n0 = shapes[0]
    ids0 = torch.randint(0, vocab, (b0, n0 + 1), generator=g).to(dev)
    if a.compare_modes:
        res["compare_modes"] = compare_modes(base, memory, vocab, dev, ids0, a.rounds, save)
        res["compare_modes"]["note"] = "ran first: the runners below reuse the compiled code of their mode"
        save("compare-modes done")
    runner = fast.GraphedForward(memory, compile_mode=mode)
    hrunner = fast.GraphedForward(memory, hidden=True, compile_mode=mode)
    x = ids0[:, :-1]
    res["first_call_s"] = {}
    for name, fn in (("memory", lambda: runner(x)), ("memory_hidden", lambda: hrunner(x)),
                     ("base", lambda: fast.base_forward(base, True)(x, None, 0)),
                     ("base_hidden", lambda: fast.base_forward(base, True, hidden=True)(x, None, 0))):
        res["first_call_s"][name] = first_call_s(fn, dev)
        save(f"first call of {name} at {b0}x{n0}: {res['first_call_s'][name]:.2f} s")
    # correctness on a small batch: routed fast path vs the plain float32 routed mixture
    ids = torch.randint(0, vocab, (2, 257), generator=g).to(dev)
    got = B.score_memdec_router(base, hrunner, ids, vocab, router, per_token=True).float()
    bl, bh = fast.lm_logits_hidden(base, ids[:, :-1])
    ml, mh = fast.lm_logits_hidden(memory, ids[:, :-1])
    blp, mlp = log_softmax(bl.float(), vocab), log_softmax(ml.float(), vocab)
    want = routed_logprobs(blp, mlp, router.log_weights(bh, mh, blp, mlp)).gather(-1, ids[:, 1:, None])[..., 0]
    res["max_abs_diff_vs_plain_fp32_mixture"] = float((got - want.float()).abs().max())
    save(f"check {res['max_abs_diff_vs_plain_fp32_mixture']:.3g}")
    for i, (b, t) in enumerate(shapes):
        shape = f"{b}x{t}"
        ids = ids0 if i == 0 else torch.randint(0, vocab, (b, t + 1), generator=g).to(dev)
        res["shapes"][shape] = one_shape(base, runner, hrunner, router, vocab, dev, ids, a.rounds)
        save(f"{shape} {res['shapes'][shape]}")


def one_shape(base, runner, hrunner, router, vocab: int, dev: torch.device, ids: torch.Tensor, rounds: int) -> dict:
    """First-call seconds, separately timed ms of both scorers at ids' shape and their paired ratio (router / fast)."""
    def plain() -> Any:
        return B.score_memdec_fast(base, runner, ids, vocab, 0.5)

    def routed() -> Any:
        return B.score_memdec_router(base, hrunner, ids, vocab, router)

    first = {"memdec_fast": first_call_s(plain, dev), "memdec_router": first_call_s(routed, dev)}
    fast_ms = B.time_ms(plain, dev, 2, 5)
    rout_ms = B.time_ms(routed, dev, 2, 5)
    ratio = B.paired_ratio(plain, routed, dev, 1, rounds)
    return {"first_call_s": first, "memdec_fast_ms": fast_ms, "memdec_router_ms": rout_ms, "paired_ratio": ratio}


def compare_modes(base, memory, vocab: int, dev: torch.device, ids: torch.Tensor, rounds: int,
                  save: Callable[[str], None]) -> dict:
    """+MemDec fast (lmbda 0.5) with fresh runners of both models per compile mode: each mode's first-call seconds
    (regional first), each one's steady-state ms, the paired ratio regional / full and the largest difference."""
    res: dict[str, Any] = {"shape": "x".join(map(str, (ids.shape[0], ids.shape[1] - 1))), "order": ["regional", "full"],
                           "first_call_s": {}, "ms": {}}
    fns: dict[str, Callable[[], Any]] = {}
    for mode in res["order"]:
        b_run = fast.GraphedForward(base, compile_mode=mode)
        m_run = fast.GraphedForward(memory, compile_mode=mode)
        fns[mode] = lambda b_run=b_run, m_run=m_run: B.score_memdec_fast(b_run, m_run, ids, vocab, 0.5, per_token=True)
        res["first_call_s"][mode] = first_call_s(fns[mode], dev)
        save(f"compare-modes: first call of +MemDec fast, {mode}: {res['first_call_s'][mode]:.2f} s")
    res["max_abs_diff_regional_vs_full"] = float((fns["regional"]().float() - fns["full"]().float()).abs().max())
    for mode in res["order"]:
        res["ms"][mode] = B.time_ms(fns[mode], dev, 2, 5)
    res["paired_ratio_regional_over_full"] = B.paired_ratio(fns["full"], fns["regional"], dev, 1, rounds)
    save(f"compare-modes: {res['ms']} ms, regional / full {res['paired_ratio_regional_over_full']:.3f}")
    fns.clear()  # the compare runners' graphs go with them
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


if __name__ == "__main__":
    main()
