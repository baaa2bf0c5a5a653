"""Loading a deployable's TOML configuration into a validated pydantic model.

Every deployable (edge agent, coordinator) describes its config as pydantic models with
defaults; :func:`load` reads the file, validates it and turns the first problem into one line
that names the key and says how to fix it (:class:`ConfigError`; the CLIs exit with status 2).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)
#: parts of key names whose values may hold credentials (admin_password, secret_key, api_tokens,
#: URLs with user:pass@ or ?pwd=): an error under such a key never repeats the value, since errors
#: end up in logs and journals
SECRET_WORDS = ("password", "secret", "token", "key", "source", "url", "endpoint")


class Section(BaseModel):
    """Base for config sections: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigError(Exception):
    """A configuration file that cannot be used; the message is one line."""


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown key `{key}`: remove it or check its spelling against the example config"
    if kind == "missing":
        return f"missing key `{key}`: add it"
    return f"key `{key}`: {error['msg']}{_got(error)}; fix the value"


def _got(error: dict) -> str:
    """`` (got X)`` for a plain value under a non-secret key; nothing for secrets, and nothing for a
    table or list, which may hold secrets further down (e.g. every camera's source URL)."""
    value = error.get("input")
    if any(word in str(part) for part in error["loc"] for word in SECRET_WORDS):
        return ""
    if not isinstance(value, str | int | float | bool):
        return ""
    return f" (got {value!r})"


def parse(data: dict, model: type[T], source: str) -> T:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc.errors()[0])}") from None


def load(path: Path | str | None, model: type[T]) -> T:
    """Validated config from ``path``; the model's defaults when ``path`` is None."""
    if path is None:
        return parse({}, model, "built-in defaults")
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file; pass --config with an existing file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; pass --config with the TOML config file") from None
    except OSError as exc:  # a directory, no read permission, an I/O error
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc}); pass --config with a readable "
                          "config file") from None
    return parse(data, model, str(path))
