"""NIC backends: how a guest network interface is plugged into the host.

A backend contributes QEMU arguments for its interface (``args(index)``), the same
interface in QMP form for hot-plugging it into a running guest (``netdev_options()``,
``device_options()``; see ``ComputeDriver.attach_nic``) and may need host-side
plumbing before the guest starts (or the NIC is hot-plugged) and after it is
destroyed (or unplugged): ``prepare``/``release`` -- e.g. creating and deleting
a tap device.  Backends
are serialisable (``to_dict``/``nic_from_dict``) because the driver stores the
spec in the instance run dir so that a restarted agent can still release them.

Only :class:`UserNetNic` (QEMU user-mode networking, "slirp") exists today; a
tap/bridge backend will replace it for real tenant networks.
"""

from __future__ import annotations

import abc
import re
import socket
from dataclasses import dataclass
from typing import Any, ClassVar

MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
LOOPBACK = "127.0.0.1"


class NicBackend(abc.ABC):
    """One guest NIC.  Subclasses must be registered in ``_REGISTRY`` via ``kind``."""

    kind: ClassVar[str]

    @abc.abstractmethod
    def args(self, index: int) -> list[str]:
        """QEMU arguments for the ``index``-th NIC of a guest (ids must embed ``index``)."""

    def prepare(self, instance_id: str) -> None:  # noqa: B027 - optional hook
        """Host-side setup before QEMU starts.  Must be idempotent."""

    def release(self, instance_id: str) -> None:  # noqa: B027 - optional hook
        """Host-side teardown after the guest is destroyed.  Must be idempotent."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description, including ``{"kind": self.kind}``."""

    @classmethod
    @abc.abstractmethod
    def from_dict(cls, d: dict[str, Any]) -> NicBackend:
        """The backend :meth:`to_dict` described."""

    def netdev_options(self) -> dict[str, Any]:
        """QMP ``netdev_add`` arguments (all but ``id``) for hot-plugging this NIC.

        A backend that cannot be hot-plugged keeps this default, which says so.
        """
        raise NotImplementedError(f"{self.kind} NICs cannot be hot-plugged")

    def device_options(self) -> dict[str, Any]:
        """QMP ``device_add`` arguments (all but ``id``, ``netdev`` and ``bus``) for hot-plugging this NIC."""
        raise NotImplementedError(f"{self.kind} NICs cannot be hot-plugged")


@dataclass(frozen=True)
class UserNetNic(NicBackend):
    """QEMU user-mode networking with the guest's SSH port forwarded to the host.

    ``ssh_host_port`` on **127.0.0.1 only** is forwarded to the guest's port 22
    (``hostfwd=tcp:127.0.0.1:PORT-:22``); ``extra_forwards`` adds more
    ``(host_port, guest_port)`` TCP forwards, also bound to loopback.

    ``restrict`` (default True) turns on slirp's ``restrict=on``: the guest can
    still answer the forwarded connections and get DHCP, but cannot open
    connections of its own.  Without it, slirp NATs guest traffic through the
    host *and maps 10.0.2.2 to the host's 127.0.0.1*, i.e. any guest could reach
    every loopback-only service of the host (API, database, other guests' SSH
    forwards).  Set ``restrict=False`` only for trusted guests that need
    outbound access.
    """

    kind: ClassVar[str] = "user"

    ssh_host_port: int
    mac: str | None = None
    model: str = "virtio-net-pci"
    restrict: bool = True
    extra_forwards: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        ports = [self.ssh_host_port] + [h for h, _ in self.extra_forwards]
        for port in ports + [g for _, g in self.extra_forwards]:
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise ValueError(f"invalid port {port!r}")
        if len(set(ports)) != len(ports):
            raise ValueError("duplicate host port in forwards")
        if self.mac is not None and not MAC_RE.match(self.mac):
            raise ValueError(f"invalid MAC {self.mac!r} (lower-case aa:bb:cc:dd:ee:ff)")
        if not re.match(r"^[A-Za-z0-9_-]+$", self.model):
            raise ValueError(f"invalid NIC model {self.model!r}")

    def _hostfwds(self) -> list[str]:
        return [f"tcp:{LOOPBACK}:{host}-:{guest}" for host, guest in [(self.ssh_host_port, 22), *self.extra_forwards]]

    def args(self, index: int) -> list[str]:
        netdev = [f"user,id=net{index}", f"restrict={'on' if self.restrict else 'off'}"]
        netdev += [f"hostfwd={fwd}" for fwd in self._hostfwds()]
        device = f"{self.model},netdev=net{index},id=nic{index}"
        if self.mac:
            device += f",mac={self.mac}"
        return ["-netdev", ",".join(netdev), "-device", device]

    def netdev_options(self) -> dict[str, Any]:
        return {"type": "user", "restrict": self.restrict, "hostfwd": [{"str": f} for f in self._hostfwds()]}

    def device_options(self) -> dict[str, Any]:
        return {"driver": self.model, **({"mac": self.mac} if self.mac else {})}

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ssh_host_port": self.ssh_host_port,
            "mac": self.mac,
            "model": self.model,
            "restrict": self.restrict,
            "extra_forwards": [list(f) for f in self.extra_forwards],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UserNetNic:
        return cls(
            ssh_host_port=int(d["ssh_host_port"]),
            mac=d.get("mac"),
            model=d.get("model", "virtio-net-pci"),
            restrict=bool(d.get("restrict", True)),
            extra_forwards=tuple((int(h), int(g)) for h, g in d.get("extra_forwards", [])),
        )


_REGISTRY: dict[str, type[NicBackend]] = {UserNetNic.kind: UserNetNic}


def register_nic_backend(cls: type[NicBackend]) -> type[NicBackend]:
    """Class decorator for further backends (e.g. tap/bridge) so specs can be reloaded."""
    _REGISTRY[cls.kind] = cls
    return cls


def nic_from_dict(d: dict[str, Any]) -> NicBackend:
    try:
        cls = _REGISTRY[d["kind"]]
    except KeyError:
        raise ValueError(f"unknown NIC backend {d.get('kind')!r}") from None
    return cls.from_dict(d)


def find_free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` (127.0.0.1) right now.

    Inherently racy (someone may take it before QEMU binds it); QEMU then fails
    to start and spawn() raises SpawnError, so callers can retry with a new port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
