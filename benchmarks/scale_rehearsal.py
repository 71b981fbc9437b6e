"""Scale rehearsal (issue 15, goal 6): a real corpus through datastore -> kNN targets -> training, every
stage timed, and the projection of those times to larger corpora and more GPUs.

    # CPU smoke run (a few thousand tokens of the bundled text, tiny models; ~15 s):
    OMP_NUM_THREADS=1 python benchmarks/scale_rehearsal.py --small --corpus memdec/data/general.jsonl \\
        --device cpu --out /tmp/scale-small
    # the general-English corpus (16.0 M tokens with the default 32768-token BPE: 24.6 GB of keys), one H200; run
    # experiments/offline_reproduction/stage_inputs.sh here first (copies the corpora to .device/corpora),
    # then on the GPU host (run with carry [".device/corpora"]; no network needed):
    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python benchmarks/scale_rehearsal.py --device cuda \\
        --corpus .device/corpora/general/train.jsonl.gz --query-sample 500000 --train-steps 400 \\
        --work /tmp/scale-work --out "$OUT/scale_rehearsal"

(one line for the device's `run`: `PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python benchmarks/scale_rehearsal.py --device cuda
--corpus .device/corpora/general/train.jsonl.gz --query-sample 500000 --train-steps 400 --work /tmp/scale-work
--out $OUT/scale_rehearsal`; estimated 5-7 min on one H200, not yet run there.)

If a GPU call runs out of time, run the same command again while the machine is warm: every finished
stage is skipped (its earlier timing is reported), an interrupted datastore or targets build resumes.

What runs (no hub, no network):

1. **tokenizer**: a GPT-2-style byte-level BPE (`memdec.tiny.train_tokenizer(gpt2_style=True)`, `--vocab`,
   default 32768) trained on the corpus's first `--tokenizer-chars` characters.
2. **models**: a random-init GPT-2-small-shaped base (12 x 768, 12 heads, 1024 positions) and the Memory
   Decoder's init, a smaller GPT-2 (distilgpt2's shape: 6 x 768), saved with the tokenizer
   (`memdec.tiny.tiny_model` / `save_model`).
3. **corpus**: the documents (`memdec.pipeline.data.load_texts`: a .jsonl/.jsonl.gz/.json/.parquet/.txt file,
   folder or glob) tokenized and capped at `--max-tokens` (whole documents, the last one cut), written
   to WORK/corpus.jsonl; the tokenization is timed (it is also the serial part of the datastore build).
4. **datastore**: `memdec.pipeline.datastore.build_datastore` of the base over that corpus (window 1024).
5. **targets**: exact torch search (`index.backend: torch`: no index is built), k = 1024, T = 16.
   Without `--query-sample` (or with `all`, or N equal to the row count): `memdec.pipeline.targets.build_targets`
   over every row (all rows measured). With `--query-sample N` < rows: N rows, in evenly spread blocks, are
   searched against *all* keys the way `build_targets` does it (`open_index(ds, "torch")`, `search(k + 1)`,
   `memdec.pipeline.targets.knn_distribution`, rows copied to the host, not written); the time for all rows
   is projected (linear in rows at this key count). The key load (and first pass for the key norms) is
   timed apart. The full datastore then has no targets, so the training stage runs on a **training set**:
   the corpus's first N + 1 tokens through `build_datastore` and `build_targets` (N rows x N keys, both timed).
6. **train**: `memdec.pipeline.train.train` (beta 0.5, lr 1e-3, batch `--batch-size` windows of 1024),
   `--train-steps` optimizer steps (default one epoch of the data it trains on), per-step times from its
   callback (which reads the loss every step: one host sync per step, so the rate is a little low). The rate
   is taken after the first steps (the GPU compile) and without steps over 5x the median (recompiles);
   what it leaves out of the stage's wall time is its fixed cost. One epoch over the whole corpus is
   projected from that rate.

The stages are those `memdec pipeline` runs (the config dict is checked with `memdec.pipeline.run`'s own
`load_config` / `check_sections` and its output paths are `stage_paths`); a rerun with the same `--work`
skips each complete stage (`stage_complete`) and the tokenizer, models and corpus too, reporting the timing
recorded when it ran. `--work` defaults to /tmp/memdec-scale-rehearsal/<hash of the settings>; a `--work`
holding a run with other settings is refused.

**Projection** (`project_seconds`, a pure function): for each size in `--project-tokens` (default the measured
corpus, 103e6 = WikiText-103 and 1e9) and each GPU count in `--project-gpus` (default 1, 8): datastore and
training scale linearly in tokens and divide by the GPUs (the datastore's tokenization does not: every process
tokenizes the whole corpus); exact kNN targets scale with queries x keys = n^2 and divide by the GPUs (each
holds all keys, the rows are split), with the key load linear and not divided; IVF-PQ targets take
n / `--ivfpq-qps` / GPUs (a queries/s figure measured elsewhere, e.g. `bench_pipeline.py --ivfpq`, held constant
at every size; the index build is not included; without the option: "not measured"). A corpus of n tokens
is taken as n rows and n keys. Each row names the stage that dominates, and notes where the keys
(n x dim x 2 bytes) no longer fit on a GPU, in host memory or on the disk of --work of this machine.

Writes scale_rehearsal.json (every figure, settings, versions, date, command) and scale_rehearsal.md (the
stage table: measured / projected, seconds, throughput; then the projection table) to --out, after every
stage (`"complete": false` until the end). Bad input (a missing corpus, --max-tokens below one window,
--query-sample above the row count, a --device torch cannot use, ...) is a one-line error, exit 2,
before any work and with nothing written to --out.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memdec.core.formats import commit_partial, open_partial, partial_dir, write_json  # noqa: E402
from memdec.pipeline.data import write_texts  # noqa: E402

PROG = "scale_rehearsal.py"
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json", ".parquet")  # memdec.pipeline.data's reader

#: settings of the full run and of --small (any option given on the command line wins)
FULL = {"vocab": 32768, "window": 1024, "base_layers": 12, "base_hidden": 768, "base_heads": 12,
        "mem_layers": 6, "mem_hidden": 768, "mem_heads": 12, "k": 1024, "temperature": 16.0, "batch_size": 8,
        "ds_batch_size": 16, "max_tokens": None, "query_sample": None, "train_steps": None,
        "tokenizer_chars": 20_000_000}
SMALL = {"vocab": 512, "window": 64, "base_layers": 2, "base_hidden": 64, "base_heads": 4,
         "mem_layers": 1, "mem_hidden": 32, "mem_heads": 2, "k": 8, "temperature": 16.0, "batch_size": 4,
         "ds_batch_size": 8, "max_tokens": 4000, "query_sample": 1000, "train_steps": 6,
         "tokenizer_chars": 200_000}
DEFAULT_PROJECT_TOKENS = (103e6, 1e9)
CHARS_PER_TOKEN_CAP = 12  # documents read for the token cap: up to 12 characters per wanted token
OUTLIER = 5.0  # a training step over 5x the median step time (a recompile) is left out of the rate


class InputError(ValueError):
    """Bad input found before the work starts: one line on stderr, exit 2."""


# ------------------------------------------------------------------------------------ projection


@dataclass(frozen=True)
class StageCost:
    """A measured stage's seconds at `tokens` corpus tokens, split by how they grow with the corpus.

    scaling "linear": work proportional to tokens; "quadratic": exact kNN, proportional to queries x keys
    (`queries` measured against `tokens` keys). `parallel_s` divides over GPUs; `serial_s` grows like the
    tokens but every GPU spends it whole (tokenizing, loading keys); `fixed_s` does not grow (compile).
    """

    name: str
    scaling: str
    tokens: float
    parallel_s: float
    serial_s: float = 0.0
    fixed_s: float = 0.0
    queries: float | None = None


def project_seconds(cost: StageCost, tokens: float, gpus: int = 1) -> float:
    """Seconds of `cost`'s stage over a corpus of `tokens` tokens on `gpus` GPUs (perfect scaling)."""
    if tokens <= 0 or gpus < 1 or cost.tokens <= 0:
        raise ValueError("project_seconds: tokens, gpus and the measured tokens must be positive")
    scale = tokens / cost.tokens
    if cost.scaling == "linear":
        work = cost.parallel_s * scale
    elif cost.scaling == "quadratic":
        work = cost.parallel_s * (tokens / (cost.queries or cost.tokens)) * scale  # queries x keys
    else:
        raise ValueError(f"project_seconds: unknown scaling {cost.scaling!r} (linear or quadratic)")
    return cost.fixed_s + cost.serial_s * scale + work / gpus


