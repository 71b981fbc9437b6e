"""The Memory Decoder paper's claims checked against a results tree (issues 14, 18): `memdec report --claims`.

The layout it reads is the offline reproduction's (experiments/offline_reproduction): RESULTS/base/BASE__base_*.json
(each base alone on every task) and RESULTS/DOMAIN/BASE__RUN_*.json (RUN a registered method, or a variant such as
"rag-stride4" / "rag-copy"), lm-eval tasks named memdec_DOMAIN_ppl and memdec_general_ppl, and beside the runs the
JSONs the tunings write: DOMAIN/tune_knnlm-BASE.json (memdec tune-knnlm), DOMAIN/lr_dapt.json / lr_lora.json,
DOMAIN/case_study.json (case_study.py), DOMAIN/rag_check.json and DOMAIN/copy_ability-BASE.json (rag_check.py).

`claims(df, bases, domains, tasks, facts)` gives the markdown section "The paper's claims against these numbers":
the family's spread, domain test token perplexity of every base x method, how often one Memory Decoder lowers
the base's domain perplexity and beats each baseline, the smallest base + MemDec against DAPT of the next size
up, RAG at the paper's stride and its copy check, the router against fixed lmbda, the general-text change of
every method (forgetting), the settings tuned on valid and the case study. `claims_report(folders, df)` finds
the layout, the bases (smallest first, by parameter count) and the facts itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any

#: the methods of the claims tables, in column order (registry names); "router" is memdec_router
CLAIM_METHODS = ("memdec", "router", "knnlm", "rag", "dapt", "lora")
#: the baselines +MemDec is compared with
BASELINES = ("knnlm", "rag", "dapt", "lora")


def labels(names: tuple[str, ...] = CLAIM_METHODS) -> dict[str, str]:
    """Registry name (or alias) -> report label ("+MemDec", "+kNN-LM", ...)."""
    from memdec.methods import get_method

    return {m: get_method(m).label for m in names}


def token_ppl(df: Any, base: str, run: str, task: str, domain: str | None = None) -> float | None:
    """The token perplexity on `task` of the run BASE__RUN (RUN: a method, or a variant such as "rag-stride4");
    with `domain`, the run of that domain (results below /DOMAIN/), else the base-alone run."""
    rows = df[(df["task"] == task) & (df["metric"] == "token_perplexity")]
    names = rows["file"].astype(str).map(lambda f: PurePath(f).name)
    rows = rows[names.str.startswith(f"{base}__{run}_")]
    if domain is not None and run != "base":
        rows = rows[rows["file"].astype(str).str.contains(f"/{domain}/")]
    return float(rows["value"].iloc[0]) if len(rows) else None


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None else f"{a / b:.3f}x"


def claims(df: Any, bases: list[str], domains: list[str], tasks: dict[str, str],
           facts: dict[str, Any] | None = None) -> list[str]:
    """The paper's claims checked against the measured token perplexities (markdown lines); `tasks` maps a
    domain (and "general") to its lm-eval task; `facts` (optional): {"knnlm": {dom: {base: tune-knnlm JSON}},
    "lr": {dom: {method: lr JSON}}, "rag_stride": int, "case_study": {dom: lines}}."""
    facts = facts or {}
    names = labels()
    gen = {b: token_ppl(df, b, "base", tasks["general"]) for b in bases}
    lines = ["## The paper's claims against these numbers", ""]
    if len(bases) > 1 and gen[bases[0]] and gen[bases[-1]]:
        lines += ["The family (one recipe, larger models see more tokens): general test perplexity "
                  + ", ".join(f"{b} {_f(gen[b])}" for b in bases)
                  + f"; smallest / largest = {gen[bases[0]] / gen[bases[-1]]:.2f}x (goal: at least 1.3x).", ""]
    lines += ["Domain test token perplexity (lower is better):", "",
              "| base | domain | base | " + " | ".join(names.values()) + " |",
              "|---|---|---|" + "---|" * len(names)]
    wins = {m: [0, 0] for m in BASELINES}
    lowered = [0, 0]
    ppl: dict[tuple[str, str, str], float | None] = {}
    for base in bases:
        for dom in domains:
            b = token_ppl(df, base, "base", tasks[dom])
            vals = {m: token_ppl(df, base, m, tasks[dom], dom) for m in names}
            ppl.update({(base, dom, m): v for m, v in vals.items()})
            lines.append(f"| {base} | {dom} | {_f(b)} | " + " | ".join(_f(v) for v in vals.values()) + " |")
            if b is not None and vals["memdec"] is not None:
                lowered[0] += vals["memdec"] < b
                lowered[1] += 1
            for m in wins:
                if vals["memdec"] is not None and vals[m] is not None:
                    wins[m][0] += vals["memdec"] < vals[m]
                    wins[m][1] += 1
    lines += ["", "(i) One Memory Decoder per domain, trained once, lowers the domain perplexity of every base it is "
              f"put beside: {lowered[0]} of {lowered[1]} (base, domain) pairs (paper: all).", "",
              "(ii) +MemDec against each baseline (lower domain perplexity):", ""]
    for m, (w, n) in wins.items():
        lines.append(f"- {names['memdec']} beats {names[m]} in {w} of {n} (base, domain) pairs.")
    lines += _small_vs_dapt(ppl, bases, domains, names)
    lines += _rag(df, bases, domains, tasks, facts)
    lines += _router(df, bases, domains, tasks, gen, names)
    lines += ["(iv) General test token perplexity (forgetting), mean over the three domains' models, and its change "
              "against the base model:", "", "| base | base ppl | " + " | ".join(names.values()) + " |",
              "|---|---|" + "---|" * len(names)]
    for base in bases:
        b, cells = gen[base], []
        for m in names:
            v = [x for dom in domains if (x := token_ppl(df, base, m, tasks["general"], dom)) is not None]
            cells.append("–" if not v or b is None else f"{sum(v) / len(v):.2f} ({sum(v) / len(v) - b:+.2f})")
        lines.append(f"| {base} | {_f(b)} | " + " | ".join(cells) + " |")
    lines += ["", "(+MemDec and +kNN-LM mix a domain model into the base at every token, so they also change "
              "general-text perplexity; the router decides per token; +DAPT changes the base weights; +LoRA adds "
              "an adapter.)", ""]
    lines += _tuned(facts, bases, domains)
    for dom, case in (facts.get("case_study") or {}).items():
        lines += [f"(v) Case study, {dom}: long-tail tokens of the test split (largest base)", "", *case, ""]
    return lines


def _small_vs_dapt(ppl: dict, bases: list[str], domains: list[str], names: dict[str, str]) -> list[str]:
    """(iii) each base + MemDec against DAPT of the next size up (and of the largest)."""
    if len(bases) < 2:
        return []
    lines = ["", "(iii) A smaller base + MemDec against DAPT of a larger base (domain perplexity):", "",
             "| domain | smaller + MemDec | ppl | larger + DAPT | ppl | MemDec wins |", "|---|---|---|---|---|---|"]
    won, n = 0, 0
    pairs = [(bases[i], bases[i + 1]) for i in range(len(bases) - 1)]
    if len(bases) > 2:
        pairs.append((bases[0], bases[-1]))
    for dom in domains:
        for small, large in pairs:
            a, b = ppl.get((small, dom, "memdec")), ppl.get((large, dom, "dapt"))
            if a is None or b is None:
                continue
            won, n = won + (a < b), n + 1
            lines.append(f"| {dom} | {small} {names['memdec']} | {a:.2f} | {large} {names['dapt']} | {b:.2f} | "
                         f"{'yes' if a < b else 'no'} |")
    return lines + ["", f"- In {won} of {n} comparisons the smaller base + MemDec beats the larger base's DAPT "
                    "(paper: GPT2-small + MemDec beats DAPT of GPT2-medium and larger).", ""]


def _rag(df: Any, bases: list[str], domains: list[str], tasks: dict[str, str], facts: dict) -> list[str]:
    """RAG at the paper's stride and the copy check, where they ran."""
    stride = facts.get("rag_stride")
    rows = []
    for dom in domains:
        for base in bases:
            b = token_ppl(df, base, "base", tasks[dom])
            r = token_ppl(df, base, "rag", tasks[dom], dom)
            s4 = token_ppl(df, base, f"rag-stride{stride}", tasks[dom], dom) if stride else None
            cp = token_ppl(df, base, "rag-copy", tasks[dom], dom)
            if s4 is not None or cp is not None:
                rows.append(f"| {dom} | {base} | {_f(b)} | {_f(r)} | {_f(s4)} | {_f(cp)} |")
    checks = []
    for dom, c in sorted((facts.get("rag_check") or {}).items()):
        checks.append(f"- Retrieval, {dom}: the best BM25 chunk holds the next {c['copy']['stride']} test tokens "
                      f"verbatim at {100 * c['copy']['holds_next_block']:.1f} % of {c['copy']['points']} retrieval "
                      f"points when the corpus holds the test documents, {100 * c['honest']['holds_next_block']:.1f} % "
                      "from the train split alone (rag_check.py).")
    for dom, per_base in sorted((facts.get("copy_ability") or {}).items()):
        cells = [f"{b} {c['nll_first']:.2f} → {c['nll_second']:.2f}" for b in bases if (c := per_base.get(b))]
        if cells:
            c0 = next(iter(per_base.values()))
            checks.append(f"- Copy ability, {dom} (rag_check.copy_ability): mean NLL on {c0['n_spans']} test spans of "
                          f"{c0['span']} tokens, first copy → the same span shown again right after it: "
                          f"{'; '.join(cells)} (a model that copies from its context: near 0 on the second).")
    if not rows and not checks:
        return []
    return ["In-Context RAG: the honest run (retrieval from the domain's train split), the paper's retrieval "
            f"stride {stride}, and the copy check (the retrieval corpus also holds the test documents, same "
            "settings as the honest run):", "",
            f"| domain | base | base | RAG (stride 32) | RAG (stride {stride}) | RAG, corpus with the test documents |",
            "|---|---|---|---|---|---|", *rows, "", *checks, *([""] if checks else []),
            "(If the copy check cuts perplexity sharply, retrieval and prompting work and the model can copy what "
            "it is shown; then the honest run's lack of gain is the retrieved train text not predicting the test "
            "text well enough for models this small, not the implementation.)", ""]


