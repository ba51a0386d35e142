"""Keyset pagination on time-sortable ids: stable under concurrent inserts, O(limit) per page."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Query
from pydantic import BaseModel
from sqlalchemy import Select
from sqlalchemy.orm import Session

from hackboot.core import errors

MAX_LIMIT = 1000
T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


@dataclass
class PageParams:
    limit: int
    cursor: str | None

    def after_id(self) -> str | None:
        if not self.cursor:
            return None
        try:
            raw = base64.urlsafe_b64decode(self.cursor.encode() + b"==").decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise errors.BadRequest("Invalid pagination cursor: pass back next_cursor unchanged",
                                    code="invalid_cursor") from None
        if not raw.startswith("c1:"):
            raise errors.BadRequest("Invalid pagination cursor: pass back next_cursor unchanged",
                                    code="invalid_cursor")
        return raw[3:]


async def _page_params(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"Page size, at most {MAX_LIMIT}")] = 100,
    cursor: Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page")] = None,
) -> PageParams:
    return PageParams(limit=limit, cursor=cursor)


Pagination = Annotated[PageParams, Depends(_page_params)]


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(f"c1:{last_id}".encode()).decode().rstrip("=")


def paginate(session: Session, stmt: Select[Any], id_column: Any, page: PageParams) -> tuple[list[Any], str | None]:
    """Run `stmt` ordered by `id_column` from the cursor; return rows and the next cursor (or None)."""
    after = page.after_id()
    if after is not None:
        stmt = stmt.where(id_column > after)
    rows = list(session.scalars(stmt.order_by(id_column).limit(page.limit + 1)))
    if len(rows) > page.limit:
        rows = rows[: page.limit]
        return rows, encode_cursor(getattr(rows[-1], id_column.key))
    return rows, None
