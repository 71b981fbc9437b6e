"""The Memory Decoder paper's experiments at small scale on the offline corpora, in one command (issues 8, 18).

    python experiments/offline_reproduction/run.py --run RUN_DIR --out OUT_DIR [--small] [--config config.yaml]

Steps (each skipped when its output is complete, so a rerun after a kill or a timeout resumes):

1. data      capped copies of the corpora (RUN/data/NAME-SPLIT.jsonl) and the test splits as the
             lm-eval tasks' local files (RUN/eval_data/memdec_{bio,finance,law,general}_ppl.jsonl)
2. tokenizer one byte-level BPE on general + domain train text (memdec.tiny.train_tokenizer)
3. init      random GPT-2 models of three sizes (memdec.tiny.tiny_model), RUN/init/BASE
4. pretrain  each base on general/train for its own number of steps (a family that differs; train(beta=0))
5. domain    per domain: a datastore per base (memdec.pipeline.datastore), kNN targets from the largest base's
             (memdec.pipeline.targets), a Memory Decoder from the smallest base (memdec.pipeline.train), lmbda on valid
             (memdec.eval.tune.tune_lambda, largest base), the kNN-LM's lmbda and temperature per base on valid
             (memdec.eval.tune_knnlm), a per-token router per base (memdec.inference.router, issue 17) on the
             domain's valid split + general/valid; then memdec-eval (in process) of every base x method on the
             domain's test split and on general/test (+MemDec, +MemDec (router), +kNN-LM, +In-Context RAG, and
             RAG at the paper's stride and the copy check where the config asks), RAG's retrieval check
             (rag_check.py) and the case study (case_study.py)
   finetune  per domain, beside it: DAPT and LoRA (rank matched to the Memory Decoder) of the largest base at
             every learning rate of the grid, the one with the lowest valid perplexity, every other base at it,
             and their memdec-eval runs
6. eval      every base alone on the three domain tests and general/test; each base's copy ability on the
             copy check's domains (rag_check.copy_ability)
7. report    `memdec report` over RUN/results (RUN/report/report.md, .csv, .png) and RUN/report/results.md
             (card, stage times, lmbda, tables, the paper's claims checked against the numbers:
             reports/claims.py, also `memdec report --claims RUN/results`)
8. bundle    OUT/: results.tar.gz (lm-eval JSONs, tuning JSONs, tune-lambda curves), report.md/.csv/_size.png,
             results.md, times.json, logs.tar.gz

Steps 4 and 5-6 run as parallel worker processes (this script with --job), spread over the GPUs found
(CUDA_VISIBLE_DEVICES per worker); without a GPU, or with --serial, they run one after another in
this process. Stage wall times go to RUN/times/JOB.json and OUT/times.json.

This file is the recipe; scheduler.py runs its jobs and stages (workers, GPUs, resume, times) and
reports/claims.py checks the paper's claims. Method names and labels come from the method registry (memdec.methods).

Step 5's datastore → targets → Memory Decoder is `memdec pipeline`'s sequence, run through the pipeline's
stage functions and its completeness check (memdec.pipeline.run.stage_complete) rather than through
`run_pipeline` itself, which would change what the run writes and resumes from: run_pipeline puts its
outputs at OUTPUT/{datastore,memdec} (the recipe's are domains/DOM/{datastore-DOM-BASE,targets,memdec-DOM},
which the results' model_args and the report's labels name), builds one datastore from one base (kNN-LM here
needs one per base), adds an index stage the exact torch targets do not read, reruns every stage after
one that ran, and records no stage times (resume and times.json use the stage names datastore:BASE,
targets, memdec).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments.offline_reproduction import scheduler  # noqa: E402
from experiments.offline_reproduction.scheduler import Stages  # noqa: E402
from memdec.core.formats import read_json, write_json  # noqa: E402
from memdec.pipeline.data import write_texts  # noqa: E402
from memdec.pipeline.run import stage_complete  # noqa: E402

TASKS = {"bio": "memdec_bio_ppl", "finance": "memdec_finance_ppl", "law": "memdec_law_ppl",
         "general": "memdec_general_ppl"}
# registered methods (memdec.methods) by name or alias; "router" is memdec_router (its stage and result names)
METHODS = ("memdec", "knnlm", "rag", "dapt", "lora", "router")
#: the methods that fine-tune the base (their own job per domain, "finetune:DOM")
FINETUNED = ("dapt", "lora")
SPLITS = ("train", "valid", "test")


# ------------------------------------------------------------------------------------------ config


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "bases":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(path: str | os.PathLike, small: bool = False, corpora: str | None = None) -> dict[str, Any]:
    """The run's config: config.yaml, with its `small:` overrides when `small`; corpora path resolved."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path}: no such file")
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    over = cfg.pop("small", {}) or {}
    if small:
        cfg = _merge(cfg, over)
    if corpora:
        cfg["corpora"] = corpora
    root = Path(cfg["corpora"])
    cfg["corpora"] = str(root if root.is_absolute() else (ROOT / root))
    for key in ("bases", "domains", "pretrain", "datastore", "targets", "memdec", "dapt", "lora", "knnlm", "rag",
                "eval", "tokenizer", "data", "tune"):
        if key not in cfg:
            raise ValueError(f"config {path}: missing section {key!r}")
    if len(cfg["bases"]) < 1:
        raise ValueError(f"config {path}: 'bases' is empty")
    unknown = [d for d in cfg["domains"] if d not in TASKS or d == "general"]
    if unknown:
        raise ValueError(f"config {path}: unknown domain(s) {unknown} (known: bio, finance, law)")
    return cfg


