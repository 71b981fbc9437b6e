"""Issue 17's CPU measurement: a per-token router against fixed-lmbda +MemDec in the `memdec demo` setting.

    python experiments/router/run_cpu.py --demo /tmp/i17demo --work /tmp/i17work --out experiments/router

1. the demo (`memdec demo --out DEMO`, run if missing): tiny base pretrained on memdec/data/general.jsonl,
   Memory Decoder trained on memdec/data/domain_train.jsonl, lmbda 0.5 (its memdec.json);
2. held-out text: the demo has no valid split, so domain valid = the last 10 % of domain_train's documents
   (carved from train: the Memory Decoder has seen them); general text held out from the base and the
   router = docstrings of the Python standard library's modules (files 0, 2, 4, ... sorted by name, for the
   router; files 1, 3, 5, ... for the general test; 20 documents each), which the base never saw (its general text has Python docs,
   a related but different text);
3. `memdec train-router` on domain valid + general router text, for each variant in VARIANTS;
4. token perplexity (MemoryDecoder.perplexity: memdec.pipeline.data's windows, window 128 / stride 64 as the demo's
   lm-eval task, which gives the demo's own numbers) of base, +MemDec (fixed lmbda) and +MemDec (router,
   thresholds) on the domain test (memdec/data/domain_test.jsonl) and the general test.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "memdec" / "data"
WINDOW, STRIDE, MAX_DOCS = 128, 64, 20
VARIANTS = {"2-layer": [], "1-layer": ["--layers", "1"]}
THRESHOLDS = [None, 0.1, 0.3]


def _jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def make_data(work: Path) -> dict[str, Path]:
    """Domain valid (carved from train), general router text and general test text (stdlib docstrings)."""
    work.mkdir(parents=True, exist_ok=True)
    docs: list[list[str]] = [[], []]
    for i, f in enumerate(sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))):
        try:
            tree = ast.parse(Path(f).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        ds = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef)]
        text = "\n\n".join(d for d in ds if d and len(d) > 80)
        if len(text) >= 500:
            docs[i % 2].append(text[:20000])
    lines = [json.loads(x)["text"] for x in (DATA / "domain_train.jsonl").read_text().splitlines() if x.strip()]
    paths = {"domain_valid": work / "domain_valid.jsonl", "general_router": work / "general_router.jsonl",
             "general_test": work / "general_test.jsonl"}
    _jsonl(paths["domain_valid"], lines[int(len(lines) * 0.9):])
    _jsonl(paths["general_router"], docs[0][:MAX_DOCS])
    _jsonl(paths["general_test"], docs[1][:MAX_DOCS])
    return paths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="/tmp/i17demo")
    p.add_argument("--work", default="/tmp/i17work")
    p.add_argument("--out", default=str(Path(__file__).parent))
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    demo, work = Path(args.demo), Path(args.work)
    commands: list[str] = []
    if not (demo / "results.json").exists():
        cmd = [sys.executable, "-m", "memdec.cli", "demo", "--out", str(demo)]
        commands.append(" ".join(cmd[1:]))
        subprocess.run(cmd, check=True, env=env)
    base, memory = demo / "base", demo / "memdec"
    data = make_data(work)
    routers = {}
    for name, extra in VARIANTS.items():
        out = work / f"router-{name}"
        cmd = [sys.executable, "-m", "memdec.cli", "train-router", "--base", str(base), "--memory", str(memory),
               "--data", str(data["domain_valid"]), "--data", str(data["general_router"]), "--window", str(WINDOW),
               "--stride", str(STRIDE), "--out", str(out), "--cache", str(work / "cache"), *extra]
        commands.append(" ".join(["memdec", *cmd[3:]]))
        if not out.exists():
            subprocess.run(cmd, check=True, env=env)
        routers[name] = out

    sys.path.insert(0, str(ROOT))
    from memdec.inference.joint import MemoryDecoder

    tests = {"domain": [json.loads(x)["text"] for x in (DATA / "domain_test.jsonl").read_text().splitlines() if x],
             "general": [json.loads(x)["text"] for x in data["general_test"].read_text().splitlines() if x]}
    rows = []

    def measure(label: str, **kw) -> None:
        joint = MemoryDecoder.from_pretrained(str(base), str(memory), device="cpu", dtype="float32", **kw)
        row = {"model": label, "lmbda": None if joint.router else joint.lmbda}
        for name, texts in tests.items():
            r = joint.perplexity(texts, window=WINDOW, stride=STRIDE)
            row[name] = r["perplexity"]
            row[f"{name}_base"] = r["base_perplexity"]
            row[f"{name}_tokens"] = r["tokens"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    measure("+MemDec (fixed lmbda, memdec.json)")
    for name, path in routers.items():
        for t in THRESHOLDS:
            measure(f"+MemDec (router {name}" + (f", threshold {t})" if t is not None else ")"), router=str(path),
                    router_threshold=t)
    fixed = rows[0]
    base_row = {"model": "base", "domain": fixed["domain_base"], "general": fixed["general_base"]}
    for r in rows:
        r["general_vs_base"] = r["general"] / base_row["general"]
        r["goal_domain"] = r["domain"] <= fixed["domain"]
        r["goal_general"] = r["general_vs_base"] <= 1.05
    configs = {n: json.loads((p / "router_config.json").read_text()) for n, p in routers.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"setting": {"demo": str(demo), "window": WINDOW, "stride": STRIDE, "data": {k: str(v) for k, v in
                                                                                        data.items()}},
              "commands": commands, "base": base_row, "rows": rows,
              "routers": {n: {k: c[k] for k in ("inputs", "scalars", "layers", "hidden", "final_valid_loss",
                                                 "valid_reference_losses")} | {"train_tokens": c["training"][
                                                     "train_tokens"], "valid_tokens": c["training"]["valid_tokens"]}
                          for n, c in configs.items()}}
    (out / "results_cpu.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out / 'results_cpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
