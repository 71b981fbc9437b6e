"""Nearest-neighbour search over datastore keys: exact torch search, faiss Flat and faiss IVF-PQ.

Every index answers `.search(queries [n, dim], k) -> (distances [n, k] float32 squared L2, ids [n, k]
int64 datastore rows)`, nearest first, on the queries' device. A saved index lives in
`DATASTORE/index-<backend>/` with a `manifest.json` (kind "index") and, for faiss, `index.faiss`
(`faiss.write_index`, no pickle); the torch backend has nothing to build and saves only its manifest.

Exact torch search streams the keys through the device in chunks (or keeps them there when they fit):
||k||^2 - 2 q.k per chunk (float32 on CPU; float16 on GPU, scaled so that q.k cannot overflow), top
k + margin candidates per chunk, merged across chunks; the candidates' distances are then recomputed
as sum((q - k)^2) in float32 from the keys (no cancellation) and the k nearest returned.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memdec.datastore import Datastore
from memdec.formats import (
    FormatError,
    check_output_dir,
    check_replaceable,
    partial_dir,
    read_manifest,
    write_manifest,
)

KIND = "index"
BACKENDS = ("torch", "faiss-flat", "faiss-ivfpq")


def _as_datastore(datastore: Datastore | str | os.PathLike) -> Datastore:
    return datastore if isinstance(datastore, Datastore) else Datastore.open(datastore)


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k = {k}: must be between 1 and the number of keys ({n})")


def exact_distances(queries: torch.Tensor, ids: torch.Tensor, datastore: Datastore) -> torch.Tensor:
    """Float32 squared L2 distances between each query and its neighbours `ids` [n, k], from stored keys.

    Ids < 0 (no neighbour) get +inf.
    """
    valid = ids >= 0
    rows = torch.where(valid, ids, torch.zeros_like(ids)).cpu().numpy()
    keys = torch.from_numpy(datastore.gather(rows)).to(queries.device).float()
    d = ((keys - queries.float()[:, None, :]) ** 2).sum(-1)
    return torch.where(valid.to(d.device), d, torch.full_like(d, float("inf")))


def _sort(d: torch.Tensor, i: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest of each row, nearest first; equal distances ordered by id (deterministic)."""
    by_id = i.argsort(dim=1, stable=True)
    d, i = d.gather(1, by_id), i.gather(1, by_id)
    order = d.argsort(dim=1, stable=True)[:, :k]
    return d.gather(1, order), i.gather(1, order)


