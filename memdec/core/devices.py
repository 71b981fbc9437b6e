"""Where work runs: the device, the dtype, and this process's place among launched processes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

#: dtype names every command accepts ("auto" too: bfloat16 on a GPU, float32 on CPU)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """A torch dtype from a name in DTYPES (or a dtype); None / "auto": bfloat16 on CUDA `device`, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device is not None and torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class Dist:
    """This process's place among `accelerate launch` / torchrun processes (one process when not launched)."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None
    barrier: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        if self.barrier is not None:
            self.barrier()


def dist_state() -> Dist:
    """The process layout: accelerate's when launched with several processes (GPUs), else
    torch.distributed over gloo (e.g. CPU processes under torchrun), else a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        return Dist(state.process_index, state.num_processes, state.device, state.wait_for_everyone)
    import torch.distributed as td

    if not td.is_initialized():
        td.init_process_group("gloo")
    return Dist(td.get_rank(), td.get_world_size(), None, td.barrier)


def default_device() -> torch.device:
    """cuda when available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None, dist: Dist | None = None) -> torch.device:
    """`device`, else this process's accelerate device, else cuda when available, else cpu.

    Under several processes a bare "cuda" means this process's GPU."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and dist is not None and dist.device is not None:
            return dist.device
        return device
    if dist is not None and dist.device is not None:
        return dist.device
    return default_device()
