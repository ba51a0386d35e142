"""Python SDK for Hackboot Cloud: `from hackboot.sdk import Client`."""

from hackboot.sdk.client import ApiError, Client

__all__ = ["ApiError", "Client"]
