"""The Memory Decoder paper's claims checked against the offline reproduction's numbers (issues 14, 18).

`claims(df, bases, domains, tasks, facts)` gives the markdown section "The paper's claims against these
numbers" of RUN/report/results.md: the family's spread, domain test token perplexity of every base x method,
how often one Memory Decoder lowers the base's domain perplexity and beats each baseline, the smallest base
+ MemDec against DAPT of the next size up, RAG at the paper's stride and its copy check, the router against
fixed lmbda, the general-text change of every method (forgetting), the settings tuned on valid and the case
study. `df` is `reports.load.load_results`'s long table (its `file` column tells runs apart: results below
RUN/results/DOMAIN/ are named BASE__RUN_<date>.json); `facts` holds the tuning JSONs run.py wrote.
"""

from __future__ import annotations

from pathlib import PurePath
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
    lowered, router_ok = [0, 0], [0, 0]
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
            if vals["memdec"] is not None and vals["router"] is not None:
                router_ok[0] += vals["router"] <= vals["memdec"]
                router_ok[1] += 1
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
    lines += _router(df, bases, domains, tasks, gen, router_ok, names)
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
            router_ok: list[int], names: dict[str, str]) -> list[str]:
    """The router (issue 17) against fixed lmbda: domain perplexity and general-text perplexity / the base's."""
    rows, general_ok = [], [0, 0]
    for base in bases:
        for dom in domains:
            fixed = token_ppl(df, base, "memdec", tasks[dom], dom)
            routed = token_ppl(df, base, "router", tasks[dom], dom)
            gf = token_ppl(df, base, "memdec", tasks["general"], dom)
            gr = token_ppl(df, base, "router", tasks["general"], dom)
            if routed is None:
                continue
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
