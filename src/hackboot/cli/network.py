"""`hackboot vpc|subnet|nic|security-group|floating-ip|nat-gateway|flow-log …` commands (VPC networking)."""

from __future__ import annotations

from typing import Any

import typer

from hackboot.cli.context import state
from hackboot.cli.output import EXIT_USAGE, OutputOpt, api_errors, console, fail, render

VPC_COLUMNS = ["id", "name", "cidr", "region_id", "is_default", "internet_gateway", "vni", "status"]
SUBNET_COLUMNS = ["id", "name", "vpc_id", "zone_id", "cidr", "public", "available_ips", "status"]
NIC_COLUMNS = ["id", "name", "subnet_id", "private_ip", "public_ip", "mac", "security_group_ids", "instance_id",
               "status"]
GROUP_COLUMNS = ["id", "name", "vpc_id", "is_default", "rules", "description"]
RULE_COLUMNS = ["id", "direction", "protocol", "port_min", "port_max", "cidr", "remote_group_id", "description"]
FIP_COLUMNS = ["id", "address", "region_id", "network_interface_id", "nat_gateway_id", "description"]
NAT_COLUMNS = ["id", "name", "vpc_id", "subnet_id", "public_ip", "private_ip", "status"]
FLOW_LOG_COLUMNS = ["id", "name", "resource_type", "resource_id", "traffic_type", "status", "created_at"]
RECORD_COLUMNS = ["start_time", "interface_id", "direction", "action", "protocol", "src_addr", "src_port",
                  "dst_addr", "dst_port", "packets", "bytes"]

vpc_app = typer.Typer(help="VPCs: private networks (RFC 1918) of a region.", no_args_is_help=True)
subnet_app = typer.Typer(help="Subnets of a VPC, one zone each, public or private.", no_args_is_help=True)
nic_app = typer.Typer(help="Network interfaces (ports): a MAC, a private address, security groups.",
                      no_args_is_help=True)
group_app = typer.Typer(help="Security groups and their rules (stateful; ingress denied unless allowed).",
                        no_args_is_help=True)
fip_app = typer.Typer(help="Floating IPs: public addresses attached to interfaces.", no_args_is_help=True)
nat_app = typer.Typer(help="NAT gateways: private subnets reach out through them.", no_args_is_help=True)
flow_app = typer.Typer(help="Flow logs of a VPC, subnet or interface, and their records.", no_args_is_help=True)


def _client() -> Any:
    return state.client()


# --- vpc ----------------------------------------------------------------------------------------------

@vpc_app.command("create")
def vpc_create(name: str, cidr: str = typer.Option(..., "--cidr", help="RFC 1918 network, /16 to /28"),
               region: str = typer.Option(None, "--region"), description: str = typer.Option(None, "--description"),
               internet_gateway: bool = typer.Option(False, "--internet-gateway",
                                                     help="Route public subnets and floating IPs out"),
               output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().vpcs.create(name, cidr, region=region, description=description,
                                     internet_gateway=internet_gateway), output)


@vpc_app.command("default")
def vpc_default(region: str = typer.Option(None, "--region"), output: str = OutputOpt) -> None:
    """Show the project's default VPC of the region (made on first use)."""
    with api_errors():
        render(_client().vpcs.default(region), output)


@vpc_app.command("list")
def vpc_list(region: str = typer.Option(None, "--region"), output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().vpcs.list(region=region), output, VPC_COLUMNS)


@vpc_app.command("show")
def vpc_show(ref: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().vpcs.get(ref), output)


@vpc_app.command("update")
def vpc_update(ref: str, name: str = typer.Option(None, "--name"),
               description: str = typer.Option(None, "--description"),
               internet_gateway: bool = typer.Option(None, "--internet-gateway/--no-internet-gateway"),
               output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().vpcs.update(ref, name=name, description=description, internet_gateway=internet_gateway),
               output)


@vpc_app.command("delete")
def vpc_delete(ref: str) -> None:
    with api_errors():
        _client().vpcs.delete(ref)
    console.print(f"Deleted VPC {ref}")


# --- subnet -------------------------------------------------------------------------------------------

@subnet_app.command("create")
def subnet_create(vpc: str = typer.Option(..., "--vpc", help="VPC id or name"),
                  cidr: str = typer.Option(..., "--cidr", help="Inside the VPC's network, /28 at most"),
                  zone: str = typer.Option(None, "--zone"), name: str = typer.Option(None, "--name"),
                  public: bool = typer.Option(False, "--public", help="Routed to the internet"),
                  output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().subnets.create(vpc, cidr, zone=zone, name=name, public=public), output)


