"""`hackboot region|zone|flavor|price|host|capacity` commands."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from hackboot.cli.context import state
from hackboot.cli.output import EXIT_USAGE, OutputOpt, api_errors, console, fail, render
from hackboot.sdk.client import Client

HOURS_PER_MONTH = 730
REGION_COLUMNS = ["id", "name", "country", "jurisdiction", "status", "status_reason", "peering", "available_from",
                  "zones"]
ZONE_COLUMNS = ["id", "region_id", "status", "effective_status", "status_reason"]
FLAVOR_COLUMNS = ["id", "family", "vcpus", "ram_gib", "disk_gb", "gpu", "eur_hour", "eur_month", "active"]
PRICE_COLUMNS = ["sku", "kind", "region_id", "unit", "amount_eur", "description"]
HOST_COLUMNS = ["id", "name", "zone_id", "status", "vcpu", "ram_gib", "disk_gb", "gpus", "last_heartbeat_at"]


def _client() -> Client:
    return state.client()


def _pairs(values: list[str] | None, what: str, cast: type = str) -> dict[str, Any]:
    """KEY=VALUE options into a dict; a malformed one is a usage error (exit 2)."""
    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"{what}: expected KEY=VALUE, got '{item}'", EXIT_USAGE)
        try:
            out[key] = cast(value)
        except ValueError:
            fail(f"{what}: '{value}' is not a valid {cast.__name__}", EXIT_USAGE)
    return out


# --- regions and zones -----------------------------------------------------------------------------

region_app = typer.Typer(help="Regions: where the cloud runs, their status and data-residency facts.",
                         no_args_is_help=True)


@region_app.command("list")
def region_list(status: str | None = typer.Option(None, "--status", help="operational, maintenance, planned, retired"),
                country: str | None = typer.Option(None, "--country", help="ISO code, e.g. FR"),
                jurisdiction: str | None = typer.Option(None, "--jurisdiction", help="e.g. EU"),
                output: str = OutputOpt) -> None:
    """List regions."""
    with api_errors():
        rows = _client().regions.list(status=status, country=country, jurisdiction=jurisdiction)
    if output == "table":
        rows = [r | {"zones": ", ".join(r["zones"])} for r in rows]
    render(rows, output, REGION_COLUMNS)


@region_app.command("show")
def region_show(region_id: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().regions.get(region_id), output)


@region_app.command("set-status")
def region_set_status(region_id: str,
                      status: str = typer.Argument(..., help="operational, maintenance, planned or retired"),
                      reason: str | None = typer.Option(None, "--reason", help="Shown to users"),
                      output: str = OutputOpt) -> None:
    """Change a region's status (cloud administrators). Only operational regions take new resources."""
    with api_errors():
        render(_client().regions.set_status(region_id, status, reason), output)


zone_app = typer.Typer(help="Availability zones of each region.", no_args_is_help=True)


@zone_app.command("list")
def zone_list(region: str | None = typer.Option(None, "--region", "-r"),
              status: str | None = typer.Option(None, "--status"),
              output: str = OutputOpt) -> None:
    """List zones (effective status: the region's when it is not operational)."""
    with api_errors():
        render(_client().zones.list(region=region, status=status), output, ZONE_COLUMNS)


@zone_app.command("show")
def zone_show(zone_id: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().zones.get(zone_id), output)


@zone_app.command("set-status")
def zone_set_status(zone_id: str, status: str, reason: str | None = typer.Option(None, "--reason"),
                    output: str = OutputOpt) -> None:
    """Change one zone's status (cloud administrators)."""
    with api_errors():
        render(_client().zones.set_status(zone_id, status, reason), output)


# --- flavors ---------------------------------------------------------------------------------------

flavor_app = typer.Typer(help="Flavors: the sizes instances come in, with their hourly list price.",
                         no_args_is_help=True)


def _flavor_row(f: dict[str, Any]) -> dict[str, Any]:
    price = f.get("price_eur_hour")
    return f | {"ram_gib": f"{f['memory_mb'] / 1024:g}",
                "gpu": f"{f['gpu_count']}x {f['gpu_model']}" if f.get("gpu_count") else "-",
                "eur_hour": f"{price:.4f}" if price is not None else "-",
                "eur_month": f"{price * HOURS_PER_MONTH:.2f}" if price is not None else "-"}


