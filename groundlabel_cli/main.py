"""The `groundlabel` command: the parser of every verb and the console script's entry point.

Every module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its verbs.
Those modules import nothing heavy at module level (no torch), so ``groundlabel --help`` is instant
and the backend's verbs work in an install without the worker extras.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from groundlabel import __version__
from groundlabel.errors import UserError

COMMAND_MODULES: list[str] = [
    "groundlabel_cli.predict",
    "workers.evaluation.cli",
    "workers.models.lavt.cli",
    "workers.models.clipself.cli",
    "workers.models.sam.tiny",
    "groundlabel_cli.export",
    "groundlabel_cli.report",
    "groundlabel_cli.serve",
    "groundlabel_cli.prelabel",
    "groundlabel_cli.background",
    "groundlabel_cli.models",
    "groundlabel_cli.calibrate",
    "groundlabel_cli.worker",
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered verb."""
    parser = argparse.ArgumentParser(
        prog="groundlabel",
        description=(
            "Pre-label segmentation datasets: GEM for class prompts, LAVT for referring expressions, "
            "served to Label Studio as an ML backend, and exported as COCO / RefCOCO datasets."
        ),
    )
    parser.add_argument("--version", action="version", version=f"groundlabel {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:
        print(f"groundlabel {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
