"""Timing for `memdec bench`: wall times (CUDA events on a GPU), back-to-back paired ratios, peak GPU memory, the
environment the numbers were taken in."""

from __future__ import annotations

import datetime as _dt
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _once(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one `fn()` in milliseconds (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of `fn()` in milliseconds after `warmup` calls (CUDA events on a GPU).

    When the last warm-up call took over a second, at most 3 calls are timed.
    """
    last = 0.0
    for _ in range(warmup):
        last = _once(fn, device)
    if last > 1000.0:  # the last warm-up call (compiling is done by then) was slow: fewer repeats
        repeats = min(repeats, 3)
    _sync(device)
    return statistics.median(_once(fn, device) for _ in range(max(1, repeats)))


def paired_ratio(ref: Callable[[], Any], fn: Callable[[], Any], device: torch.device, warmup: int,
                 rounds: int) -> float:
    """Median over `rounds` of time(fn) / time(ref), the two timed back to back (which goes first alternates).

    Drift of the host or the card between measurements (launch-bound batch-1 work varies by tens of per cent
    from minute to minute) cancels, where the ratio of two separately timed rows does not.
    """
    for _ in range(warmup):
        _once(ref, device), _once(fn, device)
    _sync(device)
    ratios = []
    for i in range(max(1, rounds)):
        if i % 2:
            b, a = _once(fn, device), _once(ref, device)
        else:
            a, b = _once(ref, device), _once(fn, device)
        ratios.append(b / a)
    return statistics.median(ratios)


def paired_per_token_ratio(ref: Callable[[int], Any], gen: Callable[[int], Any], n: int, device: torch.device,
                           warmup: int, rounds: int) -> float:
    """Median over `rounds` of gen's per-token decode time / ref's, as `per_token_ms`, the four timed back to back."""
    for _ in range(warmup):
        for k in (n, 1):
            _once(lambda k=k: ref(k), device), _once(lambda k=k: gen(k), device)
    _sync(device)
    ratios = []
    for i in range(max(1, rounds)):
        t = {}
        order = [("ref", ref), ("gen", gen)] if i % 2 == 0 else [("gen", gen), ("ref", ref)]
        for k in (n, 1):
            for name, f in order:
                t[name, k] = _once(lambda f=f, k=k: f(k), device)
        ratios.append((t["gen", n] - t["gen", 1]) / (t["ref", n] - t["ref", 1]))
    return statistics.median(ratios)


class PeakMemory:
    """Peak GPU memory (MiB) allocated inside the block; None off the GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.mib = device, None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20



def per_token_ms(gen: Callable[[int], Any], n: int, device: torch.device, warmup: int, repeats: int) -> float:
    """Decode latency per token: (time for n new tokens - time for 1) / (n - 1)."""
    t_n = time_ms(lambda: gen(n), device, warmup, repeats)
    t_1 = time_ms(lambda: gen(1), device, warmup, repeats)
    return (t_n - t_1) / max(1, n - 1)



def environment(device: torch.device) -> dict[str, Any]:
    """Device name, library versions, date (UTC) and host, for the report."""
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "host": platform.node()}

