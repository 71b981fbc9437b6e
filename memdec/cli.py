"""`memdec` command line: each subcommand parses its arguments and calls one public function.

Each block below belongs to one stage module; keep parsing here and the work in the module.
"""

from __future__ import annotations

import argparse
import os
import sys

from memdec.core.errors import one_line as error_text

# ---- shared options ----

#: what a --corpus / --data value may be (memdec.pipeline.data.TEXT_SUFFIXES, spelled out to keep `memdec --help` light)
CORPUS_FORMS = "a file, folder or glob of .txt/.jsonl/.jsonl.gz/.json/.parquet, or hf:NAME[:CONFIG]"


def _add_corpus_options(p) -> None:
    """--split / --text-column / --max-docs: how to read a corpus given as a path or hf:NAME[:CONFIG]."""
    p.add_argument("--split", help="hub dataset split (default train)")
    p.add_argument("--text-column", help="field/column holding the text (default text)")
    p.add_argument("--max-docs", type=int, help="use only the first N documents")


def _corpus_spec(value: str | None, args):
    """A CorpusSpec from a --corpus/--data value and the corpus options (None stays None)."""
    from memdec.pipeline.data import CorpusSpec

    if value is None:
        return None
    return CorpusSpec.from_arg(value, split=args.split, text_column=args.text_column, max_docs=args.max_docs)


# ---- demo (memdec/demo.py) ----


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the bundled corpus with tiny models, on CPU")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")

    def run(args):
        from memdec.demo import run_demo

        run_demo(out=args.out)

    p.set_defaults(func=run)


# ---- train (memdec/pipeline/train.py) ----


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a Memory Decoder on a datastore's kNN targets (or fine-tune on a corpus)")
    p.add_argument("--init", required=True, help="the small causal LM to start from (HF dir or hub id)")
    p.add_argument("--out", required=True, help="output folder (HF model + tokenizer + memdec.json)")
    p.add_argument("--datastore", help="datastore folder (memdec datastore)")
    p.add_argument("--targets", help="kNN targets folder (default: the one DATASTORE/targets-* folder)")
    p.add_argument("--corpus", help=f"instead of a datastore, for beta=0 fine-tuning: {CORPUS_FORMS}")
    _add_corpus_options(p)
    p.add_argument("--beta", type=float, default=0.5, help="weight of the KL term (default 0.5; 0 = plain CE)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: --epochs over the windows)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8, help="windows per process per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.05, help="warmup steps, or a fraction of steps if < 1")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--window", type=int,
                   help="window length (default: min(1024, the datastore's window, the init model's context length))")
    p.add_argument("--stride", type=int, help="window stride (default: the window)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (resumed automatically)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lmbda", type=float, default=0.5, help="suggested mixing weight written to memdec.json")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")

    def run(args):
        from memdec.pipeline.train import train

        out = train(args.init, args.out, datastore=args.datastore, targets=args.targets, corpus=_corpus_spec(args.corpus, args),
                    beta=args.beta, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
                    grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
                    max_grad_norm=args.max_grad_norm, window=args.window, stride=args.stride,
                    save_every=args.save_every, seed=args.seed, lmbda=args.lmbda,
                    mixed_precision=args.mixed_precision, overwrite=args.overwrite)
        print(out)

    p.set_defaults(func=run)


# ---- dapt, lora (baselines/dapt.py, baselines/lora.py; registered there with train="memdec.cli:..._command") ----