@subnet_app.command("list")
def subnet_list(vpc: str = typer.Option(None, "--vpc", help="VPC id"), zone: str = typer.Option(None, "--zone"),
                output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().subnets.list(vpc_id=vpc, zone=zone), output, SUBNET_COLUMNS)


@subnet_app.command("show")
def subnet_show(ref: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().subnets.get(ref), output)


@subnet_app.command("update")
def subnet_update(ref: str, name: str = typer.Option(None, "--name"),
                  public: bool = typer.Option(None, "--public/--private"), output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().subnets.update(ref, name=name, public=public), output)


@subnet_app.command("delete")
def subnet_delete(ref: str) -> None:
    with api_errors():
        _client().subnets.delete(ref)
    console.print(f"Deleted subnet {ref}")


# --- nic ----------------------------------------------------------------------------------------------

@nic_app.command("create")
def nic_create(subnet: str = typer.Option(None, "--subnet", help="Default: the default VPC's subnet of --zone"),
               zone: str = typer.Option(None, "--zone"), name: str = typer.Option(None, "--name"),
               private_ip: str = typer.Option(None, "--private-ip"),
               security_group: list[str] = typer.Option(None, "--security-group", "-g",
                                                        help="Repeat for several (default: the VPC's default)"),
               public_ip: bool = typer.Option(False, "--public-ip", help="Allocate a floating IP with it"),
               output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().network_interfaces.create(subnet, zone=zone, name=name, private_ip=private_ip,
                                                   security_groups=security_group or None,
                                                   assign_public_ip=public_ip), output)


@nic_app.command("list")
def nic_list(vpc: str = typer.Option(None, "--vpc", help="VPC id"),
             subnet: str = typer.Option(None, "--subnet", help="Subnet id"),
             instance: str = typer.Option(None, "--instance", help="Instance id"), output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().network_interfaces.list(vpc_id=vpc, subnet_id=subnet, instance_id=instance), output,
               NIC_COLUMNS)


@nic_app.command("show")
def nic_show(ref: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().network_interfaces.get(ref), output)


@nic_app.command("update")
def nic_update(ref: str, name: str = typer.Option(None, "--name"),
               security_group: list[str] = typer.Option(None, "--security-group", "-g",
                                                        help="The new set of groups (repeat for several)"),
               output: str = OutputOpt) -> None:
    """Change the interface's security groups (applied to a running instance at once)."""
    with api_errors():
        render(_client().network_interfaces.update(ref, name=name, security_groups=security_group or None), output)


@nic_app.command("delete")
def nic_delete(ref: str) -> None:
    with api_errors():
        _client().network_interfaces.delete(ref)
    console.print(f"Deleted network interface {ref}")


# --- security-group -----------------------------------------------------------------------------------

def _group_row(g: dict[str, Any]) -> dict[str, Any]:
    return g | {"rules": len(g.get("rules", []))}


def _ports(spec: str | None) -> tuple[int | None, int | None]:
    """`22` or `8000-8080` → (min, max)."""
    if not spec:
        return None, None
    low, _, high = spec.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        fail(f"--port takes a port or a range such as 8000-8080, not '{spec}'", EXIT_USAGE)


@group_app.command("create")
def group_create(name: str, vpc: str = typer.Option(..., "--vpc", help="VPC id or name"),
                 description: str = typer.Option(None, "--description"), output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().security_groups.create(vpc, name, description=description), output)


@group_app.command("list")
def group_list(vpc: str = typer.Option(None, "--vpc", help="VPC id"), output: str = OutputOpt) -> None:
    with api_errors():
        render([_group_row(g) for g in _client().security_groups.list(vpc_id=vpc)], output, GROUP_COLUMNS)


@group_app.command("show")
def group_show(ref: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().security_groups.get(ref), output)


@group_app.command("delete")
def group_delete(ref: str) -> None:
    with api_errors():
        _client().security_groups.delete(ref)
    console.print(f"Deleted security group {ref}")


@group_app.command("rule-add")
def rule_add(ref: str, direction: str = typer.Option("ingress", "--direction", help="ingress or egress"),
             protocol: str = typer.Option("tcp", "--protocol", help="tcp, udp, icmp or all"),
             port: str = typer.Option(None, "--port", help="A port or a range (8000-8080); tcp/udp only"),
             cidr: str = typer.Option(None, "--cidr", help="The peer's addresses"),
             remote_group: str = typer.Option(None, "--remote-group", help="The members of this group"),
             description: str = typer.Option(None, "--description"), output: str = OutputOpt) -> None:
    """Allow traffic, e.g. `rule-add web --port 443 --cidr 0.0.0.0/0`."""
    low, high = _ports(port)
    with api_errors():
        render(_client().security_groups.add_rule(ref, direction, protocol, port_min=low, port_max=high, cidr=cidr,
                                                  remote_group=remote_group, description=description), output)


