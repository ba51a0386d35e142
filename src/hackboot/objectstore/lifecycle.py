"""Bucket lifecycle rules: parsing/rendering the XML and the worker that applies them.

Supported: Filter by Prefix, Tag, And{Prefix, Tags, ObjectSizeGreaterThan/LessThan} (or the legacy
top-level Prefix); Expiration (Days | Date | ExpiredObjectDeleteMarker); Transitions to STANDARD_IA,
ONEZONE_IA, INTELLIGENT_TIERING, GLACIER_IR, GLACIER, DEEP_ARCHIVE; NoncurrentVersionExpiration
(NoncurrentDays, NewerNoncurrentVersions); NoncurrentVersionTransitions;
AbortIncompleteMultipartUpload. The length of a "day" is HACKBOOT_S3_LIFECYCLE_DAY_S (86400 by
default; tests use ~1 s). Locked versions (retention, legal hold) are never expired.
"""

from __future__ import annotations

import datetime as dt
import logging
from functools import partial
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hackboot.core.db import session_scope, utcnow
from hackboot.objectstore import engine
from hackboot.objectstore.models import Bucket, ObjectVersion, Upload
from hackboot.objectstore.s3errors import S3Error
from hackboot.objectstore.s3xml import doc, parse, tag

log = logging.getLogger("hackboot.objectstore.lifecycle")
CLASSES = ("STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR", "GLACIER", "DEEP_ARCHIVE")
RANK = {"STANDARD": 0, "REDUCED_REDUNDANCY": 0, "INTELLIGENT_TIERING": 1, "STANDARD_IA": 2, "ONEZONE_IA": 2,
        "GLACIER_IR": 3, "GLACIER": 4, "DEEP_ARCHIVE": 5}
BATCH = 500


def _int(node: Any, name: str) -> int | None:
    v = node.text_of(name)
    if v is None:
        return None
    try:
        n = int(v)
    except ValueError:
        raise S3Error("MalformedXML", f"{name} must be an integer") from None
    if n < 0:
        raise S3Error("InvalidArgument", f"'{name}' must be a positive integer")
    return n


def _date(node: Any, name: str) -> str | None:
    v = node.text_of(name)
    if v is None:
        return None
    try:
        d = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise S3Error("InvalidArgument", f"'{name}' must be an ISO 8601 date") from None
    return (d if d.tzinfo else d.replace(tzinfo=dt.UTC)).isoformat()


def parse_xml(body: bytes) -> list[dict[str, Any]]:
    root = parse(body, "LifecycleConfiguration")
    rules: list[dict[str, Any]] = []
    ids = set()
    for r in root.children("Rule"):
        rule: dict[str, Any] = {"id": r.text_of("ID") or f"rule-{len(rules) + 1}", "status": r.text_of("Status"),
                                "prefix": "", "tags": {}, "size_gt": None, "size_lt": None}
        if rule["status"] not in ("Enabled", "Disabled"):
            raise S3Error("MalformedXML", "Rule Status must be Enabled or Disabled")
        if rule["id"] in ids:
            raise S3Error("InvalidArgument", "Rule ID must be unique. Found same ID for more than one rule")
        ids.add(rule["id"])
        f = r.find("Filter")
        if f is not None:
            and_ = f.find("And")
            src = and_ if and_ is not None else f
            rule["prefix"] = src.text_of("Prefix") or ""
            for t in src.children("Tag"):
                rule["tags"][t.text_of("Key") or ""] = t.text_of("Value") or ""
            rule["size_gt"] = _int(src, "ObjectSizeGreaterThan")
            rule["size_lt"] = _int(src, "ObjectSizeLessThan")
        elif r.find("Prefix") is not None:
            rule["prefix"] = r.text_of("Prefix") or ""
        e = r.find("Expiration")
        if e is not None:
            rule["expiration"] = {"days": _int(e, "Days"), "date": _date(e, "Date"),
                                  "delete_marker": (e.text_of("ExpiredObjectDeleteMarker") or "").lower() == "true"}
            if rule["expiration"]["days"] == 0:
                raise S3Error("InvalidArgument", "'Days' for Expiration action must be a positive integer")
        transitions = []
        for t in r.children("Transition"):
            sc = t.text_of("StorageClass")
            if sc not in CLASSES:
                raise S3Error("InvalidStorageClass", "The storage class you specified is not valid")
            transitions.append({"days": _int(t, "Days"), "date": _date(t, "Date"), "class": sc})
        rule["transitions"] = transitions
        nve = r.find("NoncurrentVersionExpiration")
        if nve is not None:
            rule["noncurrent_expiration"] = {"days": _int(nve, "NoncurrentDays"),
                                             "newer": _int(nve, "NewerNoncurrentVersions")}
        ntrans = []
        for t in r.children("NoncurrentVersionTransition"):
            sc = t.text_of("StorageClass")
            if sc not in CLASSES:
                raise S3Error("InvalidStorageClass", "The storage class you specified is not valid")
            ntrans.append({"days": _int(t, "NoncurrentDays"), "class": sc})
        rule["noncurrent_transitions"] = ntrans
        a = r.find("AbortIncompleteMultipartUpload")
        if a is not None:
            rule["abort_days"] = _int(a, "DaysAfterInitiation")
        if not any(k in rule for k in ("expiration", "noncurrent_expiration", "abort_days")) and not transitions \
                and not ntrans:
            raise S3Error("InvalidRequest", "At least one action needs to be specified in a rule")
        rules.append(rule)
    if not rules or len(rules) > 1000:
        raise S3Error("MalformedXML", "A lifecycle configuration needs 1 to 1000 rules")
    return rules