def _baseline_train_args(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", help=f"domain corpus: {CORPUS_FORMS}")
    src.add_argument("--datastore", help="train on a datastore's token stream and window (the pipeline's windows)")
    _add_corpus_options(p)
    p.add_argument("--model", required=True, help="base model: HF dir or hub id")
    p.add_argument("--out", required=True, help="output folder (written as OUT.partial, resumed after a kill)")
    p.add_argument("--window", type=int,
                   help="tokens per window (default: min(1024, the model's context length[, the datastore's window]))")
    p.add_argument("--stride", type=int, help="window stride (default: the window)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: --epochs passes)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8, help="windows per step per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and an unfinished run with other settings)")


def _baseline_train_kwargs(args) -> dict:
    return dict(model=args.model, out=args.out, corpus=_corpus_spec(args.corpus, args), datastore=args.datastore, window=args.window,
                stride=args.stride, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
                grad_accum=args.grad_accum, save_every=args.save_every, seed=args.seed,
                mixed_precision=args.mixed_precision, overwrite=args.overwrite)


def dapt_command(sub) -> None:
    """`memdec dapt` (the dapt method's training command)."""
    p = sub.add_parser("dapt", help="DAPT baseline: full fine-tuning of the base model on the domain corpus")
    _baseline_train_args(p)
    p.add_argument("--lr", type=float, default=5e-5)

    def run(args):
        from baselines.dapt import dapt

        out = dapt(lr=args.lr, **_baseline_train_kwargs(args))
        print(f"dapt: wrote {out}; evaluate with: memdec-eval --model hf --model_args pretrained={out}")

    p.set_defaults(func=run)


def lora_command(sub) -> None:
    """`memdec lora` (the lora method's training command)."""
    p = sub.add_parser("lora", help="LoRA baseline: a peft LoRA adapter trained on the domain corpus")
    _baseline_train_args(p)
    rank = p.add_mutually_exclusive_group()
    rank.add_argument("--rank", type=int, help="LoRA rank (default 8)")
    rank.add_argument("--match-params", metavar="MEMDEC_DIR",
                      help="pick the rank whose trainable parameter count is closest to this Memory Decoder's")
    p.add_argument("--target-modules", nargs="+", help="layer names to adapt (default: peft's for the architecture)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=2e-4)

    def run(args):
        from baselines.lora import lora

        out = lora(rank=args.rank, match_params=args.match_params, target_modules=args.target_modules,
                   alpha=args.alpha, dropout=args.dropout, lr=args.lr, **_baseline_train_kwargs(args))
        print(f"lora: wrote {out}; evaluate with: memdec-eval --model hf --model_args pretrained={args.model},peft={out}")

    p.set_defaults(func=run)


def _add_method_commands(sub) -> None:
    """The training subcommands of registered methods (memdec.methods: built-ins, MEMDEC_PLUGINS files)."""
    from memdec.methods import methods, resolve

    for method in methods():
        if method.train is not None:
            resolve(method.train)(sub)


# ---- datastore, index, targets (memdec/pipeline/datastore.py, memdec/pipeline/search.py, memdec/pipeline/targets.py) ----


def _add_datastore(sub) -> None:
    p = sub.add_parser("datastore", help="build a kNN datastore (keys = base model hidden states, values = next tokens)")
    p.add_argument("--model", required=True, help="base model: HF dir or hub id")
    p.add_argument("--corpus", required=True, help=CORPUS_FORMS)
    p.add_argument("--out", required=True, help="output folder (written as OUT.partial, resumed after a kill)")
    _add_corpus_options(p)
    p.add_argument("--revision", help="model revision on the hub")
    p.add_argument("--window", type=int, help="tokens per window (default: min(1024, the model's context length))")
    p.add_argument("--stride", type=int, help="window stride (default: the window)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--dtype", default="auto", help="model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available; accelerate's under accelerate launch)")
    p.add_argument("--shard-rows", type=int, help="rows per shard file (default: about 1 GiB of keys)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and an unfinished run with other settings)")

    def run(args):
        from memdec.pipeline.datastore import build_datastore

        out = build_datastore(args.model, _corpus_spec(args.corpus, args), args.out, window=args.window, stride=args.stride,
                              batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                              shard_rows=args.shard_rows, revision=args.revision, overwrite=args.overwrite)
        print(out)

    p.set_defaults(func=run)


def _add_index(sub) -> None:
    p = sub.add_parser("index", help="build and save a search index over a datastore's keys (DATASTORE/index-BACKEND)")
    p.add_argument("--datastore", required=True, help="datastore folder (memdec datastore)")
    p.add_argument("--backend", default="torch", choices=["torch", "faiss-flat", "faiss-ivfpq"],
                   help="torch: exact, chunked matmul (nothing to build); faiss-flat: exact; faiss-ivfpq: approximate")
    p.add_argument("--out", help="index folder (default DATASTORE/index-BACKEND)")
    p.add_argument("--nlist", type=int, help="IVF-PQ: number of lists (default 4 sqrt(n))")
    p.add_argument("--m", type=int, help="IVF-PQ: code size = sub-quantizers, must divide the key dim (default <= 64)")
    p.add_argument("--nprobe", type=int, default=32, help="IVF-PQ: lists visited per query (default 32)")
    p.add_argument("--train-size", type=int, default=1 << 18, help="IVF-PQ: random keys to train on")
    p.add_argument("--k-factor", type=int, default=1,
                   help="IVF-PQ: search k_factor x k candidates and keep the k nearest by exact distance "
                        "(default 1: re-score only the k found; see benchmarks/results/ivfpq-*.md)")
    p.add_argument("--device", help="cuda to build on the GPU (faiss-gpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index")

    def run(args):
        from memdec.pipeline.search import build_index

        index = build_index(args.datastore, args.backend, out=args.out, nlist=args.nlist, m=args.m,
                            nprobe=args.nprobe, train_size=args.train_size, device=args.device,
                            overwrite=args.overwrite, k_factor=args.k_factor)
        print(index.path)

    p.set_defaults(func=run)


def _add_targets(sub) -> None:
    p = sub.add_parser("targets", help="sparse kNN target distributions for every datastore row")
    p.add_argument("--datastore", required=True, help="datastore folder (memdec datastore)")
    p.add_argument("--k", type=int, default=1024, help="neighbours per row, its own row excluded (default 1024)")
    p.add_argument("--temperature", type=float, default=16.0, help="softmax(-distance / T) (default 16)")
    p.add_argument("--backend", default="torch", choices=["torch", "faiss-flat", "faiss-ivfpq"],
                   help="search backend (a missing faiss index is built and saved)")
    p.add_argument("--out", help="output folder (default DATASTORE/targets-kK-tT)")
    p.add_argument("--batch-size", type=int, help="queries per search (default: the index's, 8192 on GPU, 256 on CPU)")
    p.add_argument("--device", help="cpu, cuda (default: cuda if available; accelerate's under accelerate launch)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and an unfinished run with other settings)")

    def run(args):
        from memdec.pipeline.targets import build_targets

        out = build_targets(args.datastore, out=args.out, k=args.k, temperature=args.temperature,
                            backend=args.backend, batch_size=args.batch_size, device=args.device,
                            overwrite=args.overwrite)
        print(out)

    p.set_defaults(func=run)


# ---- pipeline (memdec/pipeline/run.py) ----


def _add_pipeline(sub) -> None:
    p = sub.add_parser("pipeline", help="corpus -> datastore -> index -> targets -> Memory Decoder from one YAML config")
    p.add_argument("config", help="pipeline YAML (example: memdec/configs/gpt2_wikitext103.yaml)")

    def run(args):
        from memdec.pipeline.run import run_pipeline

        result = run_pipeline(args.config)
        print(result["paths"]["train"])

    p.set_defaults(func=run)


# ---- report, tune-lambda (reports/report.py, memdec/eval/tune.py) ----


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="markdown tables, a long-form CSV and plots from lm-eval results folders")
    p.add_argument("runs", nargs="+", metavar="RUNS_DIR", help="folders searched for lm-eval results_*.json")
    p.add_argument("--out", required=True, help="output name: writes OUT.md, OUT.csv and OUT_*.png")
    p.add_argument("--claims", action="store_true",
                   help="also check the paper's claims (results laid out as the offline reproduction's: "
                        "RESULTS/base/BASE__base_*.json, RESULTS/DOMAIN/BASE__METHOD_*.json; see reports/claims.py)")

    def run(args):
        import warnings

        from reports.report import write_report

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                written = write_report(args.runs, args.out, claims=args.claims)
            finally:
                for w in caught:
                    if issubclass(w.category, UserWarning):
                        print(f"memdec report: warning: {w.message}", file=sys.stderr)
        for path in written.values():
            print(path)

    p.set_defaults(func=run)


def _add_tune_lambda(sub) -> None:
    p = sub.add_parser("tune-lambda", help="the mixing weight lmbda with the lowest validation perplexity")
    p.add_argument("--base", required=True, help="base model (hub name or folder)")
    p.add_argument("--memory", required=True, help="memory decoder folder (or hub name)")
    p.add_argument("--data", required=True, help=f"validation text: {CORPUS_FORMS}")
    _add_corpus_options(p)
    p.add_argument("--window", type=int, default=None,
                   help="window (default: min(1024, the two models' context lengths))")
    p.add_argument("--stride", type=int, default=None, help="stride (default: window / 2)")
    p.add_argument("--grid", default="0:1:0.05", help="START:STOP:STEP (STOP included) or a,b,c (default 0:1:0.05)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--plot", default=None, metavar="PNG", help="also save the curve as a PNG")
    p.add_argument("--write", action="store_true", help="store the best lmbda in MEMORY/memdec.json")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="keep each model's per-token log-probs here: a rerun (new grid, after a kill) reuses them")

    def run(args):
        from memdec.eval.tune import tune_lambda

        r = tune_lambda(args.base, args.memory, args.data, window=args.window, stride=args.stride, grid=args.grid,
                        batch_size=args.batch_size, write=args.write, plot=args.plot, device=args.device,
                        dtype=args.dtype, split=args.split, text_column=args.text_column, max_docs=args.max_docs,
                        cache_dir=args.cache)
        print(f"{r.n_tokens} tokens of {r.data}, window {r.window}, stride {r.stride}")
        print(r.table())
        print(f"best lmbda {r.best_lmbda:g}: perplexity {r.best_perplexity:.4f}")
        if r.written:
            print(f"wrote lmbda {r.best_lmbda:g} into {r.written}")

    p.set_defaults(func=run)


