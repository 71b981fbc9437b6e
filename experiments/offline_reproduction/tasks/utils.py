"""The general-text perplexity task reuses lm_eval_tasks/utils.py (lm-eval loads `utils` from the YAML's folder)."""

from lm_eval_tasks.utils import SlidingPerplexityTask, load_task_data

__all__ = ["SlidingPerplexityTask", "load_task_data"]