def to_xml(rules: list[dict[str, Any]]) -> bytes:
    out = []
    for r in rules:
        conds = ([tag("Prefix", r["prefix"])] if r["prefix"] else []) + [
            f"<Tag>{tag('Key', k)}{tag('Value', v)}</Tag>" for k, v in r["tags"].items()]
        if r.get("size_gt") is not None:
            conds.append(tag("ObjectSizeGreaterThan", r["size_gt"]))
        if r.get("size_lt") is not None:
            conds.append(tag("ObjectSizeLessThan", r["size_lt"]))
        filt = f"<And>{''.join(conds)}</And>" if len(conds) > 1 else "".join(conds)
        inner = tag("ID", r["id"]) + f"<Filter>{filt}</Filter>" + tag("Status", r["status"])
        for t in r.get("transitions", []):
            when = tag("Days", t["days"]) if t["days"] is not None else tag("Date", t["date"])
            inner += f"<Transition>{when}{tag('StorageClass', t['class'])}</Transition>"
        e = r.get("expiration")
        if e:
            body = ""
            if e["days"] is not None:
                body += tag("Days", e["days"])
            if e["date"]:
                body += tag("Date", e["date"])
            if e["delete_marker"]:
                body += tag("ExpiredObjectDeleteMarker", "true")
            inner += f"<Expiration>{body}</Expiration>"
        for t in r.get("noncurrent_transitions", []):
            inner += (f"<NoncurrentVersionTransition>{tag('NoncurrentDays', t['days'])}"
                      f"{tag('StorageClass', t['class'])}</NoncurrentVersionTransition>")
        n = r.get("noncurrent_expiration")
        if n:
            body = tag("NoncurrentDays", n["days"]) if n["days"] is not None else ""
            if n.get("newer") is not None:
                body += tag("NewerNoncurrentVersions", n["newer"])
            inner += f"<NoncurrentVersionExpiration>{body}</NoncurrentVersionExpiration>"
        if r.get("abort_days") is not None:
            inner += (f"<AbortIncompleteMultipartUpload>{tag('DaysAfterInitiation', r['abort_days'])}"
                      f"</AbortIncompleteMultipartUpload>")
        out.append(f"<Rule>{inner}</Rule>")
    return doc("LifecycleConfiguration", "".join(out))


# --- the worker -----------------------------------------------------------------------------------

def _due(since: dt.datetime, days: int | None, date: str | None, now: dt.datetime) -> bool:
    if days is not None:
        return (now - since).total_seconds() >= days * engine.day_seconds()
    if date:
        return now >= dt.datetime.fromisoformat(date)
    return False


def _applies(rule: dict[str, Any], v: Any) -> bool:
    if not v.key.startswith(rule["prefix"]):
        return False
    if rule.get("size_gt") is not None and not v.size > rule["size_gt"]:
        return False
    if rule.get("size_lt") is not None and not v.size < rule["size_lt"]:
        return False
    tags = v.tags or {}
    return all(tags.get(k) == val for k, val in rule["tags"].items())


def _locked(v: ObjectVersion, now: dt.datetime) -> bool:
    return v.legal_hold or (v.lock_until is not None and v.lock_until > now)


