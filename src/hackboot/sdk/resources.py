"""Resource groups attached to `Client`; each service adds its own module and registers it here."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hackboot.sdk.client import Client


def attach(client: Client) -> None:
    from hackboot.sdk import identity

    identity.attach(client)
    for module in ("catalog", "events", "compute", "images", "volumes", "network", "s3"):
        try:
            mod = __import__(f"hackboot.sdk.{module}", fromlist=["attach"])
        except ModuleNotFoundError:
            continue
        mod.attach(client)
