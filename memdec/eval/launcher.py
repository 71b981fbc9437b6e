"""`memdec-eval`: lm-eval's command line with memdec's models, every baseline and lm_eval_tasks/ available.

Also here: lm-eval task-index patching (skip indexing lm-eval's built-in tasks when every requested task
is local) and the memdec section of `--help`. The lm-eval models themselves are memdec.eval.models.
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from memdec.core.errors import one_line
from memdec.eval.models import MemDecLM  # noqa: F401  (importing it registers `--model memdec`)
from memdec.inference.mixing import TokenizerMismatchError

__all__ = ["cli_main", "register_models", "tasks_dir", "memdec_help"]


# ---- registration and the command line ----


def register_models() -> None:
    """Register memdec's lm-eval models (importing memdec.eval.models does) and every baseline's."""
    import baselines

    try:
        baselines.register_all()
    except ModuleNotFoundError as e:  # a baseline not written yet must not break `--model memdec`
        if not (e.name or "").startswith("baselines."):
            raise
        warnings.warn(f"baseline module {e.name} is missing; some baselines are not registered", stacklevel=2)


def tasks_dir() -> str:
    """This project's lm-eval task folder (lm_eval_tasks/)."""
    import lm_eval_tasks

    return str(Path(lm_eval_tasks.__file__).resolve().parent)


def _add_task_path(args) -> None:
    """Put lm_eval_tasks/ on the task path, before the user's --include_path (theirs wins on a name clash)."""
    if not hasattr(args, "include_path"):
        return
    user = args.include_path
    if user is None and getattr(args, "config", None):
        from lm_eval.config.evaluate_config import EvaluatorConfig

        user = EvaluatorConfig.load_yaml_config(args.config).get("include_path")
    paths = [tasks_dir()]
    if user:
        paths += list(user) if isinstance(user, (list, tuple)) else [user]
    args.include_path = paths


def _resolvable(name: str, index: dict, seen: frozenset = frozenset()) -> bool:
    """True if task/group/tag `name` is fully defined by `index` (a group's members too)."""
    from lm_eval.tasks._index import Kind

    entry = index.get(name)
    if entry is None or name in seen:
        return entry is not None
    if entry.kind == Kind.TAG:
        return True
    if entry.kind != Kind.GROUP:
        return True
    members = (entry.cfg or {}).get("task", [])
    for item in members if isinstance(members, list) else [members]:
        if isinstance(item, dict):
            sub = item.get("task") or item.get("group")
            if not (isinstance(sub, str) and _resolvable(sub, index, seen | {name})) and "dataset_path" not in item \
                    and "class" not in item:
                return False
        elif not _resolvable(str(item), index, seen | {name}):
            return False
    return True


def _local_tasks_only(tasks: list[str] | None, include_path: list[str]) -> bool:
    """True if every requested task is defined in `include_path` alone (no lm-eval built-in task needed)."""
    from lm_eval.tasks._index import TaskIndex

    if not tasks:
        return False
    names = [t for task in tasks for t in str(task).split(",") if t]
    if any(n.endswith(".yaml") or any(c in n for c in "*?[") or os.path.isdir(n) for n in names):
        return False
    index = TaskIndex.build([Path(p) for p in include_path])
    return all(_resolvable(n, index) for n in names)


@contextmanager
def _task_manager_hook(args):
    """While lm-eval runs: skip indexing its ~15k built-in task files (about 20 s) when the requested
    tasks all live in lm_eval_tasks/ or --include_path; otherwise leave lm-eval as it is."""
    import lm_eval.tasks

    paths = getattr(args, "include_path", None)
    if getattr(args, "command", None) != "run" or not paths or not _local_tasks_only(args.tasks, paths):
        yield
        return
    original = lm_eval.tasks.TaskManager

    class LocalTaskManager(original):
        def __init__(self, *a, **kw):
            kw["include_defaults"] = False
            super().__init__(*a, **kw)

    lm_eval.tasks.TaskManager = LocalTaskManager
    try:
        yield
    finally:
        lm_eval.tasks.TaskManager = original




#: placeholders shown by `memdec-eval --help` for model_args that have no default
_ARG_PLACEHOLDERS = {"pretrained": "BASE", "memory": "MEMDEC_DIR", "datastore": "DATASTORE_DIR", "corpus": "CORPUS"}


