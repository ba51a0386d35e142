"""Shared pydantic building blocks for request and response bodies."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, StringConstraints, model_validator

# DNS-label-like names: safe in URLs, hostnames, CLI arguments and logs.
Name = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$", max_length=63)]
Description = Annotated[str, StringConstraints(max_length=255)]
ResourceId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]{1,8}-[a-z0-9]{1,40}$", max_length=50)]


class Body(BaseModel):
    """Request bodies: unknown fields are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

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