class Paths:
    """Where everything lives below the run folder."""

    def __init__(self, run: str | os.PathLike, cfg: dict[str, Any]) -> None:
        self.run = Path(run)
        self.cfg = cfg
        self.bases = list(cfg["bases"])
        self.smallest, self.largest = self.bases[0], self.bases[-1]

    def corpus(self, name: str, split: str) -> Path:
        return self.run / "data" / f"{name}-{split}.jsonl"  # file names tell the domains apart in reports

    @property
    def eval_data(self) -> Path:
        return self.run / "eval_data"

    @property
    def tokenizer(self) -> Path:
        return self.run / "tokenizer"

    def init(self, base: str) -> Path:
        return self.run / "init" / base

    def model(self, base: str) -> Path:
        return self.run / "models" / base

    def domain(self, dom: str) -> Path:
        return self.run / "domains" / dom

    def datastore(self, dom: str, base: str) -> Path:
        return self.domain(dom) / f"datastore-{dom}-{base}"

    def targets(self, dom: str) -> Path:
        return self.domain(dom) / "targets"

    def memdec(self, dom: str) -> Path:
        return self.domain(dom) / f"memdec-{dom}"

    def dapt(self, dom: str, base: str, lr: float) -> Path:
        return self.domain(dom) / f"dapt-{dom}-{base}-lr{lr:g}"

    def router(self, dom: str, base: str) -> Path:
        return self.domain(dom) / f"router-{dom}-{base}"

    def lora(self, dom: str, base: str, lr: float) -> Path:
        return self.domain(dom) / f"lora-{dom}-{base}-lr{lr:g}"

    def copy_corpus(self, dom: str) -> Path:
        """The RAG copy check's retrieval corpus: the domain's train split and its test documents."""
        return self.run / "data" / f"{dom}-train+test.jsonl"

    def knnlm_tuning(self, dom: str, base: str) -> Path:
        return self.results / dom / f"tune_knnlm-{base}.json"

    def lr_choice(self, dom: str, method: str) -> Path:
        return self.results / dom / f"lr_{method}.json"

    def rag_check(self, dom: str) -> Path:
        return self.results / dom / "rag_check.json"

    def case_study(self, dom: str) -> Path:
        return self.results / dom / "case_study.json"

    def copy_ability(self, dom: str, base: str) -> Path:
        return self.results / dom / f"copy_ability-{base}.json"

    @property
    def results(self) -> Path:
        return self.run / "results"

    @property
    def times(self) -> Path:
        return self.run / "times"


def _progress() -> bool:
    return sys.stderr.isatty()


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------- data


def _source(cfg: dict, name: str, split: str) -> Path:
    root = Path(cfg["corpora"]) / name
    for suffix in (".jsonl.gz", ".jsonl"):
        if (root / f"{split}{suffix}").is_file():
            return root / f"{split}{suffix}"
    raise FileNotFoundError(f"corpus {root}/{split}.jsonl.gz: no such file (stage the corpora with stage_inputs.sh)")


def read_capped(path: Path, max_chars: int | None) -> list[str]:
    """The documents of a corpus file, in order, until `max_chars` characters (at least one document)."""
    from memdec.pipeline.data import CorpusSpec, load_texts

    texts = load_texts(CorpusSpec(path=str(path)))
    if max_chars is None:
        return texts
    out, total = [], 0
    for t in texts:
        if out and total + len(t) > max_chars:
            break
        out.append(t[: max(1, int(max_chars))] if not out else t)
        total += len(out[-1])
    return out


def prepare_data(cfg: dict, paths: Paths) -> None:
    """Capped corpus copies and the lm-eval tasks' local test files; a DONE marker holds the settings."""
    d = cfg["data"]
    caps = {"train": None, "valid": d["valid_chars"], "test": d["test_chars"]}
    stats = {}
    for name in ["general", *cfg["domains"]]:
        for split in SPLITS:
            cap = (d["general_train_chars"] if name == "general" else d["domain_train_chars"]) \
                if split == "train" else caps[split]
            texts = read_capped(_source(cfg, name, split), cap)
            write_texts(paths.corpus(name, split), texts)
            if split == "test":
                write_texts(paths.eval_data / f"{TASKS[name]}.jsonl", texts)
            stats[f"{name}/{split}"] = {"docs": len(texts), "chars": sum(map(len, texts))}
    write_json(paths.run / "data" / "DONE.json", {"settings": _data_settings(cfg), "stats": stats})


def _data_settings(cfg: dict) -> dict:
    return {"corpora": cfg["corpora"], "domains": cfg["domains"], **cfg["data"]}


def data_done(cfg: dict, paths: Paths) -> bool:
    """True if RUN/data was made with these data settings."""
    marker = paths.run / "data" / "DONE.json"
    return marker.exists() and read_json(marker).get("settings") == json.loads(json.dumps(_data_settings(cfg)))


def train_tokenizer(cfg: dict, paths: Paths) -> None:
    """One byte-level BPE on general + domain train text, saved to RUN/tokenizer."""
    from memdec.tiny import train_tokenizer as train_bpe

    t = cfg["tokenizer"]
    texts = read_capped(paths.corpus("general", "train"), t["general_chars"])
    for dom in cfg["domains"]:
        texts += read_capped(paths.corpus(dom, "train"), t["domain_chars"])
    tok = train_bpe(texts, vocab_size=int(t["vocab_size"]), name="memdec-offline-bpe")
    _save_atomic(paths.tokenizer, tok.save_pretrained)


def _save_atomic(final: Path, save: Callable[[str], Any]) -> None:
    import shutil

    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def init_bases(cfg: dict, paths: Paths) -> None:
    """Randomly initialised GPT-2 models of each size, sharing the tokenizer."""
    from transformers import AutoTokenizer

    from memdec.tiny import save_model, tiny_model

    tok = AutoTokenizer.from_pretrained(str(paths.tokenizer))
    for i, (name, b) in enumerate(cfg["bases"].items()):
        if (paths.init(name) / "config.json").exists():
            continue
        model = tiny_model(tok, "gpt2", n_layer=b["n_layer"], hidden=b["hidden"], n_head=b["n_head"],
                           max_positions=cfg["context"], seed=cfg["seed"] + i)
        _save_atomic(paths.init(name), lambda p, m=model: save_model(m, tok, p))