def _add_tune_knnlm(sub) -> None:
    p = sub.add_parser("tune-knnlm", help="the kNN-LM's lmbda and temperature with the lowest validation perplexity")
    p.add_argument("--base", required=True, help="base model (hub name or folder): the datastore's model")
    p.add_argument("--datastore", required=True, help="datastore folder (memdec datastore)")
    p.add_argument("--data", required=True, help=f"validation text: {CORPUS_FORMS}")
    _add_corpus_options(p)
    p.add_argument("--k", type=int, default=1024, help="neighbours per position (default 1024)")
    p.add_argument("--grid", default="0:1:0.05", help="lmbda grid: START:STOP:STEP or a,b,c (default 0:1:0.05)")
    p.add_argument("--temperatures", default="1,2,4,8,16,32,64", help="temperature grid a,b,c (default 1,...,64)")
    p.add_argument("--window", type=int, default=None, help="window (default: min(1024, the base's context))")
    p.add_argument("--stride", type=int, default=None, help="stride (default: window / 2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--backend", default="torch", help="index backend, as knnlm's backend= (default torch)")
    p.add_argument("--recompute-dists", action="store_true", help="exact distances from the stored keys")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="keep the per-position features here: another grid reuses them (no forward, no search)")
    p.add_argument("--out", default=None, metavar="JSON", help="also write the grid and the best pair as JSON")

    def run(args):
        from memdec.eval.tune_knnlm import tune_knnlm

        r = tune_knnlm(args.base, args.datastore, args.data, k=args.k, lmbda_grid=args.grid,
                       temperatures=args.temperatures, window=args.window, stride=args.stride,
                       batch_size=args.batch_size, backend=args.backend, recompute_dists=args.recompute_dists,
                       device=args.device, dtype=args.dtype, split=args.split, text_column=args.text_column,
                       max_docs=args.max_docs, cache_dir=args.cache, out=args.out)
        print(f"{r.n_tokens} tokens of {r.data}, window {r.window}, stride {r.stride}, k {r.k}")
        print(r.table())
        print(f"best: lmbda {r.best_lmbda:g}, temperature {r.best_temperature:g}: perplexity {r.best_perplexity:.4f}"
              f"  (--model knnlm --model_args pretrained=...,datastore=...,{r.model_args()})")

    p.set_defaults(func=run)


