"""Function rules: functions, code, versions, aliases, triggers, invocation records; and the plain functions
the invoker calls (``resolve``, ``resolve_http_trigger``, ``due_schedules``, ``object_triggers``,
``queue_triggers``, ``record_invocation``). The queue service is in :mod:`hackboot.functions.queues`.

Every change runs in one short transaction with its quota claim and its event. Code is checked and unpacked
*outside* any transaction (``codepkg.unpack``), stored under ``state_dir/functions/<project>/<function>/``
as ``<sha256>.zip`` (a single-file upload is wrapped in a zip, so one form is stored) next to the unpacked
tree ``<sha256>/`` the engine mounts read-only; the row then points at it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import io
import json
import os
import random
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Select, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from hackboot.core import errors, quotas
from hackboot.core.auth import Principal
from hackboot.core.config import get_settings
from hackboot.core.crypto import hash_token, new_secret, seal, unseal
from hackboot.core.db import session_scope, utcnow
from hackboot.core.ids import new_id
from hackboot.core.workers import Loop
from hackboot.events.service import emit
from hackboot.functions import codepkg, schedule
from hackboot.functions.models import (
    LATEST,
    Function,
    FunctionAlias,
    FunctionTrigger,
    FunctionVersion,
    Invocation,
    Queue,
)
from hackboot.objectstore import service as objectstore

MAX_CODE_BYTES = 50 * 1024 * 1024
MAX_ENV_BYTES = 4096
MAX_SECRETS_BYTES = 4096
MEMORY_MIN, MEMORY_MAX, MEMORY_STEP = 128, 4096, 64
TIMEOUT_MAX_S = 900
MAX_CONCURRENCY = 1000
MAX_LOG_CHARS = 64 * 1024  # of one invocation record (the engine cuts output earlier; this bounds the row)
INVOCATION_RETENTION_DAYS = 14
OBJECT_EVENTS = ("created", "deleted")
HTTP_AUTH = ("none", "token")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Set by the runtime for every invocation (AWS's own variables are reserved in Lambda too).
_RESERVED_ENV = re.compile(r"^(AWS_|LAMBDA_|HACKBOOT_|_HANDLER$|LD_|PATH$|HOME$|PYTHONPATH$|NODE_OPTIONS$)")
_HANDLER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,126}\.[A-Za-z_$][A-Za-z0-9_$]{0,63}$")
_DEFAULT_RUNTIME = re.compile(r"^(python3\.\d{1,2}|nodejs\d{2})$")
_VERSION_QUALIFIER = re.compile(r"^[1-9][0-9]{0,8}$")

_runtime_source: Callable[[], list[str]] | None = None


def register_runtime_source(fn: Callable[[], list[str]]) -> None:
    """The engine side tells which runtime names functions may use (the host's detected runtimes).

    Without one, names of the forms ``python3.N`` and ``nodejsNN`` are accepted."""
    global _runtime_source
    _runtime_source = fn


def _invalid(field_name: str, msg: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(msg, errors=[{"loc": ["body", field_name], "msg": msg}])


# ==================================================================================================
# Checks of configuration
# ==================================================================================================

def check_runtime(runtime: str) -> str:
    if _runtime_source is not None:
        known = sorted(_runtime_source())
        if runtime not in known:
            raise _invalid("runtime", f"Unknown runtime '{runtime[:40]}': one of {', '.join(known) or '(none)'}")
    elif not _DEFAULT_RUNTIME.fullmatch(runtime):
        raise _invalid("runtime", f"Unknown runtime '{runtime[:40]}': such as python3.11 or nodejs20")
    return runtime


def check_handler(handler: str, runtime: str) -> str:
    """python: "module.function" (dotted module path allowed); nodejs: "file.export"."""
    if not _HANDLER.fullmatch(handler) or ".." in handler or handler.startswith("/"):
        raise _invalid("handler", f"'{handler[:80]}' is not a handler such as 'main.handler' (a module or file "
                                  "name, a dot, a function name)")
    if runtime.startswith("python") and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+",
                                                         handler):
        raise _invalid("handler", f"'{handler[:80]}' is not a Python handler 'module.function'")
    return handler


def check_memory(memory_mb: int) -> int:
    if not MEMORY_MIN <= memory_mb <= MEMORY_MAX or memory_mb % MEMORY_STEP:
        raise _invalid("memory_mb", f"memory_mb is {MEMORY_MIN} to {MEMORY_MAX}, a multiple of {MEMORY_STEP}")
    return memory_mb


def check_timeout(timeout_s: int) -> int:
    if not 1 <= timeout_s <= TIMEOUT_MAX_S:
        raise _invalid("timeout_s", f"timeout_s is 1 to {TIMEOUT_MAX_S} seconds")
    return timeout_s


def _check_vars(values: dict[str, str], field_name: str, limit: int) -> dict[str, str]:
    size = 0
    for name, value in values.items():
        if not _ENV_NAME.fullmatch(name):
            raise _invalid(field_name, f"'{name[:80]}' is not a variable name (letters, digits, '_'; not first "
                                       "a digit)")
        if _RESERVED_ENV.match(name):
            raise _invalid(field_name, f"'{name}' is reserved by the runtime")
        if not isinstance(value, str):
            raise _invalid(field_name, f"the value of '{name}' must be a string")
        size += len(name.encode()) + len(value.encode())
    if size > limit:
        raise _invalid(field_name, f"{field_name} hold at most {limit} bytes of names and values, not {size}")
    return dict(values)


def check_environment(env: dict[str, str]) -> dict[str, str]:
    return _check_vars(env, "environment", MAX_ENV_BYTES)


def check_secrets(secrets_: dict[str, str], env: dict[str, str]) -> dict[str, str]:
    checked = _check_vars(secrets_, "secrets", MAX_SECRETS_BYTES)
    both = sorted(set(checked) & set(env))
    if both:
        raise _invalid("secrets", f"{', '.join(both)} named both as a variable and as a secret")
    return checked


def _check_concurrency(s: Session, project_id: str, reserved: int, maximum: int) -> None:
    if not 1 <= maximum <= MAX_CONCURRENCY:
        raise _invalid("max_concurrency", f"max_concurrency is 1 to {MAX_CONCURRENCY}")
    if not 0 <= reserved <= maximum:
        raise _invalid("reserved_concurrency", "reserved_concurrency is 0 to max_concurrency")
    row = s.get(quotas.QuotaUsage, (project_id, "function_concurrency"))
    if row is not None and maximum > row.limit:
        raise errors.QuotaExceeded(f"max_concurrency {maximum} is over the project's function_concurrency quota "
                                   f"of {row.limit}")


def _seal_secrets(function_id: str, secrets_: dict[str, str]) -> str:
    return seal(json.dumps(secrets_, sort_keys=True).encode(), function_id.encode()) if secrets_ else ""


def _unseal_secrets(function_id: str, sealed: str) -> dict[str, str]:
    if not sealed:
        return {}
    value: dict[str, str] = json.loads(unseal(sealed, function_id.encode()))
    return value


# ==================================================================================================
# Lookups
# ==================================================================================================

def _by_ref(s: Session, stmt: Select[Any], model: Any, ref: str, what: str) -> Any:
    row = s.scalar(stmt.where(model.id == ref))
    if row is None:
        row = s.scalar(stmt.where(model.name == ref))
    if row is None:
        raise errors.NotFound(f"{what} {ref[:80]} not found")
    return row


def get_function(s: Session, p: Principal, ref: str) -> Function:
    """By id or name; another project's function is a 404 like a missing one."""
    fn: Function = _by_ref(s, select(Function).where(Function.project_id == p.project), Function, ref, "Function")
    return fn


def _lock_function(s: Session, p: Principal, ref: str) -> Function:
    fn_id = get_function(s, p, ref).id
    fn = s.scalar(select(Function).where(Function.id == fn_id).with_for_update()
                  .execution_options(populate_existing=True))
    if fn is None:
        raise errors.NotFound(f"Function {ref[:80]} not found")
    return fn


def get_version(s: Session, fn: Function, number: int) -> FunctionVersion:
    row = s.scalar(select(FunctionVersion).where(FunctionVersion.function_id == fn.id,
                                                 FunctionVersion.number == number))
    if row is None:
        raise errors.NotFound(f"Version {number} of function {fn.name} not found")
    return row


def get_alias(s: Session, fn: Function, name: str) -> FunctionAlias:
    row = s.scalar(select(FunctionAlias).where(FunctionAlias.function_id == fn.id, FunctionAlias.name == name))
    if row is None:
        raise errors.NotFound(f"Alias {name[:80]} of function {fn.name} not found")
    return row


def get_trigger(s: Session, fn: Function, trigger_id: str) -> FunctionTrigger:
    row = s.scalar(select(FunctionTrigger).where(FunctionTrigger.function_id == fn.id,
                                                 FunctionTrigger.id == trigger_id))
    if row is None:
        raise errors.NotFound(f"Trigger {trigger_id[:80]} not found")
    return row


def _event(s: Session, fn: Function, verb: str, actor: str, **data: Any) -> None:
    emit(s, f"function.{verb}", resource_type="function", resource_id=fn.id, project_id=fn.project_id,
         actor=actor, data=data)


def _flush(s: Session, conflict: str) -> None:
    try:
        s.flush()
    except IntegrityError:
        raise errors.Conflict(conflict, code="name_in_use") from None


def function_query(p: Principal, *, name: str | None = None, runtime: str | None = None) -> Select[Function]:
    stmt = select(Function).where(Function.project_id == p.project)
    if name:
        stmt = stmt.where(Function.name == name)
    if runtime:
        stmt = stmt.where(Function.runtime == runtime)
    return stmt


# ==================================================================================================
# Functions
# ==================================================================================================

def create_function(p: Principal, *, name: str, runtime: str, handler: str, memory_mb: int = 128,
                    timeout_s: int = 3, environment: dict[str, str] | None = None,
                    secrets: dict[str, str] | None = None, network_egress: bool = False,
                    reserved_concurrency: int = 0, max_concurrency: int = 10, description: str = "",
                    dead_letter_queue: str | None = None) -> Function:
    """A function without code yet (upload it with :func:`upload_code`); its secrets are sealed.
    `dead_letter_queue`: a queue of the project receiving the events of asynchronous invocations that
    failed every attempt."""
    check_runtime(runtime)
    check_handler(handler, runtime)
    check_memory(memory_mb)
    check_timeout(timeout_s)
    env = check_environment(environment or {})
    sec = check_secrets(secrets or {}, env)
    with session_scope() as s:
        _check_concurrency(s, p.project, reserved_concurrency, max_concurrency)
        if s.scalar(select(Function.id).where(Function.project_id == p.project, Function.name == name)):
            raise errors.Conflict(f"A function is named '{name}' already", code="name_in_use")
        dlq_id = _dead_letter_queue(s, p, dead_letter_queue)
        quotas.claim(s, p.project, "functions", 1)
        quotas.claim(s, p.project, "function_concurrency", reserved_concurrency)
        fn_id = new_id("fn")
        fn = Function(id=fn_id, project_id=p.project, name=name, description=description, runtime=runtime,
                      handler=handler, memory_mb=memory_mb, timeout_s=timeout_s, environment=env,
                      secret_names=sorted(sec), secrets_sealed=_seal_secrets(fn_id, sec),
                      network_egress=network_egress, reserved_concurrency=reserved_concurrency,
                      max_concurrency=max_concurrency, dead_letter_queue_id=dlq_id, created_by=p.user_id)
        s.add(fn)
        _flush(s, f"A function is named '{name}' already")
        _event(s, fn, "created", p.user_id, name=name, runtime=runtime, handler=handler, memory_mb=memory_mb,
               timeout_s=timeout_s, environment=sorted(env), secrets=sorted(sec))
    return fn


def _dead_letter_queue(s: Session, p: Principal, ref: str | None) -> str | None:
    if not ref:
        return None
    from hackboot.functions import queues

    return queues.get_queue(s, p, ref).id


def update_function(p: Principal, ref: str, changes: dict[str, Any]) -> Function:
    """Change $LATEST's configuration. `secrets` replaces the whole set (names with values); environment too."""
    with session_scope() as s:
        fn = _lock_function(s, p, ref)
        runtime = check_runtime(changes["runtime"]) if "runtime" in changes else fn.runtime
        if "handler" in changes or "runtime" in changes:
            check_handler(changes.get("handler", fn.handler), runtime)
        if "memory_mb" in changes:
            check_memory(changes["memory_mb"])
        if "timeout_s" in changes:
            check_timeout(changes["timeout_s"])
        env = check_environment(changes["environment"]) if "environment" in changes else dict(fn.environment)
        shown: dict[str, Any] = {k: v for k, v in changes.items() if k not in ("secrets", "environment")}
        if "environment" in changes:
            shown["environment"] = sorted(env)
        if "secrets" in changes:
            sec = check_secrets(changes["secrets"], env)
            fn.secrets_sealed = _seal_secrets(fn.id, sec)
            fn.secret_names = sorted(sec)
            shown["secrets"] = sorted(sec)
        elif "environment" in changes:
            both = sorted(set(env) & set(fn.secret_names))
            if both:
                raise _invalid("environment", f"{', '.join(both)} named both as a variable and as a secret")
        reserved = changes.get("reserved_concurrency", fn.reserved_concurrency)
        maximum = changes.get("max_concurrency", fn.max_concurrency)
        _check_concurrency(s, p.project, reserved, maximum)
        if reserved > fn.reserved_concurrency:
            quotas.claim(s, p.project, "function_concurrency", reserved - fn.reserved_concurrency)
        else:
            quotas.release(s, p.project, "function_concurrency", fn.reserved_concurrency - reserved)
        if "name" in changes and changes["name"] != fn.name and s.scalar(
                select(Function.id).where(Function.project_id == p.project, Function.name == changes["name"])):
            raise errors.Conflict(f"A function is named '{changes['name']}' already", code="name_in_use")
        for key in ("name", "description", "runtime", "handler", "memory_mb", "timeout_s", "network_egress",
                    "reserved_concurrency", "max_concurrency"):
            if key in changes:
                setattr(fn, key, changes[key])
        if "dead_letter_queue" in changes:  # "" removes it
            fn.dead_letter_queue_id = _dead_letter_queue(s, p, changes["dead_letter_queue"] or None)
        fn.environment = env
        fn.revision += 1
        fn.updated_at = utcnow()
        _flush(s, f"A function is named '{changes.get('name')}' already")
        _event(s, fn, "updated", p.user_id, **shown)
    return fn


def _code_root(project_id: str, function_id: str) -> Path:
    return Path(get_settings().state_dir) / "functions" / project_id / function_id


def _single_file_zip(data: bytes, filename: str) -> bytes:
    """A zip of one file with a fixed date: the same upload gives the same bytes (and sha256)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        info = zipfile.ZipInfo(filename, date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        info.create_system = 3
        archive.writestr(info, data)
    return buf.getvalue()


def upload_code(p: Principal, ref: str, data: bytes, *, filename: str | None = None) -> Function:
    """Check and store a package (zip, or one source file named `filename`), then point $LATEST at it.

    Refusals (`InvalidPackage`) are a 422 and leave the function as it was."""
    if len(data) > MAX_CODE_BYTES:
        raise errors.PayloadTooLarge(f"A code package is at most {MAX_CODE_BYTES} bytes")
    if not data:
        raise _invalid("body", "The code package is empty")
    with session_scope(write=False) as s:
        fn = get_function(s, p, ref)
        fn_id, project_id = fn.id, fn.project_id
    is_zip = data[:4] in (b"PK\x03\x04", b"PK\x05\x06") and zipfile.is_zipfile(io.BytesIO(data))
    stored = data if is_zip else None
    root = _code_root(project_id, fn_id)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=root))
    try:
        try:
            codepkg.unpack(data, staging / "tree", filename=None if is_zip else filename)
        except codepkg.InvalidPackage as exc:
            raise _invalid("body", f"Invalid code package: {exc}") from None
        if stored is None:
            stored = _single_file_zip(data, cast(str, filename))
        sha = hashlib.sha256(stored).hexdigest()
        tree, archive = root / sha, root / f"{sha}.zip"
        if not archive.exists():
            (staging / "code.zip").write_bytes(stored)
            os.replace(staging / "code.zip", archive)
        if not tree.exists():
            os.rename(staging / "tree", tree)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    with session_scope() as s:
        fn = _lock_function(s, p, fn_id)
        fn.code_sha256, fn.code_size = sha, len(stored)
        fn.revision += 1
        fn.updated_at = utcnow()
        _event(s, fn, "code_uploaded", p.user_id, code_sha256=sha, code_size=len(stored))
    return fn


def code_paths(fn_project: str, fn_id: str, sha: str) -> tuple[Path, Path]:
    """The stored zip and the unpacked tree of a code package."""
    root = _code_root(fn_project, fn_id)
    return root / f"{sha}.zip", root / sha


def delete_function(p: Principal, ref: str) -> Function:
    """The function, its versions, aliases and triggers go; its stored code is removed after the commit."""
    with session_scope() as s:
        fn = _lock_function(s, p, ref)
        triggers = s.scalar(select(func.count()).select_from(FunctionTrigger)
                            .where(FunctionTrigger.function_id == fn.id)) or 0
        s.execute(delete(FunctionTrigger).where(FunctionTrigger.function_id == fn.id))
        s.execute(delete(FunctionAlias).where(FunctionAlias.function_id == fn.id))
        s.execute(delete(FunctionVersion).where(FunctionVersion.function_id == fn.id))
        s.delete(fn)
        quotas.release(s, p.project, "functions", 1)
        quotas.release(s, p.project, "function_triggers", triggers)
        quotas.release(s, p.project, "function_concurrency", fn.reserved_concurrency)
        _event(s, fn, "deleted", p.user_id, name=fn.name)
    shutil.rmtree(_code_root(fn.project_id, fn.id), ignore_errors=True)
    return fn


# ==================================================================================================
# Versions and aliases
# ==================================================================================================

def publish_version(p: Principal, ref: str, *, description: str = "") -> FunctionVersion:
    """Freeze $LATEST's code and configuration as the next version number. When nothing changed since the
    newest version, that version is returned instead of a copy of it (as Lambda does)."""
    with session_scope() as s:
        fn = _lock_function(s, p, ref)
        if not fn.code_sha256:
            raise errors.Conflict(f"Function {fn.name} has no code yet: upload it first", code="no_code")
        newest = s.scalar(select(FunctionVersion).where(FunctionVersion.function_id == fn.id,
                                                        FunctionVersion.number == fn.last_version))
        if newest is not None and _same_as_latest(newest, fn):
            return newest
        fn.last_version += 1
        version = FunctionVersion(
            id=new_id("fnv"), project_id=fn.project_id, function_id=fn.id, number=fn.last_version,
            description=description, runtime=fn.runtime, handler=fn.handler, memory_mb=fn.memory_mb,
            timeout_s=fn.timeout_s, environment=dict(fn.environment), secret_names=list(fn.secret_names),
            secrets_sealed=fn.secrets_sealed, network_egress=fn.network_egress, code_sha256=fn.code_sha256,
            code_size=fn.code_size, created_by=p.user_id)
        s.add(version)
        _flush(s, "A version was published at the same time: retry")
        _event(s, fn, "version_published", p.user_id, version=version.number, code_sha256=fn.code_sha256)
    return version


def _same_as_latest(version: FunctionVersion, fn: Function) -> bool:
    # The sealed secrets are compared as stored: a version copies the blob, and any change re-seals it.
    return (version.code_sha256, version.runtime, version.handler, version.memory_mb, version.timeout_s,
            version.environment, version.secrets_sealed, version.network_egress) == (
        fn.code_sha256, fn.runtime, fn.handler, fn.memory_mb, fn.timeout_s, fn.environment, fn.secrets_sealed,
        fn.network_egress)


def version_query(fn: Function) -> Select[FunctionVersion]:
    return select(FunctionVersion).where(FunctionVersion.function_id == fn.id)


def _check_alias(s: Session, fn: Function, version: int, additional: int | None, weight: float) -> None:
    get_version(s, fn, version)
    if additional is None:
        if weight:
            raise _invalid("weight", "weight is for additional_version: give one")
        return
    get_version(s, fn, additional)
    if additional == version:
        raise _invalid("additional_version", "additional_version differs from version")
    if not 0.0 < weight < 1.0:
        raise _invalid("weight", "weight (the share of additional_version) is between 0 and 1, exclusive")


def set_alias(p: Principal, ref: str, name: str, *, version: int, additional_version: int | None = None,
              weight: float = 0.0, description: str | None = None) -> tuple[FunctionAlias, bool]:
    """Create or update alias `name`; returns (alias, created)."""
    if name == LATEST or _VERSION_QUALIFIER.fullmatch(name):
        raise _invalid("name", "An alias name is not a version number nor $LATEST")
    with session_scope() as s:
        fn = _lock_function(s, p, ref)
        _check_alias(s, fn, version, additional_version, weight)
        alias = s.scalar(select(FunctionAlias).where(FunctionAlias.function_id == fn.id,
                                                     FunctionAlias.name == name))
        created = alias is None
        if alias is None:
            alias = FunctionAlias(id=new_id("fna"), project_id=fn.project_id, function_id=fn.id, name=name)
            s.add(alias)
        alias.version, alias.additional_version, alias.weight = version, additional_version, weight
        if description is not None:
            alias.description = description
        alias.updated_at = utcnow()
        _flush(s, f"Alias {name} was created at the same time: retry")
        _event(s, fn, "alias_set", p.user_id, alias=name, version=version, additional_version=additional_version,
               weight=weight)
    return alias, created


def delete_alias(p: Principal, ref: str, name: str) -> FunctionAlias:
    with session_scope() as s:
        fn = _lock_function(s, p, ref)
        alias = get_alias(s, fn, name)
        users = sorted(s.scalars(select(FunctionTrigger.id).where(FunctionTrigger.function_id == fn.id,
                                                                  FunctionTrigger.qualifier == name)))
        if users:
            raise errors.Conflict(f"Alias {name} is used by trigger {', '.join(users)}", code="in_use")
        s.delete(alias)
        _event(s, fn, "alias_deleted", p.user_id, alias=name)
    return alias


def alias_query(fn: Function) -> Select[FunctionAlias]:
    return select(FunctionAlias).where(FunctionAlias.function_id == fn.id)


def _check_qualifier(s: Session, fn: Function, qualifier: str) -> str:
    if qualifier == LATEST:
        return qualifier
    if _VERSION_QUALIFIER.fullmatch(qualifier):
        get_version(s, fn, int(qualifier))
    else:
        get_alias(s, fn, qualifier)
    return qualifier


# ==================================================================================================
# Triggers
# ==================================================================================================

@dataclass
class TriggerRequest:
    kind: str
    qualifier: str = LATEST
    enabled: bool = True
    description: str = ""
    auth: str = "none"  # http
    schedule: str = ""  # schedule
    bucket: str = ""  # object_storage
    events: list[str] = field(default_factory=lambda: ["created"])
    prefix: str = ""
    suffix: str = ""
    queue: str = ""  # queue (id or name)
    batch_size: int = 1


def create_trigger(p: Principal, ref: str, req: TriggerRequest) -> tuple[FunctionTrigger, str | None]:
    """A trigger; returns it and, for an http trigger with token auth, the token (shown once, stored hashed)."""
    token = None
    with session_scope() as s:
        fn = _lock_function(s, p, ref)
        _check_qualifier(s, fn, req.qualifier)
        trig = FunctionTrigger(id=new_id("fnt"), project_id=fn.project_id, function_id=fn.id, kind=req.kind,
                               qualifier=req.qualifier, enabled=req.enabled, description=req.description,
                               created_by=p.user_id)
        if req.kind == "http":
            if req.auth not in HTTP_AUTH:
                raise _invalid("auth", f"auth is one of {', '.join(HTTP_AUTH)}")
            trig.auth = req.auth
            if req.auth == "token":
                token = new_secret("hbfn_")
                trig.token_hash = hash_token(token)
        elif req.kind == "schedule":
            try:
                parsed = schedule.parse(req.schedule)
            except schedule.InvalidSchedule as exc:
                raise _invalid("schedule", str(exc)) from None
            trig.schedule = parsed.expression
            trig.next_fire_at = parsed.next_after(utcnow())
        elif req.kind == "object_storage":
            objectstore.get_bucket(s, p, req.bucket)
            events = sorted(set(req.events))
            if not events or any(e not in OBJECT_EVENTS for e in events):
                raise _invalid("events", f"events are some of {', '.join(OBJECT_EVENTS)}")
            trig.bucket, trig.events, trig.prefix, trig.suffix = req.bucket, events, req.prefix, req.suffix
        elif req.kind == "queue":
            from hackboot.functions import queues

            queue = queues.get_queue(s, p, req.queue)
            if not 1 <= req.batch_size <= 10:
                raise _invalid("batch_size", "batch_size is 1 to 10")
            trig.queue_id, trig.batch_size = queue.id, req.batch_size
        else:
            raise _invalid("kind", "kind is one of http, schedule, object_storage, queue")
        quotas.claim(s, p.project, "function_triggers", 1)
        s.add(trig)
        _event(s, fn, "trigger_created", p.user_id, trigger_id=trig.id, kind=req.kind, qualifier=req.qualifier)
    return trig, token


def update_trigger(p: Principal, ref: str, trigger_id: str, *, enabled: bool | None = None,
                   description: str | None = None, qualifier: str | None = None) -> FunctionTrigger:
    with session_scope() as s:
        fn = _lock_function(s, p, ref)
        trig = get_trigger(s, fn, trigger_id)
        changes: dict[str, Any] = {}
        if qualifier is not None:
            trig.qualifier = changes["qualifier"] = _check_qualifier(s, fn, qualifier)
        if description is not None:
            trig.description = changes["description"] = description
        if enabled is not None and enabled != trig.enabled:
            trig.enabled = changes["enabled"] = enabled
            if enabled and trig.kind == "schedule":
                # Re-enabled: the next period from now, not every period missed while disabled.
                trig.next_fire_at = schedule.parse(trig.schedule).next_after(utcnow())
        trig.updated_at = utcnow()
        _event(s, fn, "trigger_updated", p.user_id, trigger_id=trig.id, **changes)
    return trig


def delete_trigger(p: Principal, ref: str, trigger_id: str) -> FunctionTrigger:
    with session_scope() as s:
        fn = _lock_function(s, p, ref)
        trig = get_trigger(s, fn, trigger_id)
        s.delete(trig)
        quotas.release(s, p.project, "function_triggers", 1)
        _event(s, fn, "trigger_deleted", p.user_id, trigger_id=trig.id, kind=trig.kind)
    return trig


def trigger_query(fn: Function, *, kind: str | None = None) -> Select[FunctionTrigger]:
    stmt = select(FunctionTrigger).where(FunctionTrigger.function_id == fn.id)
    if kind:
        stmt = stmt.where(FunctionTrigger.kind == kind)
    return stmt


def queue_names(s: Session, queue_ids: list[str]) -> dict[str, str]:
    if not queue_ids:
        return {}
    return {row[0]: row[1] for row in s.execute(select(Queue.id, Queue.name).where(Queue.id.in_(queue_ids)))}


# ==================================================================================================
# For the invoker
# ==================================================================================================

@dataclass(frozen=True)
class ResolvedVersion:
    """Everything the invoker needs to run one version of a function (the engine's FunctionSpec and more)."""

    function_id: str
    function_name: str
    project_id: str
    version: str  # "$LATEST" or the version number, as text
    version_id: str  # identity of this code + configuration: the engine's warm pool key
    runtime: str
    handler: str
    memory_mb: int
    timeout_s: int
    env: dict[str, str]  # environment variables and unsealed secrets
    network: bool
    reserved_concurrency: int
    max_concurrency: int
    code_sha256: str
    code_zip: Path  # the stored package
    code_dir: Path  # its unpacked tree (read-only to the engine)


@dataclass(frozen=True)
class HttpAuth:
    kind: str  # none | token
    token_hash: str

    def allows(self, presented: str | None) -> bool:
        """Whether a request presenting `presented` (a bearer token, or None) may invoke."""
        if self.kind == "none":
            return True
        return presented is not None and hmac.compare_digest(hash_token(presented), self.token_hash)


def _resolved(fn: Function, version: FunctionVersion | None) -> ResolvedVersion:
    src: Function | FunctionVersion = version if version is not None else fn
    if not src.code_sha256:
        raise errors.Conflict(f"Function {fn.name} has no code yet", code="no_code")
    env = dict(src.environment)
    env.update(_unseal_secrets(fn.id, src.secrets_sealed))
    code_zip, code_dir = code_paths(fn.project_id, fn.id, src.code_sha256)
    return ResolvedVersion(
        function_id=fn.id, function_name=fn.name, project_id=fn.project_id,
        version=str(version.number) if version is not None else LATEST,
        version_id=version.id if version is not None else f"{fn.id}.latest.{fn.revision}",
        runtime=src.runtime, handler=src.handler, memory_mb=src.memory_mb, timeout_s=src.timeout_s, env=env,
        network=src.network_egress, reserved_concurrency=fn.reserved_concurrency,
        max_concurrency=fn.max_concurrency, code_sha256=src.code_sha256, code_zip=code_zip, code_dir=code_dir)


def _resolve_in(s: Session, fn: Function, qualifier: str | None, rng: Callable[[], float]) -> ResolvedVersion:
    if qualifier in (None, "", LATEST):
        return _resolved(fn, None)
    assert qualifier is not None
    if _VERSION_QUALIFIER.fullmatch(qualifier):
        return _resolved(fn, get_version(s, fn, int(qualifier)))
    alias = get_alias(s, fn, qualifier)
    number = alias.version
    if alias.additional_version is not None and rng() < alias.weight:
        number = alias.additional_version
    return _resolved(fn, get_version(s, fn, number))


def resolve(project_id: str | None, function_ref: str, qualifier: str | None = None, *,
            rng: Callable[[], float] = random.random) -> ResolvedVersion:
    """The version to run for `function_ref` (id, or name within `project_id`) at `qualifier` ($LATEST, a
    version number or an alias; a weighted alias picks its additional version with its weight).

    `project_id` None: any project's function by id (the invoker's internal callers). NotFound when the
    function, version or alias does not exist (or belongs to another project); Conflict when it has no code."""
    with session_scope(write=False) as s:
        stmt = select(Function)
        if project_id is not None:
            stmt = stmt.where(Function.project_id == project_id)
        fn = s.scalar(stmt.where(Function.id == function_ref))
        if fn is None and project_id is not None:
            fn = s.scalar(stmt.where(Function.name == function_ref))
        if fn is None:
            raise errors.NotFound(f"Function {function_ref[:80]} not found")
        return _resolve_in(s, fn, qualifier, rng)


def resolve_http_trigger(trigger_id: str) -> tuple[ResolvedVersion, HttpAuth]:
    """The version behind an enabled http trigger, and how a request must authenticate (NotFound otherwise:
    a disabled trigger answers like a missing one)."""
    with session_scope(write=False) as s:
        trig = s.scalar(select(FunctionTrigger).where(FunctionTrigger.id == trigger_id,
                                                      FunctionTrigger.kind == "http", FunctionTrigger.enabled))
        if trig is None:
            raise errors.NotFound(f"Trigger {trigger_id[:80]} not found")
        fn = s.get(Function, trig.function_id)
        if fn is None:
            raise errors.NotFound(f"Trigger {trigger_id[:80]} not found")
        return _resolve_in(s, fn, trig.qualifier, random.random), HttpAuth(trig.auth, trig.token_hash)


@dataclass(frozen=True)
class TriggerTarget:
    """A trigger to invoke: the function (by id) at its qualifier."""

    trigger_id: str
    function_id: str
    project_id: str
    qualifier: str
    scheduled_at: dt.datetime | None = None  # schedule: the period claimed
    queue_id: str | None = None
    batch_size: int = 1


def due_schedules(now: dt.datetime | None = None, limit: int = 100,
                  on_claim: Callable[[Session, TriggerTarget], None] | None = None) -> list[TriggerTarget]:
    """Claim the enabled schedule triggers due at `now`: each one's `next_fire_at` is moved forward with a
    compare-and-swap, so a period is handed to exactly one caller (two servers, or a restart, never fire one
    period twice). Missed periods (the cloud was down) fire once, then the schedule continues from now.
    `on_claim` runs in the claiming transaction (the caller writes the invocation there), so a crash
    between the claim and that write cannot lose the period: both commit or neither does."""
    now = now or utcnow()
    with session_scope(write=False) as s:
        rows = s.execute(select(FunctionTrigger.id, FunctionTrigger.next_fire_at, FunctionTrigger.schedule)
                         .where(FunctionTrigger.kind == "schedule", FunctionTrigger.enabled,
                                FunctionTrigger.next_fire_at <= now)
                         .order_by(FunctionTrigger.next_fire_at).limit(limit)).all()
    claimed: list[TriggerTarget] = []
    for trigger_id, fire_at, expression in rows:
        if fire_at is None:
            continue
        parsed = schedule.parse(expression)
        nxt = parsed.next_after(fire_at)
        if nxt <= now:
            nxt = parsed.next_after(now)
        with session_scope() as s:
            result = cast("CursorResult[Any]", s.execute(
                update(FunctionTrigger).where(FunctionTrigger.id == trigger_id,
                                              FunctionTrigger.next_fire_at == fire_at, FunctionTrigger.enabled)
                .values(next_fire_at=nxt)))
            if result.rowcount != 1:
                continue  # another caller claimed it (or it changed)
            trig = s.get(FunctionTrigger, trigger_id)
            if trig is None:
                continue
            target = TriggerTarget(trig.id, trig.function_id, trig.project_id, trig.qualifier, scheduled_at=fire_at)
            if on_claim is not None:
                on_claim(s, target)
            claimed.append(target)
    return claimed


def object_triggers(project_id: str, bucket: str, key: str, event: str) -> list[TriggerTarget]:
    """The enabled object-storage triggers of `bucket` (of `project_id`) matching the key and the event
    ("created" or "deleted")."""
    with session_scope(write=False) as s:
        rows = s.scalars(select(FunctionTrigger).where(
            FunctionTrigger.kind == "object_storage", FunctionTrigger.enabled,
            FunctionTrigger.project_id == project_id, FunctionTrigger.bucket == bucket))
        return [TriggerTarget(t.id, t.function_id, t.project_id, t.qualifier) for t in rows
                if event in t.events and key.startswith(t.prefix) and key.endswith(t.suffix)]


def queue_triggers() -> list[TriggerTarget]:
    """Every enabled queue trigger (the invoker receives from each queue with `queues.receive_for_trigger`)."""
    with session_scope(write=False) as s:
        rows = s.scalars(select(FunctionTrigger).where(FunctionTrigger.kind == "queue", FunctionTrigger.enabled)
                         .order_by(FunctionTrigger.id))
        return [TriggerTarget(t.id, t.function_id, t.project_id, t.qualifier, queue_id=t.queue_id,
                              batch_size=t.batch_size) for t in rows]


# ==================================================================================================
# Invocation records
# ==================================================================================================

def billed_gb_s(duration_ms: float, memory_mb: int) -> float:
    """GB-seconds billed: the duration rounded up to the millisecond (at least 1 ms) × the memory in GB."""
    ms = max(1, int(-(-duration_ms // 1)))
    return ms / 1000.0 * memory_mb / 1024.0


def record_invocation(*, function_id: str, version: str, trigger_kind: str, outcome: str, duration_ms: float,
                      memory_mb: int, init_ms: float = 0.0, cold: bool = False, max_memory_mb: float = 0.0,
                      started_at: dt.datetime | None = None, ended_at: dt.datetime | None = None,
                      logs: str = "", error: str | None = None, request_id: str = "") -> Invocation | None:
    """Store one invocation and its usage event ``function.invoked`` (GB-s and one invocation, for billing).

    Logs are cut to a bound. Returns None when the function is gone (its record is not kept)."""
    with session_scope() as s:
        return _record(s, function_id=function_id, version=version, trigger_kind=trigger_kind, outcome=outcome,
                       duration_ms=duration_ms, memory_mb=memory_mb, init_ms=init_ms, cold=cold,
                       max_memory_mb=max_memory_mb, started_at=started_at, ended_at=ended_at, logs=logs,
                       error=error, request_id=request_id)


def record_invocations(records: list[dict[str, Any]]) -> int:
    """Several :func:`record_invocation` (same keyword arguments each) in one transaction; returns how many
    were kept."""
    with session_scope() as s:
        return sum(1 for r in records if _record(s, **r) is not None)


def _record(s: Session, *, function_id: str, version: str, trigger_kind: str, outcome: str, duration_ms: float,
            memory_mb: int, init_ms: float = 0.0, cold: bool = False, max_memory_mb: float = 0.0,
            started_at: dt.datetime | None = None, ended_at: dt.datetime | None = None,
            logs: str = "", error: str | None = None, request_id: str = "") -> Invocation | None:
    ended = ended_at or utcnow()
    started = started_at or ended - dt.timedelta(milliseconds=duration_ms + init_ms)
    if len(logs) > MAX_LOG_CHARS:
        logs = logs[:MAX_LOG_CHARS] + "\n[logs cut]"
    gb_s = billed_gb_s(duration_ms, memory_mb) if outcome != "throttled" else 0.0
    fn = s.get(Function, function_id)
    if fn is None:
        return None
    inv = Invocation(id=new_id("inv"), project_id=fn.project_id, function_id=fn.id, version=version[:16],
                     request_id=request_id[:64], trigger_kind=trigger_kind[:16], outcome=outcome[:16],
                     duration_ms=duration_ms, init_ms=init_ms, cold=cold, memory_mb=memory_mb,
                     max_memory_mb=max_memory_mb, billed_gb_s=gb_s, started_at=started, ended_at=ended,
                     logs=logs, error=(error or "")[:1024])
    s.add(inv)
    emit(s, "function.invoked", resource_type="function", resource_id=fn.id, project_id=fn.project_id,
         data={"invocation_id": inv.id, "version": inv.version, "outcome": outcome, "trigger": trigger_kind,
               "duration_ms": round(duration_ms, 3), "memory_mb": memory_mb, "billed_gb_s": gb_s,
               "invocations": 1, "cold": cold})
    return inv


def invocation_query(fn: Function, *, since: dt.datetime | None = None, outcome: str | None = None,
                     after: str | None = None) -> Select[Invocation]:
    stmt = select(Invocation).where(Invocation.function_id == fn.id)
    if since is not None:
        stmt = stmt.where(Invocation.started_at >= since)
    if outcome:
        stmt = stmt.where(Invocation.outcome == outcome)
    if after:
        stmt = stmt.where(Invocation.id > after)
    return stmt


def logs_after(p: Principal, ref: str, *, since: dt.datetime | None, after: str | None,
               limit: int) -> list[Invocation]:
    with session_scope(write=False) as s:
        fn = get_function(s, p, ref)
        return list(s.scalars(invocation_query(fn, since=since, after=after).order_by(Invocation.id).limit(limit)))


def purge_invocations(now: dt.datetime | None = None) -> int:
    cutoff = (now or utcnow()) - dt.timedelta(days=INVOCATION_RETENTION_DAYS)
    with session_scope() as s:
        result = cast("CursorResult[Any]", s.execute(delete(Invocation).where(Invocation.ended_at < cutoff)))
        return int(result.rowcount or 0)


def loops() -> list[Loop]:
    from hackboot.functions import queues

    return [Loop("functions-invocation-retention", purge_invocations, 3600.0),
            Loop("queues-retention", queues.purge_expired, 60.0)]
