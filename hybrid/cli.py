"""The ``hybrid`` command: one-off use of the library from the shell.

The workflow (``snakemake --cores all``) runs the stages; this command is for single steps:
``hybrid models list``, ``hybrid demo OUT``, ``hybrid ingest ...``, ``hybrid score ...``.
"""

from __future__ import annotations

import argparse
import json
import sys

from hybrid import __version__
from hybrid.log import setup_logging


def _demo(args: argparse.Namespace) -> None:
    from hybrid.data.demo import DemoConfig, make_demo

    print(json.dumps(make_demo(args.out, DemoConfig(seed=args.seed)), indent=2, default=str))


def _ingest(args: argparse.Namespace) -> None:
    from hybrid.ingest import ingest

    options = json.loads(args.options)
    ingest(args.layout, options, args.missing, args.out, args.skipped or f"{args.out}.skipped.csv")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybrid", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"hybrid {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="write the embedded demo dataset (butterflies) to a folder")
    d.add_argument("out")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)

    i = sub.add_parser("ingest", help="read a dataset layout into a manifest parquet")
    i.add_argument("layout", help="demo, heliconius, mvtec_ad, mvtec_3d, mvtec_loco, visa or folder")
    i.add_argument("--options", default="{}", help='reader options as JSON, e.g. \'{"root": "/data/mvtec"}\'')
    i.add_argument("--missing", choices=["error", "skip"], default="error")
    i.add_argument("--out", default="manifest.parquet")
    i.add_argument("--skipped", default=None)
    i.set_defaults(func=_ingest)

    from hybrid.generate import add_cli as add_generate_cli
    from hybrid.metrics.challenge import add_cli as add_score_cli
    from hybrid.models.store import add_cli as add_models_cli

    add_models_cli(sub)
    add_generate_cli(sub)
    add_score_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"hybrid {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
