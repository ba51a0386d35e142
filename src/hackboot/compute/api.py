"""HTTP for compute: key pairs, server groups, instances (create, list, actions, console, snapshot)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response
from pydantic import Field, field_validator

from hackboot.compute import service
from hackboot.compute.models import STATUSES, Instance, KeyPair, ServerGroup
from hackboot.core.auth import Member, Viewer
from hackboot.core.db import session_scope
from hackboot.core.pagination import Page, Pagination, paginate
from hackboot.core.schemas import Body, Name, Out

router = APIRouter(prefix="/v1", tags=["compute"])
REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
Ref = Annotated[str, Field(max_length=63, pattern=REF_PATTERN)]
# Path parameters: an id or a name; anything else (NUL bytes, slashes…) is a 422, never a database error.
RefPath = Annotated[str, Path(max_length=63, pattern=REF_PATTERN, description="Id or name")]
FlavorRef = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,31}$")]
ZoneRef = Annotated[str, Field(max_length=24, pattern=r"^[A-Za-z0-9][A-Za-z0-9-]{0,23}$")]


# --- key pairs ---------------------------------------------------------------------------------------

class KeyPairIn(Body):
    name: Name
    public_key: str | None = Field(None, max_length=16384,
                                   description="OpenSSH public key to import; omit to generate an ed25519 pair")


class KeyPairOut(Out):
    id: str
    name: str
    key_type: str
    public_key: str
    fingerprint: str
    created_at: dt.datetime


class CreatedKeyPairOut(KeyPairOut):
    private_key: str | None = Field(None, description="Generated private key (OpenSSH format): shown once, save it")


@router.post("/keypairs", status_code=201, response_model=CreatedKeyPairOut, tags=["keypairs"])
def create_keypair(body: KeyPairIn, p: Member) -> CreatedKeyPairOut:
    """Generate an ed25519 key pair (the private key is returned once) or import a public key."""
    created = service.create_keypair(p, body.name, body.public_key)
    return CreatedKeyPairOut(**KeyPairOut.model_validate(created.keypair).model_dump(),
                             private_key=created.private_key)


@router.get("/keypairs", response_model=Page[KeyPairOut], tags=["keypairs"])
def list_keypairs(p: Viewer, page: Pagination, name: Annotated[Name | None, Query()] = None) -> Page[KeyPairOut]:
    with session_scope(write=False) as s:
        stmt = service.keypair_query(p)
        if name:
            stmt = stmt.where(KeyPair.name == name)
        rows, nxt = paginate(s, stmt, KeyPair.id, page)
        return Page[KeyPairOut](items=[KeyPairOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.get("/keypairs/{ref}", response_model=KeyPairOut, tags=["keypairs"])
def get_keypair(ref: RefPath, p: Viewer) -> KeyPairOut:
    with session_scope(write=False) as s:
        return KeyPairOut.model_validate(service.get_keypair(s, p, ref))


@router.delete("/keypairs/{ref}", status_code=204, tags=["keypairs"])
def delete_keypair(ref: RefPath, p: Member) -> Response:
    service.delete_keypair(p, ref)
    return Response(status_code=204)


# --- server groups -----------------------------------------------------------------------------------

class ServerGroupIn(Body):
    name: Name
    policy: Literal["affinity", "anti-affinity"] = "anti-affinity"


class ServerGroupOut(Out):
    id: str
    name: str
    policy: str
    members: list[str] = Field(default_factory=list)
    created_at: dt.datetime


def _group_out(s: Any, group: ServerGroup) -> ServerGroupOut:
    out = ServerGroupOut.model_validate(group)
    out.members = [m.id for m in service.server_group_members(s, group.id)]
    return out


@router.post("/server-groups", status_code=201, response_model=ServerGroupOut, tags=["server-groups"])
def create_server_group(body: ServerGroupIn, p: Member) -> ServerGroupOut:
    """A group whose instances are placed on one host (affinity) or on distinct hosts (anti-affinity)."""
    group = service.create_server_group(p, body.name, body.policy)
    return ServerGroupOut.model_validate(group)


@router.get("/server-groups", response_model=Page[ServerGroupOut], tags=["server-groups"])
def list_server_groups(p: Viewer, page: Pagination) -> Page[ServerGroupOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.server_group_query(p), ServerGroup.id, page)
        return Page[ServerGroupOut](items=[_group_out(s, r) for r in rows], next_cursor=nxt)


@router.get("/server-groups/{ref}", response_model=ServerGroupOut, tags=["server-groups"])
def get_server_group(ref: RefPath, p: Viewer) -> ServerGroupOut:
    with session_scope(write=False) as s:
        return _group_out(s, service.get_server_group(s, p, ref))


@router.delete("/server-groups/{ref}", status_code=204, tags=["server-groups"])
def delete_server_group(ref: RefPath, p: Member) -> Response:
    service.delete_server_group(p, ref)
    return Response(status_code=204)


# --- instances ---------------------------------------------------------------------------------------

class InstanceIn(Body):
    name: Name
    flavor: FlavorRef
    image: Ref
    keypair: Ref | None = Field(None, description="Key pair name or id, installed for root")
    zone: ZoneRef | None = None
    region: ZoneRef | None = None
    user_data: str | None = Field(None, max_length=64 * 1024 + 1,
                                  description="cloud-init user data (#cloud-config is validated)")
    server_group: Ref | None = None
    placement: Literal["spread", "pack"] = "spread"
    subnet: Ref | None = Field(None, description="Subnet of the primary interface (id or name; the instance is "
                                                 "placed in its zone). Default: the default VPC's subnet of the zone")
    security_groups: list[Ref] | None = Field(None, max_length=5, description="Default: the VPC's default group")
    private_ip: str | None = Field(None, max_length=15, pattern=r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$",
                                   description="IPv4 address in the subnet; default: its lowest free address")

    @field_validator("user_data")
    @classmethod
    def _no_nul(cls, v: str | None) -> str | None:
        if v is not None and "\x00" in v:
            raise ValueError("user_data must not contain NUL bytes")
        return v


class InstanceOut(Out):
    id: str
    name: str
    status: str
    task_state: str | None
    status_reason: str
    power_state: str
    flavor_id: str
    image_id: str
    keypair_name: str | None
    region_id: str
    zone_id: str
    host_id: str | None
    host_name: str | None = None
    server_group_id: str | None
    vcpus: int
    memory_mb: int
    disk_gb: int
    gpu_model: str | None
    gpu_count: int
    gpu_pci_addresses: list[str]
    ssh_host: str | None
    ssh_port: int | None
    accel: str | None
    timings: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime
    launched_at: dt.datetime | None
    deleted_at: dt.datetime | None


def _out(inst: Instance, names: dict[str, str]) -> InstanceOut:
    out = InstanceOut.model_validate(inst)
    out.host_name = names.get(inst.host_id or "")
    return out


def _one(inst: Instance) -> InstanceOut:
    with session_scope(write=False) as s:
        return _out(inst, service.host_names(s, {inst.host_id}))


@router.post("/instances", status_code=202, response_model=InstanceOut, tags=["instances"])
def create_instance(body: InstanceIn, p: Member, response: Response) -> InstanceOut:
    """Create a virtual machine: placed now, built by its host's agent (poll until ACTIVE)."""
    inst = service.create_instance(p, service.CreateRequest(
        name=body.name, flavor=body.flavor, image=body.image, keypair=body.keypair, zone=body.zone,
        region=body.region, user_data=body.user_data, server_group=body.server_group, weigher=body.placement,
        subnet=body.subnet, security_groups=body.security_groups,
        private_ip=body.private_ip))
    response.headers["Location"] = f"/v1/instances/{inst.id}"
    return _one(inst)


