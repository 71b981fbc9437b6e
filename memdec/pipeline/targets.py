"""kNN targets: for every datastore row, the kNN-LM's next-token distribution over its neighbours.

Row r's key is searched against the index for k + 1 neighbours; the row itself is dropped by id
(wherever it appears; if it is not among them the farthest is dropped instead), leaving k.
p(neighbour) = softmax(-distance / T); probabilities of neighbours with the same value token are
summed. Rows are stored sparse, as CSR arrays in the targets folder (default DATASTORE/targets-k{k}-t{T}):

    offsets.npy  int64 [n_rows + 1]   row r is entries offsets[r]:offsets[r + 1]
    ids.npy      int32 [nnz]          token ids, ascending within a row
    probs.npy    float16 [nnz]        probabilities (> 0), renormalised to sum to 1 after the cast

Row r is the distribution for target position r + 1 (datastore row r). The build runs in chunks of
rows written to the `.partial` folder and resumes after a kill; under `accelerate launch` chunk c is
computed by process c % world_size and the main process concatenates them, so the output does not
depend on the number of processes (up to float differences between devices).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memdec.core.devices import dist_state, resolve_device
from memdec.core.formats import (
    FormatError,
    check_output_dir,
    check_replaceable,
    commit_partial,
    load_npy,
    maybe_kill,
    open_partial,
    partial_dir,
    read_manifest,
    save_npy,
    write_manifest,
)
from memdec.inference.knn import knn_distribution as knn_distribution_of
from memdec.pipeline.datastore import Datastore

KIND = "targets"
FIX_ROUNDS = 3  # fp16 renormalisation passes


def default_out(datastore_path: str | os.PathLike, k: int, temperature: float) -> Path:
    """DATASTORE/targets-k{k}-t{T}."""
    return Path(datastore_path) / f"targets-k{k}-t{temperature:g}"


def _renormalise_fp16(p: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Cast rows of probabilities (float64, [n, k]) to float16 so that each row's sum is as close to 1
    as float16 allows: the rounding residual goes to the largest entry, then to the smallest entries
    large enough to absorb what is left (finer float16 steps)."""
    p16 = p.to(torch.float16)
    for r in range(FIX_ROUNDS):
        res = 1.0 - p16.double().sum(1)
        if r == 0:
            j = p16.argmax(1)
        else:
            big = keep & (p16.double() >= 4.0 * res.abs()[:, None])
            cand = torch.where(big, p16, torch.full_like(p16, float("inf")))
            j = torch.where(big.any(1), cand.argmin(1), p16.argmax(1))
        rows = torch.arange(len(p16), device=p16.device)
        p16[rows, j] = (p16[rows, j].double() + res).clamp_min(0).to(torch.float16)
    return p16


@torch.no_grad()
def drop_self(ids: torch.Tensor, query_ids: torch.Tensor, *others: torch.Tensor) -> torch.Tensor | tuple:
    """The k of each query's k + 1 neighbour ids ([n, k + 1]) left when its own row (`query_ids`) is dropped,
    wherever it is, else the farthest; with `others` ([n, k + 1] each, e.g. the distances) those are cut the
    same way too and (ids, *others) is returned."""
    is_self = ids == query_ids.to(ids.device)[:, None]
    keep = ~is_self
    keep[:, -1] &= is_self.any(1)  # no self among them: drop the farthest instead
    cut = [t[keep.to(t.device)].view(len(ids), ids.shape[1] - 1) for t in (ids, *others)]
    return tuple(cut) if others else cut[0]


