"""Datastore: for every target position p of a corpus, key = the base model's hidden state at p - 1
(the input of its last block's MLP, see memdec.pipeline.keys) and value = the token at p.

Layout of a datastore folder (see `Datastore`): `manifest.json` (kind "datastore"), `tokens.npy`
(int32 token stream), and shards `keys_00000.npy` (float16 [rows, dim]) / `values_00000.npy` (int32
[rows]); row i of the concatenated shards is target position i + 1.

The build is resumable: shards are planned up front (consecutive windows, about `shard_rows` rows
each) and each is written to the `.partial` folder under a temporary name, then renamed; a restarted
run skips the shards already there and gives identical files. Under `accelerate launch` shard j is
built by process j % world_size and the main process writes the manifest, so the files are the same
as with one process (same shard boundaries, same batches), up to float differences between devices.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memdec.core.devices import dist_state, parse_dtype, resolve_device
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
from memdec.core.models import check_context, context_length, load_causal_lm, resolve_model_path
from memdec.core.models import load_tokenizer as load_named_tokenizer
from memdec.inference.mixing import check_fingerprint, tokenizer_fingerprint
from memdec.pipeline.data import (
    CorpusSpec,
    check_min_tokens,
    corpus_tokens,
    default_window,
    sliding_windows,
    window_batch,
)
from memdec.pipeline.keys import capture_keys, key_dim, key_layer, key_module

KIND = "datastore"
DEFAULT_SHARD_BYTES = 1 << 30  # about 1 GiB of keys per shard


# ---- helpers ----


def load_tokenizer(model_or_path, tokenizer=None, revision: str | None = None):
    """The tokenizer given, else the one saved with the model dir / hub id."""
    if tokenizer is not None:
        return tokenizer
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise ValueError("build_datastore: pass tokenizer= together with a model object")
    return load_named_tokenizer(resolve_model_path(str(model_or_path), "model"), "model", revision)


def load_model(model_or_path, revision: str | None = None, dtype=None, device=None):
    """(model in eval mode on `device`, model id) from a local dir / hub id, or a model object."""
    if isinstance(model_or_path, (str, os.PathLike)):
        name = resolve_model_path(str(model_or_path), "model")
        return load_causal_lm(name, "model", revision, dtype, device), name
    model = model_or_path if dtype is None else model_or_path.to(dtype)
    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    return model.to(device).eval(), name


# ---- writer ----


@dataclass(frozen=True)
class Shard:
    """Windows [win_lo, win_hi) whose scored targets fill datastore rows [row_lo, row_hi)."""

    index: int
    win_lo: int
    win_hi: int
    row_lo: int
    row_hi: int

    @property
    def rows(self) -> int:
        return self.row_hi - self.row_lo

    @property
    def keys_file(self) -> str:
        return f"keys_{self.index:05d}.npy"

    @property
    def values_file(self) -> str:
        return f"values_{self.index:05d}.npy"


def plan_shards(windows: Sequence, shard_rows: int) -> list[Shard]:
    """Group consecutive windows into shards of at most `shard_rows` rows (at least one window each)."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    shards: list[Shard] = []
    lo = 0
    while lo < len(windows):
        hi, rows = lo, 0
        while hi < len(windows) and (hi == lo or rows + windows[hi].n_scored <= shard_rows):
            rows += windows[hi].n_scored
            hi += 1
        row_lo = windows[lo].score_start - 1
        shards.append(Shard(len(shards), lo, hi, row_lo, row_lo + rows))
        lo = hi
    return shards


def _shard_done(folder: Path, shard: Shard, dim: int) -> bool:
    try:
        load_npy(folder / shard.keys_file, shape=(shard.rows, dim), dtype=np.float16)
        load_npy(folder / shard.values_file, shape=(shard.rows,), dtype=np.int32)
        return True
    except FormatError:
        return False


class _StopForward(Exception):
    """Raised by a hook once the key is captured: the rest of the model is not needed."""


def _stop_hook(_module, _args, _kwargs):
    raise _StopForward