@router.get("/instances", response_model=Page[InstanceOut], tags=["instances"])
def list_instances(
    p: Viewer, page: Pagination,
    status: Annotated[Literal[STATUSES] | None, Query(description="Default: every status but DELETED")] = None,  # type: ignore[valid-type]
    name: Annotated[Name | None, Query()] = None,
    zone: Annotated[str | None, Query(max_length=24, pattern=r"^[A-Za-z0-9][A-Za-z0-9-]{0,23}$")] = None,
    host: Annotated[str | None, Query(max_length=63, pattern=REF_PATTERN, description="Host name or id")] = None,
) -> Page[InstanceOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.instance_query(p, status=status, name=name, zone=zone, host=host),
                             Instance.id, page)
        names = service.host_names(s, {r.host_id for r in rows})
        return Page[InstanceOut](items=[_out(r, names) for r in rows], next_cursor=nxt)


@router.get("/instances/{ref}", response_model=InstanceOut, tags=["instances"])
def get_instance(ref: RefPath, p: Viewer) -> InstanceOut:
    with session_scope(write=False) as s:
        inst = service.get_instance(s, p, ref)
        return _out(inst, service.host_names(s, {inst.host_id}))


class ActionIn(Body):
    action: Literal["stop", "start", "reboot", "resize"]
    hard: bool = Field(False, description="reboot: reset at once instead of an ACPI shutdown")
    flavor: FlavorRef | None = Field(None, description="resize: new flavor")


