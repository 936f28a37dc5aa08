"""What every ``crm-events`` command shares: its errors, its argument types, the runtime (engine,
sessions and Celery app, built lazily) and the one way to print JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import date
from typing import TYPE_CHECKING, Any, NoReturn

from config.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

Handler = Callable[[argparse.Namespace, "Runtime"], int]
#: ``add(name, handler, help, json_flag=False)``: adds a command to the parser (``main``).
AddCommand = Callable[..., argparse.ArgumentParser]


class CommandError(Exception):
    """The command could not do its work (a thing named that does not exist, a refusal, a
    failure): one line on stderr, exit status 1."""


class InputError(CommandError):
    """The command line or a file it reads is wrong (malformed, contradictory, missing):
    one line on stderr, exit status 2, as for bad configuration."""


class Parser(argparse.ArgumentParser):
    """argparse, whose errors are one line on stderr (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def count(text: str) -> int:
    """A whole number from 0 to what the database keeps (an id, a limit, a target)."""
    from models.limits import MAX_ROW_ID

    if not text.strip().isascii():
        raise argparse.ArgumentTypeError(f"not a whole number: {text[:40]!r}")
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text[:40]!r}") from None
    if not 0 <= value <= MAX_ROW_ID:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_ROW_ID}, not {text[:40]}")
    return value


def seconds(text: str) -> float:
    """A time to wait, in seconds: a finite number from 0 (``nan`` would never be reached)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text[:40]!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"a number of seconds from 0, not {text[:40]!r}")
    return value


#: What a message's ``source_system`` may be (models.schemas.common.MessageSchema).
MAX_SOURCE_SYSTEM = 100


def source_system(text: str) -> str:
    """Who sent the messages, as each one names it: 1 to 100 characters."""
    if not 1 <= len(text) <= MAX_SOURCE_SYSTEM or not text.isprintable():
        raise argparse.ArgumentTypeError(
            f"1 to {MAX_SOURCE_SYSTEM} printable characters, not {text[:40]!r}"
        )
    return text


def port(text: str) -> int:
    """A TCP port (0: any free one)."""
    value = count(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, not {value}")
    return value


def iso_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def period(text: str) -> str:
    """An ISO week (2026-W48) or a month (2026-11)."""
    from tasks.periods import validate_period

    try:
        validate_period(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a period {text!r} ({exc})") from None
    return text


class Runtime:
    """Lazily built engine, sessions and Celery app for one command invocation."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None
        self._app: Any = None
        self._publisher: Any = None

    @property
    def engine(self) -> Engine:
        from models.db import create_db_engine

        if self._engine is None:
            self._engine = create_db_engine(self.settings)
        return self._engine

    @property
    def sessions(self) -> sessionmaker[Session]:
        from models.db import create_session_factory

        if self._sessions is None:
            self._sessions = create_session_factory(self.engine, self.settings.count_internal_calls)
        return self._sessions

    @property
    def app(self) -> Any:
        if self._app is None:
            from workers.app import create_app

            self._app = create_app(self.settings)
        return self._app

    @property
    def publisher(self) -> Any:
        """An app for sending messages by task name only (``create_app(tasks=False)``): what
        the commands that publish use, the app itself when it is built already."""
        if self._app is not None:
            return self._app
        if self._publisher is None:
            from workers.app import create_app

            self._publisher = create_app(self.settings, tasks=False)
        return self._publisher


def emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, ensure_ascii=False, indent=2, default=str) + "\n")


def run_celery(command: Callable[[list[str]], Any], argv: list[str]) -> None:
    """Run a Celery command line (worker, beat): its option errors are input errors."""
    import click

    try:
        command(argv)
    except click.exceptions.UsageError as exc:
        raise InputError(exc.format_message()) from exc


def subcommands(sub: Any, name: str, help_text: str) -> Any:
    """The sub-command group ``name`` (e.g. ``import``), created unless another part made it."""
    parser = sub.choices.get(name)
    if parser is None:
        return sub.add_parser(name, help=help_text).add_subparsers(
            dest=f"{name}_command", required=True
        )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError(f"crm-events {name} has no sub-commands")