@flavor_app.command("list")
def flavor_list(family: str | None = typer.Option(None, "--family", help="vps, gpu, general, compute, memory"),
                gpu_model: str | None = typer.Option(None, "--gpu-model", help="e.g. T4, RTX4090, A100"),
                gpu: bool | None = typer.Option(None, "--gpu/--no-gpu", help="Only GPU flavors / only without GPU"),
                min_vcpus: int | None = typer.Option(None, "--min-vcpus"),
                min_memory_mb: int | None = typer.Option(None, "--min-memory-mb"),
                min_disk_gb: int | None = typer.Option(None, "--min-disk-gb"),
                all_: bool = typer.Option(False, "--all", help="Include deactivated flavors"),
                output: str = OutputOpt) -> None:
    """List flavors and their on-demand price (EUR per hour, ~per month of 730 h)."""
    with api_errors():
        rows = _client().flavors.list(family=family, gpu_model=gpu_model, gpu=gpu, min_vcpus=min_vcpus,
                                      min_memory_mb=min_memory_mb, min_disk_gb=min_disk_gb, include_inactive=all_)
    if output == "table":
        rows = [_flavor_row(f) for f in sorted(rows, key=lambda f: (f["family"], f.get("price_eur_hour") or 0))]
    render(rows, output, FLAVOR_COLUMNS)


@flavor_app.command("show")
def flavor_show(flavor_id: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().flavors.get(flavor_id), output)


@flavor_app.command("create")
def flavor_create(flavor_id: str,
                  family: str = typer.Option(..., "--family"),
                  vcpus: int = typer.Option(..., "--vcpus"),
                  memory_mb: int = typer.Option(..., "--memory-mb"),
                  disk_gb: int = typer.Option(..., "--disk-gb"),
                  gpu_model: str | None = typer.Option(None, "--gpu-model"),
                  gpu_count: int = typer.Option(0, "--gpu-count"),
                  bandwidth_mbps: int | None = typer.Option(None, "--bandwidth-mbps"),
                  description: str = typer.Option("", "--description", "-d"),
                  source: str = typer.Option("", "--source", help="Where the specs come from"),
                  price_eur_hour: float | None = typer.Option(None, "--price-eur-hour", help="Sets its list price"),
                  output: str = OutputOpt) -> None:
    """Create a flavor (cloud administrators). Sizes cannot change afterwards."""
    with api_errors():
        render(_client().flavors.create(flavor_id, family=family, vcpus=vcpus, memory_mb=memory_mb,
                                        disk_gb=disk_gb, gpu_model=gpu_model, gpu_count=gpu_count,
                                        bandwidth_mbps=bandwidth_mbps, description=description, source=source,
                                        price_eur_hour=price_eur_hour), output)


@flavor_app.command("set")
def flavor_set(flavor_id: str,
               active: bool | None = typer.Option(None, "--active/--inactive", help="Sell it again / stop selling it"),
               description: str | None = typer.Option(None, "--description", "-d"),
               output: str = OutputOpt) -> None:
    """Reactivate or deactivate a flavor, or change its description (sizes are immutable)."""
    with api_errors():
        render(_client().flavors.update(flavor_id, active=active, description=description), output)


@flavor_app.command("delete")
def flavor_delete(flavor_id: str, output: str = OutputOpt) -> None:
    """Delete a flavor; one in use (or from the seed) is deactivated instead."""
    with api_errors():
        result = _client().flavors.delete(flavor_id)
    if output == "table":
        console.print(result["detail"])
    else:
        render(result, output)


# --- prices ----------------------------------------------------------------------------------------

price_app = typer.Typer(help="The list prices in EUR (excl. VAT): per hour for flavors, per GB-month for storage.",
                        no_args_is_help=True)


@price_app.command("list")
def price_list(sku: str | None = typer.Option(None, "--sku"),
               kind: str | None = typer.Option(None, "--kind", help="flavor, volume, object_storage, transfer"),
               region: str | None = typer.Option(None, "--region", "-r", help="Prices that apply in this region"),
               output: str = OutputOpt) -> None:
    """List prices."""
    with api_errors():
        rows = _client().prices.list(sku=sku, kind=kind, region=region)
    if output == "table":
        rows = [r | {"region_id": r["region_id"] or "all", "amount_eur": f"{r['amount_eur']:g}"} for r in rows]
    render(rows, output, PRICE_COLUMNS)


