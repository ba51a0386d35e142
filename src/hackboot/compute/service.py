"""Compute rules: key pairs, server groups, instances; and the agent-facing half of the reconcile contract.

Architecture choice (see DESIGN.md): **the database is the desired state and agents poll it.**
The API validates a request, claims quota and placement, and writes the instance's desired state
(``desired_power``, sizes, ``task_state``, ``action_seq``) in one transaction, then answers 202.
Host agents (``agent.py``) call the functions in the second half of this module directly against
the same database (SQLite on one machine, PostgreSQL for many): they read the instances assigned
to their host, act, and write back what they observed. There is no message bus to lose or
duplicate messages; an agent that was down simply catches up on its next poll. Every agent write
that finishes a task is a compare-and-swap on ``action_seq``, so a late agent can never overwrite
a newer request (e.g. a delete issued while a reboot was running).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from hackboot.catalog import service as catalog_service
from hackboot.catalog.models import Flavor, Host, Region, Zone
from hackboot.compute import imagesource, lifecycle, scheduler
from hackboot.compute.models import (
    ACTIVE,
    BUILDING,
    DELETED,
    ERROR,
    RESIZING,
    SHUTOFF,
    Instance,
    KeyPair,
    ServerGroup,
)
from hackboot.core import errors, quotas, reconcile
from hackboot.core.auth import Principal
from hackboot.core.config import get_settings
from hackboot.core.db import session_scope, utcnow
from hackboot.core.ids import new_id
from hackboot.core.workers import Loop
from hackboot.events.service import emit
from hackboot.images import service as images_service

log = logging.getLogger("hackboot.compute")

GROUP_POLICIES = ("affinity", "anti-affinity")

# The reconcile channel of instances (core.reconcile; keys: host ids). After committing a change of
# desired state, `reconcile.notify(KIND, host_id)` wakes the host's agent at once (in this process,
# on this machine by datagram, elsewhere by PostgreSQL NOTIFY); its poll is the backstop.
KIND = "instance"


class Networking:
    """What the network service does for instances, registered by it (:func:`register_networking`):
    compute owns instances, the network service their interfaces, and the network service already
    depends on compute (its NIC backends), so compute reaches it through these hooks. Each works in the
    caller's transaction and adds the ids of what changed to `changed`; :meth:`notify` after the commit.
    Without a registration instances have no interfaces (their guests only the management NIC)."""

    def subnet_zone(self, s: Session, p: Principal, subnet: str) -> str:
        """The zone of one of the caller's subnets (the instance is placed there)."""
        raise NotImplementedError

    def create_primary(self, s: Session, p: Principal, inst: Instance, *, subnet: str | None,
                       security_groups: list[str] | None, private_ip: str | None, changed: set[str]) -> None:
        """The instance's primary interface (device 0), made with it, on `subnet` or the default VPC's."""
        raise NotImplementedError

    def release(self, s: Session, instance_id: str, actor: str, changed: set[str]) -> None:
        """The instance is deleted: its primary interface goes, the others are detached."""
        raise NotImplementedError

    def attach(self, s: Session, p: Principal, inst: Instance, interface: str, device_index: int | None,
               changed: set[str]) -> dict[str, Any]:
        raise NotImplementedError

    def detach(self, s: Session, p: Principal, inst: Instance, interface: str, changed: set[str]) -> dict[str, Any]:
        raise NotImplementedError

    def interfaces(self, s: Session, instance_id: str) -> list[dict[str, Any]]:
        """The instance's interfaces in device order (``id``, ``mac``, ``private_ip``, ``device_index``…)."""
        raise NotImplementedError

    def notify(self, changed: set[str]) -> None:
        raise NotImplementedError


_networking: Networking | None = None


def register_networking(hooks: Networking) -> None:
    global _networking
    _networking = hooks


def networking() -> Networking | None:
    return _networking


def _now_ts() -> float:
    return utcnow().timestamp()


# ==================================================================================================
# Key pairs
# ==================================================================================================

def _fingerprint(blob_b64: str) -> str:
    digest = hashlib.sha256(base64.b64decode(blob_b64)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def parse_public_key(text: str) -> tuple[str, str, str]:
    """(key type, normalised 'type base64 [comment]' line, fingerprint) or ValidationFailed."""
    line = text.strip()
    if "\n" in line or not line:
        raise errors.ValidationFailed("public_key must be one line in OpenSSH format ('ssh-ed25519 AAAA… comment')",
                                      errors=[{"loc": ["body", "public_key"], "msg": "not one OpenSSH key line"}])
    try:
        serialization.load_ssh_public_key(line.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise errors.ValidationFailed(
            f"public_key is not a valid OpenSSH public key: {exc}",
            errors=[{"loc": ["body", "public_key"], "msg": "invalid OpenSSH public key"}]) from None
    parts = line.split()
    key_type, blob = parts[0], parts[1]
    if key_type not in ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                        "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com"):
        raise errors.ValidationFailed(f"Unsupported key type {key_type}",
                                      errors=[{"loc": ["body", "public_key"], "msg": "unsupported key type"}])
    return key_type, line, _fingerprint(blob)


@dataclass
class CreatedKeyPair:
    keypair: KeyPair
    private_key: str | None  # only when generated here: shown once, never stored


def create_keypair(p: Principal, name: str, public_key: str | None) -> CreatedKeyPair:
    private_pem: str | None = None
    if public_key is None:
        key = ed25519.Ed25519PrivateKey.generate()
        private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption()).decode()
        public_key = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                   serialization.PublicFormat.OpenSSH).decode() + f" {name}"
    key_type, line, fingerprint = parse_public_key(public_key)
    try:
        with session_scope() as s:
            if s.scalar(select(KeyPair.id).where(KeyPair.project_id == p.project, KeyPair.name == name)):
                raise errors.Conflict(f"A key pair named '{name}' already exists in this project",
                                      code="already_exists")
            kp = KeyPair(id=new_id("kp"), project_id=p.project, name=name, key_type=key_type, public_key=line,
                         fingerprint=fingerprint, created_by=p.user_id)
            s.add(kp)
            s.flush()
            emit(s, "keypair.created", resource_type="keypair", resource_id=kp.id, project_id=p.project,
                 actor=p.user_id, data={"name": name, "fingerprint": fingerprint})
    except IntegrityError:
        raise errors.Conflict(f"A key pair named '{name}' already exists in this project",
                              code="already_exists") from None
    return CreatedKeyPair(kp, private_pem)