def _model_args_help(cls) -> str:
    """`key=default, ...` of an lm-eval model class's own constructor arguments (pretrained first; a path
    it needs shown as a placeholder)."""
    import inspect

    shown = ["pretrained=BASE"]
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name in ("self", "pretrained") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        value = _ARG_PLACEHOLDERS.get(p.name) or ("?" if p.default is p.empty else repr(p.default))
        shown.append(f"{p.name}={value}")
    return ", ".join(shown)


def memdec_help() -> str:
    """The memdec section of `memdec-eval --help`: memdec's models and their model_args, the baselines, the tasks."""
    import re
    import textwrap

    from lm_eval.api.registry import get_model

    register_models()
    lines = ["", "memdec (memdec-eval is lm-eval with these models and tasks added):",
             "  models: --model NAME --model_args KEY=VALUE,... (lm-eval's hf model_args work too: dtype, "
             "max_length, revision, ...)"]
    about = {"memdec": "base mixed with a Memory Decoder (lmbda None: the memory's memdec.json, else 0.5)",
             "knnlm": "base mixed with a kNN-LM over a `memdec datastore` folder",
             "incontext_rag": "base reading a BM25-retrieved corpus chunk before its context"}
    for name, what in about.items():
        lines.append(f"    {name:<14} {what}")
        lines += textwrap.wrap(_model_args_help(get_model(name)), 100, initial_indent=" " * 19,
                               subsequent_indent=" " * 19)
    lines += ["  baselines trained by memdec, evaluated as lm-eval's hf model:",
              f"    {'dapt':<14} memdec dapt ... --out DIR, then --model hf --model_args pretrained=DIR",
              f"    {'lora':<14} memdec lora ... --out DIR, then --model hf --model_args pretrained=BASE,peft=DIR"]
    names = []
    for f in sorted(Path(tasks_dir()).glob("*.yaml")):
        found = re.search(r"^(?:task|group):\s*(\S+)\s*$", f.read_text(encoding="utf-8"), re.MULTILINE)
        if found:
            names.append(found.group(1))
    lines += [f"  tasks folder (always on the task path; --include_path adds more): {tasks_dir()}"]
    lines += textwrap.wrap(", ".join(names), 100, initial_indent="    ", subsequent_indent="    ")
    lines += ["  bad input ends with one line `memdec-eval: error: ...` and exit status 2 (MEMDEC_DEBUG=1: the "
              "traceback)"]
    return "\n".join(lines)


def _check_output_path(args) -> None:
    """One-line error, before evaluating, where lm-eval 0.4.13 would not save results to --output_path
    (it only logs a warning after the run). Like lm-eval: a path ending in .json names a results file
    (written as STEM_DATE.json beside it, its folder made if missing); any other path is a folder
    (results go to PATH/MODEL_NAME/, made if missing). Refused: that folder is a file or lies under
    one, or cannot be written."""
    path = getattr(args, "output_path", None)
    if path is None and getattr(args, "config", None):
        from lm_eval.config.evaluate_config import EvaluatorConfig

        path = EvaluatorConfig.load_yaml_config(args.config).get("output_path")
    if not path:
        return
    from memdec.core.formats import check_output_dir

    path = Path(path)
    folder = path.parent if path.suffix == ".json" else path
    try:
        check_output_dir(folder, "--output_path" if folder == path else f"--output_path {path}: its folder")
    except FileExistsError as e:
        raise FileExistsError(f"{e}; lm-eval saves results into a folder, or beside a path ending in .json") from None


def cli_main(argv: list[str] | None = None) -> int:
    """`memdec-eval`: lm-eval's command line with memdec's models and lm_eval_tasks/ available.

    Bad input ends with a one-line `memdec-eval: error: ...` and exit status 2 (set MEMDEC_DEBUG=1
    for the traceback).
    """
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_logging()
    parser = HarnessCLI()
    saved, sys.argv = sys.argv, ["memdec-eval", *argv]
    try:
        args = parser.parse_args()
    except SystemExit as e:  # --help: lm-eval's help, then memdec's section
        if e.code in (0, None) and any(a in ("-h", "--help") for a in argv):
            print(memdec_help())
        raise
    finally:
        sys.argv = saved
    try:
        if getattr(args, "command", None) == "run":
            from memdec.cli import check_device

            check_device(getattr(args, "device", None))
        _check_output_path(args)
        register_models()
        _add_task_path(args)
        with _task_manager_hook(args):
            parser.execute(args)
    except (ValueError, FileNotFoundError, FileExistsError, TokenizerMismatchError) as e:
        if os.environ.get("MEMDEC_DEBUG"):
            raise
        print(f"memdec-eval: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
