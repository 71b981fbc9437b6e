"""The offline reproduction's scheduler: named stages that resume, and jobs spread over the GPUs (issue 14).

- `Stages`: runs a job's named stages, skipping those whose output is complete, and records each stage's
  status ("ran" / "skipped") and wall time in RUN/times/JOB.json (a resumed run keeps the earlier seconds).
- `run_jobs`: runs jobs ("pretrain:BASE", "domain:DOM", ...) one after another in this process, or as
  parallel worker processes (one log each, CUDA_VISIBLE_DEVICES from `assign_gpus`); returns the failed ones.
- `write_times`: RUN/times.json, every invocation's wall time and every job's stage times.

Nothing here knows the recipe: run.py names the jobs, their weights and the worker command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memdec.core.formats import read_json, write_json


class Stages:
    """Runs named stages, skipping complete ones, and records their wall time in TIMES/JOB.json."""

    def __init__(self, times: str | os.PathLike, job: str):
        self.job = job
        self.file = Path(times) / f"{job.replace(':', '-')}.json"
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = read_json(self.file) if self.file.exists() else {}

    def __call__(self, name: str, done: bool, fn: Callable[[], Any]) -> None:
        """Run `fn` as stage `name` unless `done`; either way record the stage."""
        if done:
            print(f"[{self.job}] {name}: complete, skipped", flush=True)
            before = self.data.get(name, {})
            rec = {"status": "skipped", **({"seconds": before["seconds"]} if "seconds" in before else {})}
        else:
            print(f"[{self.job}] {name}: running", flush=True)
            t0 = time.perf_counter()
            fn()
            rec = {"status": "ran", "seconds": round(time.perf_counter() - t0, 2)}
            print(f"[{self.job}] {name}: done in {rec['seconds']:.1f} s", flush=True)
        self.data[name] = rec
        write_json(self.file, self.data)


def gpu_info() -> dict[str, Any]:
    """torch / transformers versions, the GPU count and names."""
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "n_gpus": torch.cuda.device_count()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def assign_gpus(weights: dict[str, float], n_gpus: int) -> dict[str, int]:
    """Greedy: heaviest job first, onto the least loaded GPU."""
    load = [0.0] * max(1, n_gpus)
    out = {}
    for name, w in sorted(weights.items(), key=lambda kv: -kv[1]):
        g = min(range(len(load)), key=lambda i: load[i])
        out[name] = g
        load[g] += w
    return out


def run_jobs(jobs: list[str], run_job: Callable[[str], None], command: Callable[[str], list[str]],
             weights: dict[str, float], n_gpus: int, serial: bool, logs: Path, root: Path,
             stall_s: float | None = None) -> list[str]:
    """Run `jobs`; returns the failed ones (the others keep going: the report shows what finished).

    `serial`: `run_job(job)` in this process, one after another. Else one worker process per job,
    `command(job)` run in `root` (on PYTHONPATH) with its output in LOGS/JOB.log, on the GPU `assign_gpus`
    gives it by `weights`, with the CPU threads shared between the workers and a compile cache of its own
    (`worker_env`). With `stall_s`, a worker whose log has not grown for that long is killed (with the processes
    it started) and started again, once (it resumes from its last finished stage); stalled twice, it fails."""
    failed = []
    if serial:
        for job in jobs:
            try:
                run_job(job)
            except Exception as e:  # keep going: the report shows what finished
                print(f"[{job}] FAILED: {type(e).__name__}: {e}", flush=True)
                failed.append(job)
        return failed
    gpus = assign_gpus({j: weights.get(j, 1.0) for j in jobs}, n_gpus)
    threads = max(1, (os.cpu_count() or 2) // max(1, len(jobs)))
    logs.mkdir(parents=True, exist_ok=True)
    procs: dict[str, tuple[subprocess.Popen, Any]] = {}

    def start(job: str) -> None:
        env = worker_env(job, gpus[job], threads, root, logs.parent / "cache")
        log = open(logs / f"{job.replace(':', '-')}.log", "a", encoding="utf-8")
        print(f"started {job} on GPU {gpus[job]} (log {log.name})", flush=True)
        procs[job] = (subprocess.Popen(command(job), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(root),
                                       start_new_session=True), log)

    for job in jobs:
        start(job)
    restarted: set[str] = set()
    while procs:
        for job, (proc, log) in list(procs.items()):
            rc, why = proc.poll(), ""
            if rc is None and stall_s is not None and time.time() - os.path.getmtime(log.name) > stall_s:
                _kill_group(proc)
                rc, why = proc.wait(), f"stalled: no output for {stall_s:g} s, killed; "
            if rc is None:
                continue
            del procs[job]
            log.close()
            if why and job not in restarted:  # once: the new worker skips every finished stage
                restarted.add(job)
                print(f"[{job}] {why}restarting it once", flush=True)
                start(job)
            elif rc != 0 or why:
                failed.append(job)
                tail = Path(log.name).read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
                print(f"[{job}] FAILED ({why}exit {rc}); last lines of {log.name}:\n" + "\n".join(tail), flush=True)
            else:
                print(f"finished {job}", flush=True)
        if procs:
            time.sleep(1.0)
    return failed


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill a worker and every process it started (its own session)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def worker_env(job: str, gpu: int, threads: int, root: Path, cache: Path) -> dict[str, str]:
    """A worker's environment: its GPU, its CPU threads, `root` on PYTHONPATH, and torch.compile's inductor
    and triton caches in CACHE/compile/JOB (below an inductor cache dir the user set, if any): workers
    compiling the same graphs at once never share one cache folder (on 2026-12-04 one of three concurrent
    workers hung in its first compile, the others took 3-5x their usual compile time)."""
    name = job.replace(":", "-")
    user = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    compile_cache = (Path(user) if user else cache / "compile") / name
    return dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu), OMP_NUM_THREADS=str(threads),
                PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                TOKENIZERS_PARALLELISM="true" if job.startswith("pretrain") else "false",
                TORCHINDUCTOR_CACHE_DIR=str(compile_cache), TRITON_CACHE_DIR=str(compile_cache / "triton"))


def worker_command(script: str | os.PathLike, job: str, argv: list[str]) -> list[str]:
    """The command of one worker: this Python on `script` with `argv` and `--job JOB`."""
    return [sys.executable, str(Path(script).resolve()), *argv, "--job", job]


def write_times(run: Path, info: dict[str, Any], phases: dict[str, float], total: float | None,
                started: str | None = None) -> None:
    """RUN/times.json: device, this invocation's phases, every invocation's wall time (a resumed run adds
    one), their sum as total_s, and each job's stage times (RUN/times/*.json)."""
    times = run / "times"
    jobs = {f.stem: read_json(f) for f in sorted(times.glob("*.json"))} if times.exists() else {}
    old = read_json(run / "times.json") if (run / "times.json").exists() else {}
    invocations = dict(old.get("invocations_s", {}))
    if started is not None and total is not None:
        invocations[started] = round(total, 1)
    phases = phases or old.get("phases_s", {})  # a report-only refresh keeps the last phases
    write_json(run / "times.json", {"device": info, "phases_s": {k: round(v, 1) for k, v in phases.items()},
                                    "invocations_s": invocations,
                                    "total_s": round(sum(invocations.values()), 1), "jobs": jobs})
