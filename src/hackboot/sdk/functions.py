"""SDK: functions (code, versions, aliases, triggers, invocations, logs) and queues."""

from __future__ import annotations

import io
import os
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hackboot.sdk.client import Client, JSONObject, JSONObjects, Resource, as_object

Vars = dict[str, str]
"""Environment variables or secrets."""
Names = list[str]
"""Spelled so because `list` is a method name in resource groups."""


def _body(**fields: Any) -> dict[str, Any]:
    """The fields that were given (None means "not given": the API refuses nulls it does not take)."""
    return {k: v for k, v in fields.items() if v is not None}


def zip_directory(directory: Path) -> bytes:
    """A zip of a folder's regular files (paths relative to it; symbolic links and hidden files left out)."""
    buf = io.BytesIO()
    root = Path(directory)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__"
                                 and not (Path(dirpath) / d).is_symlink())
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.startswith(".") or path.is_symlink() or not path.is_file():
                    continue
                archive.write(path, path.relative_to(root).as_posix())
    return buf.getvalue()


class Functions(Resource):
    path = "/v1/functions"

    def list(self, **filters: Any) -> JSONObjects:
        return self._list(filters)

    def get(self, ref: str) -> JSONObject:
        return self._get(ref)

    def create(self, name: str, runtime: str, handler: str, *, memory_mb: int | None = None,
               timeout_s: int | None = None, environment: Vars | None = None, secrets: Vars | None = None,
               network_egress: bool | None = None, reserved_concurrency: int | None = None,
               max_concurrency: int | None = None, description: str | None = None,
               dead_letter_queue: str | None = None, idempotency_key: str | None = None) -> JSONObject:
        """A function without code: upload it with :meth:`upload_code`. Secrets are never returned."""
        return as_object(self.c.post(self.path, _body(
            name=name, runtime=runtime, handler=handler, memory_mb=memory_mb, timeout_s=timeout_s,
            environment=environment, secrets=secrets, network_egress=network_egress,
            reserved_concurrency=reserved_concurrency, max_concurrency=max_concurrency, description=description,
            dead_letter_queue=dead_letter_queue), idempotency_key=idempotency_key))

    def update(self, ref: str, **changes: Any) -> JSONObject:
        """PATCH any of create's fields; `environment` and `secrets` replace the whole set."""
        return as_object(self.c.patch(f"{self.path}/{ref}", _body(**changes)))

    def delete(self, ref: str) -> None:
        """The function with its versions, aliases and triggers."""
        self.c.delete(f"{self.path}/{ref}")

    def upload_code(self, ref: str, code: bytes | str | Path, *, filename: str | None = None) -> JSONObject:
        """Upload a zip (bytes starting with PK, or a .zip file), a folder (zipped here), or a single source
        file (its name is kept, or `filename` for bytes)."""
        if isinstance(code, str | Path):
            path = Path(code)
            if path.is_dir():
                data, ctype = zip_directory(path), "application/zip"
            else:
                data = path.read_bytes()
                is_zip = data[:2] == b"PK"
                ctype = "application/zip" if is_zip else "application/octet-stream"
                filename = None if is_zip else (filename or path.name)
        else:
            data = code
            ctype = "application/zip" if data[:2] == b"PK" and filename is None else "application/octet-stream"
        params = {"filename": filename} if filename else None
        return as_object(self.c.request("PUT", f"{self.path}/{ref}/code", content=data, params=params,
                                        headers={"Content-Type": ctype}))

    # --- versions and aliases --------------------------------------------------------------------------

    def publish_version(self, ref: str, *, description: str | None = None) -> JSONObject:
        return as_object(self.c.post(f"{self.path}/{ref}/versions", _body(description=description)))

    def versions(self, ref: str) -> JSONObjects:
        return self._list({}, f"{self.path}/{ref}/versions")

    def get_version(self, ref: str, number: int) -> JSONObject:
        return as_object(self.c.get(f"{self.path}/{ref}/versions/{number}"))

    def set_alias(self, ref: str, name: str, version: int, *, additional_version: int | None = None,
                  weight: float | None = None, description: str | None = None) -> JSONObject:
        """Create or repoint an alias (optionally weighted: `weight` of invocations run additional_version)."""
        return as_object(self.c.put(f"{self.path}/{ref}/aliases/{name}", _body(
            version=version, additional_version=additional_version, weight=weight, description=description)))

    def aliases(self, ref: str) -> JSONObjects:
        return self._list({}, f"{self.path}/{ref}/aliases")

    def get_alias(self, ref: str, name: str) -> JSONObject:
        return as_object(self.c.get(f"{self.path}/{ref}/aliases/{name}"))

    def delete_alias(self, ref: str, name: str) -> None:
        self.c.delete(f"{self.path}/{ref}/aliases/{name}")

    # --- triggers ------------------------------------------------------------------------------------

    def add_trigger(self, ref: str, kind: str, *, qualifier: str | None = None, enabled: bool | None = None,
                    description: str | None = None, auth: str | None = None, schedule: str | None = None,
                    bucket: str | None = None, events: Names | None = None, prefix: str | None = None,
                    suffix: str | None = None, queue: str | None = None,
                    batch_size: int | None = None) -> JSONObject:
        """kind http (auth none|token: the token is in this answer only), schedule (cron or rate(…)),
        object_storage (bucket, events, prefix, suffix) or queue (queue, batch_size)."""
        return as_object(self.c.post(f"{self.path}/{ref}/triggers", _body(
            kind=kind, qualifier=qualifier, enabled=enabled, description=description, auth=auth,
            schedule=schedule, bucket=bucket, events=events, prefix=prefix, suffix=suffix, queue=queue,
            batch_size=batch_size)))

    def triggers(self, ref: str, **filters: Any) -> JSONObjects:
        return self._list(filters, f"{self.path}/{ref}/triggers")

    def get_trigger(self, ref: str, trigger_id: str) -> JSONObject:
        return as_object(self.c.get(f"{self.path}/{ref}/triggers/{trigger_id}"))

    def update_trigger(self, ref: str, trigger_id: str, *, enabled: bool | None = None,
                       description: str | None = None, qualifier: str | None = None) -> JSONObject:
        return as_object(self.c.patch(f"{self.path}/{ref}/triggers/{trigger_id}", _body(
            enabled=enabled, description=description, qualifier=qualifier)))

    def delete_trigger(self, ref: str, trigger_id: str) -> None:
        self.c.delete(f"{self.path}/{ref}/triggers/{trigger_id}")

    # --- invoking, records and logs ------------------------------------------------------------------

    def invoke(self, ref: str, payload: Any = None, qualifier: str | None = None,
               asynchronous: bool = False) -> Any:
        """Run the function with `payload` (the event, JSON) and return the invocation: outcome, result, error,
        logs_tail, durations, cold (asynchronous: accepted, 202, with the invocation's id)."""
        params = {k: v for k, v in (("qualifier", qualifier), ("mode", "async" if asynchronous else None)) if v}
        return self.c.post(f"{self.path}/{ref}/invoke", {} if payload is None else payload, params=params or None)

    def invocations(self, ref: str, *, since: str | None = None, outcome: str | None = None) -> JSONObjects:
        return self._list({"since": since, "outcome": outcome}, f"{self.path}/{ref}/invocations")

    def logs(self, ref: str, *, since: str | None = None, after: str | None = None, follow: bool = False,
             wait_s: float | None = None, limit: int | None = None) -> JSONObject:
        """One page of log records ({items, next_after}); `follow` long-polls for new ones."""
        return as_object(self.c.get(f"{self.path}/{ref}/logs", **_body(
            since=since, after=after, follow=follow or None, wait_s=wait_s, limit=limit)))

    def follow_logs(self, ref: str, *, since: str | None = None, after: str | None = None,
                    timeout: float | None = None) -> Iterator[JSONObject]:
        """Every log record as it arrives (for `timeout` seconds, or forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            wait = 20.0 if deadline is None else max(0.0, min(20.0, deadline - time.monotonic()))
            page = self.logs(ref, since=since, after=after, follow=True, wait_s=round(wait, 3))
            yield from page["items"]
            after = page.get("next_after") or after


class Queues(Resource):
    path = "/v1/queues"

    def list(self, **filters: Any) -> JSONObjects:
        return self._list(filters)

    def get(self, ref: str) -> JSONObject:
        return self._get(ref)

    def create(self, name: str, *, visibility_timeout_s: int | None = None, max_receives: int | None = None,
               dead_letter_queue: str | None = None, retention_s: int | None = None, delay_s: int | None = None,
               description: str | None = None, idempotency_key: str | None = None) -> JSONObject:
        return as_object(self.c.post(self.path, _body(
            name=name, visibility_timeout_s=visibility_timeout_s, max_receives=max_receives,
            dead_letter_queue=dead_letter_queue, retention_s=retention_s, delay_s=delay_s,
            description=description), idempotency_key=idempotency_key))

    def update(self, ref: str, **changes: Any) -> JSONObject:
        return as_object(self.c.patch(f"{self.path}/{ref}", _body(**changes)))

    def delete(self, ref: str) -> None:
        self.c.delete(f"{self.path}/{ref}")

    def send(self, ref: str, body: str, *, delay_s: int | None = None,
             attributes: dict[str, str] | None = None) -> JSONObject:
        return as_object(self.c.post(f"{self.path}/{ref}/messages", _body(body=body, delay_s=delay_s,
                                                                           attributes=attributes)))

    def receive(self, ref: str, *, max_messages: int | None = None, visibility_timeout_s: int | None = None,
                wait_s: float | None = None) -> JSONObjects:
        answer = as_object(self.c.post(f"{self.path}/{ref}/messages/receive", _body(
            max_messages=max_messages, visibility_timeout_s=visibility_timeout_s, wait_s=wait_s)))
        messages: JSONObjects = answer["messages"]
        return messages

    def delete_message(self, ref: str, receipt_handle: str) -> None:
        self.c.delete(f"{self.path}/{ref}/receipts/{receipt_handle}")

    def change_visibility(self, ref: str, receipt_handle: str, visibility_timeout_s: int) -> JSONObject:
        return as_object(self.c.post(f"{self.path}/{ref}/receipts/{receipt_handle}/visibility",
                                     {"visibility_timeout_s": visibility_timeout_s}))


def attach(client: Client) -> None:
    client.functions = Functions(client)
    client.queues = Queues(client)
