"""`memdec demo`: the whole Memory Decoder recipe on the bundled corpus, with tiny models, on CPU, offline.

1. a byte-level BPE tokenizer trained on the bundled text (memdec/data, see CREDITS.md);
2. a tiny GPT-2 "base" LM pretrained briefly on the general part (WordNet, Jargon File, Python docs);
3. `memdec pipeline` on the domain part (ICD-10-CM): the base's datastore, exact kNN targets, and a
   Memory Decoder trained from a smaller tiny GPT-2;
4. perplexity on the held-out domain test split through lm-eval (task `memdec_bio_ppl` on local
   data): the base alone (`hf`), the Memory Decoder alone (`hf`) and base + Memory Decoder (`memdec`);
   printed as a markdown table and written to OUT/results.md and OUT/results.json.

Every step is skipped when its output is complete, so a killed demo resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from memdec.core.formats import read_json, staged_output, write_json

DATA = Path(__file__).parent / "data"
TASK = "memdec_bio_ppl"


@dataclass
class DemoSettings:
    """Sizes and schedules of the demo (the defaults take about two minutes of one CPU core)."""

    vocab_size: int = 1024
    window: int = 128  # training and datastore windows; evaluation uses `window` and `eval_stride`
    eval_stride: int = 64
    base_layers: int = 4
    base_hidden: int = 128
    base_heads: int = 4
    base_steps: int = 300
    base_lr: float = 2e-3
    memory_layers: int = 2
    memory_hidden: int = 64
    memory_heads: int = 2
    memory_steps: int = 250
    memory_lr: float = 3e-3
    batch_size: int = 8
    k: int = 32
    temperature: float = 16.0
    beta: float = 0.5
    lmbda: float = 0.5
    max_docs: int | None = None  # cap on the documents of each corpus part (quick runs)
    seed: int = 0


def _texts(name: str, max_docs: int | None) -> list[str]:
    from memdec.pipeline.data import CorpusSpec, load_texts

    return load_texts(CorpusSpec(path=str(DATA / f"{name}.jsonl"), max_docs=max_docs))


def _step(label: str, done: bool) -> bool:
    print(f"demo: {label}{': complete, skipped' if done else ''}", flush=True)
    return not done


def _evaluate(name: str, model: str, model_args: dict[str, Any], data_dir: Path, s: DemoSettings,
              out: Path) -> dict[str, Any]:
    """One lm-eval run of the perplexity task; its metrics cached in OUT/eval/NAME.json."""
    path = out / "eval" / f"{name}.json"
    if not _step(f"lm-eval {name}", path.exists()):
        return read_json(path)
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from memdec.eval.launcher import register_models, tasks_dir

    register_models()
    manager = TaskManager(include_path=[tasks_dir()], include_defaults=False,
                          metadata={"data_dir": str(data_dir), "ppl_window": s.window, "ppl_stride": s.eval_stride})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], task_manager=manager,
                                     batch_size=16, device=device, log_samples=False, bootstrap_iters=0)
    metrics = result["results"][TASK]
    row = {
        "model": name, "lm_eval_model": model, "model_args": model_args,
        "token_perplexity": metrics["token_perplexity,none"],
        "word_perplexity": metrics["word_perplexity,none"],
        "bits_per_byte": metrics["bits_per_byte,none"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, row)
    return row


def results_table(rows: list[dict[str, Any]]) -> str:
    """The demo's markdown table: one row per model, token perplexity and bits per byte (word perplexity is in the JSON)."""
    from tabulate import tabulate

    body = [[r["model"], f"{r['token_perplexity']:.2f}", f"{r['bits_per_byte']:.4f}"] for r in rows]
    return tabulate(body, headers=["model", "token perplexity", "bits per byte"], tablefmt="github",
                    disable_numparse=True, colalign=("left", "right", "right"))


