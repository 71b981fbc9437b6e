"""memdec: train, evaluate and compare Memory Decoders for large language models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["MemoryDecoder", "__version__"]


def __getattr__(name: str):
    # keep `import memdec` light: torch/transformers load only when the model is asked for
    if name == "MemoryDecoder":
        from memdec.inference.joint import MemoryDecoder

        return MemoryDecoder
    raise AttributeError(f"module 'memdec' has no attribute {name!r}")
