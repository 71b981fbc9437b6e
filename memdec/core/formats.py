"""On-disk formats: a `manifest.json` (what made the files) beside plain .npy / safetensors arrays.

Every stage writes its output folder under a temporary name and renames it when complete, so a
folder with a final name is always whole; readers check the manifest against the files. No pickle:
arrays are read with `allow_pickle=False`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class FormatError(ValueError):
    """A file on disk is missing, truncated, or does not match its manifest."""


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: missing")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save one array atomically (a temporary name of this process, then a rename: concurrent writers of the same
    array never share a temporary file)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, array, allow_pickle=False)
    os.replace(tmp, path)


def load_npy(path: str | os.PathLike, mmap: bool = True, shape: tuple | None = None, dtype=None) -> np.ndarray:
    """Load an array without pickle; check its shape/dtype when given. Truncation is a FormatError."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: missing")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise FormatError(f"{path}: unreadable or truncated ({e})") from None
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise FormatError(f"{path}: shape {tuple(arr.shape)} does not match the manifest's {tuple(shape)}")
    if dtype is not None and arr.dtype != np.dtype(dtype):
        raise FormatError(f"{path}: dtype {arr.dtype} does not match the manifest's {np.dtype(dtype)}")
    return arr


def write_manifest(folder: str | os.PathLike, kind: str, **fields: Any) -> dict[str, Any]:
    """Write `manifest.json` for an output of `kind` (e.g. 'datastore', 'targets')."""
    manifest = {"kind": kind, "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | os.PathLike, kind: str) -> dict[str, Any]:
    """Read and check the manifest of a complete output of `kind`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"{folder}: no such {kind} folder")
    manifest = read_json(folder / MANIFEST)
    if manifest.get("kind") != kind:
        raise FormatError(f"{folder / MANIFEST}: holds a {manifest.get('kind')!r}, expected a {kind!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{folder / MANIFEST}: format version {manifest.get('format_version')}, this memdec reads {FORMAT_VERSION}"
        )
    return manifest


def is_complete(folder: str | os.PathLike, kind: str) -> bool:
    """True if `folder` holds a finished output of `kind`."""
    try:
        read_manifest(folder, kind)
        return True
    except FormatError:
        return False


def _existing_ancestor(path: Path) -> Path:
    """The nearest of `path`'s parents (or `path` itself) that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_parent(path: Path, what: str) -> None:
    """One-line error unless `path`'s missing folders can be made and `path` written in its parent."""
    parent = _existing_ancestor(path.parent)
    if not parent.is_dir():
        raise ValueError(f"{what} {path}: {parent} is a file, not a folder")
    if not writable(parent):
        raise ValueError(f"{what} {path}: folder {parent} is not writable")


def writable(folder: str | os.PathLike) -> bool:
    """True if new files can be made in the existing folder `folder` (os.access: W_OK and X_OK)."""
    return os.access(folder, os.W_OK | os.X_OK)


def check_output_dir(path: str | os.PathLike, what: str = "output") -> None:
    """One-line error, before any work, unless output folder `path` (and its `.partial` sibling) can be
    written: `path` must not be a file, and it (if present) or its nearest existing parent must be a
    writable folder. `what` names the output in the message (e.g. "datastore --out")."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{what} {path}: exists and is a file, not a folder")
    _check_parent(path, what)
    if path.is_dir() and not writable(path):
        raise ValueError(f"{what} {path}: folder is not writable")


def check_output_file(path: str | os.PathLike, what: str = "output", make_parent: bool = False) -> None:
    """One-line error, before any work, unless file `path` can be written (replaced if present):
    `path` must not be a folder and its parent must be a writable folder (with `make_parent`, one
    that can be made)."""
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"{what} {path}: is a folder, not a file")
    parent = Path(os.path.abspath(path)).parent
    if not make_parent and not parent.exists():
        raise FileNotFoundError(f"{what} {path}: folder {parent} does not exist")
    _check_parent(path, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path}: file is not writable")


def check_replaceable(path: str | os.PathLike, kind: str) -> None:
    """One-line error unless overwrite may delete output folder `path`: it is missing, empty, or a memdec
    output of `kind` (its manifest.json says so). A folder of other files is never deleted."""
    path = Path(path)
    if not path.is_dir() or not any(path.iterdir()):
        return
    try:
        if read_json(path / MANIFEST).get("kind") == kind:
            return
    except FormatError:
        pass
    raise FileExistsError(f"{path}: a folder that is not a {kind} (no {kind} {MANIFEST}); overwrite replaces only "
                          f"memdec's own output, so remove it or choose another output folder")


# ---- staged outputs: written under NAME.partial, renamed to NAME when complete ----

PLAN_JSON = "plan.json"
KILL_ENV = "MEMDEC_TEST_KILL_AFTER"  # tests: SIGKILL the process after this many units (shards, chunks)
_OTHER_SETTINGS = "{tmp}: left by an interrupted run with other settings ({diff}); delete it or pass overwrite to start again"


def partial_dir(final: str | os.PathLike) -> Path:
    """The temporary folder a stage writes into (kept across a kill, so the stage can resume)."""
    final = Path(final)
    return final.with_name(final.name + ".partial")


def maybe_kill(done: int) -> None:
    """Test hook: SIGKILL this process once `done` units were written, if MEMDEC_TEST_KILL_AFTER says so."""
    limit = os.environ.get(KILL_ENV)
    if limit and done >= int(limit):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def open_partial(final: str | os.PathLike, plan: dict[str, Any] | None = None, overwrite: bool = False,
                 dist: Any = None, *, resume: bool = True, plan_name: str = PLAN_JSON,
                 overwrite_resumes: bool = False, replace_final: bool = True,
                 mismatch: str = _OTHER_SETTINGS) -> Path:
    """Make (or reuse) the `.partial` folder of output `final` and return it; `commit_partial` finishes it.

    A `final` already there is an error, or with `overwrite` removed (with `replace_final=False` it is
    left for `commit_partial(merge=True)`, which replaces only memdec's own files in it). A leftover
    `.partial` is resumed; it is removed first without `resume`, or with `overwrite` (unless
    `overwrite_resumes` and its plan matches). With `plan`, the leftover's `plan_name` must hold the same
    plan (else a one-line ValueError from `mismatch`, checked by every process); the plan is written
    into it. `dist` (memdec.core.devices.Dist): only its main process writes, all wait for it.
    """
    final = Path(final)
    main = dist is None or dist.is_main
    if replace_final and final.exists():
        if not overwrite:
            raise FileExistsError(f"{final}: already exists (pass overwrite to replace it)")
        if main:
            shutil.rmtree(final)
    tmp = partial_dir(final)
    plan_file = tmp / plan_name
    changed = False
    if plan is not None and plan_file.exists():
        old = read_json(plan_file)
        diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        changed = bool(diff)
        if changed and not overwrite:
            raise ValueError(mismatch.format(tmp=tmp, diff=", ".join(diff)))
    restart = not resume or (overwrite and (changed or not overwrite_resumes))
    if dist is not None:
        dist.wait()
    if main:
        if restart and tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        if plan is not None:
            write_json(plan_file, plan)
    if dist is not None:
        dist.wait()
    return tmp


def commit_partial(tmp: str | os.PathLike, final: str | os.PathLike, plan_name: str = PLAN_JSON,
                   merge: bool = False) -> Path:
    """Rename the finished `.partial` folder `tmp` to `final` (its plan file removed first); with `merge`,
    move its entries into an existing `final`, replacing only what memdec wrote there (`move_into`)."""
    tmp, final = Path(tmp), Path(final)
    (tmp / plan_name).unlink(missing_ok=True)
    if merge:
        move_into(tmp, final)
    else:
        os.replace(tmp, final)
    return final


def _own_files(out: Path, own_json: str) -> list[str]:
    """The names a finished output in `out` lists as its own (its `own_json`'s "files"), else []."""
    try:
        files = read_json(out / own_json).get("files") if (out / own_json).is_file() else None
    except FormatError:
        return []
    return [f for f in files if isinstance(f, str) and f and "/" not in f and f not in (".", "..")] \
        if isinstance(files, list) else []


def move_into(work: Path, out: Path, own_json: str = "memdec.json") -> None:
    """Put the finished output in `work` at `out`, replacing only what memdec wrote there.

    A missing or empty `out` is replaced by `work` in one rename. Otherwise each entry of `work` is moved
    in (replacing an entry of the same name), the entries a former output listed in its `own_json` that
    the new one lacks are removed, and every other file of `out` is left as it was. The old `own_json`
    goes first and the new one comes last, so `out` reads as finished only when it is.
    """
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(work, out)
        return
    new = set(os.listdir(work))
    stale = set(_own_files(out, own_json)) - new
    (out / own_json).unlink(missing_ok=True)  # a move cut short leaves no finished-looking mixture
    for name in sorted(stale):
        old = out / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
    for name in sorted(new - {own_json}) + [own_json]:  # own_json last: the output is whole once it is in
        src, dst = work / name, out / name
        if not src.exists():
            continue
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(src, dst)
    work.rmdir()


@contextmanager
def staged_output(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield the `.partial` folder to write into; on success rename it to `final`.

    A folder left by a killed run is reused (the stage resumes from what is in it). On an exception
    the partial folder is kept for the next run to resume from.
    """
    tmp = open_partial(final, overwrite=overwrite, overwrite_resumes=True)
    yield tmp
    commit_partial(tmp, final)
