"""Training a Memory Decoder: a small causal LM taught to imitate a kNN-LM's next-token distribution.

    loss = beta * KL(p_knn || p_mem) + (1 - beta) * CE(next token)

averaged over every scored target position. p_knn is sparse (the CSR rows of a targets folder), so
the KL is computed on its support only: KL = sum_j p_j (log p_j - log q_j), with log q_j gathered
from the model's log-softmax at the support ids; no vocabulary-sized target tensor is ever built.

Windows run over the datastore's token stream (`memdec.pipeline.data.sliding_windows`); target position p
is predicted from the logits at p - 1 and its kNN distribution is targets row p - 1.

With beta = 0 and no targets the same loop is plain causal-LM fine-tuning on a corpus (the DAPT and
LoRA baselines); pass `peft_config` to train a LoRA adapter instead of the full model.

Runs under `accelerate launch` (data-parallel; each process takes its share of every step's
windows). Checkpoints are safetensors (model, optimizer tensors, RNG states) plus JSON (step,
optimizer/scheduler scalars); no pickle. A rerun with the same settings resumes from the latest.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memdec.core.devices import Dist
from memdec.core.errors import first_line
from memdec.core.formats import check_output_dir, commit_partial, open_partial, read_json, write_json
from memdec.core.models import MEMDEC_JSON, check_context, max_positions
from memdec.inference.mixing import align_vocab, tokenizer_fingerprint
from memdec.pipeline.data import (
    CorpusSpec,
    Window,
    check_min_tokens,
    corpus_tokens,
    default_window,
    sliding_windows,
    window_batch,
)

SETTINGS_JSON = "train_settings.json"
CHECKPOINTS = "checkpoints"


# ---------------------------------------------------------------------------------------------- loss


LSE_BLOCK = 1 << 26  # logits per block of the log-partition (256 MiB in float32)


class _LogSumExp(torch.autograd.Function):
    """Row log-partition of [N, V] logits, computed in float32 (float64 for float64 input) in blocks of
    rows: no float32 copy of the whole matrix is made or kept; the backward recomputes each block's
    softmax and writes the gradient in the logits' dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = torch.empty(x.shape[0], dtype=dt, device=x.device)
        step = ctx.step = max(1, LSE_BLOCK // max(1, x.shape[1]))
        for a in range(0, x.shape[0], step):
            out[a : a + step] = torch.logsumexp(x[a : a + step].to(dt), dim=-1)
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        x, out = ctx.saved_tensors
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        for a in range(0, x.shape[0], ctx.step):
            e = (x[a : a + ctx.step].to(out.dtype) - out[a : a + ctx.step, None]).exp_()
            grad[a : a + ctx.step] = e.mul_(g[a : a + ctx.step, None])
        return grad


def _loss_terms(pred: torch.Tensor, labels: torch.Tensor, knn_ids: torch.Tensor | None,
                knn_probs: torch.Tensor | None, beta: float):
    """Per-position (loss, ce, kl or None) tensors from the scored positions' logits `pred` [N, V]."""
    lse = _LogSumExp.apply(pred)  # log-partition; log q_j = logit_j - lse
    ce = lse - pred.gather(1, labels[:, None]).squeeze(1).to(lse.dtype)  # CE of each position
    if beta <= 0.0:
        return ce, ce, None
    p = knn_probs.to(lse.dtype)
    log_q = pred.gather(1, knn_ids.long()).to(lse.dtype) - lse[:, None]
    log_p = torch.where(p > 0, p, torch.ones_like(p)).log()
    kl = (p * (log_p - log_q)).sum(-1)
    return beta * kl + (1.0 - beta) * ce, ce, kl


def _check_knn(beta: float, knn_ids, knn_probs, n: int) -> None:
    if beta > 0.0:
        if knn_ids is None or knn_probs is None:
            raise ValueError("memdec_loss: beta > 0 needs kNN targets (knn_ids, knn_probs)")
        if knn_ids.shape[0] != n:
            raise ValueError(f"memdec_loss: {knn_ids.shape[0]} kNN target rows for {n} scored positions")


def memdec_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    score_mask: torch.Tensor,
    knn_ids: torch.Tensor | None = None,
    knn_probs: torch.Tensor | None = None,
    beta: float = 0.5,
    vocab_size: int | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """beta * KL(p_knn || p_model) + (1 - beta) * CE, averaged over the scored positions.

    logits: [B, L, V] model outputs; input_ids / score_mask: [B, L] (score_mask[b, j] marks input
    position j as a target, predicted from logits[b, j - 1]). knn_ids / knn_probs: [N, S], one row
    per scored position in row-major order, zero-probability padding past each row's support.
    `vocab_size` (the tokenizer's length) cuts padded embedding rows off the softmax.
    `reduction` "mean" or "sum" over positions. Returns (loss, {"ce": mean, "kl": mean, "positions": N}).
    The log-partition is computed in float32 (float64 for float64 logits) without a float32 copy of the logits.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if vocab_size is not None:
        logits = align_vocab(logits, vocab_size)
    sel = score_mask[:, 1:]
    pred = logits[:, :-1][sel]  # [N, V]
    labels = input_ids[:, 1:][sel]  # [N]
    n = pred.shape[0]
    if n == 0:
        raise ValueError("memdec_loss: no scored positions in the batch")
    _check_knn(beta, knn_ids, knn_probs, n)
    per_pos, ce, kl = _loss_terms(pred, labels, knn_ids, knn_probs, beta)
    stats = {"ce": float(ce.detach().mean()), "positions": n}
    if kl is not None:
        stats["kl"] = float(kl.detach().mean())
    loss = per_pos.sum() if reduction == "sum" else per_pos.mean()
    return loss, stats


def _fused_terms(flat: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, knn_ids, knn_probs, beta: float):
    """(loss, ce, kl) sums in float32 as memdec_loss computes them; compiled on a GPU so that the float32
    logits are never written out (the upcast, log-partition and gathers fuse into a few passes)."""
    pred = flat.index_select(0, rows).float()
    lse = torch.logsumexp(pred, dim=-1)
    ce = lse - pred.gather(1, labels[:, None]).squeeze(1)
    if knn_ids is None:
        return ce.sum(), ce.sum(), torch.zeros_like(lse[0])
    p = knn_probs.float()
    log_q = pred.gather(1, knn_ids.long()) - lse[:, None]
    log_p = torch.where(p > 0, p, torch.ones_like(p)).log()
    kl = (p * (log_p - log_q)).sum(-1)
    return (beta * kl + (1.0 - beta) * ce).sum(), ce.sum(), kl.sum()


_COMPILED: dict[str, Any] = {}


def _step_loss(logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, knn_ids, knn_probs,
               beta: float, vocab_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """memdec_loss(..., reduction="sum") for the training loop, with no host sync: `rows` [N] are the
    flat [B * L] indices of the logits that predict the scored positions (row-major), `labels` their
    targets. Returns (loss sum, detached [loss, ce, kl] sums in float64)."""
    flat = logits.reshape(-1, logits.shape[-1])
    if vocab_size is not None:
        flat = align_vocab(flat, vocab_size)
    if flat.is_cuda and os.environ.get("MEMDEC_TRAIN_LOSS", "compiled") == "compiled" and "broken" not in _COMPILED:
        from memdec.core.compile_cache import use_compile_cache

        use_compile_cache()
        fn = _COMPILED.get("fn") or _COMPILED.setdefault("fn", torch.compile(_fused_terms))
        try:
            loss, ce_sum, kl_sum = fn(flat, rows, labels, knn_ids if beta > 0 else None, knn_probs, beta)
            return loss, torch.stack([loss.detach(), ce_sum.detach(), kl_sum.detach()]).double()
        except Exception as e:  # no compiler: the blockwise path computes the same sums
            _COMPILED["broken"] = first_line(e, typed=True, limit=200)
    pred = flat.index_select(0, rows)
    per_pos, ce, kl = _loss_terms(pred, labels, knn_ids, knn_probs, beta)
    loss = per_pos.sum()
    zero = torch.zeros((), dtype=ce.dtype, device=ce.device)
    sums = torch.stack([loss.detach(), ce.detach().sum(), kl.detach().sum() if kl is not None else zero]).double()
    return loss, sums


# ------------------------------------------------------------------------------------------ batches


def knn_batch(targets, windows: Sequence[Window], compact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (ids int64, probs float32) [N, max_support] for the scored positions of `windows`.

    Position p's row is targets row p - 1; rows come in the order memdec_loss flattens positions.
    `compact`: ids int32 and probs float16 (the stored types: a third of the bytes to copy, no rounding).
    """
    lens, ids, probs = [], [], []
    for w in windows:
        offsets, i, p = targets.rows(w.score_start - 1, w.end - 1)
        offsets = np.asarray(offsets, dtype=np.int64)
        offsets = offsets - offsets[0]
        lens.append(np.diff(offsets))
        ids.append(np.asarray(i)[: offsets[-1]])
        probs.append(np.asarray(p)[: offsets[-1]])
    lens = np.concatenate(lens)
    width = max(int(lens.max()), 1)
    mask = np.arange(width)[None, :] < lens[:, None]
    out_ids = np.zeros((len(lens), width), dtype=np.int32 if compact else np.int64)
    out_probs = np.zeros((len(lens), width), dtype=np.float16 if compact else np.float32)
    out_ids[mask] = np.concatenate(ids)
    out_probs[mask] = np.concatenate(probs)
    return torch.from_numpy(out_ids), torch.from_numpy(out_probs)


def _batches(n_windows: int, batch: int, seed: int, epoch: int, shuffle: bool) -> list[list[int]]:
    """The window indices of each global batch of one epoch (a fixed order per seed and epoch)."""
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n_windows, generator=g).tolist()
    else:
        order = list(range(n_windows))
    return [order[i : i + batch] for i in range(0, n_windows, batch)]


