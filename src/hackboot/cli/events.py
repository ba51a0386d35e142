"""`hackboot event|webhook|audit` commands."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
import yaml

from hackboot.cli.context import state
from hackboot.cli.output import OutputOpt, api_errors, console, render

EVENT_COLUMNS = ["seq", "created_at", "type", "resource_type", "resource_id", "actor"]
WEBHOOK_COLUMNS = ["id", "url", "event_types", "enabled", "description", "created_at"]
DELIVERY_COLUMNS = ["id", "event_type", "status", "attempts", "last_status_code", "last_error", "created_at",
                    "last_attempt_at", "next_attempt_at"]
AUDIT_COLUMNS = ["created_at", "username", "method", "path", "status_code", "request_id"]

event_app = typer.Typer(help="Events: every change to a resource.", no_args_is_help=True)
webhook_app = typer.Typer(help="Webhooks: events POSTed to your URL, HMAC-SHA256 signed, with retries.",
                          no_args_is_help=True)
audit_app = typer.Typer(help="The audit log: who did what (project admins).", no_args_is_help=True)

# List options live at module level (typer declares options as parameter defaults).
TYPE_OPT = typer.Option(None, "--type", "-t", help="Event type or glob, e.g. 'instance.*' (repeatable)")
EVENT_OPT = typer.Option(None, "--event", "-e",
                         help="Event type glob to send, e.g. 'instance.*' (repeatable; default: every event)")
REPLACE_EVENT_OPT = typer.Option(None, "--event", "-e", help="Replace the event globs (repeatable)")


def _print_event(event: dict[str, Any], output: str) -> None:
    if output == "json":
        sys.stdout.write(json.dumps(event, separators=(",", ":"), default=str) + "\n")
    elif output == "yaml":
        sys.stdout.write("---\n" + yaml.safe_dump(event, sort_keys=False))
    else:
        console.print(f"{event['seq']:>8}  {event['created_at']}  [bold]{event['type']}[/]  "
                      f"{event['resource_type']}/{event['resource_id']}  actor={event['actor']}",
                      highlight=False)
    sys.stdout.flush()


@event_app.command("list")
def event_list(
    type: list[str] | None = TYPE_OPT,
    resource_type: str | None = typer.Option(None, "--resource-type"),
    resource_id: str | None = typer.Option(None, "--resource-id"),
    since: str | None = typer.Option(None, "--since", help="ISO 8601 time"),
    limit: int = typer.Option(50, "--limit", "-n", help="Show the most recent N events"),
    all_projects: bool = typer.Option(False, "--all-projects", help="Every project (cloud administrators)"),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep running and print new events live"),
    output: str = OutputOpt,
) -> None:
    """List recent events, oldest first; --follow then streams new ones (server-sent events)."""
    with api_errors():
        client = state.client()
        page = client.events.page(limit=limit, order="desc", types=type or None, resource_type=resource_type,
                                  resource_id=resource_id, since=since, all_projects=all_projects)
        recent = list(reversed(page["items"]))
        if not follow:
            render(recent, output, EVENT_COLUMNS)
            return
        for event in recent:
            _print_event(event, output)
        after = recent[-1]["seq"] if recent else None
        if after is None:
            latest = client.events.latest(all_projects=all_projects)
            after = latest["seq"] if latest else 0
        try:
            for event in client.events.stream(after=after, types=type or None, resource_type=resource_type,
                                              resource_id=resource_id, since=since, all_projects=all_projects):
                _print_event(event, output)
        except KeyboardInterrupt:
            raise typer.Exit(0) from None


@event_app.command("show")
def event_show(event_id: str, output: str = OutputOpt) -> None:
    """Show one event with its data."""
    with api_errors():
        render(state.client().events.get(event_id), output)


@webhook_app.command("create")
def webhook_create(
    url: str,
    event: list[str] | None = EVENT_OPT,
    description: str = typer.Option("", "--description", "-d"),
    disabled: bool = typer.Option(False, "--disabled", help="Create it disabled"),
    output: str = OutputOpt,
) -> None:
    """Create a webhook; its signing secret is printed once."""
    with api_errors():
        hook = state.client().webhooks.create(url, event or [], description, not disabled)
    render(hook, output)
    if output == "table":
        console.print("[yellow]Store the secret now: it will not be shown again. Verify deliveries with "
                      "HMAC-SHA256(secret, X-Hackboot-Timestamp + '.' + body).[/]")


@webhook_app.command("list")
def webhook_list(output: str = OutputOpt) -> None:
    """List the project's webhooks."""
    with api_errors():
        render(state.client().webhooks.list(), output, WEBHOOK_COLUMNS)


