"""`hackboot keypair|instance|server-group|agent` commands."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import typer

from hackboot.cli import config
from hackboot.cli.context import state
from hackboot.cli.output import (
    EXIT_ERROR,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    OutputOpt,
    api_errors,
    console,
    err_console,
    fail,
    render,
)

INSTANCE_COLUMNS = ["id", "name", "status", "task_state", "flavor_id", "image_id", "zone_id", "host_name",
                    "ssh_port", "status_reason"]
KEYPAIR_COLUMNS = ["id", "name", "key_type", "fingerprint", "created_at"]
GROUP_COLUMNS = ["id", "name", "policy", "members", "created_at"]


def keys_dir() -> Path:
    """Where `keypair create` saves generated private keys (next to the CLI config)."""
    return config.config_path().parent / "keys"


def _client() -> Any:
    return state.client()


def _resolve(client: Any, ref: str) -> dict[str, Any]:
    return client.instances.get(ref)  # type: ignore[no-any-return]


# --- key pairs -----------------------------------------------------------------------------------------

keypair_app = typer.Typer(help="SSH key pairs installed into instances (root's authorized_keys).",
                          no_args_is_help=True)


@keypair_app.command("create")
def keypair_create(name: str,
                   save: Path = typer.Option(None, "--save", help="Where to write the private key "
                                             "(default: ~/.config/hackboot/keys/NAME)"),
                   output: str = OutputOpt) -> None:
    """Generate an ed25519 key pair; the private key is saved locally (mode 0600), never again shown."""
    with api_errors():
        kp = _client().keypairs.create(name)
    path = save or keys_dir() / name
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(kp.pop("private_key"))
    kp["private_key_file"] = str(path)
    render(kp, output)
    if output == "table":
        err_console.print(f"Private key saved to {path} (mode 0600): it is not stored by the cloud.")


@keypair_app.command("import")
def keypair_import(name: str,
                   public_key: Path = typer.Option(Path.home() / ".ssh" / "id_ed25519.pub", "--public-key", "-k",
                                                   help="OpenSSH public key file"),
                   output: str = OutputOpt) -> None:
    """Register an existing public key."""
    try:
        text = public_key.read_text().strip()
    except OSError as exc:
        fail(f"Cannot read {public_key}: {exc}", EXIT_USAGE)
    with api_errors():
        render(_client().keypairs.create(name, text), output)


@keypair_app.command("list")
def keypair_list(output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().keypairs.list(), output, KEYPAIR_COLUMNS)


@keypair_app.command("show")
def keypair_show(name: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().keypairs.get(name), output)


@keypair_app.command("delete")
def keypair_delete(name: str) -> None:
    """Delete a key pair (instances keep the key they were built with)."""
    with api_errors():
        _client().keypairs.delete(name)
    console.print(f"Key pair {name} deleted.")


# --- server groups --------------------------------------------------------------------------------------

group_app = typer.Typer(help="Server groups: place instances together (affinity) or apart (anti-affinity).",
                        no_args_is_help=True)


@group_app.command("create")
def group_create(name: str, policy: str = typer.Option("anti-affinity", "--policy", "-p",
                                                      help="affinity or anti-affinity"),
                 output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().server_groups.create(name, policy), output)


@group_app.command("list")
def group_list(output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().server_groups.list(), output, GROUP_COLUMNS)


@group_app.command("show")
def group_show(name: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().server_groups.get(name), output)


@group_app.command("delete")
def group_delete(name: str) -> None:
    with api_errors():
        _client().server_groups.delete(name)
    console.print(f"Server group {name} deleted.")


# --- instances ------------------------------------------------------------------------------------------

instance_app = typer.Typer(help="Virtual machines.", no_args_is_help=True)


def _wait(client: Any, inst: dict[str, Any], statuses: tuple[str, ...], timeout: float, verb: str) -> dict[str, Any]:
    """Spinner with the live status until one of `statuses`; exits non-zero on ERROR or timeout."""
    started = time.monotonic()
    with console.status(f"{verb} {inst['name']}…") as status:
        def show(current: dict[str, Any]) -> None:
            task = f" ({current['task_state']})" if current.get("task_state") else ""
            status.update(f"{verb} {current['name']}: {current['status']}{task}  "
                          f"[{time.monotonic() - started:.0f}s]")

        with api_errors():
            final = client.instances.wait(inst["id"], statuses, timeout=timeout, on_poll=show)
    if final["status"] not in statuses:
        fail(f"Instance {final['name']} is {final['status']}: {final.get('status_reason') or 'no reason given'}",
             EXIT_ERROR)
    return final  # type: ignore[no-any-return]


@instance_app.command("create")
def instance_create(
    name: str,
    flavor: str = typer.Option(..., "--flavor", "-f", help="e.g. VPS-NANO (`hackboot flavor list`)"),
    image: str = typer.Option(..., "--image", "-i", help="Image name or id, e.g. debian-12 or tiny"),
    key: str = typer.Option(None, "--key", "-k", help="Key pair name for root's SSH access"),
    zone: str = typer.Option(None, "--zone", "-z", help="Zone, e.g. PAR1-a"),
    region: str = typer.Option(None, "--region", "-r", help="Region (any operational zone in it)"),
    user_data: Path = typer.Option(None, "--user-data", help="cloud-init user data file (#cloud-config…)"),
    server_group: str = typer.Option(None, "--server-group", help="Server group name or id"),
    placement: str = typer.Option(None, "--placement", help="spread (default) or pack"),
    subnet: str = typer.Option(None, "--subnet", help="Subnet of its VPC NIC (default: the default VPC's)"),
    security_group: list[str] = typer.Option(None, "--security-group", "-g",
                                             help="Security group (repeat for several; default: the VPC's default)"),
    private_ip: str = typer.Option(None, "--private-ip", help="Its address in the subnet (default: the lowest free)"),
    wait: bool = typer.Option(False, "--wait", "-w", help="Wait until ACTIVE (non-zero exit on ERROR)"),
    timeout: float = typer.Option(600, "--timeout", help="Seconds to wait"),
    output: str = OutputOpt,
) -> None:
    """Create a virtual machine."""
    data = None
    if user_data is not None:
        try:
            data = user_data.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"Cannot read {user_data}: {exc}", EXIT_USAGE)
    client = _client()
    with api_errors():
        inst = client.instances.create(name, flavor=flavor, image=image, keypair=key, zone=zone, region=region,
                                       user_data=data, server_group=server_group, placement=placement,
                                       subnet=subnet, security_groups=security_group or None, private_ip=private_ip)
    if wait:
        inst = _wait(client, inst, ("ACTIVE",), timeout, "Creating")
    render(inst, output, INSTANCE_COLUMNS if output == "table" else None)


NIC_COLUMNS = ["device_index", "id", "name", "private_ip", "public_ip", "subnet_id", "mac", "status"]


@instance_app.command("nic-list")
def instance_nic_list(name: str, output: str = OutputOpt) -> None:
    """The instance's network interfaces (device 0: the primary one, made with it)."""
    with api_errors():
        render(_client().instances.interfaces(name), output, NIC_COLUMNS)


