"""SDK: regions, zones, flavors, prices, hosts and the capacity report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from hackboot.sdk.client import Client, JSONObject, JSONObjects, Resource, as_object


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _seg(value: str) -> str:
    """One URL path segment (flavor ids may hold '+', skus ':')."""
    return quote(value, safe="")


class Regions(Resource):
    path = "/v1/regions"

    def list(self, *, status: str | None = None, country: str | None = None,
             jurisdiction: str | None = None) -> JSONObjects:
        return self._list({"status": status, "country": country, "jurisdiction": jurisdiction})

    def get(self, region_id: str) -> JSONObject:
        return self._get(region_id)

    def set_status(self, region_id: str, status: str | None = None,
                   reason: str | None = None) -> JSONObject:
        """Change a region's status (operational, maintenance, planned, retired): superusers."""
        return as_object(self.c.patch(f"{self.path}/{_seg(region_id)}",
                                      _drop_none({"status": status, "status_reason": reason})))


class Zones(Resource):
    path = "/v1/zones"

    def list(self, *, region: str | None = None, status: str | None = None) -> JSONObjects:
        return self._list({"region": region, "status": status})

    def get(self, zone_id: str) -> JSONObject:
        return self._get(zone_id)

    def set_status(self, zone_id: str, status: str | None = None, reason: str | None = None) -> JSONObject:
        return as_object(self.c.patch(f"{self.path}/{_seg(zone_id)}",
                                      _drop_none({"status": status, "status_reason": reason})))


class Flavors(Resource):
    path = "/v1/flavors"

    def list(self, *, family: str | None = None, gpu_model: str | None = None,
             gpu: bool | None = None, min_vcpus: int | None = None, min_memory_mb: int | None = None,
             min_disk_gb: int | None = None, include_inactive: bool = False) -> JSONObjects:
        return self._list({"family": family, "gpu_model": gpu_model, "gpu": gpu, "min_vcpus": min_vcpus,
                           "min_memory_mb": min_memory_mb, "min_disk_gb": min_disk_gb,
                           "include_inactive": include_inactive or None})

    def get(self, flavor_id: str) -> JSONObject:
        return as_object(self.c.get(f"{self.path}/{_seg(flavor_id)}"))

    def create(self, id: str, *, family: str, vcpus: int, memory_mb: int, disk_gb: int,
               gpu_model: str | None = None, gpu_count: int = 0, bandwidth_mbps: int | None = None,
               description: str = "", source: str = "", price_eur_hour: float | None = None) -> JSONObject:
        return as_object(self.c.post(self.path, _drop_none({
            "id": id, "family": family, "vcpus": vcpus, "memory_mb": memory_mb, "disk_gb": disk_gb,
            "gpu_model": gpu_model, "gpu_count": gpu_count, "bandwidth_mbps": bandwidth_mbps,
            "description": description, "source": source, "price_eur_hour": price_eur_hour})))

    def update(self, flavor_id: str, *, active: bool | None = None,
               description: str | None = None) -> JSONObject:
        return as_object(self.c.patch(f"{self.path}/{_seg(flavor_id)}",
                                      _drop_none({"active": active, "description": description})))

    def delete(self, flavor_id: str) -> JSONObject:
        """Returns {"id", "outcome": "deleted"|"deactivated", "detail"}."""
        return as_object(self.c.delete(f"{self.path}/{_seg(flavor_id)}"))


class Prices(Resource):
    path = "/v1/prices"

    def list(self, *, sku: str | None = None, kind: str | None = None,
             region: str | None = None) -> JSONObjects:
        return self._list({"sku": sku, "kind": kind, "region": region})

    def set(self, sku: str, amount_eur: float, *, region: str | None = None, unit: str | None = None,
            kind: str | None = None, description: str | None = None) -> JSONObject:
        """Create or update a list price (globally, or as an override for `region`): superusers."""
        return as_object(self.c.request("PUT", f"{self.path}/{_seg(sku)}", params=_drop_none({"region": region}),
                                        json=_drop_none({"amount_eur": amount_eur, "unit": unit, "kind": kind,
                                                         "description": description})))

    def delete(self, sku: str, *, region: str | None = None) -> None:
        self.c.request("DELETE", f"{self.path}/{_seg(sku)}", params=_drop_none({"region": region}))


class Hosts(Resource):
    path = "/v1/hosts"

    def list(self, *, zone: str | None = None, region: str | None = None,
             status: str | None = None, name: str | None = None) -> JSONObjects:
        return self._list({"zone": zone, "region": region, "status": status, "name": name})

    def get(self, host: str) -> JSONObject:
        """By id or name."""
        return as_object(self.c.get(f"{self.path}/{_seg(host)}"))

    def register(self, name: str, *, zone: str, vcpus: int, memory_mb: int, disk_gb: int,
                 gpus: Sequence[Mapping[str, Any]] | None = None, facts: dict[str, Any] | None = None,
                 agent_url: str = "", allocation_ratio: float | None = None,
                 reserved: dict[str, int] | None = None) -> JSONObject:
        """Register (or re-register by name) a host. gpus: [{"model", "count", "pci_addresses"}]."""
        return as_object(self.c.post(self.path, _drop_none({
            "name": name, "zone": zone, "vcpus": vcpus, "memory_mb": memory_mb, "disk_gb": disk_gb,
            "gpus": gpus or [], "facts": facts or {}, "agent_url": agent_url,
            "allocation_ratio": allocation_ratio, "reserved": reserved})))

    def update(self, host: str, *, status: str | None = None, status_reason: str | None = None,
               allocation_ratio: dict[str, float] | None = None,
               reserved: dict[str, int] | None = None) -> JSONObject:
        return as_object(self.c.patch(f"{self.path}/{_seg(host)}", _drop_none({
            "status": status, "status_reason": status_reason, "allocation_ratio": allocation_ratio,
            "reserved": reserved})))

    def disable(self, host: str, reason: str | None = None) -> JSONObject:
        return self.update(host, status="disabled", status_reason=reason)

    def enable(self, host: str) -> JSONObject:
        return self.update(host, status="up")

    def heartbeat(self, host: str, facts: dict[str, Any] | None = None) -> JSONObject:
        return as_object(self.c.post(f"{self.path}/{_seg(host)}/heartbeat", {"facts": facts or {}}))

    def delete(self, host: str) -> None:
        self.c.delete(f"{self.path}/{_seg(host)}")


class Capacity(Resource):
    path = "/v1/capacity"

    def report(self, *, region: str | None = None, zone: str | None = None) -> JSONObject:
        """{"total": scope, "regions": [scope with "zones": [scope]]}; a scope has "resources":
        [{resource_class, total, reserved, allocatable, used, free, schedulable, utilisation_pct}]."""
        return as_object(self.c.get(self.path, **_drop_none({"region": region, "zone": zone})))


def attach(client: Client) -> None:
    client.regions = Regions(client)
    client.zones = Zones(client)
    client.flavors = Flavors(client)
    client.prices = Prices(client)
    client.hosts = Hosts(client)
    client.capacity = Capacity(client)
