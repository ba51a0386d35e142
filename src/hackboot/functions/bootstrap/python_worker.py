"""In-sandbox worker for Python functions: import the handler once, then serve invocations one at a time.

Protocol (both directions): frames of ``<II`` (header length, body length), a JSON header, the body.
Requests come on fd REQ, answers go to fd RESP; the function's stdout/stderr is fd 1/2 (read by the
engine as logs). After each invocation the worker flushes them and writes the request's end marker to
fd 1, then the answer, so the engine knows every log byte of the invocation came before the marker.
Runs with ``python3 -I``: nothing from the environment changes how Python starts.
"""

from __future__ import annotations

import os
import struct
import sys
import time

TYPE_CHECKING = False  # typing itself would cost every cold start its import
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

TASK_ROOT = "/var/task"


# JSON through the C accelerator that the json package itself uses: importing json would pull in re,
# enum and more, a good part of a cold start. The json package is the fallback (another interpreter).
try:
    import _json

    def _unserializable(obj: object) -> object:
        raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")

    _CONSTANTS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}

    class _ScanContext:
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant = _CONSTANTS.__getitem__

    _scan = _json.make_scanner(_ScanContext)  # type: ignore[arg-type]  # (any object with these attributes)
    _WHITESPACE = " \t\n\r"

    def _skip(text: str, index: int) -> int:
        while index < len(text) and text[index] in _WHITESPACE:
            index += 1
        return index

    def json_dumps(obj: object) -> str:
        # A new encoder per call: it remembers the containers it is inside (circular references).
        encode = _json.make_encoder({}, _unserializable, _json.encode_basestring_ascii, None, ": ", ", ",
                                    False, False, True)
        return "".join(encode(obj, 0))

    def json_loads(data: bytes) -> Any:
        text = data.decode("utf-8")
        try:
            value, end = _scan(text, _skip(text, 0))
        except StopIteration as exc:
            raise ValueError(f"Expecting value: char {exc.value}") from None
        if _skip(text, end) != len(text):
            raise ValueError(f"Extra data: char {end}")
        return value
except ImportError:
    import json

    json_dumps = json.dumps
    json_loads = json.loads  # type: ignore[assignment]


def read_exact(fd: int, n: int) -> bytes:
    chunks: list[bytes] = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> tuple[Any, bytes]:
    header_len, body_len = struct.unpack("<II", read_exact(fd, 8))
    return json_loads(read_exact(fd, header_len)), read_exact(fd, body_len)


def write_frame(fd: int, header: dict[str, Any], body: bytes = b"") -> None:
    head = json_dumps(header).encode()
    data = struct.pack("<II", len(head), len(body)) + head + body
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Context:
    def __init__(self, request_id: str, deadline_ms: float, function_name: str, function_version: str,
                 memory_mb: int) -> None:
        self.aws_request_id = self.request_id = request_id
        self.function_name = function_name
        self.function_version = function_version
        self.memory_limit_in_mb = memory_mb
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int(self._deadline_ms - time.time() * 1000))


def error_body(exc: BaseException) -> dict[str, Any]:
    import traceback  # only on errors: a cold start does not pay for it
    return {"errorType": type(exc).__name__, "errorMessage": str(exc),
            "stackTrace": traceback.format_tb(exc.__traceback__)}


def print_exc() -> None:
    import traceback

    traceback.print_exc()


def load(handler_name: str) -> Callable[[Any, Context], Any]:
    module_name, _, function_name = handler_name.rpartition(".")
    if not module_name or not function_name:
        raise ValueError(f"bad handler {handler_name!r}: expected module.function")
    __import__(module_name)  # (importlib itself would cost the cold start its import)
    module = sys.modules[module_name]
    function = getattr(module, function_name, None)
    if not callable(function):
        raise AttributeError(f"handler {function_name!r} missing on module {module_name!r}")
    return function  # type: ignore[no-any-return]


def main() -> None:
    req_fd, resp_fd, payload_limit = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[4])
    handler_name, function_name, function_version, memory_mb = sys.argv[3], sys.argv[5], sys.argv[6], int(sys.argv[7])
    for fd in [int(name) for name in os.listdir("/proc/self/fd")]:  # fds bwrap was given for its own use
        if fd > 2 and fd not in (req_fd, resp_fd):
            try:  # noqa: SIM105 (contextlib costs a cold start 9 ms of imports)
                os.close(fd)
            except OSError:
                pass
    sys.path.insert(0, TASK_ROOT)
    try:
        handler = load(handler_name)
    except BaseException as exc:  # reported as the first invocation's error (Lambda's init error)
        print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        write_frame(resp_fd, {"ready": False, "error": error_body(exc)})
        return
    write_frame(resp_fd, {"ready": True})
    while True:
        try:
            header, event_bytes = read_frame(req_fd)
        except EOFError:
            return
        started = time.monotonic()
        context = Context(header["request_id"], header["deadline_ms"], function_name, function_version, memory_mb)
        answer: dict[str, Any] = {"outcome": "ok"}
        body = b""
        try:
            event = json_loads(event_bytes) if event_bytes else None
            result = handler(event, context)
            body = json_dumps(result).encode()
            if len(body) > payload_limit:
                raise ResponseTooLarge(f"response payload of {len(body)} bytes exceeds the limit of {payload_limit}")
        except Exception as exc:
            print_exc()
            answer = {"outcome": "error"}
            body = json_dumps(error_body(exc)).encode()
        answer["duration_ms"] = (time.monotonic() - started) * 1000
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(1, header["marker"].encode())
        write_frame(resp_fd, answer, body)


class ResponseTooLarge(Exception):
    pass


if __name__ == "__main__":
    main()