@instance_app.command("nic-attach")
def instance_nic_attach(name: str, nic: str, output: str = OutputOpt) -> None:
    """Attach a network interface (`hackboot nic create`); a running guest gets it hot-plugged."""
    with api_errors():
        render(_client().instances.attach_interface(name, nic), output)


@instance_app.command("nic-detach")
def instance_nic_detach(name: str, nic: str, output: str = OutputOpt) -> None:
    """Detach a secondary network interface (unplugged from a running guest; the interface stays)."""
    with api_errors():
        render(_client().instances.detach_interface(name, nic), output)


@instance_app.command("list")
def instance_list(status: str = typer.Option(None, "--status"), zone: str = typer.Option(None, "--zone"),
                  host: str = typer.Option(None, "--host"), name: str = typer.Option(None, "--name"),
                  output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().instances.list(status=status, zone=zone, host=host, name=name), output, INSTANCE_COLUMNS)


@instance_app.command("show")
def instance_show(name: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().instances.get(name), output)


def _action(name: str, action: str, wait: bool, timeout: float, output: str, statuses: tuple[str, ...],
            verb: str, **params: Any) -> None:
    client = _client()
    with api_errors():
        inst = client.instances.action(name, action, **params)
    if wait:
        inst = _wait(client, inst, statuses, timeout, verb)
    render(inst, output, INSTANCE_COLUMNS if output == "table" else None)