# ---- bench (memdec/bench/) ----


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="inference speed: base vs +MemDec / +kNN-LM / +In-Context RAG (random weights)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where to run (default: cuda)")
    p.add_argument("--small", action="store_true", help="tiny shapes and lengths (a quick CPU run)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="model dtype (default: bf16, fp32 with --small)")
    p.add_argument("--base", default="qwen2.5-1.5b", help="base architecture in memdec/configs/arch")
    p.add_argument("--memory", default="qwen2.5-0.5b", help="memory decoder architecture in memdec/configs/arch")
    p.add_argument("--out", default="runs/bench", help="output folder (default: runs/bench)")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile / CUDA graphs (plain torch)")
    p.add_argument("--skip-knn", action="store_true", help="leave out the kNN-LM rows")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="skip (and mark) measurements not started within this time (default: 450)")

    def run(args):
        from memdec.bench import bench

        bench(device=args.device, small=args.small, dtype=args.dtype, base=args.base, memory=args.memory,
              out=args.out, compile=not args.no_compile, skip_knn=args.skip_knn, budget_s=args.budget)

    p.set_defaults(func=run)


# ---- generate (memdec/inference/joint.py) ----


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue prompts with a base model mixed with a memory decoder")
    p.add_argument("--base", required=True, help="base model (hub name or folder)")
    p.add_argument("--memory", required=True, help="memory decoder folder (or hub name)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("--lmbda", type=float, default=None, help="memory weight (default: memdec.json's, else 0.5)")
    p.add_argument("--mem-temperature", type=float, default=1.0, help="divides the memory's logits (default 1)")
    p.add_argument("--router", default=None, help="per-token router folder (memdec train-router) instead of --lmbda")
    p.add_argument("--router-threshold", type=float, default=None,
                   help="memory weight at or below which a token uses the base alone")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="torch seed for sampling")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])

    def run(args):
        from memdec.inference.joint import generate_text

        if any(prompt == "" for prompt in args.prompt):
            raise ValueError("--prompt: an empty prompt (give at least one character of text to continue)")
        if args.top_p is not None and not 0 < args.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {args.top_p:g}")
        if args.seed is not None:
            import torch

            torch.manual_seed(args.seed)
        gen = {k: v for k, v in dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p).items()
               if v is not None}
        texts = generate_text(args.base, args.memory, args.prompt, lmbda=args.lmbda,
                              mem_temperature=args.mem_temperature, device=args.device, dtype=args.dtype,
                              router=args.router, router_threshold=args.router_threshold, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, **gen)
        for prompt, text in zip(args.prompt, texts, strict=True):
            print(prompt + text)

    p.set_defaults(func=run)


