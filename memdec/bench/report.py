"""The report of `memdec bench`: the markdown table, bench.json / bench.md / bench.png."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{digits}f}"


def _ratio(x: float | None, ref: float | None) -> str:
    return "n/a" if x is None or not ref else f"{x / ref:.2f}x"


def markdown_table(result: dict[str, Any]) -> str:
    """The results as a markdown table: throughput and latency with ratios to the base alone."""
    rows = result["rows"]
    shapes = [f"{b}x{t}" for b, t in result["settings"]["score_shapes"]]
    dec_bases = [r for r in rows if r["method"].startswith("base")]
    best_score = {sh: min((r["score"][sh] for r in dec_bases if r["score"].get(sh)), default=None) for sh in shapes}
    best_g = min((r["greedy_ms"] for r in dec_bases if r["greedy_ms"]), default=None)
    best_s = min((r["sampled_ms"] for r in dec_bases if r["sampled_ms"]), default=None)
    head = ["method"]
    for sh in shapes:
        head += [f"score {sh} tok/s", "ratio"]
    head += ["greedy ms/tok", "ratio", "sampled ms/tok", "ratio", "peak GPU MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"]]
        for sh in shapes:
            b, t = (int(v) for v in sh.split("x"))
            ms = r["score"].get(sh)
            cells += [_fmt(b * t / (ms / 1e3)) if ms else "n/a", _ratio(ms, best_score[sh])]
        cells += [_fmt(r["greedy_ms"], 2), _ratio(r["greedy_ms"], best_g), _fmt(r["sampled_ms"], 2),
                  _ratio(r["sampled_ms"], best_s)]
        mibs = [m for m in [*r["score_mib"].values(), r["decode_mib"]] if m is not None]
        cells.append(_fmt(max(mibs)) if mibs else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    env = result["environment"]
    s = result["settings"]
    notes = [f"{env['device_name']}, torch {env['torch']}, transformers {env['transformers']}, {env['date']}; "
             f"random-weight {s['base']} + {s['memory']}{' (small)' if s['small'] else ''}, {s['dtype']}, "
             f"lmbda {s['lmbda']}.",
             "Scoring ratios: time / the fastest base row at that shape (lm-eval `hf` computation or memdec's "
             f"compiled + graphed base). Decoding ratios: per-token time / the fastest base row; batch 1, prompt {s['prompt_len']}, {s['new_tokens']} new tokens, "
             "(t(N) - t(1)) / (N - 1).",
             ]
    p = {k: v for k, v in (result.get("paired") or {}).items() if v is not None and not k.startswith("router")}
    pr = {k[len("router "):]: v for k, v in (result.get("paired") or {}).items()
          if v is not None and k.startswith("router")}
    if pr:
        notes.append("Router cost, +MemDec (router, fast) / +MemDec (fast) timed back to back (median of "
                     f"{s['paired_rounds']} rounds): " + ", ".join(f"{k} {v:.3f}x" for k, v in pr.items()) + ".")
    if p:
        notes.append(f"Paired ratios, +MemDec (fast) / base timed back to back (median of {s['paired_rounds']} "
                     "rounds; scoring against the compiled + graphed base, decoding against memdec's graphed "
                     "base step): " + ", ".join(f"{k} {v:.2f}x" for k, v in p.items()) + ".")
    c = result.get("checks")
    if c:
        vs32 = (f" (to float32 weights with a float64 mixture: fast {c['score_fast_vs_fp32_max_abs_diff']:.2e}, "
                f"plain {c['score_plain_vs_fp32_max_abs_diff']:.2e})" if "score_fast_vs_fp32_max_abs_diff" in c else "")
        notes.append(f"Fast vs plain on this device: scoring max |difference| {c['score_max_abs_diff']:.2e} nats "
                     f"per token (2x256 tokens){vs32}; greedy decoding: the first {c['greedy_leading_tokens_equal']} of "
                     f"{c['greedy_tokens_compared']} tokens identical (random weights give near-uniform "
                     "distributions, where bf16 rounding can flip an argmax).")
    if env.get("compile_failed"):
        notes.append(f"torch.compile failed for {', '.join(env['compile_failed'])}: plain torch was used there.")
    for r in rows:
        if r["note"]:
            notes.append(f"{r['method']}: {r['note']}.")
        if r["error"]:
            notes.append(f"{r['method']} errors: {r['error']}")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {x}" for x in notes) + "\n"


def write_outputs(result: dict[str, Any], out: str | os.PathLike) -> Path:
    """bench.json, bench.md and (with matplotlib) bench.png in `out`, each written then renamed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("bench.json", json.dumps(result, indent=2) + "\n"), ("bench.md", result["table"])):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)
    plot(result, out / "bench.png")
    return out


def plot(result: dict[str, Any], path: Path) -> bool:
    """Bar chart of the ratios to the fastest base row (scoring and decoding); False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    shapes = [f"{b}x{t}" for b, t in result["settings"]["score_shapes"]]
    dec_bases = [r for r in rows if r["method"].startswith("base")]
    best = {k: min((r[k] for r in dec_bases if r[k]), default=None) for k in ("greedy_ms", "sampled_ms")}
    best_score = {sh: min((r["score"][sh] for r in dec_bases if r["score"].get(sh)), default=None) for sh in shapes}
    series = [(f"score {sh}", [(r["score"].get(sh) or math.nan) / (best_score[sh] or math.nan)
                               for r in rows]) for sh in shapes]
    series += [(k.replace("_ms", " decode"), [(r[k] or math.nan) / (best[k] or math.nan) for r in rows])
               for k in ("greedy_ms", "sampled_ms")]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 4.5))
    width = 0.8 / len(series)
    for j, (label, vals) in enumerate(series):
        ax.bar([i + j * width for i in range(len(rows))], vals, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([r["method"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("time / fastest base (log scale)")
    env = result["environment"]
    ax.set_title(f"memdec bench: {env['device_name']}, {env['date']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return True

