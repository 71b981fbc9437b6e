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
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memdec.core.errors import first_line
from memdec.core.formats import (
    FormatError,
    check_output_dir,
    check_replaceable,
    commit_partial,
    open_partial,
    read_manifest,
    write_manifest,
)
from memdec.pipeline.datastore import Datastore

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


def _env_bytes(name: str) -> int | None:
    """A byte count from environment variable `name` ("4000000000", "4G", "512M"), or None if unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(raw[-1].upper(), 1)
    try:
        return int(float(raw[:-1] if mult > 1 else raw) * mult)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a byte count such as 4000000000, 512M or 4G") from None


def _pread_part(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"a key shard ended {len(view) - done} bytes early")
        done += got


_POOL: dict[str, Any] = {}


def _parallel(fn, n: int, row_bytes: int) -> None:
    """fn(a, b) over row ranges covering [0, n), on up to 8 threads (16 MiB or more each)."""
    parts = max(1, min(8, (n * row_bytes) >> 24))
    if parts == 1:
        fn(0, n)
        return
    if "pool" not in _POOL:
        from concurrent.futures import ThreadPoolExecutor

        _POOL["pool"] = ThreadPoolExecutor(8, thread_name_prefix="memdec-read")
    step = -(-n // parts)
    for job in [_POOL["pool"].submit(fn, a, min(a + step, n)) for a in range(0, n, step)]:
        job.result()


def _pread(filename: str, dest: np.ndarray, offset: int) -> None:
    """Fill the contiguous array `dest` with the bytes of `filename` from `offset` on (several threads)."""
    view = memoryview(dest.reshape(-1).view(np.uint8))
    fd = os.open(filename, os.O_RDONLY)
    try:
        _parallel(lambda a, b: _pread_part(fd, view[a:b], offset + a), len(view), 1)
    finally:
        os.close(fd)


MAX_MEMORY_ENV = "MEMDEC_SEARCH_MAX_MEMORY"
_F16_LIMIT = 6.0e4  # |scaled score| bound, below float16's 65504


def _rerank_eager(keys: torch.Tensor, rows: torch.Tensor, q: torch.Tensor, qrow: torch.Tensor) -> torch.Tensor:
    """sum((keys[rows] - q[qrow])^2) in float32, one value per (rows, qrow) pair, in bounded pieces."""
    out = torch.empty(len(rows), dtype=torch.float32, device=q.device)
    step = max(1, (1 << 26) // max(1, keys.shape[1]))
    for s in range(0, len(rows), step):
        kk = keys[rows[s : s + step]].float()
        out[s : s + step] = ((kk - q[qrow[s : s + step]]) ** 2).sum(-1)
    return out


_RERANK: dict[str, Any] = {}


def _rerank(keys: torch.Tensor, rows: torch.Tensor, q: torch.Tensor, qrow: torch.Tensor) -> torch.Tensor:
    """Exact float32 squared distances of candidate pairs; on CUDA one fused (compiled) gather-reduce."""
    if keys.device.type != "cuda" or os.environ.get("MEMDEC_SEARCH_COMPILE", "1") == "0":
        return _rerank_eager(keys, rows, q, qrow)
    fn = _RERANK.get("fn")
    if fn is None:
        def fused(keys, rows, q, qrow):
            return ((keys[rows].float() - q[qrow]) ** 2).sum(-1)

        from memdec.core.compile_cache import use_compile_cache

        use_compile_cache()
        fn = _RERANK["fn"] = torch.compile(fused, dynamic=True)
    if _RERANK.get("broken"):
        return _rerank_eager(keys, rows, q, qrow)
    out = torch.empty(len(rows), dtype=torch.float32, device=q.device)
    step = 1 << 24  # pairs per call: bounded index tensors
    try:
        for s in range(0, len(rows), step):
            out[s : s + step] = fn(keys, rows[s : s + step], q, qrow[s : s + step])
    except Exception as e:  # no triton / compiler: the eager path gives the same numbers
        _RERANK["broken"] = first_line(e, typed=True, limit=200)
        return _rerank_eager(keys, rows, q, qrow)
    return out


class TorchIndex:
    """Exact search with torch on CPU or GPU, over a Datastore or an in-memory [n, dim] key tensor.

    Candidates come from one score tile s = ||k||^2 - 2 q.k per block of `tile` keys (float16 on GPU,
    float32 on CPU) and a group-minimum selection (see `_select`); their exact float32 distances
    sum((q - k)^2) then decide the k returned. Keys stay on the device when they fit in
    `max_memory` bytes (default: half the free device memory; env MEMDEC_SEARCH_MAX_MEMORY caps it),
    else they stream through it: host pinned buffers, copies on a side stream overlapping the search,
    a Datastore's memory-mapped shards read chunk by chunk (never whole).
    """

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
        group: int | None = None,
        tile_bytes: int | None = None,
        max_memory: int | None = None,
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
        self.group = int(group or (16 if self.cuda else 8))
        self.merge_every = 4  # blocks between two compactions of the kept groups
        if self.group < 1:
            raise ValueError(f"group = {self.group}: must be >= 1")
        self.margin = margin
        self.path: Path | None = None
        if max_memory is None:
            max_memory = _env_bytes(MAX_MEMORY_ENV)
        if self.cuda:
            free = int(torch.cuda.mem_get_info(self.device)[0])
            max_memory = min(max_memory, free) if max_memory is not None else free // 2
        self.max_memory = max_memory
        key_bytes = self.n * self.dim * self._key_dtype.itemsize
        if resident is None:
            resident = self.cuda and key_bytes <= 0.8 * max_memory
        self.resident = resident
        # queries per pass over the keys: streamed keys need more work per byte copied
        self.query_batch = query_batch or ((8192 if resident else 65536) if self.cuda else 256)
        tile_bytes = tile_bytes or ((1 << 32) if self.cuda else (1 << 24))
        if self.cuda and not resident and max_memory is not None:
            tile_bytes = min(tile_bytes, max(1 << 20, max_memory // 2))
        elt = 2 if self.half else 4
        cols = max(self.group, tile_bytes // (self.query_batch * elt))
        if chunk_rows:
            cols = chunk_rows
        self.chunk_rows = -(-min(cols, max(self.n, 1)) // self.group) * self.group  # keys per tile, a multiple of g
        self._keys: torch.Tensor | None = None
        if self._mem is not None and self._mem.device == self.device and self._mem.dtype == self._key_dtype:
            self._keys = self._mem  # already where and how it is searched: no copy
            self.resident = True
        elif self.resident:
            self._keys = torch.empty((self.n, self.dim), dtype=self._key_dtype, device=self.device)
            for start in range(0, self.n, self.chunk_rows):
                stop = min(start + self.chunk_rows, self.n)
                self._keys[start:stop] = self._read(start, stop).to(self.device).to(self._key_dtype)
        self._norms: torch.Tensor | None = None  # squared key norms (float32, on the device), on first search
        self._max_norm: torch.Tensor | None = None

    @property
    def _key_dtype(self) -> torch.dtype:
        return torch.float16 if self.half else torch.float32

    def _read(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Host keys [start, stop) (into `out` if given); a Datastore's shards are read piece by piece."""
        if self._mem is not None:
            part = self._mem[start:stop]
            if out is None:
                return part
            _parallel(lambda a, b: out[a:b].copy_(part[a:b]), len(part), part[:1].nbytes)
            return out
        if out is None:
            return torch.from_numpy(self.datastore.keys(start, stop))
        ds, at = self.datastore, 0
        for j, arr in enumerate(ds._keys):
            lo, hi = max(start, int(ds._starts[j])), min(stop, int(ds._starts[j + 1]))
            if lo < hi:
                dest = out[at : at + hi - lo]
                if isinstance(arr, np.memmap) and arr.filename and dest.dtype == torch.float16:
                    # straight from the shard file into the (pinned) buffer: no mapped pages kept
                    _pread(arr.filename, dest.numpy(), int(arr.offset) + (lo - int(ds._starts[j])) * arr.strides[0])
                else:
                    with warnings.catch_warnings():  # a read-only memory map: torch only reads it
                        warnings.simplefilter("ignore", UserWarning)
                        dest.copy_(torch.from_numpy(arr[lo - ds._starts[j] : hi - ds._starts[j]]))
                at += hi - lo
        return out

    def _chunks(self):
        """(start, device keys [rows, dim] in the key dtype) for every block of `chunk_rows` keys."""
        rows = self.chunk_rows
        if self._keys is not None:
            for start in range(0, self.n, rows):
                yield start, self._keys[start : start + rows]
            return
        if not self.cuda:
            buf = torch.empty((rows, self.dim), dtype=torch.float16) if self._mem is None else None
            for start in range(0, self.n, rows):
                stop = min(start + rows, self.n)
                part = self._read(start, stop, buf[: stop - start] if buf is not None else None)
                yield start, part.to(self._key_dtype)  # used before the next block is read
            return
        # streamed: two pinned host buffers and two device buffers; the copy of block j + 1 runs on a
        # side stream while block j is searched
        compute, copy = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)
        host_dtype = self._mem.dtype if self._mem is not None else torch.float16
        pinned = [torch.empty((rows, self.dim), dtype=host_dtype, pin_memory=True) for _ in range(2)]
        dev = [torch.empty((rows, self.dim), dtype=host_dtype, device=self.device) for _ in range(2)]
        copied = [torch.cuda.Event() for _ in range(2)]
        used = [torch.cuda.Event() for _ in range(2)]
        starts = list(range(0, self.n, rows))

        def issue(j: int) -> None:
            slot, start = j % 2, starts[j]
            stop = min(start + rows, self.n)
            if j >= 2:
                copied[slot].synchronize()  # the pinned buffer's previous copy is done (host waits)
            self._read(start, stop, pinned[slot][: stop - start])
            with torch.cuda.stream(copy):
                if j >= 2:
                    copy.wait_event(used[slot])  # the search of block j - 2 no longer reads dev[slot]
                dev[slot][: stop - start].copy_(pinned[slot][: stop - start], non_blocking=True)
                copied[slot].record(copy)

        if starts:
            issue(0)
        for j, start in enumerate(starts):
            slot, stop = j % 2, min(start + rows, self.n)
            compute.wait_event(copied[slot])
            block = dev[slot][: stop - start]
            yield start, block if block.dtype == self._key_dtype else block.to(self._key_dtype)
            used[slot].record(compute)
            if j + 1 < len(starts):
                issue(j + 1)  # the host reads block j + 1 while the device searches block j
        torch.cuda.synchronize(self.device)  # buffers are freed only after their last use

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared L2 distances float32, ids int64) of the k nearest keys of each query, nearest first."""
        _check_k(k, self.n)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries: expected shape [n, {self.dim}], got {tuple(queries.shape)}")
        if self._norms is None:
            self._norms = torch.cat([(c.float() ** 2).sum(1) for _, c in self._chunks()])
            self._max_norm = self._norms.max().sqrt()
        out_d, out_i = [], []
        for q in queries.to(self.device).float().split(self.query_batch):
            d, i = self._search_batch(q, k)
            out_d.append(d)
            out_i.append(i)
        dev = queries.device
        if not out_d:
            return torch.zeros((0, k), device=dev), torch.zeros((0, k), dtype=torch.long, device=dev)
        return torch.cat(out_d).to(dev), torch.cat(out_i).to(dev)

    def _select(self, q: torch.Tensor, ksel: int) -> torch.Tensor:
        """Ids [b, ksel] of the ksel smallest scores ||k||^2 - 2 q.k of each query (float16 on GPU).

        Group-minimum selection, exact for the scores it ranks: each tile row is cut into groups of g
        consecutive keys; only the ksel groups with the smallest minima are kept (their minima and all
        their g scores), merged with the best groups of the earlier tiles; the ksel smallest scores of
        the kept groups are the answer.

        Why it is exact (ties included): order all scores of a row totally by (value, then any fixed
        tie-break among equal values -- e.g. the one torch.topk happened to use between group minima,
        then position); a group's minimum is its least element in that order, and the kept set K is
        ksel groups whose minima are the least among all groups' minima. Suppose x is one of the ksel
        least elements and lies in a group h not in K. Every group of K has a minimum below min(h) <= x
        (strictly: the minima are distinct elements and h was not kept), so ksel distinct elements lie
        below x, and x is not among the ksel least: a contradiction. So the ksel least elements lie in
        K, and the values returned are the ksel smallest scores of the row, exactly (which of several
        equal scores at the boundary is returned is arbitrary; the float32 re-ranking orders them).
        Groups are disjoint and tiles partition the keys, so keeping the best ksel groups across tiles
        keeps the same guarantee; padding past the last key scores +inf and is never taken while
        ksel <= n. Compacting the kept groups to the best ksel only every few blocks keeps a superset
        of what a compaction per block would keep, so the same argument holds.
        """
        g, b = self.group, len(q)
        if self.half:
            # scale so that |scores| < 6e4 (float16): ||k||^2 / c and 2 |q| |k| / c bounded, on the device
            mk = self._max_norm
            c = ((mk * mk + 2.0 * q.norm(dim=1).max() * mk) / _F16_LIMIT).clamp_min(1.0)
            qm = (q * (-2.0 / c)).half()
            bias = (self._norms / c).half()
        else:
            qm, bias = q * -2.0, self._norms
        # kept groups of the blocks so far: slots for `merge_every` blocks, compacted to the best ksel
        # groups when full (one top-k per few blocks instead of one per block)
        width = ksel * (self.merge_every + 1)
        buf_m = buf_g = buf_v = None
        filled = 0
        for start, keys in self._chunks():
            rows = len(keys)
            s = torch.addmm(bias[start : start + rows], qm, keys.T)  # [b, rows] = ||k||^2 - 2 q.k (scaled)
            if rows % g:
                s = torch.nn.functional.pad(s, (0, g - rows % g), value=float("inf"))
            sv = s.view(b, -1, g)
            gmin = sv.amin(-1)  # [b, groups]
            kk = min(ksel, gmin.shape[1])
            m, j = gmin.topk(kk, dim=1, largest=False, sorted=False)
            if buf_m is None:
                buf_m = torch.empty((b, width), dtype=m.dtype, device=m.device)
                buf_g = torch.empty((b, width), dtype=torch.long, device=m.device)
                buf_v = torch.empty((b, width, g), dtype=s.dtype, device=m.device)
            if filled + kk > width:
                filled = self._compact(buf_m, buf_g, buf_v, filled, ksel)
            buf_m[:, filled : filled + kk] = m
            buf_g[:, filled : filled + kk] = j + start // g
            buf_v[:, filled : filled + kk] = sv.gather(1, j[..., None].expand(-1, -1, g))  # the kept groups' scores
            filled += kk
        filled = self._compact(buf_m, buf_g, buf_v, filled, ksel)  # ksel groups: the final top-k reads ksel * g
        v = buf_v[:, :filled].reshape(b, -1)
        _, t = v.topk(ksel, dim=1, largest=False, sorted=False)
        return buf_g[:, :filled].gather(1, t // g) * g + t % g

    @staticmethod
    def _compact(buf_m: torch.Tensor, buf_g: torch.Tensor, buf_v: torch.Tensor, filled: int, ksel: int) -> int:
        """Keep the ksel groups with the smallest minima of the first `filled` slots in slots [0, ksel)."""
        if filled <= ksel:
            return filled
        m, t = buf_m[:, :filled].topk(ksel, dim=1, largest=False, sorted=False)
        gid = buf_g[:, :filled].gather(1, t)
        v = buf_v[:, :filled].gather(1, t[..., None].expand(-1, -1, buf_v.shape[2]))
        buf_m[:, :ksel], buf_g[:, :ksel], buf_v[:, :ksel] = m, gid, v
        return ksel

    def _search_batch(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        margin = self.margin if self.margin is not None else max(16, k // 16)
        ksel = min(self.n, k + margin)
        ids = self._select(q, ksel)
        # exact float32 re-ranking of the candidates: sum((q - k)^2) from the stored keys
        flat = ids.reshape(-1)
        qrow = torch.arange(len(q), device=q.device).repeat_interleave(ksel)
        if self._mem is not None and self._mem.device == q.device:
            d = _rerank(self._mem, flat, q, qrow)
        elif self._keys is not None:
            d = _rerank(self._keys, flat, q, qrow)
        elif self.cuda:
            d = self._rerank_streamed(flat, q, qrow)
        else:
            d = self._rerank_datastore(flat, q, qrow)
        return _sort(d.view(len(q), ksel), ids, k)

    def _rerank_datastore(self, flat: torch.Tensor, q: torch.Tensor, qrow: torch.Tensor) -> torch.Tensor:
        kk = torch.from_numpy(self.datastore.gather(flat.cpu().numpy())).to(q.device).float()
        return ((kk - q[qrow]) ** 2).sum(-1)

    def _rerank_streamed(self, flat: torch.Tensor, q: torch.Tensor, qrow: torch.Tensor) -> torch.Tensor:
        """Exact distances of candidates whose keys are not on the device: a second pass over the key
        blocks, each block scoring the candidates that fall in it (sorted once, one host sync)."""
        order = flat.argsort()
        sid = flat[order]
        bounds = torch.searchsorted(sid, torch.arange(0, self.n + self.chunk_rows, self.chunk_rows,
                                                      device=sid.device)).tolist()
        out = torch.empty(len(flat), dtype=torch.float32, device=q.device)
        for j, (start, keys) in enumerate(self._chunks()):
            a, b = bounds[j], bounds[j + 1]
            if a < b:
                sel = order[a:b]
                out[sel] = _rerank(keys, sid[a:b] - start, q, qrow[sel])
        return out


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
    """A faiss index over datastore rows; `refine` recomputes exact distances from the stored keys.

    With `k_factor` F > 1 (refine only; faiss's IndexRefine calls it k_factor) a search for k neighbours asks
    faiss for F k candidates, re-ranks them by exact distance and keeps the k nearest: refine alone re-scores
    only the k ids found, so it fixes distances but not recall.
    """

    def __init__(self, index, backend: str, datastore: Datastore | None = None, refine: bool = False,
                 k_factor: int = 1):
        self.index = index
        self.backend = backend
        self.datastore = datastore
        self.refine = refine
        self.k_factor = check_k_factor(k_factor, refine)
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
        d, i = self.index.search(q, min(self.n, k * self.k_factor))
        d, i = torch.from_numpy(d), torch.from_numpy(i).long()
        d[i < 0] = float("inf")
        d, i = _sort(exact_distances(queries.detach().cpu(), i, self.datastore) if self.refine else d, i, k)
        return d.to(queries.device), i.to(queries.device)


def check_k_factor(k_factor: Any, refine: bool = True) -> int:
    """`k_factor` as an int >= 1; above 1 it needs refine (exact re-ranking). One-line ValueError otherwise."""
    if isinstance(k_factor, bool) or not isinstance(k_factor, int | np.integer) or int(k_factor) < 1:
        raise ValueError(f"k_factor (--k-factor) must be an integer >= 1, got {k_factor!r}")
    if int(k_factor) > 1 and not refine:
        raise ValueError(f"k_factor = {k_factor} re-ranks candidates by exact distance: it needs refine")
    return int(k_factor)


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
    k_factor: int = 1,
):
    """Build the `backend` index of a datastore, save it to `out` (default DATASTORE/index-<backend>) and
    return it loaded (its `.path` is the folder). IVF-PQ: `nlist` lists, `m` sub-quantizers of `nbits`
    bits, trained on `train_size` random keys, `nprobe` lists visited per query, `k_factor` x k candidates
    re-ranked exactly per search (FaissIndex)."""
    ds = _as_datastore(datastore)
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if check_k_factor(k_factor) != 1 and backend != "faiss-ivfpq":
        raise ValueError(f"k_factor = {k_factor}: only for faiss-ivfpq (the {backend} search is exact)")
    for name, value in (("nprobe", nprobe), ("nlist", nlist), ("m", m), ("train_size", train_size)):
        if value is not None and int(value) < 1:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= 1, got {value}")
    out = Path(out) if out is not None else ds.path / f"index-{backend}"
    check_output_dir(out, "output folder")
    if overwrite:
        check_replaceable(out, KIND)
    tmp = open_partial(out, overwrite=overwrite, resume=False)  # an index is built in one go: nothing to resume
    dev = torch.device(device) if device is not None else None
    params: dict[str, Any] = {}
    if backend != "torch":
        faiss = _faiss()
        index, params = _faiss_index(ds, backend, nlist, m, nbits, train_size, seed, dev, progress)
        if backend == "faiss-ivfpq":
            params["nprobe"] = nprobe
            params["k_factor"] = int(k_factor)
        if hasattr(faiss, "index_gpu_to_cpu") and dev is not None and dev.type == "cuda":
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, str(tmp / "index.faiss"))
    write_manifest(tmp, KIND, backend=backend, params=params, n=ds.n, dim=ds.dim,
                   datastore=ds.describe(), datastore_path=os.path.relpath(ds.path.resolve(), out.resolve()))
    commit_partial(tmp, out)
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
            raise FormatError(f"{file}: unreadable ({first_line(e, limit=200)})") from None
        if raw.ntotal != ds.n or raw.d != ds.dim:
            raise FormatError(f"{file}: holds {raw.ntotal} keys of dim {raw.d}, datastore {ds.path} has "
                              f"{ds.n} of dim {ds.dim}")
        dev = torch.device(device) if device is not None else None
        refine = (backend == "faiss-ivfpq") if refine is None else refine
        k_factor = int(man["params"].get("k_factor", 1)) if refine else 1
        index = FaissIndex(_to_gpu(raw, dev), backend, ds, refine, k_factor)
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