def _router(df: Any, bases: list[str], domains: list[str], tasks: dict[str, str], gen: dict,
            names: dict[str, str]) -> list[str]:
    """The router (issue 17) against fixed lmbda: domain perplexity and general-text perplexity / the base's."""
    rows, router_ok, general_ok = [], [0, 0], [0, 0]
    for base in bases:
        for dom in domains:
            fixed = token_ppl(df, base, "memdec", tasks[dom], dom)
            routed = token_ppl(df, base, "router", tasks[dom], dom)
            gf = token_ppl(df, base, "memdec", tasks["general"], dom)
            gr = token_ppl(df, base, "router", tasks["general"], dom)
            if routed is None:
                continue
            if fixed is not None:
                router_ok[0] += routed <= fixed
                router_ok[1] += 1
            if gr is not None and gen.get(base):
                general_ok[0] += gr <= 1.05 * gen[base]
                general_ok[1] += 1
            rows.append(f"| {base} | {dom} | {_f(fixed)} | {_f(routed)} | {_ratio(gf, gen.get(base))} | "
                        f"{_ratio(gr, gen.get(base))} |")
    if not rows:
        return []
    return [f"{names['router']} (a per-token router per base and domain) against {names['memdec']} at the fixed "
            "lmbda tuned on valid:", "",
            "| base | domain | domain ppl, fixed lmbda | domain ppl, router | general ppl / base's, fixed | "
            "general / base's, router |", "|---|---|---|---|---|---|", *rows, "",
            f"- Router domain perplexity ≤ fixed lmbda's in {router_ok[0]} of {router_ok[1]} pairs; router general "
            f"perplexity ≤ 1.05x the base's in {general_ok[0]} of {general_ok[1]}.", ""]


