"""Compiled code kept across runs and machines: MEMDEC_COMPILE_CACHE=FILE.

torch.compile caches its output on local disk (TORCHINDUCTOR_CACHE_DIR, /tmp by default), which a later run on
the same machine reuses. A fresh machine (a new GPU lease, a CI runner) starts cold and pays minutes of
compiling. With MEMDEC_COMPILE_CACHE set, memdec loads FILE's artifacts (torch.compiler.load_cache_artifacts)
once per process before it first compiles anything, and at exit writes what this process compiled
(torch.compiler.save_cache_artifacts) to FILE through FILE.partial. Copy FILE to the next machine and set the
variable there: same torch version, same device kind, the same models and shapes hit it. A FILE that does not
load (another torch, a damaged file) is one warning and a cold compile, never an error.
"""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path

from memdec.core.errors import first_line

log = logging.getLogger(__name__)

ENV = "MEMDEC_COMPILE_CACHE"
_STATE = {"loaded": None, "registered": False}


def cache_file() -> Path | None:
    """The file MEMDEC_COMPILE_CACHE names, or None."""
    value = os.environ.get(ENV, "").strip()
    return Path(value).expanduser() if value else None


def use_compile_cache() -> None:
    """Call before compiling: with MEMDEC_COMPILE_CACHE, load its artifacts (once per process) and save at exit."""
    path = cache_file()
    if path is None:
        return
    if _STATE["loaded"] != str(path):
        _STATE["loaded"] = str(path)
        if path.is_file():
            import torch

            try:
                info = torch.compiler.load_cache_artifacts(path.read_bytes())
                log.info("memdec: loaded compiled artifacts from %s (%s)", path, info)
            except Exception as e:  # another torch, a damaged file: compile cold
                log.warning("memdec: %s=%s could not be loaded (%s); compiling from scratch", ENV, path,
                            first_line(e, typed=True))
    if not _STATE["registered"]:
        _STATE["registered"] = True
        atexit.register(save_compile_cache)


def save_compile_cache() -> Path | None:
    """Write this process's compiled artifacts to MEMDEC_COMPILE_CACHE (via FILE.partial); None if nothing to write."""
    path = cache_file()
    if path is None:
        return None
    import torch

    try:
        out = torch.compiler.save_cache_artifacts()
    except Exception as e:
        log.warning("memdec: saving compiled artifacts to %s failed (%s)", path, first_line(e, typed=True))
        return None
    if not out or not out[0]:
        return None
    tmp = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(out[0])
        os.replace(tmp, path)
    except OSError as e:
        log.warning("memdec: writing compiled artifacts to %s failed (%s)", path, first_line(e, typed=True))
        return None
    return path
