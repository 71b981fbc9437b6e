"""MEMDEC_COMPILE_CACHE: the first call of a compiled scoring forward on a fresh machine, cold and with the
artifacts of an earlier run (issue 16, goal 4).

    python benchmarks/compile_cache.py --out DIR [--device cuda] [--model qwen2.5-0.5b] [--compile-mode full]

Each measurement runs in a new process with a new, empty TORCHINDUCTOR_CACHE_DIR (what a fresh GPU lease sees):
first cold, writing MEMDEC_COMPILE_CACHE at exit; then with that file loaded. Prints and writes
compile_cache.json: seconds of the first call (compile, and on CUDA the graph capture), the steady-state call,
and whether both runs' outputs agree. On CPU (`--device cpu`, a tiny Qwen2) GraphedForward's compile is forced
on, as a stand-in for the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(device: str, model_name: str, compile_mode: str) -> dict:
    """One process: build the model, time the first and a later call of its compiled GraphedForward."""
    import torch

    from memdec import bench as B
    from memdec.inference import fast

    dev = torch.device(device)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    small = dev.type == "cpu"
    model = B.build_model(model_name, small, dtype, dev, 0)
    if small:  # a deeper tiny model, so that regional and full differ as on a real one
        from transformers import AutoModelForCausalLM, Qwen2Config

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(Qwen2Config(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)).to(dev, dtype).eval()
    runner = fast.GraphedForward(model, compile_mode=compile_mode)
    if not runner.use_compile:  # CPU: GraphedForward compiles on CUDA only; force it (the test suite does too)
        runner.use_compile, runner._forward = True, runner._compiled_forward()
    ids = torch.randint(0, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0)).to(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = runner(ids).float()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        runner(ids)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return {"first_call_s": first, "second_call_s": time.perf_counter() - t0,
            "checksum": float(out.double().sum()), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--compile-mode", default="full", choices=("full", "regional"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.device, a.model, a.compile_mode)), flush=True)
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": a.device, "model": a.model if a.device != "cpu" else "tiny qwen2 (8 layers)",
           "compile_mode": a.compile_mode, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = Path(tmp) / "compiled.bin"
        for name in ("cold", "with_artifacts"):
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / f"inductor-{name}"),
                       TRITON_CACHE_DIR=str(Path(tmp) / f"triton-{name}"), MEMDEC_COMPILE_CACHE=str(artifacts),
                       PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, __file__, "--out", a.out, "--device", a.device, "--model", a.model,
                                "--compile-mode", a.compile_mode, "--child"], env=env, capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"compile_cache.py: the {name} run failed:\n{p.stderr[-2000:]}")
            run = json.loads(p.stdout.strip().splitlines()[-1])
            run["process_s"] = time.perf_counter() - t0
            run["artifact_bytes"] = artifacts.stat().st_size if artifacts.exists() else 0
            res["runs"][name] = run
            print(name, run, flush=True)
    r = res["runs"]
    res["same_output"] = r["cold"]["checksum"] == r["with_artifacts"]["checksum"]
    res["first_call_speedup"] = r["cold"]["first_call_s"] / r["with_artifacts"]["first_call_s"]
    (out / "compile_cache.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}), flush=True)


if __name__ == "__main__":
    main()