def _tuned(facts: dict, bases: list[str], domains: list[str]) -> list[str]:
    """The baselines' settings chosen on valid: kNN-LM (lmbda, temperature) and DAPT / LoRA learning rates."""
    lines = []
    knn = facts.get("knnlm") or {}
    if knn:
        lines += ["kNN-LM settings chosen on valid (memdec tune-knnlm, per base and domain; each base searches its "
                  "own datastore):", "", "| domain | base | lmbda | temperature | valid ppl | base valid ppl |",
                  "|---|---|---|---|---|---|"]
        for dom in domains:
            for base in bases:
                t = (knn.get(dom) or {}).get(base)
                if t:
                    lines.append(f"| {dom} | {base} | {t['best_lmbda']:g} | {t['best_temperature']:g} | "
                                 f"{t['best_perplexity']:.2f} | {t['base_perplexity']:.2f} |")
        lines.append("")
    lr = facts.get("lr") or {}
    if lr:
        lines += ["DAPT / LoRA learning rates chosen on valid (with the largest base, used for every base):", "",
                  "| domain | method | valid ppl per learning rate | chosen |", "|---|---|---|---|"]
        for dom in domains:
            for method, t in sorted((lr.get(dom) or {}).items()):
                grid = ", ".join(f"{k}: {v:.2f}" for k, v in t["valid_perplexity"].items())
                lines.append(f"| {dom} | {method} | {grid} | {t['best_lr']:g} |")
        lines.append("")
    return lines