def project_rate(rate: float | None, tokens: float, gpus: int = 1) -> float | None:
    """Seconds for `tokens` rows at `rate` rows/s per GPU on `gpus` GPUs; None when no rate is known."""
    if rate is None:
        return None
    return tokens / rate / gpus


def projection(costs: dict[str, StageCost], sizes: Sequence[float], gpus: Sequence[int],
               ivfpq_qps: float | None = None, key_dim: int | None = None,
               limits: dict[str, float | None] | None = None) -> list[dict[str, Any]]:
    """One row per (size, GPU count): seconds of datastore, targets (exact; IVF-PQ from `ivfpq_qps`), one
    training epoch, totals and the dominating stage. `costs` holds "datastore", "targets", "train".
    `limits` (bytes: "gpu_memory", "host_memory", "disk") adds notes on where the n x key_dim float16 keys fit."""
    rows = []
    for n in sizes:
        for g in gpus:
            ds = project_seconds(costs["datastore"], n, g)
            exact = project_seconds(costs["targets"], n, g)
            ivf = project_rate(ivfpq_qps, n, g)
            tr = project_seconds(costs["train"], n, g)
            stages_exact = {"datastore": ds, "targets": exact, "train": tr}
            row = {"tokens": float(n), "gpus": int(g), "datastore_s": ds, "targets_exact_s": exact,
                   "targets_ivfpq_s": ivf, "train_epoch_s": tr, "total_exact_s": ds + exact + tr,
                   "dominant_exact": max(stages_exact, key=stages_exact.get),
                   "total_ivfpq_s": None, "dominant_ivfpq": None}
            if ivf is not None:
                stages_ivf = {"datastore": ds, "targets": ivf, "train": tr}
                row["total_ivfpq_s"] = ds + ivf + tr
                row["dominant_ivfpq"] = max(stages_ivf, key=stages_ivf.get)
            if key_dim:
                row["keys_bytes"] = float(n) * key_dim * 2
                row["notes"] = key_notes(row["keys_bytes"], limits or {})
            rows.append(row)
    return rows


def key_notes(key_bytes: float, limits: dict[str, float | None]) -> list[str]:
    """Where keys of `key_bytes` do not fit on this machine (TorchIndex keeps keys on the GPU up to
    0.8 x half its free memory, else streams them from the host)."""
    notes = []
    gpu, host, disk = limits.get("gpu_memory"), limits.get("host_memory"), limits.get("disk")
    if gpu and key_bytes > 0.4 * gpu:
        notes.append(f"keys {key_bytes / 1e9:.0f} GB > 40% of the GPU's {gpu / 1e9:.0f} GB: exact search streams "
                     "them from the host (slower than the resident rate projected)")
    if host and key_bytes > host:
        notes.append(f"keys > host memory {host / 1e9:.0f} GB: streamed from disk every pass")
    if disk and key_bytes > disk:
        notes.append(f"keys > free disk of --work {disk / 1e9:.0f} GB")
    return notes


# ------------------------------------------------------------------------------------- formatting


def fmt_s(s: float | None) -> str:
    """Seconds as s / min / h / d."""
    if s is None:
        return "not measured"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    if s < 2 * 365 * 86400:
        return f"{s / 86400:.1f} d"
    return f"{s / (365 * 86400):,.0f} years"


def fmt_n(n: float | None) -> str:
    """A count as 1.2 k / 3.4 M / 1.0 B."""
    if n is None:
        return "-"
    for div, unit in ((1e9, " B"), (1e6, " M"), (1e3, " k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.4g}"


# --------------------------------------------------------------------------------------- settings


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints its usage too)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Scale rehearsal: corpus -> datastore -> targets -> training, timed "
                "and projected (see the module docstring).")
    p.add_argument("--corpus", required=True, help="a .jsonl/.jsonl.gz/.json/.parquet/.txt file, folder or glob")
    p.add_argument("--out", required=True, help="folder for scale_rehearsal.json / .md")
    p.add_argument("--work", help="folder for the large intermediate files (default "
                   "/tmp/memdec-scale-rehearsal/<settings hash>); a rerun with the same one resumes")
    p.add_argument("--small", action="store_true", help="CPU smoke run: 4000 tokens, tiny models, k 8")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--max-tokens", type=int, help="cap on the corpus tokens (default: all; --small 4000)")
    p.add_argument("--query-sample", type=_sample, help="kNN targets measured for N rows, projected to all; "
                   "'all' for every row (default: all; --small 1000)")
    p.add_argument("--train-steps", type=int, help="optimizer steps measured (default: one epoch)")
    p.add_argument("--ivfpq-qps", type=float, help="IVF-PQ queries/s per GPU for the projection "
                   "(measured elsewhere; default: not measured)")
    p.add_argument("--project-tokens", help="comma-separated corpus sizes (default: 103e6,1e9; the measured "
                   "size is always included)")
    p.add_argument("--project-gpus", default="1,8", help="comma-separated GPU counts (default 1,8)")
    p.add_argument("--vocab", type=int, help="BPE vocabulary (default 32768; --small 512)")
    p.add_argument("--tokenizer-chars", type=int, help="characters the tokenizer is trained on (default 2e7)")
    p.add_argument("--window", type=int, help="window of every stage (default 1024; --small 64)")
    p.add_argument("--base-layers", type=int)
    p.add_argument("--base-hidden", type=int)
    p.add_argument("--base-heads", type=int)
    p.add_argument("--mem-layers", type=int)
    p.add_argument("--mem-hidden", type=int)
    p.add_argument("--mem-heads", type=int)
    p.add_argument("--k", type=int, help="neighbours per row (default 1024; --small 8)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--batch-size", type=int, help="training windows per step (default 8)")
    p.add_argument("--ds-batch-size", type=int, help="datastore windows per forward pass (default 16)")
    p.add_argument("--progress", action="store_true", help="show the stages' progress bars")
    return p


def _sample(text: str) -> int | str:
    """--query-sample: a row count (5e5 is fine) or 'all'."""
    if text.strip().lower() == "all":
        return "all"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a row count or 'all'")
    return int(value)


def _numbers(text: str | None, what: str, kind=float) -> list:
    if text is None or not text.strip():
        return []
    try:
        return [kind(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{what} {text!r}: not a comma-separated list of numbers") from None


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings: the profile (FULL or --small) with the options given on top."""
    base = dict(SMALL if args.small else FULL)
    for key in base:
        value = getattr(args, key, None)
        if value is not None:
            base[key] = value
    if base["query_sample"] == "all":
        base["query_sample"] = None
    base["small"] = bool(args.small)
    base["corpus"] = os.path.abspath(args.corpus)
    return base


def check_inputs(args: argparse.Namespace, s: dict[str, Any]) -> None:
    """One-line InputError for anything wrong that can be seen before any work."""
    corpus = args.corpus
    if any(ch in corpus for ch in "*?["):
        import glob

        if not glob.glob(corpus):
            raise InputError(f"--corpus {corpus}: no file matches")
    elif not os.path.exists(corpus):
        raise InputError(f"--corpus {corpus}: no such file or folder")
    elif os.path.isfile(corpus) and not corpus.endswith(TEXT_SUFFIXES):
        raise InputError(f"--corpus {corpus}: not a {'/'.join(TEXT_SUFFIXES)} file")
    for key in ("vocab", "window", "base_layers", "base_hidden", "base_heads", "mem_layers", "mem_hidden",
                "mem_heads", "k", "batch_size", "ds_batch_size", "tokenizer_chars", "max_tokens", "query_sample",
                "train_steps"):
        if s[key] is not None and s[key] < 1:
            raise InputError(f"--{key.replace('_', '-')} {s[key]}: must be >= 1")
    if s["vocab"] <= 257:
        raise InputError(f"--vocab {s['vocab']}: a byte-level BPE needs more than 257 tokens (256 bytes + EOS)")
    if s["window"] < 2:
        raise InputError(f"--window {s['window']}: must be at least 2")
    if not s["temperature"] > 0:
        raise InputError(f"--temperature {s['temperature']}: must be > 0")
    for who in ("base", "mem"):
        if s[f"{who}_hidden"] % s[f"{who}_heads"]:
            raise InputError(f"--{who}-hidden {s[f'{who}_hidden']} is not a multiple of --{who}-heads "
                             f"{s[f'{who}_heads']}")
    if s["train_steps"] is not None and s["train_steps"] < 2:
        raise InputError(f"--train-steps {s['train_steps']}: at least 2 (the first step holds the compile)")
    if args.ivfpq_qps is not None and not args.ivfpq_qps > 0:
        raise InputError(f"--ivfpq-qps {args.ivfpq_qps}: must be > 0")
    mt, w, n, k = s["max_tokens"], s["window"], s["query_sample"], s["k"]
    if mt is not None and mt < w + 1:
        raise InputError(f"--max-tokens {mt}: smaller than one window ({w} + 1 tokens)")
    if mt is not None and k > mt - 2:
        raise InputError(f"--k {k}: --max-tokens {mt} gives at most {mt - 1} rows, so at most {mt - 2} neighbours")
    if n is not None and mt is not None and n > mt - 1:
        raise InputError(f"--query-sample {n}: more than the {mt - 1} rows --max-tokens {mt} allows")
    for text, what in ((args.project_tokens, "--project-tokens"), (args.project_gpus, "--project-gpus")):
        for v in _numbers(text, what):
            if not v >= 1:
                raise InputError(f"{what} {text!r}: every value must be >= 1")
    from memdec.cli import check_device

    try:
        check_device(args.device)
    except ValueError as e:
        raise InputError(str(e)) from None
    from memdec.core.formats import check_output_dir

    for path, what in ((args.out, "--out"), (args.work, "--work")):
        if path is not None:
            try:
                check_output_dir(path, what)
            except (ValueError, FileExistsError, FileNotFoundError) as e:
                raise InputError(str(e)) from None


def check_sample(s: dict[str, Any], rows: int) -> None:
    """One-line InputError for a --query-sample / k that the corpus's row count does not allow."""
    n, k, w = s["query_sample"], s["k"], s["window"]
    if k > rows - 1:
        raise InputError(f"--k {k}: the corpus gives {rows} rows, so at most {rows - 1} neighbours")
    if n is None or n == rows:
        return
    if n > rows:
        raise InputError(f"--query-sample {n}: more than the corpus's {rows} rows")
    if n < max(w, k + 1):
        raise InputError(f"--query-sample {n}: training then runs on the first {n} + 1 tokens, which need at "
                         f"least one window ({w}) and k + 1 = {k + 1} rows")


def work_folder(args: argparse.Namespace, s: dict[str, Any]) -> Path:
    if args.work:
        return Path(args.work)
    digest = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:12]
    return Path("/tmp/memdec-scale-rehearsal") / digest


# ------------------------------------------------------------------------------------ environment


def environment(device: str) -> dict[str, Any]:
    """Device, versions, machine limits and the date of this run."""
    import tokenizers
    import torch
    import transformers

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
    }
    try:
        env["host_memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        env["host_memory_bytes"] = None
    if device.startswith("cuda"):
        dev = torch.device(device)
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        env.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory), gpu_count=torch.cuda.device_count(),
                   cuda=torch.version.cuda)
    else:
        env.update(gpu=None, gpu_memory_bytes=None, gpu_count=0)
    try:
        import subprocess

        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parents[1])
        env["git_commit"] = head.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


