"""`hackboot function …` (functions, code, versions, aliases, triggers, invoke, logs) and `hackboot queue …`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from hackboot.cli.context import state
from hackboot.cli.output import EXIT_USAGE, OutputOpt, api_errors, console, fail, render

FUNCTION_COLUMNS = ["id", "name", "runtime", "handler", "memory_mb", "timeout_s", "code_size", "last_version"]
VERSION_COLUMNS = ["number", "runtime", "handler", "memory_mb", "code_sha256", "description", "created_at"]
ALIAS_COLUMNS = ["name", "version", "additional_version", "weight", "description"]
TRIGGER_COLUMNS = ["id", "kind", "qualifier", "enabled", "url_path", "schedule", "next_fire_at", "bucket",
                   "queue_name", "batch_size"]
INVOCATION_COLUMNS = ["id", "version", "trigger_kind", "outcome", "duration_ms", "init_ms", "cold", "billed_gb_s",
                      "started_at", "error"]
QUEUE_COLUMNS = ["id", "name", "visibility_timeout_s", "max_receives", "dead_letter_queue_id", "messages_visible",
                 "messages_in_flight"]
MESSAGE_COLUMNS = ["message_id", "receive_count", "body", "receipt_handle"]

function_app = typer.Typer(help="Serverless functions (Python, Node.js) in sandboxes, with triggers.",
                           no_args_is_help=True)
queue_app = typer.Typer(help="Queues: send, receive with a visibility timeout, dead-letter queues.",
                        no_args_is_help=True)


def _client() -> Any:
    return state.client()


def _vars(values: list[str] | None, option: str) -> dict[str, str] | None:
    """NAME=VALUE options as a dict (None when none was given)."""
    if not values:
        return None
    out: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            fail(f"{option} takes NAME=VALUE, not '{item}'", EXIT_USAGE)
        out[name] = value
    return out


def _upload(client: Any, ref: str, code: Path, filename: str | None) -> dict[str, Any]:
    if not code.exists():
        fail(f"{code} does not exist", EXIT_USAGE)
    with console.status(f"Uploading {code}…"):
        result: dict[str, Any] = client.functions.upload_code(ref, code, filename=filename)
    return result


# --- functions ----------------------------------------------------------------------------------------

@function_app.command("create")
def fn_create(name: str, runtime: str = typer.Option(..., "--runtime", help="python3.11, nodejs20, …"),
              handler: str = typer.Option(..., "--handler", help="module.function (Python), file.export (Node.js)"),
              code: Path = typer.Option(None, "--code", help="A folder (zipped here), a .zip or a single file"),
              memory: int = typer.Option(None, "--memory", help="MB, 128 to 4096, a multiple of 64"),
              timeout: int = typer.Option(None, "--timeout", help="Seconds, 1 to 900"),
              env: list[str] = typer.Option(None, "--env", help="NAME=VALUE (repeat)"),
              secret: list[str] = typer.Option(None, "--secret", help="NAME=VALUE, stored sealed (repeat)"),
              network: bool = typer.Option(None, "--network/--no-network", help="Allow network egress"),
              reserved: int = typer.Option(None, "--reserved-concurrency"),
              max_concurrency: int = typer.Option(None, "--max-concurrency"),
              dead_letter_queue: str = typer.Option(None, "--dead-letter-queue",
                                                    help="Queue receiving failed asynchronous events"),
              description: str = typer.Option(None, "--description"), output: str = OutputOpt) -> None:
    """Create a function, and upload its code when --code is given."""
    with api_errors():
        client = _client()
        fn = client.functions.create(name, runtime, handler, memory_mb=memory, timeout_s=timeout,
                                     environment=_vars(env, "--env"), secrets=_vars(secret, "--secret"),
                                     network_egress=network, reserved_concurrency=reserved,
                                     max_concurrency=max_concurrency, description=description,
                                     dead_letter_queue=dead_letter_queue)
        if code is not None:
            fn = _upload(client, fn["id"], code, None)
        render(fn, output)


@function_app.command("update")
def fn_update(ref: str, runtime: str = typer.Option(None, "--runtime"), handler: str = typer.Option(None, "--handler"),
              memory: int = typer.Option(None, "--memory"), timeout: int = typer.Option(None, "--timeout"),
              env: list[str] = typer.Option(None, "--env", help="NAME=VALUE (repeat; replaces them all)"),
              secret: list[str] = typer.Option(None, "--secret", help="NAME=VALUE (repeat; replaces them all)"),
              network: bool = typer.Option(None, "--network/--no-network"),
              reserved: int = typer.Option(None, "--reserved-concurrency"),
              max_concurrency: int = typer.Option(None, "--max-concurrency"),
              dead_letter_queue: str = typer.Option(None, "--dead-letter-queue", help='"" removes it'),
              name: str = typer.Option(None, "--name"), description: str = typer.Option(None, "--description"),
              output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().functions.update(
            ref, runtime=runtime, handler=handler, memory_mb=memory, timeout_s=timeout,
            environment=_vars(env, "--env"), secrets=_vars(secret, "--secret"), network_egress=network,
            reserved_concurrency=reserved, max_concurrency=max_concurrency, name=name, description=description,
            dead_letter_queue=dead_letter_queue), output)


@function_app.command("code-upload")
def fn_code_upload(ref: str, code: Path = typer.Argument(..., help="A folder, a .zip or a single source file"),
                   filename: str = typer.Option(None, "--filename", help="Name of a single file (default: its own)"),
                   output: str = OutputOpt) -> None:
    with api_errors():
        render(_upload(_client(), ref, code, filename), output)


@function_app.command("list")
def fn_list(runtime: str = typer.Option(None, "--runtime"), output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().functions.list(runtime=runtime), output, FUNCTION_COLUMNS)


@function_app.command("show")
def fn_show(ref: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().functions.get(ref), output)


@function_app.command("delete")
def fn_delete(ref: str) -> None:
    """Delete it with its versions, aliases and triggers."""
    with api_errors():
        _client().functions.delete(ref)
    console.print(f"Deleted function {ref}")


# --- versions and aliases -----------------------------------------------------------------------------

@function_app.command("version-publish")
def version_publish(ref: str, description: str = typer.Option(None, "--description"),
                    output: str = OutputOpt) -> None:
    """Freeze the current code and configuration as the next version."""
    with api_errors():
        render(_client().functions.publish_version(ref, description=description), output)


@function_app.command("version-list")
def version_list(ref: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().functions.versions(ref), output, VERSION_COLUMNS)


@function_app.command("alias-set")
def alias_set(ref: str, name: str, version: int = typer.Option(..., "--version"),
              canary: int = typer.Option(None, "--canary-version", help="A second version for a share of calls"),
              weight: float = typer.Option(None, "--weight", help="The canary's share, between 0 and 1"),
              description: str = typer.Option(None, "--description"), output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().functions.set_alias(ref, name, version, additional_version=canary, weight=weight,
                                             description=description), output)


@function_app.command("alias-list")
def alias_list(ref: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().functions.aliases(ref), output, ALIAS_COLUMNS)


@function_app.command("alias-delete")
def alias_delete(ref: str, name: str) -> None:
    with api_errors():
        _client().functions.delete_alias(ref, name)
    console.print(f"Deleted alias {name}")


# --- triggers -----------------------------------------------------------------------------------------

@function_app.command("trigger-add")
def trigger_add(ref: str, http: bool = typer.Option(False, "--http", help="A public URL"),
                auth: str = typer.Option(None, "--auth", help="http: none or token"),
                schedule: str = typer.Option(None, "--schedule", help="Cron (5 fields, UTC) or rate(5 minutes)"),
                bucket: str = typer.Option(None, "--bucket", help="Object storage events of this bucket"),
                events: list[str] = typer.Option(None, "--events", help="created and/or deleted (repeat)"),
                prefix: str = typer.Option(None, "--prefix"), suffix: str = typer.Option(None, "--suffix"),
                queue: str = typer.Option(None, "--queue", help="Messages of this queue"),
                batch_size: int = typer.Option(None, "--batch-size", help="queue: 1 to 10"),
                qualifier: str = typer.Option(None, "--qualifier", help="$LATEST, a version or an alias"),
                disabled: bool = typer.Option(False, "--disabled"), output: str = OutputOpt) -> None:
    """Exactly one of --http, --schedule, --bucket, --queue."""
    kinds = [k for k, given in (("http", http), ("schedule", schedule), ("object_storage", bucket),
                                ("queue", queue)) if given]
    if len(kinds) != 1:
        fail("Give exactly one of --http, --schedule, --bucket, --queue", EXIT_USAGE)
    with api_errors():
        render(_client().functions.add_trigger(
            ref, kinds[0], qualifier=qualifier, enabled=False if disabled else None, auth=auth, schedule=schedule,
            bucket=bucket, events=events or None, prefix=prefix, suffix=suffix, queue=queue,
            batch_size=batch_size), output)


@function_app.command("trigger-list")
def trigger_list(ref: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().functions.triggers(ref), output, TRIGGER_COLUMNS)


@function_app.command("trigger-enable")
def trigger_enable(ref: str, trigger_id: str, enabled: bool = typer.Option(True, "--enabled/--disabled"),
                   output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().functions.update_trigger(ref, trigger_id, enabled=enabled), output)


@function_app.command("trigger-delete")
def trigger_delete(ref: str, trigger_id: str) -> None:
    with api_errors():
        _client().functions.delete_trigger(ref, trigger_id)
    console.print(f"Deleted trigger {trigger_id}")


# --- invoke, records, logs ----------------------------------------------------------------------------

@function_app.command("invoke")
def fn_invoke(ref: str, payload: str = typer.Option("{}", "--payload", help="The event, as JSON"),
              qualifier: str = typer.Option(None, "--qualifier"),
              asynchronous: bool = typer.Option(False, "--async", help="Queue it and return at once"),
              output: str = OutputOpt) -> None:
    try:
        event = json.loads(payload)
    except ValueError as exc:
        fail(f"--payload is not JSON: {exc}", EXIT_USAGE)
    with api_errors():
        answer = _client().functions.invoke(ref, event, qualifier=qualifier, asynchronous=asynchronous)
        render(answer if isinstance(answer, dict) else {"result": answer}, output)


@function_app.command("invocations")
def fn_invocations(ref: str, outcome: str = typer.Option(None, "--outcome"),
                   since: str = typer.Option(None, "--since", help="ISO 8601 date-time"),
                   output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().functions.invocations(ref, since=since, outcome=outcome), output, INVOCATION_COLUMNS)


@function_app.command("logs")
def fn_logs(ref: str, since: str = typer.Option(None, "--since", help="ISO 8601 date-time"),
            follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new records"),
            timeout: float = typer.Option(None, "--timeout", help="--follow: stop after this many seconds")) -> None:
    """Each invocation's output, oldest first."""
    with api_errors():
        client = _client()
        records = (client.functions.follow_logs(ref, since=since, timeout=timeout) if follow
                   else iter(client.functions.logs(ref, since=since, limit=500)["items"]))
        for record in records:
            head = (f"{record['started_at']} {record['id']} v{record['version']} {record['outcome']} "
                    f"{record['duration_ms']:.1f} ms{' cold' if record['cold'] else ''}")
            typer.echo(head)
            if record["logs"]:
                typer.echo(record["logs"].rstrip("\n"))
            if record["error"]:
                typer.echo(f"error: {record['error']}")