@price_app.command("set")
def price_set(sku: str, amount_eur: float = typer.Argument(..., help="EUR per unit, excluding VAT"),
              region: str | None = typer.Option(None, "--region", "-r", help="Override for one region"),
              unit: str | None = typer.Option(None, "--unit", help="hour, GB-month, GB (checked against the sku)"),
              kind: str | None = typer.Option(None, "--kind"),
              description: str | None = typer.Option(None, "--description", "-d"),
              output: str = OutputOpt) -> None:
    """Set a list price (cloud administrators)."""
    with api_errors():
        render(_client().prices.set(sku, amount_eur, region=region, unit=unit, kind=kind,
                                    description=description), output)


@price_app.command("delete")
def price_delete(sku: str, region: str | None = typer.Option(None, "--region", "-r")) -> None:
    """Remove a regional override (or an unneeded global price)."""
    with api_errors():
        _client().prices.delete(sku, region=region)
    console.print(f"Deleted the price of {sku}" + (f" in {region}" if region else ""))


# --- hosts -----------------------------------------------------------------------------------------

host_app = typer.Typer(help="Hypervisor hosts, their inventory and liveness (cloud administrators).",
                       no_args_is_help=True)


def _inv(host: dict[str, Any], rc: str) -> dict[str, Any] | None:
    return next((i for i in host.get("inventories", []) if i["resource_class"] == rc), None)


def _used_of(inv: dict[str, Any] | None, scale: float = 1) -> str:
    if inv is None:
        return "-"
    return f"{inv['used'] / scale:g}/{inv['allocatable'] / scale:g}"


def _host_row(h: dict[str, Any]) -> dict[str, Any]:
    gpus = [f"{i['resource_class'][4:]} {i['used']}/{i['allocatable']}" for i in h["inventories"]
            if i["resource_class"].startswith("GPU:")]
    return h | {"vcpu": _used_of(_inv(h, "VCPU")), "ram_gib": _used_of(_inv(h, "MEMORY_MB"), 1024),
                "disk_gb": _used_of(_inv(h, "DISK_GB")), "gpus": ", ".join(gpus) or "-"}


@host_app.command("list")
def host_list(zone: str | None = typer.Option(None, "--zone", "-z"),
              region: str | None = typer.Option(None, "--region", "-r"),
              status: str | None = typer.Option(None, "--status", help="up, down or disabled"),
              output: str = OutputOpt) -> None:
    """List hosts with used/allocatable per resource."""
    with api_errors():
        rows = _client().hosts.list(zone=zone, region=region, status=status)
    if output == "table":
        rows = [_host_row(h) for h in rows]
    render(rows, output, HOST_COLUMNS)


def _render_host(data: dict[str, Any], output: str) -> None:
    if output != "table":
        render(data, output)
        return
    render({k: v for k, v in data.items() if k != "inventories"}, output)
    render(data["inventories"], output, ["resource_class", "total", "reserved", "allocation_ratio", "allocatable",
                                         "used", "free", "devices", "devices_in_use"], title="Inventory")


@host_app.command("show")
def host_show(host: str = typer.Argument(..., help="Host id or name"), output: str = OutputOpt) -> None:
    """A host, its inventory per resource class and what is allocated."""
    with api_errors():
        data = _client().hosts.get(host)
    _render_host(data, output)


def _gpu(spec: str) -> dict[str, Any]:
    parts = spec.split(":", 2)  # PCI addresses hold colons themselves
    if len(parts) not in (2, 3) or not parts[1].isdigit():
        fail(f"--gpu: expected MODEL:COUNT[:PCI,PCI…], got '{spec}'", EXIT_USAGE)
    pci = [a for a in parts[2].split(",") if a] if len(parts) == 3 else []
    return {"model": parts[0], "count": int(parts[1]), "pci_addresses": pci}


@host_app.command("register")
def host_register(name: str,
                  zone: str = typer.Option(..., "--zone", "-z"),
                  vcpus: int = typer.Option(..., "--vcpus"),
                  memory_mb: int = typer.Option(..., "--memory-mb"),
                  disk_gb: int = typer.Option(..., "--disk-gb"),
                  gpu: Annotated[list[str] | None, typer.Option(
                      "--gpu", help="MODEL:COUNT[:PCI,PCI…], repeatable; e.g. A100:2:0000:41:00.0,0000:42:00.0",
                  )] = None,
                  fact: Annotated[list[str] | None, typer.Option("--fact", help="KEY=VALUE, repeatable")] = None,
                  agent_url: str = typer.Option("", "--agent-url"),
                  allocation_ratio: float | None = typer.Option(None, "--allocation-ratio",
                                                         help="For vCPU, RAM and disk (default 1.0)"),
                  output: str = OutputOpt) -> None:
    """Register a host, or re-register it by NAME (idempotent)."""
    gpus = [_gpu(g) for g in gpu or []]
    facts = _pairs(fact, "--fact")
    with api_errors():
        data = _client().hosts.register(name, zone=zone, vcpus=vcpus, memory_mb=memory_mb, disk_gb=disk_gb,
                                        gpus=gpus, facts=facts, agent_url=agent_url,
                                        allocation_ratio=allocation_ratio)
    _render_host(data, output)