# -------------------------------------------------------------------------------------- the stages


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _atomic_dir(final: Path, write) -> None:
    """write(tmp) into FINAL.partial, then rename it to FINAL (a folder that exists is complete)."""
    tmp = open_partial(final, overwrite=True, resume=False)
    write(tmp)
    commit_partial(tmp, final)


def doc_lengths(texts: Sequence[str], tok, batch: int = 1000) -> list[int]:
    """Tokens of each document as memdec.pipeline.data.tokenize counts them (no special tokens)."""
    out: list[int] = []
    for i in range(0, len(texts), batch):
        ids = tok(list(texts[i : i + batch]), add_special_tokens=False, verbose=False)["input_ids"]
        out.extend(len(x) for x in ids)
    return out


def cap_documents(texts: Sequence[str], lengths: Sequence[int], max_tokens: int | None, tok
                  ) -> tuple[list[str], int]:
    """(documents, stream length) of the longest document prefix whose token stream (EOS between documents)
    has at most `max_tokens` tokens; the last document is cut at a token so the stream fills the cap."""
    docs: list[str] = []
    total = 0
    for text, n in zip(texts, lengths, strict=True):
        sep = 1 if docs else 0
        if max_tokens is None or total + sep + n <= max_tokens:
            docs.append(text)
            total += sep + n
            continue
        room = max_tokens - total - sep
        ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        while room >= 1:
            part = tok.decode(ids[:room])
            got = len(tok(part, add_special_tokens=False, verbose=False)["input_ids"])
            if got <= max_tokens - total - sep and part.strip():
                docs.append(part)
                total += sep + got
                break
            room -= max(1, got - (max_tokens - total - sep))
        break
    return docs, total


def pipeline_config(root: Path, corpus: Path, base: Path, init: Path, s: dict[str, Any], device: str,
                    steps: int | None) -> dict[str, Any]:
    """The `memdec pipeline` config of one datastore -> targets -> train run (checked by memdec.pipeline.run)."""
    from memdec.pipeline.run import check_sections, load_config

    cfg = {"output": str(root), "corpus": {"path": str(corpus)}, "base_model": str(base),
           "datastore": {"window": s["window"], "batch_size": s["ds_batch_size"], "device": device},
           "index": {"backend": "torch"},
           "targets": {"k": s["k"], "temperature": s["temperature"], "device": device},
           "train": {"init": str(init), "beta": 0.5, "lr": 1e-3, "batch_size": s["batch_size"],
                     "window": s["window"], "epochs": 1.0, "steps": steps, "seed": 0}}
    cfg = load_config(cfg)
    check_sections(cfg)
    return cfg


