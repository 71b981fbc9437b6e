"""End to end through `memdec-eval`: wall time of a rolling-perplexity task, `--model memdec` against `--model hf`.

Random-weight Qwen2.5-1.5B (base) and Qwen2.5-0.5B (memory) in bf16 with a byte-level BPE tokenizer of
about Qwen's vocabulary size (146,324 tokens, no pad token, as GPT-2's and Qwen's base tokenizers), saved
to --work; a ~100 k-token document set of random words as `memdec_bio_ppl`'s local
test split (window 1024, stride 512). Each `memdec-eval` call runs in this process, models loaded from
disk each time. The runs alternate hf, memdec, hf, memdec, ...: the first memdec run includes
compiling and capturing (reported as its excess over the later memdec runs), the others give the
steady ratio (median). `--phase reuse`, in a new process with the same TORCHINDUCTOR_CACHE_DIR, times
one memdec run with the compiled artifacts of the first process on disk.

    python benchmarks/eval_e2e.py --work /tmp/e2e --out OUT [--rounds 3] [--tokens 100000]
    python benchmarks/eval_e2e.py --work /tmp/e2e --out OUT --phase reuse

Needs a GPU, torch, transformers and lm-eval (no network). Writes OUT/eval_e2e.json (and .md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

DEVICE = torch.device("cuda")


def byte_level_bpe(letters: str):
    """A GPT-2/Qwen-style byte-level BPE (no pad token) whose merges spell every 1-3 letter word of `letters`.

    " abc" is two tokens ("Ġ", "abc"), " ab" one ("Ġab"); built, not trained, so any vocabulary size is
    quick: 52 letters give 146,324 tokens, about Qwen2.5's 151,643.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []

    def add(a: str, b: str) -> None:
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))

    pairs = [a + b for a in letters for b in letters]
    for ab in pairs:
        add(ab[0], ab[1])
    for ab in pairs:
        for c in letters:
            add(ab, c)
    for c in letters:
        add("\u0120", c)
    for ab in pairs:
        add("\u0120", ab)
    tk = Tokenizer(models.BPE(vocab, merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, model_max_length=32768)
    tok.add_special_tokens({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})
    return tok


def build(work: Path, tokens: int, small: bool = False, seed: int = 0) -> None:
    """Tokenizer, base, memory and the task's data under `work` (skipped when there)."""
    from memdec.bench import build_model

    if (work / "done").is_file():
        return
    letters = "abcde" if small else "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    tok = byte_level_bpe(letters)
    for name, arch, s in (("base", "qwen2.5-1.5b", 1), ("memory", "qwen2.5-0.5b", 2)):
        model = build_model(arch, small, torch.float32 if small else torch.bfloat16, DEVICE, s)
        if len(tok) > model.config.vocab_size:
            raise SystemExit(f"eval_e2e: tokenizer of {len(tok)} tokens > {arch}'s {model.config.vocab_size} rows")
        model.config.eos_token_id = model.config.bos_token_id = tok.eos_token_id
        model.save_pretrained(work / name)
        tok.save_pretrained(work / name)
        del model
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    rng = random.Random(seed)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "memdec_bio_ppl.jsonl", "w", encoding="utf-8") as f:
        for _ in range(max(1, tokens // 2000)):  # 1000 words of ~2 tokens per document
            words = ("".join(rng.choice(letters) for _ in range(3)) for _ in range(1000))
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    (work / "done").write_text("ok\n")


def run_eval(work: Path, model: str, out: Path) -> tuple[float, dict]:
    """(wall seconds, the task's metrics) of one `memdec-eval` call in this process."""
    from memdec.eval.launcher import cli_main

    args = f"pretrained={work / 'base'},max_length=1024,dtype={'float32' if DEVICE.type == 'cpu' else 'bfloat16'}"
    if model == "memdec":
        args += f",memory={work / 'memory'},lmbda=0.5"
    os.environ["MEMDEC_DATA_DIR"] = str(work / "data")
    dest = work / "lm_eval" / f"{model}_{time.time_ns()}"  # lm-eval's files stay in the work folder
    t0 = time.perf_counter()
    rc = cli_main(["--model", model, "--model_args", args, "--tasks", "memdec_bio_ppl", "--device", str(DEVICE),
                   "--batch_size", "8", "--output_path", str(dest)])
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"eval_e2e: memdec-eval --model {model} failed (exit {rc})")
    files = sorted(dest.rglob("results_*.json"))
    metrics = json.loads(files[-1].read_text())["results"]["memdec_bio_ppl"] if files else {}
    return wall, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/memdec_e2e")
    p.add_argument("--out", default="runs/eval_e2e")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--phase", choices=["main", "reuse"], default="main")
    p.add_argument("--small", action="store_true", help="CPU smoke test: tiny models, 512-token vocabulary")
    a = p.parse_args()
    global DEVICE
    DEVICE = torch.device("cpu" if a.small else "cuda")
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
    import lm_eval
    import transformers

    env = {"device": torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "lm_eval": lm_eval.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "inductor_cache": os.environ["TORCHINDUCTOR_CACHE_DIR"]}
    t0 = time.perf_counter()
    build(work, a.tokens, a.small)
    built = time.perf_counter() - t0
    path = out / f"eval_e2e_{a.phase}.json"
    if a.phase == "reuse":
        wall, metrics = run_eval(work, "memdec", out)
        res = {"environment": env, "memdec_first_run_with_cached_artifacts_s": wall, "metrics": metrics}
        path.write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return 0
    runs: dict[str, list[float]] = {"hf": [], "memdec": []}
    metrics: dict[str, dict] = {}
    for _ in range(a.rounds):
        for model in ("hf", "memdec"):
            wall, metrics[model] = run_eval(work, model, out)
            runs[model].append(wall)
            print(f"{model}: {wall:.1f} s  {metrics[model]}", flush=True)
    steady_mem = statistics.median(runs["memdec"][1:]) if len(runs["memdec"]) > 1 else None
    steady_hf = statistics.median(runs["hf"][1:]) if len(runs["hf"]) > 1 else runs["hf"][0]
    res = {"environment": env, "build_s": built, "tokens": a.tokens, "runs_s": runs, "metrics": metrics,
           "steady_ratio_memdec_over_hf": steady_mem / steady_hf if steady_mem else None,
           "first_memdec_excess_s (compile + capture)": runs["memdec"][0] - steady_mem if steady_mem else None}
    path.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
