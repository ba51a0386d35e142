"""The engine contract on BwrapEngine (real bubblewrap sandboxes, real cgroups)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from hackboot.functions.engine import FunctionEngine
from tests.integration.functions.engine_contract import *  # noqa: F403

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroup limits need root"),
]


@pytest.fixture
def engine() -> Iterator[FunctionEngine]:
    from hackboot.functions.bwrap_engine import BwrapEngine

    eng = BwrapEngine()
    try:
        yield eng
    finally:
        eng.close()