# --- queues -------------------------------------------------------------------------------------------

@queue_app.command("create")
def queue_create(name: str, visibility_timeout: int = typer.Option(None, "--visibility-timeout", help="Seconds"),
                 max_receives: int = typer.Option(None, "--max-receives"),
                 dead_letter_queue: str = typer.Option(None, "--dead-letter-queue"),
                 retention: int = typer.Option(None, "--retention", help="Seconds"),
                 delay: int = typer.Option(None, "--delay", help="Seconds"),
                 description: str = typer.Option(None, "--description"), output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().queues.create(name, visibility_timeout_s=visibility_timeout, max_receives=max_receives,
                                       dead_letter_queue=dead_letter_queue, retention_s=retention, delay_s=delay,
                                       description=description), output)


@queue_app.command("list")
def queue_list(output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().queues.list(), output, QUEUE_COLUMNS)


@queue_app.command("show")
def queue_show(ref: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().queues.get(ref), output)


@queue_app.command("delete")
def queue_delete(ref: str) -> None:
    """Refused while a trigger uses it."""
    with api_errors():
        _client().queues.delete(ref)
    console.print(f"Deleted queue {ref}")


@queue_app.command("send")
def queue_send(ref: str, body: str, delay: int = typer.Option(None, "--delay", help="Seconds"),
               output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().queues.send(ref, body, delay_s=delay), output)


@queue_app.command("receive")
def queue_receive(ref: str, max_messages: int = typer.Option(None, "--max", help="1 to 10"),
                  visibility_timeout: int = typer.Option(None, "--visibility-timeout", help="Seconds"),
                  wait: float = typer.Option(None, "--wait", help="Long poll, up to 20 s"),
                  output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().queues.receive(ref, max_messages=max_messages, visibility_timeout_s=visibility_timeout,
                                        wait_s=wait), output, MESSAGE_COLUMNS)


@queue_app.command("delete-message")
def queue_delete_message(ref: str, receipt_handle: str) -> None:
    with api_errors():
        _client().queues.delete_message(ref, receipt_handle)
    console.print("Deleted the message")


def register(app: typer.Typer) -> None:
    app.add_typer(function_app, name="function")
    app.add_typer(queue_app, name="queue")
