"""HTTP/1.1 protocol for uvicorn with bounded request heads (both the API and the S3 port).

uvicorn's httptools protocol takes request lines and headers of any size: an 8 MiB header was
accepted, and httptools accumulates a header in memory until it ends. Here the bytes of a
request head are counted as they arrive; past `MAX_HEAD_BYTES` in total, or one field line
over `MAX_FIELD_BYTES`, the connection gets `431 Request Header Fields Too Large` and is closed
at once, before the application sees anything. A request head must also arrive within
`HEAD_TIMEOUT_S` of the connection opening (later heads, of their first byte): connections
that trickle bytes or send nothing cannot be held open for ever (408, closed).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_FIELD_BYTES = 16 * 1024  # one header line (name + value), or the request target
MAX_HEAD_BYTES = 64 * 1024  # request line and every header together
HEAD_TIMEOUT_S = 30.0


class _HeadTooLarge(Exception):
    pass


_PROBLEMS = {431: ("request_header_fields_too_large", "Request header fields too large"),
             408: ("request_timeout", "Request timeout")}
_S3_CODES = {431: "RequestHeaderSectionTooLarge", 408: "RequestTimeout"}


def problem_body(status: int, detail: str) -> tuple[bytes, bytes]:
    code, title = _PROBLEMS[status]
    body = json.dumps({"type": f"https://hackboot.cloud/problems/{code}", "title": title, "status": status,
                       "code": code, "detail": detail}).encode()
    return b"application/problem+json", body


def s3_body(status: int, detail: str) -> tuple[bytes, bytes]:
    body = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{_S3_CODES[status]}</Code>"
            f"<Message>{detail}</Message></Error>").encode()
    return b"application/xml", body


class CappedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that refuses oversized request heads with 431 and closes the connection."""

    render = staticmethod(problem_body)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._fields_bytes = 0
        self._in_head = True
        self._head_too_large = ""
        self._head_timer: asyncio.TimerHandle | None = None

    # uvicorn's base narrows asyncio's BaseTransport to the Transport the event loop gives a stream
    # protocol; this override keeps its signature, and so its (deliberate) override error.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_bytes == 0 and self.cycle is None:
            self.transport.close()  # an idle connection: nothing to answer
            return
        self._reject(f"The request head did not arrive within {HEAD_TIMEOUT_S:g} s", status=408)

    def on_message_begin(self) -> None:
        # The first head must be whole within the timeout of the connection opening; later ones
        # (keep-alive: uvicorn's own idle timeout runs until their first byte) of that first byte.
        if self._head_timer is None:
            self._arm_head_timer()
        self._in_head = True
        self._head_bytes = 0
        self._fields_bytes = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > MAX_FIELD_BYTES:
            self._head_too_large = f"The request target is over {MAX_FIELD_BYTES} bytes"
            raise _HeadTooLarge
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        if size > MAX_FIELD_BYTES:
            self._head_too_large = f"A header field is over {MAX_FIELD_BYTES} bytes"
            raise _HeadTooLarge
        self._fields_bytes += size + 4  # ": " and CRLF
        if self._fields_bytes + len(self.url) > MAX_HEAD_BYTES:
            self._head_too_large = f"The request header section is over {MAX_HEAD_BYTES} bytes"
            raise _HeadTooLarge
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Counted on what arrived, not on what the parser handed over: httptools buffers an unfinished
        # header whole. The parser holds at most one read's worth past the limit.
        if self._in_head and not self._head_too_large and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._reject(f"The request header section is over {MAX_HEAD_BYTES} bytes")

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:  # a parser callback above refused the head
            self._reject(self._head_too_large)
            return
        super().send_400_response(msg)

    def _reject(self, detail: str, status: int = 431) -> None:
        if self.transport.is_closing():
            return
        ctype, body = self.render(status, detail)
        reason = b"431 Request Header Fields Too Large" if status == 431 else b"408 Request Timeout"
        self.transport.write(b"".join([
            b"HTTP/1.1 ", reason, b"\r\n",
            b"content-type: ", ctype, b"\r\n",
            b"content-length: ", str(len(body)).encode(), b"\r\n",
            b"connection: close\r\n\r\n", body]))
        self.transport.close()


class S3CappedHttpToolsProtocol(CappedHttpToolsProtocol):
    render = staticmethod(s3_body)
