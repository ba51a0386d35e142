"""SDK: load balancers (+ listeners, rules, pools, members, stats, access logs) and certificates."""

from __future__ import annotations

import time
from typing import Any

from hackboot.sdk.client import ApiError, Client, JSONObject, JSONObjects, Resource, as_object

Names = list[str]
"""References (ids or names); spelled so because `list` is a method name in resource groups."""


def _body(**fields: Any) -> dict[str, Any]:
    """The fields that were given (None means "not given": the API refuses nulls it does not take)."""
    return {k: v for k, v in fields.items() if v is not None}


class LoadBalancers(Resource):
    path = "/v1/load-balancers"

    # --- the load balancer ---------------------------------------------------------------------------

    def list(self, **filters: Any) -> JSONObjects:
        return self._list(filters)

    def get(self, ref: str) -> JSONObject:
        return self._get(ref)

    def create(self, name: str, subnet: str, *, internet_facing: bool | None = None,
               security_groups: Names | None = None, description: str | None = None,
               idempotency_key: str | None = None) -> JSONObject:
        return as_object(self.c.post(self.path, _body(name=name, subnet=subnet, internet_facing=internet_facing,
                                                      security_groups=security_groups, description=description),
                                     idempotency_key=idempotency_key))

    def update(self, ref: str, *, name: str | None = None, description: str | None = None,
               security_groups: Names | None = None) -> JSONObject:
        return as_object(self.c.patch(f"{self.path}/{ref}", _body(name=name, description=description,
                                                                   security_groups=security_groups)))

    def delete(self, ref: str) -> JSONObject:
        """Starts the deletion: the load balancer is DELETING until its proxy has stopped."""
        return as_object(self.c.delete(f"{self.path}/{ref}"))

    def wait(self, ref: str, status: str = "ACTIVE", timeout: float = 60.0, interval: float = 0.5) -> JSONObject:
        """Poll until the load balancer has `status` (or is gone, for status "DELETED"); ApiError on ERROR."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                lb = self.get(ref)
            except ApiError as e:
                if e.status == 404 and status == "DELETED":
                    return {"id": ref, "status": "DELETED"}
                raise
            if lb["status"] == status:
                return lb
            if lb["status"] == "ERROR" and status != "ERROR":
                raise ApiError(409, "load_balancer_error", lb.get("status_reason") or "load balancer in ERROR", lb)
            if time.monotonic() > deadline:
                raise TimeoutError(f"load balancer {ref} is {lb['status']}, not {status}, after {timeout:.0f}s")
            time.sleep(interval)

    # --- listeners and rules -------------------------------------------------------------------------

    def listeners(self, ref: str) -> JSONObjects:
        return self._list({}, f"{self.path}/{ref}/listeners")

    def get_listener(self, ref: str, listener: str) -> JSONObject:
        return as_object(self.c.get(f"{self.path}/{ref}/listeners/{listener}"))

    def add_listener(self, ref: str, protocol: str, port: int, *, name: str | None = None,
                     default_pool: str | None = None, certificates: Names | None = None,
                     redirect_to_https_port: int | None = None, connection_limit: int | None = None,
                     connection_rate_limit: int | None = None, request_rate_limit: int | None = None,
                     idle_timeout_s: float | None = None) -> JSONObject:
        return as_object(self.c.post(f"{self.path}/{ref}/listeners", _body(
            protocol=protocol, port=port, name=name, default_pool=default_pool, certificates=certificates,
            redirect_to_https_port=redirect_to_https_port, connection_limit=connection_limit,
            connection_rate_limit=connection_rate_limit, request_rate_limit=request_rate_limit,
            idle_timeout_s=idle_timeout_s)))

    def update_listener(self, ref: str, listener: str, **changes: Any) -> JSONObject:
        return as_object(self.c.patch(f"{self.path}/{ref}/listeners/{listener}", _body(**changes)))

    def delete_listener(self, ref: str, listener: str) -> None:
        self.c.delete(f"{self.path}/{ref}/listeners/{listener}")

    def rules(self, ref: str, listener: str) -> JSONObjects:
        return self._list({}, f"{self.path}/{ref}/listeners/{listener}/rules")

    def add_rule(self, ref: str, listener: str, priority: int, action: str, *, host: str | None = None,
                 path_prefix: str | None = None, pool: str | None = None, redirect_url: str | None = None,
                 redirect_code: int | None = None, status_code: int | None = None, content_type: str | None = None,
                 body: str | None = None) -> JSONObject:
        """action: forward (pool), redirect (redirect_url, redirect_code) or fixed_response (status_code,
        content_type, body)."""
        return as_object(self.c.post(f"{self.path}/{ref}/listeners/{listener}/rules", _body(
            priority=priority, action=action, host=host, path_prefix=path_prefix, pool=pool,
            redirect_url=redirect_url, redirect_code=redirect_code, status_code=status_code,
            content_type=content_type, body=body)))

    def get_rule(self, ref: str, listener: str, rule_id: str) -> JSONObject:
        return as_object(self.c.get(f"{self.path}/{ref}/listeners/{listener}/rules/{rule_id}"))

    def delete_rule(self, ref: str, listener: str, rule_id: str) -> None:
        self.c.delete(f"{self.path}/{ref}/listeners/{listener}/rules/{rule_id}")

    # --- pools and members ---------------------------------------------------------------------------

    def pools(self, ref: str) -> JSONObjects:
        return self._list({}, f"{self.path}/{ref}/pools")

    def get_pool(self, ref: str, pool: str) -> JSONObject:
        return as_object(self.c.get(f"{self.path}/{ref}/pools/{pool}"))

    def add_pool(self, ref: str, name: str, *, protocol: str | None = None, algorithm: str | None = None,
                 sticky: str | None = None, proxy_protocol: bool | None = None,
                 health_check: dict[str, Any] | None = None) -> JSONObject:
        """health_check: {"protocol": "http", "path": "/health", "expected_codes": "200", "interval_s": 2, …}."""
        return as_object(self.c.post(f"{self.path}/{ref}/pools", _body(
            name=name, protocol=protocol, algorithm=algorithm, sticky=sticky, proxy_protocol=proxy_protocol,
            health_check=health_check)))

    def update_pool(self, ref: str, pool: str, **changes: Any) -> JSONObject:
        return as_object(self.c.patch(f"{self.path}/{ref}/pools/{pool}", _body(**changes)))

    def delete_pool(self, ref: str, pool: str) -> None:
        self.c.delete(f"{self.path}/{ref}/pools/{pool}")

    def members(self, ref: str, pool: str) -> JSONObjects:
        return self._list({}, f"{self.path}/{ref}/pools/{pool}/members")

    def add_member(self, ref: str, pool: str, port: int, *, network_interface: str | None = None,
                   address: str | None = None, weight: int | None = None,
                   admin_state: str | None = None) -> JSONObject:
        """An interface of the load balancer's VPC, or an address in the VPC."""
        return as_object(self.c.post(f"{self.path}/{ref}/pools/{pool}/members", _body(
            port=port, network_interface=network_interface, address=address, weight=weight,
            admin_state=admin_state)))

    def get_member(self, ref: str, pool: str, member_id: str) -> JSONObject:
        return as_object(self.c.get(f"{self.path}/{ref}/pools/{pool}/members/{member_id}"))

    def update_member(self, ref: str, pool: str, member_id: str, *, weight: int | None = None,
                      admin_state: str | None = None) -> JSONObject:
        return as_object(self.c.patch(f"{self.path}/{ref}/pools/{pool}/members/{member_id}",
                                      _body(weight=weight, admin_state=admin_state)))

    def drain_member(self, ref: str, pool: str, member_id: str) -> JSONObject:
        """No new connections to the member; existing (and sticky) sessions finish."""
        return self.update_member(ref, pool, member_id, admin_state="drain")

    def remove_member(self, ref: str, pool: str, member_id: str) -> None:
        self.c.delete(f"{self.path}/{ref}/pools/{pool}/members/{member_id}")

    # --- observed ------------------------------------------------------------------------------------

    def stats(self, ref: str) -> JSONObject:
        return as_object(self.c.get(f"{self.path}/{ref}/stats"))

    def logs(self, ref: str, *, since: str | None = None, status: int | None = None,
             listener_id: str | None = None, limit: int | None = None) -> JSONObjects:
        """Access log records, oldest first; `limit` caps how many are returned (default: all kept)."""
        records: JSONObjects = []
        for record in self.c.paginate(f"{self.path}/{ref}/logs",
                                      _body(since=since, status=status, listener_id=listener_id)):
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
        return records


class Certificates(Resource):
    path = "/v1/certificates"

    def list(self, **filters: Any) -> JSONObjects:
        return self._list(filters)

    def get(self, ref: str) -> JSONObject:
        return self._get(ref)

    def upload(self, chain_pem: str, key_pem: str, *, name: str | None = None) -> JSONObject:
        """The chain (leaf first) and the leaf's private key (PEM); the key is stored sealed, never returned."""
        return as_object(self.c.post(self.path, _body(chain_pem=chain_pem, key_pem=key_pem, name=name)))

    def delete(self, ref: str) -> None:
        self.c.delete(f"{self.path}/{ref}")


def attach(client: Client) -> None:
    client.load_balancers = LoadBalancers(client)
    client.certificates = Certificates(client)
