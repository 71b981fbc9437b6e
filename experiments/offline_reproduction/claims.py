"""The Memory Decoder paper's claims checked against the offline reproduction's numbers (issue 14).

`claims(df, bases, domains, tasks)` gives the markdown section "The paper's claims against these numbers"
of RUN/report/results.md: domain test token perplexity of every base x method, how often one Memory Decoder
lowers the base's domain perplexity and beats each baseline, and the general-text change (forgetting).
`df` is `reports.load.load_results`'s long table; the methods' row labels come from the method registry.
"""

from __future__ import annotations

from typing import Any

#: the methods of the claims tables, in column order (registry names)
CLAIM_METHODS = ("memdec", "knnlm", "rag", "dapt", "lora")


def labels(names: tuple[str, ...] = CLAIM_METHODS) -> dict[str, str]:
    """Registry name -> report label ("+MemDec", "+kNN-LM", ...)."""
    from memdec.methods import get_method

    return {m: get_method(m).label for m in names}


def token_ppl(df: Any, base: str, method: str, task: str, domain: str | None = None) -> float | None:
    """The token perplexity of `base` + `method` on `task` (a method's run of `domain`: results below /DOMAIN/)."""
    rows = df[(df["base"] == base) & (df["method"] == method) & (df["task"] == task)
              & (df["metric"] == "token_perplexity")]
    if domain is not None and method != "base":
        rows = rows[rows["file"].astype(str).str.contains(f"/{domain}/")]
    return float(rows["value"].iloc[0]) if len(rows) else None


def claims(df: Any, bases: list[str], domains: list[str], tasks: dict[str, str]) -> list[str]:
    """The paper's claims checked against the measured token perplexities (markdown lines); `tasks` maps a
    domain (and "general") to its lm-eval task."""
    lines = ["## The paper's claims against these numbers", ""]
    names = labels()
    lines += ["Domain test token perplexity (lower is better):", "",
              "| base | domain | base | " + " | ".join(names.values()) + " |",
              "|---|---|---|" + "---|" * len(names)]
    wins = {m: [0, 0] for m in names if m != "memdec"}
    lowered = [0, 0]
    for base in bases:
        for dom in domains:
            b = token_ppl(df, base, "base", tasks[dom])
            vals = {m: token_ppl(df, base, m, tasks[dom], dom) for m in names}
            cells = " | ".join("–" if v is None else f"{v:.2f}" for v in vals.values())
            lines.append(f"| {base} | {dom} | {'–' if b is None else f'{b:.2f}'} | {cells} |")
            if b is not None and vals["memdec"] is not None:
                lowered[0] += vals["memdec"] < b
                lowered[1] += 1
            for m in wins:
                if vals["memdec"] is not None and vals[m] is not None:
                    wins[m][0] += vals["memdec"] < vals[m]
                    wins[m][1] += 1
    lines += ["", f"- One Memory Decoder per domain lowers the domain perplexity of the base model in "
              f"{lowered[0]} of {lowered[1]} (base, domain) pairs (paper: all)."]
    for m, (w, n) in wins.items():
        lines.append(f"- {names['memdec']} beats {names[m]} in {w} of {n} (base, domain) pairs.")
    lines += ["", "General test token perplexity (forgetting), mean over domains of the change against the base model:",
              "", "| base | base ppl | " + " | ".join(names.values()) + " |", "|---|---|" + "---|" * len(names)]
    for base in bases:
        b = token_ppl(df, base, "base", tasks["general"])
        cells = []
        for m in names:
            v = [x for dom in domains if (x := token_ppl(df, base, m, tasks["general"], dom)) is not None]
            cells.append("–" if not v or b is None else f"{sum(v) / len(v):.2f} ({sum(v) / len(v) - b:+.2f})")
        lines.append(f"| {base} | {'–' if b is None else f'{b:.2f}'} | " + " | ".join(cells) + " |")
    lines += ["", "(+MemDec and +kNN-LM mix a domain model into the base at every token, so they also change "
              "general-text perplexity; +DAPT changes the base weights; +LoRA adds an adapter.)", ""]
    return lines
