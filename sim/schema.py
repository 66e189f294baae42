"""Validation of user-facing YAML sections with pydantic, turned into one-line errors.

Every section of a scenario (model mapping, training, parallelism, memory) is a frozen pydantic
model that forbids unknown keys. :func:`validate_section` converts pydantic's error into a
:class:`~sim.errors.ScenarioError` naming the file and the dotted key, with a did-you-mean for
misspelt keys.
"""
from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from sim.errors import ScenarioError, did_you_mean

T = TypeVar("T", bound="Section")


class Section(BaseModel):
    """Base of every YAML section: immutable, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _expected(err: dict[str, Any]) -> str:
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "expected an integer"
    if kind in ("float_type", "float_parsing"):
        return "expected a number"
    if kind in ("bool_type", "bool_parsing"):
        return "expected true or false"
    if kind in ("string_type",):
        return "expected a string"
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected', '')}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        return err.get("msg", "").lower()
    if kind == "missing":
        return "is required"
    if kind == "value_error":
        return str(ctx.get("error", err.get("msg", "invalid value")))
    return err.get("msg", "invalid value")


def validate_section(cls: type[T], data: Any, *, file: str | None, prefix: str) -> T:
    """Build ``cls`` from ``data``; on failure raise ScenarioError for the first bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ScenarioError(f"expected a mapping, got {type(data).__name__} {data!r}", file=file, key=prefix)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        if err.get("type") == "extra_forbidden":
            last = str(err["loc"][-1])
            hint = did_you_mean(last, cls.model_fields.keys())
            raise ScenarioError(
                f"unknown key{hint}; expected one of {', '.join(sorted(cls.model_fields))}",
                file=file, key=key) from None
        got = err.get("input")
        shown = "" if err.get("type") in ("missing", "value_error") else f", got {got!r}"
        raise ScenarioError(f"{_expected(err)}{shown}", file=file, key=key) from None
