"""`cdt` entry point. Each subcommand lives in its own module and registers itself;
expected failures (bad input, missing files) print one line and exit non-zero."""

from __future__ import annotations

import argparse
import sys

from . import dataset_commands, media_commands, model_commands, serve_commands, train_commands

COMMAND_MODULES = (model_commands, media_commands, dataset_commands, serve_commands, train_commands)


class CommandError(Exception):
    """An expected failure, reported as one line without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdt", description="CDT video tokenizer")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (CommandError, ValueError, OSError) as exc:
        print(f"cdt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
