"""Command-line options generated from pydantic models.

The job spec is the one definition of a render's options: the notebook API takes its fields
as keywords, and this module turns the same fields into long options, with the field's
description and default as the help line. A field added to or renamed in the spec reaches
the CLI without an edit here.

Rules: `snake_case` field -> `--kebab-case` option; a `bool` field defaulting to False is a
flag; a `Literal` gives choices; a nested model is flattened, its `name` field taking the
parent's option name (`decoder.name` -> `--decoder`, `decoder.weights` -> `--weights`).
Options that are not given are left out of the model's input, so the model's own defaults
and validators apply exactly as they do for the API.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined


@dataclass(frozen=True)
class Option:
    """One generated option: where its value goes in the model's input."""

    flag: str  # "--weights"
    dest: str  # argparse's attribute
    path: tuple[str, ...]  # ("decoder", "weights")


def _members(annotation) -> tuple[list, list]:
    """(literal values, other types) of an annotation, None dropped."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        parts = [a for a in typing.get_args(annotation) if a is not type(None)]
    else:
        parts = [annotation]
    literals, others = [], []
    for part in parts:
        if typing.get_origin(part) is Literal:
            literals.extend(typing.get_args(part))
        else:
            others.append(part)
    return literals, others


def _nested_model(annotation) -> type[BaseModel] | None:
    _, others = _members(annotation)
    if len(others) == 1 and isinstance(others[0], type) and issubclass(others[0], BaseModel):
        return others[0]
    return None


def _help(field, default) -> str:
    text = (field.description or "").replace("%", "%%")
    if default is PydanticUndefined or default is None:
        return text  # the description says what leaving it out means
    shown = "off" if default is False else default
    return f"{text} (default: {shown})" if text else f"(default: {shown})"


def _add(group, flag: str, dest: str, field, default) -> None:
    literals, others = _members(field.annotation)
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": _help(field, default)}
    if others == [bool] and not literals:
        kwargs["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
    elif literals and not others:
        kwargs["choices"] = literals
        kwargs["type"] = type(literals[0])
    elif len(others) == 1 and others[0] in (int, float) and not literals:
        kwargs["type"] = others[0]
        kwargs["metavar"] = "N"
    else:
        # str, or a union such as "exact" | int: the model parses the text.
        names = [str(v) for v in literals] + ["N" if t in (int, float) else "TEXT" for t in others]
        kwargs["metavar"] = "|".join(names)
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "metavar" in extra:  # a better word than the type's, e.g. DIR|URI
        kwargs["metavar"] = extra["metavar"]
    # Old names kept working for a while; the description says they are deprecated.
    group.add_argument(flag, *extra.get("cli_aliases", ()), **kwargs)


def add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel], *,
                      positional: tuple[str, ...] = (), title: str | None = None) -> list[Option]:
    """Add `model`'s fields to `parser`; `positional` fields become optional positionals."""
    group = parser.add_argument_group(title) if title else parser
    options: list[Option] = []
    taken = set(model.model_fields)
    for name, field in model.model_fields.items():
        if name in positional:
            group.add_argument(name, nargs="?", default=argparse.SUPPRESS, metavar=name.upper(),
                               help=_help(field, field.default))
            options.append(Option(name.upper(), name, (name,)))
            continue
        nested = _nested_model(field.annotation)
        if nested is None:
            flag = "--" + name.replace("_", "-")
            _add(group, flag, name, field, field.default)
            options.append(Option(flag, name, (name,)))
            continue
        for sub, subfield in nested.model_fields.items():
            if sub == "name":
                opt = name
            else:
                opt = sub if sub not in taken else f"{name}_{sub}"
                taken.add(opt)
            flag = "--" + opt.replace("_", "-")
            dest = f"{name}__{sub}"
            _add(group, flag, dest, subfield, subfield.default)
            options.append(Option(flag, dest, (name, sub)))
    return options


def model_input(options: list[Option], namespace: argparse.Namespace) -> dict:
    """The model's input from parsed arguments: only what was given, nested as the model is."""
    values: dict = {}
    for opt in options:
        if hasattr(namespace, opt.dest):
            where = values
            for key in opt.path[:-1]:
                where = where.setdefault(key, {})
            where[opt.path[-1]] = getattr(namespace, opt.dest)
    return values


def describe_errors(exc: ValidationError, options: list[Option]) -> str:
    """One line per problem, naming the option the user typed."""
    by_path = {opt.path: opt.flag for opt in options}
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        # A nested model's own check names its fields as the API spells them: say the flags.
        for opt in options:
            if len(opt.path) == len(loc) + 1 and opt.path[:-1] == loc:
                msg = re.sub(rf"\b{opt.path[-1]}\b(=True)?", opt.flag, msg)
        where = by_path.get(loc)
        lines.append(f"{where}: {msg}" if where else msg)
    return "\n".join(lines)
