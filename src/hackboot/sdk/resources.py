"""Resource groups attached to `Client`; each service adds its own module and lists it here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hackboot.sdk import catalog, compute, events, functions, identity, images, loadbalancers, network, s3, volumes

if TYPE_CHECKING:
    from hackboot.sdk.client import Client

GROUPS = (identity, catalog, events, compute, images, volumes, network, loadbalancers, functions, s3)


def attach(client: Client) -> None:
    for module in GROUPS:
        module.attach(client)
