"""The evaluation entry point: `python -m memdec.harness` / `accelerate launch -m memdec.harness` run memdec-eval.

The stable import path for plugins and scripts: `MixtureLM`, `MemDecLM`, `cpu_data_parallel` and `cli_main`
live in `memdec.eval.models` / `memdec.eval.launcher`; this module only names them.
"""

from __future__ import annotations

import sys

from memdec.eval.launcher import cli_main
from memdec.eval.models import MemDecLM, MixtureLM, cpu_data_parallel

__all__ = ["MemDecLM", "MixtureLM", "cli_main", "cpu_data_parallel"]

if __name__ == "__main__":
    sys.exit(cli_main())
