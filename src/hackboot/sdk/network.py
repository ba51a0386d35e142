"""SDK: VPCs, subnets, network interfaces, security groups (+ rules), floating IPs, NAT gateways, flow logs."""

from __future__ import annotations

from typing import Any

from hackboot.sdk.client import Client, Resource


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object from the API, got {type(value).__name__}")
    return value


def _body(**fields: Any) -> dict[str, Any]:
    """The fields that were given (None means "not given": the API refuses nulls it does not take)."""
    return {k: v for k, v in fields.items() if v is not None}


class _Group(Resource):
    """list/get/delete by id or name, shared by every network resource group."""

    def list(self, **filters: Any) -> list[dict[str, Any]]:
        return list(self.c.paginate(self.path, _body(**filters)))

    def get(self, ref: str) -> dict[str, Any]:
        return _object(self.c.get(f"{self.path}/{ref}"))

    def delete(self, ref: str) -> None:
        self.c.delete(f"{self.path}/{ref}")


class Vpcs(_Group):
    path = "/v1/vpcs"

    def create(self, name: str, cidr: str, *, region: str | None = None, description: str | None = None,
               internet_gateway: bool | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        return _object(self.c.post(self.path, _body(name=name, cidr=cidr, region=region, description=description,
                                                    internet_gateway=internet_gateway),
                                   idempotency_key=idempotency_key))

    def default(self, region: str | None = None) -> dict[str, Any]:
        """The project's default VPC of the region, made on first use."""
        return _object(self.c.post("/v1/default-vpc", _body(region=region)))

    def update(self, ref: str, *, name: str | None = None, description: str | None = None,
               internet_gateway: bool | None = None) -> dict[str, Any]:
        return _object(self.c.patch(f"{self.path}/{ref}", _body(name=name, description=description,
                                                                 internet_gateway=internet_gateway)))


class Subnets(_Group):
    path = "/v1/subnets"

    def create(self, vpc: str, cidr: str, *, zone: str | None = None, name: str | None = None,
               description: str | None = None, public: bool | None = None) -> dict[str, Any]:
        return _object(self.c.post(self.path, _body(vpc=vpc, cidr=cidr, zone=zone, name=name,
                                                    description=description, public=public)))

    def update(self, ref: str, *, name: str | None = None, description: str | None = None,
               public: bool | None = None) -> dict[str, Any]:
        return _object(self.c.patch(f"{self.path}/{ref}", _body(name=name, description=description, public=public)))


class NetworkInterfaces(_Group):
    path = "/v1/network-interfaces"

    def create(self, subnet: str | None = None, *, zone: str | None = None, region: str | None = None,
               name: str | None = None, description: str | None = None, private_ip: str | None = None,
               security_groups: list[str] | None = None, assign_public_ip: bool | None = None,
               idempotency_key: str | None = None) -> dict[str, Any]:
        """Without a subnet: the default VPC's subnet of `zone` (the default VPC is made on first use)."""
        return _object(self.c.post(self.path, _body(subnet=subnet, zone=zone, region=region, name=name,
                                                    description=description, private_ip=private_ip,
                                                    security_groups=security_groups,
                                                    assign_public_ip=assign_public_ip),
                                   idempotency_key=idempotency_key))

    def update(self, ref: str, *, name: str | None = None, description: str | None = None,
               security_groups: list[str] | None = None) -> dict[str, Any]:
        return _object(self.c.patch(f"{self.path}/{ref}", _body(name=name, description=description,
                                                                 security_groups=security_groups)))


class SecurityGroups(_Group):
    path = "/v1/security-groups"

    def create(self, vpc: str, name: str, *, description: str | None = None) -> dict[str, Any]:
        return _object(self.c.post(self.path, _body(vpc=vpc, name=name, description=description)))

    def update(self, ref: str, *, name: str | None = None, description: str | None = None) -> dict[str, Any]:
        return _object(self.c.patch(f"{self.path}/{ref}", _body(name=name, description=description)))

    def rules(self, ref: str) -> list[dict[str, Any]]:
        found = self.c.get(f"{self.path}/{ref}/rules")
        return [_object(r) for r in found] if isinstance(found, list) else []

    def add_rule(self, ref: str, direction: str, protocol: str, *, port_min: int | None = None,
                 port_max: int | None = None, cidr: str | None = None, remote_group: str | None = None,
                 description: str | None = None) -> dict[str, Any]:
        """Allow traffic: `cidr` or `remote_group` (a group of the same VPC) names the peer."""
        return _object(self.c.post(f"{self.path}/{ref}/rules", _body(
            direction=direction, protocol=protocol, port_min=port_min, port_max=port_max, cidr=cidr,
            remote_group=remote_group, description=description)))

    def delete_rule(self, ref: str, rule_id: str) -> None:
        self.c.delete(f"{self.path}/{ref}/rules/{rule_id}")


class FloatingIps(_Group):
    path = "/v1/floating-ips"

    def allocate(self, *, region: str | None = None, description: str | None = None) -> dict[str, Any]:
        return _object(self.c.post(self.path, _body(region=region, description=description)))

    def attach(self, ref: str, network_interface: str) -> dict[str, Any]:
        return _object(self.c.post(f"{self.path}/{ref}/attach", {"network_interface": network_interface}))

    def detach(self, ref: str) -> dict[str, Any]:
        return _object(self.c.post(f"{self.path}/{ref}/detach"))

    def update(self, ref: str, *, description: str | None = None) -> dict[str, Any]:
        return _object(self.c.patch(f"{self.path}/{ref}", _body(description=description)))

    def release(self, ref: str) -> None:
        self.delete(ref)


class NatGateways(_Group):
    path = "/v1/nat-gateways"

    def create(self, subnet: str, *, floating_ip: str | None = None, name: str | None = None) -> dict[str, Any]:
        return _object(self.c.post(self.path, _body(subnet=subnet, floating_ip=floating_ip, name=name)))


class FlowLogs(_Group):
    path = "/v1/flow-logs"

    def create(self, resource: str, *, traffic_type: str | None = None, name: str | None = None) -> dict[str, Any]:
        """Capture the flows of a VPC, a subnet or a network interface (its id)."""
        return _object(self.c.post(self.path, _body(resource=resource, traffic_type=traffic_type, name=name)))

    def records(self, ref: str, **filters: Any) -> list[dict[str, Any]]:
        """Filters: since, until (ISO 8601), action (ACCEPT/REJECT), interface_id, address, port, protocol."""
        return list(self.c.paginate(f"{self.path}/{ref}/records", _body(**filters)))


def attach(client: Client) -> None:
    client.vpcs = Vpcs(client)
    client.subnets = Subnets(client)
    client.network_interfaces = NetworkInterfaces(client)
    client.security_groups = SecurityGroups(client)
    client.floating_ips = FloatingIps(client)
    client.nat_gateways = NatGateways(client)
    client.flow_logs = FlowLogs(client)