def get_keypair(s: Session, p: Principal, ref: str) -> KeyPair:
    kp = s.scalar(select(KeyPair).where(KeyPair.project_id == p.project,
                                        (KeyPair.id == ref) | (KeyPair.name == ref)))
    if kp is None:
        raise errors.NotFound(f"Key pair {ref} not found")
    return kp


def keypair_query(p: Principal):  # type: ignore[no-untyped-def]
    return select(KeyPair).where(KeyPair.project_id == p.project)


def delete_keypair(p: Principal, ref: str) -> None:
    with session_scope() as s:
        kp = get_keypair(s, p, ref)
        s.delete(kp)
        emit(s, "keypair.deleted", resource_type="keypair", resource_id=kp.id, project_id=p.project,
             actor=p.user_id, data={"name": kp.name})


# ==================================================================================================
# Server groups
# ==================================================================================================

def create_server_group(p: Principal, name: str, policy: str) -> ServerGroup:
    if policy not in GROUP_POLICIES:
        raise errors.ValidationFailed(f"policy must be one of {', '.join(GROUP_POLICIES)}",
                                      errors=[{"loc": ["body", "policy"], "msg": "invalid policy"}])
    with session_scope() as s:
        if s.scalar(select(ServerGroup.id).where(ServerGroup.project_id == p.project, ServerGroup.name == name)):
            raise errors.Conflict(f"A server group named '{name}' already exists", code="already_exists")
        group = ServerGroup(id=new_id("sg"), project_id=p.project, name=name, policy=policy)
        s.add(group)
        s.flush()
        emit(s, "server_group.created", resource_type="server_group", resource_id=group.id, project_id=p.project,
             actor=p.user_id, data={"name": name, "policy": policy})
        return group


def get_server_group(s: Session, p: Principal, ref: str) -> ServerGroup:
    group = s.scalar(select(ServerGroup).where(ServerGroup.project_id == p.project,
                                               (ServerGroup.id == ref) | (ServerGroup.name == ref)))
    if group is None:
        raise errors.NotFound(f"Server group {ref} not found")
    return group


def server_group_members(s: Session, group_id: str) -> list[Instance]:
    return list(s.scalars(select(Instance).where(Instance.server_group_id == group_id, Instance.status != DELETED)
                          .order_by(Instance.id)))


def server_group_query(p: Principal):  # type: ignore[no-untyped-def]
    return select(ServerGroup).where(ServerGroup.project_id == p.project)


def delete_server_group(p: Principal, ref: str) -> None:
    with session_scope() as s:
        group = get_server_group(s, p, ref)
        members = server_group_members(s, group.id)
        if members:
            raise errors.Conflict(f"Server group {group.name} still has {len(members)} instance(s): delete them first",
                                  code="in_use")
        s.delete(group)
        emit(s, "server_group.deleted", resource_type="server_group", resource_id=group.id, project_id=p.project,
             actor=p.user_id)


# ==================================================================================================
# Instances: the user-facing half
# ==================================================================================================

@dataclass
class CreateRequest:
    name: str
    flavor: str
    image: str
    keypair: str | None = None
    zone: str | None = None
    region: str | None = None
    user_data: str | None = None
    server_group: str | None = None
    weigher: str = "spread"
    subnet: str | None = None  # default: the default VPC's subnet of the zone it is placed in
    security_groups: list[str] | None = None  # default: the VPC's default group
    private_ip: str | None = None


def _flavor(s: Session, ref: str) -> Flavor:
    flavor = s.get(Flavor, ref) or s.get(Flavor, ref.upper())
    if flavor is None:
        raise errors.ValidationFailed(f"Flavor {ref} does not exist: see `hackboot flavor list`",
                                      errors=[{"loc": ["body", "flavor"], "msg": "unknown flavor"}])
    if not flavor.active:
        raise errors.ValidationFailed(f"Flavor {flavor.id} is no longer sold",
                                      errors=[{"loc": ["body", "flavor"], "msg": "inactive flavor"}])
    return flavor


def _check_zone(s: Session, zone: Zone) -> None:
    """Conflict region_not_operational (or zone_not_operational) unless the zone and its region accept new
    instances."""
    catalog_service.placeable_zone(s, zone.id)