# ---- train-router, export-router (memdec/inference/router.py) ----


def _add_train_router(sub) -> None:
    p = sub.add_parser("train-router", help="train a per-token router between the base and the memory decoder")
    p.add_argument("--base", required=True, help="base model (hub name or folder)")
    p.add_argument("--memory", required=True, help="memory decoder folder (or hub name)")
    p.add_argument("--data", action="append", required=True,
                   help=f"held-out text, never a test split (repeat: domain valid text, general text): {CORPUS_FORMS}")
    p.add_argument("--out", required=True, help="router folder (written as OUT.partial, resumed after a kill)")
    p.add_argument("--inputs", default="both", choices=["both", "base", "memory"], help="hidden states read (default both)")
    p.add_argument("--scalars", action=argparse.BooleanOptionalAction, default=True,
                   help="also read each distribution's largest probability and entropy (default on)")
    p.add_argument("--layers", type=int, default=2, choices=[1, 2])
    p.add_argument("--hidden", type=int, default=128, help="width of the 2-layer router (default 128)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--batch-tokens", type=int, default=4096, help="positions per AdamW step (default 4096)")
    p.add_argument("--valid-fraction", type=float, default=0.1, help="last part of each --data kept for validation")
    p.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True,
                   help="each --data weighs the same in the loss, whatever its length (default on)")
    p.add_argument("--lmbda-init", type=float, default=None, help="start at this fixed lmbda (default memdec.json's)")
    p.add_argument("--window", type=int, default=None, help="window (default: min(1024, context length))")
    p.add_argument("--stride", type=int, default=None, help="stride (default: window / 2)")
    p.add_argument("--max-docs", type=int, help="use only the first N documents of each --data")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--save-every", type=int, default=100, help="validate and checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--cache", default=None, metavar="DIR", help="keep the per-token features here (as tune-lambda)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and an unfinished run with other settings)")

    def run(args):
        from memdec.inference.router import train_router

        out = train_router(args.base, args.memory, args.data, args.out, inputs=args.inputs, scalars=args.scalars,
                           layers=args.layers, hidden=args.hidden, steps=args.steps, lr=args.lr,
                           weight_decay=args.weight_decay, batch_tokens=args.batch_tokens, window=args.window,
                           stride=args.stride, valid_fraction=args.valid_fraction, lmbda_init=args.lmbda_init,
                           balance=args.balance,
                           save_every=args.save_every, seed=args.seed, batch_size=args.batch_size,
                           device=args.device, dtype=args.dtype, cache_dir=args.cache, max_docs=args.max_docs,
                           overwrite=args.overwrite)
        from memdec.core.formats import read_json

        cfg = read_json(out / "router_config.json")
        ref = cfg["valid_reference_losses"]
        print(f"valid NLL: router {cfg['final_valid_loss']:.4f}, best fixed lmbda {ref['best_fixed_lmbda']:g} "
              f"{ref['best_fixed']:.4f}, base {ref['base']:.4f}, memory {ref['memory']:.4f}")
        print(out)

    p.set_defaults(func=run)


