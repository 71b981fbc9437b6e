"""memdec bench: the shipped architecture configs, and a small CPU run writing its files (times not checked)."""

from __future__ import annotations

import json

import pytest
import torch

from memdec import bench

# published parameter counts (tied input/output embeddings counted once)
PARAMS = {
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-0.5b": 494_032_768,
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_arch_configs_have_the_real_sizes(name):
    from transformers import AutoModelForCausalLM

    cfg = bench.arch_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert bench.n_params(model) == PARAMS[name]
    assert cfg.vocab_size == (151936 if name.startswith("qwen") else 50257)


def test_unknown_arch_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown architecture 'llama-9b'.*qwen2.5-1.5b"):
        bench.arch_config("llama-9b")


def test_small_cpu_run_writes_table_json_and_plot(tmp_path, capsys):
    from memdec.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--device", "cpu", "--small", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "bench.json").read_text())
    table = (out / "bench.md").read_text()
    assert printed.rstrip().endswith(table.rstrip())  # the table is printed last
    methods = [r["method"] for r in result["rows"]]
    assert methods[:5] == ["base", "base (HF static cache)", "base (compiled + graphed)", "+MemDec (plain)",
                           "+MemDec (fast)"]
    assert "+kNN-LM 1k" in methods and "+kNN-LM 10k" in methods and methods[-1] == "+In-Context RAG"
    for r in result["rows"]:
        assert r["error"] is None, r
        assert r["greedy_ms"] is not None and r["sampled_ms"] is not None
    for r in result["rows"]:
        if r["method"] != "base (HF static cache)":  # a decoding-only row
            assert all(v is not None and v > 0 for v in r["score"].values()), r
    checks = result["checks"]  # the fast paths agree with the plain ones (float32 on CPU: same greedy tokens)
    assert checks["score_max_abs_diff"] < 1e-4 and checks["fast_decode_used"]
    # both paths against float32 weights with a float64 mixture (float32 models here: same numbers)
    assert checks["score_fast_vs_fp32_max_abs_diff"] < 1e-4 and checks["score_plain_vs_fp32_max_abs_diff"] < 1e-4
    assert checks["greedy_leading_tokens_equal"] == checks["greedy_tokens_compared"] == 8
    assert set(result["paired"]) == {"score 4x64", "score 1x64", "greedy", "sampled", "router score 4x64",
                                     "router score 1x64"}
    assert "+MemDec (router, fast)" in methods and "Router cost" in (out / "bench.md").read_text()
    assert all(v is not None and v > 0 for v in result["paired"].values())
    assert "Paired ratios" in (out / "bench.md").read_text()
    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["date"] and env["device_name"]
    assert table.startswith("| method |") and "+MemDec (fast)" in table
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_device_is_a_one_line_error(capsys):
    from memdec.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "--device", "cuda", "--small", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memdec bench: error:") and "no GPU" in err and "\n" not in err


def test_time_budget_skips_and_marks_rows(tmp_path):
    from memdec.cli import main

    out = tmp_path / "b"
    assert main(["bench", "--device", "cpu", "--small", "--skip-knn", "--budget", "1e-9", "--out", str(out)]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert not any(r["method"].startswith("+kNN") for r in result["rows"])
    for r in result["rows"]:
        assert r["greedy_ms"] is None and r["error"].endswith("skipped: time budget")
    assert "skipped: time budget" in (out / "bench.md").read_text()


def test_fast_decoding_fallback_is_marked_only_when_it_happens(tmp_path, monkeypatch):
    from memdec.cli import main
    from memdec.inference.joint import MemoryDecoder

    def broken(self, batch, total):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(MemoryDecoder, "_fast_decoder", broken)
    out = tmp_path / "b"
    with pytest.warns(UserWarning, match="fast decoding failed"):
        assert main(["bench", "--device", "cpu", "--small", "--skip-knn", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert "fell back to the plain loop" in rows["+MemDec (fast)"]["error"]
    assert rows["+MemDec (plain)"]["error"] is None  # the plain row set fast_decode = False itself: no false mark


def test_bench_needs_no_lm_eval_faiss_or_datasets():
    """The GPU host has torch and transformers only: every module the bench uses must import without the rest."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for n in ('lm_eval', 'faiss', 'datasets', 'bm25s'): sys.modules[n] = None\n"
            "import memdec.bench, memdec.inference.fast, memdec.inference.joint, memdec.pipeline.search, memdec.pipeline.keys, memdec.cli\n"
            "memdec.bench.arch_config('qwen2.5-0.5b', small=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _fake_clock(monkeypatch, times):
    """bench.timing._once returns the next duration listed for each function instead of timing it."""
    calls = []

    def once(fn, device):
        calls.append(fn)
        return times[fn].pop(0)

    monkeypatch.setattr(bench.timing, "_once", once)
    return calls


def test_paired_ratio_is_the_median_of_back_to_back_ratios(monkeypatch):
    ref, fn = (lambda: None), (lambda: None)
    # warm-up pair, then 5 rounds whose ratios are 1.5, 1.5, 3.0 (a disturbed round), 1.2, 1.5
    times = {ref: [99, 10, 20, 10, 10, 10], fn: [99, 15, 30, 30, 12, 15]}
    calls = _fake_clock(monkeypatch, times)
    assert bench.paired_ratio(ref, fn, torch.device("cpu"), 1, 5) == pytest.approx(1.5)
    # which of the two goes first alternates from round to round
    assert [c is ref for c in calls[2:]] == [True, False, False, True, True, False, False, True, True, False]


def test_paired_per_token_ratio(monkeypatch):
    n = 9
    calls = []

    def ref(k):
        calls.append(("ref", k))

    def gen(k):
        calls.append(("gen", k))

    # per token: ref (t(9) - t(1)) / 8 = (26 - 10) / 8 = 2 ms in every round
    durations = {("ref", 9): 26.0, ("ref", 1): 10.0}
    gen_n = iter([99.0, 40.0, 36.0, 52.0])

    def once(fn, device):
        fn()
        who, k = calls[-1]
        if who == "gen" and k == n:
            return next(gen_n)
        return durations.get((who, k), 99.0 if who == "ref" else 12.0)

    monkeypatch.setattr(bench.timing, "_once", once)
    ratio = bench.paired_per_token_ratio(ref, gen, n, torch.device("cpu"), 1, 3)
    # gen: (40-12)/8 = 3.5, (36-12)/8 = 3.0, (52-12)/8 = 5.0 against ref 2.0 each: ratios 1.75, 1.5, 2.5
    assert ratio == pytest.approx(1.75)


def test_scoring_ratios_are_against_the_fastest_base_row():
    from memdec import bench

    def row(method, score, g=None):
        return {"method": method, "note": "", "error": None, "score": score, "score_mib": {}, "greedy_ms": g,
                "sampled_ms": g, "decode_mib": None}

    result = {"settings": {"score_shapes": [(2, 8)], "base": "b", "memory": "m", "small": True, "dtype": "fp32",
                           "lmbda": 0.5, "prompt_len": 4, "new_tokens": 4, "paired_rounds": 3},
              "environment": {"device_name": "cpu", "torch": "t", "transformers": "x", "date": "d"},
              "rows": [row("base", {"2x8": 40.0}, 9.0), row("base (compiled + graphed)", {"2x8": 20.0}, 3.0),
                       row("+MemDec (fast)", {"2x8": 30.0}, 4.5)]}
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in bench.markdown_table(result).splitlines()}
    assert "| 2.00x |" in lines["base"] and "| 1.00x |" in lines["base (compiled + graphed)"]
    assert "| 1.50x |" in lines["+MemDec (fast)"]  # 30 / 20, not 30 / 40
    assert "batch 1, prompt 4, 4 new tokens" in bench.markdown_table(result)


def _toy_specs(settings):
    from memdec.bench import MethodSpec

    return [MethodSpec("+Toy", "a row added by a registered method")]


def test_rows_come_from_the_method_registry(monkeypatch):
    """`memdec bench` rows are the registered methods' `bench` specs: built-ins in table order, then others."""
    from memdec import methods as registry
    from memdec.bench import BenchSettings, method_specs

    settings = BenchSettings.small_cpu()
    names = [spec.name for spec in method_specs(settings)]
    assert names[:6] == ["base", "base (HF static cache)", "base (compiled + graphed)", "+MemDec (plain)",
                         "+MemDec (fast)", "+MemDec (router, fast)"]
    assert names[6:-1] == [f"+kNN-LM {n}" for n in ("1k", "10k")] and names[-1] == "+In-Context RAG"
    registry.methods()  # built-ins loaded before the toy joins
    monkeypatch.setitem(registry._REGISTRY, "toy", registry.Method(name="toy", label="+Toy",
                                                                   bench="test_bench:_toy_specs"))
    assert [spec.name for spec in method_specs(settings)] == [*names, "+Toy"]


def test_router_cost_script_small_cpu_run(tmp_path, monkeypatch, capsys):
    """benchmarks/router_cost.py --small --device cpu --compare-modes: its JSON (first calls, modes, ratios)."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "router_cost.py"
    monkeypatch.setenv("MEMDEC_COMPILE_MODE", "regional")  # recorded: the script's --compile-mode is undone after
    monkeypatch.setattr(sys, "argv", [str(script), "--out", str(tmp_path), "--small", "--device", "cpu",
                                      "--shapes", "1x32,2x32", "--rounds", "1", "--compare-modes",
                                      "--compile-mode", "full"])
    runpy.run_path(str(script), run_name="__main__")
    res = json.loads((tmp_path / "router_cost.json").read_text())
    assert res["compile_mode"] == "full" and set(res["shapes"]) == {"1x32", "2x32"}
    assert set(res["first_call_s"]) == {"memory", "memory_hidden", "base", "base_hidden"}
    for row in res["shapes"].values():
        assert set(row["first_call_s"]) == {"memdec_fast", "memdec_router"} and row["paired_ratio"] > 0
    cmp = res["compare_modes"]
    assert set(cmp["first_call_s"]) == {"regional", "full"} and cmp["paired_ratio_regional_over_full"] > 0
    assert cmp["max_abs_diff_regional_vs_full"] == 0.0  # plain forwards on CPU
    assert res["max_abs_diff_vs_plain_fp32_mixture"] < 1e-4
    assert "compare-modes done" in capsys.readouterr().out
