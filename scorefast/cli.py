"""``scorefast`` command line: a registry of subcommands (``info``, ``bench``, ``sample``, ``train``).

Modules plug their own subcommand in with ``register(name, help)``; each gets an argparse
sub-parser to fill and returns the function that runs it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int | None]]]] = {}


def register(name: str, help: str):
    """Decorator: ``configure(parser) -> run(args)`` becomes subcommand ``name``."""

    def wrap(configure):
        _COMMANDS[name] = (help, configure)
        return configure

    return wrap


@register("info", "versions, CPU capability, backends and why any is missing")
def _info(parser: argparse.ArgumentParser):
    parser.add_argument("--json", action="store_true", help="print the report as JSON")

    def run(args):
        import json

        from .info import format_report, report

        r = report()
        print(json.dumps(r, indent=2) if args.json else format_report(r))

    return run


def _load_plugins() -> None:
    from . import (  # noqa: F401  (register "sample" and "train")
        bench,
        sampling_cli,
        train_cli,
    )


def main(argv: list[str] | None = None) -> int:
    _load_plugins()
    parser = argparse.ArgumentParser(prog="scorefast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for name, (help_text, configure) in _COMMANDS.items():
        runners[name] = configure(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    code = runners[args.command](args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
