"""Boot time (API create -> first SSH command) and density of real guests.

For each image (`tiny`, `debian-12` when it can be built), N sequential boots through the whole
cloud (REST API, scheduler, local agent, QEMU) with a breakdown:

    api        the POST /v1/instances round trip (validation, quota, placement, 202)
    agent      placed -> QEMU started (agent wake-up, qcow2 overlay, seed ISO, spawn, QMP checks)
    guest      QEMU started -> sshd answers with its banner (kernel, init, cloud-init subset, dropbear)
    ssh        banner -> first command done (key exchange, auth, `true`)

The peer, measured in the same run: the same guest booted by the QEMU driver alone (same
overlay, seed and command line, no API/DB/agent), so `overhead = cloud - bare` is what the
control plane adds. Then density: VPS-NANO `tiny` guests started one by one until placement
refuses, free memory falls under 1 GiB, or 40 run (bounded), with each QEMU's RSS and the
control plane's (API + agent) CPU and RSS per 10 instances.

    .venv/bin/python bench/boot.py             # 5 boots per image + density (several minutes)
    .venv/bin/python bench/boot.py --smoke     # 1 tiny boot, no density
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hackboot.sdk import ApiError, Client  # noqa: E402
from tests.support import Cloud, make_cloud  # noqa: E402

IMAGE_CACHE = Path(os.environ.get("HACKBOOT_IMAGE_CACHE", "/var/tmp/hackboot-image-cache"))
SSH_OPTS = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=2", "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes"]


def build_images(names: list[str]) -> list[str]:
    ok = []
    for name in names:
        proc = subprocess.run([sys.executable, "-m", "hackboot.images.builder", name, "--out", str(IMAGE_CACHE)],
                              capture_output=True, text=True, cwd=REPO)
        if proc.returncode == 0:
            ok.append(name)
        else:
            print(f"skipping {name}: build failed: {proc.stderr.strip()[-300:]}", file=sys.stderr)
    return ok


def default_user(image: str) -> str:
    """The login user of a built-in image (its build manifest says; root for tiny)."""
    try:
        return str(json.loads((IMAGE_CACHE / f"{image}.json").read_text()).get("default_user") or "root")
    except (OSError, ValueError):
        return "root"


def wait_banner(port: int, timeout: float = 300.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(2)
                if s.recv(64).startswith(b"SSH-"):
                    return time.time()
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no SSH banner on port {port}")


def ssh_ok(port: int, key: Path, timeout: float = 120.0, user: str = "root") -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(["ssh", *SSH_OPTS, "-i", str(key), "-p", str(port), f"{user}@127.0.0.1", "true"],
                          capture_output=True).returncode == 0:
            return time.time()
        time.sleep(0.1)
    raise TimeoutError("ssh never succeeded")


def boot_through_cloud(client: Client, image: str, flavor: str, key: dict[str, Any], keyfile: Path) -> dict[str, float]:
    t0 = time.time()
    inst = client.instances.create(f"boot-{int(t0 * 1000) % 10**8}", flavor=flavor, image=image,  # type: ignore[attr-defined]
                                   keypair=key["name"])
    t_api = time.time()
    while True:
        inst = client.instances.get(inst["id"])  # type: ignore[attr-defined]
        if inst["status"] in ("ACTIVE", "ERROR") and inst["task_state"] is None:
            break
        time.sleep(0.02)
    if inst["status"] != "ACTIVE":
        raise RuntimeError(f"boot failed: {inst['status_reason']}")
    t_banner = wait_banner(inst["ssh_port"])
    t_ssh = ssh_ok(inst["ssh_port"], keyfile, user=default_user(image))
    tm = inst["timings"]
    client.instances.delete(inst["id"])  # type: ignore[attr-defined]
    client.instances.wait_deleted(inst["id"])  # type: ignore[attr-defined]
    return {"total": t_ssh - t0, "api": t_api - t0, "agent": tm["qemu_started"] - tm["scheduled"],
            "agent_wakeup": tm["picked"] - tm["scheduled"], "agent_disk": tm["disk_ready"] - tm["picked"],
            "agent_seed": tm["seed_ready"] - tm["disk_ready"], "agent_spawn": tm["qemu_started"] - tm["seed_ready"],
            "guest": t_banner - tm["qemu_started"], "ssh": t_ssh - t_banner,
            "active_after": tm["running"] - t0}


def boot_bare(image_dir: Path, image: str, vcpus: int, memory_mb: int, key_pub: str, keyfile: Path,
              accel: str) -> dict[str, float]:
    """The peer: the same guest through the driver only (no API, database or agent)."""
    from hackboot.compute import cloudinit
    from hackboot.compute.driver import GuestSpec
    from hackboot.compute.nic import UserNetNic, find_free_port
    from hackboot.compute.qemu import QemuDriver

    m = json.loads((image_dir / f"{image}.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="hbbare-", dir="/tmp"))
    driver = QemuDriver(work)
    iid = "bare-" + os.urandom(4).hex()
    try:
        t0 = time.time()
        disk = work / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str((image_dir / m["disk"]).resolve()),
                        "-F", m["disk_format"], str(disk), str(20 * 1024**3)], check=True)
        seed = cloudinit.build_seed_iso(work / "seed.iso", instance_id=iid, hostname="bare", ssh_public_keys=[key_pub],
                                        user_data=None)
        port = find_free_port()
        spec = GuestSpec(instance_id=iid, name="bare", vcpus=vcpus, memory_mb=memory_mb, disk_path=disk,
                         kernel=(image_dir / m["kernel"]).resolve() if m.get("kernel") else None,
                         initrd=(image_dir / m["initrd"]).resolve() if m.get("initrd") else None,
                         cmdline=m.get("cmdline") if m.get("kernel") else None, seed_iso=seed,
                         nics=[UserNetNic(ssh_host_port=port)], accel=accel)  # type: ignore[arg-type]
        driver.spawn(spec)
        t_qemu = time.time()
        t_banner = wait_banner(port)
        t_ssh = ssh_ok(port, keyfile, user=default_user(image))
        return {"total": t_ssh - t0, "agent": t_qemu - t0, "guest": t_banner - t_qemu, "ssh": t_ssh - t_banner}
    finally:
        driver.destroy(iid)
        driver.close()
        shutil.rmtree(work, ignore_errors=True)


def stats(rows: list[dict[str, float]], key: str) -> dict[str, float]:
    values = [r[key] for r in rows]
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def proc_cpu_rss(pid: int) -> tuple[float, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith("VmRSS:"))
    return cpu, rss_kb


def mem_available_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def density(cloud: Cloud, client: Client, key: dict[str, Any], keyfile: Path, limit: int) -> dict[str, Any]:
    assert cloud.proc is not None
    made: list[dict[str, Any]] = []
    samples = []
    stop_reason = f"reached the bound of {limit}"

    def sample() -> None:
        cpu0, _ = proc_cpu_rss(cloud.proc.pid)  # type: ignore[union-attr]
        time.sleep(20)
        cpu1, rss = proc_cpu_rss(cloud.proc.pid)  # type: ignore[union-attr]
        qemu_rss = []
        for inst in made:
            pid = int((cloud.state_dir / "agent" / "instances" / inst["id"] / "qemu.pid").read_text())
            qemu_rss.append(proc_cpu_rss(pid)[1] / 1024)
        samples.append({"instances": len(made), "control_plane_cpu_pct": round((cpu1 - cpu0) / 20 * 100, 2),
                        "control_plane_rss_mb": round(rss / 1024, 1),
                        "qemu_rss_mb_avg": round(statistics.mean(qemu_rss), 1) if qemu_rss else 0,
                        "mem_available_mb": mem_available_mb()})
        print(f"  density: {samples[-1]}", flush=True)

    sample()
    try:
        while len(made) < limit:
            if mem_available_mb() < 1024:
                stop_reason = "free memory under 1 GiB"
                break
            try:
                inst = client.instances.create(f"dense-{len(made)}", flavor="VPS-NANO", image="tiny",  # type: ignore[attr-defined]
                                               keypair=key["name"])
            except ApiError as exc:
                stop_reason = f"placement refused: {exc.detail}"
                break
            inst = client.instances.wait(inst["id"], timeout=300)  # type: ignore[attr-defined]
            if inst["status"] != "ACTIVE":
                stop_reason = f"guest {len(made)} ended {inst['status']}: {inst['status_reason']}"
                break
            made.append(inst)
            ssh_ok(inst["ssh_port"], keyfile, timeout=300)
            if len(made) % 10 == 0:
                sample()
    finally:
        for inst in made:
            client.instances.delete(inst["id"])  # type: ignore[attr-defined]
        for inst in made:
            client.instances.wait_deleted(inst["id"], timeout=300)  # type: ignore[attr-defined]
    per10 = []
    base = samples[0]
    for s in samples[1:]:
        k = s["instances"] / 10
        per10.append({"cpu_pct_per_10": round((s["control_plane_cpu_pct"] - base["control_plane_cpu_pct"]) / k, 2),
                      "rss_mb_per_10": round((s["control_plane_rss_mb"] - base["control_plane_rss_mb"]) / k, 1)})
    return {"max_running": len(made), "stopped_because": stop_reason, "samples": samples, "per_10_instances": per10}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one tiny boot, no density")
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--images", default="tiny,debian-12")
    parser.add_argument("--density-limit", type=int, default=40)
    parser.add_argument("--no-density", action="store_true")
    parser.add_argument("--only-density", action="store_true", help="skip the boot timings")
    args = parser.parse_args()
    boots = 1 if args.smoke else args.boots
    images = build_images(["tiny"] if args.smoke or args.only_density else args.images.split(","))
    state = Path(tempfile.mkdtemp(prefix="hbboot-", dir="/tmp"))
    (state / "images").mkdir()
    (state / "images" / "builtin").symlink_to(IMAGE_CACHE)
    # Density is about real memory: placement must not be the limit, so the bench host sells
    # vCPUs and RAM generously (idle tiny guests touch a fraction of their 1 GB).
    cloud = make_cloud(state, HACKBOOT_AGENT_NAME="bench-host", HACKBOOT_AGENT_CPU_ALLOCATION_RATIO="32",
                       HACKBOOT_AGENT_RAM_ALLOCATION_RATIO="3", HACKBOOT_AGENT_DISK_ALLOCATION_RATIO="20")
    results: dict[str, Any] = {"boots": {}, "peer_bare_qemu": {}}
    cloud.start()
    try:
        client = cloud.client()
        deadline = time.monotonic() + 60
        host: dict[str, Any] = {}
        while time.monotonic() < deadline:
            items = client.get("/v1/hosts", name="bench-host")["items"]
            if items:
                host = items[0]
                break
            time.sleep(0.2)
        accel = host["facts"]["accel"]
        results["accel"] = accel
        results["accel_reason"] = host["facts"]["accel_reason"]
        key = client.keypairs.create("bench")  # type: ignore[attr-defined]
        keyfile = state / "bench-key"
        keyfile.write_text(key["private_key"])
        keyfile.chmod(0o600)
        admin = cloud.admin_client_unscoped()
        for resource, limit in (("instances", 1000), ("vcpus", 10_000), ("ram_mb", 10**8)):
            admin.projects.set_quota(cloud.project_id, resource, limit)  # type: ignore[attr-defined]
        for image in [] if args.only_density else images:
            flavor = "VPS-NANO" if image == "tiny" else "VPS-STARTER"
            vcpus, memory = (1, 1024) if image == "tiny" else (2, 4096)
            rows, bare = [], []
            for _ in range(boots):  # interleaved, so that load drifting on this shared machine hits both alike
                rows.append(boot_through_cloud(client, image, flavor, key, keyfile))
                bare.append(boot_bare(IMAGE_CACHE, image, vcpus, memory, key["public_key"], keyfile, accel))
            results["boots"][image] = {k: stats(rows, k) for k in ("total", "api", "agent", "guest", "ssh")}
            results["peer_bare_qemu"][image] = {k: stats(bare, k) for k in ("total", "agent", "guest", "ssh")}
            results["boots"][image]["raw"] = rows
        if not args.smoke and not args.no_density:
            results["density"] = density(cloud, client, key, keyfile, args.density_limit)
    finally:
        cloud.stop()
        for pidfile in (state / "agent" / "instances").glob("*/qemu.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
        shutil.rmtree(state, ignore_errors=True)

    print(f"\nBoot to first SSH command, {boots} boots per image, accelerator {results['accel']} "
          f"({results['accel_reason']})")
    print(f"{'image':<10} {'path':<10} {'median s':>9} {'min':>7} {'max':>7}   breakdown (medians, s)")
    for image in results["boots"]:
        b, p = results["boots"][image], results["peer_bare_qemu"][image]
        print(f"{image:<10} {'cloud':<10} {b['total']['median']:>9} {b['total']['min']:>7} {b['total']['max']:>7}   "
              f"api {b['api']['median']} | agent {b['agent']['median']} | guest {b['guest']['median']} | "
              f"ssh {b['ssh']['median']}")
        print(f"{'':<10} {'bare qemu':<10} {p['total']['median']:>9} {p['total']['min']:>7} {p['total']['max']:>7}   "
              f"disk+seed+spawn {p['agent']['median']} | guest {p['guest']['median']} | ssh {p['ssh']['median']}")
        overhead = round(b["total"]["median"] - p["total"]["median"], 3)
        results["boots"][image]["overhead_vs_bare_s"] = overhead
        print(f"{'':<10} {'overhead':<10} {overhead:>9}   (cloud/bare = "
              f"{b['total']['median'] / p['total']['median']:.2f})")
    if "density" in results:
        d = results["density"]
        print(f"\nDensity: {d['max_running']} VPS-NANO tiny guests running at once ({d['stopped_because']})")
        print(f"{'instances':>9} {'cp cpu %':>9} {'cp rss MB':>10} {'qemu rss MB':>12} {'mem avail MB':>13}")
        for s in d["samples"]:
            print(f"{s['instances']:>9} {s['control_plane_cpu_pct']:>9} {s['control_plane_rss_mb']:>10} "
                  f"{s['qemu_rss_mb_avg']:>12} {s['mem_available_mb']:>13}")
        for i, p10 in enumerate(d["per_10_instances"], 1):
            print(f"  per 10 instances (at {i * 10}): control plane +{p10['cpu_pct_per_10']}% CPU, "
                  f"+{p10['rss_mb_per_10']} MB RSS")
    name = "boot-smoke" if args.smoke else ("boot-density" if args.only_density else "boot")
    out = REPO / "bench" / "results" / f"{name}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
