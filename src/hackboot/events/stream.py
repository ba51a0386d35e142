"""Server-sent events: the wire format, and which events are safe to send yet.

Followers poll the database (a short read every `events_stream_poll_s`), so a stream works
whichever control-plane process wrote the event. Each message carries the event's `seq` as
its SSE `id`; a client that reconnects with `Last-Event-ID` (or `?after=`) resumes after it.

Why not simply "seq > cursor"? On PostgreSQL, sequence numbers are handed out when a row is
inserted but become visible when its transaction commits, which can be in another order:
seq 6 may be visible while seq 5 is still being committed. A follower that jumped to 6 would
never send 5. So a follower only advances over a *contiguous* run of seqs; at a gap it waits
until the event after the gap is `GAP_GRACE` old (a transaction still open after that long
is not coming back, or the gap is a rolled-back insert or pruned history) and then skips it.
On SQLite writers are serialised, so gaps do not happen in practice.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

GAP_GRACE = dt.timedelta(seconds=5)
RETRY_MS = 2000


def safe_watermark(cursor: int, rows: Sequence[tuple[int, dt.datetime]], now: dt.datetime,
                   grace: dt.timedelta = GAP_GRACE) -> int:
    """The highest seq a follower at `cursor` may advance to, given the next (seq, created_at) rows."""
    mark = cursor
    for seq, created_at in rows:
        if seq != mark + 1 and now - created_at < grace:
            break  # a younger gap: an earlier transaction may still commit into it
        mark = seq
    return mark


def message(event: dict[str, Any]) -> str:
    """One SSE message: `id: <seq>`, `event: <type>`, `data: <json>` and a blank line."""
    data = json.dumps(event, separators=(",", ":"), default=str)
    # json.dumps escapes newlines inside strings, so `data` is one line; the type is [a-z._].
    event_type = str(event["type"]).replace("\n", " ").replace("\r", " ")
    return f"id: {event['seq']}\nevent: {event_type}\ndata: {data}\n\n"


def comment(text: str) -> str:
    return f": {text}\n\n"


def preamble() -> str:
    """Sent first: the reconnection delay, and bytes that tell the client the stream is live."""
    return f"retry: {RETRY_MS}\n\n" + comment("connected")


def parse_last_event_id(value: str | None) -> int | None:
    if value is None or not value.strip():
        return None
    try:
        seq = int(value.strip())
    except ValueError:
        return None
    return seq if seq >= 0 else None
