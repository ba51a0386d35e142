"""Services announce changes on the reconcile channel their agents listen to (core.reconcile's kinds)."""

from __future__ import annotations


def test_each_service_notifies_the_kind_its_reconciler_listens_to() -> None:
    from hackboot.compute import agent as compute_agent
    from hackboot.compute import service as compute
    from hackboot.volumes import agent as volume_agent
    from hackboot.volumes import service as volumes

    assert compute_agent.InstanceReconciler.kind == compute.KIND
    assert volume_agent.VolumeAgent.kind == volumes.KIND
