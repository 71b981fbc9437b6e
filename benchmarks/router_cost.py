"""Issue 17: the router's scoring cost over +MemDec (fast), paired, on CUDA (random-weight Qwen2.5 1.5B + 0.5B).

    python benchmarks/router_cost.py --out DIR [--shapes 1x1024,8x1024] [--rounds 9]

Times memdec.bench.score_memdec_fast against memdec.bench.score_memdec_router (the `memdec` lm-eval model's
routed fast path; both with the base compiled and graphed) back to back, alternating, median of `rounds`;
also checks the routed fast path against the plain float32 routed mixture. Writes router_cost.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from memdec import bench as B
from memdec.inference import fast
from memdec.inference.mixing import log_softmax
from memdec.inference.router import routed_logprobs


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="1x1024,8x1024")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny models (a CPU check of the script)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    t0 = time.perf_counter()
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    base = B.build_model("qwen2.5-1.5b", a.small, dtype, dev, 0)
    memory = B.build_model("qwen2.5-0.5b", a.small, dtype, dev, 1)
    vocab = min(base.config.vocab_size, memory.config.vocab_size)
    router = B.bench_router(base, memory, dev, 0)
    runner = fast.GraphedForward(memory)
    hrunner = fast.GraphedForward(memory, hidden=True)
    res = {"environment": B.environment(dev), "shapes": {}, "rounds": a.rounds}
    g = torch.Generator().manual_seed(0)
    # correctness on a small batch: routed fast path vs the plain float32 routed mixture
    ids = torch.randint(0, vocab, (2, 257), generator=g).to(dev)
    got = B.score_memdec_router(base, hrunner, ids, vocab, router, per_token=True).float()
    bl, bh = fast.lm_logits_hidden(base, ids[:, :-1])
    ml, mh = fast.lm_logits_hidden(memory, ids[:, :-1])
    blp, mlp = log_softmax(bl.float(), vocab), log_softmax(ml.float(), vocab)
    want = routed_logprobs(blp, mlp, router.log_weights(bh, mh, blp, mlp)).gather(-1, ids[:, 1:, None])[..., 0]
    res["max_abs_diff_vs_plain_fp32_mixture"] = float((got - want.float()).abs().max())
    print("check", res["max_abs_diff_vs_plain_fp32_mixture"], flush=True)
    for shape in a.shapes.split(","):
        b, t = map(int, shape.split("x"))
        res["shapes"][shape] = one_shape(base, memory, runner, hrunner, router, vocab, dev, g, b, t, a.rounds)
        print(shape, res["shapes"][shape], f"{time.perf_counter() - t0:.0f} s", flush=True)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "router_cost.json").write_text(json.dumps(res, indent=1))


def one_shape(base, memory, runner, hrunner, router, vocab, dev, g, b: int, t: int, rounds: int) -> dict:
    """Separately timed ms of both scorers at (b, t) and their paired ratio (router / fast)."""
    ids = torch.randint(0, vocab, (b, t + 1), generator=g).to(dev)
    fast_ms = B.time_ms(lambda: B.score_memdec_fast(base, runner, ids, vocab, 0.5), dev, 2, 5)
    rout_ms = B.time_ms(lambda: B.score_memdec_router(base, hrunner, ids, vocab, router), dev, 2, 5)
    ratio = B.paired_ratio(lambda: B.score_memdec_fast(base, runner, ids, vocab, 0.5),
                           lambda: B.score_memdec_router(base, hrunner, ids, vocab, router), dev, 1, rounds)
    return {"memdec_fast_ms": fast_ms, "memdec_router_ms": rout_ms, "paired_ratio": ratio}


if __name__ == "__main__":
    main()
