"""Command-line options made from config dataclasses, so that each option is declared once, beside the field it sets.

`config_options(EngineOptions, ...)` adds one option per `setting` field of the configs to a typer command and
hands the command a `Given`: the values the user set, by field name. The command builds its configs from it
(`given.build(EngineOptions)`); a field several configs share (`--seed`, `--out` of both judge kinds) is one option.
A field the user did not set keeps its config's default, so options default to None here.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, Union

import typer

from misguard.core.errors import MisguardError
from misguard.core.settings import Range, is_setting, number_range, setting_range


class Given(dict):
    """The config options the user set (field name -> value), as one command received them."""

    def __init__(self, values: dict[str, Any], flags: dict[str, str]):
        super().__init__(values)
        self.flags = flags
        """Field name -> the option that sets it, for messages."""

    def build(self, config: type, *, context: str = "", **fixed: Any):
        """`config` from the options given (fields it does not have are ignored) and `fixed` values. Raises
        MisguardError naming the option of a required field that was not given (`context` ends the message, e.g.
        "for --kind vlm")."""
        names = {f.name for f in dataclasses.fields(config)}
        values = {name: value for name, value in self.items() if name in names}
        values.update(fixed)
        missing = [f.name for f in dataclasses.fields(config) if f.name not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise MisguardError(f"{', '.join(self.flags.get(n, '--' + n) for n in missing)} is required"
                                + (f" {context}" if context else ""))
        return config(**values)

    def refuse_outside(self, *configs: type, why: str) -> None:
        """Raise MisguardError naming the options given that none of `configs` takes (e.g. a VLM judge's
        --lora with --kind lite); `why` ends the message."""
        names = {f.name for config in configs for f in dataclasses.fields(config)}
        stray = [self.flags[name] for name in self if name not in names]
        if stray:
            raise MisguardError(f"{', '.join(stray)}: {why}")


def config_options(*configs: type, exclude: tuple[str, ...] = ()) -> Callable:
    """A decorator: the typer command gets one option per `setting` field of `configs` (minus `exclude`) and is
    called with `given=Given(...)` holding the ones the user set."""
    fields: dict[str, dataclasses.Field] = {}
    defaults: dict[str, list[Any]] = {}
    hints: dict[str, Any] = {}
    for config in configs:
        types_of = typing.get_type_hints(config)
        for f in dataclasses.fields(config):
            if not is_setting(f) or f.name in exclude:
                continue
            fields.setdefault(f.name, f)
            hints.setdefault(f.name, types_of[f.name])
            defaults.setdefault(f.name, []).append(_default(f))

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        params = [p for p in signature.parameters.values() if p.name != "given"]
        flags: dict[str, str] = {}
        added = []
        for name, f in fields.items():
            flag, annotation = _option(name, f, hints[name], defaults[name])
            flags[name] = flag
            added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))

        @functools.wraps(command)
        def wrapper(**kwargs: Any):
            given = {}
            for name in fields:
                value = kwargs.pop(name)
                if value is not None and value != []:
                    given[name] = _parsed(hints[name], value, flags[name].split("/")[0])
            return command(**kwargs, given=Given(given, flags))

        wrapper.__signature__ = signature.replace(
            parameters=[*(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params), *added])
        wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
        return wrapper

    return decorate


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _option(name: str, f: dataclasses.Field, hint: Any, defaults: list[Any]) -> tuple[str, Any]:
    """(the option's flag, its typer annotation) for one field."""
    flag = f.metadata.get("flag") or "--" + name.replace("_", "-")
    base = _strip_optional(hint)
    origin = typing.get_origin(base)
    if origin in (list, tuple, dict, collections.abc.Sequence) or base in (list, tuple, dict):
        item = str if origin is dict or not typing.get_args(base) else typing.get_args(base)[0]
        cli_type: Any = Optional[list[item]]
    elif base is bool:
        if "/" not in flag:
            flag = f"{flag}/--no-{flag[2:]}"
        cli_type = Optional[bool]
    else:
        cli_type = Optional[base]
    shown = [d for d in defaults if d is not dataclasses.MISSING and d not in (None, [], {}, ())]
    help_text = f.metadata["help"]
    if shown and len({repr(d) for d in shown}) == 1:
        help_text += f" [default: {_show(shown[0])}]"
    bounds = _bounds(setting_range(f)) if base in (int, float) else {}
    option = typer.Option(*flag.split("/") if "/" in flag else (flag,), help=help_text,
                          envvar=f.metadata.get("envvar"), show_default=False, **bounds)
    return flag, Annotated[cli_type, option]


def number_option(help: str, **bounds: float | None) -> Any:
    """A typer Option for a number in a range (`number_range`'s keywords: at_least / above, at_most / below), so a
    value outside it, NaN or an infinity is refused at parse time with one line naming the option."""
    return typer.Option(help=help, **_bounds(number_range(**bounds)))


def _bounds(allowed: Range) -> dict[str, Any]:
    """typer.Option's min / max for a range's closed bounds, and a callback for the rest: open bounds, and NaN
    and infinities (NaN passes a lone typer min or max; inf passes a lone min)."""
    def check(value: Any) -> Any:
        complaint = None if value is None else allowed.complaint(value)
        if complaint:
            raise typer.BadParameter(complaint)
        return value

    return {"min": None if allowed.low_open else allowed.low, "max": None if allowed.high_open else allowed.high,
            "callback": check}


def _strip_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _parsed(hint: Any, value: Any, flag: str) -> Any:
    """The option's value as the field's type: KEY=VALUE pairs to a dict, lists to tuples where the field is one."""
    base = _strip_optional(hint)
    origin = typing.get_origin(base)
    if origin is dict or base is dict:
        return key_values(value, flag)
    if origin is tuple or base is tuple:
        return tuple(value)
    if base is Path:
        return Path(value)
    return value


def key_values(pairs: list[str], flag: str, *, raw: bool = False) -> dict[str, Any]:
    """['a=1', 'b=x'] -> {'a': 1, 'b': 'x'}: values parsed as JSON where they parse, else kept as strings
    (raw=True: always strings, and the key ends at the last '=', so keys may contain '='). Raises MisguardError
    naming the option for a pair without '='."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.rpartition("=") if raw else pair.partition("=")
        if not sep or not key:
            raise MisguardError(f"{flag} takes KEY=VALUE, got '{pair}'")
        if raw:
            parsed[key] = value
            continue
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed
