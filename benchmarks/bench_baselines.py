"""Per-token scoring throughput of the baselines end to end, through their lm-eval model classes.

    OMP_NUM_THREADS=1 python benchmarks/bench_baselines.py                       # CPU, small shapes, ~1 min
    python benchmarks/bench_baselines.py --device cuda --arch qwen2.5-1.5b --memory-arch qwen2.5-0.5b \
        --full-size --datastore-tokens 1000000 --k 1024 --out runs/bench-baselines.json   # one GPU

`memdec bench` (memdec/bench/) times the core computations; this script times what a user runs:
`loglikelihood_rolling` of lm-eval's `hf` model (the base), `memdec`, `knnlm` and `incontext_rag` on
the same documents, including lm-eval's batching, the kNN search and scatter, and In-Context RAG's
BM25 retrieval on the CPU. Models have random weights (architectures from memdec/configs/arch, no
download); the tokenizer is a word-level one with the architecture's vocabulary size, and the corpus
and evaluation documents are Zipf-distributed random words (so BM25 finds partial matches). The
datastore is built by `memdec.pipeline.datastore.build_datastore` over the corpus (timed apart); `setup_s` is
each model's construction (for RAG it includes the BM25 index build, cached on disk in real use).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over the words w0 .. w{vocab_size-2} plus <|endoftext|> (EOS = pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i + 1 for i in range(vocab_size - 1)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")


def random_docs(rng: np.random.Generator, n_docs: int, n_words: int, vocab_size: int) -> list[str]:
    """Documents of Zipf-distributed random words (ids 1 .. vocab_size - 1)."""
    ids = np.minimum(rng.zipf(1.2, size=(n_docs, n_words)), vocab_size - 1)
    return [" ".join(f"w{i - 1}" for i in row) for row in ids]


def throughput(lm, docs: list[str], n_tokens: int, device: torch.device) -> dict:
    """Tokens scored per second by `lm.loglikelihood_rolling(docs)` (after one warm-up document)."""
    from lm_eval.api.instance import Instance

    def reqs(texts):
        return [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i)
                for i, t in enumerate(texts)]

    lm.loglikelihood_rolling(reqs(docs[:1]), disable_tqdm=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    lls = lm.loglikelihood_rolling(reqs(docs), disable_tqdm=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": n_tokens / seconds, "seconds": seconds, "mean_nll": -sum(lls) / n_tokens,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="gpt2", help="base architecture (memdec/configs/arch)")
    p.add_argument("--memory-arch", default=None, help="Memory Decoder architecture (default: --arch)")
    p.add_argument("--full-size", action="store_true", help="real shapes (default: memdec bench's small shapes)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--docs", type=int, default=8, help="evaluation documents")
    p.add_argument("--doc-words", type=int, default=256, help="words (= tokens) per evaluation document")
    p.add_argument("--max-length", type=int, default=None, help="context of the lm-eval models (default: model's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--datastore-tokens", type=int, default=20_000)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--lmbda", type=float, default=0.25)
    p.add_argument("--rag-stride", type=int, default=4)
    p.add_argument("--rag-doc-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    from lm_eval.models.huggingface import HFLM

    from baselines.incontext_rag import InContextRAG
    from baselines.knnlm import KNNLM
    from memdec.bench import arch_config
    from memdec.eval.models import MemDecLM
    from memdec.pipeline.datastore import build_datastore

    device = torch.device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    hf_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    small = not args.full_size
    rng = np.random.default_rng(args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench-baselines-"))
    from transformers import AutoModelForCausalLM

    base_cfg = arch_config(args.arch, small)
    mem_cfg = arch_config(args.memory_arch or args.arch, small)
    mem_cfg.vocab_size = base_cfg.vocab_size
    tok = word_tokenizer(base_cfg.vocab_size)
    paths = {}
    for seed, (name, cfg) in enumerate((("base", base_cfg), ("memory", mem_cfg)), args.seed):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(work / name)
        tok.save_pretrained(work / name)
        paths[name] = str(work / name)
        del model
    max_length = args.max_length or min(1024, getattr(base_cfg, "max_position_embeddings", None)
                                        or getattr(base_cfg, "n_positions", 1024))
    corpus_docs = random_docs(rng, max(1, args.datastore_tokens // 512), 512, base_cfg.vocab_size)
    with open(work / "corpus.jsonl", "w") as f:
        for d in corpus_docs:
            f.write(json.dumps({"text": d}) + "\n")
    t0 = time.perf_counter()
    ds = build_datastore(paths["base"], str(work / "corpus.jsonl"), work / "datastore", window=min(512, max_length),
                         device=device, dtype=hf_dtype, progress=False)
    datastore_s = time.perf_counter() - t0
    docs = random_docs(rng, args.docs, args.doc_words, base_cfg.vocab_size)
    n_tokens = sum(len(tok(d)["input_ids"]) for d in docs)

    common = {"pretrained": paths["base"], "device": str(device), "batch_size": args.batch_size,
              "dtype": hf_dtype, "max_length": max_length}
    results: dict = {}
    runs = [
        ("base (hf)", lambda: HFLM(**common)),
        ("+memdec", lambda: MemDecLM(memory=paths["memory"], lmbda=args.lmbda, **common)),
        (f"+kNN-LM (k={args.k}, {ds.name})", lambda: KNNLM(datastore=str(ds), k=args.k, lmbda=args.lmbda, **common)),
        (f"+In-Context RAG (stride {args.rag_stride})",
         lambda: InContextRAG(corpus=str(work / "corpus.jsonl"), stride=args.rag_stride, query_tokens=32,
                              max_doc_tokens=args.rag_doc_tokens, cache_dir=str(work / "rag"), **common)),
    ]
    for name, make in runs:
        t0 = time.perf_counter()
        lm = make()
        setup = time.perf_counter() - t0
        results[name] = {**throughput(lm, docs, n_tokens, device), "setup_s": setup}
        print(f"{name:40s} {results[name]['tokens_per_s']:12.1f} tok/s  (setup {setup:.1f}s)", file=sys.stderr)
        del lm
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base_tps = results["base (hf)"]["tokens_per_s"]
    for r in results.values():
        r["relative_to_base"] = r["tokens_per_s"] / base_tps
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": dtype,
        "arch": args.arch, "memory_arch": args.memory_arch or args.arch, "small": small,
        "vocab": base_cfg.vocab_size, "max_length": max_length, "docs": args.docs, "tokens": n_tokens,
        "datastore_entries": int(json.loads((ds / "manifest.json").read_text())["n_entries"]),
        "datastore_build_s": datastore_s, "k": args.k, "batch_size": args.batch_size, "results": results,
    }
    print("| model | tokens/s | x base | setup s |\n|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:.1f} | {r['relative_to_base']:.3f} | {r['setup_s']:.1f} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
