"""Issue 13: bad input ends in one line (exit 2, checked before work, nothing left behind), and no output
is lost: train/dapt/lora and --overwrite never delete files memdec did not write.

Tests run as root here, where chmod-made read-only folders stay writable; writability is tested by
denying os.access (what memdec.core.formats checks) and, for real, with an output whose parent is a file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from memdec.cli import error_text, main
from memdec.eval.launcher import cli_main

DATA = Path(__file__).parent / "data"


def one_line_error(capsys, command: str, *words: str, strict: bool = True) -> str:
    """The `memdec COMMAND: error: ...` line of stderr, checked to be the only error line and to hold `words`.

    strict: stderr is that one line and nothing else (the error came before any model was loaded)."""
    err = capsys.readouterr().err
    prefix = "memdec-eval: error:" if command == "memdec-eval" else f"memdec {command}: error:"
    lines = [ln for ln in err.splitlines() if ln.startswith(prefix)]
    # (an uncaught exception would end the in-process call; lm-eval's logging may print its own
    # "--- Logging error ---" traces when pytest swapped the stream it was set up with)
    assert len(lines) == 1 and (command == "memdec-eval" or "Traceback" not in err), err[-3000:]
    if strict:
        assert err.strip() == lines[0], err[-3000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def listing(folder: Path) -> dict[str, bytes]:
    """name -> content of every file below `folder` (to prove nothing was changed or left behind)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text((DATA / "domain.jsonl").read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    return path


TRAIN = ["--steps", "1", "--window", "16", "--batch-size", "2"]


# ---- nothing lost: train / dapt / lora outputs ----


def test_train_refuses_a_folder_of_other_files(tiny, corpus, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = listing(tmp_path)
    for cmd in (["train", "--init", tiny["memory"], "--beta", "0"], ["dapt", "--model", tiny["memory"]],
                ["lora", "--model", tiny["base"], "--rank", "1"]):
        assert main([*cmd, "--corpus", str(corpus), "--out", str(out), *TRAIN]) == 2
        one_line_error(capsys, cmd[0], str(out), "not a trained model", "--overwrite")
    assert listing(tmp_path) == before  # nothing deleted, no OUT.partial


def test_overwrite_replaces_only_memdecs_own_files(tiny, corpus, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "README.md").write_text("my readme")
    (out / "data").mkdir()
    (out / "data" / "x.bin").write_bytes(b"\x00\x01")
    foreign = {k: v for k, v in listing(out).items()}

    assert main(["dapt", "--model", tiny["memory"], "--corpus", str(corpus), "--out", str(out), "--overwrite",
                 *TRAIN]) == 0
    meta = json.loads((out / "memdec.json").read_text())
    dapt_files = {"baseline.json", "config.json", "generation_config.json", "memdec.json", "model.safetensors",
                  "tokenizer.json", "tokenizer_config.json"}
    assert set(meta["files"]) == dapt_files
    assert {p.name for p in out.iterdir()} == dapt_files | {"notes.txt", "README.md", "data"}
    assert json.loads((out / "baseline.json").read_text())["method"] == "dapt"
    assert not (tmp_path / "mine.partial").exists()

    # a rerun without --overwrite: the finished model is refused, as before
    capsys.readouterr()
    assert main(["dapt", "--model", tiny["memory"], "--corpus", str(corpus), "--out", str(out), *TRAIN]) == 2
    one_line_error(capsys, "dapt", "a trained model is already there")

    # lora over the dapt model: dapt's files that lora does not write go; the user's files stay unchanged
    assert main(["lora", "--model", tiny["base"], "--rank", "1", "--corpus", str(corpus), "--out", str(out),
                 "--overwrite", *TRAIN]) == 0
    lora_files = {"adapter_config.json", "adapter_model.safetensors", "baseline.json", "memdec.json",
                  "tokenizer.json", "tokenizer_config.json"}
    assert set(json.loads((out / "memdec.json").read_text())["files"]) == lora_files
    assert {p.name for p in out.iterdir()} == lora_files | {"notes.txt", "README.md", "data"}
    assert {k: v for k, v in listing(out).items() if k in foreign} == foreign


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_train_out_a_file_refused_before_training(tiny, corpus, tmp_path, capsys, overwrite):
    out = tmp_path / "afile"
    out.write_text("x")
    assert main(["train", "--init", tiny["memory"], "--beta", "0", "--corpus", str(corpus), "--out", str(out),
                 *TRAIN, *overwrite]) == 2
    one_line_error(capsys, "train", str(out), "is a file")
    assert out.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "corpus.jsonl"]


def test_train_on_an_interrupted_datastore(tiny, tiny_datastore, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(tiny_datastore, tmp_path / "ds.partial")  # as a killed build leaves it
    assert main(["train", "--init", tiny["memory"], "--datastore", str(ds), "--out", str(tmp_path / "m")]) == 2
    one_line_error(capsys, "train", str(ds), "not complete", "ds.partial")
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


def test_lora_missing_model(corpus, tmp_path, capsys):
    assert main(["lora", "--model", str(tmp_path / "missing"), "--corpus", str(corpus),
                 "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "lora", "missing", "no such folder")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


# ---- datastore, index, targets ----


def ds_cmd(tiny, corpus, out, *extra) -> list[str]:
    return ["datastore", "--model", tiny["base"], "--corpus", str(corpus), "--out", str(out), "--window", "16",
            "--device", "cpu", *extra]


@pytest.mark.parametrize("extra, words", [
    (["--shard-rows", "0"], ["shard-rows", ">= 1", "got 0"]),
    (["--max-docs", "-1"], ["max-docs", ">= 1", "got -1"]),
    (["--max-docs", "0"], ["max-docs", ">= 1", "got 0"]),
    (["--device", "tpu9"], ["--device tpu9", "not a device"]),
])
def test_datastore_bad_numbers_and_devices(tiny, corpus, tmp_path, capsys, extra, words):
    assert main(ds_cmd(tiny, corpus, tmp_path / "ds", *extra)) == 2
    one_line_error(capsys, "datastore", *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("command", ["datastore", "generate"])
def test_device_cuda_without_cuda(tiny, corpus, tmp_path, capsys, command):
    argv = (ds_cmd(tiny, corpus, tmp_path / "ds") if command == "datastore" else
            ["generate", "--base", tiny["base"], "--memory", tiny["memory"], "--prompt", "a"])
    assert main([*argv, "--device", "cuda"]) == 2
    one_line_error(capsys, command, "--device cuda", "no CUDA GPU")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]


def test_datastore_outputs_that_cannot_be_written(tiny, corpus, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(ds_cmd(tiny, corpus, afile, "--overwrite")) == 2
    one_line_error(capsys, "datastore", str(afile), "is a file, not a folder")
    assert main(ds_cmd(tiny, corpus, afile / "ds")) == 2  # fails for root too
    one_line_error(capsys, "datastore", str(afile / "ds"), f"{afile} is a file")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main(ds_cmd(tiny, corpus, mine, "--overwrite")) == 2  # --overwrite replaces only a datastore
    one_line_error(capsys, "datastore", str(mine), "not a datastore")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "corpus.jsonl", "mine"]
    assert afile.read_text() == "x" and listing(mine) == {"notes.txt": b"mine"}


def test_read_only_output_folder(tiny, corpus, tmp_path, capsys, monkeypatch):
    """As root chmod does not stop writes, so the check (os.access) is told that tmp_path/ro is read-only."""
    import memdec.core.formats as formats

    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(formats.os, "access", lambda p, mode, **kw: False if Path(p) == ro else real(p, mode, **kw))
    with pytest.raises(ValueError, match="is not writable"):
        formats.check_output_dir(ro / "x" / "y")
    assert main(ds_cmd(tiny, corpus, ro / "ds")) == 2
    one_line_error(capsys, "datastore", str(ro / "ds"), f"folder {ro} is not writable")
    assert main(["train", "--init", tiny["memory"], "--beta", "0", "--corpus", str(corpus), "--out", str(ro),
                 *TRAIN]) == 2
    one_line_error(capsys, "train", str(ro), "not writable")
    assert main(["report", str(DATA), "--out", str(ro / "r")]) == 2
    one_line_error(capsys, "report", "not writable")
    assert list(ro.iterdir()) == []


def test_non_utf8_corpus_names_file_and_offset(tiny, tmp_path, capsys):
    text = json.dumps({"text": "a plain first document " * 4}) + "\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(text.encode() + b'{"text": "caf\xe9"}\n')
    offset = len(text.encode()) + len(b'{"text": "caf')  # where 0xe9 sits, counted by hand
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"hello " * 10 + b"\xff")
    for path, byte, at in ((bad, "0xe9", offset), (txt, "0xff", 60)):
        assert main(ds_cmd(tiny, path, tmp_path / "ds")) == 2
        one_line_error(capsys, "datastore", str(path), "not UTF-8", f"byte {byte} at offset {at}")
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.partial").exists()


def test_index_and_targets_errors(tiny_datastore, tmp_path, capsys):
    before = listing(Path(tiny_datastore))
    assert main(["index", "--datastore", tiny_datastore, "--backend", "faiss-ivfpq", "--nprobe", "0",
                 "--out", str(tmp_path / "idx")]) == 2
    one_line_error(capsys, "index", "nprobe", ">= 1", "got 0")
    assert main(["index", "--datastore", tiny_datastore, "--backend", "faiss-ivfpq", "--k-factor", "0",
                 "--out", str(tmp_path / "idx")]) == 2
    one_line_error(capsys, "index", "k_factor (--k-factor)", ">= 1", "got 0")
    assert main(["index", "--datastore", tiny_datastore, "--backend", "faiss-flat", "--k-factor", "2",
                 "--out", str(tmp_path / "idx")]) == 2
    one_line_error(capsys, "index", "k_factor = 2: only for faiss-ivfpq")
    assert not (tmp_path / "idx").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["index", "--datastore", tiny_datastore, "--out", str(afile / "idx")]) == 2
    one_line_error(capsys, "index", f"{afile} is a file")
    assert main(["targets", "--datastore", tiny_datastore, "--k", "4", "--device", "cpu",
                 "--out", str(afile / "t")]) == 2
    one_line_error(capsys, "targets", f"{afile} is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and listing(Path(tiny_datastore)) == before


def test_pipeline_k_larger_than_the_datastore(tiny, tiny_datastore, tmp_path, capsys):
    import yaml

    from memdec.pipeline.datastore import Datastore

    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(tiny_datastore, run / "datastore")  # complete: its row count is known before any stage
    n = Datastore.open(run / "datastore").n
    cfg = {"output": str(run), "corpus": str(DATA / "domain.jsonl"), "base_model": tiny["base"],
           "datastore": {"window": 64, "stride": 48, "batch_size": 3, "shard_rows": 2500, "device": "cpu"},
           "index": {"backend": "torch"}, "targets": {"k": n}, "train": {"init": tiny["memory"], "steps": 1}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["pipeline", str(path)]) == 2
    one_line_error(capsys, "pipeline", "targets.k", f"k = {n}", f"at most {n - 1}", strict=False)
    assert sorted(p.name for p in run.iterdir()) == ["datastore"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    path.write_text(yaml.safe_dump({**cfg, "output": str(afile / "run")}))
    assert main(["pipeline", str(path)]) == 2
    one_line_error(capsys, "pipeline", "output", f"{afile} is a file")


# ---- report, tune-lambda, generate ----


def test_report_out_md_is_a_folder(tmp_path, capsys):
    (tmp_path / "r.md").mkdir()
    assert main(["report", str(DATA), "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, "report", "r.md", "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.md"] and not any((tmp_path / "r.md").iterdir())


def test_tune_lambda_checks_every_output_before_scoring(tiny, tmp_path, capsys):
    memory = tmp_path / "memory"
    shutil.copytree(tiny["memory"], memory)
    (memory / "memdec.json").write_text(json.dumps({"format_version": 1, "lmbda": 0.25}))
    before = listing(tmp_path)
    argv = ["tune-lambda", "--base", tiny["base"], "--memory", str(memory), "--data", str(DATA / "domain.jsonl"),
            "--window", "16", "--grid", "0,0.5", "--write", "--device", "cpu", "--cache", str(tmp_path / "cache")]
    assert main([*argv, "--plot", str(tmp_path / "missing" / "dir" / "c.png")]) == 2
    one_line_error(capsys, "tune-lambda", "--plot", "missing/dir", "does not exist")
    (tmp_path / "c.png").mkdir()
    assert main([*argv, "--plot", str(tmp_path / "c.png")]) == 2
    one_line_error(capsys, "tune-lambda", "--plot", "is a folder")
    (tmp_path / "c.png").rmdir()
    assert listing(tmp_path) == before and not (tmp_path / "cache").exists()  # memdec.json untouched


@pytest.mark.parametrize("extra, words", [
    (["--prompt", ""], ["--prompt", "empty prompt"]),
    (["--prompt", "a", "--top-p", "2", "--do-sample"], ["--top-p", "(0, 1]", "got 2"]),
    (["--prompt", "a", "--top-p", "0"], ["--top-p", "got 0"]),
])
def test_generate_bad_settings(tiny, capsys, extra, words):
    assert main(["generate", "--base", tiny["base"], "--memory", tiny["memory"], *extra]) == 2
    one_line_error(capsys, "generate", *words)


def truncated_memory(tiny, tmp_path) -> Path:
    memory = tmp_path / "memory"
    shutil.copytree(tiny["memory"], memory)
    weights = memory / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return memory


def test_truncated_memory_weights(tiny, tmp_path, capsys):
    memory = truncated_memory(tiny, tmp_path)
    assert main(["generate", "--base", tiny["base"], "--memory", str(memory), "--prompt", "a", "--device", "cpu"]) == 2
    one_line_error(capsys, "generate", str(memory), "truncated or corrupt", strict=False)
    assert cli_main(["--model", "memdec", "--model_args", f"pretrained={tiny['base']},memory={memory}",
                     "--tasks", "memdec_wikitext103", "--device", "cpu", "--output_path", str(tmp_path / "r")]) == 2
    one_line_error(capsys, "memdec-eval", str(memory), "truncated or corrupt", strict=False)
    assert not (tmp_path / "r").exists()


# ---- memdec-eval ----


def test_memdec_eval_output_path_where_lm_eval_would_not_save(tiny, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    common = ["--model", "hf", "--model_args", f"pretrained={tiny['base']}", "--tasks", "memdec_wikitext103",
              "--device", "cpu"]
    for path, words in ((afile, ["is a file", "folder"]), (afile / "sub", [f"{afile} is a file"]),
                        (afile / "r.json", ["its folder", "is a file"])):
        assert cli_main([*common, "--output_path", str(path)]) == 2
        one_line_error(capsys, "memdec-eval", f"--output_path {path}", *words)
    assert afile.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_memdec_eval_model_args_named(tiny, tiny_datastore, capsys):
    assert cli_main(["--model", "knnlm", "--model_args", f"pretrained={tiny['base']},datastore={tiny_datastore},k=abc",
                     "--tasks", "memdec_wikitext103", "--device", "cpu"]) == 2
    one_line_error(capsys, "memdec-eval", "knnlm: k must be an integer, got 'abc'", strict=False)
    # the closing quote of a message ending in a quoted value is kept
    assert cli_main(["--model", "memdec", "--model_args", f"pretrained={tiny['base']},memory={tiny['memory']},fast=abc",
                     "--tasks", "memdec_wikitext103", "--device", "cpu"]) == 2
    assert one_line_error(capsys, "memdec-eval", strict=False).endswith("got 'abc'")
    assert error_text(KeyError("no field 'abc'")) == "no field 'abc'"
    assert error_text(ValueError("got 'abc'")) == "got 'abc'"


def test_memdec_eval_help_has_a_memdec_section(capsys):
    from memdec.eval.launcher import tasks_dir

    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "lm-eval" in out  # lm-eval's own help, then memdec's
    section = out[out.index("memdec (memdec-eval"):]
    for words in ("memdec ", "memory=MEMDEC_DIR", "lmbda=None", "mem_temperature=1.0", "knnlm",
                  "datastore=DATASTORE_DIR", "k=1024", "incontext_rag", "max_doc_tokens=256", "peft=DIR",
                  tasks_dir(), "memdec_wikitext103", "memdec_domain_ppl"):
        assert words in section, words


def test_incontext_rag_says_what_max_doc_tokens_it_used(tiny, caplog):
    import logging

    from baselines.incontext_rag import InContextRAG

    with caplog.at_level(logging.WARNING):
        lm = InContextRAG(pretrained=tiny["base"], max_doc_tokens=5000, stride=4, device="cpu", batch_size=1)
    used = 256 - 4 - len(lm.tokenizer.encode("\n\n", add_special_tokens=False)) - 1  # tiny GPT-2: 256 positions
    assert lm.max_length == 256 and lm.doc_budget == used
    (msg,) = [r.getMessage() for r in caplog.records if "max_doc_tokens" in r.getMessage()]
    assert "\n" not in msg and "max_doc_tokens 5000" in msg and msg.endswith(f"using {used}")


# ---- experiments/offline_reproduction/stage_inputs.sh ----


def test_stage_inputs_default_is_relative_to_the_checkout(tmp_path):
    script = Path(__file__).parents[1] / "experiments" / "offline_reproduction" / "stage_inputs.sh"
    checkout = tmp_path / "checkout"
    (checkout / "experiments" / "offline_reproduction").mkdir(parents=True)
    copy = checkout / "experiments" / "offline_reproduction" / "stage_inputs.sh"
    shutil.copy(script, copy)
    proc = subprocess.run(["bash", str(copy)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "pass it as SOURCE" in proc.stderr
    for name in ("general", "bio", "finance", "law"):  # ../shared/corpora beside the checkout
        (tmp_path / "shared" / "corpora" / name).mkdir(parents=True)
        for split in ("train", "valid", "test"):
            (tmp_path / "shared" / "corpora" / name / f"{split}.jsonl.gz").write_bytes(f"{name}/{split}".encode())
    proc = subprocess.run(["bash", str(copy)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (checkout / ".device" / "corpora" / "law" / "test.jsonl.gz").read_bytes() == b"law/test"