def _train_length(section: dict) -> dict:
    return {"steps": section["steps"]} if section.get("steps") else {"epochs": float(section.get("epochs", 1))}


# ------------------------------------------------------------------------------------------- jobs


def pretrain_steps(cfg: dict, base: str) -> int:
    """A base's pretraining steps: its own `steps`, else the pretrain section's."""
    return int(cfg["bases"][base].get("steps") or cfg["pretrain"]["steps"])


def job_pretrain(cfg: dict, paths: Paths, base: str) -> None:
    """Pretrain one base from its random init on general/train (memdec.pipeline.train.train, beta = 0)."""
    from memdec.pipeline.train import train

    st = Stages(paths.times, f"pretrain:{base}")
    p, b = cfg["pretrain"], cfg["bases"][base]

    def run():
        train(paths.init(base), paths.model(base), corpus=str(paths.corpus("general", "train")), beta=0.0,
              window=cfg["context"], stride=cfg["context"], steps=pretrain_steps(cfg, base),
              batch_size=int(p["batch_size"]),
              lr=float(b["lr"]), warmup=float(p.get("warmup", 0.05)), weight_decay=float(p.get("weight_decay", 0.01)),
              save_every=int(p.get("save_every", 200)), seed=cfg["seed"], progress=_progress())

    st("pretrain", stage_complete("train", paths.model(base)), run)


def memory_decoder_stages(st: Stages, cfg: dict[str, Any], paths: Paths, dom: str, bases: list[str]) -> None:
    """`memdec pipeline`'s sequence for one domain, through its stage functions and completeness checks
    (memdec.pipeline.run.stage_complete): a datastore per base in `bases` (the largest's feeds the targets),
    exact kNN targets, a Memory Decoder trained from the smallest base. Stages datastore:BASE, targets, memdec."""
    from memdec.pipeline.data import CorpusSpec
    from memdec.pipeline.datastore import build_datastore
    from memdec.pipeline.targets import build_targets
    from memdec.pipeline.train import train

    dev, d, t, m = _device(), cfg["datastore"], cfg["targets"], cfg["memdec"]
    corpus = CorpusSpec(path=str(paths.corpus(dom, "train")))
    for base in bases:
        st(f"datastore:{base}", stage_complete("datastore", paths.datastore(dom, base)),
           lambda base=base: build_datastore(str(paths.model(base)), corpus, paths.datastore(dom, base),
                                             window=int(d["window"]), stride=int(d["stride"]),
                                             batch_size=int(d["batch_size"]), dtype="float32", device=dev,
                                             progress=_progress()))
    st("targets", stage_complete("targets", paths.targets(dom)),
       lambda: build_targets(paths.datastore(dom, paths.largest), out=paths.targets(dom), k=int(t["k"]),
                             temperature=float(t["temperature"]), backend="torch", device=dev, progress=_progress()))
    st("memdec", stage_complete("train", paths.memdec(dom)),
       lambda: train(paths.model(paths.smallest), paths.memdec(dom), datastore=paths.datastore(dom, paths.largest),
                     targets=paths.targets(dom), beta=float(m["beta"]), batch_size=int(m["batch_size"]),
                     lr=float(m["lr"]), seed=cfg["seed"], save_every=int(m.get("save_every", 200)),
                     progress=_progress(), **_train_length(m)))


def job_domain(cfg: dict[str, Any], paths: Paths, dom: str, methods: tuple[str, ...] = METHODS) -> None:
    """Everything of one domain: datastores, targets, Memory Decoder, lmbda, the kNN-LM's lmbda and temperature,
    routers, then its evaluations (but DAPT's and LoRA's: job_finetune) and the case study."""
    st = Stages(paths.times, f"domain:{dom}")
    methods = tuple(m for m in methods if m != "base")
    dev = _device()
    # kNN-LM reads a datastore of each base; the Memory Decoder's targets need the largest base's only
    bases = [b for b in paths.bases if b == paths.largest or "knnlm" in methods]
    memory_decoder_stages(st, cfg, paths, dom, bases)
    e = cfg["eval"]

    def tune():
        from memdec.eval.tune import tune_lambda

        out = paths.results / dom
        out.mkdir(parents=True, exist_ok=True)
        r = tune_lambda(str(paths.model(paths.largest)), str(paths.memdec(dom)), str(paths.corpus(dom, "valid")),
                        window=int(e["window"]), stride=int(e["stride"]), grid=cfg["tune"]["grid"],
                        batch_size=int(e["batch_size"]), write=True, plot=out / "tune_lambda.png", device=dev,
                        progress=_progress())
        write_json(out / "tune_lambda.json", {"domain": dom, "base": paths.largest, "best_lmbda": r.best_lmbda,
                                              "best_perplexity": r.best_perplexity, "grid": r.grid,
                                              "perplexities": r.perplexities, "n_tokens": r.n_tokens,
                                              "window": r.window, "stride": r.stride})

    st("tune-lambda", "lmbda_tuning" in read_json(paths.memdec(dom) / "memdec.json")
       and (paths.results / dom / "tune_lambda.json").exists(), tune)

    if "knnlm" in methods and knnlm_tuned(cfg):  # the kNN-LM's lmbda x temperature on valid, per base
        for base in paths.bases:
            st(f"tune-knnlm:{base}", paths.knnlm_tuning(dom, base).exists(),
               lambda base=base: tune_knnlm_stage(cfg, paths, dom, base, dev))

    if "router" in methods:  # issue 17: a per-token router per base on the domain's valid split + general valid
        for base in paths.bases:
            st(f"router:{base}", (paths.router(dom, base) / "router_config.json").exists(),
               lambda base=base: router_stage(cfg, paths, dom, base, dev))

    if "rag" in methods and dom in rag_settings(cfg, "copy_check"):
        st("copy-corpus", paths.copy_corpus(dom).exists(), lambda: write_texts(
            paths.copy_corpus(dom), read_capped(paths.corpus(dom, "train"), None)
            + read_capped(paths.corpus(dom, "test"), None)))
        st("rag-retrieval", paths.rag_check(dom).exists(), lambda: rag_retrieval_stage(cfg, paths, dom))

    evaluate(st, cfg, paths, dom, tuple(m for m in methods if m not in FINETUNED))

    if {"memdec", "knnlm"} <= set(methods) and cfg.get("case_study"):
        st("case-study", paths.case_study(dom).exists(), lambda: case_study_stage(cfg, paths, dom, dev))


