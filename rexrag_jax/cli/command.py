"""What every command-line tool shares: argparse int types, one way to run a command and one way to fail.

Expected failures (bad input: ValueError, including CorpusError; OSError; RuntimeError such as a missing
optional package) print one `error: ...` line and exit 2, without a traceback, so the message naming the
file, line or option is the last thing on the screen: `fail` / `one_line_errors` for the absl tools
(rexrag-train, -eval, -demo), `run_command` for the argparse ones.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

EXIT_ERROR = 2
EXPECTED_ERRORS = (ValueError, OSError, RuntimeError)


def print_error(message: object) -> None:
    """The one-line `error: ...` report on stderr."""
    print(f"error: {message}", file=sys.stderr, flush=True)


def fail(message: object) -> NoReturn:
    """Report `message` as one `error: ...` line and exit with status 2 (no traceback)."""
    print_error(message)
    raise SystemExit(EXIT_ERROR)


@contextlib.contextmanager
def one_line_errors(errors: tuple[type[BaseException], ...] = EXPECTED_ERRORS) -> Iterator[None]:
    """Inside, an exception of one of `errors` ends the process like `fail` (one line, status 2)."""
    try:
        yield
    except errors as e:
        print_error(e)
        raise SystemExit(EXIT_ERROR) from None


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: an int in [low, high], with an error naming the bad value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
        return value

    return parse


positive_int = int_in(1)


def run_command(
    parser: argparse.ArgumentParser,
    action: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None,
    *,
    on_interrupt: Callable[[], int],
) -> int:
    """Parse `argv`, set up logging and run `action(args)`; returns the process exit status."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2): argparse already printed the message
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return action(args)
    except EXPECTED_ERRORS as e:
        print_error(e)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return on_interrupt()
