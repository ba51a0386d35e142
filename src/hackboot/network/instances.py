"""Instances' interfaces: what this service does for compute, through the hooks compute offers.

Compute owns instances and this service their interfaces; this service already depends on compute (its
guest NIC backends), so compute calls in through :class:`hackboot.compute.service.Networking`, which
:func:`register` fills (at the import of ``network.service``). Every hook works in compute's transaction:
an instance is made with its primary interface and deleted with it, or neither.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hackboot.compute.models import DELETED, Instance
from hackboot.compute.service import Networking, register_networking
from hackboot.core import errors
from hackboot.core.auth import Principal
from hackboot.core.db import session_scope
from hackboot.core.reconcile import notify
from hackboot.network import service
from hackboot.network.models import NetworkInterface


def _label(name: str) -> str:
    """The instance's name as the interface's, which DNS answers for (``<name>.<vpc>.internal``)."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63]


def _ref(inst: Instance) -> service.InstanceRef:
    return service.InstanceRef(inst.id, inst.project_id, inst.zone_id, inst.host_id)


def _out(s: Session, nic: NetworkInterface) -> dict[str, Any]:
    return {"id": nic.id, "name": nic.name, "vpc_id": nic.vpc_id, "subnet_id": nic.subnet_id, "mac": nic.mac,
            "private_ip": nic.private_ip, "device_index": nic.device_index, "status": nic.status,
            "security_groups": service.groups_of(s, [nic.id]).get(nic.id, []),
            "public_ip": (f.address if (f := service.public_ips_of(s, [nic.id]).get(nic.id)) else None)}


class InstanceNetworking(Networking):
    def subnet_zone(self, s: Session, p: Principal, subnet: str) -> str:
        try:
            return service.get_subnet(s, p, subnet).zone_id
        except errors.NotFound as exc:
            raise errors.ValidationFailed(exc.detail, errors=[{"loc": ["body", "subnet"], "msg": exc.detail}]) from None

    def create_primary(self, s: Session, p: Principal, inst: Instance, *, subnet: str | None,
                       security_groups: list[str] | None, private_ip: str | None, changed: set[str]) -> None:
        req = service.InterfaceRequest(subnet=subnet, zone=None if subnet else inst.zone_id, name=_label(inst.name),
                                       description=f"Primary interface of instance {inst.name}",
                                       private_ip=private_ip, security_groups=security_groups)
        nic = service.create_interface_in(s, p, req, changed)
        service.attach_interface(s, p, nic.id, _ref(inst), device_index=0, changed=changed)

    def release(self, s: Session, instance_id: str, actor: str, changed: set[str]) -> None:
        service.release_instance(s, instance_id, actor, changed)

    def attach(self, s: Session, p: Principal, inst: Instance, interface: str, device_index: int | None,
               changed: set[str]) -> dict[str, Any]:
        if device_index == 0:
            raise errors.ValidationFailed("Device 0 is the instance's primary interface, made with it",
                                          errors=[{"loc": ["body", "device_index"], "msg": "reserved"}])
        nic = service.attach_interface(s, p, interface, _ref(inst), device_index, changed)
        return _out(s, nic)

    def detach(self, s: Session, p: Principal, inst: Instance, interface: str, changed: set[str]) -> dict[str, Any]:
        nic = service.get_interface(s, p, interface)
        if nic.instance_id != inst.id:
            raise errors.NotFound(f"Network interface {interface} is not attached to instance {inst.name}")
        if nic.device_index == 0:
            raise errors.Conflict(f"Network interface {nic.id} is the primary interface of {inst.name}: it goes "
                                  "with the instance", code="primary_interface")
        return _out(s, service.detach_interface(s, p, nic.id, changed))

    def interfaces(self, s: Session, instance_id: str) -> list[dict[str, Any]]:
        return [_out(s, n) for n in service.interfaces_of_instance(s, instance_id)]

    def notify(self, changed: set[str]) -> None:
        for vpc_id in sorted(changed):
            notify(service.KIND, vpc_id)


def release_deleted_instances() -> int:
    """Backstop: interfaces still attached to deleted instances (deleted by a process in which this service
    had not registered its hooks, e.g. an agent without the network extension) are released."""
    changed: set[str] = set()
    with session_scope() as s:
        ids = sorted({str(i) for i in s.scalars(select(NetworkInterface.instance_id).where(
            NetworkInterface.instance_id.in_(select(Instance.id).where(Instance.status == DELETED))))})
        for instance_id in ids:
            service.release_instance(s, instance_id, "system", changed)
    InstanceNetworking().notify(changed)
    return len(ids)


def register() -> None:
    register_networking(InstanceNetworking())