def job_finetune(cfg: dict[str, Any], paths: Paths, dom: str, methods: tuple[str, ...] = METHODS) -> None:
    """DAPT and LoRA of one domain (learning rate on valid, then every base) and their evaluations: a job of its
    own, beside the domain's, as it needs only the pretrained bases."""
    st = Stages(paths.times, f"finetune:{dom}")
    methods = tuple(m for m in FINETUNED if m in methods)
    for method in methods:
        finetune_stages(st, cfg, paths, dom, method, _device())
    evaluate(st, cfg, paths, dom, methods)


def evaluate(st: Stages, cfg: dict, paths: Paths, dom: str, methods: tuple[str, ...]) -> None:
    """memdec-eval of `methods` on domain `dom` (`domain_evals`), each run a stage eval:BASE__RUN."""
    for base, method, name, tasks in domain_evals(cfg, paths, dom, methods):
        model, args = eval_model(cfg, paths, dom, base, method, variant=name.partition("__")[2])
        st(f"eval:{name}", eval_done(paths, dom, name),
           lambda model=model, args=args, name=name, base=base, method=method, tasks=tasks: run_eval(
               cfg, paths, dom, name, model, args, tasks, {"method": method, "base": base, "domain": dom}))


def domain_evals(cfg: dict, paths: Paths, dom: str, methods: tuple[str, ...]) -> list[tuple[str, str, str, list[str]]]:
    """(base, method, run name, tasks) of every evaluation of domain `dom`: each base x method on the domain and
    general tests, and for RAG the paper's stride and the copy check (domain test only) where the config asks."""
    out = [(base, m, f"{base}__{m}", [TASKS[dom], TASKS["general"]]) for base in paths.bases for m in methods]
    if "rag" in methods:
        if dom in rag_settings(cfg, "paper_stride"):
            out += [(base, "rag", f"{base}__rag-stride{int(cfg['rag']['paper_stride']['stride'])}", [TASKS[dom]])
                    for base in paths.bases]
        if dom in rag_settings(cfg, "copy_check"):
            out.append((paths.largest, "rag", f"{paths.largest}__rag-copy", [TASKS[dom]]))
    return out


def rag_settings(cfg: dict, what: str) -> list[str]:
    """The domains of the RAG extra `what` ("paper_stride" or "copy_check"); none when the config has none."""
    return list((cfg["rag"].get(what) or {}).get("domains", []))


def knnlm_tuned(cfg: dict) -> bool:
    """Whether the kNN-LM's lmbda and temperature are tuned on valid (else the config's fixed ones)."""
    return bool(cfg["knnlm"].get("tune"))


def tune_knnlm_stage(cfg: dict, paths: Paths, dom: str, base: str, dev: str) -> None:
    """`memdec tune-knnlm` of `base` with its own datastore of `dom` on the domain's valid split."""
    from memdec.eval.tune_knnlm import DEFAULT_TEMPERATURES, tune_knnlm

    e, k = cfg["eval"], cfg["knnlm"]
    paths.knnlm_tuning(dom, base).parent.mkdir(parents=True, exist_ok=True)
    tune_knnlm(str(paths.model(base)), str(paths.datastore(dom, base)), str(paths.corpus(dom, "valid")), k=int(k["k"]),
               lmbda_grid=k["tune"].get("lmbda_grid", "0:1:0.05"),
               temperatures=k["tune"].get("temperatures", DEFAULT_TEMPERATURES), window=int(e["window"]),
               stride=int(e["stride"]), batch_size=int(e["batch_size"]), backend="torch", device=dev,
               cache_dir=paths.run / "cache" / "knnlm", out=paths.knnlm_tuning(dom, base), progress=_progress())


def knnlm_settings(cfg: dict, paths: Paths, dom: str, base: str) -> dict[str, float]:
    """The kNN-LM's {lmbda, temperature} for (dom, base): tuned on valid (tune-knnlm's JSON), else the config's."""
    if not knnlm_tuned(cfg):
        return {"lmbda": float(cfg["knnlm"]["lmbda"]), "temperature": float(cfg["knnlm"]["temperature"])}
    f = paths.knnlm_tuning(dom, base)
    if not f.exists():
        raise FileNotFoundError(f"{f}: no kNN-LM tuning of {base} on {dom} (stage tune-knnlm:{base} first)")
    t = read_json(f)
    return {"lmbda": float(t["best_lmbda"]), "temperature": float(t["best_temperature"])}


def router_stage(cfg: dict, paths: Paths, dom: str, base: str, dev: str) -> None:
    """A router for (base, the domain's Memory Decoder) on the domain's valid split and general/valid."""
    from memdec.inference.router import train_router

    e, r = cfg["eval"], cfg.get("router", {})
    train_router(str(paths.model(base)), str(paths.memdec(dom)),
                 [str(paths.corpus(dom, "valid")), str(paths.corpus("general", "valid"))], paths.router(dom, base),
                 inputs=r.get("inputs", "both"), layers=int(r.get("layers", 2)), steps=int(r.get("steps", 500)),
                 window=int(e["window"]), stride=int(e["stride"]), batch_size=int(e["batch_size"]), device=dev,
                 cache_dir=paths.run / "cache" / "router", progress=_progress())


