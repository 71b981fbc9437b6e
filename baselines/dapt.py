"""DAPT baseline (domain-adaptive pre-training): full fine-tuning of the base model on the domain corpus.

    memdec dapt --model BASE --corpus PATH --out DIR
    memdec-eval --model hf --model_args pretrained=DIR --tasks ...

Training is `memdec.pipeline.train.train` with beta = 0: plain next-token CE over the same sliding windows as
the pipeline (`--datastore DIR` trains on a datastore's token stream with its window), accelerate,
bf16 on a GPU that has it, checkpoints in DIR.partial and resume on rerun.
"""

from __future__ import annotations

import os
from pathlib import Path

from baselines import BASELINE_JSON
from memdec.methods import Method, register_method
from memdec.pipeline.data import CorpusSpec


def dapt(
    model: str | os.PathLike,
    out: str | os.PathLike,
    corpus: str | CorpusSpec | None = None,
    datastore: str | os.PathLike | None = None,
    lr: float = 5e-5,
    **train_kwargs,
) -> Path:
    """Fine-tune all weights of `model` on `corpus` (or a datastore's tokens); returns `out`.

    Other keywords go to `memdec.pipeline.train.train` (window, stride, steps, epochs, batch_size, ...).
    """
    from memdec.pipeline.train import train

    path = train(init=model, out=out, corpus=corpus, datastore=datastore, beta=0.0, lr=lr,
                 extra_files={BASELINE_JSON: {"method": "dapt", "base": str(model)}}, **train_kwargs)
    return Path(path)


# evaluated with lm-eval's hf; reports know its runs by the baseline.json beside the model (reports/load.py)
register_method(Method(name="dapt", label="+DAPT", aliases=("+dapt",), train="memdec.cli:dapt_command"))
