"""charrnn COMMAND [options]: see `charrnn --help` and `charrnn COMMAND --help`."""
from __future__ import annotations

import argparse
import sys

from charrnn import cmd_data, cmd_forecast, cmd_model, cmd_quickstart, cmd_serve, cmd_submit, cmd_train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="charrnn",
        description="Character-level RNN language models on Ray: prepare a corpus, train, sample, serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (cmd_quickstart, cmd_data, cmd_train, cmd_model, cmd_forecast, cmd_serve, cmd_submit):
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from models import ModelFolderError
    from pipeline import CorpusError
    from training.config import TrainingError

    try:
        code = args.run(args)
    except (CorpusError, ModelFolderError, TrainingError) as err:
        print(f"charrnn {args.command}: error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"charrnn {args.command}: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