@group_app.command("rule-list")
def rule_list(ref: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().security_groups.rules(ref), output, RULE_COLUMNS)


@group_app.command("rule-delete")
def rule_delete(ref: str, rule_id: str) -> None:
    with api_errors():
        _client().security_groups.delete_rule(ref, rule_id)
    console.print(f"Deleted rule {rule_id}")


# --- floating-ip --------------------------------------------------------------------------------------

@fip_app.command("allocate")
def fip_allocate(region: str = typer.Option(None, "--region"), description: str = typer.Option(None, "--description"),
                 output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().floating_ips.allocate(region=region, description=description), output)


@fip_app.command("list")
def fip_list(output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().floating_ips.list(), output, FIP_COLUMNS)


@fip_app.command("show")
def fip_show(ref: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().floating_ips.get(ref), output)


@fip_app.command("attach")
def fip_attach(ref: str, nic: str, output: str = OutputOpt) -> None:
    """Attach a floating IP (id or address) to a network interface, live."""
    with api_errors():
        render(_client().floating_ips.attach(ref, nic), output)


@fip_app.command("detach")
def fip_detach(ref: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().floating_ips.detach(ref), output)


@fip_app.command("release")
def fip_release(ref: str) -> None:
    with api_errors():
        _client().floating_ips.release(ref)
    console.print(f"Released floating IP {ref}")


# --- nat-gateway --------------------------------------------------------------------------------------

@nat_app.command("create")
def nat_create(subnet: str = typer.Option(..., "--subnet", help="A public subnet"),
               floating_ip: str = typer.Option(None, "--floating-ip", help="Default: a new one"),
               name: str = typer.Option(None, "--name"), output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().nat_gateways.create(subnet, floating_ip=floating_ip, name=name), output)


@nat_app.command("list")
def nat_list(vpc: str = typer.Option(None, "--vpc", help="VPC id"), output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().nat_gateways.list(vpc_id=vpc), output, NAT_COLUMNS)


@nat_app.command("show")
def nat_show(ref: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().nat_gateways.get(ref), output)


@nat_app.command("delete")
def nat_delete(ref: str) -> None:
    with api_errors():
        _client().nat_gateways.delete(ref)
    console.print(f"Deleted NAT gateway {ref}")


# --- flow-log -----------------------------------------------------------------------------------------

@flow_app.command("create")
def flow_create(resource: str, traffic: str = typer.Option("ALL", "--traffic", help="ACCEPT, REJECT or ALL"),
                name: str = typer.Option(None, "--name"), output: str = OutputOpt) -> None:
    """Capture the flows of a VPC, subnet or interface (its id)."""
    with api_errors():
        render(_client().flow_logs.create(resource, traffic_type=traffic.upper(), name=name), output)


@flow_app.command("list")
def flow_list(vpc: str = typer.Option(None, "--vpc", help="VPC id"), output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().flow_logs.list(vpc_id=vpc), output, FLOW_LOG_COLUMNS)


@flow_app.command("show")
def flow_show(ref: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().flow_logs.get(ref), output)


@flow_app.command("delete")
def flow_delete(ref: str) -> None:
    with api_errors():
        _client().flow_logs.delete(ref)
    console.print(f"Deleted flow log {ref}")


@flow_app.command("records")
def flow_records(ref: str, since: str = typer.Option(None, "--since", help="ISO 8601"),
                 until: str = typer.Option(None, "--until", help="ISO 8601"),
                 action: str = typer.Option(None, "--action", help="ACCEPT or REJECT"),
                 nic: str = typer.Option(None, "--nic", help="Interface id"),
                 address: str = typer.Option(None, "--address", help="Source or destination"),
                 port: int = typer.Option(None, "--port", help="Source or destination"),
                 protocol: str = typer.Option(None, "--protocol"), output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().flow_logs.records(ref, since=since, until=until, action=action.upper() if action else None,
                                           interface_id=nic, address=address, port=port, protocol=protocol),
               output, RECORD_COLUMNS)


def register(app: typer.Typer) -> None:
    app.add_typer(vpc_app, name="vpc")
    app.add_typer(subnet_app, name="subnet")
    app.add_typer(nic_app, name="nic")
    app.add_typer(group_app, name="security-group")
    app.add_typer(fip_app, name="floating-ip")
    app.add_typer(nat_app, name="nat-gateway")
    app.add_typer(flow_app, name="flow-log")
