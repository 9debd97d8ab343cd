"""The ``hybrid`` command: one-off use of the library from the shell.

The workflow (``snakemake --cores all``) runs the stages; this command is for single steps:
``hybrid models list|fetch``, ``hybrid demo OUT``, ``hybrid demo-industrial OUT``, ``hybrid ingest ...``,
``hybrid generate ...`` (:class:`hybrid.pipeline.HybridPipeline` on two images), ``hybrid score ...``.
All argument parsing lives here; each handler calls one library function.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hybrid import __version__
from hybrid.log import setup_logging


def _json_option(text: str, option: str, example: str) -> dict:
    """A JSON object given on the command line, or an error naming the option and an example."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{option} is not valid JSON ({e.msg} at character {e.pos}): give an object such as "
                         f"'{example}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object such as '{example}', got {text!r}")
    return value


def _demo(args: argparse.Namespace) -> None:
    from hybrid.data.demo import DemoConfig, make_demo, write_demo_sheet

    if not args.out and not args.sheet:
        raise ValueError("hybrid demo: give an output folder and/or --sheet PATH")
    if args.out:
        cfg = DemoConfig.from_dict({"seed": args.seed, **_json_option(args.config, "--config", '{"width": 256}')})
        print(json.dumps(make_demo(args.out, cfg), indent=2, default=str))
    if args.sheet:
        print(write_demo_sheet(args.sheet, seed=args.seed))


def _demo_industrial(args: argparse.Namespace) -> None:
    from hybrid.data.demo_industrial import IndustrialDemoConfig, make_demo_industrial

    more = _json_option(args.config, "--config", '{"test_per_defect": 9}')
    cfg = IndustrialDemoConfig.from_dict({"seed": args.seed, "size": args.size, **more})
    print(json.dumps(make_demo_industrial(args.out, cfg), indent=2, default=str))


def _ingest(args: argparse.Namespace) -> None:
    from hybrid.stages.ingest import ingest

    options = _json_option(args.options, "--options", '{"root": "/data/mvtec"}')
    ingest(args.layout, options, args.missing, args.out, args.skipped or f"{args.out}.skipped.csv",
           protocol=_json_option(args.protocol, "--protocol", '{"rounding": "floor"}'))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybrid", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"hybrid {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="write the embedded demo dataset (butterflies) to a folder")
    d.add_argument("out", nargs="?", help="write the demo dataset to this folder")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--sheet", help="write the demo's contact sheet PNG to this path")
    d.add_argument("--config", default="{}", help='more DemoConfig fields as JSON, e.g. \'{"width": 256}\'')
    d.set_defaults(func=_demo)

    d = sub.add_parser("demo-industrial", help="write the industrial demo (an MVTec AD tree) to a folder")
    d.add_argument("out")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--size", type=int, default=256)
    d.add_argument("--config", default="{}",
                   help='more demo.industrial settings as JSON, e.g. \'{"test_per_defect": 9}\'')
    d.set_defaults(func=_demo_industrial)

    i = sub.add_parser("ingest", help="read a dataset layout into a manifest parquet")
    i.add_argument("layout", help="demo, demo_industrial, heliconius, mvtec_ad, mvtec_3d, mvtec_loco, visa, madsim, "
                   "realiad or folder")
    i.add_argument("--options", default="{}", help='reader options as JSON, e.g. \'{"root": "/data/mvtec"}\'')
    i.add_argument("--missing", choices=["error", "skip"], default="error")
    i.add_argument("--out", default="manifest.parquet")
    i.add_argument("--skipped", default=None)
    i.add_argument("--protocol", default="{}", help='ingest.protocol settings as JSON, e.g. \'{"rounding": "floor"}\'')
    i.set_defaults(func=_ingest)

    add_models_cli(sub)
    add_generate_cli(sub)
    add_score_cli(sub)
    return p


