"""Webhook signatures: HMAC-SHA256 over "<timestamp>.<raw body>" with the webhook's secret.

Every delivery carries:

    X-Hackboot-Event:     project.created
    X-Hackboot-Delivery:  whd-01…            (one id per delivery; retries of it keep it)
    X-Hackboot-Timestamp: 1767225600         (Unix seconds when this attempt was signed)
    X-Hackboot-Signature: sha256=<hex>       (HMAC-SHA256(secret, f"{timestamp}.{body}"))

To verify a delivery, a receiver:

1. takes the raw request body as bytes, before any JSON parsing (re-serialising changes bytes);
2. computes `hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()`
   and compares it with the header's hex in constant time (`hmac.compare_digest`);
3. rejects a timestamp more than 5 minutes away from its clock: signing the timestamp means a
   captured request cannot be replayed later with a fresh one;
4. remembers the `id` of events it processed (or `X-Hackboot-Delivery`) for longer than that
   window and ignores repeats: deliveries are at least once, and a redelivery is a new
   delivery of the same event `id`.

`hackboot.sdk.events.verify_webhook_signature` does steps 2-3.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_PREFIX = "sha256="


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Hackboot-Signature header value for `body` signed at `timestamp`."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def headers(*, secret: str, timestamp: int, body: bytes, event_type: str, delivery_id: str,
            attempt: int) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": "Hackboot-Webhooks/1.0",
        "X-Hackboot-Event": event_type,
        "X-Hackboot-Delivery": delivery_id,
        "X-Hackboot-Attempt": str(attempt),
        "X-Hackboot-Timestamp": str(timestamp),
        "X-Hackboot-Signature": signature(secret, timestamp, body),
    }