@host_app.command("set")
def host_set(host: str = typer.Argument(..., help="Host id or name"),
             status: str | None = typer.Option(None, "--status", help="up (enable) or disabled"),
             reason: str | None = typer.Option(None, "--reason"),
             ratio: Annotated[list[str] | None, typer.Option(
                 "--ratio", help="CLASS=RATIO, repeatable, e.g. VCPU=4")] = None,
             reserved: Annotated[list[str] | None, typer.Option(
                 "--reserved", help="CLASS=AMOUNT, repeatable, e.g. MEMORY_MB=8192")] = None,
             output: str = OutputOpt) -> None:
    """Enable or disable a host; set allocation ratios and reservations per resource class."""
    ratios = _pairs(ratio, "--ratio", float) or None
    reserve = _pairs(reserved, "--reserved", int) or None
    with api_errors():
        data = _client().hosts.update(host, status=status, status_reason=reason, allocation_ratio=ratios,
                                      reserved=reserve)
    _render_host(data, output)


@host_app.command("delete")
def host_delete(host: str) -> None:
    """Forget a host (refused while it holds allocations)."""
    with api_errors():
        _client().hosts.delete(host)
    console.print(f"Deleted host {host}")


# --- capacity --------------------------------------------------------------------------------------

def _pct_style(pct: float | None) -> str:
    if pct is None:
        return "dim"
    return "red" if pct >= 85 else "yellow" if pct >= 65 else "green"


def _cell(fig: dict[str, Any] | None, scale: float = 1) -> str:
    if fig is None or (fig["total"] == 0 and fig["used"] == 0):
        return "[dim]-[/]"
    pct = fig["utilisation_pct"]
    shown = f"{fig['used'] / scale:,.0f}/{fig['allocatable'] / scale:,.0f}"
    return f"{shown} [{_pct_style(pct)}]{'-' if pct is None else f'{pct:g}%'}[/]"


def _capacity_row(table: Table, scope: dict[str, Any], label: str, gpu_classes: list[str]) -> None:
    figs = {f["resource_class"]: f for f in scope["resources"]}
    hosts = scope["hosts"]
    host_cell = f"{hosts.get('up', 0)} up" + "".join(f", {n} {s}" for s, n in hosts.items() if s != "up" and n)
    table.add_row(label, scope["status"] or "", host_cell, _cell(figs.get("VCPU")),
                  _cell(figs.get("MEMORY_MB"), 1024), _cell(figs.get("DISK_GB")),
                  *[_cell(figs.get(rc)) for rc in gpu_classes])


def capacity(region: str | None = typer.Option(None, "--region", "-r"),
             zone: str | None = typer.Option(None, "--zone", "-z"),
             output: str = OutputOpt) -> None:
    """Capacity vs used per region and zone: used/allocatable and utilisation for vCPU, RAM, disk, GPUs."""
    with api_errors():
        report = _client().capacity.report(region=region, zone=zone)
    if output != "table":
        render(report, output)
        return
    gpu_classes = sorted({f["resource_class"] for f in report["total"]["resources"]
                          if f["resource_class"].startswith("GPU:")})
    table = Table(title="Capacity vs used (used/allocatable, utilisation)")
    for col in ("Region / zone", "Status", "Hosts", "vCPU", "RAM GiB", "Disk GB", *[g[4:] for g in gpu_classes]):
        table.add_column(col, justify="left" if col in ("Region / zone", "Status", "Hosts") else "right")
    for r in report["regions"]:
        _capacity_row(table, r, f"[bold]{r['id']}[/]", gpu_classes)
        for z in r["zones"]:
            _capacity_row(table, z, f"  {z['id']}", gpu_classes)
    table.add_section()
    _capacity_row(table, report["total"], "[bold]Total[/]", gpu_classes)
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(region_app, name="region")
    app.add_typer(zone_app, name="zone")
    app.add_typer(flavor_app, name="flavor")
    app.add_typer(price_app, name="price")
    app.add_typer(host_app, name="host")
    app.command("capacity")(capacity)