#: (result key, table label) of the case study's five probability columns, in table order
COLUMNS = (("base", "base"), ("knnlm", "+kNN-LM"), ("knn", "kNN alone"), ("memdec_alone", "MemDec alone"),
           ("memdec", "+MemDec"))


def _cell(p: float | None, fmt: str) -> str:
    return "inf" if p is None else format(p, fmt)


def case_study_lines(result: dict) -> list[str]:
    """Markdown: one row per long-tail token (mean probabilities), the aggregate rows, how tokens were chosen."""
    s = result["settings"]
    lines = ["| token | test count | per M in general | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---|---:|---:|" + "---:|" * len(COLUMNS)]
    for r in result["tokens"]:
        # a leading space shown as ␣: " phosphatidyl" (word start) and "phosphatidyl" (inside a word) are two tokens
        raw = r["text"]
        text = ("␣" if raw[:1].isspace() else "") + raw.strip().replace("|", "\\|") or repr(raw)
        lines.append(f"| `{text}` | {r['test_count']} | {r['per_million']:.1f} | "
                     + " | ".join(_cell(r["mean_prob"][c], ".4g") for c, _ in COLUMNS) + " |")
    for key, name in (("long_tail", "these tokens"), ("all", "all tokens")):
        agg = result[key]
        lines.append(f"| {name}: mean p | {agg['n_positions']} | | "
                     + " | ".join(_cell(agg["mean_prob"][c], ".4g") for c, _ in COLUMNS) + " |")
        lines.append(f"| {name}: perplexity | {agg['n_positions']} | | "
                     + " | ".join(_cell(agg["perplexity"][c], ".2f") for c, _ in COLUMNS) + " |")
    lines += ["", f"Tokens: the {len(result['tokens'])} targets of the test split (at least {s['min_count']} "
              f"occurrences) with the fewest occurrences per million tokens of the general corpus "
              f"({s['reference_tokens']} tokens), word-like ones (4+ letters) first; each cell is the mean "
              f"probability of the true token over its positions (windows {s['window']}, stride {s['stride']}; "
              f"kNN-LM k = {s['k']}, temperature {s['temperature']:g}, lmbda {s['knnlm_lmbda']:g}; "
              f"+MemDec lmbda {s['lmbda']:g})."]
    return lines


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def find_facts(folders: Sequence[str | Path], df: Any, domains: list[str], bases: list[str]) -> dict[str, Any]:
    """The tuning and check JSONs beside the runs (see the module docstring), and RAG's paper stride (from run
    names BASE__rag-strideN_...)."""
    facts: dict[str, Any] = {"knnlm": {}, "lr": {}, "case_study": {}, "rag_check": {}, "copy_ability": {},
                             "rag_stride": None}
    for root in map(Path, folders):
        for dom in domains:
            d = root / dom
            knn = {b: t for b in bases if (t := _read(d / f"tune_knnlm-{b}.json"))}
            lr = {m: t for m in ("dapt", "lora") if (t := _read(d / f"lr_{m}.json"))}
            if knn:
                facts["knnlm"][dom] = knn
            if lr:
                facts["lr"][dom] = lr
            if (case := _read(d / "case_study.json")) is not None:
                facts["case_study"][dom] = case_study_lines(case)
            if (check := _read(d / "rag_check.json")) is not None:
                facts["rag_check"][dom] = check
            if copy := {b: c for b in bases if (c := _read(d / f"copy_ability-{b}.json"))}:
                facts["copy_ability"][dom] = copy
    for name in df["file"].astype(str).map(lambda f: PurePath(f).name):
        run = name.partition("__")[2]
        if run.startswith("rag-stride"):
            facts["rag_stride"] = int(run[len("rag-stride"):].partition("_")[0])
            break
    return facts