class TorchIndex:
    """Exact search with torch on CPU or GPU, over a Datastore or an in-memory [n, dim] key tensor."""

    backend = "torch"

    def __init__(
        self,
        keys: Datastore | torch.Tensor | np.ndarray,
        device: str | torch.device | None = None,
        chunk_rows: int | None = None,
        query_batch: int | None = None,
        resident: bool | None = None,
        margin: int | None = None,
        half: bool | None = None,
    ):
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.half = self.cuda if half is None else half  # float16 candidates + exact float32 re-ranking
        self.datastore = keys if isinstance(keys, Datastore) else None
        if self.datastore is None:
            keys = torch.as_tensor(keys)
            if keys.ndim != 2:
                raise ValueError(f"keys: expected a [n, dim] array, got shape {tuple(keys.shape)}")
            self._mem = keys
            self.n, self.dim = keys.shape
        else:
            self._mem = None
            self.n, self.dim = self.datastore.n, self.datastore.dim
        self.chunk_rows = chunk_rows or ((1 << 20) if self.cuda else (1 << 16))
        self.query_batch = query_batch or (1024 if self.cuda else 256)
        self.margin = margin
        self.path: Path | None = None
        if resident is None:
            resident = self.cuda and self.n * self.dim * 2 < 0.5 * torch.cuda.mem_get_info(self.device)[0]
        self.resident = resident
        self._keys: torch.Tensor | None = None
        if self._mem is not None and self._mem.device == self.device and self._mem.dtype == self._key_dtype:
            self._keys = self._mem  # already where and how it is searched: no copy
            self.resident = True
        elif resident:
            self._keys = torch.empty((self.n, self.dim), dtype=self._key_dtype, device=self.device)
            for start in range(0, self.n, self.chunk_rows):
                self._keys[start : start + self.chunk_rows] = self._host_chunk(start, start + self.chunk_rows)
        self._norms: torch.Tensor | None = None  # squared key norms (float32, on the device), on first search
        self._max_norm = 0.0

    @property
    def _key_dtype(self) -> torch.dtype:
        return torch.float16 if self.half else torch.float32

    def _host_chunk(self, start: int, stop: int) -> torch.Tensor:
        if self._mem is not None:
            part = self._mem[start:stop]
        else:
            part = torch.from_numpy(self.datastore.keys(start, stop))
        return part.to(self.device, non_blocking=True).to(self._key_dtype)

    def _chunks(self):
        for start in range(0, self.n, self.chunk_rows):
            stop = min(start + self.chunk_rows, self.n)
            yield start, (self._keys[start:stop] if self._keys is not None else self._host_chunk(start, stop))

    def _gather(self, ids: torch.Tensor) -> torch.Tensor:
        if self._keys is not None:
            return self._keys[ids]
        if self._mem is not None:
            return self._mem[ids.cpu()].to(self.device)
        return torch.from_numpy(self.datastore.gather(ids.cpu().numpy())).to(self.device)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared L2 distances float32, ids int64) of the k nearest keys of each query, nearest first."""
        _check_k(k, self.n)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries: expected shape [n, {self.dim}], got {tuple(queries.shape)}")
        if self._norms is None:
            self._norms = torch.cat([(c.float() ** 2).sum(1) for _, c in self._chunks()])
            self._max_norm = float(self._norms.max().sqrt())
        out_d, out_i = [], []
        for q in queries.to(self.device).float().split(self.query_batch):
            d, i = self._search_batch(q, k)
            out_d.append(d)
            out_i.append(i)
        dev = queries.device
        if not out_d:
            return torch.zeros((0, k), device=dev), torch.zeros((0, k), dtype=torch.long, device=dev)
        return torch.cat(out_d).to(dev), torch.cat(out_i).to(dev)

    def _search_batch(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        # candidates from ||k||^2 - 2 q.k (float16 on GPU, float32 on CPU), then exact re-ranking
        margin = self.margin if self.margin is not None else max(16, k // 16)
        ksel = min(self.n, k + margin)
        if self.half:
            scale = max(1.0, float(q.norm(dim=1).max()) * self._max_norm / 3.0e4)
            qm = (q / scale).half()
        else:
            scale, qm = 1.0, q
        best_d = best_i = None
        for start, keys in self._chunks():
            # ||k||^2 - 2 q.k in one float32 pass over the (float16 on GPU) scores
            d = torch.add(self._norms[start : start + len(keys)][None, :], qm @ keys.T, alpha=-2.0 * scale)
            d, i = d.topk(min(ksel, d.shape[1]), dim=1, largest=False, sorted=False)
            i += start
            if best_d is not None:
                d, i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
                if d.shape[1] > ksel:
                    d, j = d.topk(ksel, dim=1, largest=False, sorted=False)
                    i = i.gather(1, j)
            best_d, best_i = d, i
        parts = []
        step = max(1, (1 << 26) // (ksel * self.dim))
        for s in range(0, len(q), step):
            kk = self._gather(best_i[s : s + step]).float()
            parts.append(((kk - q[s : s + step, None, :]) ** 2).sum(-1))
        return _sort(torch.cat(parts), best_i, k)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("faiss is not installed: pip install faiss-cpu (or faiss-gpu-cu12)") from None
    return faiss


def _to_gpu(index, device: torch.device | None):
    faiss = _faiss()
    if device is None or device.type != "cuda" or not hasattr(faiss, "StandardGpuResources"):
        return index
    res = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(res, device.index or 0, index)


class FaissIndex:
    """A faiss index over datastore rows; `refine` recomputes exact distances from the stored keys."""

    def __init__(self, index, backend: str, datastore: Datastore | None = None, refine: bool = False):
        self.index = index
        self.backend = backend
        self.datastore = datastore
        self.refine = refine
        self.n, self.dim = int(index.ntotal), int(index.d)
        self.path: Path | None = None
        if refine and datastore is None:
            raise ValueError("refine needs the datastore's stored keys")

    def set_nprobe(self, nprobe: int) -> None:
        """Number of IVF lists visited per query (IVF-PQ only)."""
        faiss = _faiss()
        faiss.ParameterSpace().set_index_parameter(self.index, "nprobe", int(nprobe))

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared L2 distances float32, ids int64; -1 / +inf where fewer than k were found)."""
        _check_k(k, self.n)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries: expected shape [n, {self.dim}], got {tuple(queries.shape)}")
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        d, i = self.index.search(q, k)
        d, i = torch.from_numpy(d), torch.from_numpy(i).long()
        d[i < 0] = float("inf")
        d, i = _sort(exact_distances(queries.detach().cpu(), i, self.datastore) if self.refine else d, i, k)
        return d.to(queries.device), i.to(queries.device)