def _add_export_router(sub) -> None:
    p = sub.add_parser("export-router", help="write a router in a serving engine's format (lmdeploy memdecode)")
    p.add_argument("router", help="router folder (memdec train-router)")
    p.add_argument("--format", default="lmdeploy", choices=["lmdeploy"])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=float, default=None,
                   help="lambda_base_only_threshold written into memory_fusion_config.json (default off)")
    p.add_argument("--overwrite", action="store_true")

    def run(args):
        from memdec.inference.router import export_router

        print(export_router(args.router, args.out, args.format, args.threshold, args.overwrite))

    p.set_defaults(func=run)


# ---- end of blocks ----

REGISTER = [_add_demo, _add_train, _add_method_commands, _add_datastore, _add_index, _add_targets, _add_pipeline,
            _add_report, _add_tune_lambda, _add_tune_knnlm, _add_bench, _add_generate, _add_train_router, _add_export_router]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memdec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in REGISTER:
        add(sub)
    return parser


def check_device(device: str | None) -> None:
    """One-line error for a --device torch cannot use here (an unknown name, CUDA missing, no such GPU)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device}: not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch sees no CUDA GPU on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type != "cpu" and not (dev.type == "mps" and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device}: not available here (use cpu, cuda or cuda:N)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `memdec` command."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        parser = build_parser()
    except (ValueError, FileNotFoundError) as e:  # a MEMDEC_PLUGINS file that is missing or not a .py
        print(f"memdec: error: {error_text(e)}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        if args.command != "bench":  # bench checks its own --device (cuda or cpu)
            check_device(getattr(args, "device", None))
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"memdec {args.command}: error: {error_text(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
