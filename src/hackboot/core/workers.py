"""Background loops (reconcilers, webhook sender, lifecycle workers) run as daemon threads.

Each loop is a plain function called repeatedly; an exception is logged and the loop
runs again after its interval: a reconciler that crashes simply runs again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("hackboot.workers")


@dataclass
class Loop:
    name: str
    step: Callable[[], object]
    interval_s: float


class Workers:
    def __init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, loop: Loop) -> None:
        thread = threading.Thread(target=self._run, args=(loop,), name=f"hb-{loop.name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _run(self, loop: Loop) -> None:
        while not self._stop.is_set():
            try:
                loop.step()
            except Exception:
                log.exception("worker %s failed; retrying in %.1fs", loop.name, loop.interval_s)
            self._stop.wait(loop.interval_s)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)

    @property
    def stopping(self) -> threading.Event:
        return self._stop