class Rehearsal:
    """The stages, their records (WORK/rehearsal.json) and the report written to --out after each one."""

    def __init__(self, args: argparse.Namespace, s: dict[str, Any], work: Path, out: Path, device: str,
                 command: str):
        self.args, self.s, self.work, self.out, self.device, self.command = args, s, work, out, device, command
        self.state_path = work / "rehearsal.json"
        self.state: dict[str, Any] = {"settings": s, "stages": {}}
        self.ran: list[str] = []  # stages run in this invocation (later pipeline stages are then rebuilt)
        self.env = environment(device)
        self.progress = bool(args.progress)
        self.reporting = False  # --out is written only once the corpus passed its checks

    # -- records
    def load_state(self) -> None:
        if self.state_path.exists():
            old = json.loads(self.state_path.read_text(encoding="utf-8"))
            if old.get("settings") != self.s:
                diff = sorted(k for k in {**old.get("settings", {}), **self.s}
                              if old.get("settings", {}).get(k) != self.s.get(k))
                raise InputError(f"--work {self.work}: holds a rehearsal with other settings "
                                 f"({', '.join(diff)}); use another --work or delete it")
            self.state = old

    def record(self, name: str, rec: dict[str, Any]) -> dict[str, Any]:
        rec = {**rec, "device": self.device, "date": self.env["date"]}
        self.state["stages"][name] = rec
        write_json(self.state_path, self.state)
        self.ran.append(name)
        self.log(f"{name}: {fmt_s(rec.get('seconds'))}")
        if self.reporting:
            self.report(complete=False)
        return rec

    def finished(self, cfg: dict[str, Any], stage: str, name: str) -> tuple[dict[str, Path], bool, dict | None]:
        """(the pipeline's stage paths, whether `stage`'s output is complete, the earlier record `name` to return
        when the stage is skipped (`done`), else None)."""
        from memdec.pipeline.run import stage_complete, stage_paths

        paths = stage_paths(cfg)
        complete = stage_complete(stage, paths[stage])
        return paths, complete, self.done(name, complete)

    def done(self, name: str, complete: bool = True) -> dict[str, Any] | None:
        """The earlier record of `name` if its output is complete and no earlier stage ran now."""
        rec = self.state["stages"].get(name)
        if rec is not None and complete and not self.ran:
            self.log(f"{name}: done in an earlier run ({fmt_s(rec.get('seconds'))}), skipped")
            return rec
        return None

    def log(self, msg: str) -> None:
        print(f"{PROG}: {msg}", flush=True)

    # -- setup stages
    def tokenizer(self, texts: list[str]):
        from transformers import AutoTokenizer

        from memdec.tiny import train_tokenizer

        path = self.work / "tokenizer"
        if not self.done("tokenizer", path.is_dir()):
            chars, sample = 0, []
            for t in texts:
                if chars >= self.s["tokenizer_chars"]:
                    break
                sample.append(t[: self.s["tokenizer_chars"] - chars])
                chars += len(sample[-1])
            t0 = time.perf_counter()
            tok = train_tokenizer(sample, vocab_size=self.s["vocab"], name="scale-rehearsal-bpe", gpt2_style=True)
            seconds = time.perf_counter() - t0
            _atomic_dir(path, tok.save_pretrained)
            self.record("tokenizer", {"seconds": seconds, "chars": chars, "docs": len(sample), "vocab": len(tok),
                                      "rate": chars / seconds, "rate_unit": "chars/s"})
        return AutoTokenizer.from_pretrained(str(path))

    def models(self, tok) -> tuple[Path, Path]:
        from memdec.tiny import save_model, tiny_model

        base, init = self.work / "base", self.work / "memdec-init"
        if not self.done("models", base.is_dir() and init.is_dir()):
            s = self.s
            positions = max(s["window"], 128 if s["small"] else 1024)
            t0 = time.perf_counter()
            params = {}
            for path, who, seed in ((base, "base", 0), (init, "mem", 1)):
                model = tiny_model(tok, "gpt2", n_layer=s[f"{who}_layers"], hidden=s[f"{who}_hidden"],
                                   n_head=s[f"{who}_heads"], max_positions=positions, seed=seed)
                params[who] = sum(p.numel() for p in model.parameters())
                _atomic_dir(path, lambda tmp, m=model: save_model(m, tok, tmp))
            self.record("models", {"seconds": time.perf_counter() - t0, "base_params": params["base"],
                                   "mem_params": params["mem"], "positions": positions})
        return base, init

    def corpus(self, texts: list[str], tok) -> dict[str, Any]:
        path, meta = self.work / "corpus.jsonl", self.work / "corpus.json"
        rec = self.done("corpus", meta.exists() and path.exists())
        if rec is not None:
            return rec
        s = self.s
        budget = None if s["max_tokens"] is None else s["max_tokens"] * CHARS_PER_TOKEN_CAP
        docs, chars = [], 0
        for t in texts:
            if budget is not None and chars >= budget:
                break
            docs.append(t)
            chars += len(t)
        t0 = time.perf_counter()
        lengths = doc_lengths(docs, tok)
        tok_s = time.perf_counter() - t0
        capped, n_tokens = cap_documents(docs, lengths, s["max_tokens"], tok)
        check_sample(s, n_tokens - 1)
        write_texts(path, capped)
        rec = {"seconds": time.perf_counter() - t0, "tokenize_seconds": tok_s,
               "tokenized": int(sum(lengths) + max(0, len(lengths) - 1)), "n_tokens": int(n_tokens),
               "docs": len(capped), "docs_read": len(texts), "chars_tokenized": chars,
               "path": str(path)}
        rec["tokenize_rate"] = rec["tokenized"] / tok_s if tok_s > 0 else None
        sample = s["query_sample"]
        if sample is not None and sample < n_tokens - 1:
            train_docs, train_tokens = cap_documents(docs, lengths, sample + 1, tok)  # a prefix of `capped`
            write_texts(self.work / "trainset.jsonl", train_docs)
            rec.update(trainset_tokens=int(train_tokens), trainset_docs=len(train_docs))
        write_json(meta, rec)
        return self.record("corpus", rec)

    # -- pipeline stages (memdec.pipeline.run's stage functions on its config)
    def datastore(self, cfg: dict[str, Any], name: str) -> dict[str, Any]:
        from memdec.pipeline.data import CorpusSpec
        from memdec.pipeline.datastore import Datastore, build_datastore

        paths, complete, rec = self.finished(cfg, "datastore", name)
        if rec is not None:
            return rec
        path = paths["datastore"]
        resumed = partial_dir(path).exists() and not complete
        t0 = time.perf_counter()
        build_datastore(cfg["base_model"], CorpusSpec.from_arg(cfg["corpus"]), path, progress=self.progress,
                        overwrite=complete, **cfg["datastore"])
        _sync(self.device)
        seconds = time.perf_counter() - t0
        ds = Datastore.open(path)
        return self.record(name, {"seconds": seconds, "n_tokens": int(ds.manifest["n_tokens"]), "rows": ds.n,
                                  "dim": ds.dim, "dtype": ds.manifest.get("dtype"), "window": ds.manifest["window"],
                                  "rate": ds.manifest["n_tokens"] / seconds, "rate_unit": "tokens/s",
                                  "resumed": resumed, "path": str(path)})

    def targets(self, cfg: dict[str, Any], name: str) -> dict[str, Any]:
        from memdec.pipeline.datastore import Datastore
        from memdec.pipeline.targets import Targets, build_targets

        paths, complete, rec = self.finished(cfg, "targets", name)
        if rec is not None:
            return rec
        resumed = partial_dir(paths["targets"]).exists() and not complete
        t0 = time.perf_counter()
        build_targets(paths["datastore"], out=paths["targets"], backend=cfg["index"]["backend"],
                      progress=self.progress, overwrite=complete, **cfg["targets"])
        _sync(self.device)
        seconds = time.perf_counter() - t0
        tg, ds = Targets.open(paths["targets"]), Datastore.open(paths["datastore"])
        return self.record(name, {"seconds": seconds, "queries": tg.n_rows, "keys": ds.n, "k": tg.k,
                                  "nnz": int(tg.manifest["nnz"]), "mean_support": tg.manifest["nnz"] / tg.n_rows,
                                  "rate": tg.n_rows / seconds, "rate_unit": "queries/s", "resumed": resumed,
                                  "includes": "key load, search, distribution, writing the CSR files",
                                  "path": str(paths["targets"])})

    def sample_targets(self, cfg: dict[str, Any], n_queries: int) -> dict[str, Any]:
        """N rows (evenly spread blocks) searched against all keys, as build_targets does them (not written)."""
        rec = self.done("targets-sample", True)
        if rec is not None:
            return rec
        import torch

        from memdec.core.devices import resolve_device
        from memdec.pipeline.datastore import Datastore
        from memdec.pipeline.run import stage_paths
        from memdec.pipeline.search import open_index
        from memdec.pipeline.targets import check_k, knn_distribution

        ds = Datastore.open(stage_paths(cfg)["datastore"])
        k, temperature = check_k(cfg["targets"]["k"], ds), float(cfg["targets"]["temperature"])
        dev = resolve_device(self.device)
        t0 = time.perf_counter()
        index = open_index(ds, "torch", device=dev)
        values = torch.from_numpy(ds.values).to(dev)
        index.search(torch.from_numpy(ds.keys(0, 1)).to(dev), k + 1)  # key norms: one pass over the keys
        _sync(self.device)
        load_s = time.perf_counter() - t0
        batch = int(getattr(index, "query_batch", None) or 256)
        blocks = sample_blocks(ds.n, n_queries, batch)
        nnz = 0
        t1 = time.perf_counter()
        for a, b in blocks:
            q = torch.from_numpy(ds.keys(a, b)).to(dev)
            d, i = index.search(q, k + 1)
            cnt, tid, pr = knn_distribution(d, i, torch.arange(a, b, device=dev), values, k, temperature)
            nnz += int(cnt.sum())
            tid.cpu(), pr.cpu()
        _sync(self.device)
        search_s = time.perf_counter() - t1
        resident = bool(getattr(index, "resident", False))
        del index, values
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the next exact index sizes itself by the free GPU memory
        return self.record("targets-sample", {
            "seconds": load_s + search_s, "load_seconds": load_s, "search_seconds": search_s,
            "queries": n_queries, "keys": ds.n, "k": k, "blocks": len(blocks), "query_batch": batch,
            "nnz": nnz, "mean_support": nnz / n_queries, "rate": n_queries / search_s, "rate_unit": "queries/s",
            "resident_keys": resident,
            "includes": "search (k + 1), distribution, copy to host; not the key load (load_seconds)"})

    def train(self, cfg: dict[str, Any], name: str) -> dict[str, Any]:
        from memdec.pipeline.data import sliding_windows
        from memdec.pipeline.datastore import Datastore
        from memdec.pipeline.train import _batches, train

        paths, complete, rec = self.finished(cfg, "train", name)
        if rec is not None:
            return rec
        ds = Datastore.open(paths["datastore"])
        opts = dict(cfg["train"])
        init = opts.pop("init")
        window, batch = int(opts["window"]), int(opts["batch_size"])
        windows = sliding_windows(ds.n + 1, window, window)
        per_epoch = math.ceil(len(windows) / batch)
        steps = int(opts.pop("steps") or per_epoch)
        opts.pop("epochs", None)
        step_tokens = []  # scored positions of each step, in train's own batch order (single process)
        for g in range(steps):
            epoch, b = divmod(g, per_epoch)
            step_tokens.append(sum(windows[i].n_scored for i in _batches(len(windows), batch, opts["seed"], epoch,
                                                                          True)[b]))
        times: list[float] = []

        def callback(step: int, stats: dict) -> None:
            times.append(time.perf_counter())

        t0 = time.perf_counter()
        train(init, paths["train"], datastore=paths["datastore"], targets=paths["targets"], steps=steps,
              save_every=steps, progress=self.progress, overwrite=complete, callback=callback, **opts)
        wall = time.perf_counter() - t0
        rate = train_rate(t0, times, step_tokens, wall)
        return self.record(name, {"seconds": wall, "steps": steps, "steps_per_epoch": per_epoch,
                                  "epochs": steps / per_epoch, "tokens": int(sum(step_tokens)),
                                  "rows": ds.n, **rate, "rate_unit": "tokens/s", "window": window,
                                  "batch_size": batch, "path": str(paths["train"])})

    # -- the report
    def costs(self) -> dict[str, StageCost] | None:
        st = self.state["stages"]
        need = ("corpus", "datastore", "train") + (("targets-sample",) if "targets-sample" in st else ("targets",))
        if any(n not in st for n in need):
            return None
        corpus, ds, tr = st["corpus"], st["datastore"], st["train"]
        n = float(ds["n_tokens"])
        tok_s = n / corpus["tokenize_rate"] if corpus.get("tokenize_rate") else 0.0
        tok_s = min(tok_s, ds["seconds"])
        costs = {"datastore": StageCost("datastore", "linear", n, ds["seconds"] - tok_s, serial_s=tok_s)}
        if "targets-sample" in st:
            tg = st["targets-sample"]
            costs["targets"] = StageCost("targets", "quadratic", float(tg["keys"]), tg["search_seconds"],
                                         serial_s=tg["load_seconds"], queries=float(tg["queries"]))
        else:
            tg = st["targets"]
            costs["targets"] = StageCost("targets", "quadratic", float(tg["keys"]), tg["seconds"],
                                         queries=float(tg["queries"]))
        costs["train"] = StageCost("train", "linear", n, n / tr["rate"], fixed_s=tr["fixed_seconds"])
        return costs

    def report(self, complete: bool) -> dict[str, Any]:
        st = self.state["stages"]
        costs = self.costs()
        result: dict[str, Any] = {
            "kind": "memdec scale rehearsal", "version": 1, "complete": complete, "command": self.command,
            "environment": self.env, "settings": self.s, "work": str(self.work), "stages": st,
            "ivfpq_qps": self.args.ivfpq_qps, "table": stage_table(st, costs),
        }
        if costs is not None:
            n = costs["datastore"].tokens
            sizes = [n, *(_numbers(self.args.project_tokens, "--project-tokens") or DEFAULT_PROJECT_TOKENS)]
            gpus = [int(g) for g in _numbers(self.args.project_gpus, "--project-gpus", int)] or [1, 8]
            limits = {"gpu_memory": self.env.get("gpu_memory_bytes"), "host_memory": self.env.get("host_memory_bytes"),
                      "disk": float(shutil.disk_usage(self.work).free)}
            result["costs"] = {k: asdict(v) for k, v in costs.items()}
            result["projection"] = {"assumptions": ASSUMPTIONS,
                                    "rows": projection(costs, sizes, gpus, self.args.ivfpq_qps,
                                                       st["datastore"].get("dim"), limits)}
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "scale_rehearsal.json", result)
        (self.out / "scale_rehearsal.md").write_text(markdown(result), encoding="utf-8")
        return result