@webhook_app.command("show")
def webhook_show(webhook_id: str, output: str = OutputOpt) -> None:
    """Show one webhook (its secret is never shown again: rotate it if lost)."""
    with api_errors():
        render(state.client().webhooks.get(webhook_id), output)


@webhook_app.command("update")
def webhook_update(
    webhook_id: str,
    url: str | None = typer.Option(None, "--url"),
    event: list[str] | None = REPLACE_EVENT_OPT,
    all_events: bool = typer.Option(False, "--all-events", help="Send every event"),
    description: str | None = typer.Option(None, "--description", "-d"),
    enable: bool | None = typer.Option(None, "--enable/--disable"),
    output: str = OutputOpt,
) -> None:
    """Change a webhook's URL, events, description, or enable/disable it."""
    changes: dict[str, Any] = {k: v for k, v in {"url": url, "description": description,
                                                         "enabled": enable}.items() if v is not None}
    if event:
        changes["event_types"] = event
    elif all_events:
        changes["event_types"] = []
    with api_errors():
        render(state.client().webhooks.update(webhook_id, **changes), output)


@webhook_app.command("delete")
def webhook_delete(webhook_id: str) -> None:
    """Delete a webhook and its delivery log."""
    with api_errors():
        state.client().webhooks.delete(webhook_id)
    console.print(f"Deleted {webhook_id}")


@webhook_app.command("deliveries")
def webhook_deliveries(
    webhook_id: str,
    status: str | None = typer.Option(None, "--status", help="pending, delivered or failed"),
    limit: int = typer.Option(50, "--limit", "-n"),
    output: str = OutputOpt,
) -> None:
    """The delivery log, newest first (use -o json for every attempt's timing and response)."""
    with api_errors():
        rows = state.client().webhooks.deliveries(webhook_id, status=status, limit=limit)
    render(rows, output, DELIVERY_COLUMNS)


@webhook_app.command("delivery")
def webhook_delivery(webhook_id: str, delivery_id: str, output: str = OutputOpt) -> None:
    """One delivery with its attempts."""
    with api_errors():
        d = state.client().webhooks.delivery(webhook_id, delivery_id)
    if output != "table":
        render(d, output)
        return
    attempts = d.pop("attempt_log")
    render(d, output)
    render(attempts, output, ["attempt", "started_at", "duration_ms", "status_code", "error"], title="Attempts")


@webhook_app.command("redeliver")
def webhook_redeliver(webhook_id: str, delivery_id: str, output: str = OutputOpt) -> None:
    """Send a delivery's event again (as a new delivery)."""
    with api_errors():
        render(state.client().webhooks.redeliver(webhook_id, delivery_id), output,
               DELIVERY_COLUMNS)


@webhook_app.command("ping")
def webhook_ping(webhook_id: str, wait: bool = typer.Option(False, "--wait", help="Wait for the outcome"),
                 output: str = OutputOpt) -> None:
    """Send a webhook.ping event to this webhook only."""
    with api_errors():
        client = state.client()
        delivery = client.webhooks.ping(webhook_id)
        if wait:
            with console.status("Delivering ping…"):
                delivery = client.webhooks.wait_delivery(webhook_id, delivery["id"])
    render(delivery, output, DELIVERY_COLUMNS)


@webhook_app.command("rotate-secret")
def webhook_rotate_secret(webhook_id: str, output: str = OutputOpt) -> None:
    """Replace the signing secret; the new one is printed once and used from now on."""
    with api_errors():
        render(state.client().webhooks.rotate_secret(webhook_id), output)
    if output == "table":
        console.print("[yellow]Store the new secret now and update your receiver; failed deliveries are "
                      "retried with the new secret.[/]")


@audit_app.command("list")
def audit_list(
    user: str | None = typer.Option(None, "--user", help="User id"),
    username: str | None = typer.Option(None, "--username"),
    method: str | None = typer.Option(None, "--method"),
    path: str | None = typer.Option(None, "--path", help="Path prefix, e.g. /v1/webhooks"),
    since: str | None = typer.Option(None, "--since", help="ISO 8601 time"),
    limit: int = typer.Option(50, "--limit", "-n", help="Show the most recent N records"),
    all_projects: bool = typer.Option(False, "--all-projects", help="Every project (cloud administrators)"),
    output: str = OutputOpt,
) -> None:
    """Who did what: recent changes in the project, oldest first."""
    with api_errors():
        rows = state.client().audit.list(user_id=user, username=username, method=method,
                                         path_prefix=path, since=since, all_projects=all_projects,
                                         order="desc", limit=limit)
    render(list(reversed(rows)), output, AUDIT_COLUMNS)


def register(app: typer.Typer) -> None:
    app.add_typer(event_app, name="event")
    app.add_typer(webhook_app, name="webhook")
    app.add_typer(audit_app, name="audit")