def lr_grid(cfg: dict, method: str) -> list[float]:
    """The learning rates DAPT / LoRA try (`lr_grid`, else the one `lr`)."""
    c = cfg[method]
    return [float(x) for x in (c.get("lr_grid") or [c["lr"]])]


def chosen_lr(cfg: dict, paths: Paths, dom: str, method: str) -> float:
    """The learning rate of `method` ("dapt"/"lora") chosen on valid for `dom` (the only one of a one-point grid)."""
    grid = lr_grid(cfg, method)
    if len(grid) == 1:
        return grid[0]
    f = paths.lr_choice(dom, method)
    if not f.exists():
        raise FileNotFoundError(f"{f}: no learning-rate choice of {method} on {dom} (stage lr-{method} first)")
    return float(read_json(f)["best_lr"])


def _finetuned(paths: Paths, method: str, dom: str, base: str, lr: float) -> Path:
    return (paths.dapt if method == "dapt" else paths.lora)(dom, base, lr)


def finetune(cfg: dict, paths: Paths, dom: str, method: str, base: str, lr: float) -> None:
    """DAPT (full fine-tuning) or LoRA (rank matched to the Memory Decoder) of `base` on the domain's train split."""
    c = cfg[method]
    common = dict(corpus=str(paths.corpus(dom, "train")), lr=lr, window=cfg["context"],
                  batch_size=int(c["batch_size"]), seed=cfg["seed"], save_every=int(c.get("save_every", 200)),
                  progress=_progress(), **_train_length(c))
    out = _finetuned(paths, method, dom, base, lr)
    if method == "dapt":
        from baselines.dapt import dapt

        dapt(str(paths.model(base)), out, **common)
    else:
        from baselines.lora import lora

        # the rank whose parameter count matches the Memory Decoder's: it has the smallest base's architecture
        # (it is initialised from it), so its count is known before it is trained and LoRA need not wait for it
        lora(str(paths.model(base)), out, match_params=str(paths.model(paths.smallest)), **common)


def valid_perplexity(cfg: dict, paths: Paths, dom: str, method: str, base: str, lr: float, dev: str) -> float:
    """Token perplexity on the domain's valid split (the evaluation's windows) of a fine-tuned base."""
    from transformers import AutoTokenizer

    from memdec.core.models import load_causal_lm
    from memdec.inference.scoring import perplexity, token_logprobs
    from memdec.pipeline.data import CorpusSpec, corpus_tokens

    e, out = cfg["eval"], _finetuned(paths, method, dom, base, lr)
    tok = AutoTokenizer.from_pretrained(str(paths.tokenizer))
    if method == "dapt":
        model = load_causal_lm(str(out), "DAPT model", dtype="float32")
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_causal_lm(str(paths.model(base)), "base", dtype="float32"), str(out))
        model = model.merge_and_unload()
    model = model.to(dev).eval()
    tokens, _, _ = corpus_tokens(CorpusSpec(path=str(paths.corpus(dom, "valid"))), tok, progress=False)
    lp = token_logprobs(model, tokens, int(e["window"]), int(e["stride"]), batch_size=int(e["batch_size"]),
                        vocab_size=len(tok))
    return float(perplexity(lp))


def finetune_stages(st: Stages, cfg: dict, paths: Paths, dom: str, method: str, dev: str) -> None:
    """DAPT or LoRA of `dom`: the largest base at every learning rate of the grid, the one with the lowest valid
    perplexity (RUN/results/DOM/lr_METHOD.json), then every other base at that learning rate."""
    grid = lr_grid(cfg, method)
    done = lambda base, lr: (_finetuned(paths, method, dom, base, lr) / "baseline.json").exists()  # noqa: E731
    for lr in grid:
        st(f"{method}@{lr:g}:{paths.largest}", done(paths.largest, lr),
           lambda lr=lr: finetune(cfg, paths, dom, method, paths.largest, lr))
    if len(grid) > 1:
        def choose():
            ppl = {f"{lr:g}": valid_perplexity(cfg, paths, dom, method, paths.largest, lr, dev) for lr in grid}
            best = min(grid, key=lambda lr: ppl[f"{lr:g}"])
            paths.lr_choice(dom, method).parent.mkdir(parents=True, exist_ok=True)  # the domain job may not have yet
            write_json(paths.lr_choice(dom, method), {"domain": dom, "method": method, "base": paths.largest,
                                                      "grid": grid, "valid_perplexity": ppl, "best_lr": best})

        st(f"lr-{method}", paths.lr_choice(dom, method).exists(), choose)
    lr = chosen_lr(cfg, paths, dom, method)
    for base in paths.bases:
        if base != paths.largest:
            st(f"{method}@{lr:g}:{base}", done(base, lr), lambda base=base: finetune(cfg, paths, dom, method, base, lr))


def rag_retrieval_stage(cfg: dict, paths: Paths, dom: str) -> None:
    """The copy check at the retrieval level (rag_check.py): how often BM25's chunk holds the next tokens,
    from the honest corpus and from the one with the test documents."""
    from transformers import AutoTokenizer

    from experiments.offline_reproduction.rag_check import retrieval_check

    r = cfg["rag"]
    tok = AutoTokenizer.from_pretrained(str(paths.tokenizer))
    docs = read_capped(paths.corpus(dom, "test"), None)
    res = [retrieval_check(tok, docs, str(c), int(r["stride"]), int(r["query_tokens"]), int(r["max_doc_tokens"]),
                           str(paths.run / "cache" / "rag")) for c in (paths.corpus(dom, "train"), paths.copy_corpus(dom))]
    paths.rag_check(dom).parent.mkdir(parents=True, exist_ok=True)
    write_json(paths.rag_check(dom), {"domain": dom, "honest": res[0], "copy": res[1]})


