"""Who may do what: credential limits, bucket policies (an IAM JSON subset), ACLs, public access blocks.

Accounts are projects: a policy `Principal` names a project as `{"AWS": "prj-…"}`,
`arn:aws:iam::prj-…:root` or `arn:aws:iam::prj-…:user/<user id or name>`; `"*"` is anyone,
anonymous included. ACL grantees are projects (CanonicalUser ID = project id) or the AllUsers /
AuthenticatedUsers / LogDelivery groups. The bucket's project owns the bucket and every object in it; ACL
grants are honoured unless the bucket's Object Ownership is BucketOwnerEnforced (the caller passes no ACLs).

Evaluation (as IAM): an explicit Deny in the bucket policy wins; then the owner project is allowed;
otherwise an Allow from the policy or an ACL grant is needed. When public access is blocked
(project switch or bucket setting), grants to everyone are ignored and cannot be added.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from hackboot.objectstore.s3errors import S3Error, access_denied

ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"
AUTH_USERS = "http://acs.amazonaws.com/groups/global/AuthenticatedUsers"
LOG_DELIVERY = "http://acs.amazonaws.com/groups/s3/LogDelivery"
GROUPS = (ALL_USERS, AUTH_USERS, LOG_DELIVERY)
PERMISSIONS = ("FULL_CONTROL", "READ", "WRITE", "READ_ACP", "WRITE_ACP")

READ_ACTIONS = {
    "s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket", "s3:ListBucketVersions", "s3:GetBucketLocation",
    "s3:GetObjectTagging", "s3:GetObjectVersionTagging", "s3:GetObjectAcl", "s3:GetObjectVersionAcl",
    "s3:GetBucketAcl", "s3:GetBucketPolicy", "s3:GetBucketVersioning", "s3:GetBucketCORS",
    "s3:GetLifecycleConfiguration", "s3:GetObjectRetention", "s3:GetObjectLegalHold",
    "s3:GetBucketObjectLockConfiguration", "s3:ListBucketMultipartUploads", "s3:ListMultipartUploadParts",
    "s3:GetEncryptionConfiguration", "s3:GetBucketTagging", "s3:GetBucketPublicAccessBlock",
    "s3:ListAllMyBuckets", "s3:GetObjectAttributes", "s3:GetBucketOwnershipControls", "s3:GetBucketPolicyStatus",
}


@dataclass(frozen=True)
class Requester:
    project_id: str | None  # None: anonymous
    user_id: str | None = None
    read_only: bool = False
    buckets: tuple[str, ...] | None = None
    access_key: str | None = None

    @property
    def anonymous(self) -> bool:
        return self.project_id is None


ANONYMOUS = Requester(None)


# How ACLs are stored: the grants besides the owner's FULL_CONTROL, which is implicit. An ACL that does
# not give the owner FULL_CONTROL (grants replaced by headers or a document without it, "revoke all")
# starts with this marker and lists every grant. The owner keeps its rights either way (as in S3).
NO_OWNER_GRANT = {"grantee": "", "permission": "NONE"}


def stored_acl(grants: list[dict[str, str]], owner: str) -> list[dict[str, str]]:
    """Grants as sent (owner's included) → the stored form (see NO_OWNER_GRANT); duplicates dropped."""
    unique: list[dict[str, str]] = []
    for g in grants:
        if g not in unique:
            unique.append(g)
    owner_full = {"grantee": owner, "permission": "FULL_CONTROL"}
    if owner_full in unique:
        return [g for g in unique if g != owner_full]
    return [NO_OWNER_GRANT, *unique]


def displayed_acl(stored: list[dict[str, str]], owner: str) -> list[dict[str, str]]:
    """The stored form → every grant, the owner's FULL_CONTROL first when it has it."""
    if stored[:1] == [NO_OWNER_GRANT]:
        return stored[1:]
    return [{"grantee": owner, "permission": "FULL_CONTROL"}, *stored]


def grants_to_others(stored: list[dict[str, str]] | None, owner: str) -> bool:
    return any(g["grantee"] not in ("", owner) for g in stored or [])


def canned_acl(name: str, owner: str, bucket_owner: str | None = None) -> list[dict[str, str]]:
    """A canned ACL's grants as S3 lists them, the owner's FULL_CONTROL included."""
    return [{"grantee": owner, "permission": "FULL_CONTROL"}, *_canned_extra(name, owner, bucket_owner)]


def _canned_extra(name: str, owner: str, bucket_owner: str | None) -> list[dict[str, str]]:
    if name == "private":
        return []
    if name == "public-read":
        return [{"grantee": ALL_USERS, "permission": "READ"}]
    if name == "public-read-write":
        return [{"grantee": ALL_USERS, "permission": "READ"}, {"grantee": ALL_USERS, "permission": "WRITE"}]
    if name == "authenticated-read":
        return [{"grantee": AUTH_USERS, "permission": "READ"}]
    if name == "log-delivery-write":
        return [{"grantee": LOG_DELIVERY, "permission": "WRITE"}, {"grantee": LOG_DELIVERY, "permission": "READ_ACP"}]
    if name in ("bucket-owner-read", "bucket-owner-full-control", "aws-exec-read"):
        if name == "bucket-owner-full-control" and bucket_owner and bucket_owner != owner:
            return [{"grantee": bucket_owner, "permission": "FULL_CONTROL"}]
        if name == "bucket-owner-read" and bucket_owner and bucket_owner != owner:
            return [{"grantee": bucket_owner, "permission": "READ"}]
        return []
    raise S3Error("InvalidArgument", f"Invalid canned ACL: {name}", ArgumentName="x-amz-acl")


def acl_from_headers(headers: dict[str, str], owner: str, bucket_owner: str | None = None) \
        -> list[dict[str, str]] | None:
    """`x-amz-acl` or `x-amz-grant-*` headers → grants; None when the request sets no ACL. A grant by
    email address comes out as {"email": …} with an empty grantee: `engine.q_resolve_grantees` resolves it."""
    canned = headers.get("x-amz-acl")
    grants: list[dict[str, str]] = []
    found = False
    for perm in PERMISSIONS:
        value = headers.get("x-amz-grant-" + perm.lower().replace("_", "-"))
        if value is None:
            continue
        found = True
        for item in value.split(","):
            kind, _, who = item.strip().partition("=")
            who = who.strip().strip('"')
            kind = kind.strip().lower()
            if (kind == "id" and who) or (kind == "uri" and who in GROUPS):
                grants.append({"grantee": who, "permission": perm})
            elif kind == "emailaddress" and who:
                grants.append({"grantee": "", "email": who, "permission": perm})
            else:
                raise S3Error("InvalidArgument", f"Invalid grantee: {item.strip()}")
    if canned is not None:
        if found:
            raise S3Error("InvalidRequest", "Specifying both Canned ACLs and Header Grants is not allowed")
        return canned_acl(canned, owner, bucket_owner)
    return grants if found else None


PUBLIC_GRANTEES = (ALL_USERS, AUTH_USERS)


def is_public_acl(grants: list[dict[str, str]] | None) -> bool:
    """An ACL is public when it grants anything to a group of everyone (anonymous or any account)."""
    return any(g["grantee"] in PUBLIC_GRANTEES for g in grants or [])


def _as_list(v: Any) -> list[Any]:
    if v is None:
        return []
    return v if isinstance(v, list) else [v]


def validate_policy(raw: bytes, bucket: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise S3Error("MalformedPolicy", "Policies must be valid JSON and the first byte must be '{'") from None
    if not isinstance(doc, dict) or "Statement" not in doc:
        raise S3Error("MalformedPolicy", "Missing required field Statement")
    stmts = _as_list(doc["Statement"])
    if not stmts:
        raise S3Error("MalformedPolicy", "Could not parse the policy: Statement is empty!")
    for st in stmts:
        if not isinstance(st, dict):
            raise S3Error("MalformedPolicy", "Statement must be an object")
        if st.get("Effect") not in ("Allow", "Deny"):
            raise S3Error("MalformedPolicy", "Invalid effect: " + str(st.get("Effect")))
        if "Principal" not in st and "NotPrincipal" not in st:
            raise S3Error("MalformedPolicy", "Missing required field Principal")
        if "Action" not in st and "NotAction" not in st:
            raise S3Error("MalformedPolicy", "Missing required field Action")
        for a in _as_list(st.get("Action")) + _as_list(st.get("NotAction")):
            if not isinstance(a, str) or not (a == "*" or a.lower().startswith("s3:")):
                raise S3Error("MalformedPolicy", f"Policy has invalid action: {a}")
        resources = _as_list(st.get("Resource")) + _as_list(st.get("NotResource"))
        if not resources:
            raise S3Error("MalformedPolicy", "Missing required field Resource")
        for r in resources:
            if not isinstance(r, str) or not r.startswith("arn:aws:s3:::"):
                raise S3Error("MalformedPolicy", f"Policy has invalid resource: {r}")
            target = r[len("arn:aws:s3:::"):].split("/", 1)[0]
            if not fnmatch.fnmatchcase(bucket, target):
                raise S3Error("MalformedPolicy", "Policy has invalid resource: it must apply to this bucket")
        cond = st.get("Condition", {})
        if not isinstance(cond, dict):
            raise S3Error("MalformedPolicy", "Condition must be an object")
        for op, body in cond.items():
            if _op_base(op) not in _OPERATORS or not isinstance(body, dict):
                raise S3Error("MalformedPolicy", f"Invalid Condition type : {op}")
    return doc


def _principal_matches(principal: Any, req: Requester) -> bool:
    if principal_is_public(principal):  # everyone, in whatever form: public by the same definition
        return True
    if isinstance(principal, dict):
        values = _as_list(principal.get("AWS")) + _as_list(principal.get("CanonicalUser"))
    else:
        values = _as_list(principal)
    for v in values:
        if req.anonymous or not isinstance(v, str):
            continue
        if v == req.project_id:
            return True
        if v.startswith("arn:aws:iam::"):
            account, _, rest = v[len("arn:aws:iam::"):].partition(":")
            if account != req.project_id:
                continue
            if rest == "root" or rest == f"user/{req.user_id}" or rest == "user/*":
                return True
    return False


def principal_is_public(principal: Any) -> bool:
    """Does this `Principal` name everyone? `"*"`, `{"AWS": "*"}`, `{"AWS": ["*"]}`, `{"CanonicalUser": "*"}`,
    any other key with "*", or an ARN whose account is a wildcard. The one definition used by the public
    access block, GetBucketPolicyStatus and the authoriser, so they can never disagree."""
    if isinstance(principal, dict):
        values = [v for vals in principal.values() for v in _as_list(vals)]
    else:
        values = _as_list(principal)
    for v in values:
        if not isinstance(v, str):
            continue
        if v.strip() == "*":
            return True
        if v.startswith("arn:aws:iam::") and any(c in v[len("arn:aws:iam::"):].partition(":")[0] for c in "*?"):
            return True
    return False


_NARROWING_KEYS = ("aws:principalaccount", "aws:sourcevpce", "aws:sourcevpc", "aws:userid", "aws:principalarn")
_EXACT_OPS = ("StringEquals", "StringEqualsIgnoreCase", "ArnEquals")


def _narrows_to_known(op: str, key: str, expected: Any) -> bool:
    """A condition that holds only for fixed callers (AWS's rule for "not public"): an exact account,
    user or endpoint, or source addresses within a /8 (IPv4) or /32 (IPv6). Negated, IfExists and
    set operators never narrow (an anonymous caller lacks the key, and they would hold)."""
    values = _as_list(expected)
    if not values or op.endswith("IfExists") or op.startswith(("ForAnyValue:", "ForAllValues:")):
        return False
    key = key.lower()
    if key == "aws:sourceip":
        if op != "IpAddress":
            return False
        try:
            nets = [ipaddress.ip_network(str(v), strict=False) for v in values]
        except ValueError:
            return False
        return all(n.prefixlen >= (8 if n.version == 4 else 32) for n in nets)
    if key in _NARROWING_KEYS and op in (*_EXACT_OPS, "StringLike", "ArnLike"):
        return all(isinstance(v, str) and v and not any(c in v for c in "*?") for v in values)
    return False


def statement_is_public(st: dict[str, Any]) -> bool:
    """Does this statement apply to everyone (anonymous included)?"""
    if "Principal" in st:
        if not principal_is_public(st["Principal"]):
            return False
    elif "NotPrincipal" not in st:
        return False
    # NotPrincipal: everyone but the named ones, hence public unless a condition narrows it
    cond = st.get("Condition") or {}
    if not isinstance(cond, dict):
        return True
    return not any(_narrows_to_known(op, key, expected) for op, body in cond.items() if isinstance(body, dict)
                   for key, expected in body.items())


def is_public_policy(doc: dict[str, Any] | None) -> bool:
    """A policy is public when one of its Allow statements is."""
    if not doc:
        return False
    return any(isinstance(st, dict) and st.get("Effect") == "Allow" and statement_is_public(st)
               for st in _as_list(doc.get("Statement")))


def _op_base(op: str) -> str:
    op = op.removeprefix("ForAnyValue:").removeprefix("ForAllValues:")
    return op.removesuffix("IfExists")


def _num(v: Any) -> float:
    return float(v)


def _date(v: Any) -> dt.datetime:
    if isinstance(v, dt.datetime):
        return v
    s = str(v)
    if s.isdigit():
        return dt.datetime.fromtimestamp(int(s), dt.UTC)
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


def _ip_in(value: Any, cidr: Any) -> bool:
    try:
        return ipaddress.ip_address(str(value)) in ipaddress.ip_network(str(cidr), strict=False)
    except ValueError:
        return False


_OPERATORS = {
    "StringEquals": lambda a, b: str(a) == str(b),
    "StringNotEquals": lambda a, b: str(a) != str(b),
    "StringEqualsIgnoreCase": lambda a, b: str(a).lower() == str(b).lower(),
    "StringNotEqualsIgnoreCase": lambda a, b: str(a).lower() != str(b).lower(),
    "StringLike": lambda a, b: fnmatch.fnmatchcase(str(a), str(b)),
    "StringNotLike": lambda a, b: not fnmatch.fnmatchcase(str(a), str(b)),
    "NumericEquals": lambda a, b: _num(a) == _num(b),
    "NumericNotEquals": lambda a, b: _num(a) != _num(b),
    "NumericLessThan": lambda a, b: _num(a) < _num(b),
    "NumericLessThanEquals": lambda a, b: _num(a) <= _num(b),
    "NumericGreaterThan": lambda a, b: _num(a) > _num(b),
    "NumericGreaterThanEquals": lambda a, b: _num(a) >= _num(b),
    "DateEquals": lambda a, b: _date(a) == _date(b),
    "DateNotEquals": lambda a, b: _date(a) != _date(b),
    "DateLessThan": lambda a, b: _date(a) < _date(b),
    "DateLessThanEquals": lambda a, b: _date(a) <= _date(b),
    "DateGreaterThan": lambda a, b: _date(a) > _date(b),
    "DateGreaterThanEquals": lambda a, b: _date(a) >= _date(b),
    "Bool": lambda a, b: str(a).lower() == str(b).lower(),
    "IpAddress": _ip_in,
    "NotIpAddress": lambda a, b: not _ip_in(a, b),
    "ArnEquals": lambda a, b: str(a) == str(b),
    "ArnLike": lambda a, b: fnmatch.fnmatchcase(str(a), str(b)),
    "Null": None,  # handled apart
}
_NEGATED = {"StringNotEquals", "StringNotEqualsIgnoreCase", "StringNotLike", "NumericNotEquals", "DateNotEquals",
            "NotIpAddress"}


def _conditions_hold(cond: dict[str, Any], ctx: dict[str, Any]) -> bool:
    for op, body in cond.items():
        base = _op_base(op)
        if_exists = op.endswith("IfExists")
        for key, expected in body.items():
            actual = ctx.get(key.lower())
            if base == "Null":
                want_null = str(_as_list(expected)[0]).lower() == "true"
                if (actual is None) != want_null:
                    return False
                continue
            if actual is None:
                if if_exists or base in _NEGATED:
                    continue
                return False
            fn = _OPERATORS[base]
            assert fn is not None
            expected_values = _as_list(expected)
            actual_values = _as_list(actual)
            try:
                if base in _NEGATED:
                    ok = all(fn(a, e) for a in actual_values for e in expected_values)
                else:
                    ok = any(fn(a, e) for a in actual_values for e in expected_values)
            except (ValueError, TypeError):
                ok = False
            if not ok:
                return False
    return True


def _action_matches(patterns: list[Any], action: str) -> bool:
    a = action.lower()
    return any(isinstance(p, str) and fnmatch.fnmatchcase(a, p.lower()) for p in patterns)


def _resource_matches(patterns: list[Any], arn: str) -> bool:
    return any(isinstance(p, str) and fnmatch.fnmatchcase(arn, p) for p in patterns)


def evaluate_policy(doc: dict[str, Any] | None, req: Requester, action: str, arn: str,
                    ctx: dict[str, Any], ignore_public: bool) -> str | None:
    """'Deny', 'Allow' or None (no statement applies)."""
    if not doc:
        return None
    allowed = False
    for st in _as_list(doc.get("Statement")):
        if "Principal" in st:
            if not _principal_matches(st["Principal"], req):
                continue
        elif _principal_matches(st.get("NotPrincipal"), req):
            continue
        public = statement_is_public(st)
        if "Action" in st:
            if not _action_matches(_as_list(st["Action"]), action):
                continue
        elif _action_matches(_as_list(st.get("NotAction")), action):
            continue
        if "Resource" in st:
            if not _resource_matches(_as_list(st["Resource"]), arn):
                continue
        elif _resource_matches(_as_list(st.get("NotResource")), arn):
            continue
        if not _conditions_hold(st.get("Condition", {}), ctx):
            continue
        if st.get("Effect") == "Deny":
            return "Deny"
        if public and ignore_public:
            continue
        allowed = True
    return "Allow" if allowed else None


# which ACL permission an action needs, on the bucket ("b") or the object ("o") ACL
_ACL_NEEDS = {
    "s3:ListBucket": ("b", "READ"), "s3:ListBucketVersions": ("b", "READ"),
    "s3:ListBucketMultipartUploads": ("b", "READ"),
    "s3:PutObject": ("b", "WRITE"), "s3:DeleteObject": ("b", "WRITE"), "s3:DeleteObjectVersion": ("b", "WRITE"),
    "s3:AbortMultipartUpload": ("b", "WRITE"), "s3:ListMultipartUploadParts": ("b", "WRITE"),
    "s3:GetBucketAcl": ("b", "READ_ACP"), "s3:PutBucketAcl": ("b", "WRITE_ACP"),
    "s3:GetObject": ("o", "READ"), "s3:GetObjectVersion": ("o", "READ"), "s3:GetObjectAttributes": ("o", "READ"),
    "s3:GetObjectAcl": ("o", "READ_ACP"), "s3:GetObjectVersionAcl": ("o", "READ_ACP"),
    "s3:PutObjectAcl": ("o", "WRITE_ACP"), "s3:PutObjectVersionAcl": ("o", "WRITE_ACP"),
    "s3:GetObjectTagging": ("o", "READ"), "s3:GetBucketLocation": ("b", "READ"),
}


def acl_allows(grants: list[dict[str, str]] | None, req: Requester, permission: str, ignore_public: bool) -> bool:
    for g in grants or []:
        if g["permission"] not in (permission, "FULL_CONTROL"):
            continue
        who = g["grantee"]
        if who == ALL_USERS and not ignore_public:
            return True
        if who == AUTH_USERS and not req.anonymous and not ignore_public:
            return True
        if req.project_id is not None and who == req.project_id:
            return True
    return False


def authorize(*, req: Requester, action: str, bucket_name: str, bucket_owner: str, policy: dict[str, Any] | None,
              bucket_acl: list[dict[str, str]] | None, object_acl: list[dict[str, str]] | None, key: str | None,
              ctx: dict[str, Any], ignore_public_policy: bool, ignore_public_acls: bool,
              object_owner: str | None = None) -> None:
    """Raise AccessDenied unless `req` may perform `action`. `object_owner`: the project owning the object
    when it is not the bucket's (written under ObjectWriter ownership): as in S3 it may always read and
    change the object's ACL, and holds FULL_CONTROL unless its ACL says otherwise."""
    if not req.anonymous:
        if req.read_only and action not in READ_ACTIONS:
            raise S3Error("AccessDenied", "This access key is read-only")
        if req.buckets is not None and bucket_name not in req.buckets:
            raise S3Error("AccessDenied", "This access key is not allowed to use this bucket")
    arn = f"arn:aws:s3:::{bucket_name}" + (f"/{key}" if key is not None else "")
    decision = evaluate_policy(policy, req, action, arn, ctx, ignore_public_policy)
    if decision == "Deny":
        raise access_denied()
    if req.project_id == bucket_owner or decision == "Allow":
        return
    need = _ACL_NEEDS.get(action)
    if need is not None:
        where, perm = need
        owner_may = perm in ("READ_ACP", "WRITE_ACP") or (object_acl or [])[:1] != [NO_OWNER_GRANT]
        if where == "o" and object_owner is not None and req.project_id == object_owner and owner_may:
            return
        grants = bucket_acl if where == "b" else object_acl
        if acl_allows(grants, req, perm, ignore_public_acls):
            return
        if where == "o" and object_acl is None and acl_allows(bucket_acl, req, "FULL_CONTROL", ignore_public_acls):
            return
    raise access_denied()
