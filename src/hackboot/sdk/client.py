"""The HTTP client every tool builds on (CLI, tests, benchmarks).

`Client(url, token)` exposes one typed attribute per resource group (`client.projects`,
`client.regions`, `client.instances` …). Errors come back as `ApiError` carrying the
server's problem+json (status, stable code, detail).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from hackboot.sdk.catalog import Capacity, Flavors, Hosts, Prices, Regions, Zones
    from hackboot.sdk.compute import Instances, KeyPairs, ServerGroups
    from hackboot.sdk.events import Audit, Events, Webhooks
    from hackboot.sdk.functions import Functions, Queues
    from hackboot.sdk.identity import Auth, Projects, Tokens, Users
    from hackboot.sdk.images import Images
    from hackboot.sdk.loadbalancers import Certificates, LoadBalancers
    from hackboot.sdk.network import (
        FloatingIps,
        FlowLogs,
        NatGateways,
        NetworkInterfaces,
        SecurityGroups,
        Subnets,
        Vpcs,
    )
    from hackboot.sdk.s3 import Buckets, S3Credentials
    from hackboot.sdk.volumes import BackupPolicies, VolumeBackups, Volumes, VolumeSnapshots

JSONObject = dict[str, Any]
"""A decoded JSON object: a resource, a page, a report (the SDK returns the API's documents as they are)."""
JSONObjects = list[JSONObject]
"""A JSON array of objects (also spelled so because `list` is a method name in resource groups)."""


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, problem: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.problem = problem or {}


def as_object(value: Any) -> JSONObject:
    """`value` (a decoded response) as the JSON object the endpoint documents.

    Another shape means the server is not the API this SDK speaks (a proxy's page, another version): an
    `ApiError` with status 0 says so, instead of a `TypeError` somewhere in the caller.
    """
    if not isinstance(value, dict):
        raise ApiError(0, "unexpected_response", f"Expected a JSON object from the API, got {type(value).__name__}")
    return value


def as_objects(value: Any) -> JSONObjects:
    """`value` (a decoded response) as the JSON array of objects the endpoint documents."""
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ApiError(0, "unexpected_response",
                       f"Expected a JSON array of objects from the API, got {type(value).__name__}")
    return value


class Resource:
    """Base for resource groups: holds the client and the group's path, offers typed request helpers."""

    path = ""

    def __init__(self, client: Client) -> None:
        self.c = client

    def _list(self, filters: Mapping[str, Any], path: str | None = None) -> JSONObjects:
        """Every item of every page of `path` (default: the group's), the filters that are None left out."""
        return list(self.c.paginate(path or self.path, {k: v for k, v in filters.items() if v is not None}))

    def _get(self, resource_id: str) -> JSONObject:
        return as_object(self.c.get(f"{self.path}/{resource_id}"))


class Collection(Resource):
    """A group listed with any filter its endpoint offers (`list(status=…)`) and read by id."""

    def list(self, **filters: Any) -> JSONObjects:
        return self._list(filters)

    def get(self, resource_id: str) -> JSONObject:
        return self._get(resource_id)


class Client:
    # Resource groups, declared here so that editors and type checkers know them; each SDK module's
    # attach(client) sets its own (see sdk/resources.py).
    auth: Auth
    projects: Projects
    users: Users
    tokens: Tokens
    regions: Regions
    zones: Zones
    flavors: Flavors
    prices: Prices
    hosts: Hosts
    capacity: Capacity
    events: Events
    webhooks: Webhooks
    audit: Audit
    keypairs: KeyPairs
    server_groups: ServerGroups
    instances: Instances
    images: Images
    volumes: Volumes
    volume_snapshots: VolumeSnapshots
    volume_backups: VolumeBackups
    backup_policies: BackupPolicies
    vpcs: Vpcs
    subnets: Subnets
    network_interfaces: NetworkInterfaces
    security_groups: SecurityGroups
    floating_ips: FloatingIps
    nat_gateways: NatGateways
    flow_logs: FlowLogs
    load_balancers: LoadBalancers
    certificates: Certificates
    functions: Functions
    queues: Queues
    s3_credentials: S3Credentials
    buckets: Buckets

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
        """The decoded JSON body (the shape the endpoint documents), the text of another body, or None
        for an empty one; `ApiError` for a 4xx/5xx answer or an unreachable server."""
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

    def paginate(self, path: str, params: Mapping[str, Any] | None = None,
                 page_size: int = 500) -> Iterator[JSONObject]:
        query = dict(params or {})
        query["limit"] = page_size
        while True:
            page = as_object(self.get(path, **query))
            yield from as_objects(page["items"])
            if not page.get("next_cursor"):
                return
            query["cursor"] = page["next_cursor"]

    def wait_for(self, fetch: Callable[[], JSONObject], done: Callable[[JSONObject], bool], *,
                 timeout: float = 300.0, interval: float = 0.25,
                 on_poll: Callable[[JSONObject], None] | None = None) -> JSONObject:
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
