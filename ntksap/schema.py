"""The building blocks of the parameter schema (:mod:`ntksap.params`,
:mod:`ntksap.protocol`): the base model :class:`Section`, :func:`knob`,
:class:`ParamsError`, reading YAML, the pydantic markers the models are written with, what a field allows in words (for
``python -m ntksap.config describe``), and validation errors turned into
messages that name the key, the value, what is allowed and the closest name.

Generic over pydantic models; it knows nothing of ``params.yaml`` itself::

    allowed(Annotated[float, Field(ge=0, lt=1)])     # 'a number in [0, 1)'
    format_errors(exc, Params, "params.yaml")        # 'params.yaml: train.epochs=-1 is not allowed; ...'
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import annotated_types as at
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import core_schema

from .checks import closest, not_allowed


# -- markers (inside Annotated[...]) ---------------------------------------------------
class OneOf:
    """``Annotated`` marker: the value is one of ``options()``, a registry read
    when a value is checked (not at import: the registries import torch)."""

    def __init__(self, options: Callable[[], Sequence[str]]):
        self.options = options

    def __get_pydantic_core_schema__(self, source, handler):
        def check(value):
            if value not in self.options():
                raise ValueError("not one of the options")
            return value

        return core_schema.no_info_after_validator_function(check, handler(source))


class Distinct:
    """``Annotated`` marker of a list: no value twice (``increasing``: and sorted)."""

    def __init__(self, increasing: bool = False):
        self.increasing = increasing

    def __get_pydantic_core_schema__(self, source, handler):
        def check(values):
            if len(set(values)) != len(values) or (self.increasing and list(values) != sorted(values)):
                raise ValueError("repeated or unsorted values")
            return values

        return core_schema.no_info_after_validator_function(check, handler(source))


class NullMeans(str):
    """``Annotated`` marker of an optional field: what ``null`` stands for."""


class Says(str):
    """``Annotated`` marker: what is allowed, in words, where the type cannot say it (a pattern)."""


# -- what a field allows, in words (messages, describe) -----------------------------------
def _split(tp: Any) -> tuple[Any, list]:
    """``Annotated[T, ...]`` -> ``(T, metadata)``, a ``Field(...)``'s constraints flattened."""
    meta: list = []
    while typing.get_origin(tp) is Annotated:
        tp, *extra = typing.get_args(tp)
        for m in extra:
            meta.extend(m.metadata if isinstance(m, FieldInfo) else [m])
    return tp, meta


def _members(tp: Any) -> tuple[list, bool]:
    """The members of a union other than None, and whether None is one."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        return [a for a in args if a is not type(None)], type(None) in args
    return [tp], False


def field_type(field: FieldInfo) -> Any:
    """A model field's type with its constraints (``Annotated``)."""
    return Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation


def core_type(tp: Any) -> Any:
    """``tp`` without annotations and without ``None`` (``Run | None`` -> ``Run``)."""
    tp = _split(tp)[0]
    members, _ = _members(tp)
    return core_type(members[0]) if len(members) == 1 and members[0] is not tp else tp


def is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _bounds(meta: list, number: str) -> str | None:
    lo = next(((m.ge, "[", ">=") for m in meta if isinstance(m, at.Ge)), None) or \
        next(((m.gt, "(", ">") for m in meta if isinstance(m, at.Gt)), None)
    hi = next(((m.le, "]", "<=") for m in meta if isinstance(m, at.Le)), None) or \
        next(((m.lt, ")", "<") for m in meta if isinstance(m, at.Lt)), None)
    if lo and hi:
        return f"{number} in {lo[1]}{lo[0]:g}, {hi[0]:g}{hi[1]}"
    if lo or hi:
        value, _, op = lo or hi
        return f"{number} {op} {value:g}"
    return None


def allowed(tp: Any) -> str:
    """What passes as ``tp`` (a schema type with its ``Annotated`` constraints), in words."""
    base, meta = _split(tp)
    said = next((m for m in meta if isinstance(m, Says)), None)
    if said is not None:
        return str(said)
    members, nullable = _members(base)
    if nullable or len(members) > 1:
        rest = [m for m in meta if not isinstance(m, NullMeans)]
        text = " or ".join(allowed(Annotated[(m, *rest)] if rest else m) for m in members)
        if not nullable:
            return text
        null = next((m for m in meta if isinstance(m, NullMeans)), None)
        return (f"null ({null})" if null else "null") + " or " + text
    one_of = next((m for m in meta if isinstance(m, OneOf)), None)
    if one_of is not None:
        return "one of " + ", ".join(one_of.options())
    if typing.get_origin(base) is Literal:
        values = typing.get_args(base)
        return repr(values[0]) if len(values) == 1 else "one of " + ", ".join(map(str, values))
    if base is bool:
        return "true or false"
    if base is int:
        return _bounds(meta, "an integer") or "an integer"
    if base is float:
        return _bounds(meta, "a number") or "a finite number"
    nonempty = any(isinstance(m, at.MinLen) and m.min_length >= 1 for m in meta)
    if base is str:
        return "a non-empty string" if nonempty else "a string"
    if typing.get_origin(base) is list:
        distinct = next((m for m in meta if isinstance(m, Distinct)), None)
        kind = " list" if distinct is None else " strictly increasing list" if distinct.increasing else \
            " list without repeats"
        return ("a non-empty" if nonempty else "a") + kind + f", each item {allowed(typing.get_args(base)[0])}"
    if typing.get_origin(base) is dict:
        key, value = typing.get_args(base)
        return f"a{' non-empty' if nonempty else ''} mapping from {allowed(key)} to {allowed(value)}"
    if is_model(base):
        return "a mapping with keys " + ", ".join(base.model_fields)
    return f"a {getattr(base, '__name__', base)}"