def _zones(s: Session, zone: str | None, region: str | None) -> list[str]:
    if zone:
        z = s.get(Zone, zone)
        if z is None:
            raise errors.ValidationFailed(f"Zone {zone} does not exist",
                                          errors=[{"loc": ["body", "zone"], "msg": "unknown zone"}])
        if region and z.region_id != region:
            raise errors.ValidationFailed(f"Zone {zone} is not in region {region}",
                                          errors=[{"loc": ["body", "zone"], "msg": "zone not in region"}])
        _check_zone(s, z)
        return [z.id]
    settings = get_settings()
    if region:
        if s.get(Region, region) is None:
            raise errors.ValidationFailed(f"Region {region} does not exist",
                                          errors=[{"loc": ["body", "region"], "msg": "unknown region"}])
        candidates = list(s.scalars(select(Zone).where(Zone.region_id == region).order_by(Zone.id)))
    else:
        default = s.get(Zone, settings.zone)
        candidates = [default] if default is not None else list(
            s.scalars(select(Zone).where(Zone.region_id == settings.region).order_by(Zone.id)))
    usable, last_error = [], None
    for z in candidates:
        try:
            _check_zone(s, z)
            usable.append(z.id)
        except errors.ApiError as exc:
            last_error = exc
    if not usable:
        if last_error is not None:
            raise last_error
        raise errors.ValidationFailed("No zone to place the instance in: pass zone or region",
                                      errors=[{"loc": ["body", "zone"], "msg": "no zone"}])
    return usable


def _resources(flavor: Flavor) -> dict[str, int]:
    return scheduler.Request("", "", flavor.vcpus, flavor.memory_mb, flavor.disk_gb, flavor.gpu_model,
                             flavor.gpu_count).resources()


def create_instance(p: Principal, req: CreateRequest) -> Instance:
    from hackboot.compute import cloudinit

    if req.user_data is not None:
        try:
            cloudinit.validate_user_data(req.user_data)
        except ValueError as exc:
            raise errors.ValidationFailed(str(exc), errors=[{"loc": ["body", "user_data"], "msg": str(exc)}]) from None
    project = p.project
    instance_id = new_id("i")
    created_ts = _now_ts()
    with session_scope() as s:
        flavor = _flavor(s, req.flavor)
        image = imagesource.resolve(s, project, req.image)
        if image.status != "active":
            raise errors.Conflict(f"Image {image.name} is {image.status}, not active", code="image_not_active")
        if flavor.disk_gb < image.min_disk_gb:
            raise errors.ValidationFailed(
                f"Image {image.name} needs a {image.min_disk_gb} GB disk; flavor {flavor.id} has {flavor.disk_gb} GB",
                errors=[{"loc": ["body", "flavor"], "msg": "disk too small for image"}])
        if flavor.memory_mb < image.min_ram_mb:
            raise errors.ValidationFailed(
                f"Image {image.name} needs {image.min_ram_mb} MB of RAM; flavor {flavor.id} has {flavor.memory_mb} MB",
                errors=[{"loc": ["body", "flavor"], "msg": "memory too small for image"}])
        keypair = get_keypair(s, p, req.keypair) if req.keypair else None
        group = get_server_group(s, p, req.server_group) if req.server_group else None
        if s.scalar(select(Instance.id).where(Instance.project_id == project, Instance.name == req.name,
                                              Instance.status != DELETED)):
            raise errors.Conflict(f"An instance named '{req.name}' already exists in this project",
                                  code="already_exists")
        net = _networking
        changed: set[str] = set()
        zone_ref = req.zone
        if req.subnet is not None:
            if net is None:
                raise errors.ValidationFailed("This cloud has no VPC networking: subnet cannot be given",
                                              errors=[{"loc": ["body", "subnet"], "msg": "no networking"}])
            zone_ref = net.subnet_zone(s, p, req.subnet)  # the instance goes where its subnet is
            if req.zone is not None and req.zone != zone_ref:
                raise errors.ValidationFailed(f"Subnet {req.subnet} is in zone {zone_ref}, not {req.zone}",
                                              errors=[{"loc": ["body", "zone"], "msg": "not the subnet's zone"}])
        elif net is None and (req.security_groups or req.private_ip):
            raise errors.ValidationFailed("This cloud has no VPC networking: security_groups and private_ip "
                                          "cannot be given", errors=[{"loc": ["body"], "msg": "no networking"}])
        zone_ids = _zones(s, zone_ref, req.region)
        wanted = _resources(flavor)
        too_big = scheduler.largest_fit(s, zone_ids, wanted)
        if too_big is not None:
            raise errors.NoCapacity(f"Flavor {flavor.id} cannot be placed in {', '.join(zone_ids)}: {too_big}",
                                    code="flavor_too_large" if "largest host" in too_big else "no_capacity")
        quotas.claim(s, project, "instances", 1)
        quotas.claim(s, project, "vcpus", flavor.vcpus)
        quotas.claim(s, project, "ram_mb", flavor.memory_mb)
        quotas.claim(s, project, "gpus", flavor.gpu_count if flavor.gpu_model else 0)
        group_hosts: set[str] = set()
        if group is not None:
            group_hosts = {m.host_id for m in server_group_members(s, group.id) if m.host_id}
        placement = scheduler.place(s, scheduler.Request(
            consumer_id=instance_id, project_id=project, vcpus=flavor.vcpus, memory_mb=flavor.memory_mb,
            disk_gb=flavor.disk_gb, gpu_model=flavor.gpu_model, gpu_count=flavor.gpu_count, zone_ids=zone_ids,
            group_policy=group.policy if group else None, group_hosts=group_hosts, weigher=req.weigher))
        zone = s.get(Zone, placement.zone_id)
        inst = Instance(
            id=instance_id, project_id=project, name=req.name, flavor_id=flavor.id, image_id=image.id,
            keypair_id=keypair.id if keypair else None, keypair_name=keypair.name if keypair else None,
            region_id=zone.region_id if zone else "", zone_id=placement.zone_id, host_id=placement.host_id,
            server_group_id=group.id if group else None, user_data=req.user_data,
            vcpus=flavor.vcpus, memory_mb=flavor.memory_mb, disk_gb=flavor.disk_gb, gpu_model=flavor.gpu_model,
            gpu_count=flavor.gpu_count if flavor.gpu_model else 0, gpu_pci_addresses=placement.gpu_devices,
            desired_power="on", task_state=lifecycle.SPAWNING, action_seq=1, status=BUILDING,
            timings={"created": created_ts, "scheduled": _now_ts()}, created_by=p.user_id)
        s.add(inst)
        s.flush()
        if net is not None:  # in this transaction: no instance without its interface, nor the reverse
            net.create_primary(s, p, inst, subnet=req.subnet, security_groups=req.security_groups,
                               private_ip=req.private_ip, changed=changed)
        emit(s, "instance.created", resource_type="instance", resource_id=inst.id, project_id=project,
             actor=p.user_id, data={"name": inst.name, "flavor": flavor.id, "image": image.id,
                                    "host": placement.host_name, "zone": placement.zone_id})
    if net is not None:
        net.notify(changed)  # the VPC first: its host builds the port while the guest's disk is made
    reconcile.notify(KIND, inst.host_id)
    return inst