def apply_bucket(bucket_id: str, rules: list[dict[str, Any]]) -> dict[str, int]:
    """One pass of a bucket's rules; each change is its own short transaction."""
    stats = {"expired": 0, "transitioned": 0, "noncurrent_expired": 0, "aborted": 0, "markers": 0}
    now = utcnow()
    for rule in rules:
        if rule["status"] != "Enabled":
            continue
        after = None
        while True:
            with session_scope(write=False) as s:
                stmt = select(ObjectVersion).where(ObjectVersion.bucket_id == bucket_id)
                if rule["prefix"]:
                    stmt = stmt.where(ObjectVersion.key >= rule["prefix"])
                    upper = engine.next_after(rule["prefix"])
                    if upper:
                        stmt = stmt.where(ObjectVersion.key < upper)
                if after is not None:
                    stmt = stmt.where(ObjectVersion.id > after)
                rows = list(s.scalars(stmt.order_by(ObjectVersion.id).limit(BATCH)))
            if not rows:
                break
            after = rows[-1].id
            for v in rows:
                if not _applies(rule, v) and not (v.delete_marker and v.key.startswith(rule["prefix"])):
                    continue
                _apply_version(bucket_id, rule, v, now, stats)
        if rule.get("abort_days") is not None:
            with session_scope(write=False) as s:
                ups = list(s.scalars(select(Upload).where(Upload.bucket_id == bucket_id)))
            for up in ups:
                if up.key.startswith(rule["prefix"]) and _due(up.created_at, rule["abort_days"], None, now):
                    try:
                        dead = engine.write_sync(partial(engine.tx_abort_upload, bucket_id=bucket_id,
                                                         upload_id=up.id, key=None))
                        engine.delete_blob_data(dead)
                        stats["aborted"] += 1
                    except S3Error:
                        pass
    return stats


def _apply_version(bucket_id: str, rule: dict[str, Any], v: ObjectVersion, now: dt.datetime,
                   stats: dict[str, int]) -> None:
    exp = rule.get("expiration")
    if v.is_latest:
        if v.delete_marker:
            if exp and exp.get("delete_marker"):
                def only_marker(s: Session) -> list[str]:
                    others = s.scalar(select(ObjectVersion.id).where(ObjectVersion.bucket_id == bucket_id,
                                                                     ObjectVersion.key == v.key,
                                                                     ObjectVersion.id != v.id).limit(1))
                    if others is not None:
                        return []
                    return engine.tx_delete_object(s, bucket_id, v.key, v.version_id, "lifecycle").dead_blobs

                engine.write_sync(only_marker)
                stats["markers"] += 1
            return
        if exp and _due(v.last_modified, exp["days"], exp["date"], now):
            if _locked(v, now):
                return
            try:
                r = engine.write_sync(lambda s: engine.tx_delete_object(s, bucket_id, v.key, None, "lifecycle"))
                engine.delete_blob_data(r.dead_blobs)
                stats["expired"] += 1
            except S3Error:
                pass
            return
        target = _coldest([t["class"] for t in rule.get("transitions", [])
                           if _due(v.last_modified, t["days"], t["date"], now)], v.storage_class)
        if target is not None:
            _set_class(bucket_id, v.id, target)
            stats["transitioned"] += 1
        return
    since = v.noncurrent_since or v.last_modified
    n = rule.get("noncurrent_expiration")
    if n and n.get("days") is not None and _due(since, n["days"], None, now):
        if n.get("newer") is not None and _newer_count(bucket_id, v) < n["newer"]:
            return
        if _locked(v, now):
            return
        try:
            r = engine.write_sync(lambda s: engine.tx_delete_object(s, bucket_id, v.key, v.version_id, "lifecycle"))
            engine.delete_blob_data(r.dead_blobs)
            stats["noncurrent_expired"] += 1
        except S3Error:
            pass
        return
    target = _coldest([t["class"] for t in rule.get("noncurrent_transitions", [])
                       if _due(since, t["days"], None, now)], v.storage_class)
    if target is not None and not v.delete_marker:
        _set_class(bucket_id, v.id, target)
        stats["transitioned"] += 1


def _coldest(classes: list[str], current: str) -> str | None:
    """The coldest class among due transitions, if colder than the current one."""
    best = max(classes, key=lambda c: RANK[c], default=None)
    return best if best is not None and RANK[best] > RANK.get(current, 0) else None


def _newer_count(bucket_id: str, v: ObjectVersion) -> int:
    from sqlalchemy import func

    with session_scope(write=False) as s:
        return int(s.scalar(select(func.count()).where(ObjectVersion.bucket_id == bucket_id,
                                                        ObjectVersion.key == v.key, ObjectVersion.id > v.id,
                                                        ObjectVersion.is_latest.is_(False))) or 0)


def _set_class(bucket_id: str, row_id: int, cls: str) -> None:
    from sqlalchemy import update

    engine.write_sync(lambda s: s.execute(update(ObjectVersion).where(ObjectVersion.id == row_id)
                                          .values(storage_class=cls)))


def run_once() -> dict[str, int]:
    total: dict[str, int] = {}
    with session_scope(write=False) as s:
        buckets = [(b.id, b.lifecycle) for b in s.scalars(select(Bucket).where(Bucket.lifecycle.is_not(None)))]
    for bucket_id, rules in buckets:
        if not rules:
            continue
        try:
            for k, n in apply_bucket(bucket_id, rules).items():
                total[k] = total.get(k, 0) + n
        except Exception:
            log.exception("lifecycle failed for bucket %s", bucket_id)
    return total