@router.post("/instances/{ref}/actions", status_code=202, response_model=InstanceOut, tags=["instances"])
def instance_action(ref: RefPath, body: ActionIn, p: Member) -> InstanceOut:
    """stop | start | reboot (hard) | resize (flavor). Answers 202; invalid transitions are 409."""
    inst, _ = service.instance_action(p, ref, body.action, hard=body.hard, flavor=body.flavor)
    return _one(inst)


@router.delete("/instances/{ref}", status_code=202, response_model=InstanceOut, tags=["instances"])
def delete_instance(ref: RefPath, p: Member) -> InstanceOut:
    """Delete: the agent removes the guest, its disks and ports; the allocation and quota are freed."""
    return _one(service.delete_instance(p, ref))


class InterfaceAttachIn(Body):
    network_interface: Ref = Field(description="Network interface id or name (free, in the instance's zone)")
    device_index: int | None = Field(None, ge=1, le=7, description="Default: the lowest free (0 is the primary)")


class InstanceInterfaceOut(Out):
    id: str
    name: str
    vpc_id: str
    subnet_id: str
    mac: str
    private_ip: str
    device_index: int | None
    status: str
    security_groups: list[str]
    public_ip: str | None


@router.get("/instances/{ref}/network-interfaces", response_model=list[InstanceInterfaceOut], tags=["instances"])
def list_instance_interfaces(ref: RefPath, p: Viewer) -> list[InstanceInterfaceOut]:
    """The instance's network interfaces in device order (0: the primary one, made with it)."""
    return [InstanceInterfaceOut.model_validate(n) for n in service.instance_interfaces(p, ref)]


@router.post("/instances/{ref}/network-interfaces", status_code=202, response_model=InstanceInterfaceOut,
             tags=["instances"])
def attach_instance_interface(ref: RefPath, body: InterfaceAttachIn, p: Member) -> InstanceInterfaceOut:
    """Attach a network interface; a running guest gets the NIC hot-plugged (202: see the interface's status)."""
    return InstanceInterfaceOut.model_validate(
        service.attach_interface(p, ref, body.network_interface, body.device_index))


@router.delete("/instances/{ref}/network-interfaces/{interface}", status_code=202,
               response_model=InstanceInterfaceOut, tags=["instances"])
def detach_instance_interface(ref: RefPath, interface: RefPath, p: Member) -> InstanceInterfaceOut:
    """Detach a secondary interface (unplugged from a running guest); the primary one goes with the instance."""
    return InstanceInterfaceOut.model_validate(service.detach_interface(p, ref, interface))


class ConsoleOut(Body):
    instance_id: str
    output: str


@router.get("/instances/{ref}/console", response_model=ConsoleOut, tags=["instances"])
def console(ref: RefPath, p: Viewer,
            tail_bytes: Annotated[int, Query(ge=1, le=1024 * 1024)] = 64 * 1024) -> ConsoleOut:
    """The tail of the serial console log."""
    inst, text = service.console_log(p, ref, tail_bytes)
    return ConsoleOut(instance_id=inst.id, output=text)


class SnapshotIn(Body):
    name: Name | None = None


@router.post("/instances/{ref}/snapshot", status_code=202, tags=["instances"])
def snapshot(ref: RefPath, p: Member, body: SnapshotIn | None = None) -> dict[str, Any]:
    """Save the instance's disk as a new private image (status `saving` until the agent finishes)."""
    _, image = service.instance_action(p, ref, "snapshot", snapshot_name=body.name if body else None)
    fields = ("id", "name", "status", "disk_format", "visibility", "project_id", "source_instance_id",
              "created_at")
    return {f: getattr(image, f) for f in fields}