def _default_m(dim: int) -> int:
    return max(m for m in range(1, min(dim, 64) + 1) if dim % m == 0)


def _faiss_index(ds: Datastore, backend: str, nlist: int | None, m: int | None, nbits: int,
                 train_size: int, seed: int, device: torch.device | None, progress: bool):
    from tqdm.auto import tqdm

    faiss = _faiss()
    params: dict[str, Any] = {}
    if backend == "faiss-flat":
        index = faiss.IndexFlatL2(ds.dim)
    else:
        nlist = nlist or max(1, min(int(4 * math.sqrt(ds.n)), ds.n // 39))
        m = m or _default_m(ds.dim)
        if ds.dim % m:
            raise ValueError(f"faiss-ivfpq: code size m = {m} must divide the key dimension {ds.dim}")
        need = max(nlist, 1 << nbits)
        if ds.n < need:
            raise ValueError(f"faiss-ivfpq: datastore {ds.path} has {ds.n} keys, fewer than the {need} needed "
                             f"to train nlist = {nlist} lists and {1 << nbits} PQ centroids; use faiss-flat")
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(ds.dim), ds.dim, nlist, m, nbits)
        params = {"nlist": nlist, "m": m, "nbits": nbits, "train_size": min(train_size, ds.n), "seed": seed}
    index = _to_gpu(index, device)
    if not index.is_trained:
        rows = np.sort(np.random.default_rng(seed).choice(ds.n, size=min(train_size, ds.n), replace=False))
        index.train(ds.gather(rows).astype(np.float32))
    step = 1 << 16
    for start in tqdm(range(0, ds.n, step), desc=f"index {backend}", unit="chunk", disable=not progress):
        index.add(ds.keys(start, start + step).astype(np.float32))
    return index, params


def build_index(
    datastore: Datastore | str | os.PathLike,
    backend: str = "torch",
    out: str | os.PathLike | None = None,
    nlist: int | None = None,
    m: int | None = None,
    nbits: int = 8,
    nprobe: int = 32,
    train_size: int = 1 << 18,
    seed: int = 0,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
):
    """Build the `backend` index of a datastore, save it to `out` (default DATASTORE/index-<backend>) and
    return it loaded (its `.path` is the folder). IVF-PQ: `nlist` lists, `m` sub-quantizers of `nbits`
    bits, trained on `train_size` random keys, `nprobe` lists visited per query."""
    ds = _as_datastore(datastore)
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    for name, value in (("nprobe", nprobe), ("nlist", nlist), ("m", m), ("train_size", train_size)):
        if value is not None and int(value) < 1:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= 1, got {value}")
    out = Path(out) if out is not None else ds.path / f"index-{backend}"
    check_output_dir(out, "output folder")
    if overwrite:
        check_replaceable(out, KIND)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out}: already exists (pass overwrite to replace it)")
        shutil.rmtree(out)
    tmp = partial_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)  # an index is built in one go: nothing to resume
    tmp.mkdir(parents=True)
    dev = torch.device(device) if device is not None else None
    params: dict[str, Any] = {}
    if backend != "torch":
        faiss = _faiss()
        index, params = _faiss_index(ds, backend, nlist, m, nbits, train_size, seed, dev, progress)
        if backend == "faiss-ivfpq":
            params["nprobe"] = nprobe
        if hasattr(faiss, "index_gpu_to_cpu") and dev is not None and dev.type == "cuda":
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, str(tmp / "index.faiss"))
    write_manifest(tmp, KIND, backend=backend, params=params, n=ds.n, dim=ds.dim,
                   datastore=ds.describe(), datastore_path=os.path.relpath(ds.path.resolve(), out.resolve()))
    os.replace(tmp, out)
    return load_index(out, datastore=ds, device=device)