def _models(args: argparse.Namespace) -> int:
    """Handler of ``hybrid models list|fetch``; fetch failures raise MissingWeightsError (exit via cli.main)."""
    from hybrid.models.store import fetch, format_status

    if args.models_command == "list":
        print(format_status())
    else:
        for p in fetch(args.names or None):
            print(p)
    return 0


def add_models_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``models list`` and ``models fetch [NAMES...]``; the handler is ``args.func`` (cmd_models)."""
    p = subparsers.add_parser("models", help="list or pre-download the pretrained weights")
    sub = p.add_subparsers(dest="models_command", required=True)
    sub.add_parser("list", help="show which weights are present and where").set_defaults(func=_models)
    f = sub.add_parser("fetch", help="download weights into the user cache (all when no NAME)")
    from hybrid.models.store import REGISTRY

    f.add_argument("names", nargs="*", metavar="NAME", help=f"any of: {', '.join(REGISTRY)}")
    f.set_defaults(func=_models)
    return p


def _generate(args: argparse.Namespace) -> None:
    from hybrid.manipulate import ManipulateConfig
    from hybrid.pipeline import generate_one

    manipulate = _json_option(args.manipulate, "--manipulate", '{"area": [0.02, 0.1]}') if args.manipulate else None
    cfg = ManipulateConfig.from_dict(manipulate) if manipulate is not None else None
    files = generate_one(args.checkpoint, args.reference, args.target, args.out, args.manipulation, args.seed,
                         args.edge_model, args.depth_source, args.reference_depth, args.target_depth,
                         args.device, cfg, depth_checkpoint=args.depth_checkpoint, feature_noise=args.feature_noise)
    print(json.dumps({k: str(v) for k, v in files.items()}, indent=2))


def add_generate_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``generate``: one global hybrid or local anomaly from two image files."""
    from hybrid.pipeline import ONE_OFF_DEPTH

    p = subparsers.add_parser("generate", help="generate a hybrid or a local anomaly from a reference and a "
                              "target image with a trained checkpoint")
    p.add_argument("--checkpoint", required=True, help="the train stage's checkpoint directory")
    p.add_argument("--reference", required=True, help="image giving the appearance")
    p.add_argument("--target", required=True, help="image giving the structure (depth and edges)")
    p.add_argument("--out", required=True, help="folder for the outputs")
    p.add_argument("--manipulation", default="none",
                   help="none (global hybrid), random, merge, remove, replace or tps (local anomaly)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--depth-checkpoint", default=None,
                   help="a depth-level (AnomalyHybrid*) checkpoint: also write each output's aligned depth and edge")
    p.add_argument("--feature-noise", type=float, default=0.0,
                   help="std of the noise added to the encoded features for diversity (AnomalyFactory)")
    p.add_argument("--edge-model", default=None, help="override the checkpoint's (pidinet, canny, ...)")
    p.add_argument("--depth-source", default=None, choices=ONE_OFF_DEPTH,
                   help="override the checkpoint's: depth_anything_small|_base|_large (estimated), sensor (the "
                        "depth files), flat (a constant depth, only on request), none")
    p.add_argument("--reference-depth", default=None, help="sensor depth file (xyz tiff) of the reference")
    p.add_argument("--target-depth", default=None, help="sensor depth file (xyz tiff) of the target")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--manipulate", default=None,
                   help='region and manipulation settings as JSON, e.g. \'{"area": [0.02, 0.1]}\'')
    p.set_defaults(func=_generate)
    return p


def add_score_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``score --predictions P.txt --reference REF.csv`` (prints the scores as JSON)."""
    p = subparsers.add_parser(
        "score", help="HDR butterfly challenge score of a predictions.txt against a reference CSV"
    )
    p.add_argument("--predictions", required=True, type=Path, help="predictions.txt (filename,score)")
    p.add_argument("--reference", required=True, type=Path, help="ref_val.csv or ref_test.csv")
    p.set_defaults(func=_cli_score)
    return p


def _cli_score(args: argparse.Namespace) -> int:
    from hybrid.metrics.challenge import score_files

    print(json.dumps(score_files(args.predictions, args.reference), indent=2))
    return 0


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