def copy_ability_stage(cfg: dict, paths: Paths, dom: str, base: str, dev: str) -> None:
    """rag_check.copy_ability of one base on the domain's test split: NLL on the first and second copy of a span."""
    from transformers import AutoTokenizer

    from experiments.offline_reproduction.rag_check import copy_ability
    from memdec.pipeline.data import tokenize

    c = cfg["rag"].get("copy_ability") or {}
    tok = AutoTokenizer.from_pretrained(str(paths.tokenizer))
    tokens = tokenize(read_capped(paths.corpus(dom, "test"), None), tok, progress=False)
    res = copy_ability(str(paths.model(base)), tokens, span=int(c.get("span", 128)),
                       n_spans=int(c.get("n_spans", 32)), batch_size=int(cfg["eval"]["batch_size"]), device=dev,
                       vocab_size=len(tok))
    paths.copy_ability(dom, base).parent.mkdir(parents=True, exist_ok=True)
    write_json(paths.copy_ability(dom, base), {"domain": dom, "base": base, **res})


def case_study_stage(cfg: dict, paths: Paths, dom: str, dev: str) -> None:
    """The paper's case study: long-tail tokens of the test split under base, kNN-LM and Memory Decoder."""
    from experiments.offline_reproduction.case_study import case_study

    e, c = cfg["eval"], cfg["case_study"]
    base = paths.largest
    case_study(str(paths.model(base)), str(paths.memdec(dom)), str(paths.datastore(dom, base)),
               str(paths.corpus(dom, "test")), str(paths.corpus("general", "train")),
               knnlm={"k": int(cfg["knnlm"]["k"]), **knnlm_settings(cfg, paths, dom, base)},
               lmbda=float(read_json(paths.memdec(dom) / "memdec.json")["lmbda"]), window=int(e["window"]),
               stride=int(e["stride"]), batch_size=int(e["batch_size"]), n_tokens=int(c.get("n_tokens", 10)),
               min_count=int(c.get("min_count", 3)), device=dev, out=paths.case_study(dom),
               reference_cache=paths.run / "cache" / "case_study")


def eval_model(cfg: dict, paths: Paths, dom: str, base: str, method: str,
               variant: str = "") -> tuple[str, dict[str, Any]]:
    """(lm-eval model name, model_args) of one base x method for domain `dom` (the model: the method registry's);
    `variant` is the run name's method part ("rag-stride4", "rag-copy" for RAG's extras)."""
    from memdec.methods import get_method

    b = str(paths.model(base))
    if method == "base":
        args = {"pretrained": b}
    elif method == "memdec":
        args = {"pretrained": b, "memory": str(paths.memdec(dom))}
    elif method == "router":
        args = {"pretrained": b, "memory": str(paths.memdec(dom)), "router": str(paths.router(dom, base))}
    elif method == "knnlm":
        args = {"pretrained": b, "datastore": str(paths.datastore(dom, base)), "k": int(cfg["knnlm"]["k"]),
                **knnlm_settings(cfg, paths, dom, base), "backend": "torch"}
    elif method == "rag":
        r = cfg["rag"]
        corpus = paths.copy_corpus(dom) if variant == "rag-copy" else paths.corpus(dom, "train")
        stride = int(r["paper_stride"]["stride"]) if variant.startswith("rag-stride") else int(r["stride"])
        args = {"pretrained": b, "corpus": str(corpus), "stride": stride,
                "query_tokens": int(r["query_tokens"]), "max_doc_tokens": int(r["max_doc_tokens"])}
    elif method == "dapt":
        args = {"pretrained": str(paths.dapt(dom, base, chosen_lr(cfg, paths, dom, "dapt")))}
    elif method == "lora":
        args = {"pretrained": b, "peft": str(paths.lora(dom, base, chosen_lr(cfg, paths, dom, "lora")))}
    else:
        raise ValueError(f"unknown method {method!r} (known: base, {', '.join(METHODS)})")
    return get_method(method).model or "hf", args


def eval_done(paths: Paths, group: str, name: str) -> bool:
    """True if RUN/results/GROUP holds a results file of run NAME."""
    return any((paths.results / group).glob(f"{name}_*.json"))


def run_eval(cfg: dict, paths: Paths, group: str, name: str, model: str, model_args: dict[str, Any],
             tasks: list[str], metadata: dict[str, Any]) -> None:
    """One `memdec-eval` run (in this process) writing RUN/results/GROUP/NAME_<date>.json."""
    import gc

    import torch

    from memdec.eval.models import cli_main

    e = cfg["eval"]
    os.environ["MEMDEC_DATA_DIR"] = str(paths.eval_data)
    os.environ["MEMDEC_CACHE"] = str(paths.run / "cache")
    # memdec's fused scoring kernels: torch.compile costs more than it saves on these small models
    os.environ.setdefault("MEMDEC_COMPILE", "1" if e.get("compile", False) else "0")
    (paths.results / group).mkdir(parents=True, exist_ok=True)
    # the tasks read ppl_window/ppl_stride (older versions: window/stride)
    w, s = int(e["window"]), int(e["stride"])
    meta = {**metadata, "ppl_window": w, "ppl_stride": s, "window": w, "stride": s}
    argv = ["run", "--model", model, "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
            "--tasks", ",".join(tasks), "--include_path", str(HERE / "tasks"), "--device", _device(),
            "--batch_size", str(e["batch_size"]), "--metadata", json.dumps(meta),
            "--output_path", str(paths.results / group / f"{name}.json")]
    rc = cli_main(argv)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if rc != 0 or not eval_done(paths, group, name):
        raise RuntimeError(f"memdec-eval {' '.join(argv)} failed (exit {rc})")


