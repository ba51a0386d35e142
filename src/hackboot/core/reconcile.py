"""The shared reconcile loop of every agent-side service, and the change notifier that wakes it.

A service's agent subclasses :class:`Reconciler` and writes only its domain logic::

    class VolumeReconciler(Reconciler):
        kind = "volume"                 # names the change channel
        id_prefix = "vol-"              # a change key with this prefix names one object

        def list_ids(self) -> Iterable[str]:        # desired rows that need work (cheap query)
            return service.busy_volume_ids(self.scope)

        def reconcile(self, object_id: str) -> None:  # idempotent; raising means "retry later"
            ...

        def resync(self) -> None:        # optional backstop every `resync_interval` seconds
            ...

    r = VolumeReconciler(scope=host_id, stop=stop_event, workers=4, poll_interval=1.0)
    r.start()

What the loop guarantees:

* **one at a time per object**: an id is in the busy set from submission until its work returns;
  a second submission of a busy id is refused (:meth:`Reconciler.submit` returns False). Work
  other than ``reconcile`` (an event handler, a periodic check) goes through ``submit`` too, so
  it never overlaps a reconcile of the same object;
* **a bounded pool**: ``workers`` threads per reconciler;
* **wake-ups**: :func:`notify` (``ChangeNotifier.notify``) after a commit wakes the reconcilers
  of that kind in this process at once, the agents of this machine through a datagram socket in
  ``<state_dir>/wake/`` and, on PostgreSQL, every agent through ``NOTIFY hackboot_<kind>`` (a
  listener thread per process ``LISTEN``\\ s on the channels of its reconcilers). The key of a
  change is a scope (a host id: "look at everything of yours") or an object id (``id_prefix``:
  "look at this one"); None means everything. Wake-ups are latency shortcuts only: the loop also
  polls ``list_ids()`` every ``poll_interval`` seconds, which is the contract (a lost wake-up
  costs one poll interval);
* **retries with backoff**: when ``reconcile(id)`` raises, the id is skipped for
  ``base_backoff * 2**(n-1)`` seconds (at most ``max_backoff``) after its n-th consecutive
  failure; after ``failure_threshold`` consecutive failures :meth:`Reconciler.report_failure`
  is called so the service can record a visible ``status_reason``. A success clears the count;
* **resync**: :meth:`Reconciler.resync` runs every ``resync_interval`` seconds in its own
  thread (compare observed and desired state of idle objects, clean up orphans).

``core`` imports no service: services call :func:`notify` after committing, and agents subclass
:class:`Reconciler`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("hackboot.reconcile")

Listener = Callable[[str | None], None]
ANY_KIND = "*"
_SEP = "\x1f"  # kind / key separator in a wake-up datagram


def channel(kind: str) -> str:
    """The PostgreSQL NOTIFY channel of a kind of object."""
    return "hackboot_" + re.sub(r"[^a-z0-9_]", "_", kind.lower())


def _on_postgres() -> bool:
    from hackboot.core.config import get_settings

    return get_settings().effective_database_url.startswith("postgresql")


def wake_dir() -> Path:
    """Where the agents of this machine bind their wake-up sockets (shared by every state dir user)."""
    from hackboot.core.config import get_settings

    return get_settings().state_dir.absolute() / "wake"


class ChangeNotifier:
    """Carries "desired state of <kind> changed (for <key>)" to the reconcilers that care.

    One per process (:data:`notifier`). Transports, all best-effort:

    * in process: :meth:`subscribe` callbacks, called synchronously by :meth:`notify`;
    * same machine: a datagram to every socket in :func:`wake_dir` (bound by :meth:`listen_socket`);
    * PostgreSQL: ``NOTIFY`` on :func:`channel` (kind), received by :meth:`listen_database`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[str, list[Listener]] = {}
        self._db_kinds: set[str] = set()
        self._db_thread: threading.Thread | None = None
        self._db_stop = threading.Event()

    # -- receiving ------------------------------------------------------------------------------

    def subscribe(self, kind: str, callback: Listener) -> Callable[[], None]:
        """Call `callback(key)` on every change of `kind` seen by this process; returns an unsubscribe."""
        with self._lock:
            self._subscribers.setdefault(kind, []).append(callback)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._subscribers.get(kind, []).remove(callback)

        return unsubscribe

    def dispatch(self, kind: str | None, key: str | None) -> None:
        """Deliver a change to this process's subscribers (kind None: to every kind)."""
        with self._lock:
            if kind is None or kind == ANY_KIND:
                callbacks = [cb for cbs in self._subscribers.values() for cb in cbs]
            else:
                callbacks = list(self._subscribers.get(kind, []))
        for cb in callbacks:
            try:
                cb(key)
            except Exception:  # a listener never breaks the caller (often a request)
                log.exception("change listener for %s failed", kind)

    def listen_socket(self, name: str, stop: threading.Event) -> bool:
        """Bind ``<wake_dir>/<hash(name)>.sock`` and dispatch what arrives until `stop`. False if impossible."""
        wake = wake_dir()
        try:
            wake.mkdir(parents=True, exist_ok=True)
            path = wake / (hashlib.sha256(name.encode()).hexdigest()[:16] + ".sock")
            path.unlink(missing_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(path))
        except OSError as exc:
            log.warning("%s: no wake-up socket (%s); polling only", name, exc)
            return False

        def listen() -> None:
            sock.settimeout(1.0)
            while not stop.is_set():
                try:
                    data = sock.recv(512).decode(errors="replace")
                except TimeoutError:
                    continue
                except OSError:
                    break
                kind, sep, key = data.partition(_SEP)
                if sep:
                    self.dispatch(kind, None if key in ("*", "") else key)
            sock.close()
            path.unlink(missing_ok=True)

        threading.Thread(target=listen, name=f"hb-wake-{name}", daemon=True).start()
        return True

    def listen_database(self, kind: str) -> None:
        """On PostgreSQL, LISTEN on the channel of `kind` (one listener thread per process)."""
        if not _on_postgres():
            return
        with self._lock:
            self._db_kinds.add(kind)
            if self._db_thread is not None and self._db_thread.is_alive():
                return
            self._db_stop.clear()
            self._db_thread = threading.Thread(target=self._db_listen, name="hb-pg-listen", daemon=True)
            self._db_thread.start()

    def stop_database_listener(self) -> None:
        self._db_stop.set()

    def _db_listen(self) -> None:
        import psycopg

        from hackboot.core.db import get_engine

        url = get_engine().url.set(drivername="postgresql").render_as_string(hide_password=False)
        delay = 1.0
        while not self._db_stop.is_set():
            try:
                with psycopg.connect(url, autocommit=True) as conn:
                    listening: set[str] = set()
                    delay = 1.0
                    while not self._db_stop.is_set():
                        with self._lock:
                            wanted = set(self._db_kinds) - listening
                        for kind in wanted:
                            conn.execute(f'LISTEN "{channel(kind)}"')
                            listening.add(kind)
                        if wanted:  # a change committed before LISTEN is found by the next poll
                            for kind in wanted:
                                self.dispatch(kind, None)
                        by_channel = {channel(k): k for k in listening}
                        for n in conn.notifies(timeout=1.0):
                            notified = by_channel.get(n.channel)
                            if notified is not None:
                                self.dispatch(notified, n.payload or None)
            except Exception as exc:
                if self._db_stop.is_set():
                    return
                log.warning("change listener: PostgreSQL connection lost (%s); retrying in %.0fs", exc, delay)
                self._db_stop.wait(delay)
                delay = min(delay * 2, 30.0)

    # -- sending --------------------------------------------------------------------------------

    def notify(self, kind: str, key: str | None = None, *, local: bool = True, sockets: bool = True,
               database: bool = True) -> None:
        """Say that desired state of `kind` changed (for `key`: a scope such as a host id, or an object id).

        Call it after the commit. Never raises: every transport is a shortcut over polling.
        """
        if local:
            self.dispatch(kind, key)
        if sockets:
            self._send_datagrams(f"{kind}{_SEP}{key or '*'}".encode())
        if database:
            self._send_database(kind, key)

    @staticmethod
    def _send_datagrams(payload: bytes) -> None:
        try:
            paths = [p for p in wake_dir().iterdir() if p.suffix == ".sock"]
        except OSError:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            for path in paths:
                with contextlib.suppress(OSError):  # agent gone or its queue full: it will poll
                    sock.sendto(payload, str(path))

    @staticmethod
    def _send_database(kind: str, key: str | None) -> None:
        try:
            from sqlalchemy import text

            from hackboot.core.db import get_engine

            if not _on_postgres():
                return
            with get_engine().connect() as conn:
                conn.execute(text("SELECT pg_notify(:c, :p)"), {"c": channel(kind), "p": key or ""})
                conn.commit()
        except Exception as exc:
            log.debug("NOTIFY %s failed: %s", kind, exc)


