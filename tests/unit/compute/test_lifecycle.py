"""The instance state machine's rules, and small pure helpers."""

from __future__ import annotations

import pytest

from hackboot.cli.compute import ssh_argv
from hackboot.compute import lifecycle
from hackboot.compute.agent import mac_for, parse_gpus
from hackboot.core import errors


@pytest.mark.parametrize(("action", "status", "ok"), [
    ("stop", "ACTIVE", True), ("stop", "SHUTOFF", False), ("stop", "BUILDING", False),
    ("start", "SHUTOFF", True), ("start", "ERROR", True), ("start", "ACTIVE", False),
    ("reboot", "ACTIVE", True), ("reboot", "SHUTOFF", False), ("reboot_hard", "SHUTOFF", True),
    ("resize", "ACTIVE", True), ("resize", "SHUTOFF", True), ("resize", "ERROR", False),
    ("snapshot", "ACTIVE", True), ("snapshot", "BUILDING", False),
    ("delete", "BUILDING", True), ("delete", "ERROR", True), ("delete", "REBOOTING", True),
])
def test_transitions(action: str, status: str, ok: bool) -> None:
    if ok:
        assert lifecycle.check(action, "i-x", status, None).task
    else:
        with pytest.raises(errors.Conflict) as err:
            lifecycle.check(action, "i-x", status, None)
        assert err.value.code == "invalid_state"
        assert status in err.value.detail and "allowed only when" in err.value.detail


def test_busy_instances_refuse_everything_but_delete() -> None:
    with pytest.raises(errors.Conflict) as err:
        lifecycle.check("stop", "i-x", "ACTIVE", "rebooting")
    assert err.value.code == "task_in_progress"
    assert lifecycle.check("delete", "i-x", "ACTIVE", "rebooting").task == lifecycle.DELETING
    with pytest.raises(errors.Conflict):
        lifecycle.check("delete", "i-x", "ACTIVE", lifecycle.DELETING)
    with pytest.raises(errors.NotFound):
        lifecycle.check("start", "i-x", "DELETED", None)


def test_helpers() -> None:
    assert parse_gpus("A100=0000:81:00.0,0000:82:00.0; T4=0000:3b:00.0") == {
        "GPU:A100": ["0000:81:00.0", "0000:82:00.0"], "GPU:T4": ["0000:3b:00.0"]}
    mac = mac_for("i-abc")
    assert mac.startswith("52:54:00:") and mac == mac_for("i-abc") and mac != mac_for("i-abd")
    argv = ssh_argv({"id": "i-1", "ssh_port": 2222, "ssh_host": "127.0.0.1", "keypair_name": None},
                    None, ["hostname"])
    assert argv[:3] == ["ssh", "-p", "2222"] and argv[-2:] == ["root@127.0.0.1", "hostname"]
    assert "HostKeyAlias=i-1" in argv
