"""``adapruner`` command line: ``eval``, ``prune``, ``finetune``, ``search``, ``export``, ``bench-model``; a module per
command (its flags and what it runs), the shared flags in :mod:`.args`.

The service adds ``serve``, ``worker``, ``dashboard`` and ``db`` to the same parser (see
``service/cli.py``), so the library never imports the service. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from ..errors import AdaPrunerError
from . import bench_model, evaluate, export, finetune, prune, search
from .args import OneLineParser, check_before_loading

COMMANDS = (evaluate, prune, finetune, search, export, bench_model)


def build_parser(add_commands: Callable[[argparse._SubParsersAction], None] | None = None) -> argparse.ArgumentParser:
    """The parser of the library's commands; ``add_commands(subparsers)`` may add more (the service's)."""
    parser = OneLineParser(prog="adapruner", description="Sample-aware structured pruning of LLaMA-family LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for command in COMMANDS:
        command.add_parser(sub)
    if add_commands is not None:
        add_commands(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        import optuna
        import transformers

        transformers.utils.logging.disable_progress_bar()  # our own bars say what is happening
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        check_before_loading(args)
        return int(args.func(args) or 0)
    except AdaPrunerError as exc:
        print(f"adapruner: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adapruner: interrupted", file=sys.stderr)
        return 130
