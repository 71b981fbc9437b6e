"""Several GPUs give the same outputs as one: datastore, kNN targets and training under `accelerate launch`.

Builds a tokenizer and random-weight GPT-2 models locally (no download), then runs the three stages through
the `memdec` CLI with 1 and with N processes and compares what they wrote:

    python benchmarks/multi_gpu_check.py --corpus CORPUS.jsonl.gz --out DIR [--nproc 2]

Datastore and targets files must be byte-identical (each process writes whole shards/chunks); training with
N processes of batch b must match one process of batch N*b up to float rounding (reported as the largest
absolute weight difference). Writes DIR/multi_gpu.json and DIR/multi_gpu.md with the card's name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def sha256s(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def launch(nproc: int, args: list[str], cpu: bool) -> float:
    if cpu:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if nproc > 1:
            cmd.append("--multi_gpu")
    t0 = time.perf_counter()
    subprocess.run([*cmd, "-m", "memdec.cli", *args], check=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--max-docs", type=int, default=300)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cpu", action="store_true", help="CPU processes (gloo) for a quick local check")
    a = p.parse_args()

    from memdec.pipeline.data import CorpusSpec, load_texts
    from memdec.tiny import save_model, tiny_model, train_tokenizer

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = load_texts(CorpusSpec(path=a.corpus, max_docs=a.max_docs))
    tok = train_tokenizer(texts, vocab_size=4096)
    small = a.cpu
    base = save_model(tiny_model(tok, "gpt2", n_layer=2 if small else 8, hidden=64 if small else 512,
                                 n_head=4 if small else 8, max_positions=a.window, seed=1), tok, out / "base")
    init = save_model(tiny_model(tok, "gpt2", n_layer=1 if small else 4, hidden=32 if small else 256,
                                 n_head=2 if small else 4, max_positions=a.window, seed=2), tok, out / "init")
    device = ["--device", "cpu"] if a.cpu else []
    batch = 4
    runs = {}
    for n in (1, a.nproc):
        d = out / f"n{n}"
        t = {}
        t["datastore_s"] = launch(n, ["datastore", "--model", base, "--corpus", a.corpus, "--max-docs",
                                      str(a.max_docs), "--window", str(a.window), "--batch-size", "4",
                                      "--shard-rows", "20000", "--out", str(d / "ds"), *device], a.cpu)
        t["targets_s"] = launch(n, ["targets", "--datastore", str(d / "ds"), "--k", str(a.k),
                                    "--temperature", "16", *device], a.cpu)
        t["train_s"] = launch(n, ["train", "--init", init, "--datastore", str(d / "ds"), "--out", str(d / "md"),
                                  "--steps", str(a.steps), "--batch-size", str(batch * a.nproc // n),
                                  "--mixed-precision", "no", "--save-every", "1000"], a.cpu)
        runs[n] = t
    one, many = out / "n1", out / f"n{a.nproc}"
    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not a.cpu else "cpu",
              "nproc": a.nproc, "times_s": runs, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result["datastore_identical"] = sha256s(one / "ds") == sha256s(many / "ds")
    tdir = next((one / "ds").glob("targets-*")).name
    result["targets_identical"] = sha256s(one / "ds" / tdir) == sha256s(many / "ds" / tdir)
    from safetensors.torch import load_file

    w1, wn = load_file(str(one / "md" / "model.safetensors")), load_file(str(many / "md" / "model.safetensors"))
    result["train_max_abs_weight_diff"] = max((w1[k].double() - wn[k].double()).abs().max().item() for k in w1)
    result["train_max_abs_weight"] = max(w1[k].abs().max().item() for k in w1)
    (out / "multi_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# 1 vs {a.nproc} processes ({result['device']}, {result['date']})", "",
          f"| stage | 1 process (s) | {a.nproc} processes (s) | same output |", "|---|---:|---:|---|",
          f"| datastore | {runs[1]['datastore_s']:.1f} | {runs[a.nproc]['datastore_s']:.1f} | "
          f"{'byte-identical' if result['datastore_identical'] else 'DIFFERENT'} |",
          f"| targets (k={a.k}) | {runs[1]['targets_s']:.1f} | {runs[a.nproc]['targets_s']:.1f} | "
          f"{'byte-identical' if result['targets_identical'] else 'DIFFERENT'} |",
          f"| train ({a.steps} steps, fp32) | {runs[1]['train_s']:.1f} | {runs[a.nproc]['train_s']:.1f} | "
          f"max weight diff {result['train_max_abs_weight_diff']:.2e} (max weight {result['train_max_abs_weight']:.2f}) |",
          "", "Times include process start-up and model loading (small models: they measure equality, not speed)."]
    (out / "multi_gpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    main()