WaitOpt = typer.Option(False, "--wait", "-w", help="Wait until the action has finished")
TimeoutOpt = typer.Option(300, "--timeout", help="Seconds to wait")


@instance_app.command("stop")
def instance_stop(name: str, wait: bool = WaitOpt, timeout: float = TimeoutOpt, output: str = OutputOpt) -> None:
    """Power off (ACPI shutdown, then forced after a grace period)."""
    _action(name, "stop", wait, timeout, output, ("SHUTOFF",), "Stopping")


@instance_app.command("start")
def instance_start(name: str, wait: bool = WaitOpt, timeout: float = TimeoutOpt, output: str = OutputOpt) -> None:
    _action(name, "start", wait, timeout, output, ("ACTIVE",), "Starting")


@instance_app.command("reboot")
def instance_reboot(name: str, hard: bool = typer.Option(False, "--hard", help="Reset at once (no ACPI)"),
                    wait: bool = WaitOpt, timeout: float = TimeoutOpt, output: str = OutputOpt) -> None:
    _action(name, "reboot", wait, timeout, output, ("ACTIVE",), "Rebooting", hard=hard)


@instance_app.command("resize")
def instance_resize(name: str, flavor: str = typer.Option(..., "--flavor", "-f"), wait: bool = WaitOpt,
                    timeout: float = TimeoutOpt, output: str = OutputOpt) -> None:
    """Change the flavor (the guest is stopped, its disk grown, and started again)."""
    _action(name, "resize", wait, timeout, output, ("ACTIVE", "SHUTOFF"), "Resizing", flavor=flavor)


@instance_app.command("delete")
def instance_delete(name: str, wait: bool = WaitOpt, timeout: float = TimeoutOpt) -> None:
    client = _client()
    with api_errors():
        inst = client.instances.delete(name)
    if wait:
        _wait(client, inst, ("DELETED",), timeout, "Deleting")
    console.print(f"Instance {inst['name']} ({inst['id']}) {'deleted' if wait else 'is being deleted'}.")


@instance_app.command("snapshot")
def instance_snapshot(name: str, image_name: str = typer.Option(None, "--name", help="Name of the new image"),
                      output: str = OutputOpt) -> None:
    """Save the instance's disk as a new private image (a running guest is briefly stopped)."""
    with api_errors():
        render(_client().instances.snapshot(name, image_name), output)


@instance_app.command("console-log")
def instance_console_log(name: str, tail: int = typer.Option(64 * 1024, "--tail", help="Bytes from the end")) -> None:
    """Print the tail of the serial console log."""
    with api_errors():
        text = _client().instances.console(name, tail)
    sys.stdout.write(text)
    if text and not text.endswith("\n"):
        sys.stdout.write("\n")


DEFAULT_USERS = {"debian": "debian", "ubuntu": "ubuntu", "fedora": "fedora", "rocky": "rocky", "almalinux": "almalinux"}


def login_user(client: Any, image_id: str) -> str:
    """The user cloud-init installs the key for: the image's default user (root for unknown images)."""
    try:
        image = client.images.get(image_id)
    except Exception:
        return "root"
    return str(image.get("default_user") or DEFAULT_USERS.get(str(image.get("os", "")).lower(), "root"))


