"""SDK: events (list, follow live), webhooks and their delivery log, the audit log.

    for event in client.events.stream(types=["instance.*"]):   # server-sent events, resumes itself
        print(event["seq"], event["type"], event["resource_id"])

Receivers verify deliveries with `verify_webhook_signature` (see its docstring).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from hackboot.sdk.client import ApiError, Client, Collection, JSONObject, JSONObjects, Resource, as_object, as_objects

SIGNATURE_TOLERANCE_S = 300


def verify_webhook_signature(secret: str, body: bytes, timestamp: str, signature: str, *,
                             tolerance_s: float = SIGNATURE_TOLERANCE_S, now: float | None = None) -> bool:
    """True if a delivery is authentic and fresh.

    `body` is the raw request body (bytes, not re-serialised JSON); `timestamp` and `signature` are
    the `X-Hackboot-Timestamp` and `X-Hackboot-Signature` headers. The signature is
    `sha256=` + hex(HMAC-SHA256(secret, timestamp + "." + body)), compared in constant time. A
    timestamp further than `tolerance_s` from now is refused, so a captured request cannot be
    replayed later; also drop repeats of an event `id` you already processed (delivery is at
    least once, and a redelivery carries the same event id).
    """
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    expected = "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature.strip())


def _clean(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if value is None or value == [] or value is False:
            continue
        if key == "types":
            key = "type"
            value = ",".join(value) if isinstance(value, list | tuple) else value
        out[key] = "true" if value is True else value
    return out


def parse_sse(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Server-sent event messages ({"id", "event", "data", "retry"}) from a stream's lines."""
    fields: dict[str, str] = {}
    data: list[str] = []
    for line in lines:
        if line == "":
            if data or fields:
                if data:
                    fields["data"] = "\n".join(data)
                yield fields
            fields, data = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name in ("id", "event", "retry"):
            fields[name] = value
    if data:
        fields["data"] = "\n".join(data)
        yield fields


class Events(Resource):
    path = "/v1/events"

    def list(self, *, types: Sequence[str] | None = None, resource_type: str | None = None,
             resource_id: str | None = None, since: str | None = None, until: str | None = None,
             all_projects: bool = False, order: str | None = None) -> JSONObjects:
        """Every matching event (all pages), oldest first unless order="desc"."""
        return self._list(_clean({
            "types": types, "resource_type": resource_type, "resource_id": resource_id, "since": since,
            "until": until, "all_projects": all_projects, "order": order}))

    def page(self, *, limit: int = 100, cursor: str | None = None, **filters: Any) -> JSONObject:
        """One page: {"items": [...], "next_cursor": ...}."""
        return as_object(self.c.get(self.path, **_clean(filters | {"limit": limit, "cursor": cursor})))

    def latest(self, **filters: Any) -> JSONObject | None:
        items = as_objects(self.page(limit=1, order="desc", **filters)["items"])
        return items[0] if items else None

    def get(self, event_id: str) -> JSONObject:
        return as_object(self.c.get(f"{self.path}/{event_id}"))

    def stream(self, *, types: Sequence[str] | None = None, resource_type: str | None = None,
               resource_id: str | None = None, since: str | None = None, all_projects: bool = False,
               after: int | None = None, reconnect: bool = True, read_timeout: float = 60.0,
               ) -> Iterator[JSONObject]:
        """Follow events live (server-sent events), yielding each event as a dict.

        Starts after `after` (a seq) when given, else with the next new event. When the
        connection drops it reconnects with Last-Event-ID, so no event is missed or repeated;
        `reconnect=False` ends the iterator instead. Close it (or break out of the loop) to stop.
        """
        params = _clean({"types": types, "resource_type": resource_type, "resource_id": resource_id,
                         "since": since, "all_projects": all_projects})
        last_id: int | None = after
        retry_s = 2.0
        timeout = httpx.Timeout(30.0, read=read_timeout)
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = str(last_id)
            try:
                with self.c.http.stream("GET", f"{self.path}/stream", params=params, headers=headers,
                                        timeout=timeout) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        try:
                            problem = resp.json()
                        except ValueError:
                            problem = {"code": "http_error", "detail": resp.text[:500]}
                        raise ApiError(resp.status_code, str(problem.get("code", "http_error")),
                                       str(problem.get("detail", resp.reason_phrase)), problem)
                    for msg in parse_sse(resp.iter_lines()):
                        if "retry" in msg and msg["retry"].isdigit():
                            retry_s = int(msg["retry"]) / 1000
                        if "data" not in msg:
                            continue
                        event = as_object(json.loads(msg["data"]))
                        if msg.get("id", "").isdigit():
                            last_id = int(msg["id"])
                        yield event
            except httpx.TransportError as exc:
                if not reconnect:
                    raise ApiError(0, "unreachable", f"Event stream from {self.c.url} broke: {exc}") from exc
            else:
                if not reconnect:
                    return
            time.sleep(retry_s)


