"""Speed of the training pipeline's stages: datastore build, exact-search kNN targets, training steps.

    python benchmarks/bench_pipeline.py --device cuda --out runs/bench-pipeline           # one GPU
    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py --device cpu --small --out /tmp/bench   # seconds

(a) datastore build throughput (`memdec.pipeline.datastore.build_datastore`, tokens/s) against a plain forward
    pass (full model with its LM head, logits left on the device) of the same model over the same
    windows and batches. The model is GPT-2-small-shaped (12 x 768, vocabulary 50257) with random
    weights built from a config (no download), in bf16 by default; the corpus is random words of a
    word-level tokenizer with the model's vocabulary. Tokenization is timed apart and excluded.
(b) exact-search kNN targets per second: `memdec.pipeline.search.TorchIndex` over >= 10M random float16 keys
    of dimension 768 kept on the GPU, k = 1024 (+1 for the query's own row), followed by
    `memdec.pipeline.targets.knn_distribution` (self removal, softmax, scatter by token, float16 CSR) --
    everything `memdec targets` does per query except reading keys from and writing rows to disk.
(c) training tokens/s of one optimizer step (forward, sparse KL + CE via `memdec.pipeline.train.memdec_loss`,
    backward, AdamW) on a GPT-2-small-shaped model with random kNN targets of `--support` entries
    per position; skipped when memdec.pipeline.train is not there. Data loading is not included.
(d) IVF-PQ against exact search (`--ivfpq NxD`, off by default; needs faiss): clustered float16 keys
    (a low-dimensional Gaussian mixture, see `clustered_keys`) with Zipf-distributed value tokens written
    as a datastore, `memdec.pipeline.search.build_index(backend="faiss-ivfpq")` (train + add seconds),
    then for each `--ivfpq-nprobe`: queries/s of `FaissIndex.search` for k + 1 neighbours with and
    without `refine` (exact distances of the returned ids from the stored keys; `--ivfpq-rerank` adds
    refine over R (k + 1) candidates), recall of the exact torch search's k neighbours (own row dropped),
    and the mean total-variation distance between the kNN target distributions
    (`memdec.pipeline.targets.knn_distribution`, same temperature) of the two searches.
    faiss-gpu is used where installed and --device is cuda, else CPU faiss on the host's cores.

Needs only torch, transformers and numpy (faiss for (d) only; no network). Runs from a plain checkout.
Writes bench_pipeline.json and bench_pipeline.md (with the device name and date) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memdec.pipeline.data import sliding_windows, tokenize, window_batch  # noqa: E402
from memdec.pipeline.targets import drop_self as without_self  # noqa: E402  (the targets' own-row rule)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over w0 .. w{vocab_size-2} plus <|endoftext|> (EOS = pad)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i + 1 for i in range(vocab_size - 1)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos, bos_token=eos, unk_token=eos)


def random_docs(n_tokens: int, vocab_size: int, doc_len: int = 2000, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    ids = np.minimum(rng.zipf(1.3, size=n_tokens), vocab_size - 2)
    return [" ".join(f"w{i}" for i in ids[s : s + doc_len]) for s in range(0, n_tokens, doc_len)]


def gpt2(shape: dict, device: torch.device, dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=shape["vocab"], n_positions=shape["window"], n_embd=shape["dim"],
                     n_layer=shape["layers"], n_head=shape["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).to(device=device, dtype=dtype).eval()


def qwen05(shape: dict, device: torch.device):
    """A Qwen2.5-0.5B-shaped model (24 x 896, 14 heads / 2 KV heads, MLP 4864, tied 151936 vocabulary), random."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["dim"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=2, intermediate_size=4864,
                      max_position_embeddings=shape["window"], tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(device=device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_datastore(args, shape: dict, device: torch.device, dtype: torch.dtype, work: Path) -> dict:
    from memdec.pipeline.datastore import build_datastore

    tok = word_tokenizer(shape["vocab"])
    docs = random_docs(args.tokens, shape["vocab"])
    t0 = time.perf_counter()
    tokens = tokenize(docs, tok, progress=False)
    t_tok = time.perf_counter() - t0
    model = gpt2(shape, device, dtype)
    windows = sliding_windows(len(tokens), shape["window"])
    batches = [windows[i : i + args.batch_size] for i in range(0, len(windows), args.batch_size)]

    def forward(batch):
        ids, attn, _ = window_batch(tokens, batch)
        return model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).logits

    with torch.inference_mode():
        for batch in batches[:2]:  # warm-up
            forward(batch)
        sync(device)
        t0 = time.perf_counter()
        for batch in batches:
            forward(batch)
        sync(device)
        t_fwd = time.perf_counter() - t0
    n_in = sum(w.end - w.start for w in windows)

    build_datastore(model, docs[:2], work / "warmup", window=shape["window"], batch_size=args.batch_size,
                    dtype=dtype, device=device, tokenizer=tok, progress=False)
    t0 = time.perf_counter()
    build_datastore(model, docs, work / "ds", window=shape["window"], batch_size=args.batch_size, dtype=dtype,
                    device=device, tokenizer=tok, progress=False)
    sync(device)
    t_build = time.perf_counter() - t0 - t_tok  # build_datastore tokenizes the corpus again: not counted
    fwd_tps, build_tps = n_in / t_fwd, n_in / t_build
    return {"tokens": int(len(tokens)), "window": shape["window"], "batch_size": args.batch_size,
            "dtype": str(dtype).removeprefix("torch."), "tokenize_s": round(t_tok, 3),
            "forward_s": round(t_fwd, 3), "build_s": round(t_build, 3),
            "forward_tokens_per_s": round(fwd_tps), "build_tokens_per_s": round(build_tps),
            "build_vs_forward": round(build_tps / fwd_tps, 3)}


