"""``scorefast`` command line: a registry of subcommands (``info``, ``bench``, ``sample``, ``train``).

Modules plug their own subcommand in with ``register(name, help)``; each gets an argparse
sub-parser to fill and returns the function that runs it.

A user's mistake is one line on stderr naming the option, and a non-zero exit, never a
traceback: argparse errors print without the usage block, and a runner turns the package's
bad-input errors (a ValueError/TypeError whose message starts with the argument's name, an
OSError on a user's file) into ``CommandError`` with ``user_input``, rewriting the API's
argument name into the command-line option.  Anything else is a bug and keeps its traceback;
``SCOREFAST_DEBUG=1`` shows the traceback of a user error too.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int | None]]]] = {}
DEBUG_ENV = "SCOREFAST_DEBUG"


def _user_errors() -> tuple[type[BaseException], ...]:
    """The package's bad-input errors (ValueError/TypeError naming the argument; a forced backend
    that cannot run here) and OSError (a user's file that cannot be read or written)."""
    from .backends import BackendUnavailableError

    return (ValueError, TypeError, OSError, BackendUnavailableError)


class CommandError(Exception):
    """A user's mistake: ``main`` prints it as one line, ``scorefast COMMAND: message``, and exits 1."""


def one_line(err: BaseException, flags: dict[str, str] | None = None) -> str:
    """``err``'s message on one line, its leading ``name:`` rewritten as ``flags[name]`` if listed."""
    text = " ".join(str(err).split()) or type(err).__name__
    name, sep, rest = text.partition(": ")
    if sep and flags and name in flags:
        return f"{flags[name]}: {rest}"
    return text


@contextlib.contextmanager
def user_input(flags: dict[str, str] | None = None, errors: tuple[type[BaseException], ...] | None = None) -> Iterator:
    """Within: ``errors`` (default: the package's bad-input errors, ``_user_errors()``) become a
    ``CommandError`` naming the option (``flags`` maps API argument names to options)."""
    caught = errors if errors is not None else _user_errors()
    try:
        yield
    except caught as err:
        raise CommandError(one_line(err, flags)) from err


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


positive_int = _int_at_least(1)  # argparse types
nonnegative_int = _int_at_least(0)


def finite_float(text: str) -> float:
    """argparse type: a finite float (ranges are checked by the API, which names the argument)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    parser = _Parser(prog="scorefast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for name, (help_text, configure) in _COMMANDS.items():
        runners[name] = configure(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        code = runners[args.command](args)
    except CommandError as err:
        if debug:
            raise
        raise SystemExit(f"scorefast {args.command}: {err}") from None
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"scorefast {args.command}: interrupted (rerun the same command to resume)", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:  # the reader of our output went away (`scorefast bench --table F | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        raise SystemExit(141) from None
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