def instance_query(p: Principal, *, status: str | None = None, name: str | None = None, zone: str | None = None,
                   host: str | None = None) -> Select[Instance]:
    stmt = select(Instance).where(Instance.project_id == p.project)
    stmt = stmt.where(Instance.status == status.upper()) if status else stmt.where(Instance.status != DELETED)
    if name:
        stmt = stmt.where(Instance.name == name)
    if zone:
        stmt = stmt.where(Instance.zone_id == zone)
    if host:
        host_ids = select(Host.id).where((Host.id == host) | (Host.name == host))
        stmt = stmt.where(Instance.host_id.in_(host_ids))
    return stmt


def get_instance(s: Session, p: Principal, ref: str, *, lock: bool = False) -> Instance:
    """By id (any status, DELETED included) or by name (live instances only).

    `lock=True` (every read-modify-write) takes the row lock: on PostgreSQL's READ COMMITTED two
    writers (the API and an agent) would otherwise both read the old row and the later one would
    silently undo the other's change. (SQLite serialises writers anyway.)
    """
    inst = s.get(Instance, ref, with_for_update=lock or None)
    if inst is None or inst.project_id != p.project:
        stmt = select(Instance).where(Instance.project_id == p.project, Instance.name == ref,
                                      Instance.status != DELETED)
        inst = s.scalar(stmt.with_for_update() if lock else stmt)
    if inst is None:
        raise errors.NotFound(f"Instance {ref} not found")
    return inst


def _locked(s: Session, instance_id: str) -> Instance | None:
    """The instance row, locked until commit (agents' compare-and-swap writes)."""
    return s.get(Instance, instance_id, with_for_update=True)


def image_in_use(s: Session, image_id: str) -> bool:
    """True while a live instance boots from `image_id` (its disk is an overlay on the image file)."""
    return s.scalar(select(Instance.id).where(Instance.image_id == image_id, Instance.status != DELETED)
                    .limit(1)) is not None


images_service.register_in_use_check(image_in_use)


def host_names(s: Session, host_ids: set[str | None]) -> dict[str, str]:
    ids = [h for h in host_ids if h]
    if not ids:
        return {}
    return {h: n for h, n in s.execute(select(Host.id, Host.name).where(Host.id.in_(ids)))}


def _release_quota(s: Session, inst: Instance) -> None:
    quotas.release(s, inst.project_id, "instances", 1)
    quotas.release(s, inst.project_id, "vcpus", inst.vcpus)
    quotas.release(s, inst.project_id, "ram_mb", inst.memory_mb)
    quotas.release(s, inst.project_id, "gpus", inst.gpu_count)


def _mark_deleted(s: Session, inst: Instance, actor: str, reason: str = "") -> set[str]:
    """Returns the network changes to notify after the commit."""
    changed: set[str] = set()
    if _networking is not None:
        _networking.release(s, inst.id, actor, changed)
    scheduler.free(s, inst.id)
    _release_quota(s, inst)
    inst.status = DELETED
    inst.task_state = None
    inst.power_state = "missing"
    inst.ssh_port = None
    inst.deleted_at = utcnow()
    inst.action_seq += 1
    if reason:
        inst.status_reason = reason
    emit(s, "instance.deleted", resource_type="instance", resource_id=inst.id, project_id=inst.project_id,
         actor=actor, data={"name": inst.name})
    return changed


def _notify_network(changed: set[str]) -> None:
    if _networking is not None and changed:
        _networking.notify(changed)