def ssh_argv(inst: dict[str, Any], identity: Path | None, command: list[str], user: str = "root") -> list[str]:
    """The ssh command line for an instance (port forward on 127.0.0.1, per-instance host key alias)."""
    known_hosts = config.config_path().parent / "known_hosts"
    argv = ["ssh", "-p", str(inst["ssh_port"]), "-o", f"HostKeyAlias={inst['id']}",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=accept-new"]
    key = identity
    if key is None and inst.get("keypair_name"):
        saved = keys_dir() / inst["keypair_name"]
        if saved.exists():
            key = saved
    if key is not None:
        argv += ["-i", str(key), "-o", "IdentitiesOnly=yes"]
    argv.append(f"{user}@{inst.get('ssh_host') or '127.0.0.1'}")
    return argv + command


@instance_app.command("ssh", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def instance_ssh(
    name: str,
    command: list[str] = typer.Argument(None, help="Command to run (after --)"),
    identity: Path = typer.Option(None, "--identity", "-i", help="Private key (default: the saved key pair, "
                                  "else ssh's own defaults in ~/.ssh)"),
    user: str = typer.Option(None, "--user", "-l", help="Default: the image's login user (root for tiny, "
                             "debian for debian-12)"),
) -> None:
    """SSH into an instance: `hackboot instance ssh web1 -- hostname`."""
    client = _client()
    with api_errors():
        inst = _resolve(client, name)
    if user is None:
        user = login_user(client, inst["image_id"])
    if inst["status"] != "ACTIVE" or not inst.get("ssh_port"):
        fail(f"Instance {inst['name']} is {inst['status']}: no SSH port yet", EXIT_NOT_FOUND)
    known_hosts = config.config_path().parent / "known_hosts"
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    argv = ssh_argv(inst, identity, list(command or []), user)
    os.execvp(argv[0], argv)


# --- the host agent ---------------------------------------------------------------------------------------

def agent(
    state_dir: Path = typer.Option(..., "--state-dir", help="Disks, seeds and QEMU run dirs of this host"),
    name: str = typer.Option(None, "--name", help="Host name (default: the machine's hostname)"),
    zone: str = typer.Option(None, "--zone", help="Zone of the host (default: the cloud's default zone)"),
    database_url: str = typer.Option(None, "--database-url", envvar="HACKBOOT_DATABASE_URL",
                                     help="The control plane's database (the agent reads desired state there)"),
    driver: str = typer.Option(None, "--driver", help="qemu or fake (default: qemu)"),
    accel: str = typer.Option(None, "--accel", help="kvm, tcg or auto (default: the accel setting, else probe)"),
    vcpus: int = typer.Option(None, "--vcpus", help="Declare vCPUs instead of measuring"),
    memory_mb: int = typer.Option(None, "--memory-mb", help="Declare memory instead of measuring"),
    disk_gb: int = typer.Option(None, "--disk-gb", help="Declare disk (thin provisioning) instead of free space"),
    cpu_ratio: float = typer.Option(None, "--cpu-allocation-ratio"),
    ram_ratio: float = typer.Option(None, "--ram-allocation-ratio"),
    disk_ratio: float = typer.Option(None, "--disk-allocation-ratio"),
    gpus: str = typer.Option(None, "--gpus", help="'MODEL=PCI,PCI;MODEL2=PCI' for passthrough"),
    log_level: str = typer.Option(None, "--log-level", help="Default: the log_level setting"),
) -> None:
    """Run a host agent: register this machine as a hypervisor host and run its instances.

    Options not given as flags come from the `agent_*` settings (HACKBOOT_AGENT_*, the TOML file)."""
    import logging

    from pydantic import ValidationError

    if database_url:
        os.environ["HACKBOOT_DATABASE_URL"] = database_url
    from hackboot.compute.agent import Agent, AgentSettings
    from hackboot.core.config import get_settings, reset_settings_cache

    reset_settings_cache()
    flags = {"state_dir": state_dir.absolute(), "name": name, "zone": zone, "driver": driver, "accel": accel,
             "vcpus": vcpus, "memory_mb": memory_mb, "disk_gb": disk_gb, "cpu_allocation_ratio": cpu_ratio,
             "ram_allocation_ratio": ram_ratio, "disk_allocation_ratio": disk_ratio, "gpus": gpus}
    try:
        settings = get_settings()
    except ValidationError as exc:
        fail(f"Invalid setting: {_validation_text(exc)}")
    try:
        cfg = AgentSettings.model_validate({k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        fail(f"Invalid agent option: {_validation_text(exc)}")
    logging.basicConfig(level=(log_level or settings.log_level).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from hackboot.core.fsperms import secure_state_dir

    assert cfg.state_dir is not None  # --state-dir is required
    secure_state_dir(cfg.state_dir, settings.unprivileged_user)  # tenant disks: not for local users
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Agent(cfg, stop_event=stop).run_forever()


def _validation_text(exc: Any) -> str:
    """`field: message; …` of a pydantic ValidationError (settings or flags), without its URLs."""
    return "; ".join(f"{'.'.join(str(part) for part in e['loc']) or 'value'}: {e['msg'].removeprefix('Value error, ')}"
                     for e in exc.errors())


def register(app: typer.Typer) -> None:
    app.add_typer(keypair_app, name="keypair")
    app.add_typer(instance_app, name="instance")
    app.add_typer(group_app, name="server-group")
    app.command("agent")(agent)
