"""The block storage driver contract: everything a host's volume agent needs from its storage.

A driver keeps the volumes of one host and opens them in that host's guests. It knows nothing of
HTTP, tenants or the database: the volume agent (``volumes/agent.py``) calls it with ids, layer
names, sizes and keys, and records the outcome. :class:`hackboot.volumes.storage.LocalQcow2Driver`
(qcow2 files in a local pool) implements it; another backend (e.g. Ceph RBD) implements the same
class and must pass the same shared suite, ``tests/integration/block_driver_contract.py``.

Layers
------
A volume is a stack of *layers*. Its *active* layer takes the writes; every snapshot is a frozen
layer below it. Layer names are opaque to callers: the service chooses them (``<volume id>/<name>``)
and records them *before* it asks the driver, so a call retried after a crash finds the half-done
work under the same name instead of starting another.

* :meth:`~BlockStorageDriver.snapshot` freezes the active layer: ``new_active``, an empty layer
  over it, becomes the active one. No data is copied.
* :meth:`~BlockStorageDriver.clone` makes a new volume whose first layer sits on a frozen layer of
  another volume (unchanged blocks are shared).
* :meth:`~BlockStorageDriver.delete_snapshot` moves a frozen layer's data into the layers above it
  and removes it, so stacks stay as deep as the number of live snapshots.
* :meth:`~BlockStorageDriver.revert` puts a new empty active layer on a frozen one; the caller
  records the switch, then removes the old active layer with :meth:`~BlockStorageDriver.drop_layer`.

Guests
------
A volume in use is open in a guest's hypervisor, and only that process may write it. Operations on
it go through the guest's monitor, an :data:`Execute` (what ``ComputeDriver.monitor`` returns for a
driver with the ``block-graph`` and ``hotplug-disk`` capabilities); without one they work offline.
:meth:`~BlockStorageDriver.attach` plugs a volume into one of the guest's hot-plug ports
(``GuestSpec.hotplug_ports``; slot ``n`` is ``hackboot.compute.driver.hotplug_port_id(n)``) with
the block-device definition :meth:`~BlockStorageDriver.blockdev` describes. Keys are handed to the
guest as QMP secrets, never on a command line.

Backups
-------
The exchange format of backups is qcow2 layer files (LUKS-encrypted with the volume's key when the
volume is): :meth:`~BlockStorageDriver.export_backup` gives them bottom first, from the first layer
above a previous backup's point when that point is still in the stack (an incremental backup);
:meth:`~BlockStorageDriver.import_backup` builds a new volume from such layers, which come from a
place tenants can write and are treated as hostile (fetched and checked by the caller, validated as
disk images by the driver, never opened by a name they contain).

Errors and crashes
------------------
Failures raise :class:`StorageError` (or a subclass) whose message is meant for the user's
``status_reason``. Every method is idempotent: re-running it after a crash at any point finishes the
job. ``fault(point)`` arguments are crash-injection hooks for tests (called at named points).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A guest's monitor: ``execute(command, arguments) -> the command's return value`` (ComputeDriver.monitor).
Execute = Callable[[str, dict[str, Any] | None], Any]
Fault = Callable[[str], None]


def no_fault(point: str) -> None:
    """The default crash-injection hook: nothing happens."""


class StorageError(Exception):
    """A storage operation failed; the message is meant for the user (status_reason)."""


class NoSpace(StorageError):
    pass


class DetachTimeout(StorageError):
    pass


@dataclass
class VolumeView:
    """What a driver needs to open a volume: its id, active layer, key, mode, size and format.

    ``fmt`` is ``qcow2`` (layers, snapshots) or ``raw`` (a shareable volume: one layer, no snapshots).
    """

    volume_id: str
    active: str
    key: str | None = None
    read_only: bool = False
    size_bytes: int = 0
    fmt: str = "qcow2"


@dataclass(frozen=True)
class ExportedLayer:
    """One layer of a backup: read it from ``path`` (valid inside ``export_backup``'s block)."""

    name: str
    path: Path
    size: int
    sha256: str


@dataclass
class BackupExport:
    layers: list[ExportedLayer] = field(default_factory=list)  # bottom first
    incremental: bool = False

    @property
    def total(self) -> int:
        return sum(layer.size for layer in self.layers)


@dataclass(frozen=True)
class ImportLayer:
    """One layer of a backup to restore (bottom first), as recorded when the backup was made.

    ``label`` names it in messages; ``size`` is its exact byte count; ``encrypted``/``key`` say how
    it was encrypted; ``volume_size_bytes`` is the size of the volume it was taken from.
    """

    label: str
    size: int
    encrypted: bool = False
    key: str | None = None
    volume_size_bytes: int = 0


# fetch(layer, dest): write the layer's bytes into the new file dest, checked against what the backup
# recorded; raise StorageError when they do not match.
Fetch = Callable[[ImportLayer, Path], None]


class BlockStorageDriver(abc.ABC):
    """The storage of one host's volumes. See the module docstring for the model."""

    # ----------------------------------------------------------------- volumes

    @abc.abstractmethod
    def create(self, volume_id: str, size_bytes: int, *, key: str | None = None, shareable: bool = False) -> str:
        """A new empty volume (encrypted with ``key`` when given; ``raw`` and shareable when asked).

        Returns its active layer. Idempotent: the volume's first layer is made atomically, and if it
        exists already it is returned as it is.
        """

    @abc.abstractmethod
    def create_from_image(self, volume_id: str, image: Path, image_format: str, size_bytes: int, *,
                          key: str | None = None) -> str:
        """A new volume holding a copy of the disk image file ``image`` (grown to ``size_bytes``).

        The image may come from a tenant (an upload): it is read by an unprivileged converter.
        """

    @abc.abstractmethod
    def clone(self, volume_id: str, snapshot_layer: str, size_bytes: int, *, key: str | None = None) -> str:
        """A new volume whose first layer sits on the frozen layer ``snapshot_layer`` of another volume."""

    @abc.abstractmethod
    def import_backup(self, volume_id: str, layers: Sequence[ImportLayer], size_bytes: int, *, key: str | None,
                      fetch: Fetch) -> str:
        """A new volume from backup layers (bottom first): each is fetched with ``fetch`` into private
        space, validated as a disk image (no file it names is ever opened) and the stack flattened into
        the new volume, encrypted with ``key`` when given. Nothing is left behind on failure.
        """

    @abc.abstractmethod
    def delete(self, volume_id: str) -> None:
        """Remove the volume and all its layers. Idempotent."""

    @abc.abstractmethod
    def volumes(self) -> set[str]:
        """Ids of the volumes present (to find orphans: volumes no database row knows)."""

    @abc.abstractmethod
    def layers(self, volume_id: str, top: str) -> list[str]:
        """``top`` and the layers below it that belong to the volume's stack, top first."""

    @abc.abstractmethod
    def free_bytes(self) -> int:
        """Space left for new data."""

    @abc.abstractmethod
    def allocated_bytes(self, volume_id: str) -> int:
        """Space the volume's layers take (thin: less than its size until it is written)."""

    # ----------------------------------------------------------------- snapshots and size

    @abc.abstractmethod
    def snapshot(self, volume: VolumeView, new_active: str, guest: Execute | None = None,
                 fault: Fault = no_fault) -> None:
        """Freeze ``volume.active``; ``new_active`` (an empty layer over it) becomes the active layer.

        ``guest``: the monitor of the guest that has the volume open (the switch happens in it, the
        guest keeps running), or None when it is not open anywhere.
        """

    @abc.abstractmethod
    def delete_snapshot(self, volume: VolumeView, frozen: str, guest: Execute | None = None) -> None:
        """Merge the frozen layer ``frozen`` into the layers above it and remove it.

        ``volume.active`` is the active layer; ``guest`` as in :meth:`snapshot`. A layer that is the
        active one, or is already gone, is left alone. Other volumes are not looked at: the caller
        first makes sure no clone sits on ``frozen``.
        """

    @abc.abstractmethod
    def revert(self, volume: VolumeView, frozen: str, new_active: str) -> None:
        """Make ``new_active``, an empty layer over ``frozen``, ready to become the active layer.

        The volume must not be open in a guest. The caller records the switch, then drops the old
        active layer (:meth:`drop_layer`) unless a snapshot still names it.
        """

    @abc.abstractmethod
    def drop_layer(self, layer: str) -> None:
        """Remove a layer nothing uses any more (an old active layer after a revert). Idempotent."""

    @abc.abstractmethod
    def resize(self, volume: VolumeView, size_bytes: int, guest: Execute | None = None) -> None:
        """Grow the volume to ``size_bytes`` (never shrink); through ``guest`` when it has it open, so the
        guest sees the new capacity at once."""

    # ----------------------------------------------------------------- guests

    @abc.abstractmethod
    def blockdev(self, volume: VolumeView) -> dict[str, Any]:
        """The block-device definition (QMP ``blockdev-add`` arguments) a guest opens the volume with.

        It names its key as a QMP secret object, never the key itself.
        """

    @abc.abstractmethod
    def attach(self, guest: Execute, volume: VolumeView, slot: int, limits: dict[str, int] | None = None,
               bootindex: int | None = None) -> str:
        """Open the volume in the guest and plug it into hot-plug port ``slot``; return the device id.

        Idempotent (a volume already plugged stays as it is). ``limits``: QMP ``block_set_io_throttle``
        values. On failure the guest is left as it was.
        """

    @abc.abstractmethod
    def detach(self, guest: Execute, volume: VolumeView, timeout: float, force: bool = False) -> None:
        """Unplug the volume from the guest (which must release it) and close it there.

        :raises DetachTimeout: the guest kept the device for ``timeout`` seconds (and ``force`` is
            false). With ``force`` the volume is closed anyway; the guest keeps an empty device.
        """

    @abc.abstractmethod
    def plugged(self, guest: Execute, volume_id: str) -> bool:
        """Whether the volume's device is plugged into the guest."""

    @abc.abstractmethod
    def set_limits(self, guest: Execute, volume_id: str, limits: dict[str, int]) -> None:
        """Change the I/O limits of the plugged volume live."""

    @abc.abstractmethod
    def io_limits(self, guest: Execute, volume_id: str) -> dict[str, int]:
        """The I/O limits the guest's hypervisor applies to the volume now (empty when not plugged)."""

    # ----------------------------------------------------------------- backups

    @abc.abstractmethod
    def export_backup(self, volume_id: str, top: str, since: str | None = None
                      ) -> contextlib.AbstractContextManager[BackupExport]:
        """The layers of a backup of the frozen layer ``top``, bottom first, readable inside the block.

        ``since``: the point (a frozen layer) of the previous backup; when it is still in the stack,
        only the layers above it are given (``incremental``), else all of them.
        """