@torch.no_grad()
def _write_shard(model, tokens: np.ndarray, windows: Sequence, shard: Shard, folder: Path, dim: int,
                 batch_size: int, device: torch.device, pad_id: int, bar) -> None:
    """Run the model over the shard's windows and write its keys and values files."""
    tmp_keys = folder / (shard.keys_file + ".tmp.npy")
    keys = np.lib.format.open_memmap(tmp_keys, mode="w+", dtype=np.float16, shape=(shard.rows, dim))
    runner = model.base_model  # the transformer without its LM head; the stop hook ends it at the key
    cuda = device.type == "cuda"
    pinned: list[torch.Tensor] = []
    pending: tuple[torch.Tensor, Any, int] | None = None
    bad = torch.zeros((), dtype=torch.bool, device=device)

    def flush(item, dest: np.ndarray) -> None:
        buf, event, at = item
        if event is not None:
            event.synchronize()
        dest[at : at + len(buf)] = buf.numpy()

    ws = windows[shard.win_lo : shard.win_hi]
    with capture_keys(model) as cap:
        stop = key_module(model).register_forward_pre_hook(_stop_hook, with_kwargs=True)
        try:
            for b0 in range(0, len(ws), batch_size):
                batch = ws[b0 : b0 + batch_size]
                ids, attn, score = window_batch(tokens, batch, pad_id)
                # scored target at input position j is predicted from the key at j - 1
                length = ids.shape[1]
                pos = torch.nonzero(score)  # (n, 2): window, position
                src = pos[:, 0] * length + pos[:, 1] - 1
                try:
                    runner(input_ids=ids.to(device, non_blocking=True),
                           attention_mask=attn.to(device, non_blocking=True), use_cache=False)
                except _StopForward:
                    pass
                hidden = cap.pop()
                sel = hidden.reshape(-1, hidden.shape[-1]).index_select(0, src.to(device)).to(torch.float16)
                bad |= ~torch.isfinite(sel).all()
                at = batch[0].score_start - 1 - shard.row_lo
                if cuda:
                    if len(pinned) < 2:
                        pinned.append(torch.empty((batch_size * max(w.n_scored for w in ws), dim),
                                                  dtype=torch.float16, pin_memory=True))
                    buf = pinned[(b0 // batch_size) % 2][: len(sel)]
                    buf.copy_(sel, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                else:
                    buf, event = sel, None
                if pending is not None:
                    flush(pending, keys)
                pending = (buf, event, at)
                bar.update(len(sel))
            if pending is not None:
                flush(pending, keys)
        finally:
            stop.remove()
    if bool(bad):
        raise ValueError(f"{folder / shard.keys_file}: keys overflow float16 (inf/nan); try --dtype float32")
    del keys  # unmapped; the page cache writes it out (no fsync: a killed process loses nothing)
    os.replace(tmp_keys, folder / shard.keys_file)
    save_npy(folder / shard.values_file, tokens[shard.row_lo + 1 : shard.row_hi + 1].astype(np.int32))


def build_datastore(
    model_or_path,
    corpus: CorpusSpec | Sequence[str] | str,
    out: str | os.PathLike,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    shard_rows: int | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    tokenizer=None,
    progress: bool = True,
) -> Path:
    """Build the datastore of `model_or_path` over `corpus` in `out`; resume a killed run. Returns `out`.

    `corpus` is a CorpusSpec, a local path / `hf:NAME[:CONFIG]`, or a list of documents. `dtype` is
    the model's dtype ("auto": bfloat16 on GPU, float32 on CPU); keys are stored as float16. `window`
    defaults to memdec.pipeline.data.default_window (min(1024, the model's context length)), `stride` to the window.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    if shard_rows is not None and shard_rows < 1:
        raise ValueError(f"shard_rows (--shard-rows) must be >= 1, got {shard_rows}")
    check_output_dir(out, "output folder")
    if overwrite:
        check_replaceable(out, KIND)
    dist = dist_state()
    device = resolve_device(device, dist)
    torch_dtype = parse_dtype(dtype, device)
    tok = load_tokenizer(model_or_path, tokenizer, revision)
    tokens, corpus_desc, what = corpus_tokens(corpus, tok, progress and dist.is_main)
    limit = context_length(model_or_path, "model", revision)
    window = int(window or default_window(limit))
    if isinstance(model_or_path, (str, os.PathLike)):  # before the weights load
        check_context(limit, window, f"model {model_or_path}")
    check_min_tokens(len(tokens), window, what)
    windows = sliding_windows(len(tokens), window, stride)
    stride = window if stride is None else stride
    model, name = load_model(model_or_path, revision, torch_dtype, device)
    layer, dim = key_layer(model), key_dim(model)
    check_context(model, window, f"model {name}")
    shard_rows = shard_rows or max(1, DEFAULT_SHARD_BYTES // (2 * dim))
    shards = plan_shards(windows, shard_rows)
    plan = {
        "model": name, "revision": revision, "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "key_layer": layer, "dim": dim, "window": window, "stride": stride, "shard_rows": shard_rows,
        "dtype": str(torch_dtype).removeprefix("torch."), "n_tokens": int(len(tokens)),
        "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
    }
    tmp = open_partial(out, plan, overwrite, dist)
    if dist.is_main and not (tmp / "tokens.npy").exists():
        save_npy(tmp / "tokens.npy", tokens)

    mine = [s for s in shards if s.index % dist.world == dist.rank]
    todo = [s for s in mine if not _shard_done(tmp, s, dim)]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    bar = tqdm(total=sum(s.rows for s in mine), initial=sum(s.rows for s in mine if s not in todo),
               desc=f"datastore[{dist.rank}]" if dist.world > 1 else "datastore", unit="tok",
               disable=not progress, dynamic_ncols=True)
    for n_done, shard in enumerate(todo, 1):
        _write_shard(model, tokens, windows, shard, tmp, dim, batch_size, device, pad_id, bar)
        maybe_kill(n_done)
    bar.close()
    dist.wait()
    if dist.is_main:
        missing = [s.keys_file for s in shards if not _shard_done(tmp, s, dim)]
        if missing:
            raise FormatError(f"{tmp}: shards not written by their process: {', '.join(missing[:5])}")
        write_manifest(
            tmp, KIND, **{k: v for k, v in plan.items() if k not in ("tokens_sha256", "shard_rows")},
            n_entries=int(len(tokens) - 1),
            shards=[{"keys": s.keys_file, "values": s.values_file, "rows": s.rows} for s in shards],
            corpus=corpus_desc, architecture=type(model).__name__,
        )
        commit_partial(tmp, out)
    dist.wait()
    return out


# ---- reader ----


class Datastore:
    """A complete datastore folder, checked against its manifest on open. Arrays are memory-mapped."""

    def __init__(self, path: Path, manifest: dict[str, Any], keys: list[np.ndarray], values: list[np.ndarray]):
        self.path = path
        self.manifest = manifest
        self._keys = keys
        self._values = values
        self._starts = np.cumsum([0] + [len(v) for v in values])

    @classmethod
    def open(cls, path: str | os.PathLike) -> Datastore:
        """Open and validate a datastore folder (one-line FormatError naming the file on any mismatch)."""
        path = Path(path)
        if not path.exists() and partial_dir(path).exists():
            raise FormatError(f"{path}: not complete (an interrupted build is in {partial_dir(path)}; rerun it)")
        m = read_manifest(path, KIND)
        mf = path / "manifest.json"
        for key in ("dim", "n_tokens", "n_entries", "shards", "tokenizer_fingerprint", "window"):
            if key not in m:
                raise FormatError(f"{mf}: no field {key!r}")
        dim = int(m["dim"])
        if m["n_entries"] != m["n_tokens"] - 1:
            raise FormatError(f"{mf}: n_entries {m['n_entries']} != n_tokens - 1 ({m['n_tokens'] - 1})")
        rows = sum(int(s["rows"]) for s in m["shards"])
        if rows != m["n_entries"]:
            raise FormatError(f"{mf}: shards hold {rows} rows, the manifest says n_entries = {m['n_entries']}")
        keys, values = [], []
        for s in m["shards"]:
            keys.append(load_npy(path / s["keys"], shape=(int(s["rows"]), dim), dtype=np.float16))
            values.append(load_npy(path / s["values"], shape=(int(s["rows"]),), dtype=np.int32))
        load_npy(path / "tokens.npy", shape=(int(m["n_tokens"]),), dtype=np.int32)
        return cls(path, m, keys, values)

    @property
    def n(self) -> int:
        """Number of rows (= target positions 1 .. n_tokens - 1)."""
        return int(self.manifest["n_entries"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @cached_property
    def tokens(self) -> np.ndarray:
        """The int32 token stream (memory-mapped)."""
        return load_npy(self.path / "tokens.npy", dtype=np.int32)

    @cached_property
    def values(self) -> np.ndarray:
        """The int32 values of all rows, in memory."""
        return np.concatenate(self._values) if self._values else np.zeros(0, np.int32)

    def keys(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Float16 keys of rows [start, stop), copied into memory."""
        stop = self.n if stop is None else min(stop, self.n)
        start = max(0, start)
        parts = []
        for j, arr in enumerate(self._keys):
            lo, hi = max(start, self._starts[j]), min(stop, self._starts[j + 1])
            if lo < hi:
                parts.append(arr[lo - self._starts[j] : hi - self._starts[j]])
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float16)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Float16 keys of the given row ids (any shape), shape rows.shape + (dim,)."""
        rows = np.asarray(rows)
        flat = rows.reshape(-1)
        out = np.empty((len(flat), self.dim), np.float16)
        shard = np.searchsorted(self._starts, flat, side="right") - 1
        for j in np.unique(shard):
            sel = shard == j
            out[sel] = self._keys[j][flat[sel] - self._starts[j]]
        return out.reshape(*rows.shape, self.dim)

    def check_tokenizer(self, tokenizer) -> None:
        """Raise TokenizerMismatchError unless `tokenizer` is the one the datastore was built with."""
        check_fingerprint(tokenizer, self.manifest["tokenizer_fingerprint"], f"datastore {self.path}")

    def describe(self) -> dict[str, Any]:
        """The manifest fields later stages record about their datastore."""
        keep = ("model", "revision", "tokenizer_fingerprint", "key_layer", "dim", "window", "stride",
                "n_tokens", "n_entries", "created")
        return {"path": str(self.path), **{k: self.manifest.get(k) for k in keep}}
