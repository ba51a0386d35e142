"""VPC tap NICs and the management NIC: their QEMU forms, and the hot-plug ports a guest start reserves."""

from __future__ import annotations

import pytest

from hackboot.compute.driver import GuestSpec
from hackboot.compute.nic import UserNetNic, nic_from_dict
from hackboot.compute.qemu import hotplug_port_args
from hackboot.network.tapnic import ManagementNic, TapNic, management_nic, reserve_hotplug_ports
from hackboot.volumes.storage import hotplug_port_args as volume_port_args


def test_tap_nic_is_plugged_over_qmp_with_its_fd_by_name() -> None:
    nic = TapNic(port_id="nic-01abc", mac="02:00:00:00:00:01")
    assert nic.netdev_options() == {"type": "tap", "fd": "hbtap-nic-01abc"}
    assert nic.device_options() == {"driver": "virtio-net-pci", "mac": "02:00:00:00:00:01"}
    with pytest.raises(ValueError, match="QMP"):
        nic.args(0)
    assert nic_from_dict(nic.to_dict()) == nic
    with pytest.raises(ValueError, match="MAC"):
        TapNic(port_id="nic-1", mac="02:00:00:00:00")
    with pytest.raises(ValueError, match="fd name"):
        TapNic(port_id="nic-1", mac="02:00:00:00:00:01", fd_name="bad name")


def test_management_nic_sits_behind_a_root_port_in_the_last_slot() -> None:
    user = UserNetNic(ssh_host_port=2222, mac="52:54:00:aa:bb:cc", extra_forwards=((8080, 80),))
    mgmt = management_nic(user)
    args = mgmt.args(0)
    assert args[:2] == ["-device", "pcie-root-port,id=hbmgmt0,chassis=190,bus=pcie.0,addr=0x1e"]
    assert args[2:4] == user.args(0)[:2], "the same restricted user-mode netdev and its loopback forwards"
    assert args[5] == user.args(0)[3] + ",bus=hbmgmt0"
    assert "restrict=on" in args[3]
    again = nic_from_dict(mgmt.to_dict())
    assert isinstance(again, ManagementNic) and again == mgmt and again.ssh_host_port == 2222


def test_reserved_hotplug_ports_absorb_the_volumes_root_ports() -> None:
    spec = GuestSpec(instance_id="i-abc", name="x", vcpus=1, memory_mb=128,
                     extra_args=["-smp", "1", *volume_port_args()])
    reserve_hotplug_ports(spec, 3)
    assert spec.extra_args == ["-smp", "1"]
    assert spec.hotplug_ports == 8 + 3
    assert hotplug_port_args(spec.hotplug_ports)[:len(volume_port_args())] == volume_port_args(), \
        "the driver adds the very ports the volumes plug into"
    bare = GuestSpec(instance_id="i-abd", name="x", vcpus=1, memory_mb=128, disk_path=None, hotplug_ports=2)
    reserve_hotplug_ports(bare, 3)
    assert bare.hotplug_ports == 5
