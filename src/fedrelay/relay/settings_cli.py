"""``fedrelay serve``'s flags, generated from :class:`RelayConfig`'s fields.

A field ``max_store_lag: int`` becomes ``--max-store-lag N`` with the field's docstring as
help; bools become ``--x/--no-x``, lists repeatable flags, ``Literal`` choices. Every flag
defaults to None, "not given", so the environment and then the field's default decide.
"""

from __future__ import annotations

import argparse
from typing import Any, Literal, get_args, get_origin

from pydantic.fields import FieldInfo

from .config import RelayConfig, env_name, flag_hint, flag_of


def summary(field: FieldInfo) -> str:
    """The first paragraph of a field's docstring, on one line, without reST markup."""
    first = (field.description or "").strip().split("\n\n")[0]
    return " ".join(first.replace("``", "").split())


def shown_default(name: str, field: FieldInfo) -> str | None:
    """The default as help and docs show it; None when there is nothing to say (none, off)."""
    hint = flag_hint(field)
    if hint.default is not None:
        return hint.default
    value = field.get_default(call_default_factory=True)
    if value is None or value is False or value == []:
        return None
    if value is True:
        return "on"
    if isinstance(value, int) and name.endswith("_bytes") and value >= 1024 and value % 1024 == 0:
        kib = value // 1024
        return f"{kib // 1024} MiB" if kib % 1024 == 0 else f"{kib} KiB"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, in the order the fields are declared."""
    for name, field in RelayConfig.model_fields.items():
        hint = flag_hint(field)
        annotation = field.annotation
        options: dict[str, Any] = {"dest": name, "default": None}
        default = shown_default(name, field)
        help_text = summary(field) + (f" (default: {default})" if default else "") + f" [{env_name(name)}]"
        options["help"] = help_text.replace("%", "%%")
        if annotation is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif get_origin(annotation) is list:
            options["action"] = "append"
        elif get_origin(annotation) is Literal:
            options["choices"] = list(get_args(annotation))
        elif annotation in (int, float):
            options["type"] = annotation
            options["metavar"] = "N" if annotation is int else "X"
        if hint.metavar is not None:
            options["metavar"] = hint.metavar
        parser.add_argument(flag_of(name, field), **options)


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (None: not given), for :meth:`RelayConfig.from_env`."""
    return {name: getattr(args, name) for name in RelayConfig.model_fields}