def matmul_rate(device: torch.device, n: int = 8192, reps: int = 20) -> dict:
    """Measured dense matmul rate (FLOP/s) of an n x n x n product in bfloat16 and float16: the floors' unit."""
    out = {}
    for name, dt in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        if device.type != "cuda":
            dt, n, reps = torch.float32, 512, 3
        a = torch.randn((n, n), device=device).to(dt)
        b = torch.randn((n, n), device=device).to(dt)
        for _ in range(3):
            a @ b
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        out[name] = 2.0 * n**3 * reps / (time.perf_counter() - t0)
    return out


def random_keys(n: int, dim: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    keys = torch.empty((n, dim), dtype=torch.float16, device=device)
    for s in range(0, n, 1 << 20):
        e = min(s + (1 << 20), n)
        keys[s:e] = torch.randn((e - s, dim), generator=gen, device=device).to(torch.float16)
    return keys


def float64_recall(keys: torch.Tensor, q_rows: torch.Tensor, ids: torch.Tensor, k: int) -> float:
    """Share of the returned ids whose float64 distance is within the float64 k nearest (ties counted)."""
    q = keys[q_rows].double()
    best = None
    for s in range(0, len(keys), 1 << 19):
        c = keys[s : s + (1 << 19)].double()
        d = (q**2).sum(1)[:, None] - 2 * q @ c.T + (c**2).sum(1)[None, :]
        best = d if best is None else torch.cat([best, d], 1)
        best = best.topk(min(k, best.shape[1]), dim=1, largest=False).values
    kth = best.max(1).values
    got = ((keys[ids.clamp_min(0)].double() - q[:, None, :]) ** 2).sum(-1)
    return float((got <= kth[:, None] * (1 + 1e-9)).double().mean())


def bench_targets(args, device: torch.device, n: int, dim: int, rate: float, group: int | None = None,
                  tile_bytes: int | None = None, distribution: bool = True) -> dict:
    """Exact search (+ kNN distribution) of `args.queries` stored keys over n random float16 keys on the device."""
    from memdec.pipeline.search import TorchIndex
    from memdec.pipeline.targets import knn_distribution

    k = args.k
    keys = random_keys(n, dim, device)
    gen = torch.Generator(device=device).manual_seed(1)
    values = torch.randint(0, 50257, (n,), generator=gen, device=device, dtype=torch.int32)
    sync(device)
    t0 = time.perf_counter()
    index = TorchIndex(keys, device=device, query_batch=args.query_batch, group=group, tile_bytes=tile_bytes)
    sync(device)
    t_setup = time.perf_counter() - t0
    qb = index.query_batch
    rows = torch.randperm(n, generator=gen, device=device)[: args.queries + qb]
    index.search(keys[rows[:qb]], k + 1)  # warm-up (compiles the re-ranking kernel)
    sync(device)
    if args.profile and device.type == "cuda":
        profile(lambda: index.search(keys[rows[:qb]], k + 1), Path(args.out), f"search {n} x {dim} g={index.group}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for s in range(qb, qb + args.queries, qb):
        d, i = index.search(keys[rows[s : s + qb]], k + 1)
    sync(device)
    t_search = time.perf_counter() - t0
    out = {"keys": n, "dim": dim, "k": k, "group": index.group, "tile_keys": index.chunk_rows, "queries": args.queries,
           "query_batch": qb, "index_setup_s": round(t_setup, 3), "search_s": round(t_search, 3),
           "search_queries_per_s": round(args.queries / t_search, 1)}
    floor = 2.0 * args.queries * n * dim / rate
    out.update(floor_s=round(floor, 4), search_vs_floor=round(floor / t_search, 3))
    out["recall_vs_float64"] = round(float64_recall(keys, rows[s : s + 64], i[:64], k + 1), 5)
    from memdec.pipeline import search as search_mod

    out["rerank"] = "eager (" + search_mod._RERANK["broken"] + ")" if "broken" in search_mod._RERANK else "compiled"
    if device.type == "cuda":
        out["peak_device_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    if distribution:
        def step(ids):
            d, i = index.search(keys[ids], k + 1)
            return knn_distribution(d, i, ids, values, k, args.temperature)

        sync(device)
        t0 = time.perf_counter()
        nnz = 0
        for s in range(qb, qb + args.queries, qb):
            counts, _, _ = step(rows[s : s + qb])
            nnz += int(counts.sum())
        sync(device)
        t = time.perf_counter() - t0
        qps = args.queries / t
        out.update(queries_per_s=round(qps, 1), targets_vs_floor=round(floor / t, 3),
                   mean_support=round(nnz / args.queries, 1), full_datastore_hours=round(n / qps / 3600, 4))
    return out


class PeakRSS:
    """Peak resident set size of this process (sampled every 10 ms) while the block runs."""

    def __enter__(self):
        import threading

        self.peak, self.start, self._stop = 0, self.rss(), threading.Event()

        def sample():
            while not self._stop.wait(0.01):
                self.peak = max(self.peak, self.rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @staticmethod
    def rss() -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * 4096
        except OSError:
            return 0


def write_random_datastore(keys: torch.Tensor, folder: Path, shard_rows: int = 1 << 21,
                           values: np.ndarray | None = None) -> Path:
    """A datastore folder of the given keys (the given or random values, random tokens), shard by shard."""
    from memdec.core.formats import write_manifest

    folder.mkdir(parents=True)
    n, dim = keys.shape
    rng = np.random.default_rng(0)
    shards = []
    for j, s in enumerate(range(0, n, shard_rows)):
        e = min(s + shard_rows, n)
        np.save(folder / f"keys_{j:05d}.npy", keys[s:e].cpu().numpy())
        v = rng.integers(0, 50257, e - s, dtype=np.int32) if values is None else values[s:e].astype(np.int32)
        np.save(folder / f"values_{j:05d}.npy", v)
        shards.append({"keys": f"keys_{j:05d}.npy", "values": f"values_{j:05d}.npy", "rows": e - s})
    np.save(folder / "tokens.npy", rng.integers(0, 50257, n + 1, dtype=np.int32))
    write_manifest(folder, "datastore", dim=dim, n_tokens=n + 1, n_entries=n, shards=shards, window=1024,
                   tokenizer_fingerprint="sha256:random", model="random keys")
    return folder


def bench_stream(args, device: torch.device, n: int, dim: int, rate: float, source: str, work: Path) -> dict:
    """Exact search with the keys kept off the device (capped memory): streamed from a host tensor or
    read from a datastore's shard files."""
    from memdec.pipeline.datastore import Datastore
    from memdec.pipeline.search import TorchIndex

    k = args.k
    dev_keys = random_keys(n, dim, device, seed=2)
    gen = torch.Generator(device=device).manual_seed(3)
    qb = args.stream_query_batch
    rows = torch.randperm(n, generator=gen, device=device)[: qb * 2]
    queries = dev_keys[rows].clone()
    check = dev_keys if source == "host" else None
    t0 = time.perf_counter()
    if source == "host":
        keys: object = dev_keys.cpu()
    else:
        keys = Datastore.open(write_random_datastore(dev_keys, work / f"ds-{n}"))
    t_prepare = time.perf_counter() - t0
    if check is None:
        del dev_keys
    torch.cuda.empty_cache()
    cap = args.stream_cap
    index = TorchIndex(keys, device=device, max_memory=cap, query_batch=qb)
    assert not index.resident
    index.search(queries[:qb], k + 1)  # warm-up, and the key norms (one pass)
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        d, i = index.search(queries[qb:], k + 1)
        sync(device)
        t = time.perf_counter() - t0
    key_gb = n * dim * 2 / 1e9
    floor = 2.0 * qb * n * dim / rate
    out = {"source": source, "keys": n, "dim": dim, "k": k, "key_gb": round(key_gb, 2), "cap_gb": round(cap / 1e9, 2),
           "query_batch": qb, "tile_keys": index.chunk_rows, "prepare_s": round(t_prepare, 2), "search_s": round(t, 3),
           "queries_per_s": round(qb / t, 1), "floor_s": round(floor, 4), "search_vs_floor": round(floor / t, 3),
           "host_gb_per_s": round(2 * key_gb / t, 1),
           "peak_device_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2),
           "rss_before_gb": round(rss.start / 1e9, 2), "peak_rss_gb": round(rss.peak / 1e9, 2)}
    if check is not None:
        out["recall_vs_float64"] = round(float64_recall(check, rows[qb : qb + 64], i[:64], k + 1), 5)
        ref = TorchIndex(check, device=device, query_batch=4096).search(queries[qb : qb + 4096], k + 1)[1]
        out["same_ids_as_resident"] = round(float((ref == i[:4096]).double().mean()), 5)
    return out


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def zipf_tokens(n: int, vocab: int, s: float = 1.1, seed: int = 0) -> np.ndarray:
    """n int32 token ids in [0, vocab), drawn independently with p(i) proportional to (i + 1)^-s."""
    p = 1.0 / np.arange(1, vocab + 1, dtype=np.float64) ** s
    return np.random.default_rng(seed).choice(vocab, size=n, p=p / p.sum()).astype(np.int32)


def clustered_keys(n: int, dim: int, centres: int, device: torch.device, seed: int = 0, rank: int = 32,
                   spread: float = 0.3, noise: float = 0.1) -> torch.Tensor:
    """Float16 [n, dim] keys with structure for IVF-PQ to find (a low-dimensional Gaussian mixture).

    A key is (c + spread * z) W + noise * e: c one of `centres` centres ~ N(0, I_rank) (log-normal weights),
    z ~ N(0, I_rank), W a fixed random rank x dim map (unit variance per coordinate), e ~ N(0, I_dim).
    Neighbours are those of a rank-dimensional mixture (low intrinsic dimension, as in LM hidden states),
    not of an isotropic Gaussian in dim dimensions, where all distances concentrate.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    r = min(rank, dim)
    c = torch.randn((centres, r), generator=gen, device=device)
    w = torch.randn(centres, generator=gen, device=device, dtype=torch.float64).exp().cumsum(0)
    proj = torch.randn((r, dim), generator=gen, device=device) / math.sqrt(r)
    keys = torch.empty((n, dim), dtype=torch.float16, device=device)
    for s in range(0, n, 1 << 18):
        e = min(s + (1 << 18), n)
        u = torch.rand(e - s, generator=gen, device=device, dtype=torch.float64) * w[-1]
        latent = c[torch.searchsorted(w, u).clamp_max(centres - 1)]
        latent += spread * torch.randn((e - s, r), generator=gen, device=device)
        keys[s:e] = (latent @ proj + noise * torch.randn((e - s, dim), generator=gen, device=device)).half()
    return keys


def recall(found: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per query, the share of its valid (>= 0) `exact` ids that `found` holds too ([n, a], [n, b]; ids are
    distinct within a row; -1 in either means no neighbour)."""
    n, a = found.shape
    b = exact.shape[1]
    found, exact = found.cpu(), exact.cpu()
    f = torch.where(found >= 0, found, -1 - torch.arange(a).expand(n, a))  # distinct fillers: never equal
    e = torch.where(exact >= 0, exact, -1 - a - torch.arange(b).expand(n, b))
    s = torch.cat([f, e], 1).sort(1).values
    common = (s[:, 1:] == s[:, :-1]).sum(1)
    return common.double() / (exact >= 0).sum(1).clamp_min(1)


def csr_dense(counts: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, vocab: int) -> torch.Tensor:
    """Float64 [n, vocab] distributions from the CSR rows (counts [n], token ids, probabilities) of
    memdec.pipeline.targets.knn_distribution."""
    counts = counts.cpu()
    row = torch.repeat_interleave(torch.arange(len(counts)), counts)
    out = torch.zeros((len(counts), vocab), dtype=torch.float64)
    return out.index_put_((row, ids.cpu().long()), probs.cpu().double(), accumulate=True)


def total_variation(a: tuple, b: tuple, vocab: int) -> torch.Tensor:
    """Per row, 0.5 * sum |p_a - p_b| between two batches of CSR distributions (counts, ids, probs)."""
    return 0.5 * (csr_dense(*a, vocab) - csr_dense(*b, vocab)).abs().sum(1)


def check_ivfpq(args) -> str | None:
    """A one-line error for bad --ivfpq-* values (before any work), or None."""
    try:
        (n, dim), = shapes(args.ivfpq)
    except ValueError:
        return f"--ivfpq {args.ivfpq!r}: expected one NxD shape such as 1e7x768"
    try:
        nprobes = [int(x) for x in args.ivfpq_nprobe.split(",") if x.strip()]
    except ValueError:
        return f"--ivfpq-nprobe {args.ivfpq_nprobe!r}: expected comma-separated integers such as 8,32,128"
    nlist, m, nbits, train = args.ivfpq_nlist, args.ivfpq_m, args.ivfpq_nbits, args.ivfpq_train_rows
    try:
        import faiss  # noqa: F401
    except ImportError:
        return "--ivfpq needs faiss: pip install faiss-cpu (or faiss-gpu-cu12)"
    if dim < 1 or n < 2:
        return f"--ivfpq {args.ivfpq}: needs at least 2 keys of dimension >= 1"
    if not 1 <= args.k < n:
        return f"--k {args.k}: must be between 1 and keys - 1 ({n - 1}) for --ivfpq {args.ivfpq}"
    if m is not None and (m < 1 or dim % m):
        return f"--ivfpq-m {m}: must divide the key dimension {dim}"
    if not 1 <= nbits <= 16:
        return f"--ivfpq-nbits {nbits}: must be between 1 and 16"
    if nlist is not None and not 1 <= nlist <= n:
        return f"--ivfpq-nlist {nlist}: must be between 1 and the number of keys ({n})"
    try:
        factors = [int(x) for x in args.ivfpq_rerank.split(",") if x.strip()]
    except ValueError:
        factors = [0]
    if factors and min(factors) < 1:
        return f"--ivfpq-rerank {args.ivfpq_rerank!r}: expected comma-separated integers >= 1 such as 1,4"
    if not nprobes or min(nprobes) < 1:
        return f"--ivfpq-nprobe {args.ivfpq_nprobe!r}: needs values >= 1"
    if nlist is not None and max(nprobes) > nlist:
        return f"--ivfpq-nprobe {max(nprobes)}: more than --ivfpq-nlist {nlist} lists"
    need = max(nlist or 1, 1 << nbits)
    if min(train, n) < need:
        return (f"--ivfpq-train-rows {train}: IVF-PQ training needs at least {need} keys "
                f"(nlist and 2^nbits), {min(train, n)} available")
    if not 1 <= args.ivfpq_queries <= n or args.ivfpq_query_batch < 1:
        return f"--ivfpq-queries {args.ivfpq_queries}: must be between 1 and {n}; --ivfpq-query-batch >= 1"
    if args.ivfpq_repeats < 1:
        return f"--ivfpq-repeats {args.ivfpq_repeats}: must be >= 1"
    if not 1 <= args.ivfpq_centres <= n:
        return f"--ivfpq-centres {args.ivfpq_centres}: must be between 1 and {n}"
    return None


def bench_ivfpq(args, device: torch.device, n: int, dim: int, work: Path) -> dict:
    """memdec's faiss IVF-PQ index against its exact torch search on n clustered keys: build seconds, then per
    nprobe (with and without `refine`) queries/s, recall of the exact k neighbours and the mean total-variation
    distance between the kNN target distributions of the two searches."""
    import faiss

    from memdec.core.formats import read_manifest
    from memdec.inference.knn import neighbour_weights
    from memdec.pipeline.datastore import Datastore
    from memdec.pipeline.search import TorchIndex, build_index
    from memdec.pipeline.targets import knn_distribution

    k, qb, nq, temp, vocab = args.k, args.ivfpq_query_batch, args.ivfpq_queries, args.temperature, args.vocab
    load_start, t_start = os.getloadavg()[0], time.perf_counter()
    t0 = time.perf_counter()
    keys = clustered_keys(n, dim, args.ivfpq_centres, device)
    ds = Datastore.open(write_random_datastore(keys, work / f"ivfpq-{n}x{dim}", values=zipf_tokens(n, vocab)))
    t_data = time.perf_counter() - t0
    values = torch.from_numpy(ds.values).to(device)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(4))[:nq].to(device)
    queries = keys[rows]  # stored rows, as `memdec targets` searches them (float16, on the device)
    batches = [(s, min(s + qb, nq)) for s in range(0, nq, qb)]

    def timed(index, kk: int = k + 1) -> tuple[torch.Tensor, torch.Tensor, float]:
        """All queries' k + 1 nearest of a search for kk (>= k + 1) neighbours, and queries/s."""
        index.search(queries[:qb], kk)  # warm-up
        t = math.inf
        for _ in range(args.ivfpq_repeats):  # the fastest pass: the least disturbed by other processes
            sync(device)
            t0 = time.perf_counter()
            out = [index.search(queries[a:b], kk) for a, b in batches]
            sync(device)
            t = min(t, time.perf_counter() - t0)
        return torch.cat([o[0][:, : k + 1] for o in out]), torch.cat([o[1][:, : k + 1] for o in out]), nq / t

    def targets(d: torch.Tensor, i: torch.Tensor) -> list[tuple]:
        return [knn_distribution(d[a:b], i[a:b], rows[a:b], values, k, temp) for a, b in batches]

    exact = TorchIndex(keys if device.type == "cuda" else keys.float(), device=device)
    ed, ei, exact_qps = timed(exact)
    exact_sets, exact_targets = without_self(ei, rows), targets(ed, ei)
    weights, _ = neighbour_weights(*reversed(without_self(ei, rows, ed)), temp)  # softmax(-d / T), nearest first
    mass = {f"nearest_{j}": round(float(weights[:, :j].sum(1).median()), 4) for j in (10, 100) if j < k}
    mass[f"farthest_{k // 2}"] = round(float(weights[:, k - k // 2 :].sum(1).median()), 6)
    del exact
    threads = {"torch": torch.get_num_threads(), "faiss_omp": faiss.omp_get_max_threads(),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count()}
    out = {"keys": n, "dim": dim, "k": k, "temperature": temp, "vocab": vocab, "centres": args.ivfpq_centres,
           "key_rank": min(32, dim), "queries": nq, "query_batch": qb, "repeats": args.ivfpq_repeats,
           "data_s": round(t_data, 2), "faiss": faiss.__version__, "threads": threads, "exact_queries_per_s": round(exact_qps, 1), "exact_mass_median": mass}
    print("ivfpq: data and exact search done", out, flush=True)

    nprobes = [int(x) for x in args.ivfpq_nprobe.split(",") if x.strip()]
    t0 = time.perf_counter()
    index = build_index(ds, "faiss-ivfpq", out=work / f"index-ivfpq-{n}x{dim}", nlist=args.ivfpq_nlist,
                        m=args.ivfpq_m, nbits=args.ivfpq_nbits, nprobe=nprobes[0],
                        train_size=args.ivfpq_train_rows, device=device, progress=False)
    t_build = time.perf_counter() - t0
    params = read_manifest(index.path, "index")["params"]
    gpu = type(index.index).__name__.startswith("Gpu")
    out.update(build_s=round(t_build, 2), nlist=params["nlist"], m=params["m"], nbits=params["nbits"],
               train_rows=params["train_size"], faiss_on="gpu" if gpu else "cpu",
               code_bytes=params["m"] * params["nbits"] // 8, index_type=type(index.index).__name__)
    out["rows"] = [{"backend": "torch (exact)", "nprobe": None, "refine": None, "candidates": k + 1,
                    "queries_per_s": round(exact_qps, 1), "recall": 1.0, "mean_tv": 0.0}]
    # (refine, k_factor): memdec's search as `memdec targets` runs it, without and with refine (exact distances
    # of the k + 1 ids found), then with the index's k_factor R: R (k + 1) candidates re-ranked, the k + 1 nearest kept
    factors = sorted({int(x) for x in args.ivfpq_rerank.split(",") if x.strip()} - {1})
    variants = [(False, 1), (True, 1)] + [(True, f) for f in factors]
    print("ivfpq: built", {key: out[key] for key in ("build_s", "nlist", "m", "nbits", "faiss_on")}, flush=True)
    for p in nprobes:
        try:
            index.set_nprobe(p)
        except RuntimeError as e:  # a GPU index faiss.ParameterSpace may not know: faiss's GPU variant sets it
            if not hasattr(faiss, "GpuParameterSpace"):
                raise
            faiss.GpuParameterSpace().set_index_parameter(index.index, "nprobe", p)
            out.setdefault("notes", []).append(f"FaissIndex.set_nprobe({p}) failed "
                                               f"({str(e).strip().splitlines()[-1][:200]}); set by GpuParameterSpace")
        for refine, factor in variants:
            index.refine, index.k_factor, kk = refine, factor, min(factor * (k + 1), n)
            try:
                d, i, qps = timed(index)
            except RuntimeError as e:  # e.g. faiss-gpu's limit on k: the row says so, the others still run
                msg = str(e).strip().splitlines()[-1][:200]
                out["rows"].append({"backend": "faiss-ivfpq", "nprobe": p, "refine": refine, "candidates": kk,
                                    "error": msg})
                print("ivfpq: nprobe", p, "candidates", kk, "failed:", msg, flush=True)
                continue
            rec = recall(without_self(i, rows), exact_sets)
            tv = torch.cat([total_variation(a, b, vocab) for a, b in zip(targets(d, i), exact_targets, strict=True)])
            r = {"backend": "faiss-ivfpq", "nprobe": p, "refine": refine, "candidates": kk,
                 "queries_per_s": round(qps, 1),
                 "recall": round(float(rec.mean()), 5), "recall_min": round(float(rec.min()), 5),
                 "mean_tv": round(float(tv.mean()), 5), "tv_p95": round(float(tv.quantile(0.95)), 5),
                 "speedup_vs_exact": round(qps / exact_qps, 2)}
            print("ivfpq:", r, flush=True)
            out["rows"].append(r)
    out.update(total_s=round(time.perf_counter() - t_start, 1), load_average_start=round(load_start, 2),
               load_average_end=round(os.getloadavg()[0], 2))
    return out


def profile(fn, out: Path, title: str, rows: int = 25) -> None:
    """Append the CUDA-time table of one call of fn() (torch.profiler) to out/profile.txt."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    table = p.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
    with open(out / "profile.txt", "a") as f:
        f.write(f"## {title}\n{table}\n")


def bench_train(args, shape: dict, device: torch.device, dtype: torch.dtype, rate: float, compiled: bool = True,
                loss: str = "compiled") -> dict:
    """Optimizer steps as memdec.pipeline.train's loop runs them on a GPU: (compiled) model under autocast, the
    step loss on the flat logit rows with `--support`-entry kNN targets, fused AdamW, no host sync."""
    try:
        from memdec.pipeline.train import _step_loss
    except ImportError as e:
        return {"skipped": f"memdec.pipeline.train._step_loss not available ({e})"}
    model = (qwen05(shape, device) if shape.get("qwen") else gpt2(shape, device, torch.float32)).train()
    if compiled:
        model.compile()
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if cuda else {}))
    b, length, s = args.train_batch, shape["window"], args.support
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, shape["vocab"], (b, length), generator=gen, device=device)
    score = torch.ones((b, length), dtype=torch.bool, device=device)
    score[:, 0] = False
    b_idx, j_idx = score[:, 1:].nonzero(as_tuple=True)
    rows, labels = b_idx * length + j_idx, ids[:, 1:][score[:, 1:]]
    n = len(rows)
    knn_ids = torch.randint(0, shape["vocab"], (n, s), generator=gen, device=device, dtype=torch.int32)
    knn_probs = torch.softmax(torch.randn((n, s), generator=gen, device=device), -1).half()
    autocast = cuda and dtype != torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            logits = model(input_ids=ids, use_cache=False).logits
        loss, _ = _step_loss(logits, rows, labels, knn_ids, knn_probs, 0.5, None)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    os.environ["MEMDEC_TRAIN_LOSS"] = loss
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    sync(device)
    t_warm = time.perf_counter() - t0
    if args.profile and cuda:
        profile(lambda: [step() for _ in range(2)], Path(args.out), f"train {shape} compiled={compiled} loss={loss}")
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        step()
    sync(device)
    t = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    flops_token = 6 * n_params + 12 * shape["layers"] * shape["dim"] * length  # nanoGPT's count
    tps = b * length * args.train_steps / t
    from memdec.pipeline import train as train_mod

    os.environ.pop("MEMDEC_TRAIN_LOSS")
    return {"batch": b, "window": length, "support": s, "steps": args.train_steps, "compiled": compiled,
            "loss": loss if cuda and "broken" not in train_mod._COMPILED else "blockwise",
            "loss_compile_error": train_mod._COMPILED.get("broken"),
            "autocast": autocast, "dtype": str(dtype).removeprefix("torch.") if autocast else "float32",
            "params": n_params, "flops_per_token": flops_token, "warmup_s": round(t_warm, 1),
            "step_ms": round(1000 * t / args.train_steps, 1), "tokens_per_s": round(tps),
            "mfu": round(tps * flops_token / rate, 3)}


def markdown(res: dict) -> str:
    m = res["matmul"]
    rate = (f"8192^3 matmul rate: bfloat16 {m['bfloat16'] / 1e12:.0f} TFLOP/s, float16 {m['float16'] / 1e12:.0f} "
            "TFLOP/s" if res["device"].startswith("cuda") else
            f"512^3 float32 matmul rate: {m['float16'] / 1e9:.0f} GFLOP/s")
    head = [f"# memdec pipeline benchmark ({res['device_name']}, {res['date']})", "",
            f"Measured {rate}. Floors: search 2 x queries x keys x dim FLOP at the float16 "
            "rate; training (6 N + 12 L d T) FLOP per token at the bfloat16 rate.", ""]
    lines = ["| stage | measure | value | vs floor |", "|---|---|---|---|"]
    a = res.get("datastore")
    if a:
        lines += [f"| datastore | plain forward, tokens/s | {a['forward_tokens_per_s']:,} | |",
                  f"| datastore | build, tokens/s | {a['build_tokens_per_s']:,} | {a['build_vs_forward']:.1%} of forward |"]
    for t in res.get("targets", []):
        what = f"{t['keys']:,} x {t['dim']}, k={t['k']}, g={t['group']}, {t['query_batch']} queries/pass"
        lines.append(f"| targets | exact search, queries/s ({what}) | {t['search_queries_per_s']:,} "
                     f"| {t['search_vs_floor']:.1%} |")
        if "queries_per_s" in t:
            lines.append(f"| targets | search + kNN distribution, queries/s ({t['keys']:,} x {t['dim']}) "
                         f"| {t['queries_per_s']:,} | {t['targets_vs_floor']:.1%} |")
    for t in res.get("stream", []):
        lines.append(f"| targets | streamed exact search from {t['source']} ({t['keys']:,} x {t['dim']} = "
                     f"{t['key_gb']} GB, cap {t['cap_gb']} GB), queries/s | {t['queries_per_s']:,} "
                     f"| {t['search_vs_floor']:.1%} |")
    for c in res.get("train", []):
        if "tokens_per_s" in c:
            lines.append(f"| train | tokens/s ({c.get('model', 'gpt2-small')}, {'compiled' if c['compiled'] else 'eager'} "
                         f"model, {c.get('loss', 'blockwise')} loss, "
                         f"batch {c['batch']} x "
                         f"{c['window']}, support {c['support']}) | {c['tokens_per_s']:,} | {c['mfu']:.1%} MFU |")
        else:
            lines.append(f"| train | skipped | {c.get('skipped', '')} | |")
    lines = head + (lines + [""] if len(lines) > 2 else [])
    if any(res.get(stage) for stage in ("datastore", "train")):
        lines += [f"Model: {res['model']}; torch {res['torch']}; {res['dtype']}."]
    else:
        lines += [f"torch {res['torch']}."]
    v = res.get("ivfpq")
    if v:
        th = v["threads"]
        mass = ", ".join(f"{key.replace('_', ' ')}: {val:g}" for key, val in v.get("exact_mass_median", {}).items())
        lines += ["", f"## IVF-PQ against exact search ({v['keys']:,} x {v['dim']} clustered float16 keys, "
                  f"k = {v['k']}, T = {v['temperature']:g})", "",
                  f"faiss {v['faiss']} on the {v['faiss_on'].upper()} ({v['index_type']}); threads: torch "
                  f"{th['torch']}, faiss {th['faiss_omp']} (OMP_NUM_THREADS={th['OMP_NUM_THREADS']}, "
                  f"{th['cpu_count']} cores; 1-minute load average {v['load_average_start']} at the start, "
                  f"{v['load_average_end']} at the end). Index: nlist {v['nlist']:,}, m {v['m']} x "
                  f"{v['nbits']} bits ({v['code_bytes']} bytes/key), trained on {v['train_rows']:,} keys; "
                  f"build (train + add) {v['build_s']:,.1f} s. {v['queries']:,} queries (stored rows, own row "
                  f"dropped), {v['query_batch']} per call, the fastest of {v['repeats']} timed passes. Keys: a "
                  f"rank-{v['key_rank']} Gaussian mixture of {v['centres']:,} centres (`clustered_keys`), Zipf "
                  f"tokens over {v['vocab']:,}.", "",
                  "refine: no = faiss's PQ distances; k+1 = memdec's `refine` (what `memdec targets` does: exact "
                  "distances of the k + 1 ids found, same ids); a number = that many candidates searched, refined, "
                  "cut to the k + 1 nearest (the index's k_factor: `memdec index --k-factor R`). recall@k: share of the exact k "
                  "neighbours found; TV: total-variation distance between the kNN target distributions "
                  "(memdec.pipeline.targets.knn_distribution) from these and from the exact neighbours. "
                  f"Median share of the exact neighbours' softmax weight (T as above) on their {mass}.", "",
                  "| search | nprobe | refine | queries/s | vs exact | recall@k | mean TV | TV p95 |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in v["rows"]:
            if r["nprobe"] is None:
                probe, refine, speed, p95 = "", "", "1x", ""
            else:
                probe = str(r["nprobe"])
                kk = r.get("candidates", v["k"] + 1)
                refine = "no" if not r["refine"] else "k+1" if kk == v["k"] + 1 else f"{kk:,}"
                speed, p95 = f"{r.get('speedup_vs_exact', 0):g}x", f"{r.get('tv_p95', 0):.4f}"
            if r.get("error"):
                lines.append(f"| {r['backend']} | {probe} | {refine} | failed: {r['error']} | | | | |")
                continue
            lines.append(f"| {r['backend']} | {probe} | {refine} | {r['queries_per_s']:,.1f} | {speed} | "
                         f"{r['recall']:.4f} | {r['mean_tv']:.4f} | {p95} |")
        for note in v.get("notes", []):
            lines.append(f"\nNote: {note}")
    if res.get("command"):
        lines += ["", f"Command: `{res['command']}`"]
    return "\n".join(lines) + "\n"


def shapes(text: str) -> list[tuple[int, int]]:
    return [(int(float(a)), int(b)) for a, b in (x.split("x") for x in text.split(",") if x)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run, seconds)")
    p.add_argument("--out", default="runs/bench-pipeline", help="folder for bench_pipeline.json / .md")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", type=int, help="datastore corpus tokens (default 2M; --small 20k)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--target-shapes", help="keys x dim of the exact-search runs (default 1.5e6x512,1e7x768)")
    p.add_argument("--groups", default="", help="extra group sizes to time at the first shape (e.g. 8,32)")
    p.add_argument("--k", type=int, help="neighbours (default 1024; --small 64)")
    p.add_argument("--queries", type=int, help="timed queries (default 16384; --small 512)")
    p.add_argument("--query-batch", type=int, help="queries per pass over the keys (default: the index's, 8192)")
    p.add_argument("--stream", default="", help="keys x dim searched with the keys off the device (e.g. 1e7x768)")
    p.add_argument("--stream-sources", default="host,datastore", help="host (a CPU tensor) and/or datastore (shards)")
    p.add_argument("--stream-cap", default="8G", help="device memory the streamed search may use for keys")
    p.add_argument("--stream-query-batch", type=int, default=65536)
    p.add_argument("--temperature", type=float, default=16.0)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--train-eager", action="store_true", help="also time the uncompiled model")
    p.add_argument("--train-qwen", action="store_true", help="also time a Qwen2.5-0.5B-shaped model")
    p.add_argument("--profile", action="store_true", help="write torch.profiler tables to OUT/profile.txt")
    p.add_argument("--support", type=int, default=1024, help="kNN target entries per position in (c)")
    p.add_argument("--ivfpq", default="", help="keys x dim of the IVF-PQ comparison (e.g. 1e7x768; empty: skipped)")
    p.add_argument("--ivfpq-nlist", type=int, help="IVF lists (default: memdec's, 4 sqrt(keys))")
    p.add_argument("--ivfpq-m", type=int, help="PQ sub-quantizers, must divide dim (default: memdec's, <= 64)")
    p.add_argument("--ivfpq-nbits", type=int, default=8, help="bits per PQ sub-quantizer")
    p.add_argument("--ivfpq-nprobe", default="8,32,128", help="comma-separated lists visited per query")
    p.add_argument("--ivfpq-train-rows", type=int, default=1 << 18, help="keys the index is trained on")
    p.add_argument("--ivfpq-rerank", default="1,4", help="also refine R x (k + 1) candidates for each R > 1 "
                   "(1: memdec's refine alone, over the k + 1 ids found)")
    p.add_argument("--ivfpq-queries", type=int, help="timed queries (default 4096; --small 256)")
    p.add_argument("--ivfpq-query-batch", type=int, help="queries per search call (default 1024 on cuda, else 256)")
    p.add_argument("--ivfpq-repeats", type=int, default=1, help="timed passes over the queries (the fastest counts)")
    p.add_argument("--ivfpq-centres", type=int, help="Gaussian-mixture centres of the keys (default 4096; --small 32)")
    p.add_argument("--skip", nargs="*", default=[], choices=["datastore", "targets", "stream", "train", "ivfpq"])
    args = p.parse_args(argv)
    small = args.small
    shape = ({"vocab": 1000, "dim": 64, "layers": 2, "heads": 4, "window": 128} if small else
             {"vocab": 50257, "dim": 768, "layers": 12, "heads": 12, "window": 1024})
    args.tokens = args.tokens or (20_000 if small else 2_000_000)
    target_shapes = shapes(args.target_shapes or ("20000x64" if small else "1500000x512,10000000x768"))
    args.k = args.k or (64 if small else 1024)
    args.queries = args.queries or (512 if small else 16384)
    if small:
        args.query_batch = args.query_batch or 256
        args.train_batch, args.train_steps = min(args.train_batch, 2), min(args.train_steps, 3)
        args.support = min(args.support, 32)
    device = torch.device(args.device)
    args.vocab = shape["vocab"]
    args.ivfpq_queries = args.ivfpq_queries or (256 if small else 4096)
    args.ivfpq_query_batch = args.ivfpq_query_batch or (1024 if device.type == "cuda" else 256)
    args.ivfpq_centres = args.ivfpq_centres or (32 if small else 4096)
    run_ivfpq = bool(args.ivfpq) and "ivfpq" not in args.skip
    error = check_ivfpq(args) if run_ivfpq else None
    if error:
        print(f"bench_pipeline.py: error: {error}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_name()})"
    res = {"device": str(device), "device_name": name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
           "model": f"GPT-2-shaped random weights: {shape['layers']} x {shape['dim']}, vocab {shape['vocab']}, "
                    f"window {shape['window']}", "small": small,
           "command": "python benchmarks/bench_pipeline.py " + shlex.join(sys.argv[1:] if argv is None else argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res["matmul"] = matmul_rate(device)
    print("matmul:", {key: f"{v / 1e12:.1f} TFLOP/s" for key, v in res["matmul"].items()}, flush=True)
    search_rate = res["matmul"]["float16"]

    def save():
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the last stage's tensors are gone: give their memory back
        (out / "bench_pipeline.json").write_text(json.dumps(res, indent=2) + "\n")
        (out / "bench_pipeline.md").write_text(markdown(res))

    with tempfile.TemporaryDirectory(dir=out) as work:
        if "datastore" not in args.skip:
            res["datastore"] = bench_datastore(args, shape, device, dtype, Path(work))
            print("datastore:", res["datastore"], flush=True)
            save()
        if "targets" not in args.skip:
            res["targets"] = []
            for j, (n, dim) in enumerate(target_shapes):
                groups = [None] + ([int(g) for g in args.groups.split(",") if g] if j == 0 else [])
                for g in groups:
                    r = bench_targets(args, device, n, dim, search_rate, group=g, distribution=g is None)
                    print("targets:", r, flush=True)
                    res["targets"].append(r)
                    save()
        if args.stream and "stream" not in args.skip and device.type == "cuda":
            from memdec.pipeline.search import _env_bytes

            os.environ["MEMDEC_BENCH_CAP"] = args.stream_cap
            args.stream_cap = _env_bytes("MEMDEC_BENCH_CAP")
            res["stream"] = []
            for n, dim in shapes(args.stream):
                for source in args.stream_sources.split(","):
                    r = bench_stream(args, device, n, dim, search_rate, source, Path(work))
                    print("stream:", r, flush=True)
                    res["stream"].append(r)
                    save()
        if run_ivfpq:
            (n, dim), = shapes(args.ivfpq)
            res["ivfpq"] = bench_ivfpq(args, device, n, dim, Path(work))
            save()
    if "train" not in args.skip:
        res["train"] = []
        variants = [(True, "compiled")] + ([(True, "blockwise"), (False, "blockwise")] if args.train_eager else [])
        for compiled, loss in variants:
            if compiled and device.type != "cuda":
                continue
            r = bench_train(args, shape, device, dtype, res["matmul"]["bfloat16"], compiled=compiled, loss=loss)
            print("train:", r, flush=True)
            res["train"].append(dict(r, model="gpt2-small"))
            save()
        if args.train_qwen and device.type == "cuda":
            qwen = {"vocab": 151936, "dim": 896, "layers": 24, "heads": 14, "window": shape["window"], "qwen": True}
            r = bench_train(args, qwen, device, dtype, res["matmul"]["bfloat16"], compiled=True)
            print("train:", r, flush=True)
            res["train"].append(dict(r, model="qwen2.5-0.5b"))
            save()
        if device.type != "cuda":
            res["train"].append(bench_train(args, shape, device, dtype, res["matmul"]["bfloat16"], compiled=False,
                                            loss="blockwise"))
    save()
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
