"""`hackboot lb …` (load balancers, listeners, pools, members, rules, stats, logs) and `hackboot certificate …`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from hackboot.cli.context import state
from hackboot.cli.output import EXIT_USAGE, OutputOpt, api_errors, console, fail, render

LB_COLUMNS = ["id", "name", "vip", "public_ip", "subnet_id", "status", "status_reason"]
LISTENER_COLUMNS = ["id", "name", "protocol", "port", "default_pool_id", "certificate_ids", "connection_limit",
                    "request_rate_limit"]
POOL_COLUMNS = ["id", "name", "protocol", "algorithm", "sticky", "proxy_protocol", "members"]
MEMBER_COLUMNS = ["id", "address", "port", "weight", "admin_state", "health", "health_reason"]
RULE_COLUMNS = ["id", "priority", "host", "path_prefix", "action", "pool_id", "redirect_url", "status_code"]
CERT_COLUMNS = ["id", "name", "names", "not_after", "fingerprint_sha256"]
LOG_COLUMNS = ["time", "listener_id", "client", "method", "path", "status", "duration_ms", "bytes_out", "member_id"]
COUNTER_COLUMNS = ["kind", "id", "requests", "errors", "active_connections", "bytes_in", "bytes_out",
                   "response_time_ms"]

lb_app = typer.Typer(help="Load balancers (HAProxy in the VPC): listeners, pools, members, rules.",
                     no_args_is_help=True)
cert_app = typer.Typer(help="TLS certificates for https listeners (the private key is stored sealed).",
                       no_args_is_help=True)
WaitOpt = typer.Option(False, "--wait", "-w", help="Wait until the load balancer runs its configuration")
TimeoutOpt = typer.Option(120, "--timeout", help="Seconds to wait")


def _client() -> Any:
    return state.client()


def _wait(client: Any, lb: dict[str, Any], status: str, timeout: float, verb: str) -> dict[str, Any]:
    with console.status(f"{verb} {lb['name']}…"):
        result: dict[str, Any] = client.load_balancers.wait(lb["id"], status, timeout=timeout)
    return result


# --- load balancers -----------------------------------------------------------------------------------

@lb_app.command("create")
def lb_create(name: str, subnet: str = typer.Option(..., "--subnet", help="Subnet of the VIP (id or name)"),
              internet_facing: bool = typer.Option(False, "--internet-facing", help="Give it a floating IP"),
              security_group: list[str] = typer.Option(None, "--security-group", help="Group of the VIP (repeat)"),
              description: str = typer.Option(None, "--description"), wait: bool = WaitOpt,
              timeout: float = TimeoutOpt, output: str = OutputOpt) -> None:
    with api_errors():
        client = _client()
        lb = client.load_balancers.create(name, subnet, internet_facing=internet_facing,
                                          security_groups=security_group or None, description=description)
        if wait:
            lb = _wait(client, lb, "ACTIVE", timeout, "Creating")
        render(lb, output)


@lb_app.command("list")
def lb_list(vpc: str = typer.Option(None, "--vpc", help="VPC id"), status: str = typer.Option(None, "--status"),
            output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().load_balancers.list(vpc_id=vpc, status=status), output, LB_COLUMNS)


@lb_app.command("show")
def lb_show(ref: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().load_balancers.get(ref), output)


@lb_app.command("update")
def lb_update(ref: str, name: str = typer.Option(None, "--name"),
              description: str = typer.Option(None, "--description"),
              security_group: list[str] = typer.Option(None, "--security-group", help="Groups of the VIP (repeat)"),
              output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().load_balancers.update(ref, name=name, description=description,
                                               security_groups=security_group or None), output)


@lb_app.command("delete")
def lb_delete(ref: str, wait: bool = WaitOpt, timeout: float = TimeoutOpt, output: str = OutputOpt) -> None:
    """Delete it with its listeners, pools, members and rules."""
    with api_errors():
        client = _client()
        lb = client.load_balancers.delete(ref)
        if wait:
            lb = _wait(client, lb, "DELETED", timeout, "Deleting")
        render(lb, output)


# --- listeners ----------------------------------------------------------------------------------------

@lb_app.command("listener-add")
def listener_add(ref: str, protocol: str = typer.Option(..., "--protocol", help="http, https or tcp"),
                 port: int = typer.Option(..., "--port"), name: str = typer.Option(None, "--name"),
                 default_pool: str = typer.Option(None, "--default-pool", help="Pool id or name"),
                 certificate: list[str] = typer.Option(None, "--certificate",
                                                       help="https: certificate (repeat; the first is the default)"),
                 redirect_to_https: int = typer.Option(None, "--redirect-to-https",
                                                       help="http: answer 301 to https on this port"),
                 connection_limit: int = typer.Option(None, "--connection-limit"),
                 connection_rate_limit: int = typer.Option(None, "--connection-rate-limit",
                                                           help="New connections per second per client"),
                 request_rate_limit: int = typer.Option(None, "--request-rate-limit",
                                                        help="Requests per second per client (429 over)"),
                 idle_timeout: float = typer.Option(None, "--idle-timeout", help="Seconds"),
                 output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().load_balancers.add_listener(
            ref, protocol, port, name=name, default_pool=default_pool, certificates=certificate or None,
            redirect_to_https_port=redirect_to_https, connection_limit=connection_limit,
            connection_rate_limit=connection_rate_limit, request_rate_limit=request_rate_limit,
            idle_timeout_s=idle_timeout), output)


@lb_app.command("listener-list")
def listener_list(ref: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().load_balancers.listeners(ref), output, LISTENER_COLUMNS)


@lb_app.command("listener-delete")
def listener_delete(ref: str, listener: str) -> None:
    with api_errors():
        _client().load_balancers.delete_listener(ref, listener)
    console.print(f"Deleted listener {listener}")


# --- pools and members --------------------------------------------------------------------------------

@lb_app.command("pool-add")
def pool_add(ref: str, name: str = typer.Option(..., "--name"),
             protocol: str = typer.Option(None, "--protocol", help="http (default) or tcp"),
             algorithm: str = typer.Option(None, "--algorithm", help="roundrobin, leastconn or source"),
             sticky: str = typer.Option(None, "--sticky", help="none, cookie (http) or source_ip"),
             proxy_protocol: bool = typer.Option(None, "--proxy-protocol/--no-proxy-protocol"),
             check: str = typer.Option(None, "--check", help="Health check protocol: http or tcp"),
             check_path: str = typer.Option(None, "--check-path"),
             check_host: str = typer.Option(None, "--check-host"),
             check_codes: str = typer.Option(None, "--check-codes", help='e.g. "200" or "200-399"'),
             check_interval: float = typer.Option(None, "--check-interval", help="Seconds"),
             check_timeout: float = typer.Option(None, "--check-timeout", help="Seconds"),
             healthy_threshold: int = typer.Option(None, "--healthy-threshold"),
             unhealthy_threshold: int = typer.Option(None, "--unhealthy-threshold"),
             output: str = OutputOpt) -> None:
    options = {"path": check_path, "host": check_host, "expected_codes": check_codes, "interval_s": check_interval,
               "timeout_s": check_timeout, "healthy_threshold": healthy_threshold,
               "unhealthy_threshold": unhealthy_threshold}
    given = {k: v for k, v in options.items() if v is not None}
    if given and check is None:
        fail("--check-… options need --check http|tcp", EXIT_USAGE)
    health_check = {"protocol": check, **given} if check else None
    with api_errors():
        render(_client().load_balancers.add_pool(ref, name, protocol=protocol, algorithm=algorithm, sticky=sticky,
                                                  proxy_protocol=proxy_protocol, health_check=health_check), output)


@lb_app.command("pool-list")
def pool_list(ref: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().load_balancers.pools(ref), output, POOL_COLUMNS,
               formatters={"members": lambda members: str(len(members))})


@lb_app.command("pool-delete")
def pool_delete(ref: str, pool: str) -> None:
    """Refused while a listener or a rule forwards to it."""
    with api_errors():
        _client().load_balancers.delete_pool(ref, pool)
    console.print(f"Deleted pool {pool}")


@lb_app.command("member-add")
def member_add(ref: str, pool: str = typer.Option(..., "--pool"), port: int = typer.Option(..., "--port"),
               nic: str = typer.Option(None, "--nic", help="An interface of the VPC (id or name)"),
               address: str = typer.Option(None, "--address", help="An address in the VPC"),
               weight: int = typer.Option(None, "--weight", help="0 to 256"), output: str = OutputOpt) -> None:
    if (nic is None) == (address is None):
        fail("Give --nic or --address (one of them)", EXIT_USAGE)
    with api_errors():
        render(_client().load_balancers.add_member(ref, pool, port, network_interface=nic, address=address,
                                                   weight=weight), output)


@lb_app.command("member-list")
def member_list(ref: str, pool: str = typer.Option(..., "--pool"), output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().load_balancers.members(ref, pool), output, MEMBER_COLUMNS)


@lb_app.command("member-drain")
def member_drain(ref: str, member: str, pool: str = typer.Option(..., "--pool"),
                 undo: bool = typer.Option(False, "--undo", help="Enable it again"),
                 output: str = OutputOpt) -> None:
    """No new connections to the member; its open (and sticky) sessions finish."""
    with api_errors():
        render(_client().load_balancers.update_member(ref, pool, member, admin_state="enabled" if undo else "drain"),
               output)


@lb_app.command("member-remove")
def member_remove(ref: str, member: str, pool: str = typer.Option(..., "--pool")) -> None:
    with api_errors():
        _client().load_balancers.remove_member(ref, pool, member)
    console.print(f"Removed member {member}")


# --- rules --------------------------------------------------------------------------------------------

@lb_app.command("rule-add")
def rule_add(ref: str, listener: str = typer.Option(..., "--listener"),
             priority: int = typer.Option(..., "--priority", help="The lowest matching rule wins"),
             host: str = typer.Option(None, "--host", help='A DNS name or "*.suffix"'),
             path_prefix: str = typer.Option(None, "--path-prefix", help='e.g. "/api/"'),
             forward: str = typer.Option(None, "--forward", help="Forward to this pool"),
             redirect: str = typer.Option(None, "--redirect", help="Redirect to this absolute URL"),
             redirect_code: int = typer.Option(None, "--redirect-code"),
             fixed_status: int = typer.Option(None, "--fixed-status", help="Answer this status"),
             content_type: str = typer.Option(None, "--content-type"),
             body: str = typer.Option(None, "--body", help="Fixed response body (at most 1 KiB)"),
             output: str = OutputOpt) -> None:
    actions = [a for a, given in (("forward", forward), ("redirect", redirect), ("fixed_response", fixed_status))
               if given is not None]
    if len(actions) != 1:
        fail("Give one of --forward POOL, --redirect URL, --fixed-status CODE", EXIT_USAGE)
    with api_errors():
        render(_client().load_balancers.add_rule(
            ref, listener, priority, actions[0], host=host, path_prefix=path_prefix, pool=forward,
            redirect_url=redirect, redirect_code=redirect_code, status_code=fixed_status, content_type=content_type,
            body=body), output)


@lb_app.command("rule-list")
def rule_list(ref: str, listener: str = typer.Option(..., "--listener"), output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().load_balancers.rules(ref, listener), output, RULE_COLUMNS)


@lb_app.command("rule-delete")
def rule_delete(ref: str, rule: str, listener: str = typer.Option(..., "--listener")) -> None:
    with api_errors():
        _client().load_balancers.delete_rule(ref, listener, rule)
    console.print(f"Deleted rule {rule}")


# --- observed -----------------------------------------------------------------------------------------

@lb_app.command("stats")
def lb_stats(ref: str, output: str = OutputOpt) -> None:
    """Requests, errors, connections, bytes and response time per listener, pool and member."""
    with api_errors():
        stats = _client().load_balancers.stats(ref)
    if output != "table":
        render(stats, output)
        return
    rows = [{"kind": kind.rstrip("s"), "id": object_id, **counters}
            for kind in ("listeners", "pools", "members") for object_id, counters in stats[kind].items()]
    render(rows, output, COUNTER_COLUMNS, title=f"as of {stats['updated_at'] or 'never'}")


@lb_app.command("logs")
def lb_logs(ref: str, since: str = typer.Option(None, "--since", help="ISO 8601 time"),
            status: int = typer.Option(None, "--status", help="Only this HTTP status"),
            limit: int = typer.Option(100, "--limit"), output: str = OutputOpt) -> None:
    """Access logs, oldest first."""
    with api_errors():
        render(_client().load_balancers.logs(ref, since=since, status=status, limit=limit), output, LOG_COLUMNS)


# --- certificates -------------------------------------------------------------------------------------

def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"Cannot read the {what} {path}: {e}", EXIT_USAGE)


@cert_app.command("upload")
def cert_upload(chain: Path = typer.Option(..., "--chain", help="PEM file: the certificate, then its issuers"),
                key: Path = typer.Option(..., "--key", help="PEM file: the private key (unencrypted)"),
                name: str = typer.Option(None, "--name"), output: str = OutputOpt) -> None:
    chain_pem, key_pem = _read(chain, "chain"), _read(key, "key")
    with api_errors():
        render(_client().certificates.upload(chain_pem, key_pem, name=name), output)


@cert_app.command("list")
def cert_list(output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().certificates.list(), output, CERT_COLUMNS)


@cert_app.command("show")
def cert_show(ref: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().certificates.get(ref), output)


@cert_app.command("delete")
def cert_delete(ref: str) -> None:
    """Refused while a listener serves it."""
    with api_errors():
        _client().certificates.delete(ref)
    console.print(f"Deleted certificate {ref}")


def register(app: typer.Typer) -> None:
    app.add_typer(lb_app, name="lb")
    app.add_typer(cert_app, name="certificate")
