"""Shared pydantic building blocks for request and response bodies."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

# DNS-label-like names: safe in URLs, hostnames, CLI arguments and logs.
Name = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$", max_length=63)]
Description = Annotated[str, StringConstraints(max_length=255)]
ResourceId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]{1,8}-[a-z0-9]{1,40}$", max_length=50)]


class Body(BaseModel):
    """Request bodies: unknown fields are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)
