"""Frozen parameter dataclasses with validation, shared by every method.

A method declares its parameters as a frozen dataclass deriving from :class:`MethodParams`;
each field is declared with :func:`param` (default, one-line doc). Types are checked from the
annotations, ranges by the subclass's ``validate``. Unknown names raise a ``ValueError`` that
lists every valid parameter with its type and default.
"""

from __future__ import annotations

import ast
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

# Plain dicts, not functools.cache: dispatch stays traceable by torch.compile without warnings.
_HINTS: dict[type, dict[str, Any]] = {}
_DEFAULTS: dict[type, Any] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _defaults(cls: type[MethodParams]) -> MethodParams:
    if cls not in _DEFAULTS:
        _DEFAULTS[cls] = cls()
    return _DEFAULTS[cls]


def param(default: Any, doc: str) -> Any:
    """Declare a method parameter with its default and a one-line description."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class ParamInfo:
    name: str
    type: str
    default: Any
    doc: str


@dataclass(frozen=True)
class MethodParams:
    """Base class of every method's parameters (a frozen dataclass)."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = _check_type(getattr(self, f.name), hints[f.name], f.name)
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Range checks; subclasses raise ``ValueError`` naming the parameter."""

    @classmethod
    def describe(cls) -> list[ParamInfo]:
        hints = _hints(cls)
        return [
            ParamInfo(f.name, type_name(hints[f.name]), f.default, f.metadata.get("doc", ""))
            for f in dataclasses.fields(cls)
        ]

    @classmethod
    def from_kwargs(cls, method: str, kwargs: dict[str, Any]) -> MethodParams:
        if not kwargs:
            return _defaults(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(map(repr, unknown))} for method {method!r}; {cls.signature_text()}"
            )
        return cls(**kwargs)

    @classmethod
    def signature_text(cls) -> str:
        infos = cls.describe()
        if not infos:
            return "it takes no parameters"
        parts = [f"{i.name}: {i.type} = {i.default!r}" for i in infos]
        return "valid parameters: " + ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is Literal:
        return "Literal[" + ", ".join(repr(a) for a in typing.get_args(annotation)) + "]"
    if origin is tuple:
        return "tuple[" + ", ".join("..." if a is Ellipsis else type_name(a) for a in typing.get_args(annotation)) + "]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _matches(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits ``annotation``; returns the normalised value (lists become tuples)."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True, value
    if annotation is type(None):
        return value is None, value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            ok, normalised = _matches(value, arg)
            if ok:
                return True, normalised
        return False, value
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(annotation)), value
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False, value
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(args) != len(value):
            return False, value
        items = []
        for item, arg in zip(value, args):
            ok, normalised = _matches(item, arg)
            if not ok:
                return False, value
            items.append(normalised)
        return True, tuple(items)
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if isinstance(annotation, type):
        return isinstance(value, annotation), value
    return True, value


def _check_type(value: Any, annotation: Any, name: str) -> Any:
    ok, normalised = _matches(value, annotation)
    if not ok:
        raise TypeError(f"parameter {name!r} expects {type_name(annotation)}, got {value!r} ({type(value).__name__})")
    return normalised


def parse_value(text: str) -> Any:
    """Parse a command-line parameter value: Python literals (``3``, ``(255, 0)``, ``None``) or a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
