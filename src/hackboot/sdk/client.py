"""The HTTP client every tool builds on (CLI, tests, benchmarks).

`Client(url, token)` exposes one attribute per resource group (`client.projects`,
`client.regions`, `client.instances` …). Errors come back as `ApiError` carrying the
server's problem+json (status, stable code, detail).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, problem: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.problem = problem or {}


class Resource:
    """Base for resource groups: holds the client and offers CRUD helpers."""

    path = ""

    def __init__(self, client: Client) -> None:
        self.c = client

    def list(self, **filters: Any) -> list[dict[str, Any]]:
        return list(self.c.paginate(self.path, {k: v for k, v in filters.items() if v is not None}))

    def get(self, resource_id: str) -> dict[str, Any]:
        return self.c.get(f"{self.path}/{resource_id}")


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8080", token: str | None = None, *, project: str | None = None,
                 timeout: float = 30.0, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"User-Agent": "hackboot-sdk/0.1"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if project:
            headers["X-Hackboot-Project"] = project
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        from hackboot.sdk import resources

        resources.attach(self)

    # -- plumbing -----------------------------------------------------------------------------------
    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def with_token(self, token: str, project: str | None = None) -> Client:
        return Client(self.url, token, project=project)

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
                idempotency_key: str | None = None, content: Any = None,
                headers: dict[str, str] | None = None) -> Any:
        hdrs = dict(headers or {})
        if method == "POST":
            hdrs["Idempotency-Key"] = idempotency_key or str(uuid.uuid4())
        try:
            resp = self.http.request(method, path, json=json, params=params, content=content, headers=hdrs)
        except httpx.TransportError as exc:
            raise ApiError(0, "unreachable", f"Cannot reach {self.url}: {exc}") from exc
        if resp.status_code >= 400:
            try:
                problem = resp.json()
            except ValueError:
                problem = {"code": "http_error", "detail": resp.text[:500]}
            raise ApiError(resp.status_code, str(problem.get("code", "http_error")),
                           str(problem.get("detail", resp.reason_phrase)), problem)
        if resp.status_code == 204 or not resp.content:
            return None
        if resp.headers.get("content-type", "").startswith("application/json"):
            return resp.json()
        return resp.text

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json=json, **kw)

    def put(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("PUT", path, json=json, **kw)

    def patch(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("PATCH", path, json=json, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.request("DELETE", path, **kw)

    def paginate(self, path: str, params: dict[str, Any] | None = None, page_size: int = 500) -> Iterator[Any]:
        query = dict(params or {})
        query["limit"] = page_size
        while True:
            page = self.get(path, **query)
            yield from page["items"]
            if not page.get("next_cursor"):
                return
            query["cursor"] = page["next_cursor"]

    def wait_for(self, fetch: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool], *,
                 timeout: float = 300.0, interval: float = 0.25,
                 on_poll: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until `done(resource)`; raise TimeoutError with the last state otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            current = fetch()
            if on_poll:
                on_poll(current)
            if done(current):
                return current
            if time.monotonic() > deadline:
                raise TimeoutError(f"Timed out after {timeout:.0f}s; last state: {current.get('status')}")
            time.sleep(interval)
