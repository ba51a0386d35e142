"""Guest NICs on VPC ports: a tap in the VPC router's namespace, handed to QEMU as a file descriptor.

QEMU runs unprivileged, in the root network namespace, and may not open devices: it cannot create or
attach a tap, and the tap lives in another namespace anyway. The network agent opens the port's tap
(:meth:`NetworkDriver.open_tap`: ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``; QEMU sees the virtio-net
header flag on the descriptor and uses it) and sends the descriptor over the QMP socket (``getfd``,
SCM_RIGHTS), the way disks are handed over; a ``netdev_add`` of type ``tap`` then takes it by name and
``device_add`` plugs a virtio NIC into one of the guest's hot-plug ports (:meth:`ComputeDriver.attach_nic`).

At a guest start this happens while the vCPUs are still stopped (the spawn hook asks for a paused start),
so the guest finds its VPC NICs at boot like any NIC; a running guest gets one hot-plugged the same way.
A :class:`TapNic` is therefore never on the QEMU command line (its ``args`` refuses): a descriptor
opened by the agent cannot be inherited through the driver's spawn, which passes only its own.
The guest's user-mode NIC stays, as a :class:`ManagementNic` the guest enumerates after its VPC NICs.

The agent keeps no descriptor: QEMU holds the only one, so the tap loses its carrier when QEMU exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

from hackboot.compute.nic import MAC_RE, NicBackend, UserNetNic, register_nic_backend

log = logging.getLogger("hackboot.network.tapnic")

SPARE_HOTPLUG_PORTS = 2  # free ports a running guest keeps for NICs attached later
MANAGEMENT_SLOT = "0x1e"  # the last free slot of q35's root bus (0x1f is the chipset's)
MANAGEMENT_CHASSIS = 190  # apart from the hot-plug ports' (200 and up) and GPUs' (1 and up)
_ROOT_PORT_RE = re.compile(r"^pcie-root-port,id=(hbvp\d+),chassis=\d+,bus=pcie\.0$")
_paused_by_us: set[str] = set()
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def instance_lock(instance_id: str) -> threading.Lock:
    """Held while a guest's VPC NICs are looked at and changed (spawn hook and the agent's sync)."""
    with _locks_guard:
        return _locks.setdefault(instance_id, threading.Lock())


def fd_name(port_id: str) -> str:
    return "hbtap-" + re.sub(r"[^A-Za-z0-9_-]", "", port_id)[-40:]


@register_nic_backend
@dataclass(frozen=True)
class TapNic(NicBackend):
    """A virtio NIC on the tap of VPC port `port_id`, whose fd QEMU knows as `fd_name` (QMP ``getfd``)."""

    kind: ClassVar[str] = "vpc-tap"

    port_id: str
    mac: str
    fd_name: str = ""
    model: str = "virtio-net-pci"

    def __post_init__(self) -> None:
        if not MAC_RE.match(self.mac):
            raise ValueError(f"invalid MAC {self.mac!r} (lower-case aa:bb:cc:dd:ee:ff)")
        if not re.match(r"^[A-Za-z0-9_-]+$", self.model):
            raise ValueError(f"invalid NIC model {self.model!r}")
        if not self.fd_name:
            object.__setattr__(self, "fd_name", fd_name(self.port_id))
        if not re.match(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$", self.fd_name):
            raise ValueError(f"invalid fd name {self.fd_name!r}")

    def args(self, index: int) -> list[str]:
        raise ValueError("a VPC tap NIC is plugged over QMP once QEMU runs (attach_nic), not on its command line")

    def netdev_options(self) -> dict[str, Any]:
        # No vnet_hdr option: with fd= QEMU refuses it and reads the flag from the descriptor (IFF_VNET_HDR).
        return {"type": "tap", "fd": self.fd_name}

    def device_options(self) -> dict[str, Any]:
        return {"driver": self.model, "mac": self.mac}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "port_id": self.port_id, "mac": self.mac, "fd_name": self.fd_name,
                "model": self.model}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TapNic:
        return cls(port_id=str(d["port_id"]), mac=str(d["mac"]), fd_name=str(d.get("fd_name", "")),
                   model=str(d.get("model", "virtio-net-pci")))


@register_nic_backend
@dataclass(frozen=True)
class ManagementNic(UserNetNic):
    """The restricted user-mode NIC (``hackboot instance ssh``'s forward) of a guest on a VPC, kept out of
    the VPC NICs' way: behind a PCIe root port in the root bus's last slot, so the guest enumerates it
    after them. Its VPC NIC is then its first NIC (``eth0``), the one its boot configures first and whose
    router becomes the default route; the management NIC's DHCP comes later and finds a default route
    in place (an image that sets routes per NIC should ignore this one's router)."""

    kind: ClassVar[str] = "vpc-mgmt"

    def args(self, index: int) -> list[str]:
        port = f"hbmgmt{index}"
        _, netdev, _, device = super().args(index)
        return ["-device", f"pcie-root-port,id={port},chassis={MANAGEMENT_CHASSIS + index},bus=pcie.0,"
                           f"addr={MANAGEMENT_SLOT}",
                "-netdev", netdev, "-device", f"{device},bus={port}"]


def management_nic(nic: UserNetNic) -> ManagementNic:
    return ManagementNic(ssh_host_port=nic.ssh_host_port, mac=nic.mac, model=nic.model, restrict=nic.restrict,
                         extra_forwards=nic.extra_forwards)


def send_fd(compute_driver: Any, instance_id: str, name: str, fd: int) -> None:
    """Give QEMU a descriptor it will know as `name` (the compute driver contract's `pass_fd`)."""
    compute_driver.pass_fd(instance_id, name, fd)


def plug(compute_driver: Any, network_driver: Any, instance_id: str, port_id: str, mac: str) -> str:
    """Hot-plug the tap of local port `port_id` into the guest; returns the compute driver's NIC id."""
    nic = TapNic(port_id=port_id, mac=mac)
    fd = network_driver.open_tap(port_id)
    try:
        send_fd(compute_driver, instance_id, nic.fd_name, fd)
        try:
            return str(compute_driver.attach_nic(instance_id, nic))
        except BaseException:
            with contextlib.suppress(Exception):
                compute_driver.qmp(instance_id, "closefd", {"fdname": nic.fd_name})
            raise
    finally:
        os.close(fd)  # QEMU has its own copy now


def plugged(compute_driver: Any, instance_id: str) -> dict[str, str]:
    """Port id → NIC id of the VPC NICs the guest has now."""
    try:
        nics = compute_driver.nics(instance_id)
    except Exception:
        return {}
    return {n.port_id: nic_id for nic_id, n in nics.items() if isinstance(n, TapNic)}


def unplug(compute_driver: Any, instance_id: str, port_id: str, timeout: float = 30.0) -> bool:
    nic_id = plugged(compute_driver, instance_id).get(port_id)
    if nic_id is None:
        return False
    compute_driver.detach_nic(instance_id, nic_id, timeout=timeout)
    return True


# ---------------------------------------------------------------------------------------------- spawn hooks

def _local_ports(instance_id: str) -> list[tuple[str, str]]:
    """(port id, MAC) of the instance's interfaces, in device order."""
    from hackboot.core.db import session_scope
    from hackboot.network import service

    with session_scope(write=False) as s:
        return [(n.id, n.mac) for n in service.interfaces_of_instance(s, instance_id)]


def reserve_hotplug_ports(spec: Any, count: int) -> None:
    """Give the guest `count` more hot-plug ports (NICs take them from the top).

    One set for everyone, which the compute driver names hbvp0…: root ports added by hand with those
    very names (the volumes' hook adds hbvp0…7 for its disks, from the bottom) become part of the
    count instead of being added twice (QEMU refuses a duplicate id)."""
    from hackboot.compute.driver import MAX_HOTPLUG_PORTS

    extra, kept = list(spec.extra_args), []
    manual = i = 0
    while i < len(extra):
        if extra[i] == "-device" and i + 1 < len(extra) and _ROOT_PORT_RE.match(extra[i + 1]):
            manual += 1
            i += 2
            continue
        kept.append(extra[i])
        i += 1
    spec.extra_args = kept
    spec.hotplug_ports = min(MAX_HOTPLUG_PORTS, max(spec.hotplug_ports, manual) + count)


def prepare_spec(spec: Any) -> Any:
    """Before the guest starts: hot-plug ports for its VPC NICs (and spares), the user-mode NIC as a
    management NIC behind them, and a paused start."""
    from hackboot.network.agent import local_network_agent

    if local_network_agent() is None:
        return spec
    try:
        ports = _local_ports(spec.instance_id)
    except Exception:
        log.exception("network: cannot list the interfaces of %s", spec.instance_id)
        return spec
    if not ports or spec.machine != "q35":
        return spec
    reserve_hotplug_ports(spec, len(ports) + SPARE_HOTPLUG_PORTS)
    spec.nics = [management_nic(n) if type(n) is UserNetNic else n for n in spec.nics]
    if not spec.start_paused:
        spec.start_paused = True
        _paused_by_us.add(spec.instance_id)
    return spec


def after_spawn(compute_driver: Any, spec: Any) -> None:
    """Right after the guest's QEMU started (vCPUs stopped): plug its VPC NICs, then let it run."""
    from hackboot.network.agent import local_network_agent

    iid = spec.instance_id
    try:
        agent = local_network_agent()
        if agent is None:
            return
        ports = _local_ports(iid)
        if not ports:
            return
        agent.wait_for_ports([p for p, _ in ports], agent.options.port_wait)
        with instance_lock(iid):
            have = plugged(compute_driver, iid)
            for port_id, mac in ports:
                if port_id not in have:
                    plug(compute_driver, agent.driver, iid, port_id, mac)
    finally:
        if iid in _paused_by_us:
            _paused_by_us.discard(iid)
            compute_driver.resume(iid)
