"""Evaluation: the lm-eval models (`MixtureLM`, `MemDecLM`), memdec-eval, and lmbda tuning."""
