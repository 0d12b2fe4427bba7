"""Argument helpers every package's subcommands share: the one-line error parser,
argument types that name the bad value, and the default data directory (read from
the environment here, at the edge, and passed down as a parameter)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from towers.errors import ConfigError


class OneLineParser(argparse.ArgumentParser):
    """Argument errors are one line (``twotower train: error: ...``), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def default_data_dir() -> str:
    return os.environ.get("TWOTOWER_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "twotower"))


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from e
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def existing_dir(value: str) -> Path:
    p = Path(value)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"directory not found: {value}")
    return p


REDIS_URL_ENV = "TWOTOWER_REDIS_URL"


def secret_file(value: str) -> str:
    """The first line of a file (a mounted Kubernetes Secret, say), without its newline."""
    try:
        text = Path(value).read_text().strip()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{value}: unreadable ({e.strerror})") from e
    if not text:
        raise argparse.ArgumentTypeError(f"{value}: empty")
    return text


def add_redis_url(p: argparse.ArgumentParser, *, flag: str = "--redis-url",
                  required: bool, help: str) -> None:
    """``flag URL``, or ``--redis-url-file FILE``, or (for a command that needs Redis) the
    ``TWOTOWER_REDIS_URL`` environment variable: a URL with a password need not sit on a
    command line (``ps``, shell history, a manifest's args). All set ``args.redis_url``.
    Optional uses (publish, serve) read no environment: setting it must not switch them on."""
    env = (os.environ.get(REDIS_URL_ENV) or None) if required else None
    g = p.add_mutually_exclusive_group(required=required and env is None)
    g.add_argument(flag, dest="redis_url", default=env, metavar="URL",
                   help=f"{help} (or --redis-url-file" + (f", or ${REDIS_URL_ENV})" if required else ")"))
    g.add_argument("--redis-url-file", dest="redis_url", type=secret_file, default=env, metavar="FILE",
                   help=f"read {flag}'s URL from the first line of FILE")


def Doc(text: str) -> Any:
    """A config field's description, as ``Annotated`` metadata (pydantic's ``Field``): the
    help of the flag ``add_config_flags`` derives from the field."""
    from pydantic import Field

    return Field(description=text)


def config_field(config: type, path: str) -> tuple[Any, Any, str]:
    """The (type, default, description) of the field at dotted ``path`` of a dataclass config,
    read from its declaration: ``Annotated[T, Field(..., description=...)]`` gives the
    description, nested dataclass fields are walked by their names."""
    *outer, name = path.split(".")
    cls = config
    for part in outer:
        cls = typing.get_type_hints(cls, include_extras=True)[part]
    hint = typing.get_type_hints(cls, include_extras=True)[name]
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default  # type: ignore[operator]
    description = ""
    while typing.get_origin(hint) is typing.Annotated:
        description = next((m.description for m in reversed(hint.__metadata__)
                            if getattr(m, "description", None)), description)
        hint = typing.get_args(hint)[0]
    return hint, default, description


def add_config_flags(p: argparse.ArgumentParser, config: type, flags: Mapping[str, str]) -> None:
    """One flag per config field (``flags``: flag -> dotted field path), typed, described and
    defaulted by the field's declaration, so the config class stays the one source of truth.
    A flag left unset is None (the field keeps its default or the config file's value); its
    value lands in ``args`` under the path with ``__`` for dots (``config_overrides``)."""
    for flag, path in flags.items():
        hint, default, description = config_field(config, path)
        kwargs: dict[str, Any] = {"dest": path.replace(".", "__"), "default": None}
        if typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(hint))
        elif hint in (int, float):
            kwargs.update(type=hint, metavar="N")
        else:
            kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        shown = f" (default: {default})" if default != "" else ""
        p.add_argument(flag, help=f"{description}{shown}".replace("%", "%%"), **kwargs)  # argparse %-formats help


def config_overrides(args: argparse.Namespace, flags: Mapping[str, str]) -> dict[str, Any]:
    """The flags of ``add_config_flags`` that were given, as ``field__path=value`` overrides."""
    return {path.replace(".", "__"): v for path in flags.values()
            if (v := getattr(args, path.replace(".", "__"))) is not None}


def flag_of(args: argparse.Namespace, flags: Mapping[str, str], error: ConfigError) -> ConfigError:
    """A config error about a field a given flag set, renamed to the flag the user typed (one
    about a value from elsewhere, a config file say, keeps its field's name)."""
    by_path = {path: flag for flag, path in flags.items() if getattr(args, path.replace(".", "__")) is not None}
    return ConfigError(by_path[error.field], error.message) if error.field in by_path else error
