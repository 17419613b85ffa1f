"""Varlink interface definitions: declared once in Python, rendered as interface description
text (``org.varlink.service.GetInterfaceDescription``) and used to validate calls the way
sd-varlink does before a method runs.

Rendering follows sd-varlink's layout: ``interface NAME``, then enum types, struct types,
methods and errors, each after an empty line; fields one per line, indented by a tab; a
method that takes ``more`` preceded by a ``# [Supports 'more' flag]`` line.

Validation follows sd-varlink too: a method that requires ``more`` called without it is
``ExpectedMore``; otherwise the declared input fields are checked in order (missing or null
where not nullable, wrong JSON type), then unknown fields, and the first bad one is named
in ``org.varlink.service.InvalidParameter``. An ``int`` may come as a string (values past
2^53 often do).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

ELEMENTARY = ("bool", "int", "float", "string", "object")


@dataclass(frozen=True)
class Enum:
    values: tuple[str, ...]


@dataclass(frozen=True)
class Struct:
    fields: tuple[Field, ...]


FieldType = str | Enum | Struct  # elementary name, named type name, or an inline type


@dataclass(frozen=True)
class Field:
    name: str
    type: FieldType
    nullable: bool = False
    array: bool = False
    map: bool = False


@dataclass(frozen=True)
class Method:
    name: str
    inputs: tuple[Field, ...] = ()
    outputs: tuple[Field, ...] = ()
    more: str = ""  # "", "supports" or "requires"


@dataclass(frozen=True)
class Error:
    name: str
    fields: tuple[Field, ...] = ()


@dataclass(frozen=True)
class TypeDef:
    name: str
    type: Enum | Struct


@dataclass
class Interface:
    name: str
    symbols: list[TypeDef | Method | Error] = field(default_factory=list)

    def method(self, name: str) -> Method | None:
        for symbol in self.symbols:
            if isinstance(symbol, Method) and symbol.name == name:
                return symbol
        return None

    def type(self, name: str) -> TypeDef | None:
        for symbol in self.symbols:
            if isinstance(symbol, TypeDef) and symbol.name == name:
                return symbol
        return None

    def describe(self) -> str:
        """The description GetInterfaceDescription answers: 262's own text, ``#`` comments
        included, where machined ships it (see :func:`stored_description`), else rendered."""
        return stored_description(self.name) or describe(self)


@functools.cache
def stored_description(name: str) -> str | None:
    """The description of interface *name* as systemd 262 answers GetInterfaceDescription,
    byte for byte (``dbus-interfaces/262/NAME.varlink``, taken from the running daemons), or
    None if machined ships none. The declarations in :mod:`machined.varlink.interfaces` are
    what calls are checked against; a unit test keeps both the same, comments aside."""
    from machined.data import interface_file

    try:
        return interface_file(f"262/{name}.varlink").read_text(encoding="utf-8")
    except OSError:
        return None


def without_comments(text: str) -> str:
    """A description without its comment lines (the ``more`` markers kept): what :func:`describe`
    renders from the declarations."""
    kept = [line for line in text.splitlines(True) if not _COMMENT.fullmatch(line.rstrip("\n"))]
    return "".join(kept)


_COMMENT = re.compile(r"\t*#(?! \[(Supports|Requires) 'more' flag\]).*")


def opt(name: str, type_: FieldType, array: bool = False) -> Field:
    """A nullable field (``name: ?type``)."""
    return Field(name, type_, nullable=True, array=array)


def req(name: str, type_: FieldType, array: bool = False) -> Field:
    """A mandatory field."""
    return Field(name, type_, array=array)


# ----- rendering ---------------------------------------------------------------------------------


def _fields(fields: tuple[Field, ...], indent: str) -> str:
    if not fields:
        return "()"
    inner = indent + "\t"
    return "(\n" + ",\n".join(inner + _field(f, inner) for f in fields) + "\n" + indent + ")"


def _enum(values: tuple[str, ...], indent: str) -> str:
    if not values:
        return "()"
    inner = indent + "\t"
    return "(\n" + ",\n".join(inner + v for v in values) + "\n" + indent + ")"


def _field(f: Field, indent: str) -> str:
    text = f.name + ": " + ("?" if f.nullable else "") + ("[]" if f.array else "[string]" if f.map else "")
    if isinstance(f.type, Struct):
        return text + _fields(f.type.fields, indent)
    if isinstance(f.type, Enum):
        return text + _enum(f.type.values, indent)
    return text + f.type


def describe(interface: Interface) -> str:
    """The interface description text, laid out as sd-varlink lays it out."""
    out = [f"interface {interface.name}\n"]
    order = (
        [s for s in interface.symbols if isinstance(s, TypeDef) and isinstance(s.type, Enum)]
        + [s for s in interface.symbols if isinstance(s, TypeDef) and isinstance(s.type, Struct)]
        + [s for s in interface.symbols if isinstance(s, Method)]
        + [s for s in interface.symbols if isinstance(s, Error)]
    )
    for symbol in order:
        out.append("\n")
        if isinstance(symbol, TypeDef):
            body = _enum(symbol.type.values, "") if isinstance(symbol.type, Enum) else _fields(symbol.type.fields, "")
            out.append(f"type {symbol.name}{body}\n")
        elif isinstance(symbol, Method):
            if symbol.more:
                out.append("# [Requires 'more' flag]\n" if symbol.more == "requires" else "# [Supports 'more' flag]\n")
            out.append(f"method {symbol.name}{_fields(symbol.inputs, '')} -> {_fields(symbol.outputs, '')}\n")
        else:
            out.append(f"error {symbol.name}{_fields(symbol.fields, '')}\n")
    return "".join(out)


# ----- validation --------------------------------------------------------------------------------


class Invalid(Exception):
    """A value that does not match its declaration; *field* is what InvalidParameter names."""

    def __init__(self, field: str | None) -> None:
        super().__init__(field)
        self.field = field


class ExpectedMore(Exception):
    pass


def _is_int(value: Any) -> bool:
    """An ``int`` as sd-json takes one: a JSON integer, a real that is one (``1e3``) within 64 bits,
    or a string (values past 2^53 often come as one)."""
    if isinstance(value, float):
        return value.is_integer() and -(2**63) <= value < 2**64
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def _element_ok(interface: Interface, type_: FieldType, value: Any) -> bool:
    if isinstance(type_, Struct):
        return _object_ok(interface, type_.fields, value)
    if isinstance(type_, Enum):
        return isinstance(value, str) and value in type_.values
    if type_ == "bool":
        return isinstance(value, bool)
    if type_ == "int":
        return _is_int(value)
    if type_ == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if type_ == "string":
        return isinstance(value, str)
    if type_ == "object":
        return isinstance(value, dict)
    named = interface.type(type_)
    if named is None:
        return True  # not ours to judge
    return _element_ok(interface, named.type, value)


def _field_ok(interface: Interface, f: Field, value: Any) -> bool:
    if value is None:
        return f.nullable
    if f.array:
        return isinstance(value, list) and all(_element_ok(interface, f.type, v) for v in value)
    if f.map:
        return isinstance(value, dict) and all(_element_ok(interface, f.type, v) for v in value.values())
    return _element_ok(interface, f.type, value)


def _object_ok(interface: Interface, fields: tuple[Field, ...], value: Any) -> bool:
    try:
        _check_object(interface, fields, (), value)
    except Invalid:
        return False
    return True


def _check_object(interface: Interface, fields: tuple[Field, ...], others: tuple[Field, ...], value: Any) -> None:
    if not isinstance(value, dict):
        raise Invalid(None)
    for f in fields:
        if not _field_ok(interface, f, value.get(f.name)):
            raise Invalid(f.name)
    known = {f.name for f in fields} | {f.name for f in others}
    for key in value:
        if key not in known:
            raise Invalid(key)


def validate_call(interface: Interface, method: Method, parameters: dict[str, Any], more: bool) -> None:
    """Raise :class:`ExpectedMore` or :class:`Invalid` as sd-varlink refuses a call."""
    if method.more == "requires" and not more:
        raise ExpectedMore()
    # Unknown keys are looked up among all of the method's fields, outputs included.
    _check_object(interface, method.inputs, method.outputs, parameters)