def job_eval_bases(cfg: dict, paths: Paths) -> None:
    """Every base alone on the domain tests and general/test; on the RAG copy check's domains, whether each base
    can copy a span it is shown (rag_check.copy_ability: a property of the base, so it needs only the bases)."""
    st = Stages(paths.times, "eval:bases")
    tasks = [TASKS[d] for d in cfg["domains"]] + [TASKS["general"]]
    for base in paths.bases:
        model, args = eval_model(cfg, paths, "", base, "base")
        st(f"eval:{base}__base", eval_done(paths, "base", f"{base}__base"),
           lambda model=model, args=args, base=base: run_eval(cfg, paths, "base", f"{base}__base", model, args,
                                                              tasks, {"method": "base", "base": base}))
    for dom in (d for d in rag_settings(cfg, "copy_check") if d in cfg["domains"]):
        for base in paths.bases:
            st(f"copy-ability:{dom}:{base}", paths.copy_ability(dom, base).exists(),
               lambda dom=dom, base=base: copy_ability_stage(cfg, paths, dom, base, _device()))


# ------------------------------------------------------------------------------------ orchestration


def job_weights(cfg: dict[str, Any], jobs: list[str]) -> dict[str, float]:
    """Each job's expected load, for spreading jobs over the GPUs: a base's size; a domain's corpus size."""
    out = {}
    for job in jobs:
        kind, _, name = job.partition(":")
        if kind == "pretrain":
            out[job] = cfg["bases"][name]["n_layer"] * cfg["bases"][name]["hidden"] ** 2 + 1.0
        elif kind == "finetune":
            out[job] = {"bio": 2.0, "law": 1.5, "finance": 1.0}.get(name, 0.5)
        else:
            out[job] = {"bio": 3.0, "law": 2.0, "finance": 1.5}.get(name, 0.5)
    return out


def run_jobs(args: argparse.Namespace, cfg: dict[str, Any], paths: Paths, jobs: list[str], n_gpus: int,
             serial: bool) -> list[str]:
    """Run jobs ("pretrain:BASE", "domain:DOM", "finetune:DOM", "eval:bases") through the scheduler; returns the
    failed ones."""
    argv = ["--config", str(args.config), "--run", str(paths.run), "--methods", *args.methods] + \
        (["--small"] if args.small else []) + (["--corpora", args.corpora] if args.corpora else []) + \
        (["--domains", *args.domains] if args.domains else [])
    return scheduler.run_jobs(jobs, lambda job: run_job(cfg, paths, job, tuple(args.methods)),
                              lambda job: scheduler.worker_command(__file__, job, argv), job_weights(cfg, jobs),
                              n_gpus, serial, logs=paths.run / "logs", root=ROOT,
                              stall_s=float(cfg["stall_timeout_s"]) if cfg.get("stall_timeout_s") else None)


def run_job(cfg: dict[str, Any], paths: Paths, job: str, methods: tuple[str, ...]) -> None:
    """One job in this process (a worker runs one, --serial all)."""
    import torch

    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for the float32 evaluations
    kind, _, name = job.partition(":")
    if kind == "pretrain":
        job_pretrain(cfg, paths, name)
    elif kind == "domain":
        job_domain(cfg, paths, name, methods)
    elif kind == "finetune":
        job_finetune(cfg, paths, name, methods)
    elif job == "eval:bases":
        job_eval_bases(cfg, paths)
    else:
        raise ValueError(f"unknown job {job!r}")


