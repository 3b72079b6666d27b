"""Checking JSON that this process did not write (checkpoint records, the tuning cache) before using it.

A document is parsed with limits (:func:`parse_json`: its size, no duplicate keys, no ``NaN`` / ``Infinity``, no
number that does not fit a float) and then checked against a schema built from the validators below. A validator
is a function ``check(value, where) -> value``; ``where`` names the place in the document, e.g.
``sparse_modules[3].args.stride``. Every failure is one :class:`SchemaError` saying where and what is wrong;
nothing else is raised, whatever the document holds. The schemas have a fixed depth, so checking never recurses
further than the schema does, however deeply the document nests.
"""
from __future__ import annotations

import json
import math
from typing import Callable, Iterable, Mapping, Optional

__all__ = [
    "SchemaError",
    "Validator",
    "parse_json",
    "type_name",
    "constant",
    "integer",
    "number",
    "boolean",
    "string",
    "list_of",
    "mapping",
    "record",
    "any_of",
]

Validator = Callable[[object, str], object]


class SchemaError(ValueError):
    """A document that does not follow its schema.

    Attributes:
        where: the place in the document (``""`` for the document itself).
        problem: what is wrong there, with what was expected and what was found.
    """

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}" if where else problem)


_JSON_TYPES = ((type(None), "null"), (bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
               (list, "array"), (dict, "object"))  # bool before int: a bool is an int in Python


def type_name(value) -> str:
    """The JSON name of ``value``'s type (``object``, ``array``, ``string``, ``integer``, ...)."""
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)), type(value).__name__)


def _shown(value) -> str:
    """``value`` for an error message, cut short: a hostile document must not make the message huge."""
    if isinstance(value, (dict, list)):
        return f"an {type_name(value)} of {len(value)} entries" if value else f"an empty {type_name(value)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_shown(key)} in an object")
        out[key] = value
    return out


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {_shown(text)} does not fit a float")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text, *, max_bytes: int, what: str):
    """Parse ``text`` (``str`` or UTF-8 ``bytes``) as one strict JSON document of at most ``max_bytes`` bytes.

    Raises:
        SchemaError: too large, not UTF-8, not valid JSON, a duplicate key, ``NaN`` / ``Infinity``, a number out of
            a float's range or nested deeper than the parser can follow. The message starts with ``what``.
    """
    size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    if size > max_bytes:
        raise SchemaError("", f"{what} is {size} bytes, more than the limit of {max_bytes}")
    try:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_float=_finite_float,
                          parse_constant=_no_constant)
    except RecursionError:
        raise SchemaError("", f"{what} nests arrays or objects deeper than the parser can follow") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SchemaError("", f"{what} is not valid JSON: {exc}") from None


def _fail(where: str, expected: str, value) -> SchemaError:
    return SchemaError(where, f"expected {expected}, got {_shown(value)}")


def constant(expected) -> Validator:
    """Exactly ``expected`` (of the same JSON type)."""

    def check(value, where):
        if type(value) is not type(expected) or value != expected:
            raise _fail(where, repr(expected), value)
        return value

    return check


def integer(lo: int, hi: int) -> Validator:
    """An integer (not a boolean) in ``[lo, hi]``."""

    def check(value, where):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise _fail(where, f"an integer in [{lo}, {hi}]", value)
        return value

    return check


def number(lo: float, hi: float, *, integers: bool = True) -> Validator:
    """A finite number in ``[lo, hi]``, returned as a float: a JSON number with a fraction or an exponent, or also
    an integer (not a boolean) when ``integers``."""
    kinds = (int, float) if integers else (float,)

    def check(value, where):
        if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
            raise _fail(where, f"a number in [{lo}, {hi}]", value)
        return float(value)

    return check


def boolean() -> Validator:
    """``true`` or ``false``."""

    def check(value, where):
        if not isinstance(value, bool):
            raise _fail(where, "a boolean", value)
        return value

    return check


def string(max_len: int, choices: Optional[Iterable[str]] = None) -> Validator:
    """A string of at most ``max_len`` characters (and one of ``choices``, when given)."""
    allowed = None if choices is None else tuple(choices)

    def check(value, where):
        if not isinstance(value, str) or len(value) > max_len:
            raise _fail(where, f"a string of at most {max_len} characters", value)
        if allowed is not None and value not in allowed:
            raise _fail(where, f"one of {', '.join(map(repr, allowed))}", value)
        return value

    return check


def list_of(item: Validator, max_len: int) -> Validator:
    """An array of at most ``max_len`` entries, each checked by ``item``."""

    def check(value, where):
        if not isinstance(value, list) or len(value) > max_len:
            raise _fail(where, f"an array of at most {max_len} entries", value)
        return [item(v, f"{where}[{i}]") for i, v in enumerate(value)]

    return check


def mapping(key: Validator, value: Validator, max_len: int) -> Validator:
    """An object of at most ``max_len`` entries whose keys pass ``key`` and whose values pass ``value``."""

    def check(obj, where):
        if not isinstance(obj, dict) or len(obj) > max_len:
            raise _fail(where, f"an object of at most {max_len} entries", obj)
        out = {}
        for k, v in obj.items():
            k = key(k, f"{where} (a key)" if where else "(a key)")
            out[k] = value(v, f"{where}.{k}" if where else k)
        return out

    return check


def record(required: Mapping[str, Validator], optional: Optional[Mapping[str, Validator]] = None) -> Validator:
    """An object with every key of ``required``, any of ``optional`` and nothing else."""
    optional = dict(optional or {})

    def check(obj, where):
        if not isinstance(obj, dict):
            raise _fail(where, "an object", obj)
        missing = [k for k in required if k not in obj]
        if missing:
            raise SchemaError(where, f"missing the field {missing[0]!r}")
        unknown = [k for k in obj if k not in required and k not in optional]
        if unknown:
            known = ", ".join(map(repr, [*required, *optional]))
            raise SchemaError(where, f"unknown field {_shown(unknown[0])} (expected only {known})")
        out = {}
        for k, v in obj.items():
            out[k] = (required.get(k) or optional[k])(v, f"{where}.{k}" if where else k)
        return out

    return check


def any_of(*validators: Validator, expected: str) -> Validator:
    """The first of ``validators`` that accepts the value; else a :class:`SchemaError` saying ``expected``."""

    def check(value, where):
        for validator in validators:
            try:
                return validator(value, where)
            except SchemaError:
                continue
        raise _fail(where, expected, value)

    return check
