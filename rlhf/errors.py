"""Errors a user can act on, and the wrapper that turns them into one line and an exit code.

Every problem caused by the user's input (a bad data file, an unknown registry
reference, a config field that does not exist) is raised as a `UserError`
subclass whose message says what is wrong, where, and what was expected. Stage
scripts run `main` through `run_cli`, which prints that message on one line of
stderr and exits non-zero, never with a traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """A problem with the user's input; the message is shown as is, without a traceback."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or command-line option is wrong (unknown field, wrong type, bad value)."""


class DataError(UserError):
    """A data file or dataset does not match its schema.

    `problems` holds one `FILE:LINE: message` string per problem found (bounded).
    """

    exit_code = 1

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []


class RegistryError(UserError):
    """A registry reference is unknown, of the wrong stage, or its artifacts fail verification."""


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_cli(main: Callable[[], object]) -> None:
    """Run a command-line entry point, turning `UserError` into one clear line and an exit code."""
    try:
        main()
    except UserError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