def instance_action(p: Principal, ref: str, action: str, *, hard: bool = False, flavor: str | None = None,
                    snapshot_name: str | None = None) -> tuple[Instance, Any]:
    """Accept a stop/start/reboot/resize/snapshot; the agent carries it out. Returns (instance, extra)."""
    extra: Any = None
    with session_scope() as s:
        inst = get_instance(s, p, ref, lock=True)
        key = "reboot_hard" if action == "reboot" and hard else action
        t = lifecycle.check(key, inst.id, inst.status, inst.task_state, has_host=inst.host_id is not None)
        if action == "resize":
            if not flavor:
                raise errors.ValidationFailed("resize needs a flavor",
                                              errors=[{"loc": ["body", "flavor"], "msg": "required for resize"}])
            new = _flavor(s, flavor)
            if new.id == inst.flavor_id:
                raise errors.Conflict(f"Instance {inst.name} already has flavor {new.id}", code="invalid_state")
            if new.disk_gb < inst.disk_gb:
                raise errors.Conflict(
                    f"Cannot resize {inst.name} to {new.id}: disks only grow ({inst.disk_gb} GB -> {new.disk_gb} GB)",
                    code="disk_shrink")
            assert inst.host_id is not None
            for res, old_v, new_v in (("vcpus", inst.vcpus, new.vcpus), ("ram_mb", inst.memory_mb, new.memory_mb),
                                      ("gpus", inst.gpu_count, new.gpu_count if new.gpu_model else 0)):
                if new_v > old_v:
                    quotas.claim(s, inst.project_id, res, new_v - old_v)
                elif old_v > new_v:
                    quotas.release(s, inst.project_id, res, old_v - new_v)
            resize_from = {"flavor_id": inst.flavor_id, "vcpus": inst.vcpus, "memory_mb": inst.memory_mb,
                           "disk_gb": inst.disk_gb, "gpu_model": inst.gpu_model, "gpu_count": inst.gpu_count,
                           "gpu_pci_addresses": list(inst.gpu_pci_addresses or [])}
            inst.gpu_pci_addresses = scheduler.claim_resize(s, inst.id, inst.project_id, inst.host_id,
                                                            _resources(new))
            inst.resize_from = resize_from
            inst.previous_status = inst.status
            inst.flavor_id, inst.vcpus, inst.memory_mb, inst.disk_gb = new.id, new.vcpus, new.memory_mb, new.disk_gb
            inst.gpu_model, inst.gpu_count = new.gpu_model, new.gpu_count if new.gpu_model else 0
        elif action == "snapshot":
            image = imagesource.create_snapshot_record(s, inst.project_id, snapshot_name or f"{inst.name}-snapshot",
                                                       inst.id, base_image_id=inst.image_id, actor=p.user_id)
            inst.snapshot_image_id = image.id
            extra = image
        elif action == "stop":
            inst.desired_power = "off"
        elif action == "start":
            inst.desired_power = "on"
        elif action == "reboot":
            inst.desired_power = "on"
            inst.reboot_hard = hard
        if t.status is not None:
            inst.status = t.status
        inst.task_state = t.task
        inst.action_seq += 1
        if action in ("start", "reboot") or inst.status == ERROR:
            inst.status_reason = ""
        emit(s, f"instance.{action}", resource_type="instance", resource_id=inst.id, project_id=inst.project_id,
             actor=p.user_id, data={"hard": hard} if action == "reboot" else (
                 {"flavor": inst.flavor_id} if action == "resize" else {}))
        host_id = inst.host_id
    reconcile.notify(KIND, host_id)
    return inst, extra


def delete_instance(p: Principal, ref: str) -> Instance:
    changed: set[str] = set()
    with session_scope() as s:
        inst = get_instance(s, p, ref, lock=True)
        lifecycle.check("delete", inst.id, inst.status, inst.task_state)
        host = s.get(Host, inst.host_id) if inst.host_id else None
        if host is None:
            changed = _mark_deleted(s, inst, p.user_id)  # never placed: nothing to clean on any host
        elif host.status == "down":
            # The host's agent is gone: free the resources now; when the agent comes back it
            # destroys guests whose instance is DELETED (orphans) before doing anything else.
            changed = _mark_deleted(s, inst, p.user_id, reason=f"Deleted while host {host.name} was down")
        else:
            inst.task_state = lifecycle.DELETING
            inst.desired_power = "off"
            inst.action_seq += 1
            emit(s, "instance.delete", resource_type="instance", resource_id=inst.id, project_id=inst.project_id,
                 actor=p.user_id)
        host_id = inst.host_id
    _notify_network(changed)
    reconcile.notify(KIND, host_id)
    return inst


def _require_networking() -> Networking:
    if _networking is None:
        raise errors.Conflict("This cloud has no VPC networking", code="no_networking")
    return _networking


def instance_interfaces(p: Principal, ref: str) -> list[dict[str, Any]]:
    net = _require_networking()
    with session_scope(write=False) as s:
        inst = get_instance(s, p, ref)
        return net.interfaces(s, inst.id)


def attach_interface(p: Principal, ref: str, interface: str, device_index: int | None = None) -> dict[str, Any]:
    """Attach one of the project's interfaces to the instance; a running guest gets the NIC hot-plugged by
    its host's network agent (202: the interface's status says when)."""
    net = _require_networking()
    changed: set[str] = set()
    with session_scope() as s:
        inst = get_instance(s, p, ref, lock=True)
        if inst.status == DELETED or inst.task_state == lifecycle.DELETING:
            raise errors.Conflict(f"Instance {inst.name} is being deleted", code="instance_deleted")
        out = net.attach(s, p, inst, interface, device_index, changed)
        emit(s, "instance.interface_attached", resource_type="instance", resource_id=inst.id,
             project_id=inst.project_id, actor=p.user_id, data={"network_interface": out["id"]})
    net.notify(changed)
    return out