def load_index(path: str | os.PathLike, datastore: Datastore | str | os.PathLike | None = None,
               device: str | torch.device | None = None, refine: bool | None = None, **torch_options):
    """Load a saved index; its datastore defaults to the one recorded in the manifest.

    `refine` (default: on for faiss-ivfpq) recomputes exact distances from the stored keys.
    """
    path = Path(path)
    man = read_manifest(path, KIND)
    ds = _as_datastore(datastore if datastore is not None else (path / man["datastore_path"]).resolve())
    mine, theirs = man["datastore"], ds.describe()
    for key in ("n_entries", "dim", "tokenizer_fingerprint", "created"):
        if mine.get(key) != theirs.get(key):
            raise FormatError(f"{path}: index built for a datastore with {key} = {mine.get(key)}, "
                              f"datastore {ds.path} has {theirs.get(key)}")
    backend = man["backend"]
    if backend == "torch":
        index: TorchIndex | FaissIndex = TorchIndex(ds, device=device, **torch_options)
    elif backend in BACKENDS:
        faiss = _faiss()
        file = path / "index.faiss"
        if not file.exists():
            raise FormatError(f"{file}: missing")
        try:
            raw = faiss.read_index(str(file))
        except RuntimeError as e:
            raise FormatError(f"{file}: unreadable ({str(e).splitlines()[0][:200]})") from None
        if raw.ntotal != ds.n or raw.d != ds.dim:
            raise FormatError(f"{file}: holds {raw.ntotal} keys of dim {raw.d}, datastore {ds.path} has "
                              f"{ds.n} of dim {ds.dim}")
        dev = torch.device(device) if device is not None else None
        refine = (backend == "faiss-ivfpq") if refine is None else refine
        index = FaissIndex(_to_gpu(raw, dev), backend, ds, refine)
        if "nprobe" in man["params"]:
            index.set_nprobe(man["params"]["nprobe"])
    else:
        raise FormatError(f"{path / 'manifest.json'}: unknown backend {backend!r}")
    index.path = path
    return index


def open_index(datastore: Datastore | str | os.PathLike, backend: str = "torch",
               device: str | torch.device | None = None, **options):
    """The datastore's saved `backend` index (DATASTORE/index-<backend>), built and saved if missing.

    The torch backend needs no build and is opened directly."""
    ds = _as_datastore(datastore)
    if backend == "torch":
        return TorchIndex(ds, device=device, **options)
    path = ds.path / f"index-{backend}"
    if path.exists():
        return load_index(path, datastore=ds, device=device)
    return build_index(ds, backend, device=device, **options)