def run_demo(out: str | os.PathLike = "runs/demo", settings: DemoSettings | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the demo in `out`; returns {"rows": [...], "table": markdown, "settings": {...}}."""
    from memdec.pipeline.run import run_pipeline, stage_complete
    from memdec.pipeline.train import train
    from memdec.tiny import save_model, tiny_model, train_tokenizer

    s = settings or DemoSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    general = _texts("general", s.max_docs)

    # 1. tokenizer (general + domain training text) and the two untrained tiny models
    tok_dir, base_init, memory_init = out / "tokenizer", out / "init" / "base", out / "init" / "memory"
    if _step("tokenizer", (tok_dir / "tokenizer.json").exists()):
        tok = train_tokenizer(general + _texts("domain_train", s.max_docs), s.vocab_size, name="memdec-demo-bpe")
        with staged_output(tok_dir, overwrite=True) as tmp:
            tok.save_pretrained(tmp)
    if _step("untrained tiny models", memory_init.exists()):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        positions = 2 * s.window
        base = tiny_model(tok, "gpt2", s.base_layers, s.base_hidden, s.base_heads, positions, seed=s.seed)
        mem = tiny_model(tok, "gpt2", s.memory_layers, s.memory_hidden, s.memory_heads, positions, seed=s.seed + 1)
        for model, folder in ((base, base_init), (mem, memory_init)):
            with staged_output(folder, overwrite=True) as tmp:
                save_model(model, tok, tmp)

    # 2. the base LM: plain causal-LM training on the general part
    base_dir = out / "base"
    if _step("base LM (pretraining on the general part)", stage_complete("train", base_dir)):
        train(base_init, base_dir, texts=general, beta=0.0, window=s.window, steps=s.base_steps,
              batch_size=s.batch_size, lr=s.base_lr, save_every=100, seed=s.seed, progress=progress)

    # 3. datastore -> index -> kNN targets -> Memory Decoder, on the domain part
    corpus = {"path": str(DATA / "domain_train.jsonl"), "max_docs": s.max_docs}
    pipeline = run_pipeline({
        "output": str(out),
        "corpus": {k: v for k, v in corpus.items() if v is not None},
        "base_model": str(base_dir),
        "datastore": {"window": s.window, "batch_size": 16},
        "index": {"backend": "torch"},
        "targets": {"k": s.k, "temperature": s.temperature},
        "train": {"init": str(memory_init), "beta": s.beta, "window": s.window, "steps": s.memory_steps,
                  "batch_size": s.batch_size, "lr": s.memory_lr, "save_every": 100, "seed": s.seed,
                  "lmbda": s.lmbda},
    }, progress=progress)
    memory_dir = Path(pipeline["paths"]["train"])

    # 4. held-out domain perplexity through lm-eval
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    test = _texts("domain_test", s.max_docs)
    with open(data_dir / f"{TASK}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in test)
    rows = [
        _evaluate("base", "hf", {"pretrained": str(base_dir)}, data_dir, s, out),
        _evaluate("Memory Decoder alone", "hf", {"pretrained": str(memory_dir)}, data_dir, s, out),
        _evaluate(f"base + Memory Decoder (lmbda={s.lmbda})", "memdec",
                  {"pretrained": str(base_dir), "memory": str(memory_dir), "lmbda": s.lmbda}, data_dir, s, out),
    ]
    table = results_table(rows)
    base_ppl, mixed_ppl = rows[0]["token_perplexity"], rows[-1]["token_perplexity"]
    summary = (f"Held-out ICD-10-CM text ({TASK}, window {s.window}, stride {s.eval_stride}): "
               f"the Memory Decoder takes the base's token perplexity from {base_ppl:.2f} to {mixed_ppl:.2f} "
               f"({100 * (1 - mixed_ppl / base_ppl):.1f}% lower).")
    (out / "results.md").write_text(f"# memdec demo\n\n{summary}\n\n{table}\n", encoding="utf-8")
    result = {"rows": rows, "table": table, "summary": summary, "settings": asdict(s),
              "paths": {"base": str(base_dir), "memory": str(memory_dir), **pipeline["paths"]},
              "seconds": round(time.time() - started, 1)}
    write_json(out / "results.json", result)
    print(f"\n{summary}\n\n{table}\n\nwritten to {out / 'results.md'} and {out / 'results.json'}", flush=True)
    return result
