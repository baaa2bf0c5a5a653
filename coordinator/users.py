"""Dashboard accounts: password hashing, the first admin, and `coordinator create-user`.

Passwords are stored only as werkzeug scrypt hashes. Checking a login always costs one hash
verification, even for an unknown name, so response time does not reveal which names exist.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import secrets
import sys
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.security import check_password_hash, generate_password_hash

from affectedge.settings import ConfigError
from affectedge.topics import ID_PATTERN
from coordinator import db

if TYPE_CHECKING:
    from coordinator.config import CoordinatorConfig

log = logging.getLogger(__name__)

ROLES = ("admin", "instructor")
MIN_PASSWORD = 10
# verified against when the name is unknown, so both paths cost one scrypt run
_DUMMY_HASH = generate_password_hash(secrets.token_urlsafe(16))


class UserError(ValueError):
    """A user request that cannot be done; the message says how to fix it."""


def check_password_strength(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"password is too short: use at least {MIN_PASSWORD} characters")


def create_user(session: Session, username: str, password: str, role: str) -> db.User:
    """Add an active user (caller commits); raises UserError for a bad name, role, password or duplicate."""
    if not ID_PATTERN.match(username):
        raise UserError(f"user name {username!r} is not valid: use 1-64 letters, digits, '_' or '-'")
    if role not in ROLES:
        raise UserError(f"role {role!r} is not valid: use one of {', '.join(ROLES)}")
    check_password_strength(password)
    if session.scalar(select(db.User).where(db.User.username == username)) is not None:
        raise UserError(f"user {username!r} already exists: pick another name or use --update")
    user = db.User(username=username, password_hash=generate_password_hash(password), role=role, active=True)
    session.add(user)
    return user


def set_password(user: db.User, password: str) -> None:
    check_password_strength(password)
    user.password_hash = generate_password_hash(password)


def authenticate(session: Session, username: str, password: str) -> db.User | None:
    """The active user with this name and password, else None."""
    user = session.scalar(select(db.User).where(db.User.username == username))
    if user is None:
        check_password_hash(_DUMMY_HASH, password)
        return None
    if not check_password_hash(user.password_hash, password) or not user.active:
        return None
    return user


def ensure_admin(sessions: sessionmaker, username: str, password: str) -> None:
    """Create the first admin from the config when the database has no admin yet.

    An empty configured password means "generate one": it is logged once, at warning level,
    because that log line is the only way the operator can learn it.
    """
    with sessions() as session:
        if session.scalar(select(func.count()).select_from(db.User).where(db.User.role == "admin")):
            return
        generated = not password
        password = password or secrets.token_urlsafe(12)
        try:
            create_user(session, username, password, "admin")
        except UserError as exc:
            raise ConfigError(f"web.admin_user / web.admin_password: {exc}") from None
        session.commit()
    if generated:
        log.warning(
            "created dashboard admin %r with generated password %s (shown once: log in and change it, "
            "or set web.admin_password)",
            username,
            password,
        )
    else:
        log.info("created dashboard admin %r from web.admin_password", username)


def _read_password(prompt_twice: bool) -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    if prompt_twice and getpass.getpass("Repeat password: ") != first:
        raise UserError("the two passwords differ: run the command again")
    return first


def _run(args: argparse.Namespace) -> int:
    from coordinator.commands import with_config

    def save(config: CoordinatorConfig) -> None:
        password = _read_password(prompt_twice=True)
        with db.connect(config.database.url)() as session:
            if args.update:
                user = session.scalar(select(db.User).where(db.User.username == args.name))
                if user is None:
                    raise UserError(f"user {args.name!r} does not exist: drop --update to create it")
                set_password(user, password)
                user.role = args.role
                user.active = True
            else:
                create_user(session, args.name, password, args.role)
            session.commit()

    with_config(args.config, save, UserError)
    print(f"{'updated' if args.update else 'created'} {args.role} {args.name!r}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `create-user NAME --role admin|instructor` (password from the terminal or stdin)."""
    parser = subparsers.add_parser(
        "create-user",
        help="create (or --update) a dashboard account",
        description="Create a dashboard account. The password is prompted for, or read as one line "
        "from stdin when stdin is not a terminal.",
    )
    parser.add_argument("name", help="user name (letters, digits, '_' or '-')")
    parser.add_argument("--role", choices=ROLES, default="instructor")
    parser.add_argument("--config", help="coordinator TOML config (for the database URL)")
    parser.add_argument("--update", action="store_true", help="reset the password and role of an existing user")
    parser.set_defaults(func=_run)