def options(tp: Any) -> list[str]:
    """The fixed choices of ``tp`` (a ``Literal`` or a registry), for "did you mean"."""
    base, meta = _split(tp)
    one_of = next((m for m in meta if isinstance(m, OneOf)), None)
    if one_of is not None:
        return list(one_of.options())
    out = []
    for m in _members(base)[0]:
        if typing.get_origin(m) is Literal:
            out += [str(v) for v in typing.get_args(m)]
        elif m is not base:
            out += options(m)
    return out


def schema_keys(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every leaf key of ``model``, dotted (``runs.<name>.method``), with its field."""
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        sub = core_type(field.annotation)
        if is_model(sub):
            yield from schema_keys(sub, key)
        elif typing.get_origin(sub) is dict and is_model(core_type(typing.get_args(sub)[1])):
            yield from schema_keys(core_type(typing.get_args(sub)[1]), f"{key}.<name>")
        else:
            yield key, field


# -- the error formatter -----------------------------------------------------------------
def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _walk(model: type[BaseModel], loc: tuple) -> tuple[str, Any, FieldInfo | None, tuple]:
    """Follow a pydantic error location from ``model``: the dotted key, the
    type there, its field (None inside a list or mapping) and what is left of
    ``loc`` (a union member's tag, ``[key]``, an unknown key)."""
    key, tp, field = "", model, None
    for i, part in enumerate(loc):
        core = core_type(tp)
        if is_model(core) and part in core.model_fields:
            field = core.model_fields[part]
            key, tp = _join(key, part), field_type(field)
        elif typing.get_origin(core) is list and isinstance(part, int):
            key, tp, field = f"{key}[{part}]", typing.get_args(core)[0], None
        elif typing.get_origin(core) is dict and loc[i + 1:i + 2] == ("[key]",):   # a bad name in a mapping
            return key, tp, field, loc[i + 1:]
        elif typing.get_origin(core) is dict:
            key, tp, field = _join(key, part), typing.get_args(core)[1], None
        else:
            return key, tp, field, loc[i:]
    return key, tp, field, ()


def _message(error: dict, model: type[BaseModel]) -> tuple[str, str]:
    """One pydantic error as ``(key, message)`` in this module's words."""
    key, tp, field, rest = _walk(model, tuple(error["loc"]))
    kind = error["type"]
    if kind == "extra_forbidden":
        name, parent = rest[0], core_type(tp)
        near = closest(name, parent.model_fields)
        hint = f" (did you mean '{near}'?)" if near else ""
        where = f"'{key}'" if key else "the top level"
        return _join(key, name), (f"unknown key '{_join(key, name)}'{hint} with value {error['input']!r}; allowed "
                                  f"keys at {where}: {', '.join(parent.model_fields)}")
    if rest[:1] == ("[key]",):
        return key, (f"{key}: the name {error['input']!r} is not allowed; allowed: "
                     f"{allowed(typing.get_args(core_type(tp))[0])}")
    if kind == "missing":
        doc = f" ({field.description})" if field is not None and field.description else ""
        return key, f"missing key '{key}'{doc}; allowed: {allowed(tp)}"
    if kind == "value_error" and not rest and is_model(core_type(tp)):   # a model's own check across its keys
        text = str(error["ctx"]["error"])
        return key, (f"{key}.{text}" if key and not text.startswith(key) else text)
    return key, str(not_allowed(key or "params", error["input"], allowed(tp), options(tp)))


def format_errors(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    """The message of a :class:`ParamsError`: one line per bad key (the first
    error of each), each starting with ``source``."""
    lines: dict[str, str] = {}
    for error in exc.errors():
        key, text = _message(error, model)
        lines.setdefault(key, f"{source}: {text}")
    return "\n".join(lines.values())


class ParamsError(ValueError):
    """A bad parameter: the message names the key, the value and what is allowed."""


class Section(BaseModel):
    """Base of the schema's models (a section of ``params.yaml``): unknown keys
    refused, assignments checked, every failure a :class:`ParamsError` in
    :func:`~ntksap.schema.format_errors`' words."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ParamsError(format_errors(exc, type(self), type(self).__name__)) from None

    # validating a mapping (model_validate, a nested section) need not call __init__, as for BaseModel's own
    __init__.__pydantic_base_init__ = True

    def __setattr__(self, name: str, value: Any):
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise ParamsError(format_errors(exc, type(self), type(self).__name__)) from None


def knob(default: Any = ..., doc: str = "", **constraints) -> Any:
    """A field of the schema: its default (``...``: required), one line of
    description (with the paper's value) and its constraints (``ge=``, ...)."""
    if isinstance(default, BaseModel):
        return Field(default_factory=lambda d=default: d.model_copy(deep=True), description=doc, **constraints)
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda d=default: type(d)(d), description=doc, **constraints)
    return Field(default, description=doc, **constraints)


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path``; bad YAML is a :class:`ParamsError`."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
