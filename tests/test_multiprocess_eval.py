"""lm-eval with several processes (torchrun, 2 CPU processes, gloo) gives the one-process numbers.

The perplexity tasks build the one-process token stream and windows on every process, split the windows
across processes and gather their scores (lm_eval_tasks/utils.py); memdec's models split requests across
CPU processes (memdec.harness.cpu_data_parallel). Zero-shot tasks are split by lm-eval itself.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from test_train import _run_group

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "data" / "tasks"
PPL_TASKS = ["memdec_law_ppl", "memdec_bio_ppl"]  # 2 and 3 documents: uneven blocks over 2 processes
PPL_METRICS = ["token_perplexity,none", "word_perplexity,none", "bits_per_byte,none"]

RUN = r"""
import json, os, sys
import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from baselines.knnlm import KNNLM
from memdec.eval.models import MemDecLM, cpu_data_parallel

p, out = json.loads(sys.argv[1]), sys.argv[2]
rank = int(os.environ.get("RANK", "0"))
meta = {"data_dir": p["fixtures"], "ppl_window": 48, "ppl_stride": 16}
common = {"batch_size": 4, "device": "cpu"}
models = {
    "hf": lambda: cpu_data_parallel(HFLM(pretrained=p["base"], dtype="float64", **common)),
    "memdec": lambda: MemDecLM.create_from_arg_string(
        f"pretrained={p['base']},memory={p['memory']},lmbda=0.3,dtype=float64", common),
    "knnlm": lambda: KNNLM.create_from_arg_string(
        f"pretrained={p['base']},datastore={p['datastore']},k=8,lmbda=0.25,dtype=float64", common),
}
report = {}
for name, make in models.items():
    lm = make()
    inner, windows = lm._loglikelihood_tokens, []
    def counting(requests, inner=inner, windows=windows, **kw):
        windows.append(sum(":window:" in r[0][0] for r in requests))
        return inner(requests, **kw)
    lm._loglikelihood_tokens = counting
    runs = {"all": (p["ppl"] + ["memdec_rte"], None)}
    if name == "hf":
        runs["limit2"] = (p["ppl"], 2)
    for run, (tasks, limit) in runs.items():
        windows.clear()
        tm = TaskManager(include_path=p["tasks"], include_defaults=False, metadata=meta)
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit)
        entry = {"world_size": lm.world_size, "windows": sum(windows)}
        if res is not None:
            entry["results"] = {t: {k: v for k, v in r.items() if isinstance(v, (int, float))}
                                for t, r in res["results"].items()}
        report[f"{name}/{run}"] = entry
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(report, f)
"""


def _run(script: Path, args: list[str], processes: int, out: Path) -> dict[int, dict]:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    launch = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    proc = _run_group([*launch, str(script), *args, str(out)], env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)}


def test_two_processes_give_the_one_process_numbers(tiny, tiny_datastore, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN)
    paths = json.dumps({"base": tiny["base"], "memory": tiny["memory"], "datastore": tiny_datastore,
                        "fixtures": str(FIXTURES), "tasks": str(ROOT / "lm_eval_tasks"), "ppl": PPL_TASKS})
    one = _run(script, [paths], 1, tmp_path / "one")[0]
    two = _run(script, [paths], 2, tmp_path / "two")
    assert set(one) == {"hf/all", "hf/limit2", "memdec/all", "knnlm/all"}
    for key, ref in one.items():
        assert ref["world_size"] == 1 and two[0][key]["world_size"] == two[1][key]["world_size"] == 2, key
        # each process scored its half of the windows (plus at most one repeat per task, to even them out)
        total, half = ref["windows"], two[0][key]["windows"]
        assert total > 10 and half == two[1][key]["windows"] and total // 2 <= half <= total // 2 + 2, key
        assert "results" not in two[1][key]
        got, want = two[0][key]["results"], ref["results"]
        assert set(got) == set(want), key
        for task in want:
            metrics = PPL_METRICS if task in PPL_TASKS else ["acc,none", "acc_dcpmi,none"]
            for m in metrics:
                assert got[task][m] == want[task][m], (key, task, m)  # bit-identical
            assert got[task]["sample_len"] == want[task]["sample_len"], (key, task)
    # --limit keeps its meaning: the first 2 documents of each task, however many processes
    assert one["hf/limit2"]["results"]["memdec_bio_ppl"]["sample_len"] == 2
    lim, full = one["hf/limit2"]["results"]["memdec_bio_ppl"], one["hf/all"]["results"]["memdec_bio_ppl"]
    assert lim["token_perplexity,none"] != full["token_perplexity,none"]
    # the mixtures differ from the base (the models really ran)
    for model in ("memdec", "knnlm"):
        assert one[f"{model}/all"]["results"]["memdec_law_ppl"]["token_perplexity,none"] != pytest.approx(
            one["hf/all"]["results"]["memdec_law_ppl"]["token_perplexity,none"], rel=1e-6)


def _task(name: str):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(ROOT / "lm_eval_tasks"), include_defaults=False,
                     metadata={"data_dir": str(FIXTURES), "ppl_window": 48, "ppl_stride": 16})
    return tm.load([name])["tasks"][name]


def test_every_process_builds_every_document_and_reports_a_block():
    task = _task("memdec_bio_ppl")  # 3 documents
    texts = [json.loads(line)["text"] for line in (FIXTURES / "memdec_bio_ppl.jsonl").read_text().splitlines()]
    for limit, n in ((None, 3), (2, 2)):
        task.build_all_requests(rank=1, world_size=2, limit=limit)
        assert [(i.doc_id, i.args[0]) for i in task.instances] == list(enumerate(texts[:n]))
        blocks = [[d for d, _ in task.doc_iterator(rank=r, world_size=2, limit=limit)] for r in range(2)]
        assert blocks == ([[0], [1, 2]] if n == 3 else [[0], [1]])
        assert [d for d, _ in task.doc_iterator(limit=limit)] == list(range(n))  # one process: as lm-eval's
    with pytest.raises(ValueError, match=r"memdec_bio_ppl: 3 document\(s\) for 4 processes; run with at most 3"):
        task.build_all_requests(rank=0, world_size=4)
