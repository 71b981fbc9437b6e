"""reports/: tables from hand-written lm-eval results (tests/data/results) hold exactly the numbers put there."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

import reports
from memdec.cli import main
from reports.load import SkippedFileWarning
from reports.report import ConflictWarning

DATA = Path(__file__).parent / "data"
RESULTS = DATA / "results"
GPT2_BASE = RESULTS / "gpt2" / "results_2026-01-01T10-00-00.000001.json"
GPT2_MEMDEC = RESULTS / "gpt2" / "results_2026-01-01T11-00-00.000001.json"
NAN = float("nan")


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    return reports.load_results([RESULTS])


def md_rows(md: str) -> list[list[str]]:
    """Cells of a markdown table (the first table in `md`), header row first."""
    lines = [line for line in md.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for i, line in enumerate(lines) if i != 1]


def assert_frame(table: pd.DataFrame, expected: dict) -> None:
    """Every (row, column) of `expected` matches, NaN for NaN; and the table has no other rows/columns."""
    assert set(table.index) == set(expected)
    for row, cols in expected.items():
        assert list(table.columns) == list(cols), row
        for col, want in cols.items():
            got = table.at[row, col]
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-12), (row, col, got)


def test_long_form_one_row_per_run_task_metric(df):
    # 8 results files; samples_*.jsonl is ignored
    assert df["file"].nunique() == 8
    raw = json.loads(GPT2_BASE.read_text())
    n_metrics = sum(1 for m in raw["results"].values() for k, v in m.items()
                    if "," in k and "_stderr," not in k and isinstance(v, int | float))
    assert (df["file"] == str(GPT2_BASE.resolve())).sum() == n_metrics
    row = df[(df["file"] == str(GPT2_MEMDEC.resolve())) & (df["task"] == "memdec_law_ppl")
             & (df["metric"] == "token_perplexity")].iloc[0]
    assert (row["method"], row["base"], row["label"], row["lmbda"], row["value"]) == ("memdec", "gpt2", "+MemDec", 0.6, 5.0)
    assert (row["window"], row["stride"], row["memory"]) == (1024, 512, "runs/memdec-gpt2-bio")
    assert not df.duplicated(["file", "task", "metric", "filter"]).any()


def test_methods_labelled_from_config_not_folders(df):
    labels = df.drop_duplicates("file").set_index("file")[["method", "base", "label"]]
    got = {Path(f).name[8:27]: tuple(r) for f, r in labels.iterrows()}
    assert got == {
        "2026-01-01T10-00-00": ("base", "gpt2", "base"),
        "2026-01-01T11-00-00": ("memdec", "gpt2", "+MemDec"),
        "2026-01-01T12-00-00": ("knnlm", "gpt2", "+kNN-LM"),
        "2026-01-01T13-00-00": ("rag", "gpt2", "+In-Context RAG"),
        "2026-01-01T14-00-00": ("dapt", "gpt2", "+DAPT"),  # --metadata method/base
        "2026-01-01T15-00-00": ("lora", "gpt2", "+LoRA"),  # peft=
        "2026-01-02T10-00-00": ("base", "gpt2-medium", "base"),
        "2026-01-02T11-00-00": ("memdec", "gpt2-medium", "+MemDec"),
    }


def test_perplexity_table_exact(df):
    t = reports.perplexity_table(df)
    assert t.attrs["task"] == "memdec_wikitext103" and t.attrs["metric"] == "token_perplexity"
    assert list(t.index) == ["base", "+In-Context RAG", "+kNN-LM", "+DAPT", "+LoRA", "+MemDec"]
    assert_frame(t, {
        "base": {"gpt2": 24.89, "gpt2-medium": 18.29},
        "+In-Context RAG": {"gpt2": 22.2, "gpt2-medium": NAN},
        "+kNN-LM": {"gpt2": 15.8, "gpt2-medium": NAN},
        "+DAPT": {"gpt2": 16.9, "gpt2-medium": NAN},
        "+LoRA": {"gpt2": 19.35, "gpt2-medium": NAN},
        "+MemDec": {"gpt2": 14.57, "gpt2-medium": 12.34},
    })
    rows = md_rows(reports.to_markdown(t))
    assert rows[0] == ["Method", "gpt2", "gpt2-medium"]
    cells = {r[0]: r[1:] for r in rows[1:]}
    assert cells["base"] == ["24.89", "18.29"]
    assert cells["+kNN-LM"] == ["15.80 (−9.09)", "–"]  # missing: a dash, never 0
    assert cells["+MemDec"] == ["**14.57** (−10.32)", "**12.34** (−5.95)"]  # best per column in bold
    md = reports.to_markdown(t)
    assert "window/stride: 1024/512" in md and "lmbda: +MemDec 0.6 (gpt2, gpt2-medium), +kNN-LM 0.25 (gpt2)" in md


def test_domain_table_exact_and_partial_avg_is_a_dash(df):
    t = reports.domain_table(df)
    assert_frame(t, {
        ("gpt2", "base"): {"Bio": 15.0, "Fin": 20.0, "Law": 10.0, "Avg": 15.0},
        ("gpt2", "+LoRA"): {"Bio": 12.0, "Fin": 16.0, "Law": 8.0, "Avg": 12.0},
        ("gpt2", "+MemDec"): {"Bio": 7.0, "Fin": 9.0, "Law": 5.0, "Avg": 7.0},
        ("gpt2-medium", "base"): {"Bio": 12.0, "Fin": 15.0, "Law": NAN, "Avg": NAN},
        ("gpt2-medium", "+MemDec"): {"Bio": 6.0, "Fin": 8.0, "Law": 4.0, "Avg": 6.0},
    })
    rows = md_rows(reports.to_markdown(t))
    assert rows[0] == ["Base model", "Method", "Bio", "Fin", "Law", "Avg"]
    assert rows[4] == ["gpt2-medium", "base", "12.00", "15.00", "–", "–"]
    assert rows[5] == ["", "+MemDec", "**6.00** (−6.00)", "**8.00** (−7.00)", "4.00", "6.00"]
    assert not any(c in ("0", "0.00", "nan", "NaN") for r in rows for c in r)


def test_zeroshot_tables_exact(df):
    raw = json.loads(GPT2_MEMDEC.read_text())["results"]
    names = ["sst2", "mr", "cr", "rt", "hyp", "cb", "rte", "agnews", "yahoo"]
    for acc, metric in (("dcpmi", "acc_dcpmi"), ("acc", "acc")):
        t = reports.zeroshot_table(df, acc)
        assert t.attrs["metric"] == metric
        assert list(t.columns) == ["SST2", "MR", "CR", "RT", "HYP", "CB", "RTE", "AGN", "Yahoo", "Avg"]
        want = [100 * raw[f"memdec_{n}"][f"{metric},none"] for n in names]
        assert list(t.loc[("gpt2", "+MemDec")])[:9] == pytest.approx(want, rel=1e-12)
        assert t.at[("gpt2", "+MemDec"), "Avg"] == pytest.approx(sum(want) / 9, rel=1e-12)
        # lm-eval's own group average agrees with ours
        assert t.at[("gpt2", "+MemDec"), "Avg"] == pytest.approx(100 * raw["memdec_zeroshot9"][f"{metric},none"])
    t = reports.zeroshot_table(df, "dcpmi")
    rows = md_rows(reports.to_markdown(t))
    assert rows[1][:3] == ["gpt2", "base", "80.00"] and rows[1][-1] == "62.11"  # (80+75+70+72+55+50+52+60+45)/9
    assert rows[2][-1] == "**65.44** (+3.33)"


def test_real_lm_eval_files_are_read():
    df = reports.load_results([DATA / "results_lmeval"])
    assert df["file"].nunique() == 3
    ppl = df[(df["task"] == "tiny_ppl") & (df["metric"] == "bits_per_byte")].iloc[0]
    assert ppl["value"] == pytest.approx(4.9636759596256965) and ppl["method"] == "base"
    assert ppl["n_params"] == 142080 and ppl["window"] == 256  # lm-eval rolling windows: max_length
    acc = df[(df["task"] == "tiny_mc") & (df["metric"] == "acc")].iloc[0]
    assert acc["value"] == 0.5 and acc["stderr"] == pytest.approx(0.28867513459481287)
    t = reports.perplexity_table(df, "tiny_ppl")
    assert t.attrs["metric"] == "word_perplexity" and t.at["base", "base"] == pytest.approx(3012511011.7439055)
    # memdec-eval runs of memdec's own tasks: base and +MemDec of one base model, window 64 / stride 32
    memdec_file = DATA / "results_lmeval" / "results_2026-11-25T18-38-25.404719.json"
    raw = json.loads(memdec_file.read_text())
    t = reports.perplexity_table(df)
    assert t.attrs["task"] == "memdec_wikitext103" and list(t.index) == ["base", "+MemDec"]
    assert t.at["+MemDec", "base"] == raw["results"]["memdec_wikitext103"]["token_perplexity,none"]
    assert t.attrs["windows"] == [(64, 32)] and t.attrs["lmbda"] == {("base", "+MemDec"): 0.3}
    zs = reports.zeroshot_table(df, "dcpmi")
    assert zs.at[("base", "+MemDec"), "SST2"] == 100 * raw["results"]["memdec_sst2"]["acc_dcpmi,none"]
    assert math.isnan(zs.at[("base", "+MemDec"), "MR"]) and math.isnan(zs.at[("base", "+MemDec"), "Avg"])


def _copy(src: Path, dst: Path, **edit) -> Path:
    data = json.loads(src.read_text())
    for dotted, value in edit.items():
        *path, last = dotted.split("__")
        node = data
        for key in path:
            node = node[key]
        node[last] = value
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(data))
    return dst


def test_conflicting_duplicates_reported(tmp_path):
    runs = tmp_path / "runs"
    shutil.copy(GPT2_BASE, (runs / "a").mkdir(parents=True) or runs / "a" / GPT2_BASE.name)
    shutil.copy(GPT2_BASE, (runs / "b").mkdir() or runs / "b" / GPT2_BASE.name)  # identical rerun: fine
    edited = {"results": json.loads(GPT2_BASE.read_text())["results"]}
    edited["results"]["memdec_bio_ppl"]["token_perplexity,none"] = 15.5
    bad = _copy(GPT2_BASE, runs / "c" / "results_2026-02-01T00-00-00.json", results=edited["results"])
    df = reports.load_results([runs])
    conflicts = reports.find_conflicts(df)
    assert set(conflicts["task"]) == {"memdec_bio_ppl"} and set(conflicts["metric"]) == {"token_perplexity"}
    assert sorted(conflicts["value"]) == [15.0, 15.0, 15.5] and str(bad.resolve()) in set(conflicts["file"])
    t = reports.domain_table(df)
    assert math.isnan(t.at[("gpt2", "base"), "Bio"]) and t.at[("gpt2", "base"), "Fin"] == 20.0
    assert md_rows(reports.to_markdown(t))[1][2] == "conflict"
    with pytest.warns(ConflictWarning, match="1 results differ"):
        out = reports.write_report([runs], tmp_path / "rep" / "r")
    md = out["md"].read_text()
    assert "## Conflicting duplicates" in md and str(bad.resolve()) in md


def test_variants_lmbda_sweep_and_size_plot(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(RESULTS, runs)
    for i, lm in enumerate((0.2, 0.8)):
        _copy(GPT2_MEMDEC, runs / "sweep" / f"results_2026-03-0{i + 1}T00-00-00.json",
              config__model_args={"pretrained": "openai-community/gpt2", "memory": "runs/memdec-gpt2-bio", "lmbda": lm},
              results={"memdec_wikitext103": {"token_perplexity,none": 20.0 - 10 * lm}})
    df = reports.load_results([runs])
    t = reports.perplexity_table(df)
    assert "+MemDec (lmbda=0.2)" in t.index and t.at["+MemDec (lmbda=0.6)", "gpt2"] == 14.57
    assert t.at["+MemDec (lmbda=0.8)", "gpt2"] == pytest.approx(12.0)
    assert t.at["+MemDec", "gpt2-medium"] == 12.34  # one lmbda on gpt2-medium: no suffix there
    curve = reports.lmbda_curve(df)
    gpt2 = curve[(curve["task"] == "memdec_wikitext103") & (curve["base"] == "gpt2")]
    assert list(gpt2["lmbda"]) == [0.2, 0.6, 0.8] and list(gpt2["value"]) == pytest.approx([18.0, 14.57, 12.0])
    size = reports.size_curve(df)
    base = size[(size["task"] == "memdec_wikitext103") & (size["label"] == "base")]
    assert list(base["base"]) == ["gpt2", "gpt2-medium"] and list(base["size"]) == [124439808, 354823168]
    out = reports.write_report([runs], tmp_path / "rep" / "sweep.md")
    assert {"md", "csv", "lmbda_png", "size_png"} <= set(out)
    for key in ("lmbda_png", "size_png"):
        assert out[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = pd.read_csv(out["csv"])
    assert len(csv) == len(df) and csv.loc[csv["value"] == 14.57, "label"].tolist() == ["+MemDec (lmbda=0.6)"]


def test_runs_differing_in_model_args_get_own_rows(tmp_path):
    runs = tmp_path / "runs"
    args = {"pretrained": "openai-community/gpt2", "dtype": "bfloat16"}
    _copy(GPT2_BASE, runs / "results_a.json", config__model_args=args)
    _copy(GPT2_BASE, runs / "results_b.json", config__model_args={**args, "dtype": "float32", "batch_size": 4},
          results={"memdec_wikitext103": {"token_perplexity,none": 24.5}})
    df = reports.load_results([runs])
    assert reports.find_conflicts(df).empty  # another dtype: another row, not a conflict
    t = reports.perplexity_table(df)
    assert t["gpt2"].to_dict() == {"base (dtype=bfloat16)": 24.89, "base (dtype=float32)": 24.5}
    # batch size does not tell runs apart: different numbers are a conflict
    _copy(GPT2_BASE, runs / "results_c.json", config__model_args={**args, "batch_size": 64},
          results={"memdec_wikitext103": {"token_perplexity,none": 24.0}})
    conflicts = reports.find_conflicts(reports.load_results([runs]))
    assert sorted(conflicts["value"]) == [24.0, 24.89]


def test_dapt_marker_and_folder_names_ignored(tmp_path):
    dapt = tmp_path / "dapt-model"
    dapt.mkdir()
    (dapt / "baseline.json").write_text(json.dumps({"method": "dapt", "base": "openai-community/gpt2"}))
    # a folder named like another base model must not change the labels
    f = _copy(GPT2_BASE, tmp_path / "gpt2-medium" / "results_2026-04-01T00-00-00.json",
              config__model_args={"pretrained": str(dapt)})
    df = reports.load_results([f.parent])
    assert set(df["method"]) == {"dapt"} and set(df["base"]) == {"gpt2"} and set(df["label"]) == {"+DAPT"}


def test_bad_files_skipped_with_warning_naming_them(tmp_path):
    runs = tmp_path / "runs"
    (runs / "empty").mkdir(parents=True)
    good = runs / "ok" / GPT2_BASE.name
    good.parent.mkdir()
    shutil.copy(GPT2_BASE, good)
    truncated = runs / "ok" / "results_2026-05-01T00-00-00.json"
    truncated.write_text(GPT2_BASE.read_text()[:500])
    other = runs / "ok" / "results_other_tool.json"
    other.write_text(json.dumps({"model": "x", "accuracy": 0.9}))
    with pytest.warns(SkippedFileWarning) as record:
        df = reports.load_results([runs, tmp_path / "missing", runs / "empty"])
    messages = [str(w.message) for w in record]
    assert any(str(truncated.resolve()) in m and "not valid JSON" in m for m in messages)
    assert any(str(other.resolve()) in m and "not an lm-eval results file" in m for m in messages)
    assert any(str(tmp_path / "missing") in m for m in messages)
    assert any(str(runs / "empty") in m and "no lm-eval results" in m for m in messages)
    assert set(df["file"]) == {str(good.resolve())}


def test_cli_report(tmp_path, capsys):
    assert main(["report", str(RESULTS), "--out", str(tmp_path / "out" / "paper")]) == 0
    md = (tmp_path / "out" / "paper.md").read_text()
    for title in ("## Perplexity on memdec_wikitext103 by base model", "## Domain perplexity",
                  "## Zero-shot DC-PMI accuracy", "## Zero-shot accuracy"):
        assert title in md
    assert (tmp_path / "out" / "paper.csv").exists() and (tmp_path / "out" / "paper_size.png").exists()
    capsys.readouterr()


@pytest.mark.parametrize("case", ["empty", "bad_only", "no_known_task"])
def test_cli_report_no_table_is_one_line_error(tmp_path, capsys, case):
    runs = tmp_path / "runs"
    runs.mkdir()
    if case == "bad_only":
        (runs / "results_2026-05-01T00-00-00.json").write_text("{\"results\": {")
    if case == "no_known_task":
        _copy(GPT2_BASE, runs / "results_x.json", results={"other_task": {"f1,none": 0.5}})
    assert main(["report", str(runs), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("memdec report: error: no")
    assert err[-1] == errors[0]
    assert not (tmp_path / "r.md").exists()


def test_footnote_says_when_lmbda_is_not_recorded(tmp_path):
    args = {"pretrained": "openai-community/gpt2", "memory": "runs/memdec-gpt2-bio"}  # lmbda from memdec.json
    f = _copy(GPT2_MEMDEC, tmp_path / "results_a.json", config__model_args=args)
    md = reports.to_markdown(reports.perplexity_table(reports.load_results([f])))
    assert "lmbda not recorded for +MemDec (the model's default)" in md
    _copy(GPT2_MEMDEC, f, config__model_args=args, config__lmbda=0.55)  # what MemDecLM.get_model_info reports
    md = reports.to_markdown(reports.perplexity_table(reports.load_results([f])))
    assert "lmbda: +MemDec 0.55 (gpt2)" in md and "not recorded" not in md


def test_footnote_names_the_router_not_a_missing_lmbda(tmp_path):
    args = {"pretrained": "openai-community/gpt2", "memory": "runs/memdec-gpt2-bio", "router": "runs/router-bio"}
    f = _copy(GPT2_MEMDEC, tmp_path / "results_a.json", config__model_args=args)
    md = reports.to_markdown(reports.perplexity_table(reports.load_results([f])))
    assert "+MemDec (router)" in md
    assert "+MemDec (router): per-token weights from its router, no fixed lmbda" in md
    assert "not recorded" not in md
