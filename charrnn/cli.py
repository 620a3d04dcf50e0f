"""charrnn COMMAND [options]: see `charrnn --help` and `charrnn COMMAND --help`."""
from __future__ import annotations

import argparse
import sys

from charrnn.ray_session import is_local, require_token_for_local_ray, stop_on_signals
from charrnn import cmd_data, cmd_forecast, cmd_model, cmd_quickstart, cmd_serve, cmd_submit, cmd_train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="charrnn",
        description="Character-level RNN language models on Ray: prepare a corpus, train, sample, serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (cmd_quickstart, cmd_data, cmd_train, cmd_model, cmd_forecast, cmd_serve, cmd_submit):
        module.add_commands(sub)
    parser.set_defaults(parser=parser)  # `submit` checks the command it sends with this same parser
    return parser


# The errors that are the user's to fix (one line, exit 2), by the module defining each. A command
# imports only what it needs, so a bad argument fails fast; an error's class is loaded if it was raised.
USER_ERRORS = {"charrnn.errors": "CommandError", "storage": "StorageError", "pipeline.errors": "CorpusError",
               "models.folder": "ModelFolderError", "models.precision": "PrecisionError",
               "training.config": "TrainingError"}


def _is_user_error(err: Exception) -> bool:
    loaded = tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS.items() if module in sys.modules)
    return isinstance(err, loaded)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    stop_on_signals()
    if is_local(getattr(args, "address", None)):
        require_token_for_local_ray()
    try:
        code = args.handler(args)
    except KeyboardInterrupt:
        print(f"charrnn {args.command}: interrupted", file=sys.stderr)
        code = 130
    except Exception as err:
        if not _is_user_error(err):
            raise
        from storage import redact_uris  # light: no Ray, no torch

        print(f"charrnn {args.command}: error: {redact_uris(str(err))}", file=sys.stderr)
        code = 2
    sys.exit(code)