ASSUMPTIONS = [
    "a corpus of n tokens gives n datastore rows and n keys (the base and its key dimension unchanged)",
    "datastore: linear in tokens, divided by the GPUs, except its tokenization (every process tokenizes the "
    "whole corpus: measured rate of the corpus stage)",
    "exact targets (torch, k as measured): queries x keys = n^2, divided by the GPUs (each holds all keys, rows "
    "split); the key load (and the norms pass) linear in n, not divided; at the resident-keys rate measured",
    "IVF-PQ targets: n / --ivfpq-qps / GPUs, the given rate held at every size (its cost per query grows about "
    "like sqrt(n) at nlist ~ sqrt(n) and a fixed nprobe); index training and adding not included",
    "training: one epoch, linear in tokens at the measured steady tokens/s, divided by the GPUs (data "
    "parallel), plus the measured fixed cost (load, compile, save)",
    "perfect scaling over GPUs; no disk or memory limit (see the notes column)",
]


def sample_blocks(n_rows: int, n_queries: int, batch: int) -> list[tuple[int, int]]:
    """[start, stop) blocks of at most `batch` consecutive rows, `n_queries` rows in all, spread evenly
    (no overlap) over `n_rows` rows."""
    if not 1 <= n_queries <= n_rows:
        raise ValueError(f"n_queries {n_queries}: must be in [1, {n_rows}]")
    nb = math.ceil(n_queries / batch)
    sizes = [n_queries // nb + (1 if j < n_queries % nb else 0) for j in range(nb)]
    gap, out, at = n_rows - n_queries, [], 0
    for j, size in enumerate(sizes):
        start = at + (gap * j) // max(1, nb - 1)  # the first block at row 0, the last ending at the last row
        out.append((start, start + size))
        at += size
    return out


def train_rate(t0: float, times: Sequence[float], step_tokens: Sequence[int], wall: float) -> dict[str, Any]:
    """Steady training rate from per-step end times (`t0`: the call's start): after the first
    max(1, min(20, steps // 5)) steps and without steps over OUTLIER x the median; what the rate leaves
    out of the `wall` seconds (load, compile, slow steps, saving) is the fixed cost."""
    if len(times) != len(step_tokens) or len(times) < 2:
        raise ValueError(f"train: {len(times)} step times for {len(step_tokens)} steps (need at least 2)")
    ends = list(times)
    durations = [ends[0] - t0] + [b - a for a, b in zip(ends, ends[1:], strict=False)]
    warm = max(1, min(20, len(ends) // 5))
    kept = list(range(warm, len(ends)))
    median = statistics.median(durations[j] for j in kept)
    outliers = [j for j in kept if durations[j] > OUTLIER * median]
    kept = [j for j in kept if j not in outliers]
    rate = sum(step_tokens[j] for j in kept) / sum(durations[j] for j in kept)
    steady_total = sum(step_tokens) / rate
    return {"rate": rate, "warmup_steps": warm, "first_step_seconds": durations[0],
            "median_step_seconds": median, "outlier_steps": len(outliers),
            "outlier_seconds": sum(durations[j] for j in outliers),
            "fixed_seconds": max(0.0, wall - steady_total)}


# ------------------------------------------------------------------------------------------ report


def stage_table(st: dict[str, Any], costs: dict[str, StageCost] | None) -> list[dict[str, Any]]:
    """The stage rows of the report: what was measured and what is projected at the measured corpus."""
    rows: list[dict[str, Any]] = []

    def add(stage: str, size: str, kind: str, seconds: float | None, rate: float | None, unit: str, note: str,
            ) -> None:
        rows.append({"stage": stage, "size": size, "kind": kind, "seconds": seconds, "rate": rate, "unit": unit,
                     "note": note})

    if "tokenizer" in st:
        r = st["tokenizer"]
        add("setup: tokenizer", f"{fmt_n(r['chars'])} chars", "measured", r["seconds"], r["rate"], "chars/s",
            f"GPT-2-style byte-level BPE, {r['vocab']} tokens")
    if "models" in st:
        r = st["models"]
        add("setup: models", "-", "measured", r["seconds"], None, "", f"random init: base {fmt_n(r['base_params'])} "
            f"params, Memory Decoder init {fmt_n(r['mem_params'])} params, {r['positions']} positions")
    if "corpus" in st:
        r = st["corpus"]
        add("corpus: tokenize, cap", f"{fmt_n(r['n_tokens'])} tokens", "measured", r["seconds"],
            r.get("tokenize_rate"), "tokens/s", f"{r['docs']} of {r['docs_read']} documents; tokenizing "
            f"{fmt_n(r['tokenized'])} tokens took {r['tokenize_seconds']:.1f} s")
    n_rows = None
    if "datastore" in st:
        r = st["datastore"]
        n_rows = r["rows"]
        add("datastore", f"{fmt_n(r['n_tokens'])} tokens", "measured", r["seconds"], r["rate"], "tokens/s",
            f"keys {r['dim']} x float16, model {r['dtype']}, window {r['window']}"
            + (f"; of it tokenizing ~{costs['datastore'].serial_s:.1f} s" if costs else "")
            + ("; RESUMED from a partial build: time of the rest only" if r.get("resumed") else ""))
    if "targets-sample" in st:
        r = st["targets-sample"]
        add("targets: sample", f"{fmt_n(r['queries'])} of {fmt_n(r['keys'])} rows", "measured", r["seconds"],
            r["rate"], "queries/s", f"exact torch search against all {fmt_n(r['keys'])} keys, k = {r['k']}; "
            f"key load + norms {r['load_seconds']:.1f} s, search {r['search_seconds']:.1f} s; "
            f"{r['mean_support']:.0f} tokens per row")
        all_s = r["load_seconds"] + r["search_seconds"] * r["keys"] / r["queries"]
        add("targets: all rows", f"{fmt_n(r['keys'])} rows", "projected", all_s,
            r["keys"] / (all_s - r["load_seconds"]), "queries/s", "the sample's rate, linear in rows at this key count")
    if "targets" in st:
        r = st["targets"]
        add("targets", f"{fmt_n(r['queries'])} rows", "measured", r["seconds"], r["rate"], "queries/s",
            f"build_targets, exact torch, k = {r['k']}, all rows vs {fmt_n(r['keys'])} keys (key load, search, "
            f"writing); {r['mean_support']:.0f} tokens per row"
            + ("; RESUMED: time of the rest only" if r.get("resumed") else ""))
    if "trainset-datastore" in st:
        r = st["trainset-datastore"]
        add("training set: datastore", f"{fmt_n(r['n_tokens'])} tokens", "measured", r["seconds"], r["rate"],
            "tokens/s", "the corpus's first tokens (the full datastore has no targets to train on)")
    if "trainset-targets" in st:
        r = st["trainset-targets"]
        pq = ""
        if "targets-sample" in st:
            smp = st["targets-sample"]
            ps_big = smp["search_seconds"] / (smp["queries"] * smp["keys"]) * 1e12
            ps_small = r["seconds"] / (r["queries"] * r["keys"]) * 1e12
            pq = (f"; {ps_small:.3g} ps per query x key here vs {ps_big:.3g} ps at {fmt_n(smp['keys'])} keys "
                  "(the n^2 model takes them equal; more here means per-query costs that do not grow with the "
                  "keys, so the n^2 projection from the larger measurement is on the high side)")
        add("training set: targets", f"{fmt_n(r['queries'])} rows vs {fmt_n(r['keys'])} keys", "measured",
            r["seconds"], r["rate"], "queries/s", f"build_targets, all rows; {r['mean_support']:.0f} tokens per "
            f"row{pq}")
    if "train" in st:
        r = st["train"]
        add("train", f"{r['steps']} steps, {fmt_n(r['tokens'])} tokens", "measured", r["seconds"], r["rate"],
            "tokens/s", f"batch {r['batch_size']} x {r['window']}, {r['epochs']:.2f} epochs of {fmt_n(r['rows'])} "
            f"rows; first step {r['first_step_seconds']:.1f} s; rate after {r['warmup_steps']} steps"
            + (f", {r['outlier_steps']} slow steps ({r['outlier_seconds']:.1f} s) left out"
               if r["outlier_steps"] else "")
            + f"; fixed cost {r['fixed_seconds']:.1f} s")
    if costs is not None and n_rows is not None:
        n = costs["datastore"].tokens
        ep = project_seconds(costs["train"], n, 1)
        add("train: one epoch", f"{fmt_n(n)} tokens", "projected", ep, st["train"]["rate"], "tokens/s",
            "steady rate + fixed cost")
        total = sum(project_seconds(c, n, 1) for c in costs.values())
        add("total: datastore + targets + epoch", f"{fmt_n(n)} tokens", "projected", total, None, "",
            "1 GPU, exact targets")
    return rows


def markdown(result: dict[str, Any]) -> str:
    """The report as Markdown: stage table, projection table, assumptions."""
    env, s = result["environment"], result["settings"]
    lines = [f"# Scale rehearsal{'' if result['complete'] else ' (incomplete: stages still to run)'}", ""]
    where = env.get("gpu") or f"CPU ({env.get('cpu_count')} cores, {env.get('torch_threads')} torch threads)"
    if not env.get("gpu"):
        lines += ["> **A CPU rehearsal of the script, not the H200 figure**: the times say how the script behaves, "
                  "not what a GPU does.", ""]
    lines += [f"- device: {where}; torch {env['torch']}, transformers {env['transformers']}, tokenizers "
              f"{env['tokenizers']}, Python {env['python']}; date {env['date']}; commit {env.get('git_commit')}",
              f"- command: `{result['command']}`",
              f"- corpus: `{s['corpus']}`, cap {s['max_tokens'] or 'none'}; vocab {s['vocab']}, window {s['window']}; "
              f"base {s['base_layers']} x {s['base_hidden']}, Memory Decoder {s['mem_layers']} x {s['mem_hidden']}; "
              f"k = {s['k']}, T = {s['temperature']:g}; query sample {s['query_sample'] or 'all rows'}", "",
              "| stage | size | measured / projected | seconds | throughput | note |", "|---|---|---|---:|---:|---|"]
    for r in result["table"]:
        rate = f"{r['rate']:,.0f} {r['unit']}" if r["rate"] else "-"
        sec = f"{r['seconds']:.1f}" + (f" ({fmt_s(r['seconds'])})" if r["seconds"] >= 120 else "")
        lines.append(f"| {r['stage']} | {r['size']} | {r['kind']} | {sec} | {rate} | {r['note']} |")
    proj = result.get("projection")
    if proj:
        qps = result.get("ivfpq_qps")
        ivf = f"{qps:,.0f} queries/s per GPU (given, --ivfpq-qps)" if qps else "not measured (no --ivfpq-qps)"
        lines += ["", "## Projection", "", f"Exact targets: torch, n^2 from the measured rate. IVF-PQ: {ivf}.",
                  "", "| tokens | GPUs | datastore | targets, exact | targets, IVF-PQ | train, 1 epoch | total, exact | "
                  "total, IVF-PQ | dominates (exact / IVF-PQ) | keys | notes |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
        for r in proj["rows"]:
            dom = r["dominant_exact"] + " / " + (r["dominant_ivfpq"] or "not measured")
            keys = f"{r['keys_bytes'] / 1e9:,.3g} GB" if r.get("keys_bytes") else "-"
            times = " | ".join(fmt_s(r[key]) for key in ("datastore_s", "targets_exact_s", "targets_ivfpq_s",
                                                          "train_epoch_s", "total_exact_s", "total_ivfpq_s"))
            notes = "; ".join(r.get("notes") or []) or "-"
            lines.append(f"| {fmt_n(r['tokens'])} | {r['gpus']} | {times} | {dom} | {keys} | {notes} |")
        lines += ["", "Assumptions:", "", *(f"- {a}" for a in proj["assumptions"])]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Check the input, run (or skip) every stage, write the report; returns it."""
    s = settings_of(args)
    check_inputs(args, s)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = work_folder(args, s)
    from memdec.core.formats import check_output_dir

    try:
        check_output_dir(work, "--work")
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        raise InputError(str(e)) from None
    from memdec.pipeline.data import CorpusSpec, load_texts

    reh = Rehearsal(args, s, work, Path(args.out), device, command)
    if work.exists():
        reh.load_state()
    t0 = time.perf_counter()
    texts = load_texts(CorpusSpec(path=args.corpus))
    reh.log(f"read {len(texts)} documents of {args.corpus} in {time.perf_counter() - t0:.1f} s; work {work}")
    work.mkdir(parents=True, exist_ok=True)
    if not reh.state_path.exists():
        write_json(reh.state_path, reh.state)
    tok = reh.tokenizer(texts)
    base, init = reh.models(tok)
    corpus = reh.corpus(texts, tok)
    del texts
    rows = corpus["n_tokens"] - 1
    check_sample(s, rows)
    reh.reporting = True
    sampled = s["query_sample"] is not None and s["query_sample"] < rows
    full = pipeline_config(work / "full", work / "corpus.jsonl", base, init, s, device,
                           None if sampled else s["train_steps"])
    reh.datastore(full, "datastore")
    if not sampled:
        reh.targets(full, "targets")
        reh.train(full, "train")
    else:
        reh.sample_targets(full, s["query_sample"])
        small = pipeline_config(work / "trainset", work / "trainset.jsonl", base, init, s, device, s["train_steps"])
        reh.datastore(small, "trainset-datastore")
        reh.targets(small, "trainset-targets")
        reh.train(small, "train")
    result = reh.report(complete=True)
    reh.log(f"wrote {Path(args.out) / 'scale_rehearsal.md'} and .json")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if not args.progress:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # training (accelerate) stays on the CPU too
    command = shlex.join(["python", "benchmarks/scale_rehearsal.py", *argv])
    from memdec.core.errors import one_line

    try:
        run(args, command)
    except (InputError, ValueError, FileNotFoundError, FileExistsError) as e:
        if os.environ.get("MEMDEC_DEBUG"):
            raise
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