def detach_interface(p: Principal, ref: str, interface: str) -> dict[str, Any]:
    """Detach a secondary interface (the primary one goes with the instance); unplugged from a running guest."""
    net = _require_networking()
    changed: set[str] = set()
    with session_scope() as s:
        inst = get_instance(s, p, ref, lock=True)
        out = net.detach(s, p, inst, interface, changed)
        emit(s, "instance.interface_detached", resource_type="instance", resource_id=inst.id,
             project_id=inst.project_id, actor=p.user_id, data={"network_interface": out["id"]})
    net.notify(changed)
    return out


def guest_interfaces(instance_id: str) -> list[dict[str, Any]]:
    """Agent: the instance's interfaces in device order (none without networking)."""
    if _networking is None:
        return []
    with session_scope(write=False) as s:
        return _networking.interfaces(s, instance_id)


def console_log(p: Principal, ref: str, tail_bytes: int) -> tuple[Instance, str]:
    """The serial console tail, read from the host's run dir.

    The log lives with the guest, on its host. Hosts record their state dir in their facts; the
    control plane reads it when it shares the file system (one machine, or a shared mount).
    """
    with session_scope(write=False) as s:
        inst = get_instance(s, p, ref)
        host = s.get(Host, inst.host_id) if inst.host_id else None
    if host is None:
        return inst, ""
    state_dir = (host.facts or {}).get("state_dir")
    if not state_dir:
        raise errors.Conflict(f"Host {host.name} did not report where its console logs are", code="console_unavailable")
    path = Path(state_dir) / "instances" / inst.id / "console.log"
    if not path.exists():
        if not Path(state_dir).exists():
            raise errors.Conflict(f"The console of {inst.name} is on host {host.name}, not reachable from the API",
                                  code="console_unavailable")
        return inst, ""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - tail_bytes))
        data = f.read()
    return inst, data.decode("utf-8", errors="replace")


# ==================================================================================================
# The agent-facing half (hosts, assignments, observed state)
# ==================================================================================================

def register_host(name: str, zone_id: str, *, capacity: dict[str, int], reserved: dict[str, int],
                  ratios: dict[str, float], devices: dict[str, list[str]], facts: dict[str, Any]) -> str:
    """Register (or re-register) this agent's host through the catalog; returns the host id.

    The catalog keeps an administrator's allocation ratios across re-registrations; ratios the
    agent was explicitly configured with (anything but 1.0) are applied on top.
    """
    from hackboot.catalog import service as catalog

    gpus = [catalog.GpuSpec(model=rc.split(":", 1)[1], count=len(addrs), pci_addresses=list(addrs))
            for rc, addrs in devices.items()]
    view, _created = catalog.register_host(
        None, name=name, zone_id=zone_id, vcpus=capacity["VCPU"], memory_mb=capacity["MEMORY_MB"],
        disk_gb=capacity["DISK_GB"], gpus=gpus, facts=facts, reserved=reserved)
    custom = {rc: r for rc, r in ratios.items() if r != 1.0 and not rc.startswith("GPU:")}
    if custom:
        catalog.update_host(None, view.host.id, allocation_ratio=custom)
    return str(view.host.id)


def heartbeat(host_id: str, facts: dict[str, Any] | None = None) -> str:
    """Record a heartbeat (a host marked down for missing heartbeats comes back up). Returns its status."""
    from hackboot.catalog import service as catalog

    return str(catalog.heartbeat(None, host_id, facts).status)


@dataclass
class Work:
    """A snapshot of one instance, as an agent needs it to reconcile."""

    id: str
    name: str
    project_id: str
    status: str
    task_state: str | None
    action_seq: int
    desired_power: str
    reboot_hard: bool
    previous_status: str | None
    vcpus: int
    memory_mb: int
    disk_gb: int
    gpu_pci_addresses: list[str]
    image: imagesource.BootImage | None
    image_error: str
    public_keys: list[str]
    user_data: str | None
    ssh_port: int | None
    power_state: str
    snapshot_image_id: str | None
    timings: dict[str, Any] = field(default_factory=dict)


def pending(host_id: str) -> list[str]:
    """Ids of the instances on `host_id` with work to do (a task, or not built yet): the agent's cheap poll."""
    with session_scope(write=False) as s:
        return list(s.scalars(select(Instance.id).where(
            Instance.host_id == host_id, Instance.status != DELETED,
            (Instance.task_state.is_not(None)) | (Instance.status == BUILDING))))


