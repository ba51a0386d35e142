"""Shared pydantic building blocks for request and response bodies."""

from __future__ import annotations

import datetime as dt
import re
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, model_validator

# DNS-label-like names: safe in URLs, hostnames, CLI arguments and logs.
Name = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$", max_length=63)]
Description = Annotated[str, StringConstraints(max_length=255)]
ResourceId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]{1,8}-[a-z0-9]{1,40}$", max_length=50)]


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _not_a_number(value: Any) -> Any:
    if isinstance(value, int | float) or (isinstance(value, str) and _NUMBER.fullmatch(value.strip())):
        raise ValueError("must be an ISO 8601 date-time such as 2026-01-31T12:00:00Z, not a number")
    return value


# A date-time (query parameters): ISO 8601 as the schema's `format: date-time` says. pydantic alone
# would also read a number as seconds since 1970 (`?until=0.5`), which no client means.
Timestamp = Annotated[dt.datetime, BeforeValidator(_not_a_number)]


def _leaf_types(tp: Any) -> list[Any]:
    """The alternatives of an annotation: `Annotated` unwrapped, unions flattened."""
    if get_origin(tp) is Annotated:
        return _leaf_types(get_args(tp)[0])
    if get_origin(tp) in (Union, UnionType):
        return [leaf for arg in get_args(tp) for leaf in _leaf_types(arg)]
    return [tp]


def _integral_to_int(value: Any, tp: Any) -> Any:
    """12.0 where the schema says integer is the integer 12: JSON has one number type (JSON Schema agrees)."""
    leaves = _leaf_types(tp)
    if isinstance(value, float):
        return int(value) if value.is_integer() and int in leaves and float not in leaves else value
    for leaf in leaves:
        origin, args = get_origin(leaf), get_args(leaf)
        if isinstance(value, dict) and origin is dict and len(args) == 2:
            return {k: _integral_to_int(v, args[1]) for k, v in value.items()}
        if isinstance(value, list) and origin is list and len(args) == 1:
            return [_integral_to_int(v, args[0]) for v in value]
    return value


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def omitted() -> Any:
    """Default of a PATCH field typed `T | SkipJsonSchema[None]`: it may be left out, not set to null.

    The schema then says what the handler enforces (a null is refused), not `anyOf [T, null]`.
    """
    return Field(None, json_schema_extra=_no_default)


class Body(BaseModel):
    """Request bodies: unknown fields are an error, not silently ignored.

    Strict types: a JSON value must already have the type the schema declares. Lax parsing would
    take `false` as a quota limit of 0, `"12"` as an integer and `1` or `"yes"` as a boolean:
    requests the OpenAPI document calls invalid, answered as if they meant something. An integer
    field still takes `12.0`, the same JSON number as `12`.
    (FastAPI validates the decoded JSON as Python data, so no field here may need a conversion
    from a JSON string, such as a datetime or an Enum; use `Field(strict=False)` on one that does.)
    """

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: _integral_to_int(v, fields[k].annotation) if k in fields else v for k, v in data.items()}

    @model_validator(mode="after")
    def _no_nul_characters(self) -> Any:
        # NUL is valid JSON but no database stores it in text (PostgreSQL refuses it).
        def check(value: Any) -> None:
            if isinstance(value, str) and "\x00" in value:
                raise ValueError("strings must not contain NUL characters")
            if isinstance(value, dict):
                for k, v in value.items():
                    check(k)
                    check(v)
            elif isinstance(value, list | tuple):
                for v in value:
                    check(v)

        for name in type(self).model_fields:
            check(getattr(self, name))
        return self


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def patch_changes(body: Body) -> dict[str, Any]:
    """The fields a PATCH sets; a null is refused (no PATCH schema offers it), everywhere in the API alike."""
    from hackboot.core import errors

    changes = body.model_dump(exclude_unset=True)
    nulls = sorted(k for k, v in changes.items() if v is None)
    if nulls:
        raise errors.ValidationFailed(f"These fields cannot be null: {', '.join(nulls)}",
                                      errors=[{"loc": ["body", k], "msg": "may not be null"} for k in nulls])
    return changes


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """A query's time without an offset is UTC (the API's times all are)."""
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