# ------------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, accelerator, extra: dict) -> None:
    """Write checkpoint `step` (model, optimizer, scheduler, RNG) to folder/step_NNNNNNN atomically."""
    from safetensors.torch import save_file, save_model

    final = folder / f"step_{step:07d}"
    tmp = folder / f"step_{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, str(tmp / f"rng_{rank}.safetensors"))
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"))
        state = optimizer.state_dict()
        tensors, scalars = {}, {}
        for idx, st in state["state"].items():
            for name, value in st.items():
                if torch.is_tensor(value):
                    tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{idx}.{name}"] = value
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "state.json", {
            "step": step,
            "optimizer_scalars": scalars,
            "param_groups": state["param_groups"],
            "scheduler": scheduler.state_dict(),  # LambdaLR: plain numbers (its lambdas are closures: None)
            **extra,
        })
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, final)
        for old in sorted(folder.glob("step_???????"))[:-2]:  # keep the two latest
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under `folder`, or None."""
    found = sorted(p for p in Path(folder).glob("step_???????") if (p / "state.json").exists())
    return found[-1] if found else None


def _load_checkpoint(ckpt: Path, model, optimizer, scheduler, accelerator) -> int:
    from safetensors.torch import load_file, load_model

    load_model(accelerator.unwrap_model(model), str(ckpt / "model.safetensors"))
    meta = read_json(ckpt / "state.json")
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["optimizer_scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(meta["scheduler"])
    rng_file = ckpt / f"rng_{accelerator.process_index}.safetensors"
    if rng_file.exists():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return int(meta["step"])


# ------------------------------------------------------------------------------------------- checks


def _check_model(model, tok, init: str, window: int, vocab_from: int | None, what: str) -> None:
    head = model.get_output_embeddings()
    n_emb = head.weight.shape[0] if head is not None else None
    if n_emb is not None and n_emb < len(tok):
        raise ValueError(f"init model {init}: output layer has {n_emb} rows, fewer than its tokenizer's {len(tok)} tokens")
    if vocab_from is not None and n_emb is not None and n_emb < vocab_from:
        raise ValueError(f"init model {init}: output layer has {n_emb} rows but {what} holds token ids up to {vocab_from - 1}")
    check_context(model, window, f"init model {init}")


def _open_targets(targets: str | os.PathLike, ds) -> Any:
    """Open a targets folder and check it was computed from datastore `ds` (one-line errors)."""
    from memdec.pipeline.targets import Targets

    t = Targets.open(targets)
    t.check_datastore(ds)
    return t


def find_targets(datastore: str | os.PathLike) -> Path:
    """The one complete kNN targets folder of `datastore`, or a one-line error.

    Looked for inside it (DATASTORE/targets-k*-t*, where `memdec targets` and `memdec pipeline` write
    them) and, for pipeline outputs of memdec <= 0.1, in the sibling folder DATASTORE/../targets.
    """
    from memdec.core.formats import is_complete, read_manifest

    found = sorted(p for p in Path(datastore).glob("targets-*") if p.is_dir() and is_complete(p, "targets"))
    sibling = Path(datastore).parent / "targets"
    if is_complete(sibling, "targets") and is_complete(datastore, "datastore"):
        of = read_manifest(sibling, "targets").get("datastore", {}).get("created")
        if of is not None and of == read_manifest(datastore, "datastore").get("created"):
            found.append(sibling)
    if not found:
        raise FileNotFoundError(f"datastore {datastore}: no kNN targets inside it; run `memdec targets "
                                f"--datastore {datastore}` first or pass targets")
    if len(found) > 1:
        raise ValueError(f"datastore {datastore}: several kNN targets ({', '.join(p.name for p in found)}); "
                         "choose one with targets / --targets")
    return found[0]


# ------------------------------------------------------------------------------------------- output


def is_finished_model(out: str | os.PathLike) -> bool:
    """True if `out` is a folder holding a model `train` finished: its memdec.json is there (train writes
    it into OUT.partial last, just before moving the model into OUT)."""
    return (Path(out) / MEMDEC_JSON).is_file()


def check_out(out: str | os.PathLike, overwrite: bool = False) -> None:
    """One-line error, before any work, for an output folder `train` must not write into.

    OUT may be missing or an empty folder. A finished model (`is_finished_model`) or a folder with
    other files is refused unless `overwrite`; a file, or a place that cannot be written, always is.
    """
    out = Path(out)
    check_output_dir(out, "output folder")
    if overwrite or not out.is_dir():
        return
    if is_finished_model(out):
        raise FileExistsError(f"{out}: a trained model is already there (pass overwrite / --overwrite to replace it)")
    if any(out.iterdir()):
        raise FileExistsError(f"{out}: a folder with other files, not a trained model (no {MEMDEC_JSON}); pass "
                              "overwrite / --overwrite to write the model into it (its other files are kept)")


# ------------------------------------------------------------------------------------------- train


def train(
    init: str | os.PathLike,
    out: str | os.PathLike,
    datastore: str | os.PathLike | None = None,
    targets: str | os.PathLike | None = None,
    beta: float = 0.5,
    corpus: CorpusSpec | str | dict | None = None,
    texts: Sequence[str] | None = None,
    window: int | None = None,
    stride: int | None = None,
    steps: int | None = None,
    epochs: float = 1.0,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 5e-4,
    weight_decay: float = 0.01,
    warmup: float = 0.05,
    max_grad_norm: float = 1.0,
    save_every: int = 500,
    seed: int = 0,
    lmbda: float = 0.5,
    mixed_precision: str = "auto",
    peft_config=None,
    shuffle: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
    extra_files: dict[str, dict] | None = None,
) -> Path:
    """Train `init` (an HF causal LM dir or hub id) and save it to `out`; returns `out`.

    Memory Decoder: give `datastore` and `targets` (kNN targets folder; default: `find_targets`, the one
    complete DATASTORE/targets-* folder), beta in (0, 1].
    Plain fine-tuning (DAPT/LoRA baselines): beta = 0 and `datastore`, `corpus` or `texts`.
    `steps` optimizer steps (default: `epochs` passes over the windows), each of
    `batch_size` windows per process x `grad_accum`. `warmup` is a fraction of steps (< 1) or a count.
    Checkpoints every `save_every` steps in OUT.partial; a rerun resumes from the latest one.
    `callback(step, stats)` is called after every optimizer step. `extra_files` (name -> JSON content)
    are written into the model folder with it (the baselines' baseline.json).

    OUT must be missing, an empty folder, or (with `overwrite`) a finished model or a folder with other
    files: only the files memdec writes are replaced there, others are kept (`check_out`, memdec.core.formats.move_into).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from memdec.core.models import load_causal_lm, load_tokenizer, resolve_model_path

    out = Path(out)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    sources = [s is not None for s in (datastore, corpus, texts)]
    if sum(sources) != 1:
        raise ValueError("train: give exactly one of datastore, corpus or texts")
    if beta > 0 and datastore is None:
        raise ValueError(f"train: beta={beta} needs a datastore and its kNN targets (or use beta=0)")
    if datastore is not None:
        from memdec.pipeline.datastore import Datastore

        Datastore.open(datastore)  # a missing or interrupted datastore is named as such, before its targets
    if beta > 0 and targets is None:
        targets = find_targets(datastore)
    if batch_size < 1 or grad_accum < 1 or save_every < 1:
        raise ValueError("train: batch_size, grad_accum and save_every must be >= 1")
    check_out(out, overwrite)

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    init = resolve_model_path(str(init), "init model")
    tok = load_tokenizer(init, "init model")
    model = load_causal_lm(init, "init model", dtype=None)

    # ---- the token stream, its windows and the kNN targets
    ds_manifest: dict[str, Any] | None = None
    knn = None
    if datastore is not None:
        from memdec.pipeline.datastore import Datastore

        ds = Datastore.open(datastore)
        ds.check_tokenizer(tok)
        ds_manifest = dict(ds.manifest)
        tokens = np.asarray(ds.tokens)
        window = int(window or default_window(ds_manifest["window"], max_positions(model)))
        source = f"datastore {datastore}"
        if beta > 0:
            knn = _open_targets(targets, ds)
    else:
        tokens, _, source = corpus_tokens(corpus if corpus is not None else texts, tok,
                                          progress=progress and accelerator.is_main_process)
        window = int(window or default_window(max_positions(model)))
    check_min_tokens(len(tokens), window, source)
    _check_model(model, tok, str(init), window, int(tokens.max()) + 1 if len(tokens) else None, source)
    windows = sliding_windows(len(tokens), window, stride or window)
    tokens_t = torch.from_numpy(np.array(tokens, dtype=np.int32))  # a copy in memory; int64 per batch

    world = accelerator.num_processes
    global_batch = batch_size * world
    per_epoch = math.ceil(len(windows) / global_batch)  # global batches per epoch
    if steps is None:
        steps = max(1, math.ceil(epochs * per_epoch / grad_accum))
    warmup_steps = int(warmup * steps) if warmup < 1 else int(warmup)

    settings = {
        "init": str(init), "beta": beta, "window": window, "stride": stride or window, "steps": steps,
        "batch_size": batch_size, "grad_accum": grad_accum, "processes": world, "lr": lr,
        "weight_decay": weight_decay, "warmup_steps": warmup_steps, "max_grad_norm": max_grad_norm,
        "seed": seed, "mixed_precision": mixed_precision, "shuffle": shuffle,
        "peft": peft_config is not None, "n_tokens": int(len(tokens)), "n_windows": len(windows),
    }
    dist = Dist(accelerator.process_index, accelerator.num_processes, None, accelerator.wait_for_everyone)
    # a leftover with other settings is refused (by every process, none is left waiting), with overwrite restarted
    work = open_partial(out, settings, overwrite, dist, plan_name=SETTINGS_JSON, overwrite_resumes=True,
                        replace_final=False, mismatch="{tmp}: holds an unfinished run with other settings ({diff}); "
                        "rerun with the same settings to resume, or delete it")

    # ---- model, optimizer, schedule
    torch.manual_seed(seed)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    on_gpu = accelerator.device.type == "cuda"
    optimizer = torch.optim.AdamW(  # fused: one kernel for all parameters on a GPU
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr,
        **({"fused": True} if on_gpu else {}),
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    if on_gpu and os.environ.get("MEMDEC_TRAIN_COMPILE", "1") != "0":
        from memdec.core.compile_cache import use_compile_cache

        use_compile_cache()
        accelerator.unwrap_model(model).compile()  # in place: parameter names and checkpoints unchanged

    step = 0
    ckpt = latest_checkpoint(work / CHECKPOINTS)
    if ckpt is not None:
        step = _load_checkpoint(ckpt, model, optimizer, scheduler, accelerator)
        accelerator.print(f"train: resuming from {ckpt} (step {step}/{steps})")

    vocab_size = len(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    bar = tqdm(total=steps, initial=step, desc="train", unit="step", disable=not (progress and accelerator.is_main_process))
    schedule: dict[int, list[list[int]]] = {}

    def global_batch_at(g: int) -> list[int]:
        """Window indices of global micro-batch `g` (all processes together)."""
        nonlocal schedule
        epoch, b = divmod(g, per_epoch)
        sched = schedule  # read once: the batch-loading thread calls this too
        if epoch not in sched:
            sched = schedule = {epoch: _batches(len(windows), global_batch, seed, epoch, shuffle)}
        return sched[epoch][b]

    # host-side batches (token windows, kNN rows, the flat indices of the scored logits) are built one
    # micro-batch ahead in a worker thread, pinned, and copied without blocking: the device never waits
    cuda = on_gpu
    rank = accelerator.process_index

    def host_batch(g: int) -> dict[str, Any]:
        mine = global_batch_at(g)[rank::world] or global_batch_at(g)[:1]
        ws = [windows[i] for i in mine]
        ids, attn, score = window_batch(tokens_t, ws, pad_id)
        sel = score[:, 1:]
        b_idx, j_idx = sel.nonzero(as_tuple=True)
        out = {"ids": ids, "rows": b_idx * ids.shape[1] + j_idx, "labels": ids[:, 1:][sel]}
        if not bool(attn.all()):  # no mask when every window is whole: the fused causal attention kernel
            out["attn"] = attn
        if knn is not None:
            out["knn_ids"], out["knn_probs"] = knn_batch(knn, ws, compact=True)
        return {key: v.pin_memory() for key, v in out.items()} if cuda else out

    def device_batch(h: dict[str, Any]) -> dict[str, Any]:
        return {key: v.to(accelerator.device, non_blocking=True) for key, v in h.items()}

    from concurrent.futures import ThreadPoolExecutor

    loader = ThreadPoolExecutor(1, thread_name_prefix="memdec-batches")
    total_micro = steps * grad_accum
    pending = loader.submit(host_batch, step * grad_accum) if step < steps else None
    log_every = 10  # host syncs (loss for the progress bar) only every log_every steps
    ema_t = None
    ema = None
    while step < steps:
        # the step's loss is the mean over all its target positions (every micro-batch and process), so
        # N processes x batch b give the same gradient as one process with batch N*b, up to float rounding
        batches = [global_batch_at(step * grad_accum + micro) for micro in range(grad_accum)]
        n_step = sum(windows[i].n_scored for batch in batches for i in batch)
        sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
        for micro, batch in enumerate(batches):
            g = step * grad_accum + micro
            weight = world / n_step if batch[rank::world] else 0.0  # fewer windows than processes: weight 0
            h = pending.result()
            pending = loader.submit(host_batch, g + 1) if g + 1 < total_micro else None
            d = device_batch(h)
            sync = micro == grad_accum - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                with accelerator.autocast():
                    logits = model(input_ids=d["ids"], attention_mask=d.get("attn")).logits
                loss, st = _step_loss(logits, d["rows"], d["labels"], d.get("knn_ids"), d.get("knn_probs"),
                                      beta, vocab_size)
                accelerator.backward(loss * weight)
            if weight:
                sums += st
        if world > 1:
            sums = accelerator.reduce(sums, "sum")
        sums = sums / n_step
        if max_grad_norm and max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        ema_t = sums[0] if ema_t is None else 0.9 * ema_t + 0.1 * sums[0]
        bar.update(1)
        saving = step % save_every == 0 and step < steps
        if callback is not None or saving or step % log_every == 0 or step == steps:
            ema = float(ema_t)
            bar.set_postfix(loss=f"{ema:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if saving:
            _save_checkpoint(work / CHECKPOINTS, step, model, optimizer, scheduler, accelerator, {"loss": ema})
        if callback is not None:
            stats_acc = dict(zip(("loss", "ce", "kl"), sums.tolist(), strict=True))
            callback(step, dict(stats_acc, step=step, lr=scheduler.get_last_lr()[0]))
    loader.shutdown(wait=True)
    bar.close()

    # ---- the output folder: HF model + tokenizer + memdec.json, renamed into place when whole
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        final.save_pretrained(str(work))
        if peft_config is not None:
            (work / "README.md").unlink(missing_ok=True)  # peft's blank model card: OUT may hold a README of its own
        tok.save_pretrained(str(work))
        meta = {
            "format_version": 1,
            "tokenizer_fingerprint": tokenizer_fingerprint(tok),
            "datastore": ({"path": str(datastore), "targets": str(targets) if targets else None, **ds_manifest}
                          if ds_manifest is not None else None),
            "training": {**settings, "final_loss": ema},
            "lmbda": lmbda,
        }
        shutil.rmtree(work / CHECKPOINTS, ignore_errors=True)
        (work / SETTINGS_JSON).unlink(missing_ok=True)
        for name, content in (extra_files or {}).items():
            write_json(work / name, content)
        meta["files"] = sorted({*os.listdir(work), MEMDEC_JSON})
        write_json(work / MEMDEC_JSON, json.loads(json.dumps(meta, default=str)))
        commit_partial(work, out, plan_name=SETTINGS_JSON, merge=True)
    accelerator.wait_for_everyone()
    return out