def assigned(host_id: str, *, ids: list[str] | None = None, full: bool = True) -> list[Work]:
    """Live instances placed on `host_id` (one read transaction).

    `full=False` skips what only building needs (image, keys, user data): enough to compare
    observed and desired power states.
    """
    out = []
    with session_scope(write=False) as s:
        stmt = select(Instance).where(Instance.host_id == host_id, Instance.status != DELETED)
        if ids is not None:
            stmt = stmt.where(Instance.id.in_(ids))
        rows = list(s.scalars(stmt.order_by(Instance.id)))
        images: dict[str, tuple[imagesource.BootImage | None, str]] = {}
        keys = {kp.id: kp.public_key for kp in s.scalars(select(KeyPair).where(
            KeyPair.id.in_([r.keypair_id for r in rows if r.keypair_id])))} if rows and full else {}
        for r in rows:
            if not full:
                images[r.image_id] = (None, "not loaded")
            elif r.image_id not in images:
                try:
                    images[r.image_id] = (imagesource.by_id(s, r.image_id), "")
                except errors.ApiError as exc:
                    images[r.image_id] = (None, exc.detail)
            image, image_error = images[r.image_id]
            out.append(Work(
                id=r.id, name=r.name, project_id=r.project_id, status=r.status, task_state=r.task_state,
                action_seq=r.action_seq, desired_power=r.desired_power, reboot_hard=r.reboot_hard,
                previous_status=r.previous_status, vcpus=r.vcpus, memory_mb=r.memory_mb, disk_gb=r.disk_gb,
                gpu_pci_addresses=list(r.gpu_pci_addresses or []), image=image, image_error=image_error,
                public_keys=[keys[r.keypair_id]] if r.keypair_id in keys else [], user_data=r.user_data,
                ssh_port=r.ssh_port, power_state=r.power_state, snapshot_image_id=r.snapshot_image_id,
                timings=dict(r.timings or {})))
    return out


def known_instance_ids(ids: list[str]) -> dict[str, tuple[str, str | None]]:
    """{id: (status, host_id)} for these ids (the agent's orphan check)."""
    if not ids:
        return {}
    with session_scope(write=False) as s:
        return {i: (st, h) for i, st, h in s.execute(
            select(Instance.id, Instance.status, Instance.host_id).where(Instance.id.in_(ids)))}


def note_retrying(instance_id: str, reason: str) -> bool:
    """Say on a pending instance why its task keeps failing (the agent retries it with backoff).

    Only the reason changes: the task (e.g. DELETING) stays until it succeeds. False when the
    instance has no task any more (done meanwhile) or is gone.
    """
    with session_scope() as s:
        inst = _locked(s, instance_id)
        if inst is None or inst.status == DELETED or inst.task_state is None:
            return False
        inst.status_reason = reason[:500]
        return True


def finish_task(instance_id: str, action_seq: int, *, status: str, power_state: str, reason: str = "",
                desired_power: str | None = None, ssh_port: int | bool | None = False, accel: str | None = None,
                timings: dict[str, Any] | None = None, launched: bool = False, event: str | None = None) -> bool:
    """Close the task the agent worked on (compare-and-swap on action_seq). False if superseded."""
    with session_scope() as s:
        inst = _locked(s, instance_id)
        if inst is None or inst.action_seq != action_seq or inst.status == DELETED:
            return False
        prev = inst.status
        if inst.task_state == lifecycle.RESIZE and status == ERROR and inst.resize_from:
            reason = _revert_resize(s, inst) + reason
        inst.status, inst.power_state, inst.status_reason = status, power_state, reason[:500]
        inst.host_down_since = None
        inst.task_state = None
        inst.previous_status = None
        inst.resize_from = None
        if desired_power is not None:
            inst.desired_power = desired_power
        if ssh_port is not False:
            inst.ssh_port = ssh_port
            inst.ssh_host = "127.0.0.1" if ssh_port else None
        if accel is not None:
            inst.accel = accel
        if timings:
            inst.timings = {**(inst.timings or {}), **timings}
        if launched:
            inst.launched_at = utcnow()
        if prev != status or event:
            emit(s, event or f"instance.{status.lower()}", resource_type="instance", resource_id=inst.id,
                 project_id=inst.project_id, data={"status": status, "previous": prev, "reason": reason[:500]})
        return True


def _revert_resize(s: Session, inst: Instance) -> str:
    """A resize failed on the agent: go back to the sizes before it (quota, allocation with the same GPU
    devices, instance sizes) when they still fit; else the new ones stay. Returns the reason's prefix.

    The disk keeps its new size: the agent may have grown it before failing, and disks never shrink.
    """
    old = dict(inst.resize_from or {})
    new_flavor = inst.flavor_id
    old_gpus = old["gpu_count"] if old["gpu_model"] else 0
    wanted = scheduler.Request("", "", old["vcpus"], old["memory_mb"], inst.disk_gb, old["gpu_model"],
                               old_gpus).resources()
    devices = {scheduler.gpu_class(old["gpu_model"]): list(old["gpu_pci_addresses"])} if old_gpus else {}
    try:
        with s.begin_nested():
            for res, now_v, old_v in (("vcpus", inst.vcpus, old["vcpus"]), ("ram_mb", inst.memory_mb, old["memory_mb"]),
                                      ("gpus", inst.gpu_count, old_gpus)):
                if now_v > old_v:
                    quotas.release(s, inst.project_id, res, now_v - old_v)
                elif old_v > now_v:
                    quotas.claim(s, inst.project_id, res, old_v - now_v)
            why = scheduler.restore_allocation(s, inst.id, inst.project_id, inst.host_id or "", wanted, devices)
            if why is not None:
                raise errors.NoCapacity(why)
    except (errors.NoCapacity, errors.QuotaExceeded) as exc:
        return (f"Resize to {new_flavor} failed; {old['flavor_id']} could not be restored ({exc.detail}), "
                f"the instance keeps {new_flavor}: ")
    inst.flavor_id, inst.vcpus, inst.memory_mb = old["flavor_id"], old["vcpus"], old["memory_mb"]
    inst.gpu_model, inst.gpu_count, inst.gpu_pci_addresses = old["gpu_model"], old_gpus, list(old["gpu_pci_addresses"])
    disk = f" (the disk keeps {inst.disk_gb} GB)" if inst.disk_gb != old["disk_gb"] else ""
    return f"Resize to {new_flavor} failed, back on {old['flavor_id']}{disk}: "