def orchestrate(args: argparse.Namespace, cfg: dict[str, Any], paths: Paths) -> int:
    """The whole run: setup, pretraining, the domains and base evaluations, report, bundle; 1 if a job failed."""
    paths.run.mkdir(parents=True, exist_ok=True)
    (paths.run / "run.pid").write_text(str(os.getpid()))  # run_gpu.sh follows this process
    t_start = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    info = scheduler.gpu_info()
    serial = args.serial or (info["n_gpus"] == 0 and not args.parallel)
    phases: dict[str, float] = {}
    st = Stages(paths.times, "setup")
    t0 = time.perf_counter()
    st("data", data_done(cfg, paths), lambda: prepare_data(cfg, paths))
    st("tokenizer", (paths.tokenizer / "tokenizer.json").exists(), lambda: train_tokenizer(cfg, paths))
    st("init", all((paths.init(b) / "config.json").exists() for b in paths.bases), lambda: init_bases(cfg, paths))
    phases["setup"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    failed = run_jobs(args, cfg, paths, [f"pretrain:{b}" for b in paths.bases], info["n_gpus"], serial)
    phases["pretrain"] = time.perf_counter() - t0
    if not failed:
        t0 = time.perf_counter()
        jobs = [f"domain:{d}" for d in cfg["domains"]] + \
            ([f"finetune:{d}" for d in cfg["domains"]] if set(FINETUNED) & set(args.methods) else []) + \
            (["eval:bases"] if "base" in args.methods else [])
        failed += run_jobs(args, cfg, paths, jobs, info["n_gpus"], serial)
        phases["domains_and_eval"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scheduler.write_times(paths.run, info, phases, time.perf_counter() - t_start, started)
    try:
        make_report(cfg, paths, info)
    except Exception as e:  # the bundle below still hands back the raw results
        print(f"report: {type(e).__name__}: {e}", flush=True)
        failed.append("report")
    phases["report"] = time.perf_counter() - t0
    scheduler.write_times(paths.run, info, phases, time.perf_counter() - t_start, started)
    if args.out:
        bundle(paths, Path(args.out))
    print(f"total wall time {time.perf_counter() - t_start:.1f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------- report


def make_report(cfg: dict, paths: Paths, info: dict | None = None) -> Path:
    """`memdec report` over RUN/results, then RUN/report/results.md (card, times, lmbda, tables, claims)."""
    from reports.claims import claims_report
    from reports.load import load_results
    from reports.report import write_report

    out = paths.run / "report"
    out.mkdir(parents=True, exist_ok=True)
    try:
        tables = write_report([paths.results], out / "report")["md"].read_text(encoding="utf-8").splitlines()[1:]
    except Exception as e:  # e.g. no `tabulate` for pandas' markdown: keep results.md and the bundle
        tables = [f"`memdec report` failed: {type(e).__name__}: {e}"]
        print(f"report: memdec report failed: {type(e).__name__}: {e}", flush=True)
    df = load_results([paths.results])
    if df.empty:
        raise ValueError(f"no lm-eval results in {paths.results}")
    times = read_json(paths.run / "times.json") if (paths.run / "times.json").exists() else {}
    lines = ["# Offline reproduction: results", ""]
    dev = (info or times.get("device") or {})
    lines += [f"Card: {', '.join(dev.get('gpus', []) or ['CPU'])} ({dev.get('n_gpus', 0)} GPU(s)); torch "
              f"{dev.get('torch', '?')}, transformers {dev.get('transformers', '?')}. Total wall time "
              f"{times.get('total_s', '?')} s over {len(times.get('invocations_s', {}))} invocation(s) "
              f"(a resumed run skips finished stages).", ""]
    lines += ["## Models", "", "| model | layers | hidden | parameters |", "|---|---|---|---|"]
    for base in paths.bases:
        b = cfg["bases"][base]
        lines.append(f"| {base} | {b['n_layer']} | {b['hidden']} | {_n_params(paths.model(base))} |")
    lines.append("")
    marker = paths.run / "data" / "DONE.json"
    if marker.exists():
        lines += ["## Data (documents / characters used per split)", "", "| corpus | docs | chars |", "|---|---|---|"]
        lines += [f"| {k} | {v['docs']} | {v['chars']:,} |" for k, v in read_json(marker)["stats"].items()]
        lines.append("")
    lines += ["## lmbda chosen on valid (tune-lambda, largest base)", "", "| domain | lmbda | valid ppl |", "|---|---|---|"]
    for dom in cfg["domains"]:
        f = paths.results / dom / "tune_lambda.json"
        if f.exists():
            t = read_json(f)
            lines.append(f"| {dom} | {t['best_lmbda']:g} | {t['best_perplexity']:.2f} |")
    lines.append("")
    lines += ["## Wall time per stage (s)", "", "| job | stage | seconds | status |", "|---|---|---|---|"]
    for job, stages in (times.get("jobs") or {}).items():
        for stage, rec in stages.items():
            lines.append(f"| {job} | {stage} | {rec.get('seconds', '')} | {rec['status']} |")
    lines += ["", f"Phases (s): {json.dumps(times.get('phases_s', {}))}", ""]
    lines += claims_report([paths.results], df, paths.bases, cfg["domains"], TASKS)
    lines += ["## Tables from `memdec report`", ""]
    lines += tables
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "results.md"


def _n_params(path: Path) -> str:
    try:
        from transformers import AutoModelForCausalLM

        return f"{AutoModelForCausalLM.from_pretrained(str(path)).num_parameters():,}"
    except Exception:  # a missing model: the table says so
        return "–"


def bundle(paths: Paths, out: Path) -> None:
    """OUT/: results.tar.gz, logs.tar.gz, report.md, report.csv, report_size.png, results.md, times.json."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        if paths.results.exists():
            for f in sorted(paths.results.rglob("*")):
                if f.is_file() and f.suffix in (".json", ".png"):
                    tar.add(f, arcname=str(f.relative_to(paths.run)))
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for f in sorted((paths.run / "logs").glob("*.log")) if (paths.run / "logs").exists() else []:
            tar.add(f, arcname=f"logs/{f.name}")
        if (paths.run / "run.log").exists():
            tar.add(paths.run / "run.log", arcname="logs/run.log")
    for src in ("report/report.md", "report/report.csv", "report/report_size.png", "report/results.md", "times.json"):
        if (paths.run / src).exists():
            shutil.copyfile(paths.run / src, out / Path(src).name)
    print(f"bundle: wrote {out}", flush=True)


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(HERE / "config.yaml"))
    p.add_argument("--run", required=True, help="working folder (models, datastores, results); resumed on rerun")
    p.add_argument("--out", help="folder for the small files to hand back (results, report, times)")
    p.add_argument("--small", action="store_true", help="the config's `small:` sizes (CPU smoke test)")
    p.add_argument("--corpora", help="override the config's corpora folder")
    p.add_argument("--serial", action="store_true", help="run every job in this process, one after another")
    p.add_argument("--parallel", action="store_true", help="worker processes even without a GPU (testing)")
    p.add_argument("--domains", nargs="+", help="only these domains (default: the config's)")
    p.add_argument("--methods", nargs="+", default=["base", *METHODS], choices=["base", *METHODS],
                   help="methods to evaluate (default: all)")
    p.add_argument("--job", help=argparse.SUPPRESS)  # a worker: pretrain:BASE, domain:DOM, eval:bases
    p.add_argument("--report-only", action="store_true", help="only remake the report and the bundle")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false" if args.job or args.serial else "true")
    try:
        cfg = load_config(args.config, args.small, args.corpora)
        if args.domains:
            unknown = sorted(set(args.domains) - set(cfg["domains"]))
            if unknown:
                raise ValueError(f"--domains: {', '.join(unknown)} not in the config's domains {cfg['domains']}")
            cfg["domains"] = list(args.domains)
        paths = Paths(args.run, cfg)
        if args.job:
            run_job(cfg, paths, args.job, tuple(args.methods))
            return 0
        if args.report_only:  # times.json refreshed from the stages finished so far (a run may still be going)
            old = read_json(paths.run / "times.json") if (paths.run / "times.json").exists() else {}
            scheduler.write_times(paths.run, old.get("device") or scheduler.gpu_info(), {}, None)
            try:
                make_report(cfg, paths)
            except Exception as e:  # still hand back what there is
                print(f"report: {type(e).__name__}: {e}", flush=True)
            if args.out:
                bundle(paths, Path(args.out))
            return 0
        return orchestrate(args, cfg, paths)
    except (ValueError, FileNotFoundError) as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