notifier = ChangeNotifier()
notify = notifier.notify


@dataclass
class _Failure:
    count: int
    retry_at: float
    reason: str


class Reconciler:
    """Desired-state rows of one kind → ``reconcile(id)`` calls. Subclass it; see the module docstring."""

    kind: str = ""
    id_prefix: str = ""

    def __init__(self, *, scope: str | None = None, stop: threading.Event | None = None, workers: int = 4,
                 poll_interval: float = 1.0, resync_interval: float | None = None, base_backoff: float = 1.0,
                 max_backoff: float = 60.0, failure_threshold: int = 3, name: str = "",
                 change_notifier: ChangeNotifier | None = None) -> None:
        if not self.kind:
            raise TypeError(f"{type(self).__name__} must set `kind`")
        self.scope = scope
        self.name = name or self.kind
        self.poll_interval = poll_interval
        self.resync_interval = resync_interval
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self.failure_threshold = failure_threshold
        self.notifier = change_notifier or notifier
        self._stop = stop or threading.Event()
        self._wake = threading.Event()
        self._full = True  # the next pass lists every id
        self._targets: set[str] = set()
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._failures: dict[str, _Failure] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"hb-{self.kind}")
        self._threads: list[threading.Thread] = []
        self._unsubscribe: Callable[[], None] | None = None

    # -- to implement -------------------------------------------------------------------------------

    def list_ids(self) -> Iterable[str]:
        """Ids of the objects whose desired state may differ from the observed one (a cheap query)."""
        raise NotImplementedError

    def reconcile(self, object_id: str) -> None:
        """Bring one object towards its desired state; idempotent. Raise to be retried with backoff."""
        raise NotImplementedError

    def resync(self) -> None:
        """Periodic backstop (every ``resync_interval`` s): observed vs desired of idle objects, orphans."""

    def report_failure(self, object_id: str, reason: str, failures: int) -> None:
        """Called after ``failure_threshold`` (and more) consecutive failures: record a visible status_reason."""
        log.warning("%s: %s %s failed %d times in a row: %s", self.name, self.kind, object_id, failures, reason)

    # -- running ----------------------------------------------------------------------------------

    @property
    def stopping(self) -> threading.Event:
        return self._stop

    def start(self) -> None:
        """Subscribe to changes of `kind` and start the loop (and resync) threads; returns at once."""
        self._unsubscribe = self.notifier.subscribe(self.kind, self.wake)
        self.notifier.listen_database(self.kind)
        self._spawn("loop", self._loop)
        if self.resync_interval:
            self._spawn("resync", self._resync_loop)

    def _spawn(self, what: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=f"hb-{self.name}-{what}", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        self._wake.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def wake(self, key: str | None = None) -> None:
        """A change: None or the scope → look at every id; an id with `id_prefix` → at that one; else ignored."""
        if key is None or key == self.scope:
            with self._lock:
                self._full = True
        elif self.id_prefix and key.startswith(self.id_prefix):
            with self._lock:
                self._targets.add(key)
        else:
            return
        self._wake.set()

    def is_busy(self, object_id: str) -> bool:
        with self._lock:
            return object_id in self._busy

    def busy(self) -> set[str]:
        with self._lock:
            return set(self._busy)

    def failures(self, object_id: str) -> int:
        with self._lock:
            f = self._failures.get(object_id)
            return f.count if f else 0

    def reset_backoff(self, object_id: str) -> None:
        with self._lock:
            self._failures.pop(object_id, None)

    def submit(self, object_id: str, fn: Callable[..., object] | None = None, *args: Any) -> bool:
        """Run `fn(*args)` (default: ``reconcile(object_id)``) in the pool unless the object is busy.

        Only ``reconcile`` failures count for backoff; other work's exceptions are logged.
        """
        with self._lock:
            if object_id in self._busy or self._stop.is_set():
                return False
            self._busy.add(object_id)

        def run() -> None:
            try:
                if fn is None:
                    self._run_reconcile(object_id)
                else:
                    fn(*args)
            except Exception:
                log.exception("%s: work on %s failed", self.name, object_id)
            finally:
                with self._lock:
                    self._busy.discard(object_id)
                self._wake.set()  # changes skipped while it was busy are looked at again

        try:
            self._pool.submit(run)
        except RuntimeError:  # pool shut down
            with self._lock:
                self._busy.discard(object_id)
            return False
        return True

    def _run_reconcile(self, object_id: str) -> None:
        try:
            self.reconcile(object_id)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)
            with self._lock:
                prev = self._failures.get(object_id)
                count = (prev.count if prev else 0) + 1
                delay = min(self.base_backoff * 2 ** (count - 1), self.max_backoff)
                self._failures[object_id] = _Failure(count, time.monotonic() + delay, reason)
            log.warning("%s: %s %s failed (%d in a row; retry in %.1fs): %s", self.name, self.kind, object_id,
                        count, delay, reason)
            if count >= self.failure_threshold:
                try:
                    self.report_failure(object_id, reason, count)
                except Exception:
                    log.exception("%s: cannot record the failure of %s", self.name, object_id)
            return
        with self._lock:
            self._failures.pop(object_id, None)

    def run_once(self) -> None:
        """One pass: list the ids (or only the targeted ones) and submit those idle and not backing off."""
        with self._lock:
            full, self._full = self._full, False
            targets, self._targets = self._targets, set()
        ids = list(self.list_ids()) if full else []
        now = time.monotonic()
        if full:  # forget the failures of objects that need no more work
            with self._lock:
                for gone in set(self._failures) - set(ids) - self._busy - targets:
                    del self._failures[gone]
        for object_id in dict.fromkeys([*ids, *sorted(targets)]):
            with self._lock:
                f = self._failures.get(object_id)
                if object_id in self._busy:
                    # A change signalled while the object is being worked on may come after what that work
                    # read: keep the target, so the pass woken when the work ends reconciles it again.
                    if object_id in targets:
                        self._targets.add(object_id)
                    continue
                if f is not None and now < f.retry_at:
                    continue
            self.submit(object_id)

    def _next_timeout(self) -> float:
        timeout = self.poll_interval
        now = time.monotonic()
        with self._lock:
            for f in self._failures.values():
                if f.retry_at > now:
                    timeout = min(timeout, f.retry_at - now + 0.01)
        return timeout

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before reading: a change signalled from now on triggers another pass
            try:
                self.run_once()
            except Exception:  # the loop survives any single failure
                with self._lock:
                    self._full = True
                log.exception("%s: reconcile pass failed", self.name)
            self._wake.wait(self._next_timeout())
            with self._lock:
                if not self._targets:
                    self._full = True  # a poll (or a full wake-up) lists everything

    def _resync_loop(self) -> None:
        assert self.resync_interval
        while not self._stop.wait(self.resync_interval):
            try:
                self.resync()
            except Exception:
                log.exception("%s: periodic resync failed", self.name)