class Webhooks(Collection):
    path = "/v1/webhooks"

    def create(self, url: str, event_types: Sequence[str] | None = None, description: str = "",
               enabled: bool = True) -> JSONObject:
        """Create a webhook; the result's "secret" is shown only this once."""
        return as_object(self.c.post(self.path, {"url": url, "event_types": list(event_types or []),
                                                 "description": description, "enabled": enabled}))

    def update(self, webhook_id: str, **changes: Any) -> JSONObject:
        """Change url, event_types, description and/or enabled."""
        return as_object(self.c.patch(f"{self.path}/{webhook_id}", changes))

    def delete(self, webhook_id: str) -> None:
        self.c.delete(f"{self.path}/{webhook_id}")

    def rotate_secret(self, webhook_id: str) -> JSONObject:
        return as_object(self.c.post(f"{self.path}/{webhook_id}/rotate-secret"))

    def ping(self, webhook_id: str) -> JSONObject:
        """Queue a webhook.ping event for this webhook; returns its delivery."""
        return as_object(self.c.post(f"{self.path}/{webhook_id}/ping"))

    def deliveries(self, webhook_id: str, *, status: str | None = None, order: str = "desc",
                   limit: int | None = None) -> JSONObjects:
        """The delivery log, newest first by default (every page unless `limit`)."""
        params = _clean({"status": status, "order": order})
        if limit is not None:
            return as_objects(as_object(self.c.get(f"{self.path}/{webhook_id}/deliveries", **params,
                                                   limit=limit))["items"])
        return self._list(params, f"{self.path}/{webhook_id}/deliveries")

    def delivery(self, webhook_id: str, delivery_id: str) -> JSONObject:
        return as_object(self.c.get(f"{self.path}/{webhook_id}/deliveries/{delivery_id}"))

    def redeliver(self, webhook_id: str, delivery_id: str) -> JSONObject:
        return as_object(self.c.post(f"{self.path}/{webhook_id}/deliveries/{delivery_id}/redeliver"))

    def wait_delivery(self, webhook_id: str, delivery_id: str, *, timeout: float = 60.0) -> JSONObject:
        """Poll until the delivery is delivered or failed."""
        return self.c.wait_for(lambda: self.delivery(webhook_id, delivery_id),
                               lambda d: d["status"] != "pending", timeout=timeout)


class Audit(Resource):
    path = "/v1/audit"

    def list(self, *, user_id: str | None = None, username: str | None = None,
             method: str | None = None, path_prefix: str | None = None, since: str | None = None,
             until: str | None = None, all_projects: bool = False, order: str | None = None,
             limit: int | None = None) -> JSONObjects:
        """The matching records: the first `limit` ones, or every page."""
        params = _clean({"user_id": user_id, "username": username, "method": method,
                         "path_prefix": path_prefix, "since": since, "until": until,
                         "all_projects": all_projects, "order": order})
        if limit is not None:
            return as_objects(as_object(self.c.get(self.path, **params, limit=limit))["items"])
        return self._list(params)


def attach(client: Client) -> None:
    client.events = Events(client)
    client.webhooks = Webhooks(client)
    client.audit = Audit(client)
