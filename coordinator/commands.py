"""What the coordinator's admin commands share: their config loaded, and each failure an admin can
fix (a bad config, an unreachable database, a refused request) one line on stderr and exit status 2,
said the same way by every command (:func:`coordinator.cli.main` prints it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError

from affectedge.settings import ConfigError
from coordinator import db
from coordinator.config import CoordinatorConfig, load_config

T = TypeVar("T")


class CommandFailed(Exception):
    """A command's failure in one line: what is wrong and how to fix it."""


def with_config(path: str | None, work: Callable[[CoordinatorConfig], T], *expected: type[Exception]) -> T:
    """``work`` run on the config at ``path``; a config error, a database error (said with the
    database's address, password hidden) or one of ``expected`` raises :class:`CommandFailed`."""
    config = None
    try:
        config = load_config(path)
        return work(config)
    except (ConfigError, *expected) as exc:
        raise CommandFailed(str(exc)) from None
    except SQLAlchemyError as exc:
        raise CommandFailed(db.describe_error(exc, config.database.url) if config else str(exc)) from None
