"""Rendering for every command: `-o table|json|yaml`, and exit codes scripts can trust."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
import yaml
from rich.console import Console
from rich.table import Table

from hackboot.sdk.client import ApiError

console = Console()
err_console = Console(stderr=True)

# Exit codes (documented in `hackboot --help`)
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_AUTH, EXIT_CONFLICT, EXIT_SERVER, EXIT_TIMEOUT = range(8)


def exit_code_for(status: int) -> int:
    if status == 0:
        return EXIT_SERVER
    if status == 404:
        return EXIT_NOT_FOUND
    if status in (401, 403):
        return EXIT_AUTH
    if status in (409, 412):
        return EXIT_CONFLICT
    if status >= 500:
        return EXIT_SERVER
    return EXIT_USAGE if status in (400, 413, 422) else EXIT_ERROR


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    err_console.print(f"[bold red]Error:[/] {message}")
    raise typer.Exit(code)


@contextmanager
def api_errors() -> Iterator[None]:
    """Turn SDK errors into a one-line message and the matching exit code."""
    try:
        yield
    except ApiError as exc:
        fail(f"{exc.detail} ({exc.code}, HTTP {exc.status})" if exc.status else exc.detail,
             exit_code_for(exc.status))
    except TimeoutError as exc:
        fail(str(exc), EXIT_TIMEOUT)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def render(data: Any, fmt: str, columns: Sequence[str] | None = None, title: str | None = None,
           formatters: dict[str, Callable[[Any], str]] | None = None) -> None:
    if fmt == "json":
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        return
    if fmt == "yaml":
        sys.stdout.write(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False))
        return
    rows = data if isinstance(data, list) else [data]
    if not isinstance(data, list) and columns is None and isinstance(data, dict):
        table = Table(show_header=False, title=title)
        table.add_column("field", style="bold")
        table.add_column("value")
        for k, v in data.items():
            table.add_row(k, _cell(v))
        console.print(table)
        return
    cols = list(columns or (rows[0].keys() if rows else []))
    table = Table(title=title)
    for col in cols:
        table.add_column(col.upper().replace("_", " "))
    fmts = formatters or {}
    for row in rows:
        table.add_row(*[fmts[c](row.get(c)) if c in fmts else _cell(row.get(c)) for c in cols])
    console.print(table)


OutputOpt = typer.Option("table", "--output", "-o", help="Output format: table, json or yaml",
                         case_sensitive=False)
