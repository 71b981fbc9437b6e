"""memdec.core.compile_cache: MEMDEC_COMPILE_CACHE loads torch.compile's portable artifacts once and saves at exit."""

from __future__ import annotations

import logging

import torch

from memdec.core import compile_cache as cc


def _fresh(monkeypatch, path=None):
    monkeypatch.setattr(cc, "_STATE", {"loaded": None, "registered": False})
    if path is None:
        monkeypatch.delenv(cc.ENV, raising=False)
    else:
        monkeypatch.setenv(cc.ENV, str(path))
    registered = []
    monkeypatch.setattr(cc.atexit, "register", registered.append)
    return registered


def test_off_without_the_variable(monkeypatch):
    registered = _fresh(monkeypatch)
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda b: (_ for _ in ()).throw(AssertionError))
    cc.use_compile_cache()
    assert registered == [] and cc.save_compile_cache() is None


def test_loads_once_saves_atomically_and_keeps_the_file_when_nothing_compiled(monkeypatch, tmp_path):
    path = tmp_path / "sub" / "compiled.bin"
    registered = _fresh(monkeypatch, path)
    loads = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda b: loads.append(b) or "info")
    cc.use_compile_cache()  # no file yet: nothing to load, the save is registered
    assert loads == [] and registered == [cc.save_compile_cache]
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", "info"))
    assert cc.save_compile_cache() == path and path.read_bytes() == b"artifacts"
    assert not path.with_name(path.name + ".partial").exists()
    monkeypatch.setattr(cc, "_STATE", {"loaded": None, "registered": True})
    cc.use_compile_cache()
    cc.use_compile_cache()
    assert loads == [b"artifacts"]  # once per process
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: None)
    assert cc.save_compile_cache() is None and path.read_bytes() == b"artifacts"


def test_a_file_that_does_not_load_is_one_warning(monkeypatch, tmp_path, caplog):
    path = tmp_path / "compiled.bin"
    path.write_bytes(b"not artifacts")
    _fresh(monkeypatch, path)

    def bad(_):
        raise RuntimeError("bad magic\nsecond line")

    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", bad)
    with caplog.at_level(logging.WARNING, logger="memdec.core.compile_cache"):
        cc.use_compile_cache()
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "could not be loaded (RuntimeError: bad magic)" in msg and "\n" not in msg
