"""`memdec` command line: each subcommand parses its arguments and calls one public function.

Each block below belongs to one stage module; keep parsing here and the work in the module.
"""

from __future__ import annotations

import argparse
import os
import sys

# ---- demo (memdec/demo.py) ----


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the bundled corpus with tiny models, on CPU")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")

    def run(args):
        from memdec.demo import run_demo

        run_demo(out=args.out)

    p.set_defaults(func=run)


# ---- end of blocks ----

REGISTER = [_add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memdec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in REGISTER:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `memdec` command."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        msg = str(e).strip("'\"")
        print(f"memdec {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
