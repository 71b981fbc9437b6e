"""`memdec bench`: inference speed of a base LM alone, with a Memory Decoder, a kNN-LM and In-Context RAG.

models (random-weight architectures), timing (medians, paired ratios, peak memory), methods (the scorers and one
`MethodSpec` per table row), report (markdown, json, plot) and run (`run_bench`, the `memdec bench` command).
"""

from . import methods, models, report, run, timing
from .methods import (
    BENCH_ORDER,
    KNN,
    BenchContext,
    MethodSpec,
    PairedDecode,
    PairedScore,
    agreement,
    bench_router,
    method_specs,
    score_base_fast,
    score_base_hf,
    score_memdec_fast,
    score_memdec_plain,
    score_memdec_router,
)
from .models import ARCH_DIR, SMALL, arch_config, arch_names, build_model, n_params
from .report import markdown_table, plot, write_outputs
from .run import BenchSettings, Row, bench, run_bench
from .timing import (
    PeakMemory,
    _once,
    _sync,
    environment,
    paired_per_token_ratio,
    paired_ratio,
    per_token_ms,
    time_ms,
)

__all__ = ["ARCH_DIR", "BENCH_ORDER", "KNN", "SMALL", "BenchContext", "BenchSettings", "MethodSpec", "PairedDecode", "PairedScore",
           "PeakMemory", "Row", "_once", "_sync", "agreement", "arch_config", "arch_names", "bench", "bench_router",
           "build_model", "environment", "markdown_table", "method_specs", "methods", "models", "n_params",
           "paired_per_token_ratio", "paired_ratio", "per_token_ms", "plot", "report", "run", "run_bench",
           "score_base_fast", "score_base_hf", "score_memdec_fast", "score_memdec_plain", "score_memdec_router",
           "time_ms", "timing", "write_outputs"]
