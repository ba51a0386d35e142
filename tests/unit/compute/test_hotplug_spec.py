"""Hot-plug ports in GuestSpec and on the QEMU command line, NICs in their QMP form (no QEMU needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hackboot.compute.driver import MAX_HOTPLUG_PORTS, GuestSpec, hotplug_port_id
from hackboot.compute.nic import UserNetNic
from hackboot.compute.qemu import RunPaths, build_argv

IID = "6f1f0a52-6a4e-4c1e-9d0e-3f1b8f0c2a11"
PATHS = RunPaths(Path("/var/lib/hackboot/instances") / IID)


def spec(**kw: object) -> GuestSpec:
    base: dict[str, object] = {"instance_id": IID, "name": "vm1", "vcpus": 1, "memory_mb": 256,
                               "disk_path": Path("/var/lib/hackboot/disks/vm1.qcow2")}
    base.update(kw)
    return GuestSpec(**base)  # type: ignore[arg-type]


def devices(av: list[str]) -> list[str]:
    return [av[i + 1] for i, a in enumerate(av[:-1]) if a == "-device"]


def test_hotplug_ports_become_root_ports_on_pcie0() -> None:
    assert not [d for d in devices(build_argv(spec(), PATHS)) if d.startswith("pcie-root-port")]
    ports = [d for d in devices(build_argv(spec(hotplug_ports=3), PATHS)) if d.startswith("pcie-root-port")]
    assert ports == [f"pcie-root-port,id={hotplug_port_id(i)},chassis={200 + i},bus=pcie.0" for i in range(3)]
    # chassis numbers must not collide with the GPUs' root ports (1, 2, ...)
    av = build_argv(spec(hotplug_ports=2, gpu_pci_addresses=["0000:3b:00.0"]), PATHS)
    chassis = [d.split("chassis=")[1].split(",")[0] for d in devices(av) if d.startswith("pcie-root-port")]
    assert len(set(chassis)) == len(chassis) == 3


@pytest.mark.parametrize("bad", [-1, MAX_HOTPLUG_PORTS + 1, True, "8", 2.0])
def test_hotplug_ports_are_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="hotplug_ports"):
        spec(hotplug_ports=bad).validate()


def test_hotplug_ports_need_q35() -> None:
    with pytest.raises(ValueError, match="q35"):
        spec(hotplug_ports=1, machine="pc").validate()
    spec(hotplug_ports=0, machine="pc").validate()


def test_hotplug_ports_round_trip_and_old_specs_default_to_none() -> None:
    s = spec(hotplug_ports=8)
    assert GuestSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    old = s.to_dict()
    del old["hotplug_ports"]  # a spec.json written before the field existed
    assert GuestSpec.from_dict(old).hotplug_ports == 0


def test_user_nic_qmp_form_matches_its_command_line() -> None:
    nic = UserNetNic(ssh_host_port=2222, mac="52:54:00:aa:bb:cc", extra_forwards=((8080, 80),))
    assert nic.netdev_options() == {"type": "user", "restrict": True, "hostfwd": [
        {"str": "tcp:127.0.0.1:2222-:22"}, {"str": "tcp:127.0.0.1:8080-:80"}]}
    assert nic.device_options() == {"driver": "virtio-net-pci", "mac": "52:54:00:aa:bb:cc"}
    netdev = nic.args(0)[1]
    for fwd in nic.netdev_options()["hostfwd"]:
        assert f"hostfwd={fwd['str']}" in netdev  # both forms forward the same ports, loopback only
    assert UserNetNic(ssh_host_port=2222, restrict=False).netdev_options()["restrict"] is False
    assert "mac" not in UserNetNic(ssh_host_port=2222).device_options()
