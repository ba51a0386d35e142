"""The instance state machine: which user actions are allowed in which state, and what they set.

``status`` is what the user sees (observed by the agent), ``task_state`` the operation in
flight (set by the API, cleared by the agent when done). An action is accepted only from the
states listed here and only when no other task runs (delete excepted: it always wins); anything
else is a 409 ``invalid_state`` that names the allowed states.

::

    BUILDING --agent: guest running--> ACTIVE
    BUILDING --agent: failure--------> ERROR
    ACTIVE   --stop------------------> SHUTOFF    (task powering_off)
    SHUTOFF  --start-----------------> ACTIVE     (task powering_on)
    ACTIVE   --reboot----------------> REBOOTING -> ACTIVE   (task rebooting / rebooting_hard)
    ACTIVE|SHUTOFF --resize----------> RESIZING  -> ACTIVE|SHUTOFF (task resizing)
    ACTIVE   --guest powers off / QEMU dies--> SHUTOFF (status_reason says why)
    any      --delete----------------> (task deleting) -> DELETED
"""

from __future__ import annotations

from dataclasses import dataclass

from hackboot.compute.models import ACTIVE, BUILDING, DELETED, ERROR, REBOOTING, RESIZING, SHUTOFF
from hackboot.core import errors

# task states
SPAWNING = "spawning"
POWERING_OFF = "powering_off"
POWERING_ON = "powering_on"
REBOOTING_SOFT = "rebooting"
REBOOTING_HARD = "rebooting_hard"
RESIZE = "resizing"
DELETING = "deleting"
SNAPSHOTTING = "snapshotting"

ACTIONS = ("stop", "start", "reboot", "resize", "snapshot", "delete")


@dataclass(frozen=True)
class Transition:
    allowed_from: tuple[str, ...]
    status: str | None  # status while the task runs (None: unchanged)
    task: str


TRANSITIONS: dict[str, Transition] = {
    "stop": Transition((ACTIVE, ERROR), None, POWERING_OFF),
    "start": Transition((SHUTOFF, ERROR), None, POWERING_ON),
    "reboot": Transition((ACTIVE,), REBOOTING, REBOOTING_SOFT),
    "reboot_hard": Transition((ACTIVE, SHUTOFF, ERROR), REBOOTING, REBOOTING_HARD),
    "resize": Transition((ACTIVE, SHUTOFF), RESIZING, RESIZE),
    "snapshot": Transition((ACTIVE, SHUTOFF), None, SNAPSHOTTING),
    "delete": Transition((BUILDING, ACTIVE, SHUTOFF, REBOOTING, RESIZING, ERROR), None, DELETING),
}


def check(action: str, instance_id: str, status: str, task_state: str | None, *, has_host: bool = True) -> Transition:
    """Return the transition for `action`, or raise Conflict with a message a user can act on."""
    t = TRANSITIONS[action]
    verb = action.replace("_", " ")
    if status == DELETED:
        raise errors.NotFound(f"Instance {instance_id} not found")
    if action == "delete":
        if task_state == DELETING:
            raise errors.Conflict(f"Instance {instance_id} is already being deleted", code="invalid_state")
        return t
    if task_state is not None:
        raise errors.Conflict(
            f"Cannot {verb} instance {instance_id}: it is busy ({task_state}); wait until it finishes",
            code="task_in_progress")
    if status not in t.allowed_from:
        allowed = ", ".join(t.allowed_from)
        raise errors.Conflict(
            f"Cannot {verb} instance {instance_id} while it is {status}: allowed only when {allowed}",
            code="invalid_state")
    if not has_host and action != "delete":
        raise errors.Conflict(f"Cannot {verb} instance {instance_id}: it was never placed on a host",
                              code="invalid_state")
    return t
