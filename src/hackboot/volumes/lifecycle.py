"""The volume state machine: which request is allowed in which state, and what it sets.

``status`` is what the user sees (observed by the agent); ``task_state`` the operation in flight
(set by the API, cleared by the agent when done). One task at a time per volume; anything else is
a 409 that names the allowed states::

    creating --agent: file ready--> available --attach--> attaching --> in-use
    in-use --detach--> detaching --> available (or in-use while other attachments remain)
    available|in-use --snapshot / snapshot delete / resize / tier--> (same status, task runs)
    available --revert--> available           (a volume must be detached to be reverted)
    available|in-use --backup--> backing-up --> available|in-use
    available|error --delete--> deleting --> deleted
    any task --agent failure--> the status before, status_reason says why (create: error)
"""

from __future__ import annotations

from hackboot.core import errors
from hackboot.volumes.models import (
    ATTACHING,
    AVAILABLE,
    BACKING_UP,
    CREATING,
    DELETED,
    DELETING,
    DETACHING,
    ERROR,
    IN_USE,
)

CREATE, ATTACH, DETACH, SNAPSHOT, DELETE_SNAPSHOT, REVERT, RESIZE, RETIER, BACKUP, DELETE = (
    "creating", "attaching", "detaching", "snapshotting", "deleting_snapshot", "reverting", "resizing",
    "retiering", "backing_up", "deleting")

# action -> (allowed statuses, status while the task runs or None to keep it)
TRANSITIONS: dict[str, tuple[tuple[str, ...], str | None]] = {
    ATTACH: ((AVAILABLE, IN_USE), ATTACHING),
    DETACH: ((IN_USE,), DETACHING),
    SNAPSHOT: ((AVAILABLE, IN_USE), None),
    DELETE_SNAPSHOT: ((AVAILABLE, IN_USE), None),
    REVERT: ((AVAILABLE,), None),
    RESIZE: ((AVAILABLE, IN_USE), None),
    RETIER: ((AVAILABLE, IN_USE), None),
    BACKUP: ((AVAILABLE, IN_USE), BACKING_UP),
    DELETE: ((AVAILABLE, ERROR), DELETING),
}

VERBS = {ATTACH: "attach", DETACH: "detach", SNAPSHOT: "snapshot", DELETE_SNAPSHOT: "delete a snapshot of",
         REVERT: "revert", RESIZE: "resize", RETIER: "change the tier of", BACKUP: "back up", DELETE: "delete"}


def check(action: str, volume_id: str, status: str, task_state: str | None) -> str | None:
    """Return the status to set while the task runs (None: unchanged), or raise Conflict."""
    allowed, during = TRANSITIONS[action]
    verb = VERBS[action]
    if status == DELETED:
        raise errors.NotFound(f"Volume {volume_id} not found")
    if task_state is not None:
        raise errors.Conflict(f"Cannot {verb} volume {volume_id}: it is busy ({task_state}); wait until it finishes",
                              code="task_in_progress")
    if status not in allowed:
        hint = ""
        if action == DELETE and status == IN_USE:
            hint = ": detach it first"
        elif action == REVERT and status == IN_USE:
            hint = ": detach it first (a guest must not see its disk change under it)"
        raise errors.Conflict(
            f"Cannot {verb} volume {volume_id} while it is {status}; allowed only when {', '.join(allowed)}{hint}",
            code="in_use" if status == IN_USE else "invalid_state")
    return during


SETTLED = (AVAILABLE, IN_USE, ERROR)
BUSY = (CREATING, ATTACHING, DETACHING, BACKING_UP, DELETING)
