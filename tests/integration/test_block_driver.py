"""The shared block storage contract (block_driver_contract.py) run against every BlockStorageDriver."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import block_driver_contract
from block_driver_contract import block_guest  # noqa: F401 - module fixture: one booted guest

# One guest is booted for the module: keep its tests on one worker (pytest -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group("block-driver")


class TestBlockDriverContract(block_driver_contract.BlockDriverContract):
    pass
