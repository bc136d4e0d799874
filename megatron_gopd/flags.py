"""Command-line flags derived from typed configs: one source of truth per setting.

A component owns a frozen dataclass; each field that is a flag is declared with :func:`flag`,
which holds its default, help text and (where they are not the obvious ones) its flag name,
choices and metavar. :func:`add_flags` derives the argparse arguments from the fields
(``Literal[...]`` gives the choices, ``bool`` a switch, ``X | None`` an optional value, a tuple a
list), and :func:`config_from_args` builds the dataclass back from the parsed namespace. Adding a
setting is one field in one file::

    @dataclass(frozen=True)
    class OptimConfig:
        lr: float = flag(1e-5, help="peak learning rate")
        lr_decay_style: Literal["constant", "cosine", "linear"] = flag(
            "constant", help="learning-rate schedule after the warm-up")

The flag name is ``--`` + the field name with dashes, unless ``name=`` says otherwise (Megatron-LM's
names are kept: ``--tensor-model-parallel-size``); the namespace key (and the YAML key of
``--config`` files) is that name with underscores. ``parse=`` turns the flag's value into the
field's when they differ (``--fdiv-advantage naive`` -> ``fdiv_correction=False``);
``invert=True`` makes ``--no-X`` switch a field that defaults to True off. Every flag must have
help text, and ``--help`` shows every default (``default_help=`` words it where the value alone
would mislead, e.g. "the rollout batch").

Plain data only: no argparse at import time of a config module, so the pure ``gopd/`` package can
declare its flags too.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, Literal, get_args, get_origin

__all__ = [
    "FLAG",
    "FlagFormatter",
    "add_flags",
    "config_from_args",
    "flag",
    "flag_dest",
    "flag_fields",
    "flag_name",
]

FLAG = "gopd_flag"  # the key of a field's metadata that makes it a flag
_MISSING = dataclasses.MISSING


def flag(
    default: Any = _MISSING,
    *,
    help: str,
    name: str | None = None,
    choices: tuple | None = None,
    metavar: str | None = None,
    parse: Callable[[Any], Any] | None = None,
    cli_default: Any = _MISSING,
    default_help: str | None = None,
    invert: bool = False,
    action: str | None = None,
    type: Callable[[str], Any] | None = None,
    group: str | None = None,
    default_factory: Callable[[], Any] | Any = _MISSING,
) -> Any:
    """A dataclass field that is also a command-line flag (see the module docstring).

    Args:
        default: the field's default (and the flag's, unless ``cli_default`` is given).
        help: what the setting does; shown by ``--help`` with the default.
        name: the flag, e.g. ``"--rollout-temperature"`` (default: ``--`` + field name).
        choices: the allowed flag values (default: from a ``Literal`` annotation).
        metavar: the value's placeholder in ``--help``.
        parse: flag value -> field value, when the two differ in type or meaning.
        cli_default: the flag's default when it differs from the field's (with ``parse``).
        default_help: words for the default in ``--help`` (e.g. "the student's checkpoint").
        invert: ``--no-X`` style switch for a field that is True by default.
        action: ``"append"`` for a repeatable flag (the field holds a tuple).
        type: argparse's converter of the flag's string, when not the annotation's type.
        group: the ``--help`` section, when it is not the config class's ``FLAG_GROUP``.
    """
    meta = {
        FLAG: dict(
            help=help,
            name=name,
            choices=choices,
            metavar=metavar,
            parse=parse,
            cli_default=cli_default,
            default_help=default_help,
            invert=invert,
            action=action,
            type=type,
            group=group,
        )
    }
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_fields(cls) -> Iterator[tuple[dataclasses.Field, dict[str, Any], Any]]:
    """``(field, flag spec, resolved annotation)`` for each flag of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(FLAG)
        if spec is not None:
            yield f, spec, hints[f.name]


def flag_name(f: dataclasses.Field, spec: dict[str, Any]) -> str:
    return spec["name"] or "--" + f.name.replace("_", "-")


def flag_dest(f: dataclasses.Field, spec: dict[str, Any]) -> str:
    return flag_name(f, spec).removeprefix("--").replace("-", "_")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return None