def infer_layout(df: Any) -> tuple[list[str], list[str], dict[str, str]]:
    """(bases smallest first, domains, {domain and "general": task}) of a results tree in the claims layout;
    ValueError naming what is missing when it is not one."""
    files = df["file"].astype(str)
    names = files.map(lambda f: PurePath(f).name)
    base_rows = df[names.str.contains("__base_") & files.map(lambda f: PurePath(f).parent.name == "base")]
    if base_rows.empty:
        raise ValueError("--claims: no base-alone runs RESULTS/base/BASE__base_*.json (the offline reproduction's "
                         "layout, see reports/claims.py)")
    sizes = base_rows.groupby("base")["n_params"].max()
    bases = sorted(sizes.index, key=lambda b: (sizes[b] if sizes[b] == sizes[b] else float("inf"), b))
    tasks = set(df["task"])
    domains = sorted({PurePath(f).parent.name for f in files} - {"base"})
    domains = [d for d in domains if f"memdec_{d}_ppl" in tasks]
    if not domains or "memdec_general_ppl" not in tasks:
        raise ValueError("--claims: results need tasks memdec_DOMAIN_ppl in RESULTS/DOMAIN/ and memdec_general_ppl "
                         f"(found tasks: {', '.join(sorted(tasks))})")
    return bases, domains, {**{d: f"memdec_{d}_ppl" for d in domains}, "general": "memdec_general_ppl"}


def claims_report(folders: Sequence[str | Path], df: Any, bases: list[str] | None = None,
                  domains: list[str] | None = None, tasks: dict[str, str] | None = None) -> list[str]:
    """`claims` over the results below `folders` (`df` their `load_results`): layout inferred unless given."""
    if bases is None or domains is None or tasks is None:
        b, d, t = infer_layout(df)
        bases, domains, tasks = bases or b, domains or d, tasks or t
    return claims(df, bases, domains, tasks, find_facts(folders, df, domains, bases))