def record_timing(instance_id: str, action_seq: int, **marks: float) -> None:
    with session_scope() as s:
        inst = _locked(s, instance_id)
        if inst is not None and inst.action_seq == action_seq:
            inst.timings = {**(inst.timings or {}), **marks}


def observed(instance_id: str, action_seq: int, *, power_state: str, status: str | None = None,
             reason: str | None = None, desired_power: str | None = None, ssh_port: int | bool | None = False) -> bool:
    """Record what the driver sees when no task runs (guest powered off, QEMU died…). CAS on action_seq."""
    with session_scope() as s:
        inst = _locked(s, instance_id)
        if inst is None or inst.action_seq != action_seq or inst.task_state is not None or inst.status == DELETED:
            return False
        changed = inst.power_state != power_state or (status is not None and inst.status != status)
        inst.power_state = power_state
        prev = inst.status
        if status is not None:
            inst.status = status
        if reason is not None:
            inst.status_reason = reason[:500]
            inst.host_down_since = None
        if desired_power is not None:
            inst.desired_power = desired_power
        if ssh_port is not False:
            inst.ssh_port = ssh_port
            inst.ssh_host = "127.0.0.1" if ssh_port else None
        if status is not None and prev != status:
            inst.action_seq += 1
            emit(s, f"instance.{status.lower()}", resource_type="instance", resource_id=inst.id,
                 project_id=inst.project_id, data={"status": status, "previous": prev, "reason": reason or ""})
        return changed


def finish_delete(instance_id: str, action_seq: int) -> bool:
    with session_scope() as s:
        inst = _locked(s, instance_id)
        if inst is None or inst.status == DELETED:
            return True
        if inst.action_seq != action_seq:
            return False
        changed = _mark_deleted(s, inst, "system")
    _notify_network(changed)
    return True


def finish_snapshot_task(instance_id: str, action_seq: int, *, status: str, power_state: str, reason: str = "",
                         ssh_port: int | bool | None = False) -> bool:
    return finish_task(instance_id, action_seq, status=status, power_state=power_state, reason=reason,
                       ssh_port=ssh_port, event="instance.snapshotted")


# ==================================================================================================
# Background loop of the control plane: reflect host health into instances
# ==================================================================================================

def reflect_host_health() -> None:
    """Instances on a host that is down say so in status_reason and carry `host_down_since`; both clear
    when the host is back (unless the agent reported a newer reason meanwhile, which clears the flag).

    A read finds what to change; the write transaction (SQLite's write lock) is taken only then.
    """
    with session_scope(write=False) as s:
        down = {h.id: (h.name, h.last_heartbeat_at) for h in s.scalars(select(Host).where(Host.status == "down"))}
        to_mark = list(s.execute(select(Instance.id, Instance.host_id, Instance.status_reason,
                                        Instance.host_down_since).where(
            Instance.host_id.in_(list(down)), Instance.status != DELETED))) if down else []
        to_clear = [i for i, h in s.execute(select(Instance.id, Instance.host_id).where(
            Instance.host_down_since.is_not(None), Instance.status != DELETED)) if h not in down]
    changes: dict[str, str | None] = {}
    for iid, host_id, reason, since in to_mark:
        if host_id is None:  # the query asked for hosts that are down: never None
            continue
        name, last = down[host_id]
        last_s = last.isoformat(timespec="seconds") if last else "never"
        wanted = f"Host {name} is down (no heartbeat since {last_s}); the instance's real state is unknown"
        if reason != wanted or since is None:
            changes[iid] = wanted
    for iid in to_clear:
        changes[iid] = None
    if not changes:
        return
    now = utcnow()
    with session_scope() as s:
        for iid, new_reason in changes.items():
            inst = _locked(s, iid)
            if inst is None or inst.status == DELETED:
                continue
            if new_reason is None:
                if inst.host_down_since is None:
                    continue  # the agent wrote a newer reason meanwhile
                inst.status_reason, inst.host_down_since = "", None
            else:
                inst.status_reason = new_reason
                inst.host_down_since = inst.host_down_since or now


def loops() -> list[Loop]:
    return [Loop("compute-host-health", reflect_host_health, 5.0)]


def capacity_summary(s: Session) -> list[dict[str, Any]]:
    """Per host: status, zone, capacity and usage per resource class (admin views, benchmarks)."""
    out = []
    for host in s.scalars(select(Host).order_by(Host.name)):
        out.append({"id": host.id, "name": host.name, "zone_id": host.zone_id, "status": host.status,
                    "resources": scheduler.host_usage(s, host.id),
                    "instances": s.scalar(select(func.count()).select_from(Instance).where(
                        Instance.host_id == host.id, Instance.status != DELETED))})
    return out


def dt_or_none(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


__all__ = ["ACTIVE", "BUILDING", "ERROR", "RESIZING", "SHUTOFF"]