def knn_distribution(dist: torch.Tensor, ids: torch.Tensor, query_ids: torch.Tensor, values: torch.Tensor,
                     k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse kNN distributions from a search for k + 1 neighbours ([n, k+1] distances and ids).

    Drops each query's own row (`query_ids`) by id; the k left give memdec.inference.knn's sparse
    distribution (`values`: token id of every datastore row), cast to float16 summing to 1. Returns (counts [n] int64,
    token ids int32, float16 probabilities), the entries of row r following those of row r - 1.
    """
    if ids.shape[1] != k + 1:
        raise ValueError(f"knn_distribution: {ids.shape[1]} neighbours per query, k + 1 = {k + 1} expected")
    i, d = drop_self(ids.to(dist.device), query_ids, dist)
    d = d.double()
    if not bool(((i >= 0) & torch.isfinite(d)).any(1).all()):
        raise ValueError("kNN search returned no neighbour for some rows (raise nprobe or use an exact backend)")
    tok, seg, keep = knn_distribution_of(d, i, values, temperature)
    p16 = _renormalise_fp16(seg, keep)
    keep &= p16 > 0
    return keep.sum(1), tok[keep].to(torch.int32), p16[keep]


def _part(tmp: Path, c: int, name: str) -> Path:
    return tmp / f"part_{c:05d}.{name}.npy"


def _part_done(tmp: Path, c: int, rows: int) -> bool:
    try:
        counts = load_npy(_part(tmp, c, "counts"), shape=(rows,), dtype=np.int64)
        nnz = int(counts.sum())
        load_npy(_part(tmp, c, "ids"), shape=(nnz,), dtype=np.int32)
        load_npy(_part(tmp, c, "probs"), shape=(nnz,), dtype=np.float16)
        return True
    except FormatError:
        return False


def check_k(k: Any, ds: Datastore) -> int:
    """`k` as an int, or a one-line error unless 1 <= k <= rows - 1 of datastore `ds` (its own row is excluded)."""
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > ds.n - 1:
        raise ValueError(f"k = {k}: datastore {ds.path} has {ds.n} rows, so at most {ds.n - 1} neighbours "
                         "per row (its own row is excluded)")
    return k


def build_targets(
    datastore: Datastore | str | os.PathLike,
    out: str | os.PathLike | None = None,
    k: int = 1024,
    temperature: float = 16.0,
    backend: str = "torch",
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    chunk_rows: int = 1 << 16,
    overwrite: bool = False,
    progress: bool = True,
    **index_options: Any,
) -> Path:
    """Compute the sparse kNN target distribution of every datastore row into `out`; resume a killed run.

    `backend` is a memdec.pipeline.search backend ('torch', 'faiss-flat', 'faiss-ivfpq'; a faiss index is
    built and saved next to the datastore if missing). Returns the output folder.
    """
    from tqdm.auto import tqdm

    from memdec.pipeline.search import BACKENDS, open_index

    ds = datastore if isinstance(datastore, Datastore) else Datastore.open(datastore)
    k, temperature = check_k(k, ds), float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    out = Path(out) if out is not None else default_out(ds.path, k, temperature)
    check_output_dir(out, "output folder")
    if overwrite:
        check_replaceable(out, KIND)
    dist = dist_state()
    dev = resolve_device(device, dist)
    described = ds.describe()
    plan = {"k": k, "temperature": temperature, "backend": backend, "chunk_rows": chunk_rows,
            "datastore": {key: v for key, v in described.items() if key != "path"}}
    tmp = open_partial(out, plan, overwrite, dist)

    chunks = [(c, a, min(a + chunk_rows, ds.n)) for c, a in enumerate(range(0, ds.n, chunk_rows))]
    mine = [ch for ch in chunks if ch[0] % dist.world == dist.rank]
    todo = [ch for ch in mine if not _part_done(tmp, ch[0], ch[2] - ch[1])]
    if backend != "torch" and dist.world > 1:
        if dist.is_main:  # build a missing faiss index once, before the other processes load it
            open_index(ds, backend, device=dev, **index_options)
        dist.wait()
    if todo:
        index = open_index(ds, backend, device=dev, **index_options)
        values = torch.from_numpy(ds.values).to(dev)
        # queries per search call: the exact index's own batch (8192 on a GPU: one pass over the keys each)
        batch_size = batch_size or getattr(index, "query_batch", None) or (8192 if dev.type == "cuda" else 256)
    left = {c for c, _, _ in todo}
    bar = tqdm(total=sum(b - a for _, a, b in mine), initial=sum(b - a for c, a, b in mine if c not in left),
               desc=f"targets[{dist.rank}]" if dist.world > 1 else "targets", unit="row", disable=not progress,
               dynamic_ncols=True)
    for n_done, (c, a, b) in enumerate(todo, 1):
        counts, ids, probs = [], [], []
        for s in range(a, b, batch_size):
            e = min(s + batch_size, b)
            q = torch.from_numpy(ds.keys(s, e)).to(dev)
            d, i = index.search(q, k + 1)
            cnt, tid, pr = knn_distribution(d, i, torch.arange(s, e, device=dev), values, k, temperature)
            counts.append(cnt.cpu())
            ids.append(tid.cpu())
            probs.append(pr.cpu())
            bar.update(e - s)
        save_npy(_part(tmp, c, "ids"), torch.cat(ids).numpy())
        save_npy(_part(tmp, c, "probs"), torch.cat(probs).numpy())
        save_npy(_part(tmp, c, "counts"), torch.cat(counts).numpy().astype(np.int64))  # written last: done
        maybe_kill(n_done)
    bar.close()
    dist.wait()
    if dist.is_main:
        _merge(tmp, chunks, ds, plan)
        commit_partial(tmp, out)
    dist.wait()
    return out


def _merge(tmp: Path, chunks: list[tuple[int, int, int]], ds: Datastore, plan: dict[str, Any]) -> None:
    """Concatenate the chunk parts into offsets/ids/probs, then write the manifest."""
    missing = [_part(tmp, c, "counts").name for c, a, b in chunks if not _part_done(tmp, c, b - a)]
    if missing:
        raise FormatError(f"{tmp}: chunks not written by their process: {', '.join(missing[:5])}")
    counts = np.concatenate([load_npy(_part(tmp, c, "counts"), mmap=False) for c, _, _ in chunks])
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    nnz = int(offsets[-1])
    arrays = {}
    for name, dtype in (("ids", np.int32), ("probs", np.float16)):
        arrays[name] = np.lib.format.open_memmap(tmp / f"{name}.npy.tmp.npy", mode="w+", dtype=dtype, shape=(nnz,))
    at = 0
    for c, _, _ in chunks:
        part_ids = load_npy(_part(tmp, c, "ids"))
        arrays["ids"][at : at + len(part_ids)] = part_ids
        arrays["probs"][at : at + len(part_ids)] = load_npy(_part(tmp, c, "probs"))
        at += len(part_ids)
    for name, arr in arrays.items():
        arr.flush()
        os.replace(tmp / f"{name}.npy.tmp.npy", tmp / f"{name}.npy")
    save_npy(tmp / "offsets.npy", offsets)
    write_manifest(tmp, KIND, k=plan["k"], temperature=plan["temperature"], backend=plan["backend"],
                   n_rows=ds.n, nnz=nnz, datastore={**plan["datastore"], "path": str(ds.path)})
    for c, _, _ in chunks:
        for name in ("counts", "ids", "probs"):
            _part(tmp, c, name).unlink()


class Targets:
    """A complete targets folder (CSR arrays, memory-mapped), checked against its manifest on open."""

    def __init__(self, path: Path, manifest: dict[str, Any], offsets: np.ndarray, ids: np.ndarray,
                 probs: np.ndarray):
        self.path, self.manifest = path, manifest
        self.offsets, self.ids, self.probs = offsets, ids, probs

    @classmethod
    def open(cls, path: str | os.PathLike) -> Targets:
        """Open and validate a targets folder (one-line FormatError naming the file on any mismatch)."""
        path = Path(path)
        if not path.exists() and partial_dir(path).exists():
            raise FormatError(f"{path}: not complete (an interrupted build is in {partial_dir(path)}; rerun it)")
        m = read_manifest(path, KIND)
        for key in ("k", "temperature", "n_rows", "nnz", "datastore"):
            if key not in m:
                raise FormatError(f"{path / 'manifest.json'}: no field {key!r}")
        n, nnz = int(m["n_rows"]), int(m["nnz"])
        offsets = load_npy(path / "offsets.npy", mmap=False, shape=(n + 1,), dtype=np.int64)
        if offsets[0] != 0 or offsets[-1] != nnz or (n and np.any(np.diff(offsets) < 0)):
            raise FormatError(f"{path / 'offsets.npy'}: not a valid CSR offset array for {n} rows and {nnz} entries")
        ids = load_npy(path / "ids.npy", shape=(nnz,), dtype=np.int32)
        probs = load_npy(path / "probs.npy", shape=(nnz,), dtype=np.float16)
        return cls(path, m, offsets, ids, probs)

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR slice of rows [start, stop): (offsets int64 [stop - start + 1] starting at 0, ids, probs)."""
        start, stop = max(0, start), min(stop, self.n_rows)
        stop = max(start, stop)
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        return self.offsets[start : stop + 1] - lo, np.asarray(self.ids[lo:hi]), np.asarray(self.probs[lo:hi])

    def check_datastore(self, datastore: Datastore) -> None:
        """Raise FormatError unless these targets were computed from `datastore`."""
        mine = self.manifest["datastore"]
        for key in ("n_entries", "dim", "tokenizer_fingerprint", "created"):
            if mine.get(key) != datastore.manifest.get(key):
                raise FormatError(f"targets {self.path}: computed from a datastore with {key} = {mine.get(key)}, "
                                  f"but datastore {datastore.path} has {datastore.manifest.get(key)}")
        if self.n_rows != datastore.n:
            raise FormatError(f"targets {self.path}: {self.n_rows} rows, datastore {datastore.path} has {datastore.n}")
