"""The OpenAPI document declares `Idempotency-Key` on exactly the POSTs that honour it, as the server checks it."""

from __future__ import annotations

import re
from typing import Any

from hackboot.core import idempotency


def _spec() -> dict[str, Any]:
    from hackboot.server import create_app

    return create_app().openapi()


def _key_param(op: dict[str, Any]) -> dict[str, Any] | None:
    return next((p for p in op.get("parameters", []) if p["name"] == idempotency.HEADER), None)


def test_every_post_but_uploads_declares_the_optional_header() -> None:
    posts = {path: item["post"] for path, item in _spec()["paths"].items() if "post" in item}
    assert len(posts) > 10
    for path, op in posts.items():
        param = _key_param(op)
        assert param is not None, path
        assert param["in"] == "header" and param["required"] is False
        assert param["schema"]["maxLength"] == idempotency.MAX_KEY
    others = [(path, method) for path, item in _spec()["paths"].items() for method, op in item.items()
              if method != "post" and _key_param(op) is not None]
    assert others == []  # PUT /v1/images/{id}/file streams: it never buffers a body to hash it


def test_the_declared_pattern_is_what_the_server_accepts() -> None:
    op = _spec()["paths"]["/v1/keypairs"]["post"]
    param = _key_param(op)
    assert param is not None
    pattern = re.compile(param["schema"]["pattern"])
    for code in range(256):  # a header value arrives as latin-1
        key = "k" + chr(code) + "k"
        assert bool(pattern.match(key)) == idempotency.valid_key(key), hex(code)
    assert pattern.match("") and idempotency.valid_key("")  # empty: no key at all
    assert not idempotency.valid_key("k" * (idempotency.MAX_KEY + 1))