def _unwrap_optional(tp: Any) -> Any:
    """``X | None`` -> ``X`` (other annotations unchanged)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _argparse_kwargs(f: dataclasses.Field, spec: dict[str, Any], tp: Any) -> dict[str, Any]:
    default = _field_default(f)
    if spec["cli_default"] is not _MISSING:
        default = spec["cli_default"]
    kw: dict[str, Any] = {"dest": flag_dest(f, spec), "help": spec["help"]}
    if not spec["help"] or not spec["help"].strip():
        raise TypeError(f"flag for {f.name} has no help text")
    base = _unwrap_optional(tp)
    if spec["invert"]:
        if default is not True:
            raise TypeError(f"{f.name}: invert=True needs a field that defaults to True")
        kw.update(action="store_true", default=False)
        return kw
    if base is bool and spec["parse"] is None:
        if default is not False:
            raise TypeError(f"{f.name}: a switch must default to False (use invert=True)")
        kw.update(action="store_true", default=False)
        return kw
    choices = spec["choices"]
    if get_origin(base) is Literal:
        choices = choices or get_args(base)
        base = type(get_args(base)[0])
    if spec["action"] == "append":
        kw.update(action="append", default=None)
        item = get_args(base)[0] if get_origin(base) is tuple else str
        kw["type"] = item
    elif get_origin(base) is tuple:
        kw.update(nargs="+", type=get_args(base)[0], default=None)
    else:
        kw["default"] = default
        if spec["parse"] is None and base in (int, float, str):
            kw["type"] = base
    if spec["parse"] is not None and choices is None and spec["action"] is None:
        kw["type"] = str
    if spec["type"] is not None:
        kw["type"] = spec["type"]
    if choices is not None:
        kw["choices"] = list(choices)
    if spec["metavar"]:
        kw["metavar"] = spec["metavar"]
    return kw


def add_flags(parser: argparse.ArgumentParser, cls, *, groups: dict[str, Any] | None = None):
    """Add the flags of the dataclass ``cls`` to ``parser``, in field order, each in its ``--help``
    section (the field's ``group=``, else ``cls.FLAG_GROUP``; sections are created on first use
    and kept in ``groups``, so several classes can share one)."""
    groups = {} if groups is None else groups
    for f, spec, tp in flag_fields(cls):
        title = spec["group"] or getattr(cls, "FLAG_GROUP", None)
        if title is None:
            target = parser
        else:
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            target = groups[title]
        action = target.add_argument(flag_name(f, spec), **_argparse_kwargs(f, spec, tp))
        action.default_help = spec["default_help"]  # read by FlagFormatter
    return groups


def config_from_args(cls, args: argparse.Namespace, **fields: Any):
    """An instance of ``cls`` from the parsed flags; ``fields`` supplies (or overrides) the rest."""
    values: dict[str, Any] = {}
    for f, spec, tp in flag_fields(cls):
        if f.name in fields:
            continue
        v = getattr(args, flag_dest(f, spec))
        if spec["invert"]:
            v = not v
        elif v is None and (spec["action"] == "append" or get_origin(tp) is tuple):
            values[f.name] = _field_default(f)  # a list flag not given: the field's default
            continue
        elif isinstance(v, list):
            v = tuple(v)
        if spec["parse"] is not None and v is not None:
            v = spec["parse"](v)
        values[f.name] = v
    return cls(**values, **fields)


class FlagFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every flag's default: its value, the flag's ``default_help`` words, or
    "off" for a switch. (argparse's own formatter skips flags without help text and prints
    ``None`` for defaults that a later step computes.)"""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "(default" in help_text or "%(default)" in help_text:
            return help_text  # the help says it
        if action.default is argparse.SUPPRESS:
            return help_text
        if not action.option_strings or action.required:
            return help_text
        words = getattr(action, "default_help", None)
        if words:
            return f"{help_text} (default: {words})"
        if isinstance(action, argparse._HelpAction):
            return help_text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{help_text} (default: off)"
        if action.default is None:
            return f"{help_text} (default: none)"
        return f"{help_text} (default: %(default)s)"
