"""The ``hybrid`` command: one-off use of the library from the shell.

The workflow (``snakemake --cores all``) runs the stages; this command is for single steps:
``hybrid models list``, ``hybrid demo OUT``, ``hybrid demo-industrial OUT``, ``hybrid ingest ...``,
``hybrid score ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from hybrid import __version__
from hybrid.log import setup_logging


def _demo(args: argparse.Namespace) -> None:
    from hybrid.data.demo import DemoConfig, make_demo

    print(json.dumps(make_demo(args.out, DemoConfig(seed=args.seed)), indent=2, default=str))


def _demo_industrial(args: argparse.Namespace) -> None:
    from hybrid.data.demo_industrial import IndustrialDemoConfig, make_demo_industrial

    cfg = IndustrialDemoConfig.from_dict({"seed": args.seed, "size": args.size, **json.loads(args.config)})
    print(json.dumps(make_demo_industrial(args.out, cfg), indent=2, default=str))


def _ingest(args: argparse.Namespace) -> None:
    from hybrid.ingest import ingest

    options = json.loads(args.options)
    ingest(args.layout, options, args.missing, args.out, args.skipped or f"{args.out}.skipped.csv",
           protocol=json.loads(args.protocol))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybrid", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"hybrid {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="write the embedded demo dataset (butterflies) to a folder")
    d.add_argument("out")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)

    d = sub.add_parser("demo-industrial", help="write the industrial demo (an MVTec AD tree) to a folder")
    d.add_argument("out")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--size", type=int, default=256)
    d.add_argument("--config", default="{}",
                   help='more demo.industrial settings as JSON, e.g. \'{"test_per_defect": 9}\'')
    d.set_defaults(func=_demo_industrial)

    i = sub.add_parser("ingest", help="read a dataset layout into a manifest parquet")
    i.add_argument("layout", help="demo, demo_industrial, heliconius, mvtec_ad, mvtec_3d, mvtec_loco, visa or folder")
    i.add_argument("--options", default="{}", help='reader options as JSON, e.g. \'{"root": "/data/mvtec"}\'')
    i.add_argument("--missing", choices=["error", "skip"], default="error")
    i.add_argument("--out", default="manifest.parquet")
    i.add_argument("--skipped", default=None)
    i.add_argument("--protocol", default="{}", help='ingest.protocol settings as JSON, e.g. \'{"rounding": "floor"}\'')
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
    except (ValueError, KeyError, OSError, RuntimeError) as e:  # a user's mistake: one line, the fix in it
        logging.getLogger("hybrid").debug("hybrid %s failed", args.command, exc_info=True)
        print(f"hybrid {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
